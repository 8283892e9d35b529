"""In-process A/B of a training form of `kernels` against the form it replaced: two detectors,
same weights, alternating rounds (the order reversed every other round); prints JSON.

  python benchmarks/ab_form.py --form=gelu [--config=thumos_i3d] [--repeats=5]
  python benchmarks/ab_form.py --form=filter_grad
  python benchmarks/ab_form.py --form=depthwise
  python benchmarks/ab_form.py --form=layer_norm --mixed_precision=float32

`filter_grad`: the kernel gradient of wide bfloat16 convolutions as one GEMM over the taps
(`kernels.conv1d_with_gemm_filter_grad`) against TensorFlow's backward-filter convolution.
`gelu`: the training step's GELU computed in float32 (`kernels.gelu`) against it computed in
bfloat16 (`tf.nn.gelu` as it is). `depthwise`: the strided depthwise convolutions (the attention's
q / k / v in downsampling blocks) with their input gradient in float32
(`kernels.strided_depthwise_with_float32_input_grad`) against TensorFlow's bfloat16 gradient.
`layer_norm`: the training LayerNorm with its gradient written out against autodiff of the
element-wise form (`reference`'s). Both detectors run `--kernel_policy=fast` in
`--mixed_precision` (default mixed_bfloat16; the first three forms exist only there), the default
model at epoch 5.

The JSON records each detector's first loss, the dtypes of the op that tells the two traced
steps apart (`PROGRAM_OPS`; the script stops when they trace the same program, e.g.
`filter_grad` at `--quick` sizes, where no convolution is wide), which form ran first in each
round, and the per-round ratios' median and geometric mean (with the standard error of the mean
log ratio). Never run it beside other work.
"""

import collections
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # pylint: disable=g-import-not-at-top,wrong-import-position


# The op type whose dtypes (or count) tell the two forms' traced steps apart.
PROGRAM_OPS = {"filter_grad": "Conv2DBackpropFilter", "gelu": "Erfc",
               "depthwise": "DepthwiseConv2dNativeBackpropInput", "layer_norm": "RsqrtGrad"}


def _forms(kernels, tf):
  """form -> (the `kernels` attribute, {run name: its function}), the baseline first."""
  def bfloat16_gelu(x, training=False, policy="reference"):
    del training, policy
    return tf.nn.gelu(x, approximate=False)

  written_layer_norm = kernels._layer_norm_with_written_gradient  # pylint: disable=protected-access

  def autodiff_layer_norm(x, gamma, beta, epsilon):
    return kernels.layer_norm(x, gamma, beta, epsilon, training=True, policy="reference")

  return {
      "layer_norm": ("_layer_norm_with_written_gradient", {
          "autodiff": autodiff_layer_norm,
          "written_gradient": written_layer_norm}),
      "filter_grad": ("conv1d_with_gemm_filter_grad", {
          "tf_backward_filter": kernels._same_conv1d,  # pylint: disable=protected-access
          "gemm_filter_grad": kernels.conv1d_with_gemm_filter_grad}),
      "gelu": ("gelu", {"bfloat16_gelu": bfloat16_gelu, "float32_gelu": kernels.gelu}),
      "depthwise": ("strided_depthwise_with_float32_input_grad", {
          "bfloat16_depthwise": kernels._valid_depthwise_conv1d,  # pylint: disable=protected-access
          "float32_input_grad": kernels.strided_depthwise_with_float32_input_grad}),
  }


def op_dtypes(concrete_function, op_type):
  """{dtype name: count} of the `op_type` ops of a traced function, nested functions (`tf.cond`
  branches, gradients) included; a branch also rewritten for its gradient counts twice."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  graph_def = concrete_function.graph.as_graph_def()
  nodes = list(graph_def.node) + [n for f in graph_def.library.function for n in f.node_def]
  counts = collections.Counter(tf.as_dtype(n.attr["T"].type).name
                               for n in nodes if n.op == op_type)
  return dict(sorted(counts.items()))


def main():
  parser = common.benchmark_parser(__doc__.splitlines()[0], default_repeats=5)
  parser.add_argument("--form", required=True, choices=sorted(PROGRAM_OPS))
  parser.add_argument("--config", default="thumos_i3d", help="flagfile name in configs/")
  parser.add_argument("--mixed_precision", default="mixed_bfloat16",
                      choices=("float32", "mixed_bfloat16"), help="both detectors' dtype policy")
  args = parser.parse_args()
  run = common.run_start()  # before anything is built or timed
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import train_step  # pylint: disable=g-import-not-at-top
  from asl_tf import flags as asl_flags  # pylint: disable=g-import-not-at-top
  from asl_tf.modeling import kernels  # pylint: disable=g-import-not-at-top

  attribute, forms = _forms(kernels, tf)[args.form]
  original = getattr(kernels, attribute)
  runs, first_loss, program, weights = {}, {}, {}, None
  try:
    for name, form in forms.items():
      # The step is traced by its first call, with whatever the attribute holds then.
      setattr(kernels, attribute, form)
      asl_flags.FLAGS.unparse_flags()
      tf.keras.utils.set_random_seed(0)
      setup = train_step.build_step(
          args.config, args.quick, False,
          (f"--mixed_precision={args.mixed_precision}", "--kernel_policy=fast"), weights=weights,
          epoch=5)
      weights = weights or setup.model.get_weights()
      first_loss[name] = float(setup.step(setup.batch, setup.epoch)["total_loss"])
      program[name] = op_dtypes(setup.step.get_concrete_function(setup.batch, setup.epoch),
                                PROGRAM_OPS[args.form])
      setup.run()
      runs[name] = setup
  finally:
    setattr(kernels, attribute, original)
  if len({str(p) for p in program.values()}) == 1:
    raise SystemExit(f"--form={args.form}: both detectors trace the same "
                     f"{PROGRAM_OPS[args.form]} ops ({program}) at --config={args.config}"
                     f"{' --quick' if args.quick else ''}: nothing to compare")
  times, first_in_round = common.alternating_rounds(
      {name: setup.run for name, setup in runs.items()}, 2 if args.quick else args.repeats)
  if any(setup.step.experimental_get_tracing_count() != 1 for setup in runs.values()):
    raise SystemExit("a step was traced again after its form was set: the timings may mix forms")
  baseline, changed = times
  log_ratios = np.log(np.array(times[changed]) / np.array(times[baseline]))
  common.emit({"benchmark": f"ab_form_{args.form}", "command": " ".join(["python"] + sys.argv),
               "run": run, "config": args.config, "mixed_precision": args.mixed_precision,
               "machine": common.machine_info(),
               "first_loss": first_loss, f"{PROGRAM_OPS[args.form]}_op_dtypes": program,
               "first_in_round": first_in_round,
               "results": common.ab_results(times, baseline, "train_step_median_sec",
                                            "rounds_sec"),
               "median_of_per_round_ratios": round(float(np.exp(np.median(log_ratios))), 3),
               "geometric_mean_of_per_round_ratios": round(float(np.exp(log_ratios.mean())), 3),
               "standard_error_of_mean_log_ratio": round(
                   float(log_ratios.std(ddof=1) / np.sqrt(len(log_ratios))), 4)},
              args.output)


if __name__ == "__main__":
  main()
