"""In-process A/B of a training form of `kernels` against the form it replaced: two detectors,
same weights, alternating rounds (the order reversed every other round); prints JSON.

  python benchmarks/ab_form.py --form=gelu [--config=thumos_i3d] [--repeats=5]
  python benchmarks/ab_form.py --form=filter_grad
  python benchmarks/ab_form.py --form=depthwise
  python benchmarks/ab_form.py --form=layer_norm --mixed_precision=float32
  python benchmarks/ab_form.py --form=gradient_copies --mixed_precision=float32
  python benchmarks/ab_form.py --form=dense_input_grad --mixed_precision=float32

`filter_grad`: the kernel gradient of wide bfloat16 convolutions as one GEMM over the taps
(`kernels.conv1d_with_gemm_filter_grad`) against TensorFlow's backward-filter convolution.
`gelu`: the training step's GELU computed in float32 (`kernels.gelu`) against it computed in
bfloat16 (`tf.nn.gelu` as it is). `depthwise`: the strided depthwise convolutions (the attention's
q / k / v in downsampling blocks) with their input gradient in float32
(`kernels.strided_depthwise_with_float32_input_grad`) against TensorFlow's bfloat16 gradient.
`layer_norm`: the training LayerNorm with its gradient written out against autodiff of the
element-wise form (`reference`'s). `depthwise_reshape`: the depthwise convolutions' [B, T, C] <->
[B, 1, T, C] changes as reshapes against the indexing `x[:, None]`, `y[:, 0]` (whose gradients
copy). `block_pairs`: the local attention's key-block pairs with their gradient written out
(`kernels.with_next_block`) against autodiff's scatter. `winograd_adjoint`: the Winograd input
gradient reading the kernel transposed in its GEMM against writing the transposed, reversed kernel
out. `gradient_copies`: the last three together. `dense_input_grad`: the 1x1 projections' float32
input gradient as an einsum (`kernels.dense`) against autodiff's MatMul with a transposed kernel.
Both detectors run `--kernel_policy=fast` in `--mixed_precision` (default mixed_bfloat16;
`filter_grad`, `gelu` and `depthwise` exist only there, `winograd_adjoint` and `dense_input_grad`
only in float32), the default model at epoch 5.

The JSON records each detector's first loss, the dtypes (with counts) of the ops that tell the
two traced steps apart (`program_op_dtypes`, of `PROGRAM_OPS`; JSON files written before
`gradient_copies` name it `<op>_op_dtypes`; the script stops when they trace the same program, e.g.
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


# The op types whose dtypes (or counts) tell the two forms' traced steps apart.
PROGRAM_OPS = {"filter_grad": ("Conv2DBackpropFilter",), "gelu": ("Erfc",),
               "depthwise": ("DepthwiseConv2dNativeBackpropInput",),
               "layer_norm": ("RsqrtGrad",), "depthwise_reshape": ("StridedSliceGrad",),
               "block_pairs": ("UnsortedSegmentSum",), "winograd_adjoint": ("Transpose",),
               "gradient_copies": ("StridedSliceGrad", "UnsortedSegmentSum", "Transpose"),
               "dense_input_grad": ("Einsum",)}


def step_forms(tf):
  """form -> {run name: {(module, attribute): the function it holds}}, the baseline first."""
  from asl_tf.modeling import kernels  # pylint: disable=g-import-not-at-top
  from asl_tf.modeling import winograd  # pylint: disable=g-import-not-at-top

  def bfloat16_gelu(x, training=False, policy="reference"):
    del training, policy
    return tf.nn.gelu(x, approximate=False)

  # pylint: disable=protected-access
  written_layer_norm = kernels._layer_norm_with_written_gradient

  def autodiff_layer_norm(x, gamma, beta, epsilon):
    return kernels.layer_norm(x, gamma, beta, epsilon, training=True, policy="reference")

  def indexed_depthwise(x, kernel, strides):
    y = tf.nn.depthwise_conv2d(x[:, None], tf.transpose(kernel, [0, 2, 1])[None],
                               strides=[1, strides, strides, 1], padding="VALID")
    return y[:, 0]

  with_next_block = kernels.with_next_block

  def scattered_block_pairs(blocks, axis, shape, policy="reference"):
    del policy
    return with_next_block(blocks, axis, shape, "reference")

  winograd_conv = winograd._conv

  def written_transpose_conv(x, kernel, adjoint=False):
    if adjoint:
      return winograd_conv(x, tf.transpose(kernel[::-1], [0, 2, 1]))
    return winograd_conv(x, kernel)

  copies = {
      "depthwise_reshape": ((kernels, "_valid_depthwise_conv1d"), indexed_depthwise,
                            kernels._valid_depthwise_conv1d),
      "block_pairs": ((kernels, "with_next_block"), scattered_block_pairs, with_next_block),
      "winograd_adjoint": ((winograd, "_conv"), written_transpose_conv, winograd_conv),
  }
  forms = {form: {"copying": {target: before}, "not_copying": {target: after}}
           for form, (target, before, after) in copies.items()}
  forms["gradient_copies"] = {
      "copying": {target: before for target, before, _ in copies.values()},
      "not_copying": {target: after for target, _, after in copies.values()}}
  written_dense = kernels._dense_with_einsum_input_grad

  def autodiff_dense(x, kernel, bias):
    return kernels.dense(x, kernel, bias, training=True, policy="reference")

  forms.update({
      "dense_input_grad": {
          "transpose_b": {(kernels, "_dense_with_einsum_input_grad"): autodiff_dense},
          "einsum": {(kernels, "_dense_with_einsum_input_grad"): written_dense}},
      "layer_norm": {
          "autodiff": {(kernels, "_layer_norm_with_written_gradient"): autodiff_layer_norm},
          "written_gradient": {
              (kernels, "_layer_norm_with_written_gradient"): written_layer_norm}},
      "filter_grad": {
          "tf_backward_filter": {(kernels, "conv1d_with_gemm_filter_grad"):
                                 kernels._same_conv1d},
          "gemm_filter_grad": {(kernels, "conv1d_with_gemm_filter_grad"):
                               kernels.conv1d_with_gemm_filter_grad}},
      "gelu": {"bfloat16_gelu": {(kernels, "gelu"): bfloat16_gelu},
               "float32_gelu": {(kernels, "gelu"): kernels.gelu}},
      "depthwise": {
          "bfloat16_depthwise": {(kernels, "strided_depthwise_with_float32_input_grad"):
                                 kernels._valid_depthwise_conv1d},
          "float32_input_grad": {(kernels, "strided_depthwise_with_float32_input_grad"):
                                 kernels.strided_depthwise_with_float32_input_grad}},
  })
  return forms


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

  runs, first_loss, program, weights = {}, {}, {}, None
  for name, form in step_forms(tf)[args.form].items():
    # The step is traced by its first call, with whatever the attributes hold then.
    with common.swapped(form):
      asl_flags.FLAGS.unparse_flags()
      tf.keras.utils.set_random_seed(0)
      setup = train_step.build_step(
          args.config, args.quick, False,
          (f"--mixed_precision={args.mixed_precision}", "--kernel_policy=fast"), weights=weights,
          epoch=5)
      weights = weights or setup.model.get_weights()
      first_loss[name] = float(setup.step(setup.batch, setup.epoch)["total_loss"])
      traced = setup.step.get_concrete_function(setup.batch, setup.epoch)
      program[name] = {op: op_dtypes(traced, op) for op in PROGRAM_OPS[args.form]}
      setup.run()
      runs[name] = setup
  if len({str(p) for p in program.values()}) == 1:
    ops = ", ".join(PROGRAM_OPS[args.form])
    raise SystemExit(f"--form={args.form}: both detectors trace the same {ops} ops ({program}) "
                     f"at --config={args.config}{' --quick' if args.quick else ''}: "
                     "nothing to compare")
  times, first_in_round = common.alternating_rounds(
      {name: setup.run for name, setup in runs.items()}, 2 if args.quick else args.repeats)
  if any(setup.step.experimental_get_tracing_count() != 1 for setup in runs.values()):
    raise SystemExit("a step was traced again after its form was set: the timings may mix forms")
  baseline, changed = times
  log_ratios = np.log(np.array(times[changed]) / np.array(times[baseline]))
  common.emit({"benchmark": f"ab_form_{args.form}", "command": " ".join(["python"] + sys.argv),
               "run": run, "config": args.config, "mixed_precision": args.mixed_precision,
               "machine": common.machine_info(),
               "first_loss": first_loss, "program_op_dtypes": program,
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
