"""ActionFormer's classification and regression heads, shared across pyramid levels."""

import math

import keras
import tensorflow as tf

from asl_tf.modeling import kernels
from asl_tf.modeling import layers

EMPTY_CLASS_PRIOR = 1e-6


def prior_bias(prior_prob):
  """Bias whose sigmoid is `prior_prob`: -log((1 - p) / p)."""
  return -math.log((1.0 - prior_prob) / prior_prob)


class ConvHead(keras.layers.Layer):
  """(num_layers - 1) x [MaskedConv1D -> LayerNorm -> ReLU] -> MaskedConv1D, shared over levels.

  The base of the classification and regression heads and of ASL's instance evaluator;
  subclasses call `_levels`.
  """

  def __init__(self, out_channels, head_dim, num_layers, kernel_size, with_ln,
               output_bias_initializer, kernel_policy="auto", **kwargs):
    super().__init__(**kwargs)
    if num_layers < 1:
      raise ValueError(f"head_num_layers must be >= 1 (hidden layers + output), got {num_layers}")
    self.kernel_policy = kernel_policy
    dtype = self.dtype_policy
    self.hidden = [layers.MaskedConv1D(head_dim, kernel_size, use_bias=not with_ln,
                                       kernel_policy=kernel_policy, name=f"conv_{i}",
                                       dtype=dtype)
                   for i in range(num_layers - 1)]
    self.norms = [layers.ChannelLayerNorm(kernel_policy=kernel_policy, name=f"norm_{i}",
                                          dtype=dtype)
                  for i in range(num_layers - 1)] if with_ln else []
    self.output_conv = layers.MaskedConv1D(out_channels, kernel_size,
                                           bias_initializer=output_bias_initializer,
                                           kernel_policy=kernel_policy, name="output_conv",
                                           dtype=dtype)

  def build(self, input_shape):
    shape = tuple(input_shape[0])
    for i, conv in enumerate(self.hidden):
      conv.build(shape)
      shape = shape[:-1] + (conv.filters,)
      if self.norms:
        self.norms[i].build(shape)
    self.output_conv.build(shape)

  def _stack(self, x, mask, keep, training=False):
    """The conv stack on one sequence: [B, T, C] -> [B, T, out_channels].

    `keep` [1, T, 1] (or None) multiplies the LayerNorm outputs (see `kernels.over_levels`).
    """
    for i, conv in enumerate(self.hidden):
      x, _ = conv(x, mask)
      if self.norms:
        x = self.norms[i](x, training=training)
        if keep is not None:
          x = x * keep
      x = tf.nn.relu(x)
    y, _ = self.output_conv(x, mask)
    return y

  def _levels(self, xs, masks, training=False):
    """The stack on every level: list of [B, T_l, C] -> list of [B, T_l, out_channels]."""
    masks = [layers.as_bool_mask(m) for m in masks]
    return kernels.over_levels(lambda x, m, keep: self._stack(x, m, keep, training), xs, masks,
                               self.output_conv.kernel_size // 2, self.kernel_policy)


@keras.saving.register_keras_serializable(package="asl_tf")
class ClassificationHead(ConvHead):
  """Per-level class logits; the output bias starts at the prior -log((1 - p) / p).

  Inputs: `level_features` list of [B, T_l, C], `level_masks` list of [B, T_l]; `training` picks
  the LayerNorms' training form (the same values).
  Outputs: list of float32 logits [B, T_l, num_classes] (zero on padded frames).

  Args:
    num_classes: K.
    head_dim: hidden channels.
    num_layers: hidden layers + 1 (ActionFormer `head_num_layers`).
    kernel_size: temporal kernel of every conv.
    with_ln: LayerNorm after hidden convs (their bias is then off).
    prior_prob: initial foreground probability p of every class.
    empty_classes: class ids without training data; their bias starts at p = 1e-6.
    kernel_policy: `kernels.POLICIES` entry of the convolutions, LayerNorms and level joining.
  """

  def __init__(self, num_classes, head_dim, num_layers=3, kernel_size=3, with_ln=True,
               prior_prob=0.01, empty_classes=(), kernel_policy="auto", **kwargs):
    bad = [c for c in empty_classes if not 0 <= c < num_classes]
    if bad:
      raise ValueError(f"head_empty_cls {bad} are not class ids in [0, {num_classes})")
    if not 0.0 < prior_prob < 1.0:
      raise ValueError(f"cls_prior_prob must be in (0, 1), got {prior_prob}")
    bias = [prior_bias(prior_prob)] * num_classes
    for c in empty_classes:
      bias[c] = prior_bias(EMPTY_CLASS_PRIOR)
    super().__init__(num_classes, head_dim, num_layers, kernel_size, with_ln,
                     keras.initializers.Constant(bias), kernel_policy=kernel_policy, **kwargs)
    self.num_classes = num_classes
    self.head_dim = head_dim
    self.num_layers = num_layers
    self.kernel_size = kernel_size
    self.with_ln = with_ln
    self.prior_prob = prior_prob
    self.empty_classes = tuple(empty_classes)

  def call(self, level_features, level_masks, training=False):
    return [tf.cast(y, tf.float32)
            for y in self._levels(level_features, level_masks, training=training)]

  def get_config(self):
    config = super().get_config()
    config.update({
        "num_classes": self.num_classes,
        "head_dim": self.head_dim,
        "num_layers": self.num_layers,
        "kernel_size": self.kernel_size,
        "with_ln": self.with_ln,
        "prior_prob": self.prior_prob,
        "empty_classes": list(self.empty_classes),
        "kernel_policy": self.kernel_policy,
    })
    return config


@keras.saving.register_keras_serializable(package="asl_tf")
class RegressionHead(ConvHead):
  """Per-level (left, right) distances in units of the level stride: conv, Scale_l, ReLU.

  Inputs: `level_features` list of [B, T_l, C], `level_masks` list of [B, T_l]; `training` picks
  the LayerNorms' training form (the same values).
  Outputs: list of float32 offsets [B, T_l, 2] (>= 0, zero on padded frames).

  Args:
    num_levels: pyramid levels (one learnable Scale each).
    head_dim: hidden channels.
    num_layers: hidden layers + 1.
    kernel_size: temporal kernel of every conv.
    with_ln: LayerNorm after hidden convs.
    kernel_policy: `kernels.POLICIES` entry of the convolutions, LayerNorms and level joining.
  """

  def __init__(self, num_levels, head_dim, num_layers=3, kernel_size=3, with_ln=True,
               kernel_policy="auto", **kwargs):
    super().__init__(2, head_dim, num_layers, kernel_size, with_ln, "zeros",
                     kernel_policy=kernel_policy, **kwargs)
    self.num_levels = num_levels
    self.head_dim = head_dim
    self.num_layers = num_layers
    self.kernel_size = kernel_size
    self.with_ln = with_ln
    self.scales = [layers.Scale(name=f"scale_{l}", dtype=self.dtype_policy)
                   for l in range(num_levels)]

  def build(self, input_shape):
    super().build(input_shape)
    for scale in self.scales:
      scale.build(None)

  def call(self, level_features, level_masks, training=False):
    if len(level_features) != self.num_levels:
      raise ValueError(f"RegressionHead has {self.num_levels} level scales but got "
                       f"{len(level_features)} levels")
    return [tf.cast(tf.nn.relu(scale(y)), tf.float32)
            for scale, y in zip(self.scales,
                                self._levels(level_features, level_masks, training=training))]

  def get_config(self):
    config = super().get_config()
    config.update({
        "num_levels": self.num_levels,
        "head_dim": self.head_dim,
        "num_layers": self.num_layers,
        "kernel_size": self.kernel_size,
        "with_ln": self.with_ln,
        "kernel_policy": self.kernel_policy,
    })
    return config
