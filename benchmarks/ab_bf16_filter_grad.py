"""In-process A/B of the bfloat16 kernel-gradient GEMM: one detector with it, one with
TensorFlow's backward-filter convolution patched back in, same weights, alternating rounds.

  python benchmarks/ab_bf16_filter_grad.py [--config=thumos_i3d] [--repeats=5]

Both run `--mixed_precision=mixed_bfloat16 --kernel_policy=fast`, the default model at epoch 5.
Never run it beside other work.
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # pylint: disable=g-import-not-at-top,wrong-import-position


def main():
  parser = common.benchmark_parser(__doc__.splitlines()[0], default_repeats=5)
  parser.add_argument("--config", default="thumos_i3d", help="flagfile name in configs/")
  args = parser.parse_args()
  run = common.run_start()  # before anything is built or timed
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import train_step  # pylint: disable=g-import-not-at-top
  from asl_tf import flags as asl_flags  # pylint: disable=g-import-not-at-top
  from asl_tf.modeling import kernels  # pylint: disable=g-import-not-at-top

  gemm = kernels.conv1d_with_gemm_filter_grad
  runs, weights = {}, None
  try:
    for name in ("tf_backward_filter", "gemm_filter_grad"):
      # The step is traced by its first call, with whatever the name holds then.
      kernels.conv1d_with_gemm_filter_grad = (
          kernels._same_conv1d if name == "tf_backward_filter" else gemm)  # pylint: disable=protected-access
      asl_flags.FLAGS.unparse_flags()
      tf.keras.utils.set_random_seed(0)
      setup = train_step.build_step(
          args.config, args.quick, False,
          ("--mixed_precision=mixed_bfloat16", "--kernel_policy=fast"), weights=weights,
          epoch=5)
      weights = weights or setup.model.get_weights()
      for _ in range(2):
        setup.run()
      runs[name] = setup
  finally:
    kernels.conv1d_with_gemm_filter_grad = gemm
  times = {name: [] for name in runs}
  for round_index in range((2 if args.quick else args.repeats) + 1):  # round 0: warm-up
    for name, setup in runs.items():
      start = time.perf_counter()
      setup.run()
      if round_index:
        times[name].append(time.perf_counter() - start)
  common.emit({"benchmark": "ab_bf16_filter_grad", "command": " ".join(["python"] + sys.argv),
               "run": run,
               "config": args.config, "machine": common.machine_info(),
               "results": common.ab_results(times, "tf_backward_filter",
                                            "train_step_median_sec", "rounds_sec")}, args.output)


if __name__ == "__main__":
  main()
