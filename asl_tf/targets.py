"""Label assignment: ActionFormer's centre sampling, regression ranges and minimum-length rule.

Everything is vectorized over a padded batch of ground truth, `[B, N_points, M_gt]`, so it runs
inside a `tf.function` train step with static shapes. The function holds no variables and its
outputs carry no gradient.
"""

import tensorflow as tf

# ActionFormer's tolerance for GT segments of (almost) the same length (multi-label points).
_LENGTH_TIE_TOLERANCE = 1e-3


def assign_targets(points, gt_segments, gt_labels, num_classes, center_sample_radius=1.5,
                   padding_mask=None):
  """Assigns classification and regression targets to every point (docs/method.md 6.1).

  For point t and segment n = [a, b], with l = t - a and r = b - t (all in base-grid units):
  1. centre sampling: max(a, c - radius * s) < t < min(b, c + radius * s), c = (a + b) / 2,
     s = the point's stride (strict); with radius <= 0, min(l, r) > 0 (inside the segment);
  2. regression range: lo <= max(l, r) <= hi (inclusive);
  3. among the passing segments, the class target is the OR of the one-hot labels of every
     segment with length <= L_min + 1e-3 (multi-label ties), clamped to 1;
  4. the regression target is (l, r) / s of the first shortest passing segment (`torch.min`).

  Like the reference, `cls_targets` and `reg_targets` are computed for every point, padded or
  not, and a negative point's regression target is that of GT 0 (never used); a video without
  ground truth gets all-zero targets. `positive_mask` is the one to use: it is false on padding.

  Args:
    points: float32 [N, 4] point table (t, reg_lo, reg_hi, stride), levels concatenated.
    gt_segments: float32 [B, M, 2] (start, end) in base-grid units; M >= 1.
    gt_labels: int [B, M] class ids, -1 = padding.
    num_classes: K.
    center_sample_radius: centre sampling radius in strides (<= 0 = whole segment).
    padding_mask: optional bool / float [B, N] (true on valid points); None = all valid.

  Returns:
    A dict of stop-gradient tensors:
      `cls_targets` float32 [B, N, K] multi-hot,
      `reg_targets` float32 [B, N, 2] (left, right) in stride units,
      `positive_mask` bool [B, N] (some class target and a valid point),
      `matched_gt` int32 [B, N] index of the assigned (shortest) segment, 0 on negatives,
      `matched_label` int32 [B, N] that segment's label, -1 on negatives.
  """
  points = tf.convert_to_tensor(points, tf.float32)
  gt_segments = tf.convert_to_tensor(gt_segments, tf.float32)
  gt_labels = tf.cast(gt_labels, tf.int32)
  t = points[None, :, 0:1]  # [1, N, 1]
  reg_lo = points[None, :, 1:2]
  reg_hi = points[None, :, 2:3]
  stride = points[None, :, 3:4]
  start = gt_segments[:, None, :, 0]  # [B, 1, M]
  end = gt_segments[:, None, :, 1]
  left = t - start  # [B, N, M]
  right = end - t

  if center_sample_radius > 0:
    center = 0.5 * (start + end)
    t_min = center - stride * center_sample_radius  # [B, N, M]
    t_max = center + stride * center_sample_radius
    inside = tf.minimum(t - tf.maximum(t_min, start), tf.minimum(t_max, end) - t) > 0
  else:
    inside = tf.minimum(left, right) > 0
  max_dist = tf.maximum(left, right)
  in_range = tf.logical_and(max_dist >= reg_lo, max_dist <= reg_hi)
  valid_gt = (gt_labels >= 0)[:, None, :]  # [B, 1, M]
  candidate = tf.logical_and(tf.logical_and(inside, in_range), valid_gt)  # [B, N, M]

  inf = tf.constant(float("inf"), tf.float32)
  lengths = tf.where(candidate, end - start, inf)  # [B, N, M]
  min_len = tf.reduce_min(lengths, axis=-1, keepdims=True)  # [B, N, 1]
  num_gt = tf.shape(gt_labels)[1]
  gt_index = tf.range(num_gt, dtype=tf.int32)
  # First index attaining the minimum (tf.argmin does not promise which one on ties); an
  # all-inf row (no candidate) gives 0, as torch.min does.
  matched_gt = tf.reduce_min(tf.where(lengths == min_len, gt_index, num_gt), axis=-1)  # [B, N]

  tie = tf.logical_and(lengths <= min_len + _LENGTH_TIE_TOLERANCE, candidate)
  one_hot = tf.one_hot(gt_labels, num_classes, dtype=tf.float32)  # [B, M, K]; -1 -> zeros
  cls_targets = tf.minimum(tf.einsum("bnm,bmk->bnk", tf.cast(tie, tf.float32), one_hot), 1.0)

  dists = tf.stack([left, right], axis=-1)  # [B, N, M, 2]
  reg_targets = tf.gather(dists, matched_gt, axis=2, batch_dims=2) / stride  # [B, N, 2]
  has_gt = tf.reduce_any(gt_labels >= 0, axis=1)[:, None, None]  # [B, 1, 1]
  reg_targets = tf.where(has_gt, reg_targets, 0.0)

  positive = tf.reduce_any(cls_targets > 0, axis=-1)  # [B, N]
  if padding_mask is not None:
    positive = tf.logical_and(positive, _as_bool(padding_mask))
  matched_label = tf.gather(gt_labels, matched_gt, batch_dims=1)  # [B, N]
  matched_label = tf.where(positive, matched_label, -1)
  return {
      "cls_targets": tf.stop_gradient(cls_targets),
      "reg_targets": tf.stop_gradient(reg_targets),
      "positive_mask": positive,
      "matched_gt": matched_gt,
      "matched_label": matched_label,
  }


def _as_bool(mask):
  mask = tf.convert_to_tensor(mask)
  return mask if mask.dtype == tf.bool else tf.not_equal(mask, tf.zeros([], mask.dtype))
