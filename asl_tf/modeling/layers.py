"""Basic masked layers shared by the backbone, the neck and the heads.

All layers are channels-last: sequences are `[B, T, C]` and masks `[B, T]` (bool or float; true
or 1 on valid frames). Masks are passed explicitly as `padding_mask`, never through Keras' masking.
"""

import contextlib
import functools
import threading

import keras
import tensorflow as tf

from asl_tf.modeling import winograd

# Dense kernel-3 convolutions at least this wide (in and out) use Winograd F(4, 3); dense
# stride-1 convolutions with fewer output channels run as one GEMM over the taps.
WINOGRAD_MIN_CHANNELS = 64


_tracing = threading.local()  # .portable_depth > 0 inside `portable_graphs()` (this thread)


@contextlib.contextmanager
def portable_graphs():
  """Graphs traced inside (in this thread) use no computation that is only fast with oneDNN.

  For SavedModels: a server may run without oneDNN (TensorFlow turns it on by default only on
  AVX-512 / AMX CPUs), where the inference LayerNorm of `ChannelLayerNorm` would be 3x slower.
  A `tf.function` traced before keeps its graph: enter this before the first trace.
  """
  _tracing.portable_depth = _portable_depth() + 1
  try:
    yield
  finally:
    _tracing.portable_depth -= 1


def _portable_depth():
  return getattr(_tracing, "portable_depth", 0)


@functools.cache
def onednn_enabled():
  """Whether TensorFlow's oneDNN CPU kernels are on in this process."""
  try:
    from tensorflow.python.util import _pywrap_util_port  # pylint: disable=g-import-not-at-top
  except ImportError:
    return False
  return bool(_pywrap_util_port.IsMklEnabled())


def pytorch_default_kernel_initializer():
  """PyTorch's default Conv1d init (kaiming-uniform, a = sqrt(5)): U(+-1 / sqrt(fan_in))."""
  return keras.initializers.VarianceScaling(1.0 / 3.0, "fan_in", "uniform")


def as_bool_mask(padding_mask):
  """Returns `padding_mask` (bool, or numeric where nonzero = valid) as a bool tensor."""
  padding_mask = tf.convert_to_tensor(padding_mask)
  if padding_mask.dtype == tf.bool:
    return padding_mask
  return tf.not_equal(padding_mask, tf.zeros([], padding_mask.dtype))


def apply_to_valid_frames(fn, x, padding_mask):
  """Applies a per-frame computation to the valid frames of a padded batch only.

  The valid frames of `x` are gathered into rows `[N, C]` (N = valid frames), `fn` runs on them,
  and its rows are scattered back with zeros on padded frames: the same valid frames, gradients
  included, as `fn(x) * mask` at N / (B * T) of the cost. When no frame is padded `fn` runs on
  all frames as rows (a reshape, no gather or scatter). `fn` always sees rank-2 rows, on which
  oneDNN fuses MatMul + bias (+ GELU at inference).

  Args:
    fn: maps rows [M, C] to [M, C'] frame by frame (e.g. LayerNorm + MLP).
    x: [B, T, C].
    padding_mask: [B, T] bool or float.

  Returns:
    [B, T, C'], zero on padded frames.
  """
  mask = as_bool_mask(padding_mask)

  def valid_rows_only():
    indices = tf.cast(tf.where(mask), tf.int32)  # [N, 2]: (batch, frame); int32 for XLA
    rows = fn(tf.gather_nd(x, indices))  # [N, C']
    return tf.scatter_nd(indices, rows, tf.concat([tf.shape(mask), [rows.shape[-1]]], axis=0))

  return tf.cond(tf.reduce_all(mask), lambda: _apply_to_rows(fn, x), valid_rows_only)


def _apply_to_rows(fn, x):
  """`fn` on the frames of `x` [B, T, C] as rows [B * T, C]; returns [B, T, C'].

  Keras Dense on [B, T, C] is a Tensordot; on rows it is one MatMul that oneDNN fuses with the
  bias add and, at inference, a following GELU (the transformer MLP). The attention projections
  stay on [B, T, C]: on rows the training step was slower.
  """
  rows = fn(tf.reshape(x, [-1, x.shape[-1]]))  # [B * T, C']
  return tf.reshape(rows, tf.concat([tf.shape(x)[:-1], [rows.shape[-1]]], axis=0))


def conv1d_as_tap_gemm(x, kernel):
  """Stride-1 convolution with `k // 2` zero frames of padding on each side, as one GEMM.

  `x` times all k taps at once ([B * T, Cin] x [Cin, k * Cout]), then the k output blocks are
  added with their frame shifts. Equals `tf.nn.conv1d` of the padded input (a cross-correlation)
  up to float32 rounding. For narrow outputs (the heads' class / offset convolutions) this is
  2-7x faster than the direct convolution on CPU, forward and backward, since oneDNN's
  convolution kernels are slow when Cout is small.

  Args:
    x: [B, T, Cin] (static Cin).
    kernel: [k, Cin, Cout], k odd.

  Returns:
    [B, T, Cout].
  """
  taps, in_channels, out_channels = kernel.shape
  pad = taps // 2
  batch, length = tf.shape(x)[0], tf.shape(x)[1]
  w = tf.reshape(tf.transpose(kernel, [1, 0, 2]), [in_channels, taps * out_channels])
  y = tf.matmul(tf.reshape(x, [-1, in_channels]), w)  # [B * T, k * Cout]: x[s] W_j
  y = tf.reshape(tf.cast(y, tf.float32), [batch, length, taps * out_channels])  # f32 sums
  y = tf.pad(y, [[0, 0], [pad, pad], [0, 0]])  # frame t + j holds x[t + j - pad] W_j
  y = tf.add_n([y[:, j:j + length, j * out_channels:(j + 1) * out_channels]
                for j in range(taps)])
  y.set_shape(x.shape[:-1].concatenate([out_channels]))  # the slices lose the static shape
  return tf.cast(y, x.dtype)


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
  `padding_mask[:, ::strides]` and the output is multiplied by it. Dense, stride-1, kernel-3
  float32 convolutions of >= `WINOGRAD_MIN_CHANNELS` channels run as Winograd F(4, 3) (same
  result up to float32 rounding, half the GEMM work; see `winograd.py`); dense stride-1 ones with
  fewer output channels as one GEMM over the taps (`conv1d_as_tap_gemm`).

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
  """

  def __init__(self, filters, kernel_size, strides=1, groups=1, use_bias=True,
               kernel_initializer=None, bias_initializer="zeros", **kwargs):
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
    kernel = tf.cast(self.kernel, x.dtype)
    if self._use_winograd(x.dtype):
      y = winograd.conv1d_k3(x, kernel)
    elif self._use_tap_gemm():
      y = conv1d_as_tap_gemm(x, kernel)
    else:
      pad = self.kernel_size // 2
      x = tf.pad(x, [[0, 0], [pad, pad], [0, 0]])
      if self.groups == 1:
        y = tf.nn.conv1d(x, kernel, stride=self.strides, padding="VALID")
      elif self.groups == self.in_channels and self.filters == self.in_channels:
        # Depthwise: kernel [k, 1, C] -> [1, k, C, 1]; input [B, 1, T, C] (a dummy height axis,
        # which a height stride leaves at 1: TF needs equal row and column strides).
        y = tf.nn.depthwise_conv2d(x[:, None], tf.transpose(kernel, [0, 2, 1])[None],
                                   strides=[1, self.strides, self.strides, 1], padding="VALID")
        y = y[:, 0]  # [B, T_out, C]
      else:
        xs = tf.split(x, self.groups, axis=-1)
        ks = tf.split(kernel, self.groups, axis=-1)
        y = tf.concat([tf.nn.conv1d(xg, kg, stride=self.strides, padding="VALID")
                       for xg, kg in zip(xs, ks)], axis=-1)
    if self.use_bias:
      y = y + tf.cast(self.bias, y.dtype)
    y = y * tf.cast(out_mask, y.dtype)[..., None]
    return y, out_mask

  def _use_winograd(self, dtype):
    """F(4, 3) for dense, stride-1, kernel-3 float32 convolutions of >= 64 channels each way.

    Narrower ones (the heads' output convolutions) gain less GEMM time than the transforms cost;
    float16 / bfloat16 keep the direct convolution (the transforms' constants up to 8 cost
    precision there).
    """
    return (self.kernel_size == 3 and self.strides == 1 and self.groups == 1 and dtype == tf.float32
            and min(self.in_channels, self.filters) >= WINOGRAD_MIN_CHANNELS)

  def _use_tap_gemm(self):
    """One GEMM over the taps for dense stride-1 convolutions with < 64 output channels."""
    return self.strides == 1 and self.groups == 1 and self.filters < WINOGRAD_MIN_CHANNELS

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
    })
    return config


@keras.saving.register_keras_serializable(package="asl_tf")
class ChannelLayerNorm(keras.layers.Layer):
  """LayerNorm over channels (ActionFormer's LayerNorm): biased variance, affine gamma / beta.

  Statistics are computed in float32 (also under mixed precision). At inference in a graph with
  a dynamic batch or length and oneDNN on (outside `portable_graphs()`), the normalization is
  written as a training-mode FusedBatchNorm over rows, the form Grappler's oneDNN remapper fuses
  into one `_MklLayerNorm` kernel: one pass instead of six element-wise ops (same values up to
  float32 rounding; unfused, or without oneDNN, that form is slower, hence the conditions).
  Training keeps the element-wise form.

  Inputs: `x` [B, T, C]. Outputs: [B, T, C].

  Args:
    epsilon: added to the variance.
  """

  def __init__(self, epsilon=1e-5, **kwargs):
    super().__init__(**kwargs)
    self.epsilon = epsilon

  def build(self, input_shape):
    channels = input_shape[-1]
    self.gamma = self.add_weight(name="gamma", shape=(channels,), initializer="ones")
    self.beta = self.add_weight(name="beta", shape=(channels,), initializer="zeros")

  def call(self, x, training=False):
    x32 = tf.cast(x, tf.float32)
    if training or not _fusable_layer_norm(x32):
      mean = tf.reduce_mean(x32, axis=-1, keepdims=True)
      centred = x32 - mean
      var = tf.reduce_mean(tf.square(centred), axis=-1, keepdims=True)
      y = tf.multiply(centred, tf.math.rsqrt(var + self.epsilon), name="a_normalized")
    else:
      y = _normalize_as_batch_norm(x32, self.epsilon, name="a_normalized")
    # The remapper's pattern is AddV2(beta, Mul(Reshape(FusedBatchNorm), gamma)) with inputs in
    # this order; Grappler sorts the inputs of commutative ops by name, hence the names.
    with tf.name_scope("b_beta"):
      beta = tf.cast(self.beta, tf.float32)
    with tf.name_scope("c_gamma"):
      gamma = tf.cast(self.gamma, tf.float32)
    y = tf.add(beta, tf.multiply(y, gamma, name="d_scaled"), name="e_shifted")
    return tf.cast(y, x.dtype)

  def get_config(self):
    config = super().get_config()
    config.update({"epsilon": self.epsilon})
    return config


def _fusable_layer_norm(x):
  """Whether the inference LayerNorm of `x` [..., C] takes the form oneDNN fuses.

  Only in graphs (eager ops are not rewritten) with a dynamic batch or length (with static ones,
  constant folding turns the pattern's Fill ops into constants and nothing is fused), with
  oneDNN on, outside `portable_graphs()`.
  """
  return (onednn_enabled() and not _portable_depth() and not tf.executing_eagerly()
          and not x.shape[:-1].is_fully_defined())


def _normalize_as_batch_norm(x, epsilon, name):
  """(x - mean) / sqrt(var + eps) over the last axis, as Keras 2's fused LayerNorm wrote it.

  Each row of `x` [..., C] becomes one channel of an NCHW batch [1, rows, C, 1], normalized by a
  training-mode FusedBatchNorm with unit scale and zero offset (filled at run time).
  """
  shape = tf.shape(x)
  rows = tf.reduce_prod(shape[:-1])
  channels = x.shape[-1] if x.shape[-1] is not None else shape[-1]
  y = tf.reshape(x, [1, rows, channels, 1])
  y, _, _ = tf.compat.v1.nn.fused_batch_norm(y, tf.fill([rows], 1.0), tf.fill([rows], 0.0),
                                             epsilon=epsilon, data_format="NCHW")
  return tf.reshape(y, shape, name=name)


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
