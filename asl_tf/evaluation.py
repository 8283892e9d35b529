"""Temporal action detection metrics (ActivityNet protocol), vectorized NumPy.

Reproduces `compute_average_precision_detection` of the official ActivityNet evaluation code
(which ActionFormer's evaluation copies):

* per class, predictions are sorted by decreasing score; each one, at each tIoU threshold, is a
  true positive if some still-unmatched ground truth of its video and class has tIoU >= the
  threshold (it takes the one with the highest tIoU), otherwise a false positive;
* AP is the interpolated precision envelope integrated over recall (VOC 2011);
* mAP is the mean AP over the classes that have ground truth (predictions of other classes are
  ignored); average mAP is the mean over thresholds.

Recall@kx (ActionFormer / Ego4D `compute_topkx_recall_detection`): per class and video, the
top k x (number of ground truths of that class in that video) predictions by score; a ground
truth counts as recalled if any of them has tIoU >= the threshold; recall per class is recalled /
ground truths, then averaged over the classes with ground truth.

Ties: predictions with equal scores keep their input order (a stable sort; the reference's
`argsort()[::-1]` leaves tie order unspecified), and a prediction with equal tIoU to several
unmatched ground truths takes the first one in input order.

The matching is independent per (class, video) group, so it runs in rounds: round r handles the
r-th best prediction of every group at once.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from asl_tf import files


@dataclasses.dataclass
class Detections:
  """A flat table of detections (one row per detection).

  Attributes:
    video_ids: str [P].
    segments_sec: float64 [P, 2] (start, end) in seconds.
    scores: float64 [P].
    labels: int64 [P] class ids.
  """
  video_ids: np.ndarray
  segments_sec: np.ndarray
  scores: np.ndarray
  labels: np.ndarray

  def __post_init__(self):
    self.video_ids = np.asarray(self.video_ids, dtype=object).reshape(-1)
    self.segments_sec = np.asarray(self.segments_sec, np.float64).reshape(-1, 2)
    self.scores = np.asarray(self.scores, np.float64).reshape(-1)
    self.labels = np.asarray(self.labels, np.int64).reshape(-1)
    sizes = {len(self.video_ids), len(self.segments_sec), len(self.scores), len(self.labels)}
    if len(sizes) != 1:
      raise ValueError(f"Detections columns differ in length: video_ids {len(self.video_ids)}, "
                       f"segments {len(self.segments_sec)}, scores {len(self.scores)}, labels "
                       f"{len(self.labels)}")

  def __len__(self):
    return len(self.scores)

  @classmethod
  def from_padded(cls, video_ids: Sequence[str], segments_sec, scores, labels,
                  num_detections) -> "Detections":
    """From `postprocess_detections` outputs: [B, D, 2], [B, D], [B, D], [B] arrays."""
    segments_sec, scores = np.asarray(segments_sec), np.asarray(scores)
    labels, num_detections = np.asarray(labels), np.asarray(num_detections)
    keep = np.arange(scores.shape[1])[None, :] < num_detections[:, None]  # [B, D]
    ids = np.repeat(np.asarray(list(video_ids), dtype=object), keep.sum(axis=1))
    return cls(ids, segments_sec[keep], scores[keep], labels[keep])

  @classmethod
  def from_per_video(cls, per_video: Mapping[str, Mapping[str, np.ndarray]]) -> "Detections":
    """From {video_id: {"segments_sec": [P, 2], "scores": [P], "labels": [P]}}."""
    ids, segs, scores, labels = [], [], [], []
    for video_id, det in per_video.items():
      n = len(det["scores"])
      ids.extend([video_id] * n)
      segs.append(np.asarray(det["segments_sec"], np.float64).reshape(-1, 2))
      scores.append(np.asarray(det["scores"], np.float64).reshape(-1))
      labels.append(np.asarray(det["labels"], np.int64).reshape(-1))
    if not ids:
      return cls([], np.zeros([0, 2]), [], [])
    return cls(ids, np.concatenate(segs), np.concatenate(scores), np.concatenate(labels))


def _field(record: Any, name: str):
  return record[name] if isinstance(record, Mapping) else getattr(record, name)


def ground_truth_table(records: Iterable[Any]) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Flattens per-video ground-truth records.

  Args:
    records: objects or dicts with `video_id`, `segments_sec` [N, 2] and `labels` [N].

  Returns:
    (video_ids str [G], segments_sec float64 [G, 2], labels int64 [G]).
  """
  ids, segs, labels = [], [], []
  for record in records:
    seg = np.asarray(_field(record, "segments_sec"), np.float64).reshape(-1, 2)
    lab = np.asarray(_field(record, "labels"), np.int64).reshape(-1)
    if len(seg) != len(lab):
      raise ValueError(f"video {_field(record, 'video_id')}: {len(seg)} segments but "
                       f"{len(lab)} labels")
    ids.extend([_field(record, "video_id")] * len(seg))
    segs.append(seg)
    labels.append(lab)
  if not ids:
    return np.zeros([0], object), np.zeros([0, 2]), np.zeros([0], np.int64)
  return np.asarray(ids, object), np.concatenate(segs), np.concatenate(labels)


@dataclasses.dataclass
class EvalResult:
  """Detection metrics.

  Attributes:
    tiou_thresholds: float [T].
    mAP: float [T], mean AP over `class_ids`.
    average_mAP: mean of mAP.
    class_ids: int [C] classes with ground truth, ascending.
    ap: float [T, C] per-class AP.
    recall_topk: the k of Recall@kx.
    recall: float [T, len(recall_topk)] Recall@kx averaged over classes.
    num_dropped_detections: detections of videos outside `video_ids` (dropped).
  """
  tiou_thresholds: np.ndarray
  mAP: np.ndarray
  average_mAP: float
  class_ids: np.ndarray
  ap: np.ndarray
  recall_topk: Tuple[int, ...]
  recall: np.ndarray
  num_dropped_detections: int = 0

  def to_dict(self, class_names: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """JSON-ready metrics (`metrics.json`): fractions, not percent."""
    names = [class_names[c] if class_names is not None else str(c) for c in self.class_ids]
    out = {
        "tiou_thresholds": [float(t) for t in self.tiou_thresholds],
        "mAP": [float(m) for m in self.mAP],
        "average_mAP": float(self.average_mAP),
        "per_class_ap": {n: [float(a) for a in self.ap[:, i]] for i, n in enumerate(names)},
        "num_dropped_detections": int(self.num_dropped_detections),
    }
    for j, k in enumerate(self.recall_topk):
      out[f"recall@{k}x"] = [float(r) for r in self.recall[:, j]]
    return out


def segment_iou(pred_segments: np.ndarray, gt_segments: np.ndarray) -> np.ndarray:
  """Element-wise tIoU of paired segments, exactly as the ActivityNet code computes it.

  Args:
    pred_segments: float [..., 2].
    gt_segments: float [..., 2] (broadcast against pred_segments).

  Returns:
    float64 [...] tIoU.
  """
  inter = np.clip(np.minimum(pred_segments[..., 1], gt_segments[..., 1])
                  - np.maximum(pred_segments[..., 0], gt_segments[..., 0]), 0, None)
  union = ((gt_segments[..., 1] - gt_segments[..., 0])
           + (pred_segments[..., 1] - pred_segments[..., 0]) - inter)
  with np.errstate(divide="ignore", invalid="ignore"):
    return inter.astype(np.float64) / union


def interpolated_ap(precision: np.ndarray, recall: np.ndarray) -> float:
  """VOC 2011 interpolated AP: precision envelope integrated over recall."""
  mprec = np.concatenate([[0.0], precision, [0.0]])
  mrec = np.concatenate([[0.0], recall, [1.0]])
  mprec = np.maximum.accumulate(mprec[::-1])[::-1]
  idx = np.nonzero(mrec[1:] != mrec[:-1])[0] + 1
  return float(np.sum((mrec[idx] - mrec[idx - 1]) * mprec[idx]))


def evaluate_detections(ground_truth: Iterable[Any], detections: Detections,
                        tiou_thresholds: Sequence[float], recall_topk: Sequence[int] = (1, 5),
                        video_ids: Optional[Iterable[str]] = None) -> EvalResult:
  """mAP at each tIoU threshold, average mAP, per-class AP and Recall@kx.

  Args:
    ground_truth: per-video records with `video_id`, `segments_sec` [N, 2], `labels` [N]
      (objects or dicts).
    detections: a `Detections` table.
    tiou_thresholds: e.g. EvalConfig.tiou_thresholds.
    recall_topk: k values of Recall@kx.
    video_ids: the evaluated videos, including those without ground truth. When given,
      detections of other videos are dropped, counted and logged; when None, every detection
      counts (a video without ground truth only contributes false positives).

  Returns:
    An EvalResult.
  """
  thresholds = np.asarray(tiou_thresholds, np.float64)
  topk = tuple(int(k) for k in recall_topk)
  gt_vid, gt_seg, gt_lab = ground_truth_table(ground_truth)
  det = detections
  dropped = 0
  if video_ids is not None:
    known = set(video_ids) | set(gt_vid.tolist())
    keep = np.fromiter((v in known for v in det.video_ids), bool, len(det))
    dropped = int((~keep).sum())
    if dropped:
      logging.warning("evaluation: %d detection(s) of %d unknown video(s) dropped (first: %s)",
                      dropped, len(set(det.video_ids[~keep])), det.video_ids[~keep][0])
      det = Detections(det.video_ids[keep], det.segments_sec[keep], det.scores[keep],
                       det.labels[keep])

  class_ids = np.unique(gt_lab)
  num_thr, num_cls = len(thresholds), len(class_ids)
  ap = np.zeros([num_thr, num_cls])
  recall = np.zeros([num_thr, len(topk), num_cls])
  if num_cls == 0:
    return EvalResult(thresholds, np.zeros(num_thr), 0.0, class_ids, ap, topk,
                      np.zeros([num_thr, len(topk)]), dropped)

  # Integer ids: videos over GT and detections; classes over GT only.
  all_vids, vid_codes = np.unique(np.concatenate([gt_vid, det.video_ids]).astype(str),
                                  return_inverse=True)
  gt_v, det_v = vid_codes[:len(gt_vid)], vid_codes[len(gt_vid):]
  gt_c = np.searchsorted(class_ids, gt_lab)
  det_known = np.isin(det.labels, class_ids)
  det_idx = np.nonzero(det_known)[0]
  det_c = np.searchsorted(class_ids, det.labels[det_idx])
  det_v = det_v[det_idx]
  det_scores = det.scores[det_idx]
  det_segs = det.segments_sec[det_idx]
  num_vids = len(all_vids)

  # Ground truth grouped by (class, video): CSR arrays over the sorted GT.
  gt_group = gt_c * num_vids + gt_v
  gt_order = np.argsort(gt_group, kind="stable")
  gt_group_sorted = gt_group[gt_order]
  groups, group_first, group_count = np.unique(gt_group_sorted, return_index=True,
                                               return_counts=True)

  # Predictions sorted by (class, -score) stable: the reference order within each class.
  det_group = det_c * num_vids + det_v
  order = np.lexsort((-det_scores, det_c))
  det_group, det_c_s = det_group[order], det_c[order]
  det_segs, det_scores = det_segs[order], det_scores[order]
  num_det = len(order)

  # Rank of each prediction inside its (class, video) group, in score order.
  grp_order = np.argsort(det_group, kind="stable")
  grp_sorted = det_group[grp_order]
  first_in_group = np.r_[True, grp_sorted[1:] != grp_sorted[:-1]] if num_det else np.zeros(0, bool)
  starts = np.maximum.accumulate(np.where(first_in_group, np.arange(num_det), 0))
  rank = np.empty(num_det, np.int64)
  rank[grp_order] = np.arange(num_det) - starts

  # Pairs (prediction, GT of its group).
  pos = np.searchsorted(groups, det_group)
  pos = np.minimum(pos, max(len(groups) - 1, 0))
  has_gt = groups[pos] == det_group if len(groups) else np.zeros(num_det, bool)
  n_gt = np.where(has_gt, group_count[pos], 0)
  pair_det = np.repeat(np.arange(num_det), n_gt)
  pair_offset = np.arange(len(pair_det)) - np.repeat(np.cumsum(n_gt) - n_gt, n_gt)
  pair_gt = gt_order[group_first[pos[pair_det]] + pair_offset]  # index into the GT table
  pair_iou = segment_iou(det_segs[pair_det], gt_seg[pair_gt])

  tp = _greedy_match(pair_det, pair_gt, pair_iou, rank[pair_det], thresholds, num_det,
                     len(gt_seg))

  # AP per class.
  npos = np.bincount(gt_c, minlength=num_cls).astype(np.float64)
  cls_bounds = np.searchsorted(det_c_s, np.arange(num_cls + 1))
  for c in range(num_cls):
    lo, hi = cls_bounds[c], cls_bounds[c + 1]
    if hi == lo:
      continue
    tp_cum = np.cumsum(tp[:, lo:hi], axis=1).astype(np.float64)
    fp_cum = np.cumsum(~tp[:, lo:hi], axis=1).astype(np.float64)
    rec = tp_cum / npos[c]
    prec = tp_cum / (tp_cum + fp_cum)
    for t in range(num_thr):
      ap[t, c] = interpolated_ap(prec[t], rec[t])

  # Recall@kx: pairs whose prediction ranks inside the top k x n_gt of its group.
  hit_any = pair_iou[:, None] >= thresholds[None, :]  # [S, T]
  for j, k in enumerate(topk):
    in_top = rank[pair_det] < k * n_gt[pair_det]
    hits = np.zeros([len(gt_seg), num_thr], bool)
    sel = in_top[:, None] & hit_any
    rows, cols = np.nonzero(sel)
    hits[pair_gt[rows], cols] = True
    recalled = np.zeros([num_cls, num_thr])
    np.add.at(recalled, gt_c, hits)
    recall[:, j, :] = (recalled / npos[:, None]).T

  m_ap = ap.mean(axis=1)
  return EvalResult(thresholds, m_ap, float(m_ap.mean()), class_ids, ap, topk,
                    recall.mean(axis=2), dropped)


def _greedy_match(pair_det, pair_gt, pair_iou, pair_rank, thresholds, num_det, num_gt):
  """Greedy matching in rounds; returns bool [T, num_det] true positives.

  Round r treats the r-th prediction of every (class, video) group; a group's GTs only ever
  meet that group's predictions, so the rounds reproduce the sequential score-order matching.
  """
  num_thr = len(thresholds)
  tp = np.zeros([num_thr, num_det], bool)
  if len(pair_det) == 0:
    return tp
  order = np.lexsort((pair_gt, pair_det, pair_rank))
  pair_det, pair_gt, pair_iou, pair_rank = (pair_det[order], pair_gt[order], pair_iou[order],
                                            pair_rank[order])
  round_bounds = np.searchsorted(pair_rank, np.arange(pair_rank[-1] + 2))
  locked = np.zeros([num_gt, num_thr], bool)
  ok_iou = pair_iou[:, None] >= thresholds[None, :]  # [S, T]
  for r in range(len(round_bounds) - 1):
    lo, hi = round_bounds[r], round_bounds[r + 1]
    if lo == hi:
      continue
    dets, gts = pair_det[lo:hi], pair_gt[lo:hi]
    cand = ok_iou[lo:hi] & ~locked[gts]  # [S_r, T]
    key = np.where(cand, pair_iou[lo:hi, None], -1.0)
    seg_starts = np.r_[0, np.nonzero(dets[1:] != dets[:-1])[0] + 1]
    best = np.maximum.reduceat(key, seg_starts, axis=0)  # [n_r, T]
    seg_of = np.repeat(np.arange(len(seg_starts)), np.diff(np.r_[seg_starts, len(dets)]))
    is_best = cand & (key == best[seg_of])
    # First best pair of each prediction (lowest GT index on tIoU ties).
    idx = np.where(is_best, np.arange(len(dets))[:, None], len(dets))
    first = np.minimum.reduceat(idx, seg_starts, axis=0)  # [n_r, T]
    matched = first < len(dets)
    rows, thr = np.nonzero(matched)
    locked[gts[first[rows, thr]], thr] = True
    tp[thr, dets[seg_starts[rows]]] = True
  return tp


def write_results_json(path: str, detections: Detections,
                       class_names: Optional[Sequence[str]] = None,
                       video_ids: Optional[Iterable[str]] = None) -> None:
  """Writes the ActivityNet results layout.

  `{"results": {video_id: [{"segment": [s, e], "label": name, "label_id": k, "score": x}]}}`;
  `label` is the class name (the id as a string without `class_names`). Videos in `video_ids`
  without detections get an empty list.
  """
  results: Dict[str, List[Dict[str, Any]]] = {str(v): [] for v in (video_ids or ())}
  order = np.argsort(-detections.scores, kind="stable")
  for i in order:
    label_id = int(detections.labels[i])
    results.setdefault(str(detections.video_ids[i]), []).append({
        "segment": [float(detections.segments_sec[i, 0]), float(detections.segments_sec[i, 1])],
        "label": class_names[label_id] if class_names is not None else str(label_id),
        "label_id": label_id,
        "score": float(detections.scores[i]),
    })
  files.write_json_atomic(path, {"version": "VERSION 1.3", "results": results,
                                 "external_data": {}})


def read_results_json(path: str, class_names: Optional[Sequence[str]] = None,
                      video_ids: Optional[Iterable[str]] = None) -> Tuple[Detections, int]:
  """Reads an ActivityNet results file into a Detections table.

  Labels: `label_id` when present (it must agree with `label` if both and `class_names` are
  given), else `label` looked up in `class_names`. An unknown label raises ValueError naming the
  video and the label. Videos not in `video_ids` (when given) are dropped, counted and logged.

  Returns:
    (detections, number of dropped detections of unknown videos).
  """
  with open(path) as f:
    data = json.load(f)
  if "results" not in data:
    raise ValueError(f"{path}: no 'results' key; expected {{\"results\": {{video_id: [...]}}}}")
  name_to_id = {n: i for i, n in enumerate(class_names)} if class_names is not None else None
  known = set(video_ids) if video_ids is not None else None
  ids, segs, scores, labels = [], [], [], []
  dropped, dropped_videos = 0, []
  for video_id, items in data["results"].items():
    if known is not None and video_id not in known:
      dropped += len(items)
      dropped_videos.append(video_id)
      continue
    for item in items:
      label_id = _label_id(item, name_to_id, video_id, path)
      ids.append(video_id)
      segs.append([float(item["segment"][0]), float(item["segment"][1])])
      scores.append(float(item["score"]))
      labels.append(label_id)
  if dropped_videos:
    logging.warning("%s: %d detection(s) of %d unknown video(s) dropped (first: %s)", path,
                    dropped, len(dropped_videos), dropped_videos[0])
  return Detections(ids, np.asarray(segs, np.float64).reshape(-1, 2), scores, labels), dropped


def _label_id(item, name_to_id, video_id, path) -> int:
  name = item.get("label")
  if "label_id" in item:
    label_id = int(item["label_id"])
    if name_to_id is not None:
      if not 0 <= label_id < len(name_to_id):
        raise ValueError(f"{path}: video {video_id!r} has label_id {label_id} outside the "
                         f"{len(name_to_id)} known classes")
      if name is not None and name_to_id.get(name, label_id) != label_id:
        raise ValueError(f"{path}: video {video_id!r}: label {name!r} does not match "
                         f"label_id {label_id}")
    return label_id
  if name_to_id is None:
    raise ValueError(f"{path}: video {video_id!r} has label {name!r} without label_id; pass "
                     "class_names to map names to ids")
  if name not in name_to_id:
    raise ValueError(f"{path}: video {video_id!r} has unknown label {name!r}")
  return name_to_id[name]


def is_results_file(path: str) -> bool:
  """True when `path` holds an ActivityNet results file (`{"results": {...}}`): the kind of file
  the tools write, which they may replace without `--overwrite`."""
  try:
    with open(path) as f:
      data = json.load(f)
  except (OSError, ValueError):
    return False
  return isinstance(data, dict) and isinstance(data.get("results"), dict)
