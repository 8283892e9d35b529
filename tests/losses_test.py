"""Losses: golden values, reference parity, zero-positive batches, the EMA normalizer."""

import math

import numpy as np
import pytest
import tensorflow as tf

from asl_tf import config as config_lib
from asl_tf import losses
from asl_tf import targets as targets_lib
from asl_tf.training import task as task_lib

LN2 = math.log(2.0)


def test_sigmoid_focal_loss_golden():
  """z = 0: p = 0.5, ce = ln 2, (1 - p_t)^2 = 0.25 -> y=1: 0.25 * 0.25 ln 2; y=0: 0.75 * 0.25 ln 2.

  z = ln 3: p = 0.75 -> y=1: -ln(0.75) * 0.25^2 * 0.25; y=0: -ln(0.25) * 0.75^2 * 0.75.
  """
  z = np.array([0.0, 0.0, math.log(3.0), math.log(3.0)], np.float32)
  y = np.array([1.0, 0.0, 1.0, 0.0], np.float32)
  expected = [0.0625 * LN2, 0.1875 * LN2, -math.log(0.75) * 0.015625,
              -math.log(0.25) * 0.421875]
  np.testing.assert_allclose(losses.sigmoid_focal_loss(z, y).numpy(), expected, rtol=1e-6)


def test_label_smoothing():
  """e = 0.1, K = 4: 1 -> 0.9 + 0.1 / 5 = 0.92, 0 -> 0.02."""
  np.testing.assert_allclose(losses.smooth_labels(tf.constant([1.0, 0.0]), 0.1, 4).numpy(),
                             [0.92, 0.02], rtol=1e-6)


def test_ctr_diou_loss_golden():
  """pred (1, 3), gt (2, 2): inter 1 + 2 = 3, union 4 + 4 - 3 = 5, IoU 0.6; enclosing 2 + 3 = 5,
  rho = (3 - 1 - 2 + 2) / 2 = 1 -> 1 - 0.6 + (1/5)^2 = 0.44. Identical -> 0.
  pred (0, 0), gt (1, 1): IoU 0, rho 0 -> 1."""
  pred = np.array([[1, 3], [2, 5], [0, 0]], np.float32)
  gt = np.array([[2, 2], [2, 5], [1, 1]], np.float32)
  np.testing.assert_allclose(losses.ctr_diou_loss_1d(pred, gt).numpy(), [0.44, 0.0, 1.0],
                             atol=1e-6)
  np.testing.assert_allclose(losses.offset_iou_1d(pred, gt).numpy(), [0.6, 1.0, 0.0], atol=1e-6)


def test_instance_targets_golden():
  """Point 0 matched to class 2 with logit ln 3 -> sigmoid 0.75; predicted (1, 3) vs GT (2, 2)
  -> tIoU 3 / 5 = 0.6. Point 1 matched to class 0 with logit 0 -> 0.5; identical offsets -> 1."""
  logits = tf.Variable([[[5.0, -1.0, math.log(3.0)], [0.0, 7.0, 7.0]]])
  offsets = tf.Variable([[[1.0, 3.0], [2.0, 4.0]]])
  targets = {"matched_label": np.array([[2, 0]], np.int32),
             "reg_targets": np.array([[[2, 2], [2, 4]]], np.float32)}
  with tf.GradientTape() as tape:
    q_target = losses.instance_targets(logits, offsets, targets)
  np.testing.assert_allclose(q_target.numpy(), [[[0.75, 0.6], [0.5, 1.0]]], rtol=1e-6)
  assert all(g is None for g in tape.gradient(q_target, [logits, offsets]))


def test_fused_instance_targets_golden():
  """sigmoid(ln 3) = 0.75, tIoU 0.6: 0.75^0.2 * 0.6^0.8 for both outputs; a negative IoU off
  positives (reg target (-5, 1): IoU -4 / 6) is clipped to 0 instead of giving NaN."""
  logits = np.array([[[5.0, -1.0, math.log(3.0)], [0.0, 7.0, 7.0]]], np.float32)
  offsets = np.array([[[1.0, 3.0], [2.0, 4.0]]], np.float32)
  targets = {"matched_label": np.array([[2, 0]], np.int32),
             "reg_targets": np.array([[[2, 2], [-5, 1]]], np.float32)}
  q_target = losses.instance_targets(logits, offsets, targets, "fused").numpy()
  expected = 0.75 ** 0.2 * 0.6 ** 0.8
  np.testing.assert_allclose(q_target[0, 0], [expected, expected], rtol=1e-6)
  np.testing.assert_array_equal(q_target[0, 1], [0.0, 0.0])


def test_evaluator_loss_mse_and_bce_golden():
  """q = (0.5, 0.8) vs Q = (0.75, 0.6): MSE 0.0625 + 0.04; BCE -(0.75 ln 0.5 + 0.25 ln 0.5)
  - (0.6 ln 0.8 + 0.4 ln 0.2)."""
  q = tf.constant([[0.5, 0.8]])
  target = tf.constant([[0.75, 0.6]])
  np.testing.assert_allclose(losses.evaluator_loss(q, target, "mse").numpy(), [0.1025],
                             rtol=1e-6)
  bce = -(math.log(0.5)) - (0.6 * math.log(0.8) + 0.4 * math.log(0.2))
  np.testing.assert_allclose(losses.evaluator_loss(q, target, "bce").numpy(), [bce], rtol=1e-6)
  with pytest.raises(ValueError, match="evaluator_loss"):
    losses.evaluator_loss(q, target, "l1")
  # From logits the gradient survives saturation (logit 20 against target 0.3: dL/dz = 1 - 0.3).
  z = tf.Variable([[20.0, -20.0]])
  with tf.GradientTape() as tape:
    loss = losses.evaluator_loss(tf.sigmoid(z), tf.constant([[0.3, 0.7]]), "bce", logits=z)
  np.testing.assert_allclose(tape.gradient(loss, z).numpy(), [[0.7, -0.7]], atol=1e-6)
  np.testing.assert_allclose(loss.numpy(), [20 * 0.7 + 20 * 0.7], rtol=1e-4)


def test_normalize_per_instance_golden():
  """Video 0: GT 0 has positives with weights 0.2, 0.6 (mean 0.4) -> 0.5, 1.5; GT 1 has one
  positive 0.9 -> 1. A negative keeps 0.3 even though its matched_gt says GT 0. Video 1: GT 0
  has 1, 2, 3 (mean 2) -> 0.5, 1, 1.5. Gradients reach the weights through the means."""
  weights = tf.Variable([[0.2, 0.6, 0.9, 0.3], [1.0, 2.0, 3.0, 1.0]])
  positive = np.array([[True, True, True, False], [True, True, True, False]])
  matched = np.array([[0, 0, 1, 0], [0, 0, 0, 1]], np.int32)
  with tf.GradientTape() as tape:
    out = losses.normalize_per_instance(weights, positive, matched, 2)
    picked = out[0, 0]
  np.testing.assert_allclose(out.numpy(), [[0.5, 1.5, 1.0, 0.3], [0.5, 1.0, 1.5, 1.0]],
                             rtol=1e-6)
  # d(w0 / ((w0 + w1) / 2)) / dw0 = 2 w1 / (w0 + w1)^2 = 1.2 / 0.64; / dw1 = -2 w0 / 0.64
  grad = tape.gradient(picked, weights).numpy()
  np.testing.assert_allclose(grad[0, :2], [1.2 / 0.64, -0.4 / 0.64], rtol=1e-5)
  assert np.all(grad[0, 2:] == 0) and np.all(grad[1] == 0)


def test_normalize_per_instance_keeps_the_ratios_of_tiny_weights():
  """1e-30 and 1e-31 (a narrow Gaussian far from its mean) -> 2 / 1.1 and 0.2 / 1.1, not a floor."""
  out = losses.normalize_per_instance(tf.constant([[1e-30, 1e-31]]), np.array([[True, True]]),
                                      np.array([[0, 0]], np.int32), 1)
  np.testing.assert_allclose(out.numpy(), [[2 / 1.1, 0.2 / 1.1]], rtol=1e-5)


def test_instance_normalization_keeps_each_instance_loss_mass():
  """With normalisation, scaling every positive's class-level weight by 0.1 leaves the losses
  unchanged (only relative weights within an instance count); without it they shrink."""
  outputs, targets = _small_case()
  targets["matched_gt"] = np.zeros((1, 4), np.int32)
  sens = {"p_cls": np.array([[1.0, 0.8, 1.0, 1.0]], np.float32),
          "p_loc": np.array([[1.0, 0.5, 1.0, 1.0]], np.float32)}
  small = {k: np.where(targets["positive_mask"], v * 0.1, v) for k, v in sens.items()}
  labels = np.zeros((1, 1), np.int32)
  norm = config_lib.LossConfig(sensitivity_normalization="instance")
  a = losses.asl_loss_sums(outputs, targets, sens, None, labels, norm)
  b = losses.asl_loss_sums(outputs, targets, small, None, labels, norm)
  np.testing.assert_allclose(float(a["cls_loss_sum"]), 2 * NEG + POS, rtol=1e-6)
  np.testing.assert_allclose(float(b["reg_loss_sum"]), 0.44, rtol=1e-5)
  plain = losses.asl_loss_sums(outputs, targets, small, None, labels,
                               config_lib.LossConfig(sensitivity_normalization="none"))
  np.testing.assert_allclose(float(plain["reg_loss_sum"]), 0.05 * 0.44, rtol=1e-5)


def _small_case():
  """1 video, 4 points, K = 1, logits 0; point 1 positive with reg target (2, 2) and predicted
  (1, 3) (DIoU 0.44); point 3 is padding with a large logit that must not count."""
  outputs = {
      "cls_logits": np.array([[[0.0], [0.0], [0.0], [10.0]]], np.float32),
      "offsets": np.array([[[5, 5], [1, 3], [0, 0], [0, 0]]], np.float32),
      "padding_mask": np.array([[True, True, True, False]]),
  }
  targets = {
      "cls_targets": np.array([[[0.0], [1.0], [0.0], [0.0]]], np.float32),
      "reg_targets": np.array([[[0, 0], [2, 2], [0, 0], [0, 0]]], np.float32),
      "positive_mask": np.array([[False, True, False, False]]),
      "matched_label": np.array([[-1, 0, -1, -1]], np.int32),
  }
  return outputs, targets


NEG = 0.1875 * LN2  # focal of logit 0, target 0
POS = 0.0625 * LN2  # focal of logit 0, target 1


# The evaluator's q = (0.6, 0.2) against its detached targets Q = (sigmoid(0), IoU) = (0.5, 0.6).
EVALUATOR_GOLDEN = {
    "mse": 0.1 ** 2 + 0.4 ** 2,
    "bce": -(0.5 * math.log(0.6) + 0.5 * math.log(0.4)) - (0.6 * math.log(0.2)
                                                           + 0.4 * math.log(0.8)),
}


@pytest.mark.parametrize("evaluator_loss", ["mse", "bce"])
@pytest.mark.parametrize("combination,power,use_instance,w_cls,w_loc", [
    (None, 1, True, 0.8, 0.5),            # class-level only: p_cls 0.8, p_loc 0.5
    ("product", 1, True, 0.8 * 0.6, 0.5 * 0.2),
    ("sum", 1, True, 0.8 + 0.6, 0.5 + 0.2),
    ("product", 1, False, 0.8, 0.5),      # before instance_start_epoch
    ("product", 2, True, 0.8 * 0.6 ** 2, 0.5 * 0.2 ** 2),  # instance_weight_power 2
    ("sum", 2, True, 0.8 + 0.6 ** 2, 0.5 + 0.2 ** 2),
])
def test_loss_sums_with_weights_golden(combination, power, use_instance, w_cls, w_loc,
                                       evaluator_loss):
  """cls = 2 NEG + w_cls POS, reg = w_loc 0.44; the evaluator's loss summed over its two
  outputs (`EVALUATOR_GOLDEN`)."""
  outputs, targets = _small_case()
  sens = {"p_cls": np.array([[1.0, 0.8, 1.0, 1.0]], np.float32),
          "p_loc": np.array([[1.0, 0.5, 1.0, 1.0]], np.float32)}
  if combination:
    sens["q"] = np.array([[[0.3, 0.3], [0.6, 0.2], [0.9, 0.9], [0.1, 0.1]]], np.float32)
  cfg = config_lib.LossConfig(instance_combination=combination or "product",
                              instance_weight_power=power,
                              sensitivity_normalization="none", evaluator_loss=evaluator_loss)
  sums = losses.asl_loss_sums(outputs, targets, sens, None, None, cfg, use_instance)
  np.testing.assert_allclose(float(sums["cls_loss_sum"]), 2 * NEG + w_cls * POS, rtol=1e-6)
  np.testing.assert_allclose(float(sums["reg_loss_sum"]), w_loc * 0.44, rtol=1e-5)
  np.testing.assert_allclose(float(sums["evaluator_loss_sum"]),
                             EVALUATOR_GOLDEN[evaluator_loss] if combination else 0.0, rtol=1e-5)
  assert float(sums["num_pos"]) == 1.0


@pytest.mark.parametrize("weighted,w_cls,w_loc", [
    ("both", 0.8 * 0.6, 0.5 * 0.2),
    ("classification", 0.8 * 0.6, 0.5),   # the DIoU loss keeps w = p_loc
    ("regression", 0.8, 0.5 * 0.2),       # the focal loss keeps w = p_cls
])
def test_instance_weighted_losses_golden(weighted, w_cls, w_loc):
  """q = (0.6, 0.2) at the positive reweights only the losses `instance_weighted_losses` names;
  the evaluator learns both outputs either way."""
  outputs, targets = _small_case()
  sens = {"p_cls": np.array([[1.0, 0.8, 1.0, 1.0]], np.float32),
          "p_loc": np.array([[1.0, 0.5, 1.0, 1.0]], np.float32),
          "q": np.array([[[0.3, 0.3], [0.6, 0.2], [0.9, 0.9], [0.1, 0.1]]], np.float32)}
  cfg = config_lib.LossConfig(instance_weighted_losses=weighted, sensitivity_normalization="none",
                              evaluator_loss="mse")
  sums = losses.asl_loss_sums(outputs, targets, sens, None, None, cfg, True)
  np.testing.assert_allclose(float(sums["cls_loss_sum"]), 2 * NEG + w_cls * POS, rtol=1e-6)
  np.testing.assert_allclose(float(sums["reg_loss_sum"]), w_loc * 0.44, rtol=1e-5)
  np.testing.assert_allclose(float(sums["evaluator_loss_sum"]), EVALUATOR_GOLDEN["mse"],
                             rtol=1e-5)


def _focal_positive(logit):
  """Sigmoid focal loss (alpha 0.25, gamma 2) of one logit with target 1."""
  p = 1.0 / (1.0 + math.exp(-logit))
  return 0.25 * (1.0 - p) ** 2 * -math.log(p)


@pytest.mark.parametrize("normalization,weights", [
    ("none", [[1.0, 0.5, 0.25], [0.5, 0.5, 1.0]]),
    # GT 0: mean 0.75; GT 1 alone: 1. Video 1: GT 0 (0.5, 0.5) -> 1, GT 1 alone -> 1.
    ("instance", [[4 / 3, 2 / 3, 1.0], [1.0, 1.0, 1.0]]),
    # Each video's own three positives: means 1.75 / 3 and 2 / 3 (over the batch's six
    # positives, 3.75 / 6, it would be other weights).
    ("video", [[12 / 7, 6 / 7, 3 / 7], [0.75, 0.75, 1.5]]),
])
def test_sensitivity_normalization_groups_golden(normalization, weights):
  """Two videos, 4 points each, K = 1: points 0, 1 positives of GT 0, point 2 of GT 1, point 3
  a negative (weight 1 under every normalisation); p_cls (1, 0.5, 0.25) and (0.5, 0.5, 1) on
  the positives and logits 0, 1, 2 so that each positive has its own focal loss."""
  logits = [0.0, 1.0, 2.0, 0.0]
  outputs = {"cls_logits": np.array([[[x] for x in logits]] * 2, np.float32),
             "offsets": np.ones((2, 4, 2), np.float32),
             "padding_mask": np.ones((2, 4), bool)}
  targets = {"cls_targets": np.array([[[1.0], [1.0], [1.0], [0.0]]] * 2, np.float32),
             "reg_targets": np.ones((2, 4, 2), np.float32),
             "positive_mask": np.array([[True, True, True, False]] * 2),
             "matched_label": np.array([[0, 0, 0, -1]] * 2, np.int32),
             "matched_gt": np.array([[0, 0, 1, 0]] * 2, np.int32)}
  sens = {"p_cls": np.array([[1.0, 0.5, 0.25, 1.0], [0.5, 0.5, 1.0, 1.0]], np.float32),
          "p_loc": np.ones((2, 4), np.float32)}
  cfg = config_lib.LossConfig(sensitivity_normalization=normalization)
  sums = losses.asl_loss_sums(outputs, targets, sens, None, np.zeros((2, 2), np.int32), cfg)
  expected = sum(w * _focal_positive(x) for video in weights for w, x in zip(video, logits))
  np.testing.assert_allclose(float(sums["cls_loss_sum"]), expected + 2 * NEG, rtol=1e-5)


def test_evaluator_learns_from_its_own_points_while_weights_stay_on_the_positives():
  """`evaluator_targets` (LossConfig.evaluator_points=inside_gt) adds point 0 (whole-segment
  positive, reg target (5, 5) = its prediction, IoU 1) to the evaluator's loss only: with
  q = (0.3, 0.3) against Q = (0.5, 1) it adds 0.2^2 + 0.7^2 = 0.53 to point 1's 0.17 (MSE).
  Point 1 keeps its own GT's target (2, 2), not the shorter one (1, 1) the whole-segment
  assignment gives it (IoU 1/3: 0.1^2 + (0.2 - 1/3)^2 would be 0.0278). The focal and DIoU sums
  keep point 1's weights."""
  outputs, targets = _small_case()
  sens = {"p_cls": np.array([[1.0, 0.8, 1.0, 1.0]], np.float32),
          "p_loc": np.array([[1.0, 0.5, 1.0, 1.0]], np.float32),
          "q": np.array([[[0.3, 0.3], [0.6, 0.2], [0.9, 0.9], [0.1, 0.1]]], np.float32)}
  whole = {"cls_targets": np.array([[[1.0], [1.0], [0.0], [1.0]]], np.float32),
           "reg_targets": np.array([[[5, 5], [1, 1], [0, 0], [1, 1]]], np.float32),
           "positive_mask": np.array([[True, True, False, True]]),  # point 3: padding
           "matched_label": np.array([[0, 0, -1, 0]], np.int32)}
  cfg = config_lib.LossConfig(sensitivity_normalization="none", evaluator_loss="mse")
  sums = losses.asl_loss_sums(outputs, targets, sens, None, None, cfg, True,
                              evaluator_targets=whole)
  np.testing.assert_allclose(float(sums["evaluator_loss_sum"]), 0.53 + 0.17, rtol=1e-5)
  np.testing.assert_allclose(float(sums["cls_loss_sum"]), 2 * NEG + 0.48 * POS, rtol=1e-6)
  np.testing.assert_allclose(float(sums["reg_loss_sum"]), 0.1 * 0.44, rtol=1e-5)
  assert float(sums["num_pos"]) == 1.0


def test_video_label_loss_golden():
  """Video 0: points 0, 1 have softmaxes (0.25, 0.75) and (0.75, 0.25), point 2 is padding with
  a confident logit that must not count; class 0 is present: S = (0.75, 0.75), loss
  -log 0.75 - log 0.25. Video 1: only padding (uniform S = 1/2 as the authors' masking gives)
  and no GT: -2 log 0.5."""
  ln3 = math.log(3.0)
  logits = np.array([[[0.0, ln3], [ln3, 0.0], [10.0, -10.0]],
                     [[9.0, 0.0], [0.0, 9.0], [5.0, 5.0]]], np.float32)
  mask = np.array([[True, True, False], [False, False, False]])
  labels = np.array([[0, -1], [-1, -1]], np.int32)
  value = float(losses.video_label_loss_sum(logits, mask, labels))
  np.testing.assert_allclose(value, -math.log(0.75) - math.log(0.25) - 2 * math.log(0.5),
                             rtol=1e-6)


def test_video_label_loss_follows_a_tiny_present_score_exactly():
  """Logits (5, 5, 5, -15) with class 3 present: S_3 = e^-15 / (3 e^5 + e^-15), far below any
  clip; -log S_3 = 20 + log(3 + e^-20), the absent classes add -3 log(1 - S_k) with
  S_k = e^5 / (3 e^5 + e^-15), and the gradient on logit 3 is -(1 - S_3) ~ -1."""
  x = tf.Variable([[[5.0, 5.0, 5.0, -15.0]]])
  with tf.GradientTape() as tape:
    value = losses.video_label_loss_sum(x, np.array([[True]]), np.array([[3]], np.int32))
  s_k = math.exp(5) / (3 * math.exp(5) + math.exp(-15))
  expected = 20 + math.log(3 + math.exp(-20)) - 3 * math.log(1 - s_k)
  np.testing.assert_allclose(float(value), expected, rtol=1e-6)
  np.testing.assert_allclose(tape.gradient(value, x).numpy()[0, 0, 3], -1.0, atol=1e-6)
  # A saturated softmax of an absent class stays finite, with a finite gradient.
  y = tf.Variable([[[200.0, -200.0]]])
  with tf.GradientTape() as tape:
    saturated = losses.video_label_loss_sum(y, np.array([[True]]), np.array([[1]], np.int32))
  assert np.isfinite(float(saturated)) and np.isfinite(tape.gradient(saturated, y).numpy()).all()


def test_video_label_loss_enters_the_sums_only_when_weighted():
  outputs, targets = _small_case()
  labels = np.array([[-1]], np.int32)  # K = 1 absent: S = 1, -log(1 - S) at the 1e-7 floor
  off = losses.asl_loss_sums(outputs, targets, None, None, labels, config_lib.LossConfig())
  on = losses.asl_loss_sums(outputs, targets, None, None, labels,
                            config_lib.LossConfig(video_label_loss_weight=0.2))
  assert float(off["video_label_loss_sum"]) == 0.0
  expected = losses.video_label_loss_sum(outputs["cls_logits"], outputs["padding_mask"], labels)
  assert float(on["video_label_loss_sum"]) == float(expected) > 0
  assert float(on["cls_loss_sum"]) == float(off["cls_loss_sum"])


def test_combine_losses_formula():
  sums = {"cls_loss_sum": 4.0, "reg_loss_sum": 2.0, "evaluator_loss_sum": 1.0,
          "contrastive_loss_sum": 3.0, "video_label_loss_sum": 5.0}
  cfg = config_lib.LossConfig(reg_loss_weight=2.0, evaluator_loss_weight=0.5,
                              video_label_loss_weight=0.2)
  out = losses.combine_losses(sums, 2.0, 6.0, cfg, 0.1)
  # 4/2 + 2 * 2/2 + 0.5 * 1/2 + 0.1 * 3/6 + 0.2 * 5/2 = 2 + 2 + 0.25 + 0.05 + 0.5
  np.testing.assert_allclose(float(out["total_loss"]), 4.8, rtol=1e-6)
  np.testing.assert_allclose(float(out["video_label_loss"]), 2.5, rtol=1e-6)
  out = losses.combine_losses(sums, 2.0, 0.0, cfg, 0.1)  # no anchors: divide by 1
  np.testing.assert_allclose(float(out["contrastive_loss"]), 3.0)


def test_reg_loss_weight_of_zero_is_actionformers_automatic_balance():
  """ActionFormer: loss_weight <= 0 means w = cls.detach() / max(reg, 0.01). Here a weight of 0
  dropped the regression loss, silently (a copied ActionFormer config trained no offsets)."""
  cfg = config_lib.LossConfig(reg_loss_weight=0.0, evaluator_loss_weight=0.0,
                              video_label_loss_weight=0.0)
  cls_sum, reg_sum = tf.Variable(1.2), tf.Variable(0.4)

  def total(reg):
    reg_sum.assign(reg)
    with tf.GradientTape() as tape:
      sums = {"cls_loss_sum": cls_sum, "reg_loss_sum": reg_sum, "evaluator_loss_sum": 0.0,
              "contrastive_loss_sum": 0.0, "video_label_loss_sum": 0.0}
      out = losses.combine_losses(sums, 2.0, 0.0, cfg, 0.0)["total_loss"]
    return float(out), [float(g) for g in tape.gradient(out, [cls_sum, reg_sum])]

  # cls 0.6, reg 0.2: w = 3, total 0.6 + 3 * 0.2 = 1.2; w held constant: d/dcls_sum = 1 / 2,
  # d/dreg_sum = w / 2 = 1.5.
  value, grads = total(0.4)
  np.testing.assert_allclose([value] + grads, [1.2, 0.5, 1.5], rtol=1e-6)
  # reg 0.001 < 0.01: w = 0.6 / 0.01 = 60, total 0.6 + 60 * 0.001 = 0.66.
  value, grads = total(0.002)
  np.testing.assert_allclose([value] + grads, [0.66, 0.5, 30.0], rtol=1e-5)
  # Across replicas the weight comes from the global batch's sums, passed in.
  sums = {"cls_loss_sum": 1.2, "reg_loss_sum": 0.4, "evaluator_loss_sum": 0.0,
          "contrastive_loss_sum": 0.0, "video_label_loss_sum": 0.0}
  out = losses.combine_losses(sums, 2.0, 0.0, cfg, 0.0, global_sums=(2.0, 0.5))
  np.testing.assert_allclose(float(out["total_loss"]), 0.6 + 4.0 * 0.2, rtol=1e-6)


def test_zero_positive_batch_is_finite_with_zero_reg_loss():
  outputs, targets = _small_case()
  targets["positive_mask"] = np.zeros((1, 4), bool)
  targets["cls_targets"] = np.zeros((1, 4, 1), np.float32)
  logits = tf.Variable(outputs["cls_logits"])
  offsets = tf.Variable(outputs["offsets"])
  with tf.GradientTape() as tape:
    sums = losses.asl_loss_sums({**outputs, "cls_logits": logits, "offsets": offsets}, targets,
                                None, None, None, config_lib.LossConfig())
    total = losses.combine_losses(sums, 90.0, 0.0, config_lib.LossConfig(), 0.1)["total_loss"]
  assert float(sums["reg_loss_sum"]) == 0.0 and float(sums["num_pos"]) == 0.0
  np.testing.assert_allclose(float(sums["cls_loss_sum"]), 3 * NEG, rtol=1e-6)
  for grad in tape.gradient(total, [logits, offsets]):
    assert np.isfinite(grad.numpy()).all()


def _info_nce_reference(features, labels, valid, tau):
  """Written out independently: per anchor i (valid, label >= 0) with positives
  P = {j != i valid, label j = label i} non-empty: -log(sum_P e^{s/tau} / sum_{j != i valid})."""
  total, count = 0.0, 0
  for i in range(len(features)):
    if not valid[i] or labels[i] < 0:
      continue
    num, den = 0.0, 0.0
    for j in range(len(features)):
      if j == i or not valid[j]:
        continue
      e = math.exp(float(np.dot(features[i], features[j])) / tau)
      den += e
      if labels[j] == labels[i]:
        num += e
    if num > 0:
      total += -math.log(num / den)
      count += 1
  return total, count


def test_info_nce_tiny_golden():
  """a = b = (1, 0) same class, background (0, 1), tau 1: each anchor -log(e / (e + 1))."""
  feats = np.array([[1, 0], [1, 0], [0, 1]], np.float32)
  loss_sum, count = losses.multi_positive_info_nce(feats, [0, 0, -1], [True] * 3, 1.0)
  np.testing.assert_allclose(float(loss_sum), 2 * math.log(1 + math.exp(-1)), rtol=1e-6)
  assert float(count) == 2


def test_info_nce_two_instances_and_background_against_formula():
  """Instances of classes 3 and 5 (a cls and a loc feature each), 2 background points and one
  padded row (which must not enter any denominator)."""
  rng = np.random.default_rng(0)
  feats = rng.normal(size=(7, 4)).astype(np.float32)
  feats /= np.linalg.norm(feats, axis=1, keepdims=True)
  labels = np.array([3, 5, 3, 5, -1, -1, 3])
  valid = np.array([True, True, True, True, True, True, False])
  expected_sum, expected_count = _info_nce_reference(feats, labels, valid, 0.07)
  loss_sum, count = losses.multi_positive_info_nce(feats, labels, valid, 0.07)
  assert expected_count == 4 and float(count) == 4
  np.testing.assert_allclose(float(loss_sum), expected_sum, rtol=1e-5)


def test_info_nce_without_positives_is_zero():
  for labels in ([0, -1, -1], [-1, -1, -1]):
    feats = np.eye(3, dtype=np.float32)
    loss_sum, count = losses.multi_positive_info_nce(feats, labels, [True] * 3, 0.07)
    assert float(loss_sum) == 0.0 and float(count) == 0.0


def test_matches_reference_losses(parity_case):
  """Fixture logits / offsets, our targets, normalizer 100 -> 100 * 0.9 + 0.1 * num_pos."""
  data = parity_case.arrays
  levels = parity_case.model_config.num_levels
  points = np.concatenate([data[f"output/points_{l}"] for l in range(levels)])
  segments = np.stack([data[f"input/gt_segments_{i}"] for i in range(2)])
  labels = np.stack([data[f"input/gt_labels_{i}"] for i in range(2)]).astype(np.int32)
  mask = np.concatenate([data[f"output/mask_{l}"] for l in range(levels)], axis=1)
  outputs = {
      "cls_logits": np.concatenate([data[f"output/cls_logits_{l}"] for l in range(levels)], 1),
      "offsets": np.concatenate([data[f"output/offsets_{l}"] for l in range(levels)], 1),
      "padding_mask": mask,
  }
  train_cfg = parity_case.meta["train_cfg"]
  targets = targets_lib.assign_targets(points, segments, labels,
                                       parity_case.model_config.num_classes,
                                       train_cfg["center_sample_radius"], mask)
  cfg = config_lib.LossConfig(init_loss_norm=float(data["output/loss_normalizer_before"]),
                              label_smoothing=train_cfg["label_smoothing"],
                              reg_loss_weight=train_cfg["loss_weight"])
  sums = losses.asl_loss_sums(outputs, targets, None, segments, labels, cfg)
  norm = task_lib.LossNormalizer(cfg.init_loss_norm, cfg.loss_norm_momentum)
  value = norm.update(sums["num_pos"])
  np.testing.assert_allclose(float(value), data["output/loss_normalizer_after"], rtol=1e-6)
  out = losses.combine_losses(sums, value, sums["contrastive_num_anchors"], cfg, 0.0)
  for key, ref in [("cls_loss", "cls_loss"), ("reg_loss", "reg_loss"),
                   ("total_loss", "final_loss")]:
    np.testing.assert_allclose(float(out[key]), data[f"output/loss_{ref}"], atol=1e-5)
