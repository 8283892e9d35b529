"""Winograd F(4, 3): the stride-1, kernel-3 convolutions of the embedding and the heads.

A kernel-3 convolution over T frames is three [T, Cin] x [Cin, Cout] GEMMs. Winograd's minimal
filtering F(4, 3) (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks", 2016)
computes 4 outputs from a tile of 6 inputs with 6 multiplications instead of 12: after a fixed
linear transform of the input tiles (B^T) and of the kernel taps (G), the convolution is 6 GEMMs
of T / 4 rows, i.e. half the multiply-adds, and a fixed transform (A^T) of their results gives
the output. The result equals the direct convolution up to float32 rounding (tests bound it).

The gradient is written out rather than left to autodiff: autodiff of the tile slicing builds
full-size zero tensors per slice and was slower than the direct convolution. Here the input
gradient is again an F(4, 3) convolution (of the output gradient with the reversed, transposed
taps) and the kernel gradient is 6 GEMMs in the transformed domain.
"""

import tensorflow as tf

TILE = 4  # outputs per tile; a tile reads TILE + 2 inputs
_NUM_POINTS = TILE + 2


def _input_transform(x):
  """B^T over overlapping input tiles: x [B, T, C] -> ([6, B * n, C], n) with n = ceil(T / 4)."""
  batch, length, channels = tf.shape(x)[0], tf.shape(x)[1], x.shape[-1]
  n = (length + TILE - 1) // TILE
  # One zero frame in front (the convolution's left padding); zeros behind up to 4 (n + 1).
  x = tf.pad(x, [[0, 0], [1, TILE * (n + 1) - length - 1], [0, 0]])
  x = tf.reshape(x, [batch, n + 1, TILE, channels])  # tile i starts at frame 4 i
  d0, d1, d2, d3 = (x[:, :n, j] for j in range(TILE))  # [B, n, C] each
  d4, d5 = x[:, 1:, 0], x[:, 1:, 1]
  e = d4 - d2
  h = d1 - d3
  p = e - 3.0 * d2  # d4 - 4 d2
  q = 4.0 * h + 3.0 * d3  # 4 d1 - d3
  v = tf.stack([4.0 * (d0 - d2) + e, p - q, p + q, e - 2.0 * h, e + 2.0 * h,
                4.0 * h + (d5 - d3)], axis=0)  # [6, B, n, C]
  return tf.reshape(v, [_NUM_POINTS, batch * n, channels]), n


def _kernel_transform(kernel, reverse_taps=False):
  """G over the taps: [3, Cin, Cout] -> [6, Cin, Cout] (of the taps in reverse order if asked)."""
  g0, g1, g2 = (kernel[j] for j in ((2, 1, 0) if reverse_taps else (0, 1, 2)))
  odd = g0 + g2
  return tf.stack([g0 / 4.0, -(odd + g1) / 6.0, -(odd - g1) / 6.0,
                   g0 / 24.0 + g1 / 12.0 + g2 / 6.0, g0 / 24.0 - g1 / 12.0 + g2 / 6.0, g2],
                  axis=0)


def _output_transform(m, batch, length, n):
  """A^T over the transformed products: m [6, B * n, F] -> y [B, T, F]."""
  m0, m1, m2, m3, m4, m5 = tf.unstack(m, axis=0)
  s12, d12 = m1 + m2, m1 - m2
  s34, d34 = m3 + m4, m3 - m4
  y = tf.stack([m0 + s12 + s34, d12 + 2.0 * d34, s12 + 4.0 * s34, d12 + 8.0 * d34 + m5],
               axis=1)  # [B * n, 4, F]
  return tf.reshape(y, [batch, n * TILE, m.shape[-1]])[:, :length]


def _output_transform_adjoint(dy, n):
  """Transpose of A^T: dy [B, T, F] -> [6, B * n, F]."""
  length = tf.shape(dy)[1]
  dy = tf.pad(dy, [[0, 0], [0, TILE * n - length], [0, 0]])
  dy0, dy1, dy2, dy3 = tf.unstack(tf.reshape(dy, [-1, TILE, dy.shape[-1]]), axis=1)
  even, odd = dy0 + dy2, dy1 + dy3
  even4, odd4 = dy0 + 4.0 * dy2, 2.0 * dy1 + 8.0 * dy3
  return tf.stack([dy0, even + odd, even - odd, even4 + odd4, even4 - odd4, dy3], axis=0)


def _kernel_transform_adjoint(du):
  """Transpose of G: [6, Cin, Cout] -> [3, Cin, Cout]."""
  u0, u1, u2, u3, u4, u5 = tf.unstack(du, axis=0)
  s12, d12 = u1 + u2, u2 - u1
  s34, d34 = u3 + u4, u3 - u4
  return tf.stack([u0 / 4.0 - s12 / 6.0 + s34 / 24.0, d12 / 6.0 + d34 / 12.0,
                   -s12 / 6.0 + s34 / 6.0 + u5], axis=0)


def _conv(x, kernel, adjoint=False):
  """F(4, 3) of x [B, T, Cin] with kernel [3, Cin, Cout]: (y [B, T, Cout], transformed input
  tiles [6, B * n, Cin], n).

  `adjoint`: x is [B, T, Cout] and is convolved with the taps reversed and each tap transposed
  (the GEMM reads the transformed kernel transposed; nothing is written out): y [B, T, Cin],
  tiles [6, B * n, Cout].
  """
  v, n = _input_transform(x)
  u = _kernel_transform(kernel, reverse_taps=adjoint)  # [6, Cin, Cout]
  m = tf.matmul(v, u, transpose_b=adjoint)  # [6, B * n, Cout] ([6, B * n, Cin] if adjoint)
  return _output_transform(m, tf.shape(x)[0], tf.shape(x)[1], n), v, n


@tf.custom_gradient
def conv1d_k3(x, kernel):
  """Kernel-3, stride-1 convolution with one zero frame of padding on each side.

  Equals `tf.nn.conv1d(tf.pad(x, [[0, 0], [1, 1], [0, 0]]), kernel, 1, "VALID")` (a cross-
  correlation, as in PyTorch and Keras) up to float32 rounding, with half the GEMM work.

  Args:
    x: [B, T, Cin] float32 (static Cin).
    kernel: [3, Cin, Cout] float32.

  Returns:
    [B, T, Cout].
  """
  y, v, n = _conv(x, kernel)

  def grad(dy):
    dm = _output_transform_adjoint(dy, n)  # [6, B * n, Cout]
    dkernel = _kernel_transform_adjoint(tf.matmul(v, dm, transpose_a=True))
    # x[t] meets dy[t - j + 1] through tap j: a correlation with taps reversed, transposed.
    dx, _, _ = _conv(dy, kernel, adjoint=True)
    return dx, dkernel

  return y, grad
