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


@pytest.mark.parametrize("policy", ["reference", "fast"])
@pytest.mark.parametrize("t", [9, 16])
@pytest.mark.parametrize("stride,kernel_size,groups,filters", [
    (1, 3, 1, 6), (2, 3, 1, 6), (1, 5, 1, 3), (1, 3, 4, 4), (2, 3, 4, 4), (1, 3, 2, 6)])
def test_masked_conv_matches_reference(t, stride, kernel_size, groups, filters, policy):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, t, 4)).astype(np.float32)
  mask = np.ones((2, t), bool)
  mask[1, t - 4:] = False
  conv = layers.MaskedConv1D(filters, kernel_size, strides=stride, groups=groups,
                             bias_initializer="random_normal", kernel_policy=policy)
  y, out_mask = conv(x, mask)
  expected = _reference_conv(x, conv.kernel.numpy(), conv.bias.numpy(), stride, groups, mask)
  np.testing.assert_allclose(y.numpy(), expected, atol=1e-5)
  np.testing.assert_array_equal(out_mask.numpy(), mask[:, ::stride])
  assert y.shape == (2, -(-t // stride), filters)


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


@pytest.mark.parametrize("policy", ["reference", "fast"])
def test_channel_layer_norm_golden(policy):
  norm = layers.ChannelLayerNorm(kernel_policy=policy)
  x = np.array([[[1.0, 2.0, 3.0, 6.0]]], np.float32)
  norm.build(x.shape)
  norm.gamma.assign([1.0, 2.0, 1.0, 1.0])
  norm.beta.assign([0.0, 0.0, 1.0, 0.0])
  # mean 3, centred (-2, -1, 0, 3), biased variance (4 + 1 + 0 + 9) / 4 = 3.5
  s = np.sqrt(3.5 + 1e-5)
  expected = np.array([-2.0 / s, 2 * -1.0 / s, 0.0 + 1.0, 3.0 / s])
  np.testing.assert_allclose(norm(x).numpy()[0, 0], expected, rtol=1e-6)
  graph = tf.function(lambda x: norm(x), input_signature=[tf.TensorSpec([None, None, 4])])
  np.testing.assert_allclose(graph(x).numpy()[0, 0], expected, rtol=1e-6)


def test_layers_reject_an_unknown_kernel_policy():
  for make in (lambda: layers.MaskedConv1D(4, 3, kernel_policy="fastest"),
               lambda: layers.ChannelLayerNorm(kernel_policy="fastest")):
    with pytest.raises(ValueError, match=r"kernel_policy='fastest': use one of auto, reference"):
      make()


def test_channel_layer_norm_mixed_precision_keeps_dtype_and_accuracy():
  x = np.random.default_rng(2).normal(size=(2, 5, 8)).astype(np.float32) * 100
  ref = layers.ChannelLayerNorm()(x).numpy()
  half = layers.ChannelLayerNorm(dtype="mixed_float16")(x)
  assert half.dtype == tf.float16
  np.testing.assert_allclose(half.numpy().astype(np.float32), ref, atol=5e-3)


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
