"""Tests of asl_tf.modeling.kernels: each policy's forms give the reference values (and grads)."""

import numpy as np
import pytest
import tensorflow as tf

from asl_tf.modeling import kernels
from asl_tf.modeling import layers
import layer_harness


def _graph_op_types(fn, *specs):
  graph = tf.function(fn).get_concrete_function(*specs).graph
  return {op.type for op in graph.get_operations()}


def test_resolve_auto_by_device(monkeypatch):
  for policy in ("reference", "fast", "portable"):
    assert kernels.resolve(policy) == policy
  monkeypatch.setattr(kernels, "_accelerator_visible", lambda: True)
  assert kernels.resolve("auto") == "reference"
  monkeypatch.setattr(kernels, "_accelerator_visible", lambda: False)
  monkeypatch.setattr(kernels, "onednn_enabled", lambda: True)
  assert kernels.resolve("auto") == "fast"
  monkeypatch.setattr(kernels, "onednn_enabled", lambda: False)
  assert kernels.resolve("auto") == "portable"
  with pytest.raises(ValueError, match=r"kernel_policy='gpu': use one of auto, reference, fast, "
                     r"portable \(--kernel_policy\)"):
    kernels.resolve("gpu")


@pytest.mark.parametrize("kernel_size", [1, 3, 5])
@pytest.mark.parametrize("jit_compile", [False, True])
def test_tap_gemm_equals_direct_conv_values_and_gradients(kernel_size, jit_compile):
  """One GEMM over the taps + shifted adds == tf.nn.conv1d on the padded input, incl. grads."""
  rng = np.random.default_rng(kernel_size)
  kernel = tf.constant(rng.normal(size=(kernel_size, 6, 5)).astype(np.float32))
  pad = kernel_size // 2

  def value_and_grads(conv):
    def fn(x):
      with tf.GradientTape() as tape:
        tape.watch([x, kernel])
        y = conv(x, kernel)
        loss = tf.reduce_sum(y * tf.range(1.0, 6.0))  # distinct weight per output channel
      return (y,) + tuple(tape.gradient(loss, [x, kernel]))
    return tf.function(fn, jit_compile=jit_compile,
                       input_signature=[tf.TensorSpec([None, None, 6], tf.float32)])

  tap = value_and_grads(kernels.conv1d_as_tap_gemm)
  assert tap.get_concrete_function().structured_outputs[0].shape.as_list() == [None, None, 5]
  direct = value_and_grads(
      lambda x, k: tf.nn.conv1d(tf.pad(x, [[0, 0], [pad, pad], [0, 0]]), k, 1, "VALID"))
  for length in (1, 2, 9):
    x = tf.constant(rng.normal(size=(2, length, 6)).astype(np.float32))
    got, want = tap(x), direct(x)
    assert got[0].shape == (2, length, 5)
    for g, w in zip(got, want):
      np.testing.assert_allclose(g.numpy(), w.numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("in_channels,out_channels,kernel_size,strides,groups,dtype,fast_form", [
    (64, 64, 3, 1, 1, tf.float32, "winograd"),
    (64, 64, 3, 1, 1, tf.float16, "direct"),  # the transforms' constants cost half precision
    (512, 20, 3, 1, 1, tf.float32, "tap_gemm"),  # narrow output: one GEMM over the taps
    (64, 20, 5, 1, 1, tf.float32, "tap_gemm"),
    (64, 64, 5, 1, 1, tf.float32, "direct"),
    (64, 64, 3, 2, 1, tf.float32, "direct"),
    (64, 64, 3, 1, 64, tf.float32, "direct"),
])
def test_conv1d_form_per_policy(in_channels, out_channels, kernel_size, strides, groups, dtype,
                                fast_form):
  """`reference` always runs TensorFlow's convolution; `fast` / `portable` pick Winograd F(4, 3)
  or the tap GEMM where they pay. Values agree with the reference under every policy."""
  rng = np.random.default_rng(0)
  kernel = tf.constant(rng.normal(size=(kernel_size, in_channels // groups, out_channels)),
                       dtype)
  x = tf.constant(rng.normal(size=(2, 10, in_channels)), dtype)
  spec = tf.TensorSpec([None, None, in_channels], dtype)
  conv_ops = {"Conv2D", "DepthwiseConv2dNative"}
  outputs = {}
  for policy in ("reference", "fast", "portable"):
    fn = lambda x, policy=policy: kernels.conv1d(x, kernel, strides, groups, policy)
    ops = _graph_op_types(fn, spec)
    form = "direct" if conv_ops & ops else ("winograd" if "BatchMatMulV2" in ops else "tap_gemm")
    assert form == ("direct" if policy == "reference" else fast_form), policy
    outputs[policy] = tf.function(fn)(x).numpy().astype(np.float32)
  tol = 1e-4 if dtype == tf.float32 else 1e-1
  for policy in ("fast", "portable"):
    np.testing.assert_allclose(outputs[policy], outputs["reference"], rtol=tol, atol=tol)


def _depthwise_value_and_grads(strides, dy, policy):
  """`(x [B, T, C], kernel [k, 1, C]) -> [y, dx, dkernel]` of a depthwise `kernels.conv1d`
  for the output gradient `dy`."""
  def fn(x, kernel):
    with tf.GradientTape() as tape:
      tape.watch([x, kernel])
      y = kernels.conv1d(x, kernel, strides, x.shape[-1], policy)
    return [y] + tape.gradient(y, [x, kernel], output_gradients=dy)
  return fn


@pytest.mark.parametrize("strides", [1, 2])
@pytest.mark.parametrize("dtype", [tf.float32, tf.bfloat16])
def test_depthwise_conv_values_and_gradients_without_slice_copies(strides, dtype):
  """A depthwise convolution (the attention's q / k / v) and its gradients equal the float64 sums
  written out by hand, under every policy; its [B, T, C] <-> [B, 1, T, C] changes are reshapes,
  so the traced gradient holds no `StridedSliceGrad` (a full-size copy of the gradient each; the
  indexing form `x[:, None]`, `y[:, 0]` had 3 per convolution)."""
  rng = np.random.default_rng(3)
  x64 = rng.normal(size=(2, 11, 4))
  kernel64 = rng.normal(size=(3, 1, 4))
  padded = np.pad(x64, [(0, 0), (1, 1), (0, 0)])
  frames = range(0, 11, strides)
  want = np.stack([sum(padded[:, i + j] * kernel64[j, 0] for j in range(3)) for i in frames], 1)
  dy64 = rng.normal(size=want.shape)
  want_dx = np.zeros_like(padded)
  want_dkernel = np.zeros_like(kernel64)
  for o, i in enumerate(frames):
    for j in range(3):
      want_dx[:, i + j] += dy64[:, o] * kernel64[j, 0]
      want_dkernel[j, 0] += np.sum(dy64[:, o] * padded[:, i + j], axis=0)
  x, kernel, dy = (tf.constant(a, dtype) for a in (x64, kernel64, dy64))
  tol = 1e-5 if dtype == tf.float32 else 0.05
  for policy in ("reference", "fast", "portable"):
    traced = tf.function(_depthwise_value_and_grads(strides, dy, policy))
    nodes = layer_harness.traced_nodes(traced.get_concrete_function(x, kernel))
    assert not [n.name for n in nodes if n.op == "StridedSliceGrad"], policy
    got = [t.numpy().astype(np.float64) for t in traced(x, kernel)]
    for g, w in zip(got, (want, want_dx[:, 1:-1], want_dkernel)):
      np.testing.assert_allclose(g, w, rtol=tol, atol=tol * np.abs(w).max(), err_msg=policy)


@pytest.mark.parametrize("jit_compile", [False, True])
@pytest.mark.parametrize("strides,float32_under_fast", [(1, False), (2, True), (4, True)])
def test_strided_bfloat16_depthwise_takes_its_input_gradient_in_float32(strides,
                                                                       float32_under_fast,
                                                                       jit_compile):
  """Under `fast` / `portable` a strided bfloat16 depthwise convolution computes its input
  gradient in float32; its forward pass and kernel gradient, stride 1 and `reference` stay
  bfloat16. With oneDNN (float32 sums in its bfloat16 kernels) every value and gradient equals
  `reference`'s to the last bit; without it, to bfloat16 rounding."""
  kernel_size = 3 if strides == 1 else strides + 1
  rng = np.random.default_rng(9)
  kernel = tf.constant(rng.normal(size=(kernel_size, 1, 16)), tf.bfloat16)
  x = tf.constant(rng.normal(size=(2, 25, 16)), tf.bfloat16)
  dy = tf.constant(rng.normal(size=(2, -(-25 // strides), 16)), tf.bfloat16)
  results = {}
  for policy in ("reference", "fast", "portable"):
    fn = _depthwise_value_and_grads(strides, dy, policy)
    ops = tf.function(fn).get_concrete_function(x, kernel).graph.get_operations()
    dtypes = {t: {op.get_attr("T") for op in ops if op.type == t}
              for t in ("DepthwiseConv2dNative", "DepthwiseConv2dNativeBackpropInput",
                        "DepthwiseConv2dNativeBackpropFilter")}
    float32 = float32_under_fast and policy != "reference"
    assert dtypes == {"DepthwiseConv2dNative": {tf.bfloat16},
                      "DepthwiseConv2dNativeBackpropInput": {
                          tf.float32 if float32 else tf.bfloat16},
                      "DepthwiseConv2dNativeBackpropFilter": {tf.bfloat16}}, policy
    got = tf.function(fn, jit_compile=jit_compile)(x, kernel)
    assert all(t.dtype == tf.bfloat16 for t in got), policy
    results[policy] = [t.numpy().astype(np.float64) for t in got]
  for policy in ("fast", "portable"):
    for got, want in zip(results[policy], results["reference"]):
      if kernels.onednn_enabled() and not jit_compile:
        np.testing.assert_array_equal(got, want)
      else:
        np.testing.assert_allclose(got, want, rtol=2 ** -7, atol=2 ** -7 * np.abs(want).max())


@pytest.mark.parametrize("kernel_size", [3, 5])
@pytest.mark.parametrize("jit_compile", [False, True])
def test_bfloat16_conv_takes_its_kernel_gradient_as_one_gemm(kernel_size, jit_compile):
  """Wide bfloat16 convolutions under `fast` / `portable`: the forward pass is TensorFlow's
  convolution (the same values as `reference`); the input gradient a forward convolution with
  the reversed kernel (`reference`: TensorFlow's backward-input convolution; bit-equal where
  oneDNN runs both in bfloat16, as on AVX-512, equal to bfloat16 rounding and no farther from
  the float32 gradient elsewhere); the kernel gradient one GEMM over the taps (equal to
  `reference`'s to bfloat16 rounding)."""
  rng = np.random.default_rng(kernel_size)
  x32 = rng.normal(size=(2, 9, 64)).astype(np.float32)
  kernel32 = (rng.normal(size=(kernel_size, 64, 72)) / 8).astype(np.float32)
  weight = tf.constant(rng.normal(size=(72,)).astype(np.float32))  # a distinct weight per channel

  def value_and_grads(policy, dtype):
    x, kernel = tf.constant(x32, dtype), tf.constant(kernel32, dtype)

    def fn(x, kernel):
      with tf.GradientTape() as tape:
        tape.watch([x, kernel])
        y = kernels.conv1d(x, kernel, policy=policy)
        loss = tf.reduce_sum(tf.square(tf.cast(y, tf.float32)) * weight)
      return [tf.cast(t, tf.float32) for t in (y, *tape.gradient(loss, [x, kernel]))]
    traced = tf.function(fn, jit_compile=jit_compile)
    ops = {op.type for op in traced.get_concrete_function(x, kernel).graph.get_operations()}
    return [t.numpy() for t in traced(x, kernel)], ops

  (want_y, want_dx, want_dk), reference_ops = value_and_grads("reference", tf.bfloat16)
  (y32, dx32, dk32), _ = value_and_grads("reference", tf.float32)
  assert "Conv2DBackpropFilter" in reference_ops and "MatMul" not in reference_ops
  for policy in ("fast", "portable"):
    (y, dx, dk), ops = value_and_grads(policy, tf.bfloat16)
    assert "Conv2DBackpropFilter" not in ops and "MatMul" in ops, policy
    np.testing.assert_array_equal(y, want_y)
    # On AVX2 TensorFlow's bfloat16 backward-input convolution rounds more (1.1-1.4% of the
    # largest gradient against float32) than the forward one (0.4%).
    dx_error, want_dx_error = np.abs(dx - dx32).max(), np.abs(want_dx - dx32).max()
    assert dx_error <= 1.05 * want_dx_error, (policy, dx_error, want_dx_error)
    assert np.abs(dx - want_dx).max() < 0.03 * np.abs(dx32).max(), policy
    scale = np.abs(dk32).max()
    assert np.abs(dk - want_dk).max() < 0.02 * scale, policy
    assert np.abs(dk - dk32).max() < 0.02 * scale
    assert np.abs(want_dk - dk32).max() < 0.02 * scale
    assert np.abs(dx - dx32).max() < 0.02 * np.abs(dx32).max() and np.abs(y - y32).max() < 0.1


def test_layer_norm_inference_form_only_under_fast():
  """`fast` writes the inference LayerNorm (graph, dynamic shape) as a FusedBatchNorm over rows:
  same values, incl. all-zero (padded) rows -> beta and rows with a large mean; not in
  training, not under `portable` (SavedModels) or `reference`."""
  rng = np.random.default_rng(3)
  gamma = tf.constant(rng.normal(size=16).astype(np.float32))
  beta = tf.constant(rng.normal(size=16).astype(np.float32))
  x = rng.normal(size=(2, 9, 16)).astype(np.float32)
  x[0, 3] += 1000.0
  x[1, 6:] = 0.0
  spec = tf.TensorSpec([None, None, 16], tf.float32)

  def norm(policy, training):
    return lambda x: kernels.layer_norm(x, gamma, beta, 1e-5, training, policy)

  want = tf.function(norm("reference", False), input_signature=[spec])(x).numpy()
  got = tf.function(norm("fast", False), input_signature=[spec])(x).numpy()
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got[1, 6:], np.broadcast_to(beta.numpy(), (3, 16)), atol=1e-6)
  assert "FusedBatchNormV3" in _graph_op_types(norm("fast", False), spec)
  for policy, training in (("fast", True), ("portable", False), ("reference", False)):
    assert "FusedBatchNormV3" not in _graph_op_types(norm(policy, training), spec), policy
  static = tf.TensorSpec([2, 9, 16], tf.float32)  # constant folding would undo the pattern
  assert "FusedBatchNormV3" not in _graph_op_types(norm("fast", False), static)


def _float64_layer_norm_and_grads(x, gamma, beta, dy):
  """Autodiff of the element-wise LayerNorm in float64: x, dy [..., C], gamma, beta [C] ->
  numpy (y [..., C], dx [..., C], dgamma [C], dbeta [C])."""
  x, gamma, beta, dy = (tf.constant(np.asarray(v, np.float64)) for v in (x, gamma, beta, dy))
  with tf.GradientTape() as tape:
    tape.watch([x, gamma, beta])
    centred = x - tf.reduce_mean(x, axis=-1, keepdims=True)
    y = centred / tf.sqrt(tf.reduce_mean(centred ** 2, axis=-1, keepdims=True) + 1e-5)
    y = y * gamma + beta
  return [t.numpy() for t in [y] + tape.gradient(y, [x, gamma, beta], output_gradients=dy)]


@pytest.mark.parametrize("jit_compile", [False, True])
@pytest.mark.parametrize("dtype", [tf.float32, tf.bfloat16])
def test_training_layer_norm_gradient_written_out_equals_float64_autodiff(dtype, jit_compile):
  """Under `fast` / `portable` the training LayerNorm's gradient is written out (a custom
  gradient, no broadcasting-gradient ops); its output and its input, gamma and beta gradients
  equal float64 autodiff of the same input to float32 rounding (float32 input) or with the input
  gradient rounded once to bfloat16, as under `reference`; per row, so that rows of zeros
  (padded frames, whose input gradient is ~300x larger) hide nothing; a row far from zero
  (mean 1000, sd 3) included. Graph and XLA."""
  rng = np.random.default_rng(4)
  x = rng.normal(2.0, 3.0, size=(2, 9, 16))
  x[0, 3] = 1000.0 + rng.normal(0.0, 3.0, size=16)
  x[1, 6:] = 0.0
  x = tf.constant(x, dtype)
  gamma = tf.constant(rng.normal(1.0, 0.5, size=16), tf.float32)
  beta = tf.constant(rng.normal(0.0, 0.5, size=16), tf.float32)
  dy = tf.constant(rng.normal(size=(2, 9, 16)), tf.float32)
  want = _float64_layer_norm_and_grads(x.numpy().astype(np.float64), gamma, beta, dy)
  spec = tf.TensorSpec([None, None, 16], dtype)
  for policy in ("fast", "portable", "reference"):
    def value_and_grads(x, policy=policy):
      with tf.GradientTape() as tape:
        tape.watch([x, gamma, beta])
        y = kernels.layer_norm(x, gamma, beta, 1e-5, training=True, policy=policy)
      return [y] + tape.gradient(y, [x, gamma, beta], output_gradients=dy)
    fn = tf.function(value_and_grads, input_signature=[spec], jit_compile=jit_compile)
    got = fn(x)
    assert [t.dtype for t in got] == [tf.float32, dtype, tf.float32, tf.float32]
    ops = {op.type for op in fn.get_concrete_function().graph.get_operations()}
    assert ("IdentityN" in ops) == (policy != "reference"), policy  # the custom gradient
    assert ("BroadcastGradientArgs" in ops) == (policy == "reference"), policy
    for name, g, w in zip(("y", "dx", "dgamma", "dbeta"), got, want):
      g = tf.cast(g, tf.float64).numpy()
      # float32 centring of the row at 1000 (sd 3) costs 7.6e-6 (measured); bfloat16 dx 2.7e-3.
      rtol = 2 ** -8 if (name == "dx" and dtype == tf.bfloat16) else 3e-5
      error = np.abs(g - w) / (np.abs(w).max(axis=-1, keepdims=True) + 1e-30)
      assert error.max() <= rtol, (policy, name, error.max())


def test_channel_layer_norm_training_gradients_reach_its_variables_under_every_policy():
  """The layer's gamma / beta (Keras variables, read before the written gradient) get the same
  gradients under `fast` as under `reference`."""
  rng = np.random.default_rng(6)
  x = tf.constant(rng.normal(size=(2, 7, 8)), tf.float32)
  dy = tf.constant(rng.normal(size=(2, 7, 8)), tf.float32)
  grads = {}
  for policy in ("fast", "reference"):
    norm = layers.ChannelLayerNorm(kernel_policy=policy)
    norm.build((None, None, 8))
    norm.gamma.assign(rng.normal(size=8) if not grads else grads["gamma0"])
    grads.setdefault("gamma0", norm.gamma.numpy())
    with tf.GradientTape() as tape:
      y = norm(x, training=True)
    grads[policy] = [g.numpy() for g in tape.gradient(y, [norm.gamma, norm.beta],
                                                         output_gradients=dy)]
  for got, want in zip(grads["fast"], grads["reference"]):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  assert np.abs(grads["fast"][0]).max() > 0.1 and np.abs(grads["fast"][1]).max() > 0.1


def _run_ops(fn, x, tmp_path):
  """Op types the runtime executed for `fn(x)` (after Grappler's rewrites), from a profile."""
  from tensorflow.tsl.profiler.protobuf import xplane_pb2  # pylint: disable=g-import-not-at-top
  fn(x)
  tf.profiler.experimental.start(str(tmp_path))
  fn(x).numpy()
  tf.profiler.experimental.stop()
  space = xplane_pb2.XSpace()
  space.ParseFromString(next(tmp_path.rglob("*.xplane.pb")).read_bytes())
  return {plane.event_metadata[event.metadata_id].name.rsplit(":", 1)[-1]
          for plane in space.planes for line in plane.lines for event in line.events}


@pytest.mark.parametrize("dtype", [tf.float32, tf.bfloat16])
def test_layer_norm_fast_form_fuses_into_one_onednn_kernel(dtype, tmp_path):
  """Grappler's oneDNN remapper turns the inference form into `_MklLayerNorm` (the speed-up),
  also for bfloat16 layers (mixed_bfloat16), whose input once reached it behind a cast to
  float32 and stayed unfused."""
  if not kernels.onednn_enabled():
    pytest.skip("oneDNN is off in this process")
  policy = "float32" if dtype == tf.float32 else "mixed_bfloat16"
  norm = layers.ChannelLayerNorm(kernel_policy="fast", dtype=policy)
  forward = tf.function(lambda x: norm(x, training=False) * 2.0,
                        input_signature=[tf.TensorSpec([None, None, 32], dtype)])
  ops = _run_ops(forward, tf.ones([1, 64, 32], dtype), tmp_path)
  assert "_MklLayerNorm" in ops
  assert not {"FusedBatchNormV3", "_MklNativeFusedBatchNormV3", "Mean"} & ops


def test_bfloat16_layer_norm_matches_a_float64_reference_under_fast_and_portable():
  """bfloat16 layers' inference LayerNorm: under `fast` the FusedBatchNorm pattern takes the
  bfloat16 input itself (no cast in front) and returns bfloat16; under `fast` and `portable`
  the values equal a float64 LayerNorm of the same input with gamma / beta rounded to bfloat16,
  to bfloat16 rounding (rows of zeros give beta; a row far from zero keeps its statistics)."""
  rng = np.random.default_rng(3)
  x = rng.normal(2.0, 3.0, size=(2, 40, 64))
  x[0, 5] = 0.0
  x[1, 7] = 1000.0 + rng.normal(0.0, 30.0, size=64)
  x = tf.constant(x, tf.bfloat16)
  gamma = tf.constant(rng.normal(1.0, 0.5, size=64), tf.float32)
  beta = tf.constant(rng.normal(0.0, 0.5, size=64), tf.float32)
  x64 = x.numpy().astype(np.float64)
  centred = x64 - x64.mean(-1, keepdims=True)
  want = (centred / np.sqrt((centred ** 2).mean(-1, keepdims=True) + 1e-5)
          * tf.cast(tf.cast(gamma, tf.bfloat16), tf.float64).numpy()
          + tf.cast(tf.cast(beta, tf.bfloat16), tf.float64).numpy())
  spec = tf.TensorSpec([None, None, 64], tf.bfloat16)
  for policy in ("fast", "portable"):
    norm = layers.ChannelLayerNorm(kernel_policy=policy, dtype="mixed_bfloat16")
    norm.build((None, None, 64))
    norm.gamma.assign(gamma)
    norm.beta.assign(beta)
    forward = tf.function(lambda x, norm=norm: norm(x, training=False), input_signature=[spec])
    graph = forward.get_concrete_function().graph
    pattern_dtypes = {op.get_attr("T") for op in graph.get_operations()
                      if op.type == "FusedBatchNormV3"}
    assert pattern_dtypes == ({tf.bfloat16} if policy == "fast" else set()), policy
    got = forward(x)
    assert got.dtype == tf.bfloat16
    # bfloat16 rounding of the result (and of the steps before it); measured: within 2^-7 of
    # |y| everywhere, 0.013 at most.
    np.testing.assert_allclose(got.numpy().astype(np.float64), want, rtol=2 ** -7, atol=0.02,
                               err_msg=policy)


def _op_dtypes(fn, op_type, *specs):
  """The `T` of every `op_type` op in the traced `fn`, its nested functions included."""
  nodes = layer_harness.traced_nodes(tf.function(fn).get_concrete_function(*specs))
  return {tf.as_dtype(n.attr["T"].type) for n in nodes if n.op == op_type}


@pytest.mark.parametrize("dtype", [tf.bfloat16, tf.float16])
def test_reduced_precision_training_gelu_is_float64_rounded_once(dtype):
  """A float16 / bfloat16 training step's GELU and its gradient under `fast` / `portable` are the
  float64 values of the same input rounded once to `dtype` (measured: all of 4,000, but 2
  float16 gradients); computed in `dtype` itself (`reference`), 54-63% are."""
  import math  # pylint: disable=g-import-not-at-top
  x = tf.constant(np.random.default_rng(5).normal(0.0, 3.0, size=(4000,)), dtype)
  x64 = x.numpy().astype(np.float64)
  phi = 0.5 * np.vectorize(math.erfc)(-x64 / math.sqrt(2.0))  # exact in the far negative tail
  want = tf.cast(x64 * phi, dtype).numpy()
  want_grad = tf.cast(phi + x64 * np.exp(-0.5 * x64 ** 2) / math.sqrt(2.0 * math.pi),
                      dtype).numpy()
  exact = {}
  for policy in ("fast", "portable", "reference"):
    with tf.GradientTape() as tape:
      tape.watch(x)
      y = kernels.gelu(x, training=True, policy=policy)
    grad = tape.gradient(y, x, output_gradients=tf.ones_like(x))
    assert y.dtype == dtype and grad.dtype == dtype
    exact[policy] = (np.mean(y.numpy() == want), np.mean(grad.numpy() == want_grad))
  for policy in ("fast", "portable"):
    assert min(exact[policy]) >= 0.999, (policy, exact)
  assert max(exact["reference"]) < 0.8, exact


def test_gelu_inference_keeps_the_form_onednn_fuses(tmp_path):
  """At inference `kernels.gelu` of float16 / bfloat16 is `tf.nn.gelu` in that dtype, which
  oneDNN fuses into the MatMul + BiasAdd before it (no Erfc runs); the training form computes
  its Erfc in float32."""
  x = tf.constant(np.random.default_rng(6).normal(0.0, 3.0, size=(64, 8)), tf.float32)
  for policy in ("fast", "portable"):
    for dtype in (tf.bfloat16, tf.float16):
      np.testing.assert_array_equal(kernels.gelu(tf.cast(x, dtype), training=False, policy=policy),
                                    tf.nn.gelu(tf.cast(x, dtype), approximate=False))
  w = tf.constant(np.random.default_rng(7).normal(size=(8, 16)), tf.bfloat16)
  b = tf.constant(np.random.default_rng(8).normal(size=(16,)), tf.bfloat16)
  spec = tf.TensorSpec([None, 8], tf.bfloat16)
  dense_gelu = {training: (lambda x, training=training: kernels.gelu(
      tf.nn.bias_add(tf.matmul(x, w), b), training, "fast")) for training in (False, True)}
  assert _op_dtypes(dense_gelu[True], "Erfc", spec) == {tf.float32}
  assert _op_dtypes(dense_gelu[False], "Erfc", spec) == {tf.bfloat16}
  if not kernels.onednn_enabled():
    pytest.skip("oneDNN is off in this process")
  ops = _run_ops(tf.function(dense_gelu[False], input_signature=[spec]), tf.cast(x, tf.bfloat16),
                 tmp_path)
  assert "Erfc" not in ops and "_MklNativeFusedMatMul" in ops, ops


def _transposed_kernel_matmuls(nodes):
  return sum(n.op == "MatMul" and n.attr["transpose_b"].b for n in nodes)


@pytest.mark.parametrize("jit_compile", [False, True])
@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("leading", [(6,), (2, 5)])
def test_training_dense_gradient_written_out_equals_float64_products(leading, static,
                                                                     jit_compile):
  """A float32 training step's 1x1 projection under `fast` takes its input gradient as an
  einsum, not as autodiff's MatMul with a transposed kernel; output and the input, kernel and
  bias gradients equal the float64 products (y = x k + b, dx = dy k^T, dk = x^T dy, db = sum dy
  over every frame) to float32 rounding under every policy, for [N, C] rows and [B, T, C], with
  static and dynamic leading axes. Graph and XLA."""
  rng = np.random.default_rng(9)
  x, dy = rng.normal(size=leading + (8,)), rng.normal(size=leading + (12,))
  kernel, bias = rng.normal(size=(8, 12)), rng.normal(size=(12,))
  rows, dy_rows = x.reshape(-1, 8), dy.reshape(-1, 12)
  want = [x @ kernel + bias, dy @ kernel.T, rows.T @ dy_rows, dy_rows.sum(axis=0)]
  x, dy, kernel, bias = (tf.constant(v, tf.float32) for v in (x, dy, kernel, bias))
  spec = tf.TensorSpec((list(leading) if static else [None] * len(leading)) + [8], tf.float32)
  for policy in ("fast", "portable", "reference"):
    def value_and_grads(x, policy=policy):
      with tf.GradientTape() as tape:
        tape.watch([x, kernel, bias])
        y = kernels.dense(x, kernel, bias, training=True, policy=policy)
      return [y] + tape.gradient(y, [x, kernel, bias], output_gradients=dy)
    fn = tf.function(value_and_grads, input_signature=[spec], jit_compile=jit_compile)
    got = fn(x)
    assert got[0].shape.as_list() == list(leading) + [12]
    traced = fn.get_concrete_function()
    assert traced.structured_outputs[0].shape.as_list() == spec.shape.as_list()[:-1] + [12]
    nodes = layer_harness.traced_nodes(traced)
    assert (_transposed_kernel_matmuls(nodes) == 0) == (policy == "fast"), policy
    assert any(n.op == "Einsum" for n in nodes) == (policy == "fast"), policy
    for name, g, w in zip(("y", "dx", "dkernel", "dbias"), got, want):
      error = np.abs(g.numpy() - w).max() / np.abs(w).max()
      assert error <= 1e-6, (policy, name, error)


def _traced_op_types(fn, *args):
  return sorted(n.op for n in layer_harness.traced_nodes(
      tf.function(fn).get_concrete_function(*args)))


def test_pointwise_is_keras_dense_outside_a_float32_training_step():
  """`layers.Pointwise` holds Keras Dense's weights ([Cin, units] kernel, bias). At inference it
  traces the same ops as Dense (so oneDNN fuses what it fused) and gives its values to the last
  bit, eager and traced, float32 and mixed bfloat16, on [B, T, C] and on rows, under every policy.
  The gradient of a training step is autodiff's (the same ops as Dense's) but in float32 under
  `fast`, where the input gradient is an einsum; there the variables get the same gradients as
  under `reference`."""
  import keras  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(10)
  x = tf.constant(rng.normal(size=(2, 5, 8)), tf.float32)
  dy = tf.constant(rng.normal(size=(2, 5, 12)), tf.float32)

  def step_gradients(layer):
    def step(x):
      with tf.GradientTape() as tape:
        tape.watch(x)
        loss = tf.reduce_sum(tf.cast(layer(x, training=True), tf.float32) * dy)
      return tape.gradient(loss, [x] + layer.trainable_weights)
    return step

  for dtype in ("float32", "mixed_bfloat16"):
    dense = keras.layers.Dense(12, dtype=dtype)
    dense.build((None, None, 8))
    dense.bias.assign(rng.normal(size=12))
    dense_gradient_ops = _traced_op_types(step_gradients(dense), x)
    assert "Einsum" not in dense_gradient_ops and "BiasAddGrad" in dense_gradient_ops
    grads = {}
    for policy in ("fast", "portable", "reference"):
      pointwise = layers.Pointwise(12, kernel_policy=policy, dtype=dtype)
      pointwise.build((None, None, 8))
      assert [(v.path.split("/")[-1], v.shape) for v in pointwise.weights] == [
          ("kernel", (8, 12)), ("bias", (12,))]
      pointwise.set_weights(dense.get_weights())
      for inputs in (x, x[0]):
        assert _traced_op_types(pointwise, inputs) == _traced_op_types(dense, inputs), policy
        np.testing.assert_array_equal(pointwise(inputs), dense(inputs))
        np.testing.assert_array_equal(tf.function(pointwise)(inputs), tf.function(dense)(inputs))
      gradient_ops = _traced_op_types(step_gradients(pointwise), x)
      if dtype == "float32" and policy == "fast":
        assert "Einsum" in gradient_ops, policy
      else:
        assert gradient_ops == dense_gradient_ops, (dtype, policy)
      grads[policy] = [g.numpy() for g in step_gradients(pointwise)(x)]
    for policy in ("fast", "portable"):
      for got, want in zip(grads[policy], grads["reference"]):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("policy,jit_compile", [("fast", False), ("fast", True),
                                                ("reference", False)])
@pytest.mark.parametrize("padded", [True, False])
def test_per_frame_equals_masked_grid(padded, policy, jit_compile):
  """Values and gradients equal `fn(x) * mask`, on a padded batch (valid rows only) and an
  unpadded one (all frames as rows); in graph mode (the gradient of a LayerNorm after the rows
  once failed Grappler's shape folding) and under XLA."""
  norm = layers.ChannelLayerNorm()
  norm.build((None, 3))
  norm.beta.assign([0.5, -1.0, 2.0])
  x = tf.constant(np.random.default_rng(0).normal(size=(2, 7, 3)).astype(np.float32))
  mask = np.ones((2, 7), np.float32)
  if padded:
    mask[1, 4:] = 0.0
    mask[0, 0] = 0.0
  mask = tf.constant(mask)
  fn = lambda frames: tf.sin(norm(frames)) * 2.0
  # The bool mask is computed inside the function, as in the model (with a captured bool
  # constant, XLA failed to size the gathered rows).
  per_frame = lambda: kernels.per_frame(fn, x, layers.as_bool_mask(mask), policy)

  def value_and_grads(compute):
    with tf.GradientTape() as tape:
      tape.watch(x)
      y = compute()
      loss = tf.reduce_sum(y * y)
    return [y] + tape.gradient(loss, [x, norm.gamma, norm.beta])

  rows = tf.function(lambda: value_and_grads(per_frame), jit_compile=jit_compile)()
  grid = value_and_grads(lambda: fn(x) * mask[..., None])
  for got, want in zip(rows, grid):
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-5, atol=1e-6)
  assert float(tf.reduce_sum(tf.abs(rows[1]))) > 0.0


def test_conv1d_and_masks_without_static_channels_or_bool_masks():
  """The forms are picked from the kernel's shape (an input traced with unknown channels still
  takes the tap GEMM), and float masks work under every policy."""
  kernel = tf.constant(np.random.default_rng(1).normal(size=(3, 6, 5)).astype(np.float32))
  x = tf.constant(np.random.default_rng(2).normal(size=(2, 7, 6)).astype(np.float32))
  traced = tf.function(lambda x: kernels.conv1d(x, kernel, policy="fast"),
                       input_signature=[tf.TensorSpec([None, None, None], tf.float32)])
  np.testing.assert_allclose(traced(x).numpy(), kernels.conv1d(x, kernel).numpy(),
                             rtol=1e-5, atol=1e-5)
  mask = np.ones((2, 7), np.float32)
  mask[1, 5:] = 0.0
  for policy in ("reference", "fast"):
    y = kernels.per_frame(lambda v: v * 2.0, x, mask, policy)
    np.testing.assert_allclose(y.numpy(), x.numpy() * 2.0 * mask[..., None])
    levels = kernels.over_levels(lambda v, m, keep: v + 1.0, [x, x[:, :4]], [mask, mask[:, :4]],
                                 1, policy)
    np.testing.assert_allclose(levels[1].numpy(), x.numpy()[:, :4] + 1.0)


@pytest.mark.parametrize("axis,jit_compile", [(1, False), (-3, False), (1, True)])
@pytest.mark.parametrize("dtype", [tf.float32, tf.bfloat16])
def test_with_next_block_values_and_gradient(dtype, axis, jit_compile):
  """Block n followed by block n + 1, and the gradient: each block receives its own slot of pair
  n and the other slot of pair n - 1 (hand-computed; sums of two terms, rounded once), the
  blocks' axis counted from either end. Under `fast` / `portable` the gradient has no scatter
  (`UnsortedSegmentSum`), under `reference` it is autodiff's."""
  rng = np.random.default_rng(11)
  blocks64 = rng.normal(size=(2, 4, 3, 5))  # [B, N + 1 = 4, L = 3, D]
  want = np.concatenate([blocks64[:, :-1], blocks64[:, 1:]], axis=2)  # [B, 3, 2L, D]
  blocks, d_pairs = tf.constant(blocks64, dtype), tf.constant(rng.normal(size=want.shape), dtype)
  d_pairs64 = d_pairs.numpy().astype(np.float64)  # a sum of two, rounded once, either way
  want_grad = np.zeros_like(blocks64)
  want_grad[:, :-1] += d_pairs64[:, :, :3]
  want_grad[:, 1:] += d_pairs64[:, :, 3:]
  mask = tf.constant(rng.random(size=(2, 4, 3)) > 0.5)
  for policy in ("reference", "fast", "portable"):
    def fn(blocks, policy=policy):
      b, n = tf.shape(blocks)[0], tf.shape(blocks)[1] - 1
      with tf.GradientTape() as tape:
        tape.watch(blocks)
        pairs = kernels.with_next_block(blocks, axis, [b, n, 6, 5], policy)
      key_mask = kernels.with_next_block(mask, axis + (axis < 0), [b, n, 6], policy)  # rank 3
      return pairs, tape.gradient(pairs, blocks, output_gradients=d_pairs), key_mask
    traced = tf.function(fn, jit_compile=jit_compile,
                         input_signature=[tf.TensorSpec([None, None, 3, 5], dtype)])
    ops = {n.op for n in layer_harness.traced_nodes(traced.get_concrete_function())}
    assert ("UnsortedSegmentSum" in ops) == (policy == "reference"), policy
    pairs, grad, key_mask = traced(blocks)
    np.testing.assert_array_equal(pairs.numpy().astype(np.float64),
                                  tf.cast(tf.constant(want, dtype), tf.float64).numpy())
    np.testing.assert_array_equal(grad.numpy().astype(np.float64),
                                  tf.cast(tf.constant(want_grad, dtype), tf.float64).numpy())
    np.testing.assert_array_equal(key_mask.numpy(), np.concatenate(
        [mask.numpy()[:, :-1], mask.numpy()[:, 1:]], axis=2))
