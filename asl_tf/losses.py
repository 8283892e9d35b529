"""Losses: sigmoid focal, 1D DIoU and the ASL loss terms (the EMA loss normaliser is the task's).

All losses are computed in float32. `asl_loss_sums` returns per-replica SUMS; `combine_losses`
divides them by the (globally all-reduced) normalizers. Wiring into a distributed train step:

  targets = targets_lib.assign_targets(out["points"], gt_segments, gt_labels, K,
                                       loss_cfg.center_sample_radius, out["padding_mask"])
  sens = evaluator(out["level_features"], out["level_masks"], out["points"], gt_segments,
                   gt_labels, targets)                       # None when ASL is off
  sums = asl_loss_sums(out, targets, sens, gt_segments, gt_labels, loss_cfg, use_instance)
  ctx = tf.distribute.get_replica_context()
  num_pos = ctx.all_reduce("sum", sums["num_pos"])
  num_anchors = ctx.all_reduce("sum", sums["contrastive_num_anchors"])
  normalizer = task.loss_normalizer.update(num_pos)  # training.task.LossNormalizer
  losses = combine_losses(sums, normalizer, num_anchors, loss_cfg, contrastive_weight)
  # losses["total_loss"] is this replica's share: gradients summed over replicas = the global
  # gradient; do not divide by the replica count again.
"""

import tensorflow as tf


_EPS = 1e-8


def sigmoid_focal_loss(logits, targets, alpha=0.25, gamma=2.0):
  """Element-wise sigmoid focal loss (RetinaNet / ActionFormer), no reduction.

  loss = BCE(z, y) * (1 - p_t)^gamma * (alpha y + (1 - alpha)(1 - y)), p_t = p y + (1-p)(1-y).

  Args:
    logits: [..., K] logits.
    targets: [..., K] targets in [0, 1] (multi-hot, possibly label-smoothed).
    alpha: positive-class weight (< 0 disables the alpha term, as in the reference).
    gamma: focusing exponent.

  Returns:
    float32 [..., K] losses.
  """
  logits = tf.cast(logits, tf.float32)
  targets = tf.cast(targets, tf.float32)
  p = tf.sigmoid(logits)
  ce = tf.nn.sigmoid_cross_entropy_with_logits(labels=targets, logits=logits)
  p_t = p * targets + (1.0 - p) * (1.0 - targets)
  loss = ce * tf.pow(1.0 - p_t, gamma)
  if alpha >= 0:
    loss = loss * (alpha * targets + (1.0 - alpha) * (1.0 - targets))
  return loss


def smooth_labels(targets, label_smoothing, num_classes):
  """ActionFormer's label smoothing: y (1 - e) + e / (K + 1). Returns the same shape."""
  if label_smoothing <= 0:
    return targets
  return targets * (1.0 - label_smoothing) + label_smoothing / (num_classes + 1)


def offset_iou_1d(pred_offsets, target_offsets):
  """tIoU of two segments sharing an anchor point, given as (left, right) distances >= 0.

  Args:
    pred_offsets: [..., 2] (left, right).
    target_offsets: [..., 2] (left, right), same units.

  Returns:
    float32 [...] intersection over union.
  """
  pred_offsets = tf.cast(pred_offsets, tf.float32)
  target_offsets = tf.cast(target_offsets, tf.float32)
  lp, rp = pred_offsets[..., 0], pred_offsets[..., 1]
  lg, rg = target_offsets[..., 0], target_offsets[..., 1]
  inter = tf.minimum(lp, lg) + tf.minimum(rp, rg)
  union = lp + rp + lg + rg - inter
  return inter / tf.maximum(union, _EPS)


def ctr_diou_loss_1d(pred_offsets, target_offsets):
  """ActionFormer's 1D distance-IoU loss on (left, right) offsets, no reduction.

  loss = 1 - IoU + (rho / max(len_c, 1e-8))^2 with rho = (rp - lp - rg + lg) / 2 the distance
  between the two centres and len_c the length of the smallest enclosing segment.

  Args:
    pred_offsets: [..., 2] predicted (left, right) >= 0.
    target_offsets: [..., 2] ground-truth (left, right) >= 0.

  Returns:
    float32 [...] losses.
  """
  pred_offsets = tf.cast(pred_offsets, tf.float32)
  target_offsets = tf.cast(target_offsets, tf.float32)
  lp, rp = pred_offsets[..., 0], pred_offsets[..., 1]
  lg, rg = target_offsets[..., 0], target_offsets[..., 1]
  iou = offset_iou_1d(pred_offsets, target_offsets)
  len_c = tf.maximum(lp, lg) + tf.maximum(rp, rg)
  rho = 0.5 * (rp - lp - rg + lg)
  return 1.0 - iou + tf.square(rho / tf.maximum(len_c, _EPS))


# The authors' commented-out fused target sigmoid(logit)^alpha * IoU^(1 - alpha) (docs/method.md 2).
FUSED_TARGET_ALPHA = 0.2


def instance_targets(cls_logits, offsets, targets, kind="separate"):
  """Detached targets of the instance evaluator (docs/method.md 2, reconstructed).

  `separate`: Q_cls = sigmoid(logit of the matched GT's class at the point), Q_loc = tIoU
  between the segment decoded at the point and its GT (offset parametrisation). `fused`: both
  are sigmoid(logit)^0.2 * tIoU^0.8. Meaningful on positives only.

  Args:
    cls_logits: [B, N, K] logits.
    offsets: [B, N, 2] predicted (left, right) in stride units.
    targets: `targets.assign_targets(...)` (`matched_label`, `reg_targets`).
    kind: `separate` or `fused` (LossConfig.evaluator_target).

  Returns:
    float32 [B, N, 2] (Q_cls, Q_loc), stop-gradient.
  """
  cls_logits = tf.cast(cls_logits, tf.float32)
  label = tf.maximum(targets["matched_label"], 0)
  logit = tf.gather(cls_logits, label[..., None], axis=2, batch_dims=2)[..., 0]  # [B, N]
  score = tf.sigmoid(logit)
  iou = offset_iou_1d(offsets, targets["reg_targets"])
  if kind == "fused":
    # Off positives reg_targets can be negative, and so the IoU; a NaN there would reach the
    # evaluator's gradient through the masked loss (0 * NaN).
    iou = tf.clip_by_value(iou, 0.0, 1.0)
    fused = tf.pow(score, FUSED_TARGET_ALPHA) * tf.pow(iou, 1.0 - FUSED_TARGET_ALPHA)
    return tf.stop_gradient(tf.stack([fused, fused], axis=-1))
  if kind != "separate":
    raise ValueError(f"evaluator_target={kind!r}: use 'separate' or 'fused'")
  return tf.stop_gradient(tf.stack([score, iou], axis=-1))


def evaluator_loss(q, q_target, kind, logits=None):
  """Per-point loss of the instance evaluator, summed over its two outputs.

  Args:
    q: float32 [..., 2] predictions in (0, 1).
    q_target: float32 [..., 2] targets in [0, 1].
    kind: `mse` (squared error) or `bce` (binary cross-entropy with soft targets).
    logits: the logits of q, for `bce` (its gradient then never vanishes at saturation);
      without them q is clipped to [1e-7, 1 - 1e-7].

  Returns:
    float32 [...].
  """
  if kind == "mse":
    return tf.reduce_sum(tf.square(q - q_target), axis=-1)
  if kind != "bce":
    raise ValueError(f"evaluator_loss={kind!r}: use 'mse' or 'bce'")
  if logits is not None:
    return tf.reduce_sum(tf.nn.sigmoid_cross_entropy_with_logits(
        labels=q_target, logits=tf.cast(logits, tf.float32)), axis=-1)
  q = tf.clip_by_value(q, 1e-7, 1.0 - 1e-7)
  return -tf.reduce_sum(q_target * tf.math.log(q) + (1.0 - q_target) * tf.math.log(1.0 - q),
                        axis=-1)


def normalize_per_instance(weights, positive, matched_gt, num_gt):
  """Divides each positive's weight by the mean weight of its GT instance's positives (with
  `matched_gt` all 0 and `num_gt` 1: of its video's positives).

  Every GT instance's positives then have mean weight exactly 1 (the loss mass of plain
  ActionFormer), and the weights only move emphasis between its frames (weights are first taken
  relative to the instance's largest, so tiny ones keep their ratios; only exact zeros stay 0).
  Negatives are returned unchanged. Gradients flow through the mean, which rewards moving an
  instance's weight onto its lowest-loss frames.

  Args:
    weights: float32 [B, N] per-point weights (> 0 on positives).
    positive: bool [B, N].
    matched_gt: int [B, N] index of each point's GT in [0, num_gt) (read on positives only).
    num_gt: M, the padded GT count (static or scalar tensor).

  Returns:
    float32 [B, N].
  """
  weights = tf.cast(weights, tf.float32)
  batch = tf.shape(weights)[0]
  ids = tf.range(batch)[:, None] * num_gt + tf.clip_by_value(
      tf.cast(matched_gt, tf.int32), 0, num_gt - 1)  # [B, N]
  pos = tf.cast(positive, tf.float32)
  # Relative to the instance's largest weight first, so that tiny weights (a narrow Gaussian
  # far from its mean) keep their ratios instead of meeting a floor.
  peak = tf.math.unsorted_segment_max(tf.where(positive, weights, 0.0), ids, batch * num_gt)
  relative = weights / tf.maximum(tf.gather(peak, ids), 1e-30)  # [B, N], <= 1 on positives
  sums = tf.math.unsorted_segment_sum(relative * pos, ids, batch * num_gt)
  counts = tf.math.unsorted_segment_sum(pos, ids, batch * num_gt)
  mean = tf.gather(sums / tf.maximum(counts, 1.0), ids)  # [B, N], >= 1 / count on positives
  return tf.where(positive, relative / tf.maximum(mean, 1e-12), weights)


def video_label_loss_sum(cls_logits, padding_mask, gt_labels):
  """The label-involved loss of the authors' Ego4D code, summed over videos and classes.

  S[b, k] = max over the video's points of softmax_k(logits) (a padding point counts as the
  uniform 1 / K, as the authors' masking makes it); y[b, k] = 1 if some GT of the video (the
  training window) has class k; the loss is sum_{b, k} BCE(S, y). log S is taken from the log
  softmax (finite where S underflows), and 1 - S is floored at 1e-7 so that a saturated softmax
  stays finite (the authors take the plain logs of S and 1 - S).

  Args:
    cls_logits: [B, N, K] logits.
    padding_mask: bool [B, N], true on valid points.
    gt_labels: int [B, M] class ids, -1 = padding.

  Returns:
    float32 scalar.
  """
  logits = tf.cast(cls_logits, tf.float32)
  num_classes = logits.shape[-1]
  logits = tf.where(tf.cast(padding_mask, tf.bool)[..., None], logits, -1e7)
  # log S = max log softmax (the log is monotone): exact where softmax underflows.
  log_scores = tf.reduce_max(tf.nn.log_softmax(logits, axis=-1), axis=1)  # [B, K]
  log_complement = tf.math.log(tf.maximum(-tf.math.expm1(log_scores), 1e-7))  # log(1 - S)
  present = tf.reduce_max(tf.one_hot(gt_labels, num_classes, dtype=tf.float32), axis=1)  # [B, K]
  return -tf.reduce_sum(present * log_scores + (1.0 - present) * log_complement)


def combine_point_weights(class_weight, instance_weight, combination, power=1.0):
  """Combines class-level weights p with the evaluator's quality q: `product` p * sg(q)^power
  or `sum` p + sg(q)^power. Shapes broadcast; returns float32."""
  q = tf.stop_gradient(tf.cast(instance_weight, tf.float32))
  if power != 1.0:
    q = tf.pow(q, power)
  if combination == "product":
    return class_weight * q
  if combination == "sum":
    return class_weight + q
  raise ValueError(f"instance_combination={combination!r}: use 'product' or 'sum'")


def sample_contrastive_features(embeddings, padding_mask, t, gt_segments, gt_labels, rank_cls,
                                rank_loc, topk, num_background):
  """Sensitive and background features for the contrastive loss (docs/method.md 4, reconstructed).

  Per GT n, among the valid level-0 points inside [a_n, b_n] (inclusive), the `topk` with the
  largest `rank_cls` are averaged into f_cls(n) and the `topk` with the largest `rank_loc` into
  f_loc(n) (fewer if the segment holds fewer points; both re-normalised to unit length). A GT
  without any point inside is dropped. Per video, `num_background` points outside every GT are
  taken evenly spaced among the candidates (ranks floor((j + 0.5) c / num_background) of the c
  candidates; all c of them when c < num_background). Everything has static shape.

  Args:
    embeddings: float32 [B, T, D] unit-norm level-0 features.
    padding_mask: bool [B, T].
    t: float32 [T] level-0 point locations.
    gt_segments: float32 [B, M, 2]; gt_labels: int [B, M] (-1 = padding).
    rank_cls, rank_loc: float32 [B, T, M] ranking scores of every (point, GT) pair.
    topk: points averaged per GT and sub-task.
    num_background: background points per video.

  Returns:
    (features [2BM + B num_background, D], labels int32 [...] (GT class, -1 for background),
    valid bool [...]): the cls features of every GT, then the loc features, then background.
  """
  embeddings = tf.cast(embeddings, tf.float32)
  gt_labels = tf.cast(gt_labels, tf.int32)
  dim = embeddings.shape[-1]
  num_points = embeddings.shape[1]
  valid_gt = gt_labels >= 0  # [B, M]
  start = gt_segments[:, None, :, 0]  # [B, 1, M]
  end = gt_segments[:, None, :, 1]
  inside = tf.logical_and(t[None, :, None] >= start, t[None, :, None] <= end)  # [B, T, M]
  inside = tf.logical_and(inside, tf.logical_and(valid_gt[:, None, :], padding_mask[..., None]))
  inside_mt = tf.transpose(inside, [0, 2, 1])  # [B, M, T]
  k = min(topk, num_points) if num_points is not None else topk

  def pool(rank):
    score = tf.where(inside_mt, tf.transpose(rank, [0, 2, 1]), -1e9)  # [B, M, T]
    _, idx = tf.math.top_k(score, k=k)  # [B, M, k]
    picked = tf.cast(tf.gather(inside_mt, idx, batch_dims=2), tf.float32)  # [B, M, k]
    feats = tf.gather(embeddings, idx, batch_dims=1)  # [B, M, k, D]
    mean = tf.reduce_sum(feats * picked[..., None], axis=2) / tf.maximum(
        tf.reduce_sum(picked, axis=2, keepdims=True), 1.0)  # [B, M, D]
    return tf.math.l2_normalize(mean, axis=-1, epsilon=1e-12)

  has_points = tf.logical_and(valid_gt, tf.reduce_any(inside_mt, axis=-1))  # [B, M]
  f_cls = tf.reshape(pool(rank_cls), [-1, dim])  # [B M, D]
  f_loc = tf.reshape(pool(rank_loc), [-1, dim])

  candidate = tf.logical_and(padding_mask, tf.logical_not(tf.reduce_any(
      tf.logical_and(t[None, :, None] >= start,
                     tf.logical_and(t[None, :, None] <= end, valid_gt[:, None, :])), axis=-1)))
  cand_i = tf.cast(candidate, tf.int32)  # [B, T]
  rank = tf.cumsum(cand_i, axis=1) - 1
  count = tf.reduce_sum(cand_i, axis=1, keepdims=True)  # [B, 1]
  j = tf.range(num_background, dtype=tf.int32)[None, :]  # [1, J]
  spaced = tf.cast(tf.floor((tf.cast(j, tf.float32) + 0.5) * tf.cast(count, tf.float32)
                            / num_background), tf.int32)
  target = tf.where(count >= num_background, spaced, j)  # [B, J]
  select = tf.logical_and(candidate[:, None, :], tf.equal(rank[:, None, :], target[..., None]))
  f_bg = tf.einsum("bjt,btd->bjd", tf.cast(select, tf.float32), embeddings)  # [B, J, D]
  f_bg = tf.reshape(f_bg, [-1, dim])  # [B J, D]
  bg_valid = tf.reshape(tf.broadcast_to(j < count, tf.shape(target)), [-1])

  labels = tf.reshape(gt_labels, [-1])
  inst_valid = tf.reshape(has_points, [-1])
  features = tf.concat([f_cls, f_loc, f_bg], axis=0)
  all_labels = tf.concat([labels, labels, -tf.ones_like(bg_valid, tf.int32)], axis=0)
  valid = tf.concat([inst_valid, inst_valid, bg_valid], axis=0)
  return features, all_labels, valid


def sample_window_features(embeddings, padding_mask, t, gt_segments, gt_labels, window_ratio,
                           gap_grid, clear_background=False):
  """Centre, boundary and outside-window features per GT (the authors' windows, docs/method.md 4).

  Per GT n = [a, b] (grid units of level 0), with half-width w = max(window_ratio (b - a), 1):
    centre   = mean of the valid level-0 points in [c - w, c + w], c = (a + b) / 2;
    boundary = mean of the means over [a, a + w] and over [b - w, b];
    outside  = mean of the means over [a - gap - w, a - gap] and over [b + gap, b + gap + w].
  Windows are inclusive; an empty window (outside the video or in its padding) is left out of its
  pair's mean, and a feature whose windows are all empty is invalid. Each feature is
  re-normalised to unit length. Centre and boundary features carry the GT's class; outside
  features are background (label -1: negatives only, never anchors or positives). An outside
  window may fall inside another GT (on densely labelled data it often does): the authors' code
  keeps such frames (`clear_background=False`); `clear_background=True` leaves out of the outside
  windows every frame inside a GT.

  Args:
    embeddings: float32 [B, T, D] unit-norm level-0 features.
    padding_mask: bool [B, T].
    t: float32 [T] level-0 point locations.
    gt_segments: float32 [B, M, 2]; gt_labels: int [B, M] (-1 = padding).
    window_ratio: w / (b - a) (the authors' `length_theta`, 0.2).
    gap_grid: distance of the outside windows from the GT (the authors' `gap`, 1.0).
    clear_background: outside windows take only frames outside every GT.

  Returns:
    (features [3BM, D], labels int32 [3BM], valid bool [3BM]): the centre features of every GT,
    then the boundary features, then the outside ones.
  """
  embeddings = tf.cast(embeddings, tf.float32)
  gt_labels = tf.cast(gt_labels, tf.int32)
  dim = embeddings.shape[-1]
  valid_gt = gt_labels >= 0  # [B, M]
  start, end = gt_segments[..., 0], gt_segments[..., 1]  # [B, M]
  half = tf.maximum(window_ratio * (end - start), 1.0)
  centre = 0.5 * (start + end)
  usable = tf.logical_and(padding_mask[:, None, :], valid_gt[..., None])  # [B, M, T]
  background = usable
  if clear_background:
    in_gt = tf.logical_and(t[None, None, :] >= start[..., None], t[None, None, :] <= end[..., None])
    in_any_gt = tf.reduce_any(tf.logical_and(in_gt, valid_gt[..., None]), axis=1)  # [B, T]
    background = tf.logical_and(usable, tf.logical_not(in_any_gt)[:, None, :])

  def window_mean(low, high, frames=usable):  # [B, M] each -> ([B, M, D], bool [B, M])
    inside = tf.logical_and(t[None, None, :] >= low[..., None], t[None, None, :] <= high[..., None])
    weight = tf.cast(tf.logical_and(inside, frames), tf.float32)  # [B, M, T]
    count = tf.reduce_sum(weight, axis=-1)  # [B, M]
    total = tf.einsum("bmt,btd->bmd", weight, embeddings)
    return total / tf.maximum(count, 1.0)[..., None], count > 0

  def pair_mean(first, second):
    (mean1, ok1), (mean2, ok2) = first, second
    n1, n2 = tf.cast(ok1, tf.float32)[..., None], tf.cast(ok2, tf.float32)[..., None]
    mean = (mean1 * n1 + mean2 * n2) / tf.maximum(n1 + n2, 1.0)
    return mean, tf.logical_or(ok1, ok2)

  parts = [
      window_mean(centre - half, centre + half),
      pair_mean(window_mean(start, start + half), window_mean(end - half, end)),
      pair_mean(window_mean(start - gap_grid - half, start - gap_grid, background),
                window_mean(end + gap_grid, end + gap_grid + half, background)),
  ]
  features = tf.concat([tf.reshape(tf.math.l2_normalize(mean, axis=-1, epsilon=1e-12), [-1, dim])
                        for mean, _ in parts], axis=0)  # [3 B M, D]
  valid = tf.concat([tf.reshape(ok, [-1]) for _, ok in parts], axis=0)
  labels = tf.reshape(gt_labels, [-1])
  all_labels = tf.concat([labels, labels, -tf.ones_like(labels)], axis=0)
  return features, all_labels, valid


def multi_positive_info_nce(features, labels, valid, temperature, anchor_rows=None):
  """Multi-positive InfoNCE (supervised contrastive) with cosine similarity.

  Anchors are the valid features with label >= 0 (background has label -1 and is only a
  negative). For anchor a, positives P(a) are the other valid features with the same label and
  the denominator runs over every other valid feature:
    loss_a = -log( sum_{p in P(a)} exp(s_ap / tau) / sum_{k != a, valid} exp(s_ak / tau) ).
  The anchor's own column is removed (the authors' code multiplies the self-logit by 0, which
  leaves exp(0) = 1 in the denominator; we exclude it). Masked entries get a large negative
  finite logit instead of -inf, which underflows exp() to exactly 0 and keeps gradients NaN-free.

  Args:
    features: [F, D] L2-normalised features.
    labels: int [F] class ids; -1 = background (negative only).
    valid: bool [F] which rows exist (padding = false).
    temperature: tau.
    anchor_rows: optional bool [F]: only these rows may be anchors (every valid row is still a
      positive / negative). Under tf.distribute each replica gathers all replicas' features and
      sums only over its own rows, so the per-replica sums add up to the global loss.

  Returns:
    (loss_sum, num_anchors): float32 scalars; the sum over anchors with at least one positive
    and their count. The mean is loss_sum / max(num_anchors, 1).
  """
  features = tf.cast(features, tf.float32)
  labels = tf.cast(labels, tf.int32)
  valid = tf.cast(valid, tf.bool)
  logits = tf.matmul(features, features, transpose_b=True) / temperature  # [F, F]
  num = tf.shape(features)[0]
  not_self = tf.logical_not(tf.eye(num, dtype=tf.bool))
  others = tf.logical_and(not_self, tf.logical_and(valid[None, :], valid[:, None]))
  is_action = tf.logical_and(valid, labels >= 0)
  same = tf.logical_and(tf.equal(labels[:, None], labels[None, :]), is_action[None, :])
  positives = tf.logical_and(others, same)  # [F, F]
  very_negative = tf.constant(-1e9, tf.float32)
  log_denominator = tf.reduce_logsumexp(tf.where(others, logits, very_negative), axis=1)
  log_numerator = tf.reduce_logsumexp(tf.where(positives, logits, very_negative), axis=1)
  anchors = tf.logical_and(is_action, tf.reduce_any(positives, axis=1))  # [F]
  if anchor_rows is not None:
    anchors = tf.logical_and(anchors, tf.cast(anchor_rows, tf.bool))
  per_anchor = tf.where(anchors, log_denominator - log_numerator, 0.0)
  return tf.reduce_sum(per_anchor), tf.reduce_sum(tf.cast(anchors, tf.float32))


def asl_loss_sums(outputs, targets, sensitivity, gt_segments, gt_labels, loss_config,
                  use_instance_weights=True, gather_fn=None, evaluator_targets=None):
  """Per-replica loss sums of ActionFormer + ASL (docs/method.md 1-5).

  * `cls_loss_sum` = sum over valid points of w_cls(t) * sum_k focal(t, k); w_cls = 1 on
    negatives (and everywhere without ASL).
  * `reg_loss_sum` = sum over positives of w_loc(t) * DIoU(t).
  * `evaluator_loss_sum` = sum over the evaluator's points (the positives, or those of
    `evaluator_targets`) of `evaluator_loss(q, Q)` (MSE or BCE) with detached targets Q
    (`instance_targets`; 0 without the instance evaluator).
  * `contrastive_loss_sum`, `contrastive_num_anchors`: action-sensitive contrastive loss summed
    over anchors, and the anchor count (0 without ASCL). Unlike the other terms it is a mean over
    anchors, not normalised by the positive count.
  * `video_label_loss_sum`: `video_label_loss_sum` when LossConfig.video_label_loss_weight > 0,
    else 0.
  * `num_pos`: positive points (float32).
  With the instance evaluator, w = combine(p, q^instance_weight_power) on positives
  (LossConfig.instance_combination; on the losses LossConfig.instance_weighted_losses names)
  once `use_instance_weights` is true, else w = p; with `sensitivity_normalization=instance`
  (`video`), w is then divided by its mean over each GT instance's (each video's) positives
  (`normalize_per_instance`).

  Args:
    outputs: the detector's dict: `cls_logits` [B, N, K], `offsets` [B, N, 2],
      `padding_mask` bool [B, N] (and `points`, used through `targets`).
    targets: `targets.assign_targets(...)`.
    sensitivity: the dict returned by `ActionSensitivityEvaluator`, or None (plain
      ActionFormer losses).
    gt_segments: float32 [B, M, 2]; gt_labels: int [B, M] (-1 = padding).
    loss_config: `config.LossConfig`.
    use_instance_weights: Python bool or bool scalar tensor, e.g.
      `epoch >= loss_config.instance_start_epoch`.
    gather_fn: optional `(feats [F, D], labels [F], valid [F]) -> (feats [G, D], labels [G],
      valid [G], own_rows [G])` gathering the contrastive features of every replica (see
      `multi_positive_info_nce`'s `anchor_rows`); None = this replica's batch only.
    evaluator_targets: optional assignment (`targets.assign_targets`) whose positives the
      evaluator also learns from, with their targets (LossConfig.evaluator_points); on the
      points positive in `targets` it keeps those targets. None = `targets` only.

  Returns:
    dict of float32 scalars (see above).
  """
  cls_logits = tf.cast(outputs["cls_logits"], tf.float32)
  offsets = tf.cast(outputs["offsets"], tf.float32)
  valid = tf.cast(outputs["padding_mask"], tf.bool)
  positive = tf.logical_and(targets["positive_mask"], valid)
  num_classes = cls_logits.shape[-1]
  cls_targets = smooth_labels(targets["cls_targets"], loss_config.label_smoothing, num_classes)
  focal = tf.reduce_sum(sigmoid_focal_loss(cls_logits, cls_targets, loss_config.focal_alpha,
                                           loss_config.focal_gamma), axis=-1)  # [B, N]
  safe_offsets = tf.where(positive[..., None], offsets, 1.0)  # no NaN gradient off positives
  safe_targets = tf.where(positive[..., None], targets["reg_targets"], 1.0)
  diou = ctr_diou_loss_1d(safe_offsets, safe_targets)  # [B, N]

  if evaluator_targets is None:
    evaluator_targets, evaluator_mask = targets, positive
  else:
    # A positive keeps its own GT (the one its weights act on), even where a shorter
    # overlapping GT holds it in the whole-segment assignment.
    evaluator_mask = tf.logical_or(
        positive, tf.logical_and(evaluator_targets["positive_mask"], valid))
    evaluator_targets = {
        "matched_label": tf.where(positive, targets["matched_label"],
                                  evaluator_targets["matched_label"]),
        "reg_targets": tf.where(positive[..., None], targets["reg_targets"],
                                evaluator_targets["reg_targets"]),
    }
  w_cls = tf.ones_like(focal)
  w_loc = tf.ones_like(focal)
  zero = tf.constant(0.0, tf.float32)
  evaluator_sum, contrastive_sum, contrastive_anchors = zero, zero, zero
  if sensitivity is not None:
    w_cls, w_loc = sensitivity["p_cls"], sensitivity["p_loc"]
    combination, power = loss_config.instance_combination, loss_config.instance_weight_power
    if "q" in sensitivity:
      q = tf.cast(sensitivity["q"], tf.float32)  # [B, N, 2]
      q_target = instance_targets(cls_logits, offsets, evaluator_targets,
                                  loss_config.evaluator_target)  # [B, N, 2]
      per_point = evaluator_loss(q, q_target, loss_config.evaluator_loss,
                                 logits=sensitivity.get("q_logits"))
      evaluator_sum = tf.reduce_sum(tf.where(evaluator_mask, per_point, 0.0))
      use = tf.logical_and(positive, tf.cast(use_instance_weights, tf.bool))
      weighted = loss_config.instance_weighted_losses
      if weighted in ("both", "classification"):
        w_cls = tf.where(use, combine_point_weights(w_cls, q[..., 0], combination, power), w_cls)
      if weighted in ("both", "regression"):
        w_loc = tf.where(use, combine_point_weights(w_loc, q[..., 1], combination, power), w_loc)
    normalization = loss_config.sensitivity_normalization
    if normalization == "instance":
      groups, num_groups = targets["matched_gt"], tf.shape(gt_labels)[1]
    elif normalization == "video":  # one group per video: every positive's group 0 of 1
      groups, num_groups = tf.zeros_like(positive, tf.int32), 1
    if normalization != "none":
      w_cls = normalize_per_instance(w_cls, positive, groups, num_groups)
      w_loc = normalize_per_instance(w_loc, positive, groups, num_groups)
    if "embeddings" in sensitivity:
      if loss_config.contrastive_sampling.startswith("windows"):
        feats, labels, feat_valid = sample_window_features(
            sensitivity["embeddings"], sensitivity["level0_mask"], sensitivity["level0_t"],
            gt_segments, gt_labels, loss_config.contrastive_window_ratio,
            loss_config.contrastive_window_gap_grid,
            clear_background=loss_config.contrastive_sampling == "windows_clear_background")
      else:
        rank_cls, rank_loc = sensitivity["rank_cls"], sensitivity["rank_loc"]
        if "q" in sensitivity:
          num_level0 = tf.shape(sensitivity["embeddings"])[1]
          q0 = tf.stop_gradient(tf.cast(sensitivity["q"][:, :num_level0], tf.float32))  # [B, T0, 2]
          rank_cls = combine_point_weights(rank_cls, q0[..., 0:1], combination, power)
          rank_loc = combine_point_weights(rank_loc, q0[..., 1:2], combination, power)
        feats, labels, feat_valid = sample_contrastive_features(
            sensitivity["embeddings"], sensitivity["level0_mask"], sensitivity["level0_t"],
            gt_segments, gt_labels, rank_cls, rank_loc, loss_config.contrastive_topk,
            loss_config.contrastive_num_background)
      own_rows = None
      if gather_fn is not None:
        feats, labels, feat_valid, own_rows = gather_fn(feats, labels, feat_valid)
      contrastive_sum, contrastive_anchors = multi_positive_info_nce(
          feats, labels, feat_valid, loss_config.contrastive_temperature, anchor_rows=own_rows)

  cls_sum = tf.reduce_sum(tf.where(valid, w_cls * focal, 0.0))
  reg_sum = tf.reduce_sum(tf.where(positive, w_loc * diou, 0.0))
  video_label_sum = zero
  if loss_config.video_label_loss_weight > 0:
    video_label_sum = video_label_loss_sum(cls_logits, valid, gt_labels)
  return {
      "cls_loss_sum": cls_sum,
      "reg_loss_sum": reg_sum,
      "evaluator_loss_sum": evaluator_sum,
      "contrastive_loss_sum": contrastive_sum,
      "contrastive_num_anchors": contrastive_anchors,
      "video_label_loss_sum": video_label_sum,
      "num_pos": tf.reduce_sum(tf.cast(positive, tf.float32)),
  }


def combine_losses(sums, normalizer, num_anchors, loss_config, contrastive_weight,
                   global_sums=None):
  """Turns `asl_loss_sums` into losses (docs/method.md 5).

  total = cls/n + w reg/n + evaluator_loss_weight eval/n
          + contrastive_weight contrastive_sum / max(num_anchors, 1)
          + video_label_loss_weight video_label/n

  with w = reg_loss_weight, or, when that is <= 0, ActionFormer's automatic balance
  w = cls / max(reg, 0.01) over the global batch's losses, held constant (not differentiated).

  Args:
    sums: the dict from `asl_loss_sums` (this replica's sums).
    normalizer: the updated `LossNormalizer` value (from the global positive count).
    num_anchors: contrastive anchors, all-reduced over replicas (`sums[...]` on one device).
    loss_config: `config.LossConfig`.
    contrastive_weight: `ModelConfig.contrastive_weight`.
    global_sums: (cls_loss_sum, reg_loss_sum) all-reduced over replicas, for the automatic
      balance (None: this replica's, i.e. one device).

  Returns:
    dict of float32 scalars `cls_loss`, `reg_loss`, `evaluator_loss`, `contrastive_loss`,
    `video_label_loss`, `total_loss` (this replica's share of the global loss).
  """
  cls_loss = sums["cls_loss_sum"] / normalizer
  reg_loss = sums["reg_loss_sum"] / normalizer
  evaluator_loss = sums["evaluator_loss_sum"] / normalizer
  contrastive_loss = sums["contrastive_loss_sum"] / tf.maximum(
      tf.cast(num_anchors, tf.float32), 1.0)
  video_label_loss = sums["video_label_loss_sum"] / normalizer
  reg_weight = loss_config.reg_loss_weight
  if reg_weight <= 0:
    cls_sum, reg_sum = global_sums or (sums["cls_loss_sum"], sums["reg_loss_sum"])
    reg_weight = tf.stop_gradient(cls_sum / tf.maximum(reg_sum, 0.01 * normalizer))
  total = (cls_loss + reg_weight * reg_loss
           + loss_config.evaluator_loss_weight * evaluator_loss
           + contrastive_weight * contrastive_loss
           + loss_config.video_label_loss_weight * video_label_loss)
  return {
      "cls_loss": cls_loss,
      "reg_loss": reg_loss,
      "evaluator_loss": evaluator_loss,
      "contrastive_loss": contrastive_loss,
      "video_label_loss": video_label_loss,
      "total_loss": total,
  }
