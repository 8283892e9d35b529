"""Tests for asl_tf.postprocess: NumPy reference of ActionFormer's NMS, fixture parity, export."""

import json
import os
import pickle
import struct

import numpy as np
import pytest
import tensorflow as tf

from asl_tf import postprocess
from asl_tf.config import EvalConfig
from parity_cases import parity_file
import restricted_pickle_test

NUM_LEVELS = 6

# --- NumPy reference of ActionFormer's inference (float32, sequential, as in nms_cpu.cpp) ---


def ref_soft_nms(segs, scores, sigma, min_score):
  """Gaussian Soft-NMS with the C++ loop's swaps and in-place removal; returns picks in order."""
  x1, x2 = segs[:, 0].copy(), segs[:, 1].copy()
  sc = scores.astype(np.float32).copy()
  areas = x2 - x1 + np.float32(1e-6)
  inds = np.arange(len(sc))
  n = len(sc)
  out = []
  i = 0
  while i < n:
    m = i + int(np.argmax(sc[i:n]))
    for arr in (x1, x2, sc, areas, inds):
      arr[i], arr[m] = arr[m], arr[i]
    out.append((x1[i], x2[i], sc[i], inds[i]))
    pos = i + 1
    while pos < n:
      inter = max(np.float32(0), min(x2[i], x2[pos]) - max(x1[i], x1[pos]))
      ovr = np.float32(inter / (areas[i] + areas[pos] - inter))
      sc[pos] = sc[pos] * np.exp(np.float32(-(ovr * ovr) / np.float32(sigma)))
      if sc[pos] < min_score:
        for arr in (x1, x2, sc, areas, inds):
          arr[pos] = arr[n - 1]
        n -= 1
        continue
      pos += 1
    i += 1
  return out


def ref_hard_nms(segs, scores, iou_threshold, min_score):
  keep = np.nonzero(scores > min_score)[0] if min_score > 0 else np.arange(len(scores))
  segs, scores = segs[keep], scores[keep]
  areas = segs[:, 1] - segs[:, 0] + np.float32(1e-6)
  order = np.argsort(-scores, kind="stable")
  selected = np.ones(len(order), bool)
  for a in range(len(order)):
    if not selected[a]:
      continue
    i = order[a]
    for b in range(a + 1, len(order)):
      j = order[b]
      inter = max(np.float32(0), min(segs[i, 1], segs[j, 1]) - max(segs[i, 0], segs[j, 0]))
      if inter / (areas[i] + areas[j] - inter) >= iou_threshold:
        selected[b] = False
  return [(segs[i, 0], segs[i, 1], scores[i], keep[i]) for i in order[selected]]


def ref_voting(kept, all_segs, all_scores, thresh):
  inter = np.clip(np.minimum(kept[:, None, 1], all_segs[None, :, 1])
                  - np.maximum(kept[:, None, 0], all_segs[None, :, 0]), 0, None)
  lens = (kept[:, 1] - kept[:, 0])[:, None] + (all_segs[:, 1] - all_segs[:, 0])[None, :]
  iou = inter / (lens - inter)
  w = (iou >= thresh) * all_scores[None, :] * iou
  return (w / w.sum(1, keepdims=True)) @ all_segs


def ref_batched_nms(segs, scores, labels, cfg):
  """ActionFormer batched_nms: (segments [D, 2], scores [D], labels [D])."""
  if len(scores) == 0:
    return np.zeros([0, 2], np.float32), np.zeros([0], np.float32), np.zeros([0], np.int64)
  def run(idx):
    if cfg.nms_method == "soft":
      picks = ref_soft_nms(segs[idx], scores[idx], cfg.nms_sigma, cfg.min_score)
    else:
      picks = ref_hard_nms(segs[idx], scores[idx], cfg.iou_threshold, cfg.min_score)
    picks = picks[:cfg.max_seg_num]
    return (np.array([[p[0], p[1]] for p in picks], np.float32).reshape(-1, 2),
            np.array([p[2] for p in picks], np.float32), labels[idx][[p[3] for p in picks]])
  if cfg.multiclass_nms:
    parts = [run(np.nonzero(labels == c)[0]) for c in np.unique(labels)]
    out_s, out_sc, out_l = [np.concatenate(x) for x in zip(*parts)]
  else:
    out_s, out_sc, out_l = run(np.arange(len(scores)))
    if cfg.voting_thresh > 0 and len(out_sc):
      out_s = ref_voting(out_s, segs, scores, cfg.voting_thresh)
  order = np.argsort(-out_sc, kind="stable")[:cfg.max_seg_num]
  return out_s[order], out_sc[order], out_l[order]


def ref_inference(levels, cfg, fps, duration, feat_stride, num_frames):
  """ActionFormer inference_single_video + postprocessing; levels: (logits, offsets, pts, mask)."""
  segs_all, scores_all, labels_all = [], [], []
  for logits, offs, pts, mask in levels:
    k = logits.shape[1]
    prob = (1 / (1 + np.exp(-logits.astype(np.float64))) * mask[:, None]).astype(np.float32)
    prob = prob.reshape(-1)
    idx = np.nonzero(prob > cfg.pre_nms_thresh)[0]
    order = np.argsort(-prob[idx], kind="stable")[:cfg.pre_nms_topk]
    idx = idx[order]
    pt, cls = idx // k, idx % k
    left = pts[pt, 0] - offs[pt, 0] * pts[pt, 3]
    right = pts[pt, 0] + offs[pt, 1] * pts[pt, 3]
    keep = right - left > cfg.duration_thresh
    segs_all.append(np.stack([left, right], 1)[keep])
    scores_all.append(prob[idx][keep])
    labels_all.append(cls[keep])
  segs, scores, labels = [np.concatenate(x) for x in (segs_all, scores_all, labels_all)]
  if cfg.nms_method != "none":
    segs, scores, labels = ref_batched_nms(segs, scores, labels, cfg)
  sec = np.clip((segs * feat_stride + 0.5 * num_frames) / fps, 0, duration)
  return sec, segs, scores, labels


# --- helpers ---


def make_points(length, num_levels=NUM_LEVELS):
  rows = []
  for l in range(num_levels):
    s = 2 ** l
    t = np.arange(length // s) * s
    rows.append(np.stack([t, np.zeros_like(t), np.full_like(t, 1e4), np.full_like(t, s)], 1))
  return np.concatenate(rows).astype(np.float32)


def split_levels(array, points):
  bounds = np.cumsum([0] + [int((points[:, 3] == 2 ** l).sum()) for l in range(NUM_LEVELS)])
  return [array[bounds[l]:bounds[l + 1]] for l in range(NUM_LEVELS)]


def random_batch(rng, lengths, max_len, num_classes):
  points = make_points(max_len)
  n = len(points)
  logits = rng.normal(-2.5, 1.5, (len(lengths), n, num_classes)).astype(np.float32)
  offsets = rng.uniform(0, 6, (len(lengths), n, 2)).astype(np.float32)
  mask = np.stack([points[:, 0] < length for length in lengths])
  return logits, offsets, mask, points


def as_meta(*values):
  return [np.asarray(v, np.float32) for v in values]


def assert_matches_reference(out, b, ref):
  ref_sec, ref_grid, ref_scores, ref_labels = ref
  n = int(out["num_detections"][b])
  assert n == len(ref_scores)
  np.testing.assert_allclose(out["scores"][b, :n], ref_scores, rtol=0, atol=1e-6)
  np.testing.assert_array_equal(out["labels"][b, :n], ref_labels)
  np.testing.assert_allclose(out["segments_grid"][b, :n], ref_grid, rtol=0, atol=2e-4)
  np.testing.assert_allclose(out["segments_sec"][b, :n], ref_sec, rtol=0, atol=1e-4)
  assert np.all(out["labels"][b, n:] == -1) and np.all(out["scores"][b, n:] == 0)


# --- tests ---


@pytest.mark.parametrize("name", ["thumos_like", "anet_like"])
def test_fixture_parity_with_actionformer(name):
  data = np.load(parity_file(name + ".npz"))
  with open(parity_file(name + ".json")) as f:
    meta = json.load(f)
  test_cfg = meta["test_cfg"]
  cfg = EvalConfig(**{k: test_cfg[k] for k in (
      "pre_nms_thresh", "pre_nms_topk", "max_seg_num", "min_score", "nms_method",
      "multiclass_nms", "nms_sigma", "iou_threshold", "voting_thresh", "duration_thresh")})
  cat = lambda key: np.concatenate([data[f"output/{key}_{l}"][1] for l in range(NUM_LEVELS)])
  points = np.concatenate([data[f"output/points_{l}"] for l in range(NUM_LEVELS)])
  fps, stride, frames = meta["fps"], meta["feat_stride"], meta["num_frames"]
  duration = (meta["lengths"][1] * stride + frames) / fps
  out = postprocess.postprocess_detections(
      cat("cls_logits")[None], cat("offsets")[None], cat("mask")[None], points,
      *as_meta([fps], [duration], [stride], [frames]), config=cfg)
  ref_segs = data["output/det_segments_sec"]
  n = int(out["num_detections"][0])
  assert n == len(ref_segs) == meta["num_detections"]
  np.testing.assert_allclose(out["segments_sec"][0, :n], ref_segs, rtol=0, atol=1e-4)
  np.testing.assert_allclose(out["scores"][0, :n], data["output/det_scores"], rtol=0, atol=1e-5)
  np.testing.assert_array_equal(out["labels"][0, :n], data["output/det_labels"])


CASES = {
    "multiclass_soft": dict(nms_method="soft", multiclass_nms=True, nms_sigma=0.5),
    "agnostic_soft_voting": dict(nms_method="soft", multiclass_nms=False, nms_sigma=0.75,
                                 voting_thresh=0.9, duration_thresh=0.001),
    "agnostic_soft_no_voting": dict(nms_method="soft", multiclass_nms=False, nms_sigma=0.3,
                                    voting_thresh=0.0),
    "multiclass_hard": dict(nms_method="hard", multiclass_nms=True, iou_threshold=0.3),
    "agnostic_hard_voting": dict(nms_method="hard", multiclass_nms=False, iou_threshold=0.4,
                                 voting_thresh=0.7, min_score=0.05),
    "high_min_score": dict(nms_method="soft", multiclass_nms=True, nms_sigma=0.5, min_score=0.3),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_batched_postprocess_equals_numpy_reference(case):
  rng = np.random.default_rng(len(case))
  cfg = EvalConfig(pre_nms_thresh=0.05, pre_nms_topk=40, max_seg_num=25, **CASES[case])
  lengths, max_len, num_classes = [64, 41], 64, 3
  logits, offsets, mask, points = random_batch(rng, lengths, max_len, num_classes)
  fps, dur, stride, frames = [30.0, 25.0], [20.0, 9.0], [4.0, 8.0], [16.0, 8.0]
  out = postprocess.postprocess_detections(logits, offsets, mask, points,
                                           *as_meta(fps, dur, stride, frames), config=cfg)
  out = {k: v.numpy() for k, v in out.items()}
  for b in range(2):
    levels = list(zip(*[split_levels(a, points) for a in (logits[b], offsets[b], points,
                                                          mask[b])]))
    ref = ref_inference(levels, cfg, fps[b], dur[b], stride[b], frames[b])
    assert_matches_reference(out, b, ref)
    assert np.all(np.diff(out["scores"][b, :int(out["num_detections"][b])]) <= 0)


@pytest.mark.parametrize("method", ["soft", "hard"])
def test_greedy_nms_rounds_are_exact(method):
  """A tiny first round forces the candidate set to grow; the picks still equal the reference."""
  rng = np.random.default_rng(7)
  m, d = 120, 30
  starts = rng.uniform(0, 50, (2, m)).astype(np.float32)
  segs = np.stack([starts, starts + rng.uniform(0.5, 10, (2, m)).astype(np.float32)], -1)
  scores = rng.uniform(0.01, 1, (2, m)).astype(np.float32)
  labels = rng.integers(0, 2, (2, m)).astype(np.int32)
  valid = rng.random((2, m)) < 0.9
  cfg = EvalConfig(nms_method=method, nms_sigma=0.5, iou_threshold=0.2, max_seg_num=d,
                   min_score=0.001)
  idx, sc, ok = postprocess.greedy_nms(segs, scores, labels, valid, d, method=method,
                                       sigma=0.5, iou_threshold=0.2, min_score=0.001,
                                       multiclass=True, first_round_size=5)
  for b in range(2):
    keep = np.nonzero(valid[b])[0]
    _, ref_sc, ref_lab = ref_batched_nms(segs[b, keep], scores[b, keep], labels[b, keep], cfg)
    n = int(ok[b].numpy().sum())
    assert n == len(ref_sc)
    np.testing.assert_allclose(sc[b, :n], ref_sc, atol=1e-6)
    np.testing.assert_array_equal(labels[b][idx[b, :n].numpy()], ref_lab)


def test_soft_nms_hand_case():
  """Two overlapping segments: iou = 5 / (10 + 5 - 5 + 2e-6); 0.5 * exp(-iou^2 / 0.5)."""
  segs = np.array([[[0, 10], [5, 10], [20, 30]]], np.float32)
  scores = np.array([[0.9, 0.5, 0.4]], np.float32)
  idx, sc, ok = postprocess.greedy_nms(segs, scores, np.zeros([1, 3], np.int32),
                                       np.ones([1, 3], bool), 5, sigma=0.5, min_score=0.001,
                                       multiclass=False)
  iou = 5 / (10 + 1e-6 + 5 + 1e-6 - 5)
  np.testing.assert_array_equal(idx[0, :3], [0, 2, 1])
  np.testing.assert_allclose(sc[0, :3], [0.9, 0.4, 0.5 * np.exp(-iou ** 2 / 0.5)], rtol=1e-6)
  np.testing.assert_array_equal(ok[0], [True, True, True, False, False])


def test_score_voting_hand_case():
  """Kept [0, 10]; neighbours [0, 10] (w = 0.8 * 1) and [1, 10] (iou 0.9, w = 0.4 * 0.9)."""
  kept = np.array([[[0, 10]]], np.float32)
  segs = np.array([[[0, 10], [1, 10], [30, 40]]], np.float32)
  scores = np.array([[0.8, 0.4, 0.9]], np.float32)
  out = postprocess.score_voting(kept, np.ones([1, 1], bool), segs, scores,
                                 np.ones([1, 3], bool), 0.85)
  w0, w1 = 0.8, 0.4 * 0.9
  np.testing.assert_allclose(out[0, 0], [(w1 * 1) / (w0 + w1), 10.0], rtol=1e-6)


def test_outputs_fixed_size_and_batch_rows_independent():
  rng = np.random.default_rng(3)
  cfg = EvalConfig(pre_nms_thresh=0.05, pre_nms_topk=30, max_seg_num=17)
  logits, offsets, mask, points = random_batch(rng, [64, 29, 50], 64, 4)
  meta = as_meta([30.0] * 3, [12.0, 5.0, 8.0], [4.0] * 3, [16.0] * 3)
  out = postprocess.postprocess_detections(logits, offsets, mask, points, *meta, config=cfg)
  assert out["segments_grid"].shape == (3, 17, 2) and out["segments_sec"].shape == (3, 17, 2)
  assert out["scores"].shape == (3, 17) and out["labels"].dtype == tf.int32
  assert out["num_detections"].shape == (3,) and out["num_detections"].dtype == tf.int32
  for b in range(3):
    single = postprocess.postprocess_detections(
        logits[b:b + 1], offsets[b:b + 1], mask[b:b + 1], points,
        *[m[b:b + 1] for m in meta], config=cfg)
    for key in single:
      np.testing.assert_allclose(out[key][b], single[key][0], atol=1e-6)
    sec = out["segments_sec"][b].numpy()
    assert sec.min() >= 0 and sec.max() <= meta[1][b]


def test_padding_is_ignored():
  """Changing logits / offsets on padded points leaves the detections unchanged."""
  rng = np.random.default_rng(5)
  cfg = EvalConfig(pre_nms_thresh=0.05, pre_nms_topk=30, max_seg_num=20)
  logits, offsets, mask, points = random_batch(rng, [37], 64, 3)
  meta = as_meta([30.0], [10.0], [4.0], [16.0])
  a = postprocess.postprocess_detections(logits, offsets, mask, points, *meta, config=cfg)
  logits2 = np.where(mask[..., None], logits, 9.0).astype(np.float32)
  b = postprocess.postprocess_detections(logits2, offsets, mask, points, *meta, config=cfg)
  for key in a:
    np.testing.assert_array_equal(a[key], b[key])


def test_none_method_keeps_top_scores():
  rng = np.random.default_rng(11)
  cfg = EvalConfig(pre_nms_thresh=0.05, pre_nms_topk=30, max_seg_num=10, nms_method="none")
  logits, offsets, mask, points = random_batch(rng, [64], 64, 2)
  out = postprocess.postprocess_detections(logits, offsets, mask, points,
                                           *as_meta([30.0], [10.0], [4.0], [16.0]), config=cfg)
  levels = list(zip(*[split_levels(a, points) for a in (logits[0], offsets[0], points,
                                                        mask[0])]))
  _, _, ref_scores, _ = ref_inference(levels, cfg, 30.0, 10.0, 4.0, 16.0)
  np.testing.assert_allclose(out["scores"][0], np.sort(ref_scores)[::-1][:10], atol=1e-6)


def test_grid_to_sec_per_video_golden():
  grid = np.array([[[-5.0, 2.0]], [[10.0, 1000.0]]], np.float32)
  fps, duration_sec, feat_stride, num_frames = as_meta([30.0, 15.0], [20.0, 50.0], [4.0, 16.0],
                                                       [16.0, 16.0])
  sec = postprocess.grid_to_sec_per_video(grid, fps, feat_stride, num_frames, duration_sec)
  # (2 * 4 + 8) / 30 = 0.5333; (10 * 16 + 8) / 15 = 11.2; clipped: 0 and 50.
  np.testing.assert_allclose(sec, [[[0.0, 16 / 30]], [[11.2, 50.0]]], rtol=1e-6)


def _detect_fn(cfg, num_classes):
  return tf.function(
      lambda *args: postprocess.postprocess_detections(*args, config=cfg),
      input_signature=[tf.TensorSpec([None, None, num_classes]), tf.TensorSpec([None, None, 2]),
                       tf.TensorSpec([None, None], tf.bool), tf.TensorSpec([None, 4])]
      + [tf.TensorSpec([None])] * 4)


EXPORT_CFG = EvalConfig(pre_nms_thresh=0.05, pre_nms_topk=30, max_seg_num=12,
                        multiclass_nms=False, voting_thresh=0.8)


def _check_unknown_sizes(fn):
  rng = np.random.default_rng(2)
  for lengths, max_len in (([32, 20], 32), ([64], 64)):
    args = random_batch(rng, lengths, max_len, 3)
    meta = as_meta([30.0] * len(lengths), [9.0] * len(lengths), [4.0] * len(lengths),
                   [16.0] * len(lengths))
    got = fn(*args, *meta)
    want = postprocess.postprocess_detections(*args, *meta, config=EXPORT_CFG)
    for key in want:
      np.testing.assert_allclose(got[key], want[key], atol=1e-6)
    assert got["scores"].shape == (len(lengths), 12)


def test_tf_function_with_unknown_batch_and_time():
  fn = _detect_fn(EXPORT_CFG, 3)
  _check_unknown_sizes(fn)
  assert fn.experimental_get_tracing_count() == 1


@pytest.mark.slow
def test_saved_model_round_trip(tmp_path):
  module = tf.Module()
  module.detect = _detect_fn(EXPORT_CFG, 3)
  tf.saved_model.save(module, str(tmp_path))
  loaded = tf.saved_model.load(str(tmp_path))
  _check_unknown_sizes(loaded.detect)


def test_score_fusion_hand_case(tmp_path, caplog):
  path = tmp_path / "cls.json"
  path.write_text(json.dumps({"results": {"abc": [0.1, 0.64, 0.25], "xyz": [0.5, 0.2, 0.3]},
                              "class": ["run", "jump", "swim"]}))
  scores = postprocess.load_video_scores(str(path))
  assert scores.class_names == ("run", "jump", "swim")
  dets = {
      "v_abc": {"segments_sec": np.array([[1.0, 2.0], [3.0, 5.0]]),
                "scores": np.array([0.36, 0.81])},
      "missing": {"segments_sec": np.array([[0.0, 1.0]]), "scores": np.array([0.5])},
  }
  fused = postprocess.fuse_video_scores(dets, scores, topk=2)
  assert fused.missing_videos == ["missing"] and "missing" in caplog.text
  out = fused.detections["v_abc"]
  # Proposals sorted by score (0.81, 0.36); classes jump (0.64) then swim (0.25).
  np.testing.assert_allclose(out["scores"], [np.sqrt(0.64 * 0.81), np.sqrt(0.64 * 0.36),
                                             np.sqrt(0.25 * 0.81), np.sqrt(0.25 * 0.36)])
  np.testing.assert_array_equal(out["labels"], [1, 1, 2, 2])
  np.testing.assert_array_equal(out["segments_sec"], [[3, 5], [1, 2], [3, 5], [1, 2]])
  assert set(fused.detections) == {"v_abc"}


class _Payload:
  """Unpickling this calls os.system (touches a marker file) if the reader lets it."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f"touch {self.marker}",))


def test_pickled_score_file_cannot_run_code(tmp_path):
  marker = tmp_path / "pwned"
  path = tmp_path / "scores.pkl"
  path.write_bytes(pickle.dumps({"vid": _Payload(marker)}))
  with pytest.raises(ValueError, match=r"--ext_score_file=.*scores.pkl: refusing to unpickle "
                                       r"(posix|os)\.system"):
    postprocess.load_video_scores(str(path))
  assert not marker.exists()
  other = tmp_path / "scores.txt"
  other.write_bytes(pickle.dumps({"vid": _Payload(marker)}))
  with pytest.raises(ValueError, match=r"scores.txt: use a .json file"):
    postprocess.load_video_scores(str(other))
  assert not marker.exists()


@pytest.mark.parametrize("opcode", sorted(restricted_pickle_test.HASHING_OPCODES))
def test_a_score_pickle_cannot_make_the_reader_hash_slowly(tmp_path, opcode):
  """{T_28: ...} with T_i = (T_(i-1), T_(i-1)), 400 bytes, took 2 s to load, doubling per
  level; colliding integer keys, quadratic time."""
  path = tmp_path / "scores.pkl"
  path.write_bytes(restricted_pickle_test.with_protocol(
      restricted_pickle_test.HASHING_OPCODES[opcode]))
  with pytest.raises(ValueError, match=r"--ext_score_file=.*scores\.pkl: not a valid PKL score "
                                       r"file \(UnpicklingError: a dict key or set item is "):
    postprocess.load_video_scores(str(path))


def test_pickled_numpy_score_file_still_loads(tmp_path):
  """UntrimmedNet's THUMOS file: {video_id: float32 array}; arrays and numpy scalars pass."""
  path = tmp_path / "thumos14_cls_scores.pkl"
  path.write_bytes(pickle.dumps({"video_test_1": np.array([0.1, 0.9], np.float32),
                                 "video_test_2": [np.float64(0.3), 0.7]}))
  scores = postprocess.load_video_scores(str(path))
  np.testing.assert_allclose(scores.scores["video_test_1"], [0.1, 0.9], rtol=1e-6)
  np.testing.assert_allclose(scores.scores["video_test_2"], [0.3, 0.7])


try:
  from numpy._core.multiarray import _reconstruct as _numpy_reconstruct
except ImportError:  # NumPy 1.x
  from numpy.core.multiarray import _reconstruct as _numpy_reconstruct


class _Reduce:
  """Pickles as `fn(*args)`."""

  def __init__(self, fn, *args):
    self.fn, self.args = fn, args

  def __reduce__(self):
    return (self.fn, self.args)


@pytest.mark.parametrize("array", [
    _Reduce(np.ndarray, (20,), "f8"),  # an array of a shape the file only names
    _Reduce(np.ndarray, (2 ** 20,), "f8"),  # 8 MiB from a 50-byte file (16 GiB as easily)
    _Reduce(_numpy_reconstruct, np.ndarray, (20,), b"b"),  # NumPy's own call, no bytes
])
def test_a_score_pickle_gets_no_array_it_does_not_carry(tmp_path, array):
  """Before, `numpy.ndarray` / `_reconstruct` were plain callables: a tiny file allocated an
  array of any size and its uninitialised memory came back as class scores."""
  path = tmp_path / "scores.pkl"
  path.write_bytes(pickle.dumps({"video_test_1": array}))
  with pytest.raises(ValueError, match=r"scores.pkl: not a valid PKL score file"):
    postprocess.load_video_scores(str(path))


def _global(module, name):
  return pickle.GLOBAL + f"{module}\n{name}\n".encode()


def _str(text):
  return pickle.SHORT_BINUNICODE + bytes([len(text)]) + text.encode()


def _score_pickle(value_opcodes):
  """A protocol-2 pickle of {"v": <value_opcodes>}."""
  return (pickle.PROTO + b"\x02" + pickle.EMPTY_DICT + _str("v") + value_opcodes + pickle.SETITEM
          + pickle.STOP)


_DTYPE_V1M = _global("numpy", "dtype") + _str("V1000000") + pickle.TUPLE1 + pickle.REDUCE


@pytest.mark.parametrize("value,message", [
    # an object array, which NumPy's BUILD then reads past the end of its list (a crash)
    (_global("numpy._core.multiarray", "_reconstruct") + pickle.MARK + _global("numpy", "ndarray")
     + pickle.MARK + pickle.BININT1 + b"\x00" + pickle.TUPLE + _str("O") + pickle.TUPLE
     + pickle.REDUCE, r"typecode 'O': NumPy's pickles reconstruct empty int8 arrays only"),
    # a 1 MB void scalar from 60 bytes (500 MB as easily), zero-filled by NumPy
    (_global("numpy._core.multiarray", "scalar") + _DTYPE_V1M + pickle.TUPLE1 + pickle.REDUCE,
     r"dtype 'V1000000': a score file holds numbers only"),
    # a structured dtype, whose fields a BUILD could place outside the bytes
    (_global("numpy", "dtype") + _str("V8") + pickle.TUPLE1 + pickle.REDUCE,
     r"dtype 'V8': a score file holds numbers only"),
])
def test_a_score_pickle_gets_numbers_only(tmp_path, value, message):
  path = tmp_path / "scores.pkl"
  path.write_bytes(_score_pickle(value))
  with pytest.raises(ValueError, match=rf"scores.pkl: not a valid PKL score file .*{message}"):
    postprocess.load_video_scores(str(path))


def test_a_score_pickle_cannot_change_the_readers_own_objects(tmp_path):
  """find_class handed out the module's own functions and classes, which a BUILD can set
  attributes on (for every later file)."""
  build_attr = (pickle.NONE + pickle.EMPTY_DICT + _str("pwned") + _str("yes") + pickle.SETITEM
                + pickle.TUPLE2 + pickle.BUILD)
  for target in (_global("numpy", "ndarray"), _global("numpy._core.numeric", "_frombuffer"),
                 _global("numpy", "dtype")):
    path = tmp_path / "scores.pkl"
    path.write_bytes(_score_pickle(target + build_attr))
    try:
      postprocess.load_video_scores(str(path))
    except ValueError:
      pass
  leaked = [name for name in dir(postprocess) if hasattr(getattr(postprocess, name), "pwned")]
  assert not leaked


@pytest.mark.parametrize("protocol", [2, 4, 5])
@pytest.mark.parametrize("dtype", [">f8", ">f4", "<f2", ">i4"])
def test_score_arrays_of_either_byte_order_load_their_values(tmp_path, protocol, dtype):
  """A big-endian array lost its byte order (the pickle's BUILD sets it on the dtype) and came
  back as finite garbage."""
  values = np.array([2.0, 1.0, 3.0], dtype)
  path = tmp_path / "scores.pkl"
  path.write_bytes(pickle.dumps({"v": values, "w": [values[1], values[0], values[2]]},
                                protocol=protocol))
  got = postprocess.load_video_scores(str(path)).scores
  np.testing.assert_array_equal(got["v"], [2.0, 1.0, 3.0])
  np.testing.assert_array_equal(got["w"], [1.0, 2.0, 3.0])  # NumPy scalars too


def _binstring(raw):
  return pickle.SHORT_BINSTRING + bytes([len(raw)]) + raw


def test_a_python2_numpy_score_pickle_loads(tmp_path):
  """UntrimmedNet's files are Python 2 pickles: byte strings for the ids and the array data."""
  dtype = (_global("numpy", "dtype") + _binstring(b"f8") + pickle.BININT1 + b"\x00"
           + pickle.BININT1 + b"\x01" + pickle.TUPLE3 + pickle.REDUCE + pickle.MARK
           + pickle.BININT1 + b"\x03" + _binstring(b"<") + pickle.NONE * 3 + pickle.BININT
           + struct.pack("<i", -1) + pickle.BININT + struct.pack("<i", -1) + pickle.BININT1
           + b"\x00" + pickle.TUPLE + pickle.BUILD)
  array = (_global("numpy.core.multiarray", "_reconstruct") + _global("numpy", "ndarray")
           + pickle.BININT1 + b"\x00" + pickle.TUPLE1 + _binstring(b"b") + pickle.TUPLE3
           + pickle.REDUCE + pickle.MARK + pickle.BININT1 + b"\x01" + pickle.BININT1 + b"\x02"
           + pickle.TUPLE1 + dtype + pickle.NEWFALSE
           + _binstring(np.array([0.5, 2.0], "<f8").tobytes()) + pickle.TUPLE + pickle.BUILD)
  path = tmp_path / "scores.pkl"
  path.write_bytes(pickle.PROTO + b"\x02" + pickle.EMPTY_DICT + _binstring(b"video_test_1")
                   + array + pickle.SETITEM + pickle.STOP)
  np.testing.assert_array_equal(
      postprocess.load_video_scores(str(path)).scores["video_test_1"], [0.5, 2.0])


def test_a_dtype_state_cannot_give_a_number_type_fields_or_a_sub_array(tmp_path):
  """dtype('>f8') is NumPy's own new object, which a BUILD turned into a sub-array dtype: 235
  bytes read past their buffer or crashed the process."""
  state = (pickle.MARK + pickle.BININT1 + b"\x03" + _str("<") + _global("numpy", "dtype")
           + _str("f8") + pickle.TUPLE1 + pickle.REDUCE + pickle.BININT + struct.pack("<i", 4)
           + pickle.TUPLE1 + pickle.TUPLE2 + pickle.NONE + pickle.NONE + pickle.BININT1 + b"\x08"
           + pickle.BININT1 + b"\x01" + pickle.BININT1 + b"\x00" + pickle.TUPLE + pickle.BUILD)
  dtype = _global("numpy", "dtype") + _str(">f8") + pickle.TUPLE1 + pickle.REDUCE + state
  value = (_global("numpy._core.numeric", "_frombuffer") + pickle.MARK
           + pickle.SHORT_BINBYTES + b"\x08" + b"\x00" * 8 + dtype + pickle.BININT1 + b"\x04"
           + pickle.TUPLE1 + _str("C") + pickle.TUPLE + pickle.REDUCE)
  path = tmp_path / "scores.pkl"
  path.write_bytes(_score_pickle(value))
  with pytest.raises(ValueError, match=r"not a valid PKL score file .*a dtype state other than "
                                       "a plain number's byte order"):
    postprocess.load_video_scores(str(path))


def test_score_rows_are_checked_before_numpy_builds_them(tmp_path):
  """A nested list sharing its halves (1 GB from 185 bytes at depth 24) and one row under many
  videos (1.6 GB from 417 KB) were converted to float64 before any check."""
  nested = (pickle.EMPTY_LIST + pickle.BINPUT + b"\x00" + pickle.POP + b"".join(
      pickle.MARK + pickle.BINGET + bytes([i]) + pickle.BINGET + bytes([i]) + pickle.LIST
      + pickle.BINPUT + bytes([i + 1]) + pickle.POP for i in range(20))
            + pickle.BINGET + bytes([20]))
  path = tmp_path / "nested.pkl"
  path.write_bytes(_score_pickle(nested))
  with pytest.raises(ValueError, match=r"video v: scores must be a flat list"):
    postprocess.load_video_scores(str(path))
  row = list(np.linspace(0.0, 1.0, 1000))
  shared = tmp_path / "shared.pkl"
  shared.write_bytes(pickle.dumps({f"video_{i}": row for i in range(500)}))
  with pytest.raises(ValueError, match=r"shared.pkl: more scores than a file of \d+ bytes can "
                                       "hold"):
    postprocess.load_video_scores(str(shared))


def test_a_score_pickle_whose_bytes_do_not_fill_its_shape_is_refused(tmp_path):
  """NumPy's own check, kept by the reader's BUILD path (an invariant, not a regression)."""
  good = pickle.dumps({"v": np.arange(3.0)}, protocol=4)
  bad = good.replace(b"K\x03\x85", b"K\x04\x85")  # the state's shape (3,) -> (4,)
  assert bad != good
  path = tmp_path / "scores.pkl"
  path.write_bytes(bad)
  with pytest.raises(ValueError, match=r"scores.pkl: not a valid PKL score file"):
    postprocess.load_video_scores(str(path))


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_numpy_score_pickles_of_every_protocol_load(tmp_path, protocol):
  path = tmp_path / "scores.pkl"
  path.write_bytes(pickle.dumps({"v": np.array([0.25, 0.5], np.float32)}, protocol=protocol))
  np.testing.assert_array_equal(postprocess.load_video_scores(str(path)).scores["v"],
                                [0.25, 0.5])


@pytest.mark.parametrize("content,message", [
    (b"{not json", "not a valid JSON score file"),
    (b"[1, 2]", "expected"),
    (b'{"v": ["a", "b"]}', "video v: scores must be a flat list of finite numbers"),
])
def test_bad_score_files_name_the_file(tmp_path, content, message):
  path = tmp_path / "cls.json"
  path.write_bytes(content)
  with pytest.raises(ValueError, match=f"--ext_score_file={path}: {message}"):
    postprocess.load_video_scores(str(path))
