"""Tests of asl_tf.modeling.detector (call only; parity is in parity_test.py)."""

import dataclasses

import keras
import numpy as np
import pytest
import tensorflow as tf

from asl_tf import config as config_lib
from asl_tf.modeling import detector as detector_lib
import layer_harness

SMALL = config_lib.ModelConfig(
    input_dim=12, num_classes=3, max_seq_len=64, backbone_arch=(2, 1, 3), embd_dim=16,
    fpn_dim=16, head_dim=16, n_head=2, mha_win_size=(5, 5, 5, -1), use_abs_pe=True,
    regression_range=((0, 4), (4, 8), (8, 16), (16, 1e4)))


def _inputs(t=64, batch=2, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(batch, t, SMALL.input_dim)).astype(np.float32)
  mask = np.ones((batch, t), bool)
  mask[-1, t // 2 + 3:] = False
  return x, mask


def test_output_contract():
  assert SMALL.max_div_factor == 16  # stride 4 x 2 x (5 // 2)
  detector = detector_lib.ASLDetector(SMALL)
  x, mask = _inputs(t=80)  # not max_seq_len: any multiple of max_div_factor
  out = detector(x, mask)
  n = 80 + 40 + 20 + 10
  assert out["cls_logits"].shape == (2, n, 3) and out["cls_logits"].dtype == tf.float32
  assert out["offsets"].shape == (2, n, 2) and out["offsets"].dtype == tf.float32
  assert out["padding_mask"].shape == (2, n) and out["padding_mask"].dtype == tf.bool
  assert out["points"].shape == (n, 4)
  assert [f.shape[1] for f in out["level_features"]] == [80, 40, 20, 10]
  assert all(f.shape[2] == 16 for f in out["level_features"])
  np.testing.assert_array_equal(out["padding_mask"].numpy(),
                                np.concatenate([mask[:, ::s] for s in (1, 2, 4, 8)], axis=1))
  padded = ~out["padding_mask"].numpy()
  np.testing.assert_array_equal(out["cls_logits"].numpy()[padded], 0.0)
  assert (out["offsets"].numpy() >= 0).all()
  for name in ("backbone", "neck", "cls_head", "reg_head"):
    assert hasattr(detector, name)


def test_mask_invariance_and_float_mask():
  detector = detector_lib.ASLDetector(SMALL)
  x, mask = _inputs()
  garbage = np.where(mask[..., None], x, 50.0).astype(np.float32)
  a = detector(x, mask)
  b = detector(garbage, mask.astype(np.float32))
  valid = a["padding_mask"].numpy()
  for key in ("cls_logits", "offsets"):
    np.testing.assert_allclose(a[key].numpy()[valid], b[key].numpy()[valid], atol=1e-5)


def test_bad_inputs_give_clear_errors():
  detector = detector_lib.ASLDetector(SMALL)
  x, mask = _inputs(t=60)
  with pytest.raises(ValueError, match="not a multiple of max_div_factor=16; pad .* to 64"):
    detector(x, mask)
  x, mask = _inputs()
  with pytest.raises(ValueError, match="built for 12 input channels"):
    detector(x[..., :10], mask)
  with pytest.raises(ValueError, match="features \\[B, T, C\\]"):
    detector(x[0], mask)


def test_dynamic_length_checked_in_graph():
  detector = detector_lib.ASLDetector(SMALL)
  detector.build_for_length(64)  # weights created eagerly: one trace instead of two
  fn = tf.function(lambda f, m: detector(f, m)["cls_logits"],
                   input_signature=[tf.TensorSpec([None, None, 12]),
                                    tf.TensorSpec([None, None], tf.bool)])
  x, mask = _inputs(t=64)
  assert fn(x, mask).shape == (2, 120, 3)
  x, mask = _inputs(t=60)
  with pytest.raises(tf.errors.InvalidArgumentError, match="multiple of max_div_factor=16"):
    fn(x, mask)


@pytest.mark.parametrize("overrides,message", [
    ({"max_seq_len": 60}, "not divisible by 16"),
    ({"fpn_dim": 32}, "--fpn_dim \\(32\\) equal to --embd_dim"),
    ({"regression_range": ((0, 4),)}, "give one \\(lo, hi\\) pair per level"),
])
def test_geometry_errors(overrides, message):
  with pytest.raises(ValueError, match=message):
    detector_lib.ASLDetector(dataclasses.replace(SMALL, **overrides))


def test_config_round_trip():
  config = dataclasses.replace(SMALL, head_empty_cls=(1,), stream_dims=(4, 8),
                               stream_proj_dims=(8, 8))
  detector = detector_lib.ASLDetector(config)
  restored = detector_lib.ASLDetector.from_config(detector.get_config())
  assert restored.model_config == config
  clone = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(detector))
  assert clone.model_config == config


def test_mixed_float16_outputs_float32_and_close():
  x, mask = _inputs()
  d32 = detector_lib.ASLDetector(SMALL)
  out32 = d32(x, mask)
  d16 = detector_lib.ASLDetector(SMALL, dtype="mixed_float16")
  d16(x, mask)
  d16.set_weights(d32.get_weights())
  out16 = d16(x, mask)
  for key in ("cls_logits", "offsets"):
    assert out16[key].dtype == tf.float32
    np.testing.assert_allclose(out16[key].numpy(), out32[key].numpy(), atol=5e-2)
  assert np.abs(out16["cls_logits"].numpy() - out32["cls_logits"].numpy()).max() > 0


def test_every_layer_norm_of_a_training_step_takes_the_training_form():
  """Called with training=True, every LayerNorm (embedding, blocks, neck and both heads) takes
  the training form: under `fast` each has its gradient written out, so neither autodiff of a
  LayerNorm (`RsqrtGrad`) nor the inference form (`FusedBatchNormV3`) is in the traced gradient,
  nested functions included; under `reference` autodiff gives the LayerNorms `RsqrtGrad`. Heads
  called without `training` once took the inference form inside training steps."""
  config = dataclasses.replace(SMALL, backbone_arch=(1, 1, 1), mha_win_size=(5, 5),
                               regression_range=((0, 4), (4, 1e4)))
  x, mask = _inputs(t=32)

  def op_counts(policy):
    detector = detector_lib.ASLDetector(dataclasses.replace(config, kernel_policy=policy))
    detector(x, mask)

    @tf.function(input_signature=[tf.TensorSpec([None, None, config.input_dim]),
                                  tf.TensorSpec([None, None], tf.bool)])
    def grads(x, mask):
      with tf.GradientTape() as tape:
        out = detector(x, mask, training=True)
        loss = tf.reduce_sum(out["cls_logits"]) + tf.reduce_sum(out["offsets"])
      return tape.gradient(loss, detector.trainable_variables)

    nodes = layer_harness.traced_nodes(grads.get_concrete_function())
    return {op: sum(n.op == op for n in nodes) for op in ("RsqrtGrad", "FusedBatchNormV3")}

  assert op_counts("fast") == {"RsqrtGrad": 0, "FusedBatchNormV3": 0}
  assert op_counts("reference")["RsqrtGrad"] > 0
