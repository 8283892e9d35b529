"""Tests of asl_tf.modeling.winograd: F(4, 3) against the direct convolution, values and grads."""

import numpy as np
import pytest
import tensorflow as tf

from asl_tf.modeling import layers
from asl_tf.modeling import winograd


def _direct(x, kernel):
  return tf.nn.conv1d(tf.pad(x, [[0, 0], [1, 1], [0, 0]]), kernel, 1, "VALID")


def _numpy_conv(x, kernel):
  """y[t] = x[t - 1] k0 + x[t] k1 + x[t + 1] k2 with zeros outside, in float64."""
  xp = np.pad(x.astype(np.float64), [(0, 0), (1, 1), (0, 0)])
  t = x.shape[1]
  return sum(np.einsum("btc,cf->btf", xp[:, j:j + t], kernel[j].astype(np.float64))
             for j in range(3))


@pytest.mark.parametrize("length", [1, 2, 3, 4, 5, 7, 8, 13])
def test_values_match_float64_convolution_at_every_length_mod_4(length):
  rng = np.random.default_rng(length)
  x = rng.normal(size=(2, length, 5)).astype(np.float32)
  kernel = rng.normal(size=(3, 5, 6)).astype(np.float32)
  y = winograd.conv1d_k3(tf.constant(x), tf.constant(kernel)).numpy()
  assert y.shape == (2, length, 6)
  np.testing.assert_allclose(y, _numpy_conv(x, kernel), rtol=1e-5, atol=1e-5)


def test_hand_computed_single_channel():
  # x = 1..6, taps (1, 0, -1): y[t] = x[t - 1] - x[t + 1], zero outside.
  x = tf.constant(np.arange(1, 7, dtype=np.float32).reshape(1, 6, 1))
  kernel = tf.constant(np.array([1.0, 0.0, -1.0], np.float32).reshape(3, 1, 1))
  y = winograd.conv1d_k3(x, kernel).numpy().ravel()
  np.testing.assert_allclose(y, [-2, -2, -2, -2, -2, 5], atol=1e-6)


@pytest.mark.parametrize("length", [6, 9, 16])
def test_gradients_match_direct_convolution(length):
  rng = np.random.default_rng(10 + length)
  x = tf.constant(rng.normal(size=(2, length, 8)).astype(np.float32))
  kernel = tf.constant(rng.normal(size=(3, 8, 7)).astype(np.float32))
  target = tf.constant(rng.normal(size=(2, length, 7)).astype(np.float32))
  grads = []
  for conv in (winograd.conv1d_k3, _direct):
    with tf.GradientTape() as tape:
      tape.watch([x, kernel])
      y = conv(x, kernel)
      loss = tf.reduce_sum(tf.sin(y) * target)  # a non-linear loss: dy differs per frame
    grads.append(tape.gradient(loss, [x, kernel]))
  for got, want in zip(*grads):
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-4, atol=1e-4)


def test_input_gradient_reads_the_kernel_transposed_without_writing_it():
  """The input gradient convolves with the taps reversed and transposed: the GEMM reads the
  transformed kernel transposed (`adj_y`) and G takes the taps in reverse, so the traced gradient
  holds no `Transpose` of the kernel (one per convolution before), and its values equal the
  direct convolution's input gradient."""
  rng = np.random.default_rng(4)
  kernel = tf.constant(rng.normal(size=(3, 6, 5)).astype(np.float32))
  dy = tf.constant(rng.normal(size=(2, 9, 5)).astype(np.float32))

  def input_grad(conv):
    def fn(x):
      with tf.GradientTape() as tape:
        tape.watch(x)
        y = conv(x, kernel)
      return tape.gradient(y, x, output_gradients=dy)
    return tf.function(fn, input_signature=[tf.TensorSpec([None, None, 6], tf.float32)])

  traced = input_grad(winograd.conv1d_k3)
  ops = [op.type for op in traced.get_concrete_function().graph.get_operations()]
  assert "Transpose" not in ops
  adj_y = [op.get_attr("adj_y") for op in traced.get_concrete_function().graph.get_operations()
           if op.type == "BatchMatMulV2"]
  assert adj_y.count(True) == 1  # the input gradient's (the forward and kernel gradient: False)
  x = tf.constant(rng.normal(size=(2, 9, 6)).astype(np.float32))
  np.testing.assert_allclose(traced(x).numpy(), input_grad(_direct)(x).numpy(), rtol=1e-5,
                             atol=1e-5)


def test_dynamic_length_in_a_function_matches_direct():
  rng = np.random.default_rng(3)
  kernel = tf.constant(rng.normal(size=(3, 4, 4)).astype(np.float32))
  fn = tf.function(lambda x: winograd.conv1d_k3(x, kernel),
                   input_signature=[tf.TensorSpec([None, None, 4], tf.float32)])
  for length in (5, 12):
    x = tf.constant(rng.normal(size=(3, length, 4)).astype(np.float32))
    np.testing.assert_allclose(fn(x).numpy(), _direct(x, kernel).numpy(), rtol=1e-5, atol=1e-5)


def test_masked_conv_layer_matches_direct_path_with_mask_and_training():
  """The layer's Winograd path equals its direct path: outputs, masks and kernel gradients."""
  rng = np.random.default_rng(5)
  x = tf.constant(rng.normal(size=(2, 11, 64)).astype(np.float32))
  mask = np.ones((2, 11), bool)
  mask[1, 7:] = False
  conv = layers.MaskedConv1D(64, 3, bias_initializer="random_normal", kernel_policy="fast")
  conv.build(x.shape)
  with tf.GradientTape() as tape:
    y, out_mask = conv(x, mask)
    loss = tf.reduce_sum(y * y)
  grad = tape.gradient(loss, conv.kernel.value)
  with tf.GradientTape() as tape:
    tape.watch(conv.kernel.value)
    want = (_direct(x, conv.kernel) + conv.bias) * mask[..., None]
    want_loss = tf.reduce_sum(want * want)
  want_grad = tape.gradient(want_loss, conv.kernel.value)
  np.testing.assert_array_equal(out_mask.numpy(), mask)
  assert np.all(y.numpy()[1, 7:] == 0)
  np.testing.assert_allclose(y.numpy(), want.numpy(), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(grad.numpy(), want_grad.numpy(), rtol=1e-4, atol=1e-3)
