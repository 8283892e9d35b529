"""Tests of asl_tf.modeling.heads and asl_tf.modeling.neck."""

import numpy as np
import pytest
import tensorflow as tf

from asl_tf.modeling import heads
from asl_tf.modeling import neck


def _levels(rng, lengths=(16, 8, 4), channels=8):
  feats = [rng.normal(size=(2, t, channels)).astype(np.float32) for t in lengths]
  masks = [np.ones((2, t), bool) for t in lengths]
  for m in masks:
    m[1, m.shape[1] // 2 + 1:] = False
  return feats, masks


def test_classification_prior_and_empty_class_bias():
  head = heads.ClassificationHead(4, 8, prior_prob=0.01, empty_classes=(2,))
  feats, masks = _levels(np.random.default_rng(0))
  logits = head(feats, masks)
  bias = head.output_conv.bias.numpy()
  np.testing.assert_allclose(bias, [-4.59512, -4.59512, -13.81551, -4.59512], atol=1e-5)
  for x, m, y in zip(feats, masks, logits):
    assert y.shape == x.shape[:2] + (4,) and y.dtype == tf.float32
    np.testing.assert_array_equal(y.numpy()[~m], 0.0)
  with pytest.raises(ValueError, match=r"not class ids in \[0, 4\)"):
    heads.ClassificationHead(4, 8, empty_classes=(4,))


def test_heads_share_weights_across_levels():
  head = heads.ClassificationHead(3, 8)
  feats, masks = _levels(np.random.default_rng(1))
  out = head(feats, masks)
  # The same content on another level gives the same logits.
  again = head([feats[0]], [masks[0]])
  np.testing.assert_allclose(out[0].numpy(), again[0].numpy(), atol=1e-6)
  assert len(head.weights) == 2 * 1 + 2 * 2 + 2  # 2 hidden convs (no bias), 2 norms, output


@pytest.mark.parametrize("kernel_size", [1, 3, 5])
def test_joined_levels_equal_each_level_alone(kernel_size):
  """Under `fast` the heads run all levels as one sequence; every level must see exactly its own
  zero padding and its padded frames' LayerNorm bias, as under `reference` (level by level).

  LayerNorm biases are non-zero (zeros map to them, and valid frames next to padding see that),
  video 1 ends in padding, and video 0 has leading padding, a 1-frame hole and a long hole.
  """
  head = heads.ClassificationHead(3, 8, kernel_size=kernel_size, kernel_policy="fast")
  feats, masks = _levels(np.random.default_rng(7), lengths=(24, 12, 6))
  masks[0][0, [0, 1, 5, 12, 13, 14, 15, 16, 17]] = False
  masks[1][0, [0, 6, 7, 8]] = False
  masks[2][0, 0] = False
  head(feats, masks)
  rng = np.random.default_rng(8)
  for norm in head.norms:
    norm.beta.assign(rng.normal(size=norm.beta.shape))
  for conv in head.hidden + [head.output_conv]:
    conv.kernel.assign(rng.normal(size=conv.kernel.shape))
  joined = head(feats, masks)
  reference = heads.ClassificationHead(3, 8, kernel_size=kernel_size, kernel_policy="reference")
  reference(feats, masks)
  reference.set_weights(head.get_weights())
  for l, (x, m) in enumerate(zip(feats, masks)):
    alone = reference([x], [m])[0].numpy()
    assert joined[l].shape == alone.shape
    np.testing.assert_allclose(joined[l].numpy(), alone, rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(joined[l].numpy()[~m], 0.0)
    assert np.abs(alone[1, m.shape[1] // 2]).max() > 0  # the last valid frame is not trivially zero


def test_regression_head_scale_then_relu():
  head = heads.RegressionHead(3, 8)
  feats, masks = _levels(np.random.default_rng(2))
  head(feats, masks)
  head.output_conv.bias.assign([0.7, -0.3])
  head.scales[1].scale.assign(-2.0)
  head.scales[2].scale.assign(2.0)
  out = head(feats, masks)
  raw = head._levels([feats[2]], [masks[2]])[0].numpy()
  np.testing.assert_allclose(out[2].numpy(), np.maximum(2.0 * raw, 0.0), atol=1e-6)
  raw = head._levels([feats[1]], [masks[1]])[0].numpy()
  np.testing.assert_allclose(out[1].numpy(), np.maximum(-2.0 * raw, 0.0), atol=1e-6)
  for y, m in zip(out, masks):
    assert y.dtype == tf.float32 and y.shape[-1] == 2
    assert (y.numpy() >= 0).all()
    np.testing.assert_array_equal(y.numpy()[~m], 0.0)
  with pytest.raises(ValueError, match="3 level scales but got 2"):
    head(feats[:2], masks[:2])


def test_heads_without_layer_norm_use_bias():
  head = heads.RegressionHead(1, 8, num_layers=2, with_ln=False)
  feats, masks = _levels(np.random.default_rng(3), lengths=(8,))
  head(feats, masks)
  assert head.hidden[0].use_bias and not head.norms


def test_identity_neck_normalises_each_level():
  feats, masks = _levels(np.random.default_rng(4))
  layer = neck.IdentityNeck(3)
  out, out_masks = layer(feats, masks)
  for x, y, m, mo in zip(feats, out, masks, out_masks):
    centred = x - x.mean(-1, keepdims=True)
    np.testing.assert_allclose(y.numpy(), centred / np.sqrt((centred**2).mean(-1, keepdims=True)
                                                            + 1e-5), atol=1e-5)
    np.testing.assert_array_equal(mo.numpy(), m)
  no_ln, _ = neck.IdentityNeck(3, with_ln=False)(feats, masks)
  np.testing.assert_array_equal(no_ln[0].numpy(), feats[0])
  with pytest.raises(ValueError, match="built for 3 levels"):
    layer(feats[:2], masks[:2])


def test_mixed_precision_outputs_float32():
  feats, masks = _levels(np.random.default_rng(5))
  h32 = heads.ClassificationHead(3, 8)
  out32 = h32(feats, masks)
  h16 = heads.ClassificationHead(3, 8, dtype="mixed_float16")
  h16(feats, masks)
  h16.set_weights(h32.get_weights())
  for a, b in zip(h16(feats, masks), out32):
    assert a.dtype == tf.float32
    np.testing.assert_allclose(a.numpy(), b.numpy(), atol=2e-2)


def test_heads_compile_under_xla_on_the_winograd_path():
  """XLA needs static shapes: the joined levels (64 channels, so the hidden convs take the Winograd
  path, whose padding depends on the length) must compile and equal graph mode."""
  head = heads.ClassificationHead(3, 64, kernel_policy="fast")
  feats, masks = _levels(np.random.default_rng(9), lengths=(18, 9, 5), channels=64)
  want = [y.numpy() for y in head(feats, masks)]
  got = tf.function(head, jit_compile=True)(feats, masks)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g.numpy(), w, rtol=1e-4, atol=1e-4)
