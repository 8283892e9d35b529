"""Basic masked layers shared by the backbone, the neck and the heads.

All layers are channels-last: sequences are `[B, T, C]` and masks `[B, T]` (bool or float; true
or 1 on valid frames). Masks are passed explicitly as `padding_mask`, never through Keras' masking.
"""

import keras
import tensorflow as tf

from asl_tf.modeling import kernels


def pytorch_default_kernel_initializer():
  """PyTorch's default Conv1d init (kaiming-uniform, a = sqrt(5)): U(+-1 / sqrt(fan_in))."""
  return keras.initializers.VarianceScaling(1.0 / 3.0, "fan_in", "uniform")


# Masks are converted where the computation forms are chosen (kernels); the layers use the same.
as_bool_mask = kernels.as_bool_mask


def check_channels(x, expected, layer_name):
  """Raises a ValueError when the static channel count of `x` [..., C] is not `expected`."""
  channels = x.shape[-1]
  if channels is not None and channels != expected:
    raise ValueError(f"{layer_name} expects inputs with {expected} channels (last axis of "
                     f"[B, T, C]) but got shape {tuple(x.shape)}; check the input dimension "
                     "(e.g. --input_dim) or pass channels-last [B, T, C] features")


@keras.saving.register_keras_serializable(package="asl_tf")
class MaskedConv1D(keras.layers.Layer):
  """1D convolution with PyTorch padding semantics, followed by masking.

  The input is zero-padded by `kernel_size // 2` on both sides and convolved with 'valid'
  padding, so output frame i is centred on input frame `i * strides` (unlike Keras 'same', which
  pads asymmetrically for even totals and shifts strided outputs). The output mask is
  `padding_mask[:, ::strides]` and the output is multiplied by it.

  Inputs: `x` [B, T, Cin], `padding_mask` [B, T] bool or float.
  Outputs: `(y [B, ceil(T / strides), filters], out_mask [B, ceil(T / strides)] bool)`.

  Args:
    filters: output channels.
    kernel_size: odd temporal kernel size.
    strides: temporal stride.
    groups: channel groups (`groups == Cin == filters` is a depthwise convolution).
    use_bias: add a bias.
    kernel_initializer: initializer of the `[kernel_size, Cin // groups, filters]` kernel;
      defaults to PyTorch's Conv1d default.
    bias_initializer: initializer of the `[filters]` bias.
    kernel_policy: how the convolution is computed (`kernels.POLICIES`; same values).
  """

  def __init__(self, filters, kernel_size, strides=1, groups=1, use_bias=True,
               kernel_initializer=None, bias_initializer="zeros", kernel_policy="auto",
               **kwargs):
    super().__init__(**kwargs)
    if kernel_size % 2 != 1:
      raise ValueError(f"MaskedConv1D needs an odd kernel_size, got {kernel_size}")
    if strides < 1:
      raise ValueError(f"MaskedConv1D needs strides >= 1, got {strides}")
    if filters % groups:
      raise ValueError(f"MaskedConv1D: filters={filters} is not divisible by groups={groups}")
    self.filters = filters
    self.kernel_size = kernel_size
    self.strides = strides
    self.groups = groups
    self.use_bias = use_bias
    self.kernel_initializer = keras.initializers.get(
        kernel_initializer or pytorch_default_kernel_initializer())
    self.bias_initializer = keras.initializers.get(bias_initializer)
    self.kernel_policy = kernels.check_policy(kernel_policy)

  def build(self, input_shape):
    in_channels = input_shape[-1]
    if in_channels is None:
      raise ValueError("MaskedConv1D needs a known channel count (last axis of [B, T, C])")
    if in_channels % self.groups:
      raise ValueError(f"MaskedConv1D: input channels {in_channels} are not divisible by "
                       f"groups={self.groups}")
    self.in_channels = in_channels
    self.kernel = self.add_weight(
        name="kernel", shape=(self.kernel_size, in_channels // self.groups, self.filters),
        initializer=self.kernel_initializer)
    if self.use_bias:
      self.bias = self.add_weight(name="bias", shape=(self.filters,),
                                  initializer=self.bias_initializer)

  def call(self, x, padding_mask):
    check_channels(x, self.in_channels, self.name)
    mask = as_bool_mask(padding_mask)
    out_mask = mask[:, ::self.strides]  # [B, ceil(T / s)]
    y = kernels.conv1d(x, tf.cast(self.kernel, x.dtype), self.strides, self.groups,
                       self.kernel_policy)  # [B, ceil(T / s), filters]
    if self.use_bias:
      y = y + tf.cast(self.bias, y.dtype)
    y = y * tf.cast(out_mask, y.dtype)[..., None]
    return y, out_mask

  def get_config(self):
    config = super().get_config()
    config.update({
        "filters": self.filters,
        "kernel_size": self.kernel_size,
        "strides": self.strides,
        "groups": self.groups,
        "use_bias": self.use_bias,
        "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
        "bias_initializer": keras.initializers.serialize(self.bias_initializer),
        "kernel_policy": self.kernel_policy,
    })
    return config


@keras.saving.register_keras_serializable(package="asl_tf")
class Pointwise(keras.layers.Dense):
  """ActionFormer's 1x1 Conv1d: Keras' Dense (the same weights, `kernel` [Cin, units] and
  `bias`) computed by `kernels.dense` (outside a float32 training step under `fast`, Dense's own
  ops). The kernel starts as PyTorch's Conv1d default, U(+-1 / sqrt(fan_in)), the
  bias at zero (ActionFormer's init).

  Inputs: `x` [..., Cin]. Outputs: [..., units].

  Args:
    units: output channels.
    kernel_policy: how the projection is computed (`kernels.POLICIES`; same values).
    **kwargs: Keras Dense's other arguments (the initializers default to the above).
  """

  def __init__(self, units, kernel_policy="auto", **kwargs):
    kwargs.setdefault("kernel_initializer", pytorch_default_kernel_initializer())
    kwargs.setdefault("bias_initializer", "zeros")
    super().__init__(units, **kwargs)
    if not self.use_bias:
      raise ValueError(f"Pointwise {self.name} needs use_bias=True (ActionFormer's 1x1 Conv1d)")
    self.kernel_policy = kernels.check_policy(kernel_policy)

  def call(self, x, training=False):
    y = kernels.dense(x, self.kernel, self.bias, training, self.kernel_policy)
    return self.activation(y)

  def get_config(self):
    config = super().get_config()
    config.update({"kernel_policy": self.kernel_policy})
    return config


@keras.saving.register_keras_serializable(package="asl_tf")
class ChannelLayerNorm(keras.layers.Layer):
  """LayerNorm over channels (ActionFormer's LayerNorm): biased variance, affine gamma / beta.

  Statistics are computed in float32 (also under mixed precision).

  Inputs: `x` [B, T, C]. Outputs: [B, T, C].

  Args:
    epsilon: added to the variance.
    kernel_policy: how the normalization is computed (`kernels.POLICIES`; same values).
  """

  def __init__(self, epsilon=1e-5, kernel_policy="auto", **kwargs):
    super().__init__(**kwargs)
    self.epsilon = epsilon
    self.kernel_policy = kernels.check_policy(kernel_policy)

  def build(self, input_shape):
    channels = input_shape[-1]
    self.gamma = self.add_weight(name="gamma", shape=(channels,), initializer="ones")
    self.beta = self.add_weight(name="beta", shape=(channels,), initializer="zeros")

  def call(self, x, training=False):
    y = kernels.layer_norm(x, self.gamma, self.beta, self.epsilon, training=training,
                           policy=self.kernel_policy)
    return tf.cast(y, x.dtype)

  def get_config(self):
    config = super().get_config()
    config.update({"epsilon": self.epsilon, "kernel_policy": self.kernel_policy})
    return config


@keras.saving.register_keras_serializable(package="asl_tf")
class Scale(keras.layers.Layer):
  """Multiplies the input by one learnable scalar.

  Inputs: any tensor. Outputs: the same shape.

  Args:
    init_value: initial value of the scalar.
  """

  def __init__(self, init_value=1.0, **kwargs):
    super().__init__(**kwargs)
    self.init_value = init_value

  def build(self, input_shape):
    self.scale = self.add_weight(name="scale", shape=(),
                                 initializer=keras.initializers.Constant(self.init_value))

  def call(self, x):
    return x * tf.cast(self.scale, x.dtype)

  def get_config(self):
    config = super().get_config()
    config.update({"init_value": self.init_value})
    return config


@keras.saving.register_keras_serializable(package="asl_tf")
class LayerScale(keras.layers.Layer):
  """Per-channel learnable scale (the affine part of ActionFormer's AffineDropPath).

  Inputs: `x` [B, T, dim]. Outputs: [B, T, dim].

  Args:
    dim: channels.
    init_value: initial value of every channel's scale.
  """

  def __init__(self, dim, init_value=1e-4, **kwargs):
    super().__init__(**kwargs)
    self.dim = dim
    self.init_value = init_value

  def build(self, input_shape):
    self.scale = self.add_weight(name="scale", shape=(self.dim,),
                                 initializer=keras.initializers.Constant(self.init_value))

  def call(self, x):
    check_channels(x, self.dim, self.name)
    return x * tf.cast(self.scale, x.dtype)

  def get_config(self):
    config = super().get_config()
    config.update({"dim": self.dim, "init_value": self.init_value})
    return config


@keras.saving.register_keras_serializable(package="asl_tf")
class DropPath(keras.layers.Layer):
  """Per-sample stochastic depth: zeroes whole samples with probability `rate` when training and
  rescales the kept ones by 1 / (1 - rate). Identity at inference.

  Inputs: `x` [B, ...]. Outputs: the same shape.

  Args:
    rate: drop probability in [0, 1).
  """

  def __init__(self, rate, **kwargs):
    super().__init__(**kwargs)
    if not 0.0 <= rate < 1.0:
      raise ValueError(f"DropPath rate must be in [0, 1), got {rate}")
    self.rate = rate
    self.seed_generator = keras.random.SeedGenerator()

  def call(self, x, training=False):
    if not training or self.rate == 0.0:
      return x
    keep = 1.0 - self.rate
    shape = [tf.shape(x)[0]] + [1] * (len(x.shape) - 1)  # [B, 1, ..., 1]
    noise = keras.random.uniform(shape, dtype=x.dtype, seed=self.seed_generator)
    return x * tf.floor(keep + noise) / tf.cast(keep, x.dtype)

  def get_config(self):
    config = super().get_config()
    config.update({"rate": self.rate})
    return config
