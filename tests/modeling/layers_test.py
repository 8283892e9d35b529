"""Tests of asl_tf.modeling.layers."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from asl_tf.modeling import layers


def _reference_conv(x, kernel, bias, stride, groups, mask):
  """NumPy PyTorch-style conv: zero pad k // 2 both sides, valid, stride; then mask[::stride]."""
  k, cin_g, cout = kernel.shape
  pad = k // 2
  xp = np.pad(x, [(0, 0), (pad, pad), (0, 0)])
  t_out = (x.shape[1] + 2 * pad - k) // stride + 1
  cout_g = cout // groups
  y = np.zeros((x.shape[0], t_out, cout))
  for i in range(t_out):
    window = xp[:, i * stride:i * stride + k]  # [B, k, Cin]
    for g in range(groups):
      y[:, i, g * cout_g:(g + 1) * cout_g] = np.einsum(
          "bkc,kcf->bf", window[:, :, g * cin_g:(g + 1) * cin_g],
          kernel[:, :, g * cout_g:(g + 1) * cout_g])
  if bias is not None:
    y = y + bias
  return y * mask[:, ::stride, None]


@pytest.mark.parametrize("t", [9, 16])
@pytest.mark.parametrize("stride,kernel_size,groups,filters", [
    (1, 3, 1, 6), (2, 3, 1, 6), (1, 5, 1, 3), (1, 3, 4, 4), (2, 3, 4, 4), (1, 3, 2, 6)])
def test_masked_conv_matches_reference(t, stride, kernel_size, groups, filters):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, t, 4)).astype(np.float32)
  mask = np.ones((2, t), bool)
  mask[1, t - 4:] = False
  conv = layers.MaskedConv1D(filters, kernel_size, strides=stride, groups=groups,
                             bias_initializer="random_normal")
  y, out_mask = conv(x, mask)
  expected = _reference_conv(x, conv.kernel.numpy(), conv.bias.numpy(), stride, groups, mask)
  np.testing.assert_allclose(y.numpy(), expected, atol=1e-5)
  np.testing.assert_array_equal(out_mask.numpy(), mask[:, ::stride])
  assert y.shape == (2, -(-t // stride), filters)


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

  tap = value_and_grads(layers.conv1d_as_tap_gemm)
  assert tap.get_concrete_function().structured_outputs[0].shape.as_list() == [None, None, 5]
  direct = value_and_grads(
      lambda x, k: tf.nn.conv1d(tf.pad(x, [[0, 0], [pad, pad], [0, 0]]), k, 1, "VALID"))
  for length in (1, 2, 9):
    x = tf.constant(rng.normal(size=(2, length, 6)).astype(np.float32))
    got, want = tap(x), direct(x)
    assert got[0].shape == (2, length, 5)
    for g, w in zip(got, want):
      np.testing.assert_allclose(g.numpy(), w.numpy(), rtol=1e-5, atol=1e-5)


def test_masked_conv_takes_the_tap_gemm_only_for_narrow_dense_stride_1():
  narrow = layers.MaskedConv1D(20, 3)
  narrow.build((None, None, 512))
  assert narrow._use_tap_gemm() and not narrow._use_winograd(tf.float32)
  for conv in (layers.MaskedConv1D(64, 3), layers.MaskedConv1D(20, 3, strides=2),
               layers.MaskedConv1D(20, 3, groups=4)):
    conv.build((None, None, 64))
    assert not conv._use_tap_gemm()


def test_strided_conv_output_i_is_centred_on_input_2i():
  # A centre-tap kernel copies the input frame the output is centred on.
  conv = layers.MaskedConv1D(1, 3, strides=2, use_bias=False,
                             kernel_initializer=keras.initializers.Constant([[[0.0]], [[1.0]],
                                                                             [[0.0]]]))
  x = np.arange(12, dtype=np.float32).reshape(1, 12, 1)
  y, _ = conv(x, np.ones((1, 12), bool))
  np.testing.assert_array_equal(y.numpy()[0, :, 0], np.arange(0, 12, 2))


def test_masked_conv_float_mask_equals_bool_mask():
  x = np.random.default_rng(1).normal(size=(1, 8, 3)).astype(np.float32)
  mask = np.array([[1, 1, 1, 1, 1, 0, 0, 0]])
  conv = layers.MaskedConv1D(2, 3)
  y_bool, m_bool = conv(x, mask.astype(bool))
  y_float, m_float = conv(x, mask.astype(np.float32))
  np.testing.assert_array_equal(y_bool.numpy(), y_float.numpy())
  np.testing.assert_array_equal(m_bool.numpy(), m_float.numpy())
  assert m_float.dtype == tf.bool
  np.testing.assert_array_equal(y_bool.numpy()[0, 5:], 0.0)


def test_masked_conv_default_init_is_pytorch_uniform():
  conv = layers.MaskedConv1D(64, 3)
  conv.build((None, None, 100))
  bound = 1.0 / np.sqrt(3 * 100)
  kernel = conv.kernel.numpy()
  assert np.abs(kernel).max() <= bound
  assert np.abs(kernel).max() > 0.9 * bound
  np.testing.assert_array_equal(conv.bias.numpy(), 0.0)


def test_masked_conv_rejects_wrong_channels_and_bad_geometry():
  conv = layers.MaskedConv1D(4, 3)
  conv(np.zeros((1, 8, 5), np.float32), np.ones((1, 8), bool))
  with pytest.raises(ValueError, match="expects inputs with 5 channels"):
    conv(np.zeros((1, 8, 6), np.float32), np.ones((1, 8), bool))
  with pytest.raises(ValueError, match="odd kernel_size"):
    layers.MaskedConv1D(4, 2)
  with pytest.raises(ValueError, match="not divisible by groups"):
    layers.MaskedConv1D(5, 3, groups=2)


def test_channel_layer_norm_golden():
  norm = layers.ChannelLayerNorm()
  x = np.array([[[1.0, 2.0, 3.0, 6.0]]], np.float32)
  norm.build(x.shape)
  norm.gamma.assign([1.0, 2.0, 1.0, 1.0])
  norm.beta.assign([0.0, 0.0, 1.0, 0.0])
  # mean 3, centred (-2, -1, 0, 3), biased variance (4 + 1 + 0 + 9) / 4 = 3.5
  s = np.sqrt(3.5 + 1e-5)
  expected = np.array([-2.0 / s, 2 * -1.0 / s, 0.0 + 1.0, 3.0 / s])
  np.testing.assert_allclose(norm(x).numpy()[0, 0], expected, rtol=1e-6)


def _graph_op_types(fn, *specs):
  graph = tf.function(fn).get_concrete_function(*specs).graph
  return {op.type for op in graph.get_operations()}


def test_channel_layer_norm_inference_form_equals_training_form(monkeypatch):
  """At inference with oneDNN the LayerNorm is a FusedBatchNorm over rows: same values, incl.
  all-zero (padded) rows -> beta and rows with a large mean; not in training, not in
  `portable_graphs()` (SavedModels)."""
  monkeypatch.setattr(layers, "onednn_enabled", lambda: True)
  norm = layers.ChannelLayerNorm()
  norm.build((None, None, 16))
  rng = np.random.default_rng(3)
  norm.gamma.assign(rng.normal(size=16).astype(np.float32))
  norm.beta.assign(rng.normal(size=16).astype(np.float32))
  x = rng.normal(size=(2, 9, 16)).astype(np.float32)
  x[0, 3] += 1000.0
  x[1, 6:] = 0.0
  spec = tf.TensorSpec([None, None, 16], tf.float32)
  infer = tf.function(lambda x: norm(x, training=False), input_signature=[spec])
  train = tf.function(lambda x: norm(x, training=True), input_signature=[spec])
  got, want = infer(x).numpy(), train(x).numpy()
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got[1, 6:], np.broadcast_to(norm.beta.numpy(), (3, 16)), atol=1e-6)
  assert "FusedBatchNormV3" in _graph_op_types(lambda x: norm(x, training=False), spec)
  assert "FusedBatchNormV3" not in _graph_op_types(lambda x: norm(x, training=True), spec)
  with layers.portable_graphs():
    assert "FusedBatchNormV3" not in _graph_op_types(lambda x: norm(x, training=False), spec)


def test_channel_layer_norm_inference_form_fuses_into_one_onednn_kernel(tmp_path):
  """Grappler's oneDNN remapper turns the inference form into `_MklLayerNorm` (the speed-up)."""
  if not layers.onednn_enabled():
    pytest.skip("oneDNN is off in this process")
  from tensorflow.tsl.profiler.protobuf import xplane_pb2  # pylint: disable=g-import-not-at-top
  norm = layers.ChannelLayerNorm()
  forward = tf.function(lambda x: norm(x, training=False) * 2.0,
                        input_signature=[tf.TensorSpec([None, None, 32], tf.float32)])
  x = tf.ones([1, 64, 32])
  forward(x)
  tf.profiler.experimental.start(str(tmp_path))
  forward(x).numpy()
  tf.profiler.experimental.stop()
  space = xplane_pb2.XSpace()
  space.ParseFromString(next(tmp_path.rglob("*.xplane.pb")).read_bytes())
  ops = {plane.event_metadata[event.metadata_id].name.rsplit(":", 1)[-1]
         for plane in space.planes for line in plane.lines for event in line.events}
  assert "_MklLayerNorm" in ops
  assert not {"FusedBatchNormV3", "_MklNativeFusedBatchNormV3", "Mean"} & ops


def test_channel_layer_norm_mixed_precision_keeps_dtype_and_accuracy():
  x = np.random.default_rng(2).normal(size=(2, 5, 8)).astype(np.float32) * 100
  ref = layers.ChannelLayerNorm()(x).numpy()
  half = layers.ChannelLayerNorm(dtype="mixed_float16")(x)
  assert half.dtype == tf.float16
  np.testing.assert_allclose(half.numpy().astype(np.float32), ref, atol=5e-3)


@pytest.mark.parametrize("jit_compile", [False, True])
@pytest.mark.parametrize("padded", [True, False])
def test_apply_to_valid_frames_equals_masked_grid(padded, jit_compile):
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

  def value_and_grads(compute):
    with tf.GradientTape() as tape:
      tape.watch(x)
      y = compute()
      loss = tf.reduce_sum(y * y)
    return [y] + tape.gradient(loss, [x, norm.gamma, norm.beta])

  rows = tf.function(lambda: value_and_grads(lambda: layers.apply_to_valid_frames(fn, x, mask)),
                     jit_compile=jit_compile)()
  grid = value_and_grads(lambda: fn(x) * mask[..., None])
  for got, want in zip(rows, grid):
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-5, atol=1e-6)
  assert float(tf.reduce_sum(tf.abs(rows[1]))) > 0.0


def test_scale_and_layer_scale():
  scale = layers.Scale(init_value=2.5)
  np.testing.assert_allclose(scale(np.ones((2, 3), np.float32)).numpy(), 2.5)
  assert scale.scale.shape == ()
  layer_scale = layers.LayerScale(3)
  y = layer_scale(np.ones((1, 2, 3), np.float32)).numpy()
  np.testing.assert_allclose(y, 1e-4)
  assert layer_scale.scale.shape == (3,)
  with pytest.raises(ValueError, match="expects inputs with 3 channels"):
    layer_scale(np.ones((1, 2, 4), np.float32))


def test_drop_path_is_per_sample_and_rescaled():
  keras.utils.set_random_seed(0)
  drop = layers.DropPath(0.25)
  x = np.ones((4000, 3, 2), np.float32)
  y = drop(x, training=True).numpy()
  per_sample = y.reshape(4000, -1)
  assert np.all(per_sample.min(axis=1) == per_sample.max(axis=1))  # whole samples
  assert set(np.unique(per_sample)) == {0.0, np.float32(1 / 0.75)}
  assert abs((per_sample[:, 0] == 0).mean() - 0.25) < 0.03
  np.testing.assert_array_equal(drop(x, training=False).numpy(), x)
  with pytest.raises(ValueError, match=r"\[0, 1\)"):
    layers.DropPath(1.0)


@pytest.mark.parametrize("layer", [
    layers.MaskedConv1D(8, 5, strides=2, groups=2, use_bias=False),
    layers.ChannelLayerNorm(epsilon=1e-3),
    layers.Scale(init_value=0.5),
    layers.LayerScale(7, init_value=0.1),
    layers.DropPath(0.3),
])
def test_config_round_trip(layer):
  config = layer.get_config()
  clone = layer.__class__.from_config(config)
  assert clone.get_config() == config
  restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
  assert type(restored) is type(layer)
  assert restored.get_config() == config


def test_masked_conv_mixed_precision():
  x = np.random.default_rng(3).normal(size=(2, 10, 4)).astype(np.float32)
  mask = np.ones((2, 10), bool)
  conv32 = layers.MaskedConv1D(6, 3, strides=2)
  y32, _ = conv32(x, mask)
  conv16 = layers.MaskedConv1D(6, 3, strides=2, dtype="mixed_float16")
  conv16.build(x.shape)
  conv16.set_weights(conv32.get_weights())
  y16, _ = conv16(x, mask)
  assert y16.dtype == tf.float16
  assert conv16.kernel.dtype == "float32"
  np.testing.assert_allclose(y16.numpy().astype(np.float32), y32.numpy(), atol=1e-2)
