"""Detector outputs -> final detections (ActionFormer's test-time post-processing; docs/method.md
6.3).

`postprocess_detections` is pure TensorFlow with batched inputs and fixed-size outputs, so the
same graph runs eagerly, inside `tf.function` (unknown batch and time sizes) and in the exported
SavedModel. Steps, per video:

1. per pyramid level: sigmoid(logits) x padding mask, flattened over (T_l x K); keep
   prob > pre_nms_thresh, then the top pre_nms_topk;
2. decode point = idx // K, class = idx % K, start = t - off_l * stride, end = t + off_r * stride;
   drop segments with end - start <= duration_thresh; concatenate the levels;
3. NMS in grid units with the semantics of ActionFormer's C++ NMS operator: Gaussian
   Soft-NMS (score *= exp(-iou^2 / sigma), iou = inter / (len_i + len_j - inter) with
   len = end - start + 1e-6, drop a segment once its score < min_score), hard NMS (suppress
   iou >= iou_threshold, after keeping score > min_score) or none; per class or class-agnostic;
4. class-agnostic only: score voting of the kept segments over all pre-NMS segments;
5. the top max_seg_num by score; grid -> seconds, clipped to [0, duration].

Greedy NMS picks segments in non-increasing (decayed) score order, and other classes' scores are
untouched by a pick, so one class-masked greedy loop over all candidates yields exactly the top
max_seg_num of ActionFormer's per-class results after only max_seg_num iterations.

Score fusion with an external video-level classifier (ActivityNet) works on per-video NumPy
arrays after the graph: `load_video_scores`, `fuse_video_scores`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pickle
import reprlib
from typing import Dict, List, Mapping, Optional, Tuple

import numpy as np
import tensorflow as tf

from asl_tf import restricted_pickle
from asl_tf.config import EvalConfig
from asl_tf.data import timebase

_DEAD = -1.0  # score marking a removed candidate (live scores are >= 0)


def grid_to_sec_per_video(segments_grid, fps, feat_stride, num_frames, duration_sec):
  """Feature-grid positions -> seconds, clipped to [0, duration_sec].

  `timebase.grid_to_sec` (same arguments) with one value per video broadcast over the other
  dimensions.

  Args:
    segments_grid: float32 [B, ...] positions on the feature grid.
    fps, feat_stride, num_frames, duration_sec: float32 [B] per-video metadata.

  Returns:
    float32 tensor shaped like `segments_grid`, in seconds.
  """
  segments_grid = tf.convert_to_tensor(segments_grid, tf.float32)
  extra_dims = tf.ones([tf.rank(segments_grid) - 1], tf.int32)

  def per_video(value):
    value = tf.cast(value, tf.float32)
    return tf.reshape(value, tf.concat([tf.shape(value), extra_dims], 0))

  return timebase.grid_to_sec(segments_grid, per_video(fps), per_video(feat_stride),
                             per_video(num_frames), per_video(duration_sec))


def select_candidates(cls_logits, offsets, padding_mask, points, pre_nms_thresh, pre_nms_topk,
                      duration_thresh):
  """Per-level score threshold and top-k, then segment decoding (steps 1-2).

  Pyramid levels are recovered from the stride column of `points` (consecutive runs of equal
  stride, in concatenation order), so the number of levels need not be static.

  Args:
    cls_logits: float32 [B, N, K] classification logits, levels concatenated.
    offsets: float32 [B, N, 2] left / right distances in units of the level stride.
    padding_mask: bool [B, N], true on valid points.
    points: float32 [N, 4] (t, reg_lo, reg_hi, stride), t in base-grid units.
    pre_nms_thresh: keep prob > this.
    pre_nms_topk: candidates kept per level.
    duration_thresh: keep end - start > this (grid units).

  Returns:
    (segments [B, M, 2] grid, scores [B, M], labels int32 [B, M], valid bool [B, M]) with
    M = levels x min(pre_nms_topk, max_l T_l x K); invalid slots hold zeros.
  """
  cls_logits = tf.convert_to_tensor(cls_logits, tf.float32)
  offsets = tf.convert_to_tensor(offsets, tf.float32)
  points = tf.convert_to_tensor(points, tf.float32)
  padding_mask = tf.cast(padding_mask, tf.bool)
  batch = tf.shape(cls_logits)[0]
  num_points = tf.shape(cls_logits)[1]
  num_classes = tf.shape(cls_logits)[2]

  strides = points[:, 3]
  level_begins = tf.concat([[True], tf.not_equal(strides[1:], strides[:-1])], 0)
  starts = tf.boolean_mask(tf.range(num_points), level_begins)  # [L]
  sizes = tf.concat([starts[1:], [num_points]], 0) - starts  # [L]
  max_size = tf.reduce_max(sizes)
  pos = tf.range(max_size)
  in_level = pos[None, :] < sizes[:, None]  # [L, Tmax]
  gather_idx = tf.where(in_level, starts[:, None] + pos[None, :], 0)  # [L, Tmax]

  probs = tf.sigmoid(cls_logits) * tf.cast(padding_mask, tf.float32)[:, :, None]
  probs = tf.gather(probs, gather_idx, axis=1)  # [B, L, Tmax, K]
  probs = tf.where(in_level[None, :, :, None], probs, _DEAD)
  num_levels = tf.shape(starts)[0]
  probs = tf.reshape(probs, [batch, num_levels, max_size * num_classes])
  k = tf.minimum(pre_nms_topk, max_size * num_classes)
  scores, flat_idx = tf.math.top_k(probs, k=k)  # [B, L, k], score-descending per level
  point_idx = starts[None, :, None] + flat_idx // num_classes  # [B, L, k]
  labels = flat_idx % num_classes

  point_idx = tf.reshape(point_idx, [batch, -1])  # [B, M]
  scores = tf.reshape(scores, [batch, -1])
  labels = tf.reshape(labels, [batch, -1])
  point_idx = tf.minimum(point_idx, num_points - 1)
  pts = tf.gather(points, point_idx)  # [B, M, 4]
  offs = tf.gather(offsets, point_idx, batch_dims=1)  # [B, M, 2]
  seg_start = pts[..., 0] - offs[..., 0] * pts[..., 3]
  seg_end = pts[..., 0] + offs[..., 1] * pts[..., 3]
  valid = (scores > pre_nms_thresh) & (seg_end - seg_start > duration_thresh)
  segments = tf.stack([seg_start, seg_end], -1)
  zero = tf.zeros_like(scores)
  return (tf.where(valid[..., None], segments, 0.0), tf.where(valid, scores, zero),
          tf.where(valid, labels, -1), valid)


def _compact(valid, *tensors):
  """Moves valid candidates to the front (order kept) and drops columns invalid everywhere."""
  order = tf.argsort(tf.cast(valid, tf.int32), axis=1, direction="DESCENDING", stable=True)
  width = tf.reduce_max(tf.reduce_sum(tf.cast(valid, tf.int32), axis=1))
  order = order[:, :tf.maximum(width, 1)]  # one (invalid) column when nothing is valid
  return [tf.gather(t, order, batch_dims=1) for t in (valid,) + tensors]


def greedy_nms(segments, scores, labels, valid, max_seg_num, method="soft", sigma=0.5,
               iou_threshold=0.1, min_score=0.001, multiclass=True, first_round_size=None):
  """ActionFormer's Soft-NMS / hard NMS, batched, returning the first max_seg_num picks.

  A candidate influences the result only if it is picked, and picks have non-increasing scores
  that never exceed the original ones. So the loop first runs on the `first_round_size`
  best-scoring candidates; the result is exact when every video either has no candidate left
  out or made max_seg_num picks all scoring above the best left-out candidate. Otherwise the
  round is repeated with 4x more candidates (finally all of them).

  Args:
    segments: float32 [B, M, 2] candidates in grid units.
    scores: float32 [B, M] candidate scores (>= 0).
    labels: int32 [B, M].
    valid: bool [B, M].
    max_seg_num: D, picks returned per video.
    method: `soft` (Gaussian) or `hard`.
    sigma: Soft-NMS sigma, weight = exp(-iou^2 / sigma).
    iou_threshold: hard NMS suppresses iou >= this.
    min_score: Soft-NMS drops a segment once its score < this; hard NMS keeps score > this
      (when > 0).
    multiclass: NMS within each class; otherwise across all candidates.
    first_round_size: candidates in the first round (default 4 x max_seg_num, at least 256).

  Returns:
    (pick_idx int32 [B, D] indices into M (0 where unused), pick_scores float32 [B, D] (decayed
    scores for Soft-NMS), pick_valid bool [B, D]); picks are in non-increasing score order.
  """
  if method not in ("soft", "hard"):
    raise ValueError(f"greedy_nms method must be 'soft' or 'hard', got {method!r}")
  segments = tf.convert_to_tensor(segments, tf.float32)
  scores = tf.convert_to_tensor(scores, tf.float32)
  labels = tf.convert_to_tensor(labels, tf.int32)
  alive = tf.cast(valid, tf.bool)
  if method == "hard" and min_score > 0:
    alive &= scores > min_score
  ranked = tf.where(alive, scores, _DEAD)
  order = tf.argsort(ranked, axis=1, direction="DESCENDING", stable=True)  # [B, M]
  sorted_scores = tf.gather(ranked, order, batch_dims=1)
  num = tf.shape(scores)[1]
  if first_round_size is None:
    first_round_size = max(4 * max_seg_num, 256)
  loop_kwargs = dict(max_seg_num=max_seg_num, method=method, sigma=sigma,
                     iou_threshold=iou_threshold, min_score=min_score, multiclass=multiclass)

  def run_round(size):
    subset = tf.sort(order[:, :size], axis=1)  # keep the input order among the chosen
    picks = _greedy_loop(*[tf.gather(t, subset, batch_dims=1)
                           for t in (segments, ranked, labels, alive)], **loop_kwargs)
    pick_idx, pick_scores, pick_valid = picks
    pick_idx = tf.where(pick_valid, tf.gather(subset, pick_idx, batch_dims=1), 0)
    left_out_best = tf.cond(size < num, lambda: sorted_scores[:, tf.minimum(size, num - 1)],
                            lambda: tf.fill([tf.shape(scores)[0]], _DEAD))
    full = pick_valid[:, -1] & (pick_scores[:, -1] > left_out_best)
    exact = tf.reduce_all((left_out_best < 0) | full)
    return pick_idx, pick_scores, pick_valid, exact

  size = tf.minimum(first_round_size, num)
  pick_idx, pick_scores, pick_valid, exact = run_round(size)

  def next_round(size, *unused):
    size = tf.minimum(size * 4, num)
    return (size,) + run_round(size)

  _, pick_idx, pick_scores, pick_valid, _ = tf.while_loop(
      lambda size, *rest: ~rest[-1] & (size < num), next_round,
      (size, pick_idx, pick_scores, pick_valid, exact))
  return pick_idx, pick_scores, pick_valid


def _greedy_loop(segments, current, labels, alive, max_seg_num, method, sigma, iou_threshold,
                 min_score, multiclass):
  """The greedy pick / decay loop of `greedy_nms` over all given candidates."""
  starts, ends = segments[..., 0], segments[..., 1]
  lengths = ends - starts + 1e-6
  batch = tf.shape(current)[0]

  def body(i, current, alive, idx_ta, score_ta, valid_ta):
    pick = tf.argmax(current, axis=1, output_type=tf.int32)  # [B]
    pick_score = tf.gather(current, pick, batch_dims=1)
    pick_alive = tf.gather(alive, pick, batch_dims=1)
    p_start = tf.gather(starts, pick, batch_dims=1)[:, None]
    p_end = tf.gather(ends, pick, batch_dims=1)[:, None]
    p_len = tf.gather(lengths, pick, batch_dims=1)[:, None]
    inter = tf.maximum(0.0, tf.minimum(p_end, ends) - tf.maximum(p_start, starts))
    iou = inter / (p_len + lengths - inter)  # [B, M]
    affected = tf.ones_like(alive)
    if multiclass:
      affected = tf.equal(labels, tf.gather(labels, pick, batch_dims=1)[:, None])
    if method == "soft":
      decayed = current * tf.exp(-(iou * iou) / sigma)
      current = tf.where(affected, decayed, current)
      removed = affected & (current < min_score)
    else:
      removed = affected & (iou >= iou_threshold)
    removed |= tf.equal(tf.range(tf.shape(current)[1])[None, :], pick[:, None])
    alive = alive & ~removed
    current = tf.where(alive, current, _DEAD)
    return (i + 1, current, alive, idx_ta.write(i, pick), score_ta.write(i, pick_score),
            valid_ta.write(i, pick_alive))

  def cond(i, current, alive, *unused):
    return (i < max_seg_num) & tf.reduce_any(alive)

  arrays = [tf.TensorArray(dtype, size=0, dynamic_size=True, element_shape=[None])
            for dtype in (tf.int32, tf.float32, tf.bool)]
  current = tf.where(alive, current, _DEAD)
  num_picks, _, _, idx_ta, score_ta, valid_ta = tf.while_loop(
      cond, body, (tf.constant(0), current, alive, *arrays), maximum_iterations=max_seg_num)
  # In a graph, stacking an empty TensorArray of element shape [None] fails (no candidates).
  picks = [tf.transpose(tf.cond(num_picks > 0, ta.stack,
                                lambda dtype=ta.dtype: tf.zeros([0, batch], dtype)))
           for ta in (idx_ta, score_ta, valid_ta)]  # [B, n]
  picks = [tf.reshape(p, [batch, -1]) for p in picks]
  pad = max_seg_num - tf.shape(picks[0])[1]
  pick_idx, pick_scores, pick_valid = [tf.pad(p, [[0, 0], [0, pad]]) for p in picks]
  pick_scores = tf.where(pick_valid, pick_scores, 0.0)
  pick_idx = tf.where(pick_valid, pick_idx, 0)
  return pick_idx, pick_scores, pick_valid


def score_voting(kept_segments, kept_valid, segments, scores, valid, voting_thresh):
  """Replaces each kept segment by the IoU x score weighted mean of its pre-NMS neighbours.

  ActionFormer's `seg_voting`: weights w_j = [iou_j >= voting_thresh] * score_j * iou_j over all
  pre-NMS segments j, iou = inter / (len_i + len_j - inter) (no epsilon), original scores.

  Args:
    kept_segments: float32 [B, D, 2] NMS output.
    kept_valid: bool [B, D].
    segments: float32 [B, M, 2] all pre-NMS candidates.
    scores: float32 [B, M] their (undecayed) scores.
    valid: bool [B, M].
    voting_thresh: IoU threshold.

  Returns:
    float32 [B, D, 2] refined segments (unchanged where `kept_valid` is false).
  """
  k_start, k_end = kept_segments[..., 0:1], kept_segments[..., 1:2]  # [B, D, 1]
  a_start, a_end = segments[:, None, :, 0], segments[:, None, :, 1]  # [B, 1, M]
  inter = tf.maximum(0.0, tf.minimum(k_end, a_end) - tf.maximum(k_start, a_start))
  iou = inter / ((k_end - k_start) + (a_end - a_start) - inter)  # [B, D, M]
  use = (iou >= voting_thresh) & valid[:, None, :]
  weights = tf.where(use, scores[:, None, :] * iou, 0.0)
  total = tf.reduce_sum(weights, axis=-1, keepdims=True)
  refined = tf.matmul(weights / tf.where(total > 0, total, 1.0), segments)  # [B, D, 2]
  return tf.where(kept_valid[..., None] & (total > 0), refined, kept_segments)


def postprocess_detections(cls_logits, offsets, padding_mask, points, fps, duration, feat_stride,
                           num_frames, config: EvalConfig) -> Dict[str, tf.Tensor]:
  """Detector outputs -> fixed-size final detections (docs/method.md 6.3); the export entry point.

  Args:
    cls_logits: float32 [B, N, K] logits, pyramid levels concatenated (N = sum_l T_l).
    offsets: float32 [B, N, 2] left / right distances in level-stride units (>= 0).
    padding_mask: bool [B, N], true on valid points.
    points: float32 [N, 4] (t, reg_lo, reg_hi, stride), t = i * stride in base-grid units.
    fps, duration, feat_stride, num_frames: float32 [B] per-video metadata (duration in s).
    config: test settings (pre_nms_thresh, pre_nms_topk, duration_thresh, nms_method,
      multiclass_nms, nms_sigma, iou_threshold, min_score, voting_thresh, max_seg_num).

  Returns:
    dict with `segments_grid` float32 [B, D, 2], `segments_sec` float32 [B, D, 2], `scores`
    float32 [B, D], `labels` int32 [B, D] and `num_detections` int32 [B], D = max_seg_num.
    Detections are sorted by score; slots past `num_detections` hold 0 (labels -1).
    `nms_method='none'` keeps the top D candidates by score (ActionFormer keeps all).
  """
  max_seg_num = config.max_seg_num
  segments, scores, labels, valid = select_candidates(
      cls_logits, offsets, padding_mask, points, config.pre_nms_thresh, config.pre_nms_topk,
      config.duration_thresh)
  valid, segments, scores, labels = _compact(valid, segments, scores, labels)

  if config.nms_method == "none":
    width = tf.minimum(max_seg_num, tf.shape(scores)[1])
    pick_scores, pick_idx = tf.math.top_k(tf.where(valid, scores, _DEAD), k=width)
    pick_valid = pick_scores >= 0
    pad = [[0, 0], [0, max_seg_num - width]]
    pick_idx, pick_scores, pick_valid = (tf.pad(pick_idx, pad), tf.pad(pick_scores, pad),
                                         tf.pad(pick_valid, pad))
    pick_scores = tf.where(pick_valid, pick_scores, 0.0)
  else:
    pick_idx, pick_scores, pick_valid = greedy_nms(
        segments, scores, labels, valid, max_seg_num, method=config.nms_method,
        sigma=config.nms_sigma, iou_threshold=config.iou_threshold, min_score=config.min_score,
        multiclass=config.multiclass_nms)
  out_segments = tf.gather(segments, pick_idx, batch_dims=1)
  if config.nms_method != "none" and not config.multiclass_nms and config.voting_thresh > 0:
    out_segments = score_voting(out_segments, pick_valid, segments, scores, valid,
                                config.voting_thresh)
  out_segments = tf.where(pick_valid[..., None], out_segments, 0.0)
  out_labels = tf.where(pick_valid, tf.gather(labels, pick_idx, batch_dims=1), -1)
  seconds = grid_to_sec_per_video(out_segments, fps, feat_stride, num_frames, duration)
  return {
      "segments_grid": out_segments,
      "segments_sec": tf.where(pick_valid[..., None], seconds, 0.0),
      "scores": pick_scores,
      "labels": out_labels,
      "num_detections": tf.reduce_sum(tf.cast(pick_valid, tf.int32), axis=1),
  }


@dataclasses.dataclass(frozen=True)
class VideoScores:
  """External video-level classifier scores (e.g. CUHK `cuhk_val_simp_share.json`).

  Attributes:
    scores: video id -> float64 [C] class scores.
    class_names: the C class names, in score order (may be empty).
  """
  scores: Mapping[str, np.ndarray]
  class_names: Tuple[str, ...] = ()

  def lookup(self, video_id: str) -> Optional[np.ndarray]:
    """Scores of `video_id`, also trying it with the ActivityNet `v_` prefix added / removed."""
    for key in (video_id, video_id[2:] if video_id.startswith("v_") else "v_" + video_id):
      if key in self.scores:
        return self.scores[key]
    return None


class _ArrayToken:
  """What `numpy.ndarray` unpickles to in a score file: a token only `_reconstruct` accepts
  (calling it, which would allocate an array of any size, fails; it takes no attributes)."""

  __slots__ = ()


_ARRAY_TOKEN = _ArrayToken()
_NUMBER_KINDS = "biuf"  # bool, signed / unsigned integers, floats: what scores are made of


class _Dtype:
  """What `numpy.dtype(...)` unpickles to: a plain number type and its byte order, set by the
  pickle's BUILD through this class's own `__setstate__` (NumPy's would take fields, sub-arrays
  and flags from the file)."""

  __slots__ = ("spec", "byteorder")

  def __init__(self, spec, *unused):
    if isinstance(spec, bytes):
      spec = spec.decode("latin1")
    dtype = np.dtype(spec) if isinstance(spec, str) and len(spec) <= 4 else None
    if dtype is None or dtype.kind not in _NUMBER_KINDS or dtype.fields or dtype.subdtype:
      raise pickle.UnpicklingError(f"dtype {reprlib.repr(spec)}: a score file holds numbers "
                                   "only")
    self.spec, self.byteorder = dtype.str[1:], "="

  def __setstate__(self, state):
    if (not isinstance(state, tuple) or len(state) < 8 or state[1] not in "<>|="
        or any(v is not None for v in state[2:5])):
      raise pickle.UnpicklingError("a dtype state other than a plain number's byte order")
    self.byteorder = state[1]

  def numpy(self) -> np.dtype:
    order = "=" if self.byteorder == "|" else self.byteorder
    return np.dtype(self.spec).newbyteorder(order)


class _Array:
  """What NumPy's `_reconstruct` unpickles to: an array that the pickle's BUILD fills from the
  bytes it carries (`array` stays None without them)."""

  __slots__ = ("array",)

  def __init__(self, token, shape, typecode):
    if token is not _ARRAY_TOKEN or tuple(shape) != (0,) or typecode not in (b"b", "b"):
      raise pickle.UnpicklingError(f"numpy _reconstruct of shape {reprlib.repr(shape)}, typecode "
                                   f"{reprlib.repr(typecode)}: NumPy's pickles reconstruct empty "
                                   "int8 arrays only, then fill them")
    self.array = None

  def __setstate__(self, state):
    if not isinstance(state, tuple) or len(state) != 5:
      raise pickle.UnpicklingError("an array state other than (version, shape, dtype, order, "
                                   "bytes)")
    _, shape, dtype, fortran, raw = state
    if isinstance(raw, str):  # Python 2 pickles: the bytes as a latin-1 string
      raw = raw.encode("latin1")
    if (not isinstance(dtype, _Dtype) or not isinstance(raw, bytes) or not isinstance(shape, tuple)
        or not all(isinstance(n, int) and n >= 0 for n in shape)):
      raise pickle.UnpicklingError("an array state other than plain numbers from bytes")
    self.array = np.frombuffer(raw, dtype.numpy()).reshape(shape, order="F" if fortran else "C")


def _number(dtype, data=None):
  """numpy's `scalar` (a NumPy number in a pickle): `data` must be exactly its bytes."""
  if isinstance(data, str):  # Python 2 pickles
    data = data.encode("latin1")
  if not isinstance(dtype, _Dtype) or not isinstance(data, bytes):
    raise pickle.UnpicklingError("numpy scalar other than a number from its own bytes")
  return np.frombuffer(data, dtype.numpy())[0]  # NumPy refuses bytes of another length


def _array_from_bytes(buffer, dtype, shape, order="C"):
  """numpy's `_frombuffer` (protocol-5 pickles): the bytes in the file, viewed as `shape`
  (NumPy refuses a shape they do not fill exactly)."""
  if (not isinstance(buffer, (bytes, bytearray)) or not isinstance(dtype, _Dtype)
      or order not in ("C", "F")):
    raise pickle.UnpicklingError("numpy _frombuffer other than of numbers from bytes")
  return np.frombuffer(bytes(buffer), dtype.numpy()).reshape(shape, order=order)


# The globals a pickled score file may name, each a stand-in that builds numbers from the file's
# own bytes. Everything else (os.system, builtins.eval, ...) is refused before it is called.
_SCORE_PICKLE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): lambda: _Array,
    ("numpy._core.multiarray", "_reconstruct"): lambda: _Array,
    ("numpy.core.multiarray", "scalar"): lambda: restricted_pickle.fresh(_number),
    ("numpy._core.multiarray", "scalar"): lambda: restricted_pickle.fresh(_number),
    ("numpy.core.numeric", "_frombuffer"): lambda: restricted_pickle.fresh(_array_from_bytes),
    ("numpy._core.numeric", "_frombuffer"): lambda: restricted_pickle.fresh(_array_from_bytes),
    ("numpy", "ndarray"): lambda: _ARRAY_TOKEN,
    ("numpy", "dtype"): lambda: _Dtype,
    ("_codecs", "encode"): lambda: restricted_pickle.fresh(restricted_pickle.latin1_encode),
}


def _score_row(value):
  """A video's scores (an array or a list, `_Array` unwrapped) as a flat float64 row, or None:
  checked before any conversion, so that nested structures cannot make NumPy build more than
  the file holds."""
  if isinstance(value, np.ndarray):
    return (value.astype(np.float64) if value.ndim == 1 and value.dtype.kind in _NUMBER_KINDS
            else None)
  if isinstance(value, (list, tuple)) and all(
      isinstance(v, (int, float, np.number)) and not isinstance(v, bool) for v in value):
    return np.asarray(value, np.float64)
  return None


class _ScoreUnpickler(restricted_pickle.BoundedUnpickler):
  """Unpickles plain containers and NumPy arrays only, each array from the bytes in the file."""

  def __init__(self, stream, path):
    super().__init__(stream, encoding="latin1")  # Python 2 pickles: byte strings as latin-1
    self._path = path

  def find_class(self, module, name):
    if (module, name) not in _SCORE_PICKLE_GLOBALS:
      raise ValueError(f"--ext_score_file={self._path}: refusing to unpickle {module}.{name}; a "
                       "score file holds only {video_id: [scores]} (NumPy arrays or lists). "
                       "Convert it to JSON if it comes from elsewhere")
    return _SCORE_PICKLE_GLOBALS[(module, name)]()


def load_video_scores(path: str) -> VideoScores:
  """Reads a video-level classifier file.

  JSON (`.json`): `{"results": {video_id: [score per class]}, "class": [names]}` (CUHK layout; a
  bare `{video_id: [scores]}` dict also works). Pickle (`.pkl` / `.pickle`): `{video_id:
  [scores]}` (UntrimmedNet THUMOS), read by an unpickler that admits only containers and NumPy
  numbers and arrays built from the bytes in the file: a crafted file cannot run code, and its
  arrays hold only the numbers it carries. CUHK keys carry no `v_` prefix;
  `VideoScores.lookup` matches ids with or without it.

  Raises:
    ValueError: naming the file, for another extension, unreadable content or ragged scores.
  """
  where = f"--ext_score_file={path}"
  ext = os.path.splitext(path)[1].lower()
  if ext not in (".json", ".pkl", ".pickle"):
    raise ValueError(f"{where}: use a .json file (or an UntrimmedNet .pkl); got {ext or 'none'}")
  try:
    if ext == ".json":
      with open(path) as f:
        data = json.load(f)
    else:
      with open(path, "rb") as f:
        data = _ScoreUnpickler(f, path).load()
  except OSError as e:
    raise ValueError(f"{where}: cannot read it ({e.strerror})") from None
  except (pickle.UnpicklingError, EOFError, UnicodeDecodeError, ValueError, TypeError,
          AttributeError, KeyError, IndexError, RecursionError, MemoryError,
          OverflowError) as e:
    if isinstance(e, ValueError) and str(e).startswith(where):
      raise  # the unpickler's own refusal
    raise ValueError(f"{where}: not a valid {ext[1:].upper()} score file "
                     f"({type(e).__name__}: {str(e)[:200]})") from None
  if not isinstance(data, dict) or not isinstance(data.get("results", data), dict):
    raise ValueError(f"{where}: expected {{video_id: [scores]}} or a CUHK {{\"results\": ...}} "
                     "object")
  results = data.get("results", data)
  names = data.get("class", ()) if "results" in data else ()
  if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
    raise ValueError(f"{where}: 'class' must be a list of class names")
  names = tuple(names)
  scores, total, budget = {}, 0, max(os.path.getsize(path), 1024)
  for k, v in results.items():
    if not isinstance(k, (str, int)) or isinstance(k, bool):
      raise ValueError(f"{where}: a video id is a {type(k).__name__}; ids are strings")
    v = v.array if isinstance(v, _Array) else v
    total += v.size if isinstance(v, np.ndarray) else len(v) if isinstance(v, (list, tuple)) else 0
    if total > budget:  # rows shared between videos: more numbers than the file holds
      raise ValueError(f"{where}: more scores than a file of {budget} bytes can hold; each video "
                       "needs its own row")
    row = _score_row(v)
    if row is None or not np.isfinite(row).all() or (row < 0).any():
      raise ValueError(f"{where}: video {k!s}: scores must be a flat list of finite numbers "
                       ">= 0 (one per class)")
    scores[str(k)] = row
  widths = {v.shape[0] for v in scores.values()}
  if len(widths) > 1:
    raise ValueError(f"{where}: videos have different numbers of class scores {sorted(widths)}")
  if names and widths and len(names) != widths.pop():
    raise ValueError(f"{where}: {len(names)} class names but score vectors of another length")
  return VideoScores(scores=scores, class_names=names)


@dataclasses.dataclass
class FusionResult:
  """Output of `fuse_video_scores`.

  Attributes:
    detections: video id -> dict of `segments_sec` [P, 2], `scores` [P], `labels` int [P].
    missing_videos: ids absent from the classifier file; their detections are dropped.
  """
  detections: Dict[str, Dict[str, np.ndarray]]
  missing_videos: List[str]


def fuse_video_scores(detections: Mapping[str, Mapping[str, np.ndarray]],
                      video_scores: VideoScores, topk: int = 2,
                      num_pred: Optional[int] = None) -> FusionResult:
  """ActivityNet score fusion (ActionFormer `postprocess_results`).

  Each video's class-agnostic proposals (sorted by score, first `num_pred` kept) are duplicated
  for the video's `topk` classifier classes, with score sqrt(cls_score x proposal_score) and label
  = the class index in the classifier's score vector. Output order: all proposals of the best
  class, then all of the second, ... A video missing from the classifier file has no class to
  give its proposals: it is logged, counted in `missing_videos` and yields no detections.

  Args:
    detections: video id -> dict of `segments_sec` [P, 2] and `scores` [P] (labels ignored).
    video_scores: from `load_video_scores`.
    topk: classes per video.
    num_pred: proposals per video used (None = all).

  Returns:
    A FusionResult.
  """
  fused, missing = {}, []
  for video_id, det in detections.items():
    cls_scores = video_scores.lookup(video_id)
    if cls_scores is None:
      missing.append(video_id)
      continue
    order = np.argsort(-np.asarray(det["scores"], np.float64), kind="stable")[:num_pred]
    scores = np.asarray(det["scores"], np.float64)[order]
    segments = np.asarray(det["segments_sec"], np.float64).reshape(-1, 2)[order]
    top_classes = np.argsort(-cls_scores, kind="stable")[:topk]
    fused[video_id] = {
        "segments_sec": np.tile(segments, (len(top_classes), 1)),
        "scores": np.sqrt(cls_scores[top_classes][:, None] * scores[None, :]).reshape(-1),
        "labels": np.repeat(top_classes, len(scores)).astype(np.int64),
    }
  if missing:
    logging.warning("score fusion: %d video(s) missing from the classifier file, their "
                    "detections are dropped (first: %s)", len(missing), missing[0])
  return FusionResult(detections=fused, missing_videos=missing)
