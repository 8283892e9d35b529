"""The one place where computations are chosen for speed: convolution, 1x1 projection,
LayerNorm, GELU, per-frame MLP, the local attention's key blocks and level-shared heads, each
under an explicit kernel policy (which also picks the optimizer's form: the unfused AdamW under
`reference`, else `training.optimizer.FusedAdamW`, the same updates).

Every function returns the same values under every policy (up to float32 rounding; the parity
tests run under each; bfloat16 layers' inference LayerNorm under `fast` returns bfloat16, equal
to the other policies' to bfloat16 rounding, so an export (`portable`) and `fast` evaluation in
bfloat16 differ by that rounding; a float16 / bfloat16 training step's GELU under `fast` /
`portable` is float32's rounded once, under `reference` computed in its own dtype; without
oneDNN, the input gradient of strided bfloat16 depthwise convolutions under `fast` / `portable`
is float32's rounded once, under `reference` summed in bfloat16). Dropout inside `per_frame`
draws its random masks over rows or over the grid, so training with dropout > 0 takes different
random draws under different policies. The layers call these functions and read like
ActionFormer's blocks; what differs between policies lives here only.

Policies (`ModelConfig.kernel_policy`):

* `reference`: the plain form: `tf.nn.conv1d`, element-wise LayerNorm, the MLP on every frame
  of [B, T, C] then masked, each pyramid level through the heads on its own. What cuDNN (GPU)
  and XLA (TPU) run fastest.
* `fast`: forms tuned for TensorFlow's oneDNN CPU kernels (measured in benchmarks/README.md):
  a float32 training step's 1x1 projections (attention, MLP) with their input gradient as an
  einsum;
  dense kernel-3 stride-1 float32 convolutions of >= `WINOGRAD_MIN_CHANNELS` channels as
  Winograd F(4, 3) (`winograd.py`), narrower dense stride-1 ones as one GEMM over the taps,
  wide bfloat16 ones with their kernel gradient as one GEMM over the taps;
  strided bfloat16 depthwise ones with their input gradient in float32;
  the GELU of a float16 / bfloat16 training step in float32;
  the training LayerNorm with its gradient written out;
  the local attention's key-block pairs with their gradient written out;
  the inference LayerNorm (graphs with a dynamic batch or length; float32 or bfloat16) as the
  FusedBatchNorm pattern that oneDNN's remapper turns into one kernel; the MLP on the valid
  frames only, as rows; the head levels joined into one sequence.
* `portable`: `fast` without the LayerNorm pattern, which is 3x slower where oneDNN is off, and
  without the projections' einsum gradient, no faster there. SavedModels are traced with it (a
  server may run without oneDNN).
* `auto`: `reference` when a GPU or TPU is visible, else `fast` with oneDNN on, else `portable`.
"""

import functools

import keras
import tensorflow as tf

from asl_tf import config as config_lib
from asl_tf.modeling import winograd

POLICIES = config_lib.KERNEL_POLICIES
# Under `fast` / `portable`: dense kernel-3 float32 convolutions at least this wide (in and out)
# use Winograd F(4, 3); dense stride-1 convolutions with fewer output channels run as one GEMM
# over the taps.
WINOGRAD_MIN_CHANNELS = 64


def check_policy(policy):
  """Raises a ValueError naming the flag when `policy` is not one of POLICIES."""
  if policy not in POLICIES:
    raise ValueError(f"kernel_policy={policy!r}: use one of {', '.join(POLICIES)} "
                     "(--kernel_policy)")
  return policy


@functools.cache
def onednn_enabled():
  """Whether TensorFlow's oneDNN CPU kernels are on in this process."""
  try:
    from tensorflow.python.util import _pywrap_util_port  # pylint: disable=g-import-not-at-top
  except ImportError:
    return False
  return bool(_pywrap_util_port.IsMklEnabled())


def as_bool_mask(padding_mask):
  """Returns `padding_mask` (bool, or numeric where nonzero = valid) as a bool tensor."""
  padding_mask = tf.convert_to_tensor(padding_mask)
  if padding_mask.dtype == tf.bool:
    return padding_mask
  return tf.not_equal(padding_mask, tf.zeros([], padding_mask.dtype))


@functools.cache
def _accelerator_visible():
  # Cached for the process: devices hidden or TPUs initialised after the first trace are not
  # seen (set --kernel_policy explicitly there).
  return bool(tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("TPU"))


def resolve(policy):
  """`reference`, `fast` or `portable` for `policy` (`auto` looks at this process's devices)."""
  check_policy(policy)
  if policy != "auto":
    return policy
  if _accelerator_visible():
    return "reference"
  return "fast" if onednn_enabled() else "portable"


# -- convolution -----------------------------------------------------------------------------
def conv1d(x, kernel, strides=1, groups=1, policy="reference"):
  """Convolution with PyTorch padding: `k // 2` zero frames on both sides, then 'valid'.

  Output frame i is centred on input frame `i * strides`.

  Args:
    x: [B, T, Cin] (static Cin).
    kernel: [k, Cin // groups, Cout], k odd, in the dtype of `x`.
    strides: temporal stride.
    groups: channel groups (`groups == Cin == Cout` is depthwise).
    policy: a kernel policy.

  Returns:
    [B, ceil(T / strides), Cout].
  """
  taps, group_channels, out_channels = kernel.shape
  in_channels = group_channels * groups
  dense_stride_1 = strides == 1 and groups == 1
  if resolve(policy) != "reference" and dense_stride_1:
    if (taps == 3 and x.dtype == tf.float32
        and min(in_channels, out_channels) >= WINOGRAD_MIN_CHANNELS):
      # float16 / bfloat16 keep the direct form: the transforms' constants cost precision.
      return winograd.conv1d_k3(x, kernel)
    if out_channels < WINOGRAD_MIN_CHANNELS:
      return conv1d_as_tap_gemm(x, kernel)
    if x.dtype == tf.bfloat16:
      return conv1d_with_gemm_filter_grad(x, kernel)
  pad = taps // 2
  x = tf.pad(x, [[0, 0], [pad, pad], [0, 0]])
  if groups == 1:
    return tf.nn.conv1d(x, kernel, stride=strides, padding="VALID")
  if groups == in_channels and out_channels == in_channels:
    if strides > 1 and x.dtype == tf.bfloat16 and resolve(policy) != "reference":
      return strided_depthwise_with_float32_input_grad(x, kernel, strides)
    return _valid_depthwise_conv1d(x, kernel, strides)
  xs = tf.split(x, groups, axis=-1)
  ks = tf.split(kernel, groups, axis=-1)
  return tf.concat([tf.nn.conv1d(xg, kg, stride=strides, padding="VALID")
                    for xg, kg in zip(xs, ks)], axis=-1)


def _as_depthwise_2d(x, kernel):
  """x [B, T, C] -> [B, 1, T, C] (a dummy height axis, which a height stride leaves at 1: TF
  needs equal row and column strides); kernel [k, 1, C] -> [1, k, C, 1]. Reshapes, not
  `x[:, None]`: a slice's gradient is a full copy, a reshape's is free."""
  taps, _, channels = kernel.shape
  return tf.expand_dims(x, 1), tf.reshape(kernel, [1, taps, channels, 1])


def _valid_depthwise_conv1d(x, kernel, strides):
  """Depthwise 'valid' convolution: x [B, T, C], kernel [k, 1, C] -> [B, (T - k) // s + 1, C]."""
  x4, kernel4 = _as_depthwise_2d(x, kernel)
  y = tf.nn.depthwise_conv2d(x4, kernel4, strides=[1, strides, strides, 1], padding="VALID")
  return tf.squeeze(y, 1)


@functools.cache
def _depthwise_with_float32_input_grad(strides):
  """A `tf.custom_gradient` `(x, kernel) -> _valid_depthwise_conv1d(x, kernel, strides)`."""

  @tf.custom_gradient
  def conv(x, kernel):
    def grad(dy):
      # As `_valid_depthwise_conv1d`: x [B, 1, T, C], kernel [1, k, C, 1], dy [B, 1, T', C].
      (x4, kernel4), dy4 = _as_depthwise_2d(x, kernel), tf.expand_dims(dy, 1)
      stride4 = [1, strides, strides, 1]
      dx = tf.compat.v1.nn.depthwise_conv2d_native_backprop_input(
          tf.shape(x4), tf.cast(kernel4, tf.float32), tf.cast(dy4, tf.float32), stride4, "VALID")
      dkernel = tf.compat.v1.nn.depthwise_conv2d_native_backprop_filter(
          x4, tf.shape(kernel4), dy4, stride4, "VALID")  # [1, k, C, 1]
      return tf.cast(tf.squeeze(dx, 1), x.dtype), tf.reshape(dkernel, kernel.shape)

    return _valid_depthwise_conv1d(x, kernel, strides), grad

  return conv


def strided_depthwise_with_float32_input_grad(x, kernel, strides):
  """`_valid_depthwise_conv1d` of bfloat16 `x` whose input gradient is computed in float32.

  oneDNN's bfloat16 input gradient of a strided depthwise convolution is slow (benchmarks/
  README.md); the forward pass and the kernel gradient stay bfloat16. oneDNN's bfloat16 kernels
  sum in float32, so with oneDNN the values equal the bfloat16 form's; TensorFlow's own kernels
  (oneDNN off) sum bfloat16 in bfloat16, and the float32 input gradient is the more exact one.

  Args:
    x: [B, T, C] bfloat16, already padded.
    kernel: [k, 1, C] bfloat16.
    strides: temporal stride.

  Returns:
    [B, (T - k) // strides + 1, C] bfloat16.
  """
  return _depthwise_with_float32_input_grad(strides)(x, kernel)


def conv1d_as_tap_gemm(x, kernel):
  """Stride-1 convolution with `k // 2` zero frames of padding on each side, as one GEMM.

  `x` times all k taps at once ([B * T, Cin] x [Cin, k * Cout]), then the k output blocks are
  added with their frame shifts. For narrow outputs (the heads' class / offset convolutions)
  2-7x faster than oneDNN's direct convolution, forward and backward.

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


def _same_conv1d(x, kernel):
  """Stride-1 convolution with `k // 2` zero frames of padding on each side."""
  pad = kernel.shape[0] // 2
  return tf.nn.conv1d(tf.pad(x, [[0, 0], [pad, pad], [0, 0]]), kernel, stride=1, padding="VALID")


@tf.custom_gradient
def conv1d_with_gemm_filter_grad(x, kernel):
  """`_same_conv1d` whose kernel gradient is one GEMM over the taps.

  The forward pass and the input gradient (a convolution of the output gradient with the
  tap-reversed, transposed kernel) are TensorFlow's convolutions; the kernel gradient is
  `[x shifted by each tap]^T dy` ([k * Cin, B * T] x [B * T, Cout]). In bfloat16 that GEMM is
  faster than oneDNN's backward-filter convolution (benchmarks/README.md).

  Args:
    x: [B, T, Cin] (static Cin).
    kernel: [k, Cin, Cout], k odd, in the dtype of `x`.

  Returns:
    [B, T, Cout].
  """
  taps, in_channels, out_channels = kernel.shape
  y = _same_conv1d(x, kernel)

  def grad(dy):
    dx = _same_conv1d(dy, tf.transpose(tf.reverse(kernel, [0]), [0, 2, 1]))
    pad, length = taps // 2, tf.shape(x)[1]
    padded = tf.pad(x, [[0, 0], [pad, pad], [0, 0]])
    shifted = tf.concat([padded[:, j:j + length] for j in range(taps)], axis=-1)  # [B, T, k Cin]
    dkernel = tf.matmul(tf.reshape(shifted, [-1, taps * in_channels]),
                        tf.reshape(dy, [-1, out_channels]), transpose_a=True)
    return dx, tf.reshape(dkernel, [taps, in_channels, out_channels])

  return y, grad


# -- LayerNorm -------------------------------------------------------------------------------
def layer_norm(x, gamma, beta, epsilon, training=False, policy="reference"):
  """LayerNorm over the last axis with biased variance: (x - mean) / sqrt(var + eps) * g + b.

  Statistics are float32 whatever the dtype of `x`.

  Args:
    x: [..., C] float32, or float16 / bfloat16 (mixed precision).
    gamma, beta: [C] (variables or tensors).
    epsilon: added to the variance.
    training: the training step (the element-wise form; under `fast` / `portable` with its
      gradient written out).
    policy: a kernel policy.

  Returns:
    [..., C]: bfloat16 when `x` is bfloat16 and takes the FusedBatchNorm form (`fast`, a
    graph with a dynamic batch or length, inference), else float32.
  """
  if not training and _fusable_layer_norm(x, policy):
    # bfloat16 enters the pattern as it is (oneDNN's kernel keeps float32 statistics): behind
    # a cast to float32 the remapper leaves the pattern unfused.
    if x.dtype != tf.bfloat16:
      x = tf.cast(x, tf.float32)
    y = _normalize_as_batch_norm(x, epsilon, name="a_normalized")
  elif training and resolve(policy) != "reference":
    return _layer_norm_with_written_gradient(x, gamma, beta, epsilon)
  else:
    centred, inv_std = _centred_and_inv_std(x, epsilon)
    y = tf.multiply(centred, inv_std, name="a_normalized")
  # The remapper's pattern is AddV2(beta, Mul(Reshape(FusedBatchNorm), gamma)) with inputs in
  # this order; Grappler sorts the inputs of commutative ops by name, hence the names.
  with tf.name_scope("b_beta"):
    beta = tf.cast(beta, y.dtype)
  with tf.name_scope("c_gamma"):
    gamma = tf.cast(gamma, y.dtype)
  return tf.add(beta, tf.multiply(y, gamma, name="d_scaled"), name="e_shifted")


def _centred_and_inv_std(x, epsilon):
  """x [..., C] -> float32 (x - mean [..., C], 1 / sqrt(var + epsilon) [..., 1]) over the last
  axis, biased variance."""
  x = tf.cast(x, tf.float32)
  centred = x - tf.reduce_mean(x, axis=-1, keepdims=True)
  return centred, tf.math.rsqrt(tf.reduce_mean(tf.square(centred), axis=-1, keepdims=True)
                                + epsilon)


def _layer_norm_with_written_gradient(x, gamma, beta, epsilon):
  """The training LayerNorm with its gradient written out, in float32: autodiff's values up to
  float32 rounding (the input gradient then rounded once to the dtype of `x`), in fewer ops (one
  LayerNorm and its gradient traced alone with a dynamic batch and length: 39-42 against 84-87)
  and full-size passes (forward + backward 0.89-0.90x at [2, 2304, 512]; benchmarks/README.md).

  Args:
    x: [..., C] (static rank), any float dtype.
    gamma, beta: [C] variables or tensors (used as float32).
    epsilon: added to the variance.

  Returns:
    [..., C] float32; the gradient of `x` in the dtype of `x`.
  """
  @tf.custom_gradient
  def norm(x, gamma, beta):
    centred, inv_std = _centred_and_inv_std(x, epsilon)
    normalized = centred * inv_std

    def grad(dy):
      with tf.name_scope("layer_norm_grad"):
        rows = list(range(normalized.shape.rank - 1))
        d_normalized = dy * gamma
        # The normalization's Jacobian: remove the row mean and the part along `normalized`.
        dx = inv_std * (d_normalized - tf.reduce_mean(d_normalized, axis=-1, keepdims=True)
                        - normalized * tf.reduce_mean(d_normalized * normalized, axis=-1,
                                                      keepdims=True))
        return (tf.cast(dx, x.dtype), tf.reduce_sum(dy * normalized, axis=rows),
                tf.reduce_sum(dy, axis=rows))

    return beta + normalized * gamma, grad

  return norm(x, tf.cast(gamma, tf.float32), tf.cast(beta, tf.float32))


def _fusable_layer_norm(x, policy):
  """`fast`, in a graph (eager ops are not rewritten), with a dynamic batch or length (static
  ones let constant folding turn the pattern's Fill ops into constants: nothing is fused)."""
  return (resolve(policy) == "fast" and not tf.executing_eagerly()
          and not x.shape[:-1].is_fully_defined())


def _normalize_as_batch_norm(x, epsilon, name):
  """(x - mean) / sqrt(var + eps) over the last axis, as Keras 2's fused LayerNorm wrote it:
  each row of `x` [..., C] one channel of an NCHW batch [1, rows, C, 1], normalized by a
  training-mode FusedBatchNorm with unit scale and zero offset (filled at run time)."""
  shape = tf.shape(x)
  rows = tf.reduce_prod(shape[:-1])
  channels = x.shape[-1] if x.shape[-1] is not None else shape[-1]
  y = tf.reshape(x, [1, rows, channels, 1])
  y, _, _ = tf.compat.v1.nn.fused_batch_norm(y, tf.fill([rows], 1.0), tf.fill([rows], 0.0),
                                             epsilon=epsilon, data_format="NCHW")
  return tf.reshape(y, shape, name=name)


# -- activation ------------------------------------------------------------------------------
def gelu(x, training=False, policy="reference"):
  """Exact (erf) GELU, `x * Phi(x)`, in the dtype of `x`.

  `fast` / `portable` compute the GELU of a float16 / bfloat16 training step in float32 and
  round once to the dtype of `x`: TensorFlow's CPU erfc and its gradient take 1.5x (float16) to
  1.7-1.9x (bfloat16) the time of float32's with the casts (benchmarks/README.md), and the rounded
  float32 result is the more exact one. Inference keeps the plain form, which oneDNN fuses into
  the MatMul before it.

  Args:
    x: [..., C].
    training: the training step.
    policy: a kernel policy.

  Returns:
    [..., C] in the dtype of `x`.
  """
  if training and x.dtype in (tf.float16, tf.bfloat16) and resolve(policy) != "reference":
    return tf.cast(tf.nn.gelu(tf.cast(x, tf.float32), approximate=False), x.dtype)
  return tf.nn.gelu(x, approximate=False)


# -- 1x1 projections -------------------------------------------------------------------------
def dense(x, kernel, bias, training=False, policy="reference"):
  """`x @ kernel + bias` over the last axis, as Keras' Dense computes it.

  Under `fast` a float32 training step takes the input gradient as an einsum
  (`_dense_with_einsum_input_grad`); otherwise (inference, bfloat16, other policies) the ops of
  `keras.layers.Dense.call` (on rows, oneDNN fuses the bias and the GELU after it into the
  MatMul at inference).

  Args:
    x: [..., Cin] (static rank and Cin).
    kernel: [Cin, Cout] in the dtype of `x`.
    bias: [Cout] in the dtype of `x`.
    training: the training step.
    policy: a kernel policy.

  Returns:
    [..., Cout].
  """
  if training and x.dtype == tf.float32 and resolve(policy) == "fast":
    return _dense_with_einsum_input_grad(x, kernel, bias)
  return keras.ops.add(keras.ops.matmul(x, kernel), bias)


def _dense_with_einsum_input_grad(x, kernel, bias):
  """`dense` with its gradient written out: dx = dy kernel^T as an einsum, dkernel = rows^T dy
  and dbias = the sum of dy over rows as autodiff computes them. Autodiff's dx is a MatMul with a
  transposed second operand: with oneDNN, in float32, 1.14-1.37x this einsum's time at the
  MLP's and the projections' shapes on AMD Zen 4 (the same time with oneDNN off or in bfloat16;
  benchmarks/README.md). The values are the same products.

  Args:
    x: [..., Cin] float32 (static rank and Cin).
    kernel: [Cin, Cout] float32.
    bias: [Cout] float32.

  Returns:
    [..., Cout].
  """
  in_channels, out_channels = kernel.shape
  as_rows = x.shape.rank != 2

  @tf.custom_gradient
  def project(x, kernel, bias):
    rows = tf.reshape(x, [-1, in_channels]) if as_rows else x  # [N, Cin]
    y = tf.nn.bias_add(tf.matmul(rows, kernel), bias)  # [N, Cout]

    def grad(dy):
      with tf.name_scope("dense_grad"):
        dy = tf.reshape(dy, [-1, out_channels]) if as_rows else dy  # [N, Cout]
        dx = tf.einsum("no,io->ni", dy, kernel)  # [N, Cin]
        return (_as_frames(dx, x) if as_rows else dx, tf.matmul(rows, dy, transpose_a=True),
                tf.raw_ops.BiasAddGrad(out_backprop=dy))

    return _as_frames(y, x) if as_rows else y, grad

  y = project(x, tf.convert_to_tensor(kernel), tf.convert_to_tensor(bias))
  y.set_shape(x.shape[:-1].concatenate([out_channels]))
  return y


# -- per-frame computations ------------------------------------------------------------------
def per_frame(fn, x, padding_mask, policy="reference"):
  """`fn(x) * mask`: a frame-by-frame computation, zero on padded frames.

  `reference` runs `fn` on [B, T, C]. `fast` / `portable` gather the valid frames into rows
  [N, C], run `fn` on them and scatter the rows back (N / (B T) of the cost; on rows oneDNN
  fuses MatMul + bias (+ GELU at inference)); with no padded frame, a reshape to rows.

  Args:
    fn: maps [..., C] to [..., C'] frame by frame (it must accept rank 2 and rank 3).
    x: [B, T, C].
    padding_mask: [B, T] bool (or numeric, nonzero = valid).
    policy: a kernel policy.

  Returns:
    [B, T, C'].
  """
  padding_mask = as_bool_mask(padding_mask)
  if resolve(policy) == "reference":
    y = fn(x)
    return y * tf.cast(padding_mask, y.dtype)[..., None]

  def valid_rows_only():
    indices = tf.cast(tf.where(padding_mask), tf.int32)  # [N, 2]: (batch, frame); int32 for XLA
    rows = fn(tf.gather_nd(x, indices))  # [N, C']
    return tf.scatter_nd(indices, rows,
                         tf.concat([tf.shape(padding_mask), [rows.shape[-1]]], axis=0))

  def all_rows():
    return _as_frames(fn(tf.reshape(x, [-1, x.shape[-1]])), x)  # rows [B * T, C']

  return tf.cond(tf.reduce_all(padding_mask), all_rows, valid_rows_only)


def _as_frames(rows, like):
  """Rows [N, C'] of `like` [..., C] back in its frames: [..., C'] (static where `like`'s
  leading shape is known, fewer graph ops)."""
  channels = rows.shape[-1]
  if like.shape[:-1].is_fully_defined():
    return tf.reshape(rows, like.shape[:-1].as_list() + [channels])
  return tf.reshape(rows, tf.concat([tf.shape(like)[:-1], [channels]], axis=0))


# -- local attention -------------------------------------------------------------------------
def with_next_block(blocks, axis, shape, policy="reference"):
  """Each block joined with the next: a gather of block pairs.

  `fast` / `portable` write the gradient out: each pair's gradient split in halves, added back
  onto their blocks (two pads and an add; the same values) instead of autodiff's scatter
  (`UnsortedSegmentSum`): 0.76x of the gather's forward + backward at THUMOS' first level
  (benchmarks/README.md).

  Args:
    blocks: [..., N + 1, L, ...] with the blocks on `axis` (any dtype; only floats have a
      gradient).
    axis: the blocks' axis (negative counts from the end).
    shape: the result's shape, [..., N, 2L, ...].
    policy: a kernel policy.

  Returns:
    `shape`: block n followed by block n + 1.
  """
  axis %= blocks.shape.rank
  if resolve(policy) == "reference" or not blocks.dtype.is_floating:
    return _gather_block_pairs(blocks, axis, shape)
  return _block_pairs_with_written_gradient(blocks, axis, shape)


def _gather_block_pairs(blocks, axis, shape):
  """Block pairs as a gather of blocks (n, n + 1) on `axis` (>= 0), reshaped to `shape`."""
  n = tf.shape(blocks)[axis] - 1
  pairs = tf.gather(blocks, tf.stack([tf.range(n), tf.range(1, n + 1)], axis=1), axis=axis)
  return tf.reshape(pairs, shape)  # [..., N, 2, L, ...] -> [..., N, 2L, ...]


def _block_pairs_with_written_gradient(blocks, axis, shape):
  """`_gather_block_pairs` (`axis` >= 0) whose gradient adds the pairs' halves back with two
  pads."""
  @tf.custom_gradient
  def pairs(blocks):
    def grad(d_pairs):
      blocks_shape = tf.shape(blocks)
      halves = tf.reshape(d_pairs, tf.concat(
          [blocks_shape[:axis], [blocks_shape[axis] - 1, 2], blocks_shape[axis + 1:]], axis=0))
      first, second = tf.unstack(halves, axis=axis + 1)  # of blocks 0..N-1, of blocks 1..N
      no_pad = [[0, 0]] * blocks.shape.rank
      after = no_pad[:axis] + [[0, 1]] + no_pad[axis + 1:]
      before = no_pad[:axis] + [[1, 0]] + no_pad[axis + 1:]
      return tf.pad(first, after) + tf.pad(second, before)

    return _gather_block_pairs(blocks, axis, shape), grad

  return pairs(blocks)


# -- heads shared over pyramid levels --------------------------------------------------------
def over_levels(stack, xs, masks, gap, policy="reference"):
  """Runs a level-shared conv stack on every pyramid level.

  `reference`: once per level. `fast` / `portable`: once on the levels joined along time with
  `gap` zero frames between them (a few large GEMMs instead of a few per level). `stack` gets a
  multiplier `keep` [1, T, 1] (0 on the gaps, else None) to apply after each LayerNorm, which
  maps the gaps' zeros to its bias; with the gaps masked out of every conv (k <= 2 gap + 1),
  each level then sees exactly the zeros its own padding would give.

  Args:
    stack: `(x [B, T, C], mask bool [B, T], keep) -> [B, T, C']`.
    xs: list of [B, T_l, C]; masks: list of [B, T_l] bool (or numeric, nonzero = valid).
    gap: zero frames between levels (the stack's kernel_size // 2).
    policy: a kernel policy.

  Returns:
    list of [B, T_l, C'].
  """
  masks = [as_bool_mask(m) for m in masks]
  if resolve(policy) == "reference" or len(xs) == 1:
    return [stack(x, m, None) for x, m in zip(xs, masks)]
  batch, channels = tf.shape(xs[0])[0], xs[0].shape[-1]
  x, mask, keep, sizes = [], [], [], []
  for l, (level_x, level_mask) in enumerate(zip(xs, masks)):
    if l and gap:
      x.append(tf.zeros([batch, gap, channels], level_x.dtype))
      mask.append(tf.zeros([batch, gap], tf.bool))
      keep.append(tf.zeros([1, gap, 1], level_x.dtype))
      sizes.append(gap)
    length = level_x.shape[1] if level_x.shape[1] is not None else tf.shape(level_x)[1]
    x.append(level_x)
    mask.append(level_mask)
    keep.append(tf.ones([1, length, 1], level_x.dtype))
    sizes.append(length)
  y = stack(tf.concat(x, axis=1), tf.concat(mask, axis=1),
            tf.concat(keep, axis=1) if gap else None)  # [B, sum T_l + gaps, C']
  parts = tf.split(y, sizes, axis=1)
  return parts[::2] if gap else parts
