"""In-process A/B of a bfloat16 training form of `kernels` against the form it replaced: two
detectors, same weights, alternating rounds (the order reversed every other round); prints JSON.

  python benchmarks/ab_bf16_form.py --form=gelu [--config=thumos_i3d] [--repeats=5]
  python benchmarks/ab_bf16_form.py --form=filter_grad

`filter_grad`: the kernel gradient of wide bfloat16 convolutions as one GEMM over the taps
(`kernels.conv1d_with_gemm_filter_grad`) against TensorFlow's backward-filter convolution.
`gelu`: the training step's GELU computed in float32 (`kernels.gelu`) against it computed in
bfloat16 (`tf.nn.gelu` as it is). Both detectors run `--mixed_precision=mixed_bfloat16
--kernel_policy=fast`, the default model at epoch 5. The JSON records each detector's first loss
and how often its step's trace called the form it was given, and the median over rounds of the
new form's time over the baseline's. Never run it beside other work.
"""

import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # pylint: disable=g-import-not-at-top,wrong-import-position


def _forms(kernels, tf):
  """form -> (the `kernels` attribute, {run name: its function}), the baseline first."""
  def bfloat16_gelu(x, training=False, policy="reference"):
    del training, policy
    return tf.nn.gelu(x, approximate=False)

  return {
      "filter_grad": ("conv1d_with_gemm_filter_grad", {
          "tf_backward_filter": kernels._same_conv1d,  # pylint: disable=protected-access
          "gemm_filter_grad": kernels.conv1d_with_gemm_filter_grad}),
      "gelu": ("gelu", {"bfloat16_gelu": bfloat16_gelu, "float32_gelu": kernels.gelu}),
  }


def main():
  parser = common.benchmark_parser(__doc__.splitlines()[0], default_repeats=5)
  parser.add_argument("--form", required=True, choices=("filter_grad", "gelu"))
  parser.add_argument("--config", default="thumos_i3d", help="flagfile name in configs/")
  args = parser.parse_args()
  run = common.run_start()  # before anything is built or timed
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import train_step  # pylint: disable=g-import-not-at-top
  from asl_tf import flags as asl_flags  # pylint: disable=g-import-not-at-top
  from asl_tf.modeling import kernels  # pylint: disable=g-import-not-at-top

  attribute, forms = _forms(kernels, tf)[args.form]
  original = getattr(kernels, attribute)
  runs, first_loss, calls, weights = {}, {}, {}, None
  try:
    for name, form in forms.items():
      calls[name] = 0

      def counted(*a, name=name, form=form, **k):
        calls[name] += 1
        return form(*a, **k)

      # The step is traced by its first call, with whatever the attribute holds then.
      setattr(kernels, attribute, counted)
      asl_flags.FLAGS.unparse_flags()
      tf.keras.utils.set_random_seed(0)
      setup = train_step.build_step(
          args.config, args.quick, False,
          ("--mixed_precision=mixed_bfloat16", "--kernel_policy=fast"), weights=weights,
          epoch=5)
      weights = weights or setup.model.get_weights()
      first_loss[name] = float(setup.step(setup.batch, setup.epoch)["total_loss"])
      setup.run()
      runs[name] = setup
  finally:
    setattr(kernels, attribute, original)
  times = {name: [] for name in runs}
  order = list(runs.items())
  for round_index in range((2 if args.quick else args.repeats) + 1):  # round 0: warm-up
    for name, setup in order[::-1] if round_index % 2 else order:
      start = time.perf_counter()
      setup.run()
      if round_index:
        times[name].append(time.perf_counter() - start)
  baseline, changed = times
  per_round = [b / a for a, b in zip(times[baseline], times[changed])]
  common.emit({"benchmark": f"ab_bf16_{args.form}", "command": " ".join(["python"] + sys.argv),
               "run": run, "config": args.config, "machine": common.machine_info(),
               "first_loss": first_loss, "form_calls_in_trace": calls,
               "results": common.ab_results(times, baseline, "train_step_median_sec",
                                            "rounds_sec"),
               "median_of_per_round_ratios": round(float(np.median(per_round)), 3)},
              args.output)


if __name__ == "__main__":
  main()
