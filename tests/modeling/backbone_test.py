"""Tests of asl_tf.modeling.backbone."""

import numpy as np
import pytest

from asl_tf.modeling import backbone
import layer_harness


def _small(**overrides):
  kwargs = dict(input_dim=6, embd_dim=8, num_heads=2, max_seq_len=32, arch=(2, 1, 3),
                mha_win_size=(5, 5, 3, -1), droppath=0.1)
  kwargs.update(overrides)
  return backbone.ConvTransformerBackbone(**kwargs)


def test_sinusoid_table_golden():
  table = backbone.sinusoid_table(3, 4)
  s = np.sqrt(4.0)
  expected = np.array([
      [0.0, 1.0, 0.0, 1.0],
      [np.sin(1.0), np.cos(1.0), np.sin(1.0 / 100), np.cos(1.0 / 100)],
      [np.sin(2.0), np.cos(2.0), np.sin(2.0 / 100), np.cos(2.0 / 100)]]) / s
  np.testing.assert_allclose(table, expected, rtol=1e-6, atol=1e-7)


def test_resize_linear_matches_pytorch_align_corners_false():
  table = np.array([[0.0], [10.0], [20.0]], np.float32)
  # out 6 from in 3: src = (i + 0.5) / 2 - 0.5 = -0.25 (clamped 0), 0.25, 0.75, 1.25, 1.75, 2.25
  expected = [0.0, 2.5, 7.5, 12.5, 17.5, 20.0]
  np.testing.assert_allclose(backbone.resize_linear(table, 6).numpy()[:, 0], expected)
  np.testing.assert_allclose(backbone.resize_linear(table, 3).numpy(), table)


@pytest.mark.parametrize("t", [32, 64, 20, 17])
def test_pyramid_shapes_and_masks(t):
  layer = _small()
  x = np.random.default_rng(t).normal(size=(2, t, 6)).astype(np.float32)
  mask = np.ones((2, t), bool)
  mask[1, t // 2:] = False
  features, masks = layer(x, mask)
  assert len(features) == len(masks) == 4
  for l, (f, m) in enumerate(zip(features, masks)):
    t_l = -(-t // 2**l)
    assert f.shape == (2, t_l, 8)
    np.testing.assert_array_equal(m.numpy(), mask[:, ::2**l])
    np.testing.assert_array_equal(f.numpy()[~m.numpy()], 0.0)


@pytest.mark.parametrize("use_abs_pe", [False, True])
def test_mask_invariance(use_abs_pe):
  layer = _small(use_abs_pe=use_abs_pe)
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 32, 6)).astype(np.float32)
  mask = np.ones((2, 32), bool)
  mask[0, 21:] = False
  mask[1, 9:] = False
  garbage = np.where(mask[..., None], x, 100.0 * rng.normal(size=x.shape)).astype(np.float32)
  clean = np.where(mask[..., None], x, 0.0).astype(np.float32)
  for a, b in zip(layer(clean, mask)[0], layer(garbage, mask)[0]):
    np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-6)
  # A valid frame does change the output (the test can fail).
  x2 = clean.copy()
  x2[0, 3] += 1.0
  assert np.abs(layer(x2, mask)[0][0].numpy() - layer(clean, mask)[0][0].numpy()).max() > 1e-3


def test_position_encoding_added_and_interpolated_beyond_max_seq_len():
  with_pe = _small(use_abs_pe=True, arch=(1, 0, 0), mha_win_size=(5,))
  without = _small(use_abs_pe=False, arch=(1, 0, 0), mha_win_size=(5,))
  x = np.random.default_rng(1).normal(size=(1, 64, 6)).astype(np.float32)
  without(x, np.ones((1, 64), bool))
  with_pe(x, np.ones((1, 64), bool))
  without.set_weights(with_pe.get_weights())
  for t in (24, 64):  # shorter than and twice max_seq_len
    mask = np.ones((1, t), bool)
    mask[0, t - 4:] = False
    diff = (with_pe(x[:, :t], mask)[0][0] - without(x[:, :t], mask)[0][0]).numpy()[0]
    table = backbone.sinusoid_table(32, 8)
    expected = table[:t] if t <= 32 else backbone.resize_linear(table, t).numpy()
    np.testing.assert_allclose(diff, expected * mask[0, :, None], atol=1e-6)


def test_multi_stream_projection():
  layer = _small(input_dim=10, stream_dims=(4, 6), stream_proj_dims=(3, 5),
                 arch=(1, 1, 1), mha_win_size=(3, 3))
  x = np.random.default_rng(2).normal(size=(1, 8, 10)).astype(np.float32)
  features, _ = layer(x, np.ones((1, 8), bool))
  assert layer.stream_proj[0].kernel.shape == (1, 4, 3)
  assert layer.stream_proj[1].kernel.shape == (1, 6, 5)
  assert layer.embd[0].kernel.shape == (3, 8, 8)
  # Stream 0's projection sees only the first 4 channels.
  x2 = x.copy()
  x2[..., 4:] = 0.0
  layer.stream_proj[1].kernel.assign(np.zeros((1, 6, 5)))
  np.testing.assert_allclose(layer(x, np.ones((1, 8), bool))[0][0].numpy(),
                             layer(x2, np.ones((1, 8), bool))[0][0].numpy(), atol=1e-6)


def test_geometry_errors_say_what_to_change():
  with pytest.raises(ValueError, match="one window per level"):
    _small(mha_win_size=(5, 5))
  with pytest.raises(ValueError, match="sum to 9 but input_dim is 6"):
    _small(stream_dims=(4, 5), stream_proj_dims=(4, 4))
  with pytest.raises(ValueError, match="not divisible by n_head"):
    _small(embd_dim=9)
  layer = _small()
  with pytest.raises(ValueError, match="expects 6 input channels"):
    layer(np.zeros((1, 32, 7), np.float32), np.ones((1, 32), bool))


def test_mixed_precision_close_to_float32():
  x = np.random.default_rng(3).normal(size=(1, 32, 6)).astype(np.float32)
  mask = np.ones((1, 32), bool)
  mask[0, 25:] = False
  layer_harness.assert_mixed_precision_close(
      lambda dtype: _small(use_abs_pe=True, dtype=dtype), lambda net: net(x, mask)[0],
      atol=3e-2)
