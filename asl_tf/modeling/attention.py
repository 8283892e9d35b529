"""ActionFormer's masked multi-head convolutional self-attention and transformer block.

`MaskedSelfAttention` reproduces ActionFormer's `LocalMaskedMHCA` (sliding-window attention,
each query attends to the keys within +-window_size // 2) and, for `window_size <= 1`, its
`MaskedMHCA` (global attention). Local attention never builds a T x T tensor: queries are split
into blocks of `2 * (window_size // 2)` frames, and each block attends to its keys plus a margin of
`window_size // 2` on both sides, so memory grows linearly with T.
"""

import math

import keras
import tensorflow as tf

from asl_tf.modeling import kernels
from asl_tf.modeling import layers

# Added to the scores of padded keys (ActionFormer adds -1e4 in local attention).
PADDED_KEY_BIAS = -1e4
# Excludes a key entirely (ActionFormer uses -inf; a finite value keeps fully excluded rows of
# block padding free of NaN in the gradient; exp(-1e9) is exactly 0 in float32).
EXCLUDED_KEY_BIAS = -1e9


@keras.saving.register_keras_serializable(package="asl_tf")
class MaskedSelfAttention(keras.layers.Layer):
  """Masked multi-head convolutional self-attention, local (sliding window) or global.

  q, k and v each go through a depthwise MaskedConv1D (kernel 3, or stride + 1 when strided; no
  bias) and a LayerNorm, then a 1x1 projection. Scores are `q . k / sqrt(head_dim)`.
  Local (`window_size > 1`): query t sees keys t - w // 2 ... t + w // 2; keys outside the sequence
  are excluded and padded keys get -1e4 added (as ActionFormer). Global: padded keys are excluded.
  The attended values go through the output projection and dropout and are multiplied by the
  output mask, so padded query rows are zero.

  Inputs: `x` [B, T, C], `padding_mask` [B, T] bool or float.
  Outputs: `(y [B, ceil(T / stride), C], out_mask [B, ceil(T / stride)] bool)`.

  Args:
    embed_dim: channels C.
    num_heads: attention heads; must divide C.
    window_size: local window (odd, e.g. 19); <= 1 means global attention.
    stride: 1, or an even downsampling stride applied by the q / k / v convolutions.
    dropout: dropout rate of the output projection.
    kernel_policy: `kernels.POLICIES` entry of the convolutions, LayerNorms and projections.
  """

  def __init__(self, embed_dim, num_heads, window_size, stride=1, dropout=0.0,
               kernel_policy="auto", **kwargs):
    super().__init__(**kwargs)
    if embed_dim % num_heads:
      raise ValueError(f"embed_dim={embed_dim} is not divisible by num_heads={num_heads}; choose "
                       "--embd_dim as a multiple of --n_head")
    if stride != 1 and stride % 2:
      raise ValueError(f"attention stride must be 1 or even, got {stride}")
    self.embed_dim = embed_dim
    self.num_heads = num_heads
    self.window_size = window_size
    self.stride = stride
    self.dropout = dropout
    self.kernel_policy = kernel_policy
    self.head_dim = embed_dim // num_heads
    self.half_window = window_size // 2 if window_size > 1 else 0
    kernel_size = stride + 1 if stride > 1 else 3
    for name in ("query", "key", "value"):
      setattr(self, f"{name}_conv", layers.MaskedConv1D(
          embed_dim, kernel_size, strides=stride, groups=embed_dim, use_bias=False,
          kernel_policy=kernel_policy, name=f"{name}_conv", dtype=self.dtype_policy))
      setattr(self, f"{name}_norm", layers.ChannelLayerNorm(
          kernel_policy=kernel_policy, name=f"{name}_norm", dtype=self.dtype_policy))
      setattr(self, name, layers.Pointwise(embed_dim, kernel_policy=kernel_policy, name=name,
                                           dtype=self.dtype_policy))
    self.proj = layers.Pointwise(embed_dim, kernel_policy=kernel_policy, name="proj",
                                 dtype=self.dtype_policy)
    self.proj_dropout = keras.layers.Dropout(dropout, dtype=self.dtype_policy)

  def build(self, input_shape):
    shape = tuple(input_shape)
    out_shape = shape[:-2] + (None, self.embed_dim)
    for name in ("query", "key", "value"):
      getattr(self, f"{name}_conv").build(shape)
      getattr(self, f"{name}_norm").build(out_shape)
      getattr(self, name).build(out_shape)
    self.proj.build(out_shape)

  def _split_heads(self, x):
    b, t = tf.shape(x)[0], tf.shape(x)[1]
    x = tf.reshape(x, [b, t, self.num_heads, self.head_dim])  # [B, T, H, D]
    return tf.transpose(x, [0, 2, 1, 3])  # [B, H, T, D]

  def call(self, x, padding_mask, training=False):
    layers.check_channels(x, self.embed_dim, self.name)
    mask = layers.as_bool_mask(padding_mask)
    q, out_mask = self.query_conv(x, mask)
    k, _ = self.key_conv(x, mask)
    v, _ = self.value_conv(x, mask)
    q = self.query(self.query_norm(q, training=training), training=training)
    k = self.key(self.key_norm(k, training=training), training=training)
    v = self.value(self.value_norm(v, training=training), training=training)
    q = self._split_heads(q) * tf.cast(1.0 / math.sqrt(self.head_dim), q.dtype)
    k = self._split_heads(k)
    v = self._split_heads(v)
    if self.window_size > 1:
      out = self._local_attention(q, k, v, out_mask)
    else:
      out = self._global_attention(q, k, v, out_mask)
    b, t = tf.shape(out)[0], tf.shape(out)[2]
    out = tf.reshape(tf.transpose(out, [0, 2, 1, 3]), [b, t, self.embed_dim])  # [B, T', C]
    out = self.proj_dropout(self.proj(out, training=training), training=training)
    return out * tf.cast(out_mask, out.dtype)[..., None], out_mask

  def _global_attention(self, q, k, v, mask):
    """q, k, v [B, H, T, D], mask [B, T] -> [B, H, T, D]."""
    scores = tf.cast(tf.einsum("bhqd,bhkd->bhqk", q, k), tf.float32)  # [B, H, T, T]
    bias = tf.where(mask, 0.0, EXCLUDED_KEY_BIAS)[:, None, None, :]  # [B, 1, 1, T]
    probs = tf.cast(tf.nn.softmax(scores + bias, axis=-1), v.dtype)
    v = v * tf.cast(mask, v.dtype)[:, None, :, None]
    return tf.einsum("bhqk,bhkd->bhqd", probs, v)

  def _local_attention(self, q, k, v, mask):
    """Banded attention in blocks; q, k, v [B, H, T, D], mask [B, T] -> [B, H, T, D]."""
    h = self.half_window
    block = 2 * h
    span = block + 2 * h  # keys seen by one query block
    b, t = tf.shape(q)[0], tf.shape(q)[2]
    num_blocks = (t + block - 1) // block
    tail = num_blocks * block - t
    q = tf.pad(q, [[0, 0], [0, 0], [0, tail], [0, 0]])
    q = tf.reshape(q, [b, self.num_heads, num_blocks, block, self.head_dim])  # [B, H, N, L, D]
    # Keys padded by h in front split into N + 1 blocks; query block n sees key blocks n and
    # n + 1, so slot j of block n is key position p = n * block + j - h.
    key_pad = [[0, 0], [0, 0], [h, tail + h], [0, 0]]
    blocks_shape = [b, self.num_heads, num_blocks + 1, block, self.head_dim]
    keys_shape = [b, self.num_heads, num_blocks, span, self.head_dim]
    k = kernels.with_next_block(tf.reshape(tf.pad(k, key_pad), blocks_shape), 2, keys_shape,
                                self.kernel_policy)  # [B, H, N, S, D]
    v = kernels.with_next_block(tf.reshape(tf.pad(v, key_pad), blocks_shape), 2, keys_shape,
                                self.kernel_policy)  # [B, H, N, S, D]
    mask_blocks = tf.reshape(tf.pad(mask, [[0, 0], [h, tail + h]]), [b, num_blocks + 1, block])
    key_valid = kernels.with_next_block(mask_blocks, 1, [b, num_blocks, span])  # [B, N, S]
    positions = tf.range(num_blocks)[:, None] * block + tf.range(span)[None, :] - h  # [N, S]
    in_sequence = (positions >= 0) & (positions < t)
    # Slot j is in query i's band iff 0 <= j - i <= 2h.
    offsets = tf.range(span)[None, :] - tf.range(block)[:, None]  # [L, S]
    in_band = (offsets >= 0) & (offsets <= 2 * h)
    allowed = in_band[None, None] & in_sequence[None, :, None, :]  # [1, N, L, S]
    bias = tf.where(allowed, tf.where(key_valid[:, :, None, :], 0.0, PADDED_KEY_BIAS),
                    EXCLUDED_KEY_BIAS)  # [B, N, L, S]
    scores = tf.cast(tf.einsum("bhnld,bhnsd->bhnls", q, k), tf.float32)  # [B, H, N, L, S]
    probs = tf.cast(tf.nn.softmax(scores + bias[:, None], axis=-1), v.dtype)
    out = tf.einsum("bhnls,bhnsd->bhnld", probs, v)
    out = tf.reshape(out, [b, self.num_heads, num_blocks * block, self.head_dim])  # [B, H, T+, D]
    return out[:, :, :t]

  def get_config(self):
    config = super().get_config()
    config.update({
        "embed_dim": self.embed_dim,
        "num_heads": self.num_heads,
        "window_size": self.window_size,
        "stride": self.stride,
        "dropout": self.dropout,
        "kernel_policy": self.kernel_policy,
    })
    return config


@keras.saving.register_keras_serializable(package="asl_tf")
class TransformerBlock(keras.layers.Layer):
  """ActionFormer's pre-LN transformer block with optional in-block downsampling.

  ```
  a   = Attn(LN1(x))                                  # strided when stride > 1
  x'  = MaxPoolSkip(x) * out_mask + DropPath(LayerScale(a))
  out = x' + DropPath(LayerScale(MLP(LN2(x')) * out_mask))
  ```
  MaxPoolSkip is a max-pool (kernel stride + 1, symmetric -inf padding) when stride > 1, else the
  identity; MLP is 1x1 C -> 4C, exact (erf) GELU, dropout, 1x1 4C -> C, dropout. LayerScale
  (init 1e-4) and DropPath exist only when `droppath > 0`.

  Inputs: `x` [B, T, C], `padding_mask` [B, T] bool or float.
  Outputs: `(y [B, ceil(T / stride), C], out_mask [B, ceil(T / stride)] bool)`.

  Args:
    embed_dim: channels C.
    num_heads: attention heads.
    window_size: local attention window; <= 1 means global attention.
    stride: 1, or an even downsampling stride.
    dropout: attention projection and MLP dropout.
    droppath: stochastic depth rate.
    kernel_policy: `kernels.POLICIES` entry of the convolutions, LayerNorms, projections and
      MLP.
  """

  def __init__(self, embed_dim, num_heads, window_size, stride=1, dropout=0.0, droppath=0.0,
               kernel_policy="auto", **kwargs):
    super().__init__(**kwargs)
    self.embed_dim = embed_dim
    self.num_heads = num_heads
    self.window_size = window_size
    self.stride = stride
    self.dropout = dropout
    self.droppath = droppath
    self.kernel_policy = kernel_policy
    dtype = self.dtype_policy
    self.ln1 = layers.ChannelLayerNorm(kernel_policy=kernel_policy, name="ln1", dtype=dtype)
    self.ln2 = layers.ChannelLayerNorm(kernel_policy=kernel_policy, name="ln2", dtype=dtype)
    self.attn = MaskedSelfAttention(embed_dim, num_heads, window_size, stride=stride,
                                    dropout=dropout, kernel_policy=kernel_policy, name="attn",
                                    dtype=dtype)
    self.mlp_fc1 = layers.Pointwise(4 * embed_dim, kernel_policy=kernel_policy, name="mlp_fc1",
                                    dtype=dtype)
    self.mlp_fc2 = layers.Pointwise(embed_dim, kernel_policy=kernel_policy, name="mlp_fc2",
                                    dtype=dtype)
    self.mlp_dropout1 = keras.layers.Dropout(dropout, dtype=dtype)
    self.mlp_dropout2 = keras.layers.Dropout(dropout, dtype=dtype)
    if droppath > 0.0:
      self.scale_attn = layers.LayerScale(embed_dim, name="scale_attn", dtype=dtype)
      self.scale_mlp = layers.LayerScale(embed_dim, name="scale_mlp", dtype=dtype)
      self.drop_path = layers.DropPath(droppath, name="drop_path", dtype=dtype)

  def build(self, input_shape):
    shape = tuple(input_shape)
    out_shape = shape[:-2] + (None, self.embed_dim)
    self.ln1.build(shape)
    self.attn.build(shape)
    self.ln2.build(out_shape)
    self.mlp_fc1.build(out_shape)
    self.mlp_fc2.build(out_shape[:-1] + (4 * self.embed_dim,))
    if self.droppath > 0.0:
      self.scale_attn.build(out_shape)
      self.scale_mlp.build(out_shape)

  def _pool_skip(self, x):
    if self.stride == 1:
      return x
    pad = (self.stride + 1) // 2
    x = tf.pad(x, [[0, 0], [pad, pad], [0, 0]], constant_values=-math.inf)
    return tf.nn.max_pool1d(x, self.stride + 1, self.stride, "VALID")

  def _residual(self, branch, scale, training):
    if self.droppath > 0.0:
      return self.drop_path(scale(branch), training=training)
    return branch

  def _mlp(self, x, training):
    """LN2 -> fc1 -> GELU -> dropout -> fc2 -> dropout, frame by frame: [..., C] -> [..., C]."""
    hidden = self.mlp_fc1(self.ln2(x, training=training), training=training)  # [..., 4C]
    hidden = self.mlp_dropout1(kernels.gelu(hidden, training, self.kernel_policy),
                               training=training)
    return self.mlp_dropout2(self.mlp_fc2(hidden, training=training), training=training)

  def call(self, x, padding_mask, training=False):
    layers.check_channels(x, self.embed_dim, self.name)
    attn, out_mask = self.attn(self.ln1(x, training=training), layers.as_bool_mask(padding_mask),
                               training=training)
    mask = tf.cast(out_mask, x.dtype)[..., None]  # [B, T', 1]
    scale_attn = self.scale_attn if self.droppath > 0.0 else None
    scale_mlp = self.scale_mlp if self.droppath > 0.0 else None
    out = self._pool_skip(x) * mask + self._residual(attn, scale_attn, training)
    mlp = kernels.per_frame(lambda frames: self._mlp(frames, training), out, out_mask,
                            self.kernel_policy)  # [B, T', C], zero on padded frames
    out = out + self._residual(mlp, scale_mlp, training)
    return out, out_mask

  def get_config(self):
    config = super().get_config()
    config.update({
        "embed_dim": self.embed_dim,
        "num_heads": self.num_heads,
        "window_size": self.window_size,
        "stride": self.stride,
        "dropout": self.dropout,
        "droppath": self.droppath,
        "kernel_policy": self.kernel_policy,
    })
    return config
