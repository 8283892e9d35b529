"""ActionFormer's ConvTransformer backbone: embedding convs, stem and downsampling branch."""

import keras
import numpy as np
import tensorflow as tf

from asl_tf.modeling import attention
from asl_tf.modeling import layers


def sinusoid_table(length, dim):
  """ActionFormer's sinusoidal position table scaled by 1 / sqrt(dim).

  Returns:
    float32 numpy [length, dim]: sin on even channels, cos on odd channels.
  """
  position = np.arange(length, dtype=np.float64)[:, None]
  rate = np.power(10000.0, 2 * (np.arange(dim) // 2) / dim)[None]
  angle = position / rate  # [length, dim]
  table = np.where(np.arange(dim)[None] % 2 == 0, np.sin(angle), np.cos(angle))
  return (table / np.sqrt(dim)).astype(np.float32)


def resize_linear(table, length):
  """Linear interpolation along axis 0 to `length` rows (PyTorch `align_corners=False`).

  Args:
    table: [L, C].
    length: output rows (int or scalar int tensor).

  Returns:
    [length, C].
  """
  in_len = tf.shape(table)[0]
  scale = tf.cast(in_len, tf.float32) / tf.cast(length, tf.float32)
  src = (tf.cast(tf.range(length), tf.float32) + 0.5) * scale - 0.5
  src = tf.maximum(src, 0.0)
  lo = tf.minimum(tf.cast(tf.floor(src), tf.int32), in_len - 1)
  hi = tf.minimum(lo + 1, in_len - 1)
  frac = (src - tf.cast(lo, tf.float32))[:, None]
  return tf.gather(table, lo) * (1.0 - frac) + tf.gather(table, hi) * frac


@keras.saving.register_keras_serializable(package="asl_tf")
class ConvTransformerBackbone(keras.layers.Layer):
  """Embedding convs + stem transformer blocks + stride-2 branch blocks -> feature pyramid.

  The input is first multiplied by the mask (ActionFormer pads with zeros; this makes padded
  input content irrelevant). Then: optional per-stream 1x1 projections (Ego4D), arch[0] x
  [MaskedConv1D(k) -> LayerNorm -> ReLU], optional sinusoidal position encoding (linearly
  interpolated when T > max_seq_len), arch[1] stem blocks (level 0) and arch[2] blocks with
  stride `scale_factor` (one level each).

  Inputs: `x` [B, T, input_dim], `padding_mask` [B, T] bool or float.
  Outputs: `(features, masks)`: lists over the arch[2] + 1 levels of [B, T_l, embd_dim] and
  [B, T_l] bool, T_l = ceil(T / scale_factor^l).

  Args:
    input_dim: input channels (sum of stream_dims when several streams).
    embd_dim: embedding / transformer channels.
    num_heads: attention heads.
    embd_kernel_size: kernel size of the embedding convs.
    max_seq_len: training length (position-encoding table length).
    arch: (embedding convs, stem blocks, branch blocks).
    mha_win_size: window per level (arch[2] + 1 entries); <= 1 = global attention.
    scale_factor: downsampling stride between levels.
    embd_with_ln: LayerNorm after embedding convs (their bias is then off).
    dropout: attention projection and MLP dropout.
    droppath: stochastic depth rate.
    use_abs_pe: add the absolute position encoding.
    stream_dims: per-stream input channels (empty = one stream).
    stream_proj_dims: per-stream projected channels.
    kernel_policy: `kernels.POLICIES` entry of every convolution, LayerNorm and MLP.
  """

  def __init__(self, input_dim, embd_dim, num_heads, embd_kernel_size=3, max_seq_len=2304,
               arch=(2, 2, 5), mha_win_size=(19,) * 6, scale_factor=2, embd_with_ln=True,
               dropout=0.0, droppath=0.0, use_abs_pe=False, stream_dims=(), stream_proj_dims=(),
               kernel_policy="auto", **kwargs):
    super().__init__(**kwargs)
    arch = tuple(int(a) for a in arch)
    mha_win_size = tuple(int(w) for w in mha_win_size)
    stream_dims = tuple(int(d) for d in stream_dims)
    stream_proj_dims = tuple(int(d) for d in stream_proj_dims)
    if len(arch) != 3 or min(arch) < 0:
      raise ValueError(f"backbone arch {arch} must be three non-negative integers "
                       "(embedding convs, stem blocks, branch blocks)")
    if len(mha_win_size) != arch[2] + 1:
      raise ValueError(f"mha_win_size has {len(mha_win_size)} entries but the backbone has "
                       f"{arch[2] + 1} levels (arch[2] + 1); give one window per level")
    if embd_dim % num_heads:
      raise ValueError(f"embd_dim={embd_dim} is not divisible by n_head={num_heads}")
    if scale_factor != 1 and scale_factor % 2:
      raise ValueError(f"scale_factor must be 1 or even, got {scale_factor}")
    if stream_dims or stream_proj_dims:
      if len(stream_dims) != len(stream_proj_dims):
        raise ValueError(f"stream_dims {stream_dims} and stream_proj_dims {stream_proj_dims} "
                         "need the same number of entries")
      if sum(stream_dims) != input_dim:
        raise ValueError(f"stream_dims {stream_dims} sum to {sum(stream_dims)} but input_dim is "
                         f"{input_dim}")
    if arch[0] == 0 and (sum(stream_proj_dims) if stream_dims else input_dim) != embd_dim:
      raise ValueError("with no embedding convs (arch[0] = 0) the input channels must equal "
                       f"embd_dim={embd_dim}")
    self.input_dim = input_dim
    self.embd_dim = embd_dim
    self.num_heads = num_heads
    self.embd_kernel_size = embd_kernel_size
    self.max_seq_len = max_seq_len
    self.arch = arch
    self.mha_win_size = mha_win_size
    self.scale_factor = scale_factor
    self.embd_with_ln = embd_with_ln
    self.dropout = dropout
    self.droppath = droppath
    self.use_abs_pe = use_abs_pe
    self.stream_dims = stream_dims
    self.stream_proj_dims = stream_proj_dims
    self.kernel_policy = kernel_policy
    dtype = self.dtype_policy
    policy = kernel_policy
    self.stream_proj = [layers.MaskedConv1D(d, 1, kernel_policy=policy, name=f"stream_proj_{i}",
                                            dtype=dtype)
                        for i, d in enumerate(stream_proj_dims)]
    self.embd = [layers.MaskedConv1D(embd_dim, embd_kernel_size, use_bias=not embd_with_ln,
                                     kernel_policy=policy, name=f"embd_{i}", dtype=dtype)
                 for i in range(arch[0])]
    self.embd_norm = [layers.ChannelLayerNorm(kernel_policy=policy, name=f"embd_norm_{i}",
                                              dtype=dtype)
                      for i in range(arch[0])] if embd_with_ln else []
    self.stem = [attention.TransformerBlock(embd_dim, num_heads, mha_win_size[0], stride=1,
                                            dropout=dropout, droppath=droppath,
                                            kernel_policy=policy, name=f"stem_{i}", dtype=dtype)
                 for i in range(arch[1])]
    self.branch = [attention.TransformerBlock(embd_dim, num_heads, mha_win_size[1 + i],
                                              stride=scale_factor, dropout=dropout,
                                              droppath=droppath, kernel_policy=policy,
                                              name=f"branch_{i}", dtype=dtype)
                   for i in range(arch[2])]
    if use_abs_pe:
      self.pos_table = tf.constant(sinusoid_table(max_seq_len, embd_dim))

  @property
  def num_levels(self):
    return self.arch[2] + 1

  def build(self, input_shape):
    shape = tuple(input_shape)
    if shape[-1] is not None and shape[-1] != self.input_dim:
      raise ValueError(f"ConvTransformerBackbone expects {self.input_dim} input channels but got "
                       f"shape {shape}; set --input_dim to the feature dimension")
    if self.stream_proj:
      for conv, d in zip(self.stream_proj, self.stream_dims):
        conv.build(shape[:-1] + (d,))
      shape = shape[:-1] + (sum(self.stream_proj_dims),)
    for i, conv in enumerate(self.embd):
      conv.build(shape)
      shape = shape[:-1] + (self.embd_dim,)
      if self.embd_norm:
        self.embd_norm[i].build(shape)
    for block in self.stem + self.branch:
      block.build(shape)

  def _position_encoding(self, length, dtype):
    table = tf.cond(length > self.max_seq_len,
                    lambda: resize_linear(self.pos_table, length),
                    lambda: self.pos_table[:length])  # [T, C]
    return tf.cast(table, dtype)

  def call(self, x, padding_mask, training=False):
    layers.check_channels(x, self.input_dim, self.name)
    mask = layers.as_bool_mask(padding_mask)
    x = x * tf.cast(mask, x.dtype)[..., None]
    if self.stream_proj:
      streams = tf.split(x, list(self.stream_dims), axis=-1)
      x = tf.concat([conv(s, mask)[0] for conv, s in zip(self.stream_proj, streams)], axis=-1)
    for i, conv in enumerate(self.embd):
      x, mask = conv(x, mask)
      if self.embd_norm:
        x = self.embd_norm[i](x)
      x = tf.nn.relu(x)
    if self.use_abs_pe:
      pe = self._position_encoding(tf.shape(x)[1], x.dtype)
      x = x + pe[None] * tf.cast(mask, x.dtype)[..., None]
    for block in self.stem:
      x, mask = block(x, mask, training=training)
    features, masks = [x], [mask]
    for block in self.branch:
      x, mask = block(x, mask, training=training)
      features.append(x)
      masks.append(mask)
    return features, masks

  def get_config(self):
    config = super().get_config()
    config.update({
        "input_dim": self.input_dim,
        "embd_dim": self.embd_dim,
        "num_heads": self.num_heads,
        "embd_kernel_size": self.embd_kernel_size,
        "max_seq_len": self.max_seq_len,
        "arch": list(self.arch),
        "mha_win_size": list(self.mha_win_size),
        "scale_factor": self.scale_factor,
        "embd_with_ln": self.embd_with_ln,
        "dropout": self.dropout,
        "droppath": self.droppath,
        "use_abs_pe": self.use_abs_pe,
        "stream_dims": list(self.stream_dims),
        "stream_proj_dims": list(self.stream_proj_dims),
        "kernel_policy": self.kernel_policy,
    })
    return config
