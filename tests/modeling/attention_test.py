"""Tests of asl_tf.modeling.attention."""

import math

import numpy as np
import pytest
import tensorflow as tf

from asl_tf.modeling import attention
import layer_harness


def _dense_reference(layer, x, mask):
  """Full T x T attention with ActionFormer's masks, from the layer's own q / k / v / proj."""
  s = layer.stride
  q, _ = layer.query_conv(x, mask)
  k, _ = layer.key_conv(x, mask)
  v, _ = layer.value_conv(x, mask)
  q = layer.query(layer.query_norm(q)).numpy().astype(np.float64)
  k = layer.key(layer.key_norm(k)).numpy().astype(np.float64)
  v = layer.value(layer.value_norm(v)).numpy().astype(np.float64)
  b, t, c = q.shape
  h, d = layer.num_heads, c // layer.num_heads
  q, k, v = (a.reshape(b, t, h, d).transpose(0, 2, 1, 3) for a in (q, k, v))
  kv_mask = mask[:, ::s]
  scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(d)  # [B, H, T, T]
  if layer.window_size > 1:
    i = np.arange(t)
    band = np.abs(i[:, None] - i[None]) <= layer.window_size // 2
    scores = np.where(band, scores + np.where(kv_mask, 0.0, -1e4)[:, None, None], -np.inf)
  else:
    scores = np.where(kv_mask[:, None, None], scores, -np.inf)
  probs = np.exp(scores - scores.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  out = (probs @ v).transpose(0, 2, 1, 3).reshape(b, t, c)
  out = layer.proj(out.astype(np.float32)).numpy()
  return out * kv_mask[..., None]


@pytest.mark.parametrize("t,window,stride,valid", [
    (32, 9, 1, 23), (33, 9, 1, 33), (32, 7, 2, 19), (31, 5, 2, 30), (12, 19, 1, 7),
    (40, 3, 1, 1), (24, -1, 1, 17), (24, 1, 2, 9)])
def test_local_attention_equals_dense_band_reference(t, window, stride, valid):
  rng = np.random.default_rng(t + window)
  x = rng.normal(size=(2, t, 16)).astype(np.float32)
  mask = np.ones((2, t), bool)
  mask[1, valid:] = False
  layer = attention.MaskedSelfAttention(16, 4, window, stride=stride)
  y, out_mask = layer(x, mask)
  expected = _dense_reference(layer, x, mask)
  assert y.shape == (2, -(-t // stride), 16)
  np.testing.assert_array_equal(out_mask.numpy(), mask[:, ::stride])
  np.testing.assert_allclose(y.numpy(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("stride", [1, 2])
def test_local_attention_gradients_equal_under_every_policy(stride):
  """The same weights under `reference`, `fast` and `portable` (whose key-block pairs have their
  gradient written out) give the same outputs and the same gradients of the input and every
  weight, on a padded video with a partial last block."""
  rng = np.random.default_rng(stride)
  x = tf.constant(rng.normal(size=(2, 23, 16)).astype(np.float32))
  mask = np.ones((2, 23), bool)
  mask[1, 15:] = False
  w_out = tf.constant(rng.normal(size=(16,)).astype(np.float32))
  weights = None
  results = {}
  for policy in ("reference", "fast", "portable"):
    layer = attention.MaskedSelfAttention(16, 4, 5, stride=stride, kernel_policy=policy)
    layer(x, mask)
    weights = weights or [rng.normal(0.0, 0.5, size=w.shape) for w in layer.get_weights()]
    layer.set_weights(weights)

    @tf.function(input_signature=[tf.TensorSpec([None, None, 16]),
                                  tf.TensorSpec([None, None], tf.bool)])
    def value_and_grads(x, mask, layer=layer):
      with tf.GradientTape() as tape:
        tape.watch(x)
        y, _ = layer(x, mask, training=True)
        loss = tf.reduce_sum(tf.sin(y) * w_out)  # dy differs per frame and channel
      return [y] + tape.gradient(loss, [x] + layer.trainable_variables)

    results[policy] = [t.numpy() for t in value_and_grads(x, mask)]
  for policy in ("fast", "portable"):
    for got, want in zip(results[policy], results["reference"]):
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=policy)


def test_local_attention_has_no_t_by_t_tensor():
  t, window = 96, 9
  layer = attention.MaskedSelfAttention(8, 2, window)
  layer.build((1, t, 8))
  fn = tf.function(lambda x, m: layer(x, m)[0]).get_concrete_function(
      tf.TensorSpec([1, t, 8]), tf.TensorSpec([1, t], tf.bool))
  largest = 0
  for op in fn.graph.get_operations():
    for out in op.outputs:
      if out.shape.rank:
        dims = [d for d in out.shape.as_list() if d is not None]
        assert sum(d >= t for d in dims) < 2, f"{op.name} has shape {out.shape}"
        largest = max(largest, int(np.prod(dims)) if dims else 0)
  # The biggest intermediate is the banded score tensor, O(T x window), not O(T^2).
  assert largest <= 2 * t * 2 * window * 2


def test_transformer_block_downsampling_aligns_frame_i_with_input_2i():
  block = attention.TransformerBlock(4, 1, 5, stride=2)
  x = np.zeros((1, 16, 4), np.float32)
  x[0, 6] = 5.0  # spike at input frame 6
  pooled = block._pool_skip(tf.constant(x)).numpy()[0, :, 0]
  # kernel 3, symmetric padding: output i covers inputs 2i-1, 2i, 2i+1.
  np.testing.assert_array_equal(np.nonzero(pooled)[0], [3])
  x = -np.ones((1, 5, 1), np.float32)
  x[0, 0] = -3.0  # the -inf padding never wins the max
  np.testing.assert_array_equal(block._pool_skip(tf.constant(x)).numpy()[0, :, 0], [-1, -1, -1])


def test_transformer_block_shapes_and_padded_outputs_zero():
  rng = np.random.default_rng(0)
  for t, stride in [(16, 1), (16, 2), (15, 2), (9, 1)]:
    x = rng.normal(size=(2, t, 8)).astype(np.float32)
    mask = np.ones((2, t), bool)
    mask[0, t - 3:] = False
    block = attention.TransformerBlock(8, 2, 5, stride=stride, droppath=0.1)
    y, out_mask = block(x, mask)
    assert y.shape == (2, -(-t // stride), 8)
    np.testing.assert_array_equal(out_mask.numpy(), mask[:, ::stride])
    np.testing.assert_array_equal(y.numpy()[~out_mask.numpy()], 0.0)


def test_transformer_block_layer_scale_only_with_droppath():
  with_dp = attention.TransformerBlock(8, 2, 5, droppath=0.1)
  without = attention.TransformerBlock(8, 2, 5, droppath=0.0)
  x, mask = np.ones((1, 8, 8), np.float32), np.ones((1, 8), bool)
  with_dp(x, mask)
  without(x, mask)
  assert len(with_dp.weights) == len(without.weights) + 2
  np.testing.assert_allclose(with_dp.scale_attn.scale.numpy(), 1e-4)
  assert not hasattr(without, "scale_attn")
  # With LayerScale 1e-4 the block is nearly the identity at initialisation.
  x = np.random.default_rng(1).normal(size=(1, 8, 8)).astype(np.float32)
  assert np.abs(with_dp(x, mask)[0].numpy() - x).max() < 1e-2
  assert np.abs(without(x, mask)[0].numpy() - x).max() > 1e-1


def test_transformer_block_mlp_uses_exact_gelu():
  block = attention.TransformerBlock(4, 1, -1, droppath=0.0)
  x = 3.0 * np.random.default_rng(2).normal(size=(1, 6, 4)).astype(np.float32)
  mask = np.ones((1, 6), bool)
  y, _ = block(x, mask)
  attn, _ = block.attn(block.ln1(x), mask)
  mid = x + attn.numpy()
  pre = block.mlp_fc1(block.ln2(mid)).numpy().astype(np.float64)
  erf = np.vectorize(math.erf)
  exact = block.mlp_fc2(0.5 * pre * (1.0 + erf(pre / np.sqrt(2.0)))).numpy()
  tanh = block.mlp_fc2(0.5 * pre * (1.0 + np.tanh(np.sqrt(2 / np.pi) * (pre + 0.044715 * pre**3))))
  np.testing.assert_allclose(y.numpy(), mid + exact, atol=1e-6)
  assert np.abs(y.numpy() - (mid + tanh.numpy())).max() > 1e-5


@pytest.mark.parametrize("kernel_policy,training,gelu_dtype", [
    ("fast", True, tf.float32), ("portable", True, tf.float32), ("fast", False, tf.bfloat16),
    ("reference", True, tf.bfloat16)])
def test_bfloat16_block_takes_its_gelu_from_kernels(monkeypatch, kernel_policy, training,
                                                    gelu_dtype):
  """The MLP's GELU is `kernels.gelu`: in a bfloat16 training step under `fast` / `portable` it
  runs in float32, at inference (fused by oneDNN) and under `reference` in bfloat16."""
  seen = []
  gelu = tf.nn.gelu
  monkeypatch.setattr(tf.nn, "gelu", lambda x, approximate: seen.append(x.dtype) or gelu(
      x, approximate=approximate))
  block = attention.TransformerBlock(8, 2, 5, kernel_policy=kernel_policy, dtype="mixed_bfloat16")
  block(np.ones((1, 8, 8), np.float32), np.ones((1, 8), bool), training=training)
  assert seen and set(seen) == {gelu_dtype}


def test_attention_rejects_bad_geometry():
  with pytest.raises(ValueError, match="not divisible by num_heads"):
    attention.MaskedSelfAttention(10, 4, 9)
  with pytest.raises(ValueError, match="stride must be 1 or even"):
    attention.MaskedSelfAttention(8, 2, 9, stride=3)
  layer = attention.MaskedSelfAttention(8, 2, 9)
  layer(np.zeros((1, 8, 8), np.float32), np.ones((1, 8), bool))
  with pytest.raises(ValueError, match="expects inputs with 8 channels"):
    layer(np.zeros((1, 8, 6), np.float32), np.ones((1, 8), bool))


def test_block_mixed_precision_close_to_float32():
  x = np.random.default_rng(4).normal(size=(2, 16, 8)).astype(np.float32)
  mask = np.ones((2, 16), bool)
  mask[1, 10:] = False
  layer_harness.assert_mixed_precision_close(
      lambda dtype: attention.TransformerBlock(8, 2, 5, stride=2, droppath=0.1, dtype=dtype),
      lambda block: block(x, mask)[0], atol=2e-2)
