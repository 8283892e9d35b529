"""Plots for inspecting a detector: per-video timelines and the learned ASL sensitivity curves.

* `plot_video_timeline`: one PNG per video; one row per class present in the ground truth or
  in the top-k detections, GT as solid bars and detections as translucent bars (opacity and a
  text label give the score), optionally the per-point class scores in a panel below.
* `plot_sensitivity_curves`: the class-level Gaussians of the Action Sensitivity Evaluator,
  g(x) = exp(-(x - mu)^2 / (2 sigma^2)) of x = (segment centre - t) / (stride * segment length),
  one small panel per class: the classification weight, the mean of the two localization
  Gaussians and their product (the final weight of the localization loss).
* `load_results_for_video`: one video of an ActivityNet results JSON as arrays.

matplotlib is optional (`pip install matplotlib`, or the `plot` extra); it is imported lazily and
drawn with the Agg canvas directly, so the global pyplot backend of the caller is untouched. Only
NumPy is needed otherwise (no TensorFlow import).
"""

from __future__ import annotations

import io
import json
import os
from typing import Mapping, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from asl_tf import files

# 20 distinguishable colours (matplotlib tab20, the saturated half first), indexed by class id.
_PALETTE = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
    "#bcbd22", "#17becf", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94",
    "#f7b6d2", "#c7c7c7", "#dbdb8d", "#9edae5",
)

DPI = 100
TIMELINE_WIDTH_PX = 1400
TIMELINE_ROW_PX = 60
# Height without a score curve: title / legend (90 px) + x-axis label (60 px) + rows.
TIMELINE_BASE_PX = 150
# Extra height of the score-curve panel (including its gap).
SCORE_PANEL_PX = 150
SENSITIVITY_PANEL_PX = (300, 230)  # width, height of one class panel
SENSITIVITY_MAX_COLS = 5
_MAX_NAME_CHARS = 28
_MAX_CURVE_LEGEND = 10

# (mu, sigma) keys of the class-level Gaussians, as in `asl_tf.modeling.sensitivity`.
SENSITIVITY_KEYS = ("mu", "sigma", "mu_reg_left", "sigma_reg_left", "mu_reg_right",
                    "sigma_reg_right")


class VideoDetections(NamedTuple):
  """Detections of one video, by decreasing score.

  Attributes:
    segments_sec: float64 [D, 2] (start, end) in seconds.
    scores: float64 [D].
    labels: int64 [D] class ids.
  """
  segments_sec: np.ndarray
  scores: np.ndarray
  labels: np.ndarray


def class_color(class_id: int) -> Tuple[float, float, float]:
  """RGB in [0, 1] of the colour used for `class_id` in every plot (cycles after 20)."""
  hex_color = _PALETTE[int(class_id) % len(_PALETTE)]
  return tuple(int(hex_color[i:i + 2], 16) / 255.0 for i in (1, 3, 5))


def detection_alpha(score: float) -> float:
  """Fill opacity of a detection bar: 0.12 at score 0 rising linearly to 0.85 at score 1."""
  return 0.12 + 0.73 * float(np.clip(score, 0.0, 1.0))


def timeline_size_px(num_rows: int, with_score_curve: bool) -> Tuple[int, int]:
  """(width, height) in pixels of a `plot_video_timeline` PNG with `num_rows` class rows."""
  height = TIMELINE_BASE_PX + max(num_rows, 1) * TIMELINE_ROW_PX
  return TIMELINE_WIDTH_PX, height + (SCORE_PANEL_PX if with_score_curve else 0)


class _Mpl(NamedTuple):
  figure: type
  canvas: type
  patch: type
  rectangle: type
  line: type


def _matplotlib() -> _Mpl:
  """Imports the matplotlib classes used here lazily (the Agg canvas, no pyplot)."""
  # pylint: disable=import-outside-toplevel
  try:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch, Rectangle
  except ImportError as e:
    raise ImportError("asl_tf.visualization needs matplotlib: pip install matplotlib (in a "
                      "clone, pip install -e '.[plot]' installs it with asl_tf)") from e
  return _Mpl(Figure, FigureCanvasAgg, Patch, Rectangle, Line2D)


def _save(fig, mpl: _Mpl, output_path: str) -> str:
  """Renders `fig` as PNG and replaces `output_path` with it atomically (a failed or killed
  drawing leaves the previous picture whole)."""
  os.makedirs(os.path.dirname(os.path.abspath(output_path)), exist_ok=True)
  mpl.canvas(fig)
  png = io.BytesIO()
  fig.savefig(png, format="png", dpi=DPI)
  files.write_bytes_atomic(output_path, png.getvalue())
  return output_path


def _short(name: str) -> str:
  name = str(name)
  return name if len(name) <= _MAX_NAME_CHARS else name[:_MAX_NAME_CHARS - 1] + "\u2026"


def _as_segments(name: str, value) -> np.ndarray:
  arr = np.asarray(value, np.float64)
  if arr.size == 0:
    return arr.reshape(0, 2)
  if arr.ndim != 2 or arr.shape[1] != 2:
    raise ValueError(f"{name} must have shape [N, 2] (start, end), got {arr.shape}")
  bad = np.flatnonzero(~np.isfinite(arr).all(axis=1))
  if bad.size:
    raise ValueError(f"{name}[{bad[0]}] = {arr[bad[0]].tolist()} is not finite")
  bad = np.flatnonzero(arr[:, 1] < arr[:, 0])
  if bad.size:
    raise ValueError(f"{name}[{bad[0]}] = {arr[bad[0]].tolist()} ends before it starts")
  return arr


def _as_labels(name: str, value, count: int, num_classes: int, count_name: str) -> np.ndarray:
  arr = np.asarray(value).reshape(-1) if np.size(value) else np.zeros(0, np.int64)
  if arr.shape[0] != count:
    raise ValueError(f"{name} has {arr.shape[0]} entries but {count_name} has {count}")
  if arr.size and not np.all(np.equal(np.mod(arr, 1), 0)):
    raise ValueError(f"{name} must hold integer class ids, got {arr.dtype}")
  arr = arr.astype(np.int64)
  bad = np.flatnonzero((arr < 0) | (arr >= num_classes))
  if bad.size:
    raise ValueError(f"{name}[{bad[0]}] = {arr[bad[0]]} is outside [0, {num_classes}) "
                     "(len(class_names))")
  return arr


def _as_scores(name: str, value, count: int, count_name: str) -> np.ndarray:
  arr = np.asarray(value, np.float64).reshape(-1) if np.size(value) else np.zeros(0)
  if arr.shape[0] != count:
    raise ValueError(f"{name} has {arr.shape[0]} entries but {count_name} has {count}")
  bad = np.flatnonzero(~np.isfinite(arr))
  if bad.size:
    raise ValueError(f"{name}[{bad[0]}] = {arr[bad[0]]} is not finite")
  return arr


def _assign_lanes(segments: np.ndarray) -> Tuple[np.ndarray, int]:
  """Greedy interval packing: lane per segment (no overlap within a lane), number of lanes."""
  lanes = np.zeros(len(segments), np.int64)
  lane_ends = []
  for i in np.argsort(segments[:, 0], kind="stable"):
    for lane, end in enumerate(lane_ends):
      if segments[i, 0] >= end:
        lanes[i], lane_ends[lane] = lane, segments[i, 1]
        break
    else:
      lanes[i] = len(lane_ends)
      lane_ends.append(segments[i, 1])
  return lanes, max(len(lane_ends), 1)


def _validate_score_curve(score_curve, num_classes: int) -> Tuple[np.ndarray, np.ndarray]:
  if not isinstance(score_curve, (tuple, list)) or len(score_curve) != 2:
    raise ValueError("score_curve must be a pair (times_sec [T], scores [T, K] or [T])")
  times = np.asarray(score_curve[0], np.float64).reshape(-1)
  scores = np.asarray(score_curve[1], np.float64)
  if scores.ndim not in (1, 2) or scores.shape[0] != times.shape[0]:
    raise ValueError(f"score_curve scores must have shape [T] or [T, K] with T = "
                     f"{times.shape[0]} (len(times_sec)), got {scores.shape}")
  if scores.ndim == 2 and scores.shape[1] != num_classes:
    raise ValueError(f"score_curve scores have {scores.shape[1]} classes but class_names has "
                     f"{num_classes}")
  return times, scores


def plot_video_timeline(video_id: str, duration_sec: Optional[float], gt_segments_sec,
                        gt_labels, det_segments_sec, det_scores, det_labels,
                        class_names: Sequence[str], output_path: str, score_curve=None,
                        top_k: int = 10, min_score: float = 0.0) -> str:
  """Draws the ground truth and the top detections of one video on a time axis (PNG).

  One row per class present in the GT or in the shown detections (by class id): the GT as solid
  bars in the upper half, the detections as translucent bars in the lower half (opacity
  `detection_alpha(score)` and the score as text; overlapping detections of a class are stacked
  in lanes). The image is `timeline_size_px(rows, score_curve is not None)` pixels.

  Args:
    video_id: shown in the title.
    duration_sec: end of the time axis; None or <= 0 uses the last segment end. Segments past
      it extend the axis.
    gt_segments_sec: float [M, 2] (start, end) in seconds.
    gt_labels: int [M] class ids.
    det_segments_sec: float [D, 2] (start, end) in seconds.
    det_scores: float [D].
    det_labels: int [D] class ids.
    class_names: the K class names, indexed by class id.
    output_path: PNG path; missing directories are created.
    score_curve: optional (times_sec [T], scores [T, K] or [T]) drawn in a panel below: with
      [T, K], the curves of the classes shown plus the max over all K classes.
    top_k: the number of highest-scoring detections shown.
    min_score: detections with a lower score are not shown.

  Returns:
    output_path.

  Raises:
    ValueError: inconsistent shapes, class ids outside class_names, non-finite values or
      segments ending before they start (the message names the array and index).
    ImportError: matplotlib is not installed.
  """
  num_classes = len(class_names)
  gt_segments = _as_segments("gt_segments_sec", gt_segments_sec)
  gt_labels = _as_labels("gt_labels", gt_labels, len(gt_segments), num_classes,
                         "gt_segments_sec")
  det_segments = _as_segments("det_segments_sec", det_segments_sec)
  det_scores = _as_scores("det_scores", det_scores, len(det_segments), "det_segments_sec")
  det_labels = _as_labels("det_labels", det_labels, len(det_segments), num_classes,
                          "det_segments_sec")
  curve = _validate_score_curve(score_curve, num_classes) if score_curve is not None else None
  if top_k < 0:
    raise ValueError(f"top_k must be >= 0, got {top_k}")

  keep = np.flatnonzero(det_scores >= min_score)
  keep = keep[np.argsort(-det_scores[keep], kind="stable")][:top_k]
  shown_segments, shown_scores, shown_labels = (det_segments[keep], det_scores[keep],
                                                det_labels[keep])
  rows = sorted(set(gt_labels.tolist()) | set(shown_labels.tolist()))
  row_of = {k: i for i, k in enumerate(rows)}

  ends = [s[:, 1].max() for s in (gt_segments, shown_segments) if len(s)]
  if curve is not None and len(curve[0]):
    ends.append(curve[0].max())
  end_sec = max([float(duration_sec or 0.0)] + [float(e) for e in ends])
  if end_sec <= 0:
    end_sec = 1.0

  mpl = _matplotlib()
  width_px, height_px = timeline_size_px(len(rows), curve is not None)
  fig = mpl.figure(figsize=(width_px / DPI, height_px / DPI), dpi=DPI)
  top_px, bottom_px, left_px, right_px = 90, 60, 220, 30
  rows_px = max(len(rows), 1) * TIMELINE_ROW_PX
  ax = fig.add_axes((left_px / width_px, 1 - (top_px + rows_px) / height_px,
                     1 - (left_px + right_px) / width_px, rows_px / height_px))
  ax.set_xlim(0.0, end_sec)
  ax.set_ylim(max(len(rows), 1), 0)
  ax.set_yticks([i + 0.5 for i in range(len(rows))])
  ax.set_yticklabels([_short(class_names[k]) for k in rows], fontsize=10)
  ax.tick_params(axis="y", length=0)
  for i in range(1, len(rows)):
    ax.axhline(i, color="#dddddd", linewidth=0.8, zorder=0)

  for (start, end), k in zip(gt_segments, gt_labels):
    i = row_of[int(k)]
    ax.add_patch(_rect(mpl, start, i + 0.08, end - start, 0.34, class_color(k), 1.0,
                       edgecolor="none", linewidth=0))
  for k in set(shown_labels.tolist()):
    idx = np.flatnonzero(shown_labels == k)
    lanes, num_lanes = _assign_lanes(shown_segments[idx])
    lane_h = 0.44 / num_lanes
    for j, lane in zip(idx, lanes):
      (start, end), score, y = shown_segments[j], shown_scores[j], row_of[k] + 0.5 + lane * lane_h
      ax.add_patch(_rect(mpl, start, y + 0.02 * lane_h, end - start, 0.96 * lane_h,
                         class_color(k), detection_alpha(score), edgecolor=class_color(k),
                         linewidth=1.0))
      ax.text(start + 0.004 * end_sec, y + 0.5 * lane_h, f"{score:.2f}", va="center",
              ha="left", fontsize=max(6, min(9, int(30 / num_lanes))), clip_on=True)
  if not rows:
    ax.text(0.5, 0.5, "no ground truth and no detections above min_score", ha="center",
            va="center", transform=ax.transAxes, fontsize=11, color="#555555")

  title = (f"{video_id}: {len(gt_segments)} GT, {len(keep)} of {len(det_segments)} detections "
           f"shown (top {top_k}, score >= {min_score:g}), duration {end_sec:.1f} s")
  fig.suptitle(title, x=left_px / width_px, y=1 - 12 / height_px, ha="left", va="top",
               fontsize=13)
  legend_handles = [
      mpl.patch(facecolor="#555555", edgecolor="none", label="ground truth"),
      mpl.patch(facecolor=(0.33, 0.33, 0.33, detection_alpha(0.5)), edgecolor="#555555",
                label="detection (opacity and text = score)"),
  ]
  fig.legend(handles=legend_handles, loc="upper left", ncol=2, frameon=False, fontsize=10,
             bbox_to_anchor=(left_px / width_px, 1 - 45 / height_px))

  if curve is None:
    ax.set_xlabel("time (s)", fontsize=11)
  else:
    panel_px = SCORE_PANEL_PX - 45
    cax = fig.add_axes((left_px / width_px, bottom_px / height_px,
                        1 - (left_px + right_px) / width_px, panel_px / height_px), sharex=ax)
    _draw_score_curve(cax, mpl, curve, rows, class_names)
    cax.set_xlabel("time (s)", fontsize=11)
  ax.tick_params(axis="x", labelsize=9)
  return _save(fig, mpl, output_path)


def _rect(mpl: _Mpl, x, y, w, h, color, alpha, edgecolor, linewidth):
  """A rectangle with fill opacity `alpha` and an opaque edge (matplotlib's `alpha` would
  apply to both)."""
  return mpl.rectangle((x, y), w, h, facecolor=(*color, alpha), edgecolor=edgecolor,
                       linewidth=linewidth)


def _draw_score_curve(ax, mpl: _Mpl, curve, rows, class_names) -> None:
  times, scores = curve
  order = np.argsort(times, kind="stable")
  times, scores = times[order], scores[order]
  handles = []
  if scores.ndim == 1:
    ax.plot(times, scores, color="#333333", linewidth=1.2)
    handles.append(mpl.line([], [], color="#333333", label="score"))
  else:
    ax.plot(times, scores.max(axis=1), color="#999999", linewidth=1.0, linestyle="--")
    handles.append(mpl.line([], [], color="#999999", linestyle="--",
                            label=f"max over {scores.shape[1]} classes"))
    for n, k in enumerate(rows):
      ax.plot(times, scores[:, k], color=class_color(k), linewidth=1.3)
      if n < _MAX_CURVE_LEGEND:
        handles.append(mpl.line([], [], color=class_color(k), label=_short(class_names[k])))
  low, high = (float(scores.min()), float(scores.max())) if scores.size else (0.0, 1.0)
  if low >= 0.0 and high <= 1.0:
    ax.set_ylim(0.0, 1.4)  # headroom for the legend
    ax.set_yticks([0.0, 0.5, 1.0])
  ax.set_ylabel("score\n(max over levels)", fontsize=9)
  ax.grid(True, axis="y", color="#eeeeee")
  ax.legend(handles=handles, loc="upper left", fontsize=8, ncol=min(len(handles), 6),
            framealpha=0.8)


def sensitivity_weights(params: Mapping[str, np.ndarray], x) -> Tuple[np.ndarray, np.ndarray,
                                                                       np.ndarray]:
  """The class-level ASL weights on a grid of normalised distances.

  Args:
    params: arrays [K] named by `SENSITIVITY_KEYS`.
    x: float [N] normalised distances (segment centre - t) / (stride * segment length).

  Returns:
    (g_cls, g_loc_mean, g_loc_final), each float64 [K, N]: the classification Gaussian, the mean
    of the left / right localization Gaussians, and g_loc_mean * g_cls (the DIoU loss weight).
  """
  values = _sensitivity_arrays(params)
  x = np.asarray(x, np.float64).reshape(1, -1)
  def g(mu_key, sigma_key):
    mu, sigma = values[mu_key][:, None], values[sigma_key][:, None]
    return np.exp(-np.square(x - mu) / (2.0 * np.maximum(np.square(sigma), 1e-12)))
  g_cls = g("mu", "sigma")
  g_loc = 0.5 * (g("mu_reg_left", "sigma_reg_left") + g("mu_reg_right", "sigma_reg_right"))
  return g_cls, g_loc, g_loc * g_cls


def _sensitivity_arrays(params: Mapping[str, np.ndarray]) -> dict:
  missing = [k for k in SENSITIVITY_KEYS if k not in params]
  if missing:
    raise ValueError(f"sensitivity params lack {missing}; expected arrays [K] named "
                     f"{list(SENSITIVITY_KEYS)}")
  values = {k: np.asarray(params[k], np.float64).reshape(-1) for k in SENSITIVITY_KEYS}
  num_classes = len(values["mu"])
  for key, value in values.items():
    if len(value) != num_classes:
      raise ValueError(f"sensitivity param {key!r} has {len(value)} entries but 'mu' has "
                       f"{num_classes}")
    bad = np.flatnonzero(~np.isfinite(value))
    if bad.size:
      raise ValueError(f"sensitivity param {key!r}[{bad[0]}] = {value[bad[0]]} is not finite")
  return values


def plot_sensitivity_curves(params: Mapping[str, np.ndarray], class_names: Sequence[str],
                            output_path: str, max_classes: int = 20,
                            class_ids: Optional[Sequence[int]] = None) -> str:
  """Draws the learned class-level ASL Gaussians, one small panel per class (PNG).

  Each panel shows, on x = (segment centre - t) / (stride * segment length) in [-1, 1]: the
  classification weight g(x; mu, sigma) (solid), the mean of the two localization Gaussians
  (solid) and its product with the classification weight, the final localization-loss weight
  (dashed); vertical lines at the centre x = 0 and the level-0 boundaries x = +0.5 (start) and
  x = -0.5 (end). A negative raw sigma (the authors' parametrization) acts as |sigma|.

  Args:
    params: arrays [K] named `mu`, `sigma`, `mu_reg_left`, `sigma_reg_left`, `mu_reg_right`,
      `sigma_reg_right`.
    class_names: the K class names.
    output_path: PNG path; missing directories are created.
    max_classes: at most this many panels.
    class_ids: the classes to draw (default: the first `max_classes`).

  Returns:
    output_path.

  Raises:
    ValueError: a missing or mis-sized param (named), class ids out of range.
    ImportError: matplotlib is not installed.
  """
  values = _sensitivity_arrays(params)
  num_classes = len(values["mu"])
  if len(class_names) != num_classes:
    raise ValueError(f"class_names has {len(class_names)} names but the params have "
                     f"{num_classes} classes")
  ids = list(range(num_classes)) if class_ids is None else [int(k) for k in class_ids]
  bad = [k for k in ids if not 0 <= k < num_classes]
  if bad:
    raise ValueError(f"class_ids {bad} are outside [0, {num_classes})")
  ids = ids[:max_classes]
  if not ids:
    raise ValueError("no class to draw (empty class_ids or max_classes <= 0)")

  x = np.linspace(-1.0, 1.0, 401)
  g_cls, g_loc, g_final = sensitivity_weights(values, x)
  mpl = _matplotlib()
  cols = min(len(ids), SENSITIVITY_MAX_COLS)
  grid_rows = -(-len(ids) // cols)
  panel_w, panel_h = SENSITIVITY_PANEL_PX
  header_px, footer_px = 115, 50
  width_px, height_px = cols * panel_w, grid_rows * panel_h + header_px + footer_px
  fig = mpl.figure(figsize=(width_px / DPI, height_px / DPI), dpi=DPI)
  grid = fig.add_gridspec(grid_rows, cols, left=45 / width_px, right=1 - 10 / width_px,
                          top=1 - header_px / height_px, bottom=footer_px / height_px,
                          hspace=0.75, wspace=0.25)
  styles = (("classification g_cls", "#1f77b4", "-"),
            ("localization (mean of left/right)", "#ff7f0e", "-"),
            ("final loc weight = loc x cls", "#2ca02c", "--"))
  for n, k in enumerate(ids):
    ax = fig.add_subplot(grid[n // cols, n % cols])
    for curve, (_, color, style) in zip((g_cls[k], g_loc[k], g_final[k]), styles):
      ax.plot(x, curve, color=color, linestyle=style, linewidth=1.4)
    ax.axvline(0.0, color="#444444", linewidth=0.8)
    for boundary in (-0.5, 0.5):
      ax.axvline(boundary, color="#888888", linewidth=0.8, linestyle=":")
    ax.set_xlim(-1.0, 1.0)
    ax.set_ylim(0.0, 1.05)
    ax.set_xticks([-1.0, -0.5, 0.0, 0.5, 1.0])
    ax.set_xticklabels(["-1", "end", "0", "start", "1"], fontsize=7)
    ax.tick_params(axis="y", labelsize=7)
    ax.set_title(
        f"{_short(class_names[k])}\n"
        f"cls \u03bc={values['mu'][k]:.2f} \u03c3={abs(values['sigma'][k]):.2f}\n"
        f"L \u03bc={values['mu_reg_left'][k]:.2f} \u03c3={abs(values['sigma_reg_left'][k]):.2f}"
        f"  R \u03bc={values['mu_reg_right'][k]:.2f} "
        f"\u03c3={abs(values['sigma_reg_right'][k]):.2f}", fontsize=8)
  shown = (f"{len(ids)} of {num_classes} classes" if len(ids) < num_classes
           else f"{num_classes} classes")
  fig.suptitle(f"ASL class-level sensitivity ({shown})", y=1 - 8 / height_px, va="top",
               fontsize=12)
  fig.legend(handles=[mpl.line([], [], color=c, linestyle=s, label=label)
                      for label, c, s in styles],
             loc="upper center", ncol=3, frameon=False, fontsize=9,
             bbox_to_anchor=(0.5, 1 - 30 / height_px))
  fig.text(0.5, 8 / height_px, "x = (segment centre - t) / (stride x segment length);  "
           "x = +0.5 start, -0.5 end boundary on level 0", ha="center", va="bottom", fontsize=9)
  return _save(fig, mpl, output_path)


def load_results_for_video(detections_json_path: str, video_id: str,
                           class_names: Optional[Sequence[str]] = None) -> VideoDetections:
  """Reads the detections of one video from an ActivityNet results JSON.

  Layout: `{"results": {video_id: [{"segment": [s, e], "label": name, "label_id": k,
  "score": x}]}}`. The class id is `label_id`, or `label` looked up in `class_names` when
  `label_id` is absent.

  Args:
    detections_json_path: the results JSON.
    video_id: the video to read.
    class_names: optional, to map `label` to ids.

  Returns:
    VideoDetections sorted by decreasing score (empty arrays for a video without detections).

  Raises:
    KeyError: the video is absent (the message lists a few present ids).
    ValueError: no `results` key, or a label that cannot be mapped to an id.
  """
  with open(detections_json_path) as f:
    data = json.load(f)
  results = data.get("results") if isinstance(data, dict) else None
  if not isinstance(results, dict):
    raise ValueError(f"{detections_json_path}: no 'results' mapping; expected "
                     "{\"results\": {video_id: [...]}}")
  if video_id not in results:
    present = sorted(results)
    hint = ""
    for alt in (f"v_{video_id}", video_id[2:] if video_id.startswith("v_") else None):
      if alt and alt in results:
        hint = f"; did you mean {alt!r}?"
    raise KeyError(f"{detections_json_path}: video {video_id!r} not in the results "
                   f"({len(present)} videos, e.g. {present[:5]}){hint}")
  name_to_id = {n: i for i, n in enumerate(class_names)} if class_names is not None else None
  segments, scores, labels = [], [], []
  for n, item in enumerate(results[video_id]):
    if "label_id" in item:
      label = int(item["label_id"])
    elif name_to_id is not None and item.get("label") in name_to_id:
      label = name_to_id[item["label"]]
    else:
      raise ValueError(f"{detections_json_path}: video {video_id!r} detection {n} has label "
                       f"{item.get('label')!r} without label_id and it is not in class_names")
    segments.append([float(item["segment"][0]), float(item["segment"][1])])
    scores.append(float(item["score"]))
    labels.append(label)
  scores = np.asarray(scores, np.float64)
  order = np.argsort(-scores, kind="stable")
  return VideoDetections(np.asarray(segments, np.float64).reshape(-1, 2)[order], scores[order],
                         np.asarray(labels, np.int64)[order])
