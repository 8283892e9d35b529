"""Forward + backward of single ops in each form `kernels` / `winograd` had; prints JSON.

  python benchmarks/op_forms.py [--repeats=30]
  python benchmarks/op_forms.py --quick        # tiny shapes (seconds)

`gelu`: the exact GELU of [4608, 2048] bfloat16 rows (an MLP's hidden layer at THUMOS size, two
videos), computed in bfloat16 (`tf.nn.gelu` as it is) and in float32 with casts in and out
(`kernels.gelu` of a training step under `fast`). `depthwise`: the attention's strided depthwise
convolution of [2, 2304, 512] bfloat16 (kernel 3, stride 2), all in bfloat16, all in float32
with casts, and with only its input gradient in float32
(`kernels.strided_depthwise_with_float32_input_grad`). `layer_norm_float32` /
`layer_norm_bfloat16`: the training LayerNorm of [2, 2304, 512] (float32 statistics and output)
with its gradients (input, gamma, beta) by autodiff of the element-wise form (`reference`) and
written out (`fast` / `portable`). `depthwise_float32`: the attention's depthwise convolution of
[2, 2304, 512] float32 (kernel 3, stride 1) with the indexing `x[:, None]`, `y[:, 0]` and with
reshapes. `block_pairs`: the local attention's key-block pairs at THUMOS' first level ([2, 4, 129
blocks of 18, 128]) with autodiff's scatter and with the gradient written out. `winograd_adjoint`:
a 512 -> 512 Winograd convolution of [2, 2304, 512] whose input gradient writes the transposed,
reversed kernel out, and reads it transposed in its GEMM. `dense_fc1` / `dense_projection`: a
float32 training step's 1x1 projection of [4608, 512] rows to 2048 (the MLP's fc1) / 512 channels
with its input gradient by autodiff (a MatMul with the kernel transposed) and as an einsum
(`kernels.dense`). The replaced forms of the last five are `ab_form.step_forms`'s, swapped in while
each form is traced.
Each form is a `tf.function` returning the output and its gradients for a fixed output gradient;
the forms of one op are called alternately (the order reversed every other round) after 3
untimed rounds. The JSON gives each form's median and its largest difference from the first form
(all outputs, as a fraction of their largest magnitude). Never run it beside other work.
"""
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import ab_form  # pylint: disable=g-import-not-at-top,wrong-import-position
import common  # pylint: disable=g-import-not-at-top,wrong-import-position


def _traced_with(patches, fn):
  """`fn(x, dy)` with `patches` {(module, attribute): value} swapped in while it runs, so a
  `tf.function` traced by its first call traces them; `fn` is the result's `traced`."""
  def call(x, dy):
    with common.swapped(patches):
      return fn(x, dy)
  call.traced = fn
  return call


def _forms(tf, kernels, quick):
  """op -> (input dtype and shape, output-gradient dtype and shape, {form: fn(x, dy) -> outputs});
  the first form is the base."""
  rows, hidden = (64, 32) if quick else (4608, 2048)
  batch, length, channels = (2, 64, 16) if quick else (2, 2304, 512)
  kernel = tf.constant(np.random.default_rng(1).normal(0.0, 0.3, size=(3, 1, channels)),
                       tf.bfloat16)

  def gelu_float32(x):
    return tf.cast(tf.nn.gelu(tf.cast(x, tf.float32), approximate=False), x.dtype)

  valid_depthwise = kernels._valid_depthwise_conv1d  # pylint: disable=protected-access

  def depthwise_float32(x, k):
    return tf.cast(valid_depthwise(tf.cast(x, tf.float32), tf.cast(k, tf.float32), 2), x.dtype)

  def with_grads(fn, *constants):
    def run(x, dy):
      with tf.GradientTape() as tape:
        tape.watch([x, *constants])
        y = fn(x, *constants)
      return [y] + tape.gradient(y, [x, *constants], output_gradients=dy)
    return tf.function(run)

  rng = np.random.default_rng(2)
  gamma = tf.constant(rng.normal(1.0, 0.3, size=channels), tf.float32)
  beta = tf.constant(rng.normal(0.0, 0.3, size=channels), tf.float32)

  def layer_norm(policy):
    return with_grads(
        lambda x, g, b: kernels.layer_norm(x, g, b, 1e-5, training=True, policy=policy),
        gamma, beta)

  padded = length + 2  # one zero frame on each side, as `kernels.conv1d` pads
  bf16, f32 = tf.bfloat16, tf.float32
  sequence = [batch, length, channels]
  from asl_tf.modeling import winograd  # pylint: disable=g-import-not-at-top
  replaced = ab_form.step_forms(tf)

  def as_in_ab_form(form, fn, *constants):
    return {name: _traced_with(patches, with_grads(fn, *constants))
            for name, patches in replaced[form].items()}

  heads, head_dim, block = (2, 8, 4) if quick else (4, 128, 18)
  num_blocks = length // block + 1
  pairs_shape = [batch, heads, num_blocks - 1, 2 * block, head_dim]
  kernel32 = tf.constant(rng.normal(0.0, 0.3, size=(3, 1, channels)), f32)
  dense_kernel = tf.constant(rng.normal(0.0, channels ** -0.5, size=(3, channels, channels)), f32)

  def dense_training_step(x, k, b):
    return kernels.dense(x, k, b, training=True, policy="fast")

  projections = {name: (tf.constant(rng.normal(0.0, channels ** -0.5, size=(channels, units)), f32),
                        tf.constant(rng.normal(size=units), f32))
                 for name, units in (("dense_fc1", 4 * channels), ("dense_projection", channels))}
  return {
      **{name: (f32, [rows, channels], f32, [rows, weights[0].shape[-1]], as_in_ab_form(
          "dense_input_grad", dense_training_step, *weights))
         for name, weights in projections.items()},
      "depthwise_float32": (f32, [batch, padded, channels], f32, sequence, as_in_ab_form(
          "depthwise_reshape",  # looked up when traced, so the patched form runs
          lambda x, k: kernels._valid_depthwise_conv1d(x, k, 1),  # pylint: disable=protected-access
          kernel32)),
      "block_pairs": (f32, [batch, heads, num_blocks, block, head_dim], f32, pairs_shape,
                      as_in_ab_form("block_pairs", lambda b: kernels.with_next_block(
                          b, 2, pairs_shape, "fast"))),
      "winograd_adjoint": (f32, sequence, f32, sequence, as_in_ab_form(
          "winograd_adjoint", winograd.conv1d_k3, dense_kernel)),
      **{f"layer_norm_{dtype.name}": (dtype, sequence, f32, sequence, {
          "autodiff": layer_norm("reference"), "written_gradient": layer_norm("fast")})
         for dtype in (f32, bf16)},
      "gelu": (bf16, [rows, hidden], bf16, [rows, hidden], {
          "bfloat16": with_grads(lambda x: tf.nn.gelu(x, approximate=False)),
          "float32_with_casts": with_grads(gelu_float32)}),
      "depthwise_stride2": (bf16, [batch, padded, channels],
                            bf16, [batch, length // 2, channels], {
          "bfloat16": with_grads(lambda x, k: valid_depthwise(x, k, 2), kernel),
          "float32_with_casts": with_grads(depthwise_float32, kernel),
          "float32_input_grad": with_grads(
              lambda x, k: kernels.strided_depthwise_with_float32_input_grad(x, k, 2), kernel)}),
  }


def main():
  parser = common.benchmark_parser(__doc__.splitlines()[0], default_repeats=30)
  args = parser.parse_args()
  run = common.run_start()
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from asl_tf.modeling import kernels  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  results = {}
  for op, (x_dtype, x_shape, dy_dtype, dy_shape, forms) in _forms(tf, kernels,
                                                                   args.quick).items():
    x = tf.constant(rng.normal(0.0, 3.0, size=x_shape), x_dtype)
    dy = tf.constant(rng.normal(size=dy_shape), dy_dtype)
    outputs = {name: [t.numpy().astype(np.float64) for t in fn(x, dy)]
               for name, fn in forms.items()}
    base = next(iter(forms))
    times, _ = common.alternating_rounds(
        {name: lambda fn=fn: [t.numpy() for t in fn(x, dy)] for name, fn in forms.items()},
        3 if args.quick else args.repeats, untimed=3)
    results[op] = {
        "input_dtype": x_dtype.name, "input_shape": x_shape,
        "forms": {name: {
            "median_ms": round(1e3 * float(np.median(times[name])), 3),
            "ratio_to_" + base: round(float(np.median(times[name]) / np.median(times[base])), 3),
            "max_difference_to_" + base: max(
                float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))
                for a, b in zip(outputs[name], outputs[base]))} for name in forms}}
  common.emit({"benchmark": "op_forms", "command": " ".join(["python"] + sys.argv), "run": run,
               "machine": common.machine_info(), "results": results}, args.output)


if __name__ == "__main__":
  main()
