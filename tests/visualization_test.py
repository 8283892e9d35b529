"""Plots: pixel sizes, bar positions / colours / opacity read back from the PNGs, input errors."""

import json
import sys

import numpy as np
import pytest

from asl_tf import visualization as vis

pytest.importorskip("matplotlib")

NAMES = ["BaseballPitch", "BasketballDunk", "CliffDiving", "CricketBowling"]
NO_DETS = (np.zeros((0, 2)), np.zeros(0), np.zeros(0, np.int64))


def _read_rgb(path):
  """The PNG as uint8 [H, W, 3]."""
  from matplotlib import image  # pylint: disable=import-outside-toplevel
  return np.round(image.imread(path)[..., :3] * 255).astype(np.int64)


def _mask(img, class_id, tol=2):
  """Pixels of exactly the colour of `class_id` (up to PNG rounding)."""
  rgb = np.round(np.array(vis.class_color(class_id)) * 255)
  return np.all(np.abs(img - rgb) <= tol, axis=-1)


def _runs(columns):
  """Maximal runs [first, last] of consecutive integers in a sorted array."""
  breaks = np.flatnonzero(np.diff(columns) > 1)
  starts = np.concatenate([[columns[0]], columns[breaks + 1]])
  ends = np.concatenate([columns[breaks], [columns[-1]]])
  return list(zip(starts.tolist(), ends.tolist()))


def test_timeline_size_and_gt_bars_at_their_time_and_row(tmp_path):
  path = str(tmp_path / "out" / "v.png")  # the missing directory gets created
  returned = vis.plot_video_timeline(
      "vid", 100.0, [[0.0, 100.0], [10.0, 20.0], [60.0, 80.0]], [0, 2, 2], *NO_DETS, NAMES, path)
  assert returned == path
  img = _read_rgb(path)
  assert (img.shape[1], img.shape[0]) == vis.timeline_size_px(2, False) == (1400, 270)
  # Class 0 spans the whole axis: it calibrates seconds -> pixels.
  cols0 = np.flatnonzero(_mask(img, 0).any(axis=0))
  x0, x100 = cols0.min(), cols0.max()
  assert x100 - x0 > 1000
  runs = _runs(np.flatnonzero(_mask(img, 2).any(axis=0)))
  assert len(runs) == 2
  for (first, last), (start_sec, end_sec) in zip(runs, [(10, 20), (60, 80)]):
    assert abs(first - (x0 + start_sec / 100 * (x100 - x0))) <= 3  # spines / antialiasing
    assert abs(last - (x0 + end_sec / 100 * (x100 - x0))) <= 3
  # Rows ordered by class id, top to bottom.
  assert np.flatnonzero(_mask(img, 0).any(axis=1)).max() < np.flatnonzero(
      _mask(img, 2).any(axis=1)).min()


def _fill_darkness(img, column, rows):
  """Median distance from white of the non-white pixels of img[rows, column]."""
  pixels = img[rows, column]
  dist = np.abs(255 - pixels).sum(axis=-1)
  return float(np.median(dist[dist > 30]))


def test_detection_opacity_follows_score_and_filters_apply(tmp_path):
  path = str(tmp_path / "v.png")
  det_segments = [[40.0, 50.0], [10.0, 30.0], [85.0, 95.0], [60.0, 80.0]]
  det_scores = [0.15, 0.9, 0.05, 0.2]  # the class-3 detection is below min_score
  det_labels = [1, 0, 3, 0]
  vis.plot_video_timeline("vid", 100.0, [[0.0, 100.0]], [0], det_segments, det_scores,
                          det_labels, NAMES, path, top_k=2, min_score=0.08)
  img = _read_rgb(path)
  # top_k=2 by score keeps the two class-0 detections only: one row, no class-1 / 3 edges.
  assert (img.shape[1], img.shape[0]) == vis.timeline_size_px(1, False)
  assert not _mask(img, 1).any() and not _mask(img, 3).any()
  gt = _mask(img, 0)
  cols = np.flatnonzero(gt.any(axis=0))
  x0, x100 = cols.min(), cols.max()
  gt_rows = np.flatnonzero(gt[:, (x0 + x100) // 2])
  below = slice(gt_rows.max() + 3, gt_rows.max() + 30)
  def column(t_sec):
    return int(round(x0 + t_sec / 100 * (x100 - x0)))
  strong, weak = _fill_darkness(img, column(25), below), _fill_darkness(img, column(75), below)
  assert strong > weak + 100
  # Both are tints of the class colour: the strong one is close to alpha = detection_alpha(0.9).
  expected = np.abs(255 - (255 + vis.detection_alpha(0.9) * (
      np.array(vis.class_color(0)) * 255 - 255))).sum()
  assert abs(strong - expected) < 25


def test_empty_video_still_renders_with_a_score_panel(tmp_path):
  path = str(tmp_path / "empty.png")
  times = np.linspace(0.0, 50.0, 11)
  vis.plot_video_timeline("empty", 50.0, np.zeros((0, 2)), [], *NO_DETS, NAMES, path,
                          score_curve=(times, np.zeros(11)))
  img = _read_rgb(path)
  assert (img.shape[1], img.shape[0]) == vis.timeline_size_px(0, True) == (1400, 360)
  assert not any(_mask(img, k).any() for k in range(len(NAMES)))


def test_score_curve_peaks_where_the_class_fires(tmp_path):
  path = str(tmp_path / "curve.png")
  times = np.linspace(0.0, 100.0, 501)
  scores = np.zeros((501, len(NAMES)))
  scores[:, 2] = np.exp(-np.square(times - 70.0) / 8.0)  # right of the legend
  vis.plot_video_timeline("vid", 100.0, [[0.0, 100.0]], [2], *NO_DETS, NAMES, path,
                          score_curve=(times, scores))
  img = _read_rgb(path)
  assert (img.shape[1], img.shape[0]) == vis.timeline_size_px(1, True)
  mask = _mask(img, 2)
  bar_rows = np.flatnonzero(mask.sum(axis=1) > 1000)
  cols = np.flatnonzero(mask[bar_rows].any(axis=0))
  x0, x100 = cols.min(), cols.max()
  curve = mask.copy()
  curve[:bar_rows.max() + 40] = False  # the panel below the timeline (skip its x ticks)
  curve[:, :(x0 + x100) // 2] = False  # and right of its legend
  ys, xs = np.nonzero(curve)
  peak_x = xs[ys == ys.min()].mean()
  assert abs(peak_x - (x0 + 0.7 * (x100 - x0))) <= 4


@pytest.mark.parametrize("kwargs, message", [
    (dict(det_labels=[0, 7]), r"det_labels\[1\] = 7 is outside \[0, 4\)"),
    (dict(gt_labels=[0]), "gt_labels has 1 entries but gt_segments_sec has 2"),
    (dict(det_scores=[0.5, np.nan]), r"det_scores\[1\] = nan is not finite"),
    (dict(gt_segments_sec=[[1.0, 2.0], [5.0, 3.0]]), r"gt_segments_sec\[1\].*ends before"),
    (dict(score_curve=(np.arange(3), np.zeros((3, 2)))), "2 classes but class_names has 4"),
    (dict(score_curve=(np.arange(3), np.zeros(4))), r"T = 3 \(len\(times_sec\)\)"),
])
def test_timeline_bad_input_names_the_item(tmp_path, kwargs, message):
  args = dict(video_id="vid", duration_sec=10.0, gt_segments_sec=[[1.0, 2.0], [3.0, 5.0]],
              gt_labels=[0, 1], det_segments_sec=[[1.0, 2.0], [3.0, 4.0]],
              det_scores=[0.5, 0.4], det_labels=[0, 1], class_names=NAMES,
              output_path=str(tmp_path / "x.png"))
  args.update(kwargs)
  with pytest.raises(ValueError, match=message):
    vis.plot_video_timeline(**args)
  assert not (tmp_path / "x.png").exists()


def _params(num_classes, **overrides):
  params = {"mu": np.zeros(num_classes), "sigma": np.ones(num_classes),
            "mu_reg_left": np.full(num_classes, -0.5), "sigma_reg_left": np.ones(num_classes),
            "mu_reg_right": np.full(num_classes, 0.5), "sigma_reg_right": np.ones(num_classes)}
  params.update(overrides)
  return params


def test_sensitivity_weights_values():
  params = _params(2, mu=np.array([0.0, 0.3]), sigma=np.array([0.5, -0.5]),
                   mu_reg_left=np.array([-0.5, -0.5]), sigma_reg_left=np.array([0.25, 0.25]))
  x = np.array([0.0, 0.3, 0.8, -0.5])
  g_cls, g_loc, g_final = vis.sensitivity_weights(params, x)
  np.testing.assert_allclose(g_cls[0, :2], [1.0, np.exp(-0.18)])
  np.testing.assert_allclose(g_cls[1, 1:3], [1.0, np.exp(-0.5)])  # negative sigma acts as |sigma|
  left = np.exp(-np.square(x + 0.5) / (2 * 0.0625))
  right = np.exp(-np.square(x - 0.5) / 2)
  np.testing.assert_allclose(g_loc[0], (left + right) / 2)
  np.testing.assert_allclose(g_final, g_loc * g_cls)


def test_sensitivity_panels_follow_mu_and_max_classes(tmp_path):
  path = str(tmp_path / "sens.png")
  params = _params(5, mu=np.array([0.5, -0.5, 0.0, 0.0, 0.0]), sigma=np.full(5, 0.1))
  vis.plot_sensitivity_curves(params, [f"c{k}" for k in range(5)], path, max_classes=2)
  img = _read_rgb(path)
  assert img.shape[:2] == (230 + 165, 2 * 300)  # two panels in one row
  blue = np.all(np.abs(img - [0x1F, 0x77, 0xB4]) <= 2, axis=-1)
  centre_line = np.all(np.abs(img - 0x44) <= 2, axis=-1)
  plot_rows = slice(125, 200)  # inside the axes, below the titles and the legend
  offsets = []
  for half in (slice(0, 300), slice(300, 600)):
    ys, xs = np.nonzero(blue[115:, half])  # below the legend
    peak_x = xs[ys == ys.min()].mean()
    centre_x = np.median(np.nonzero(centre_line[plot_rows, half])[1])
    offsets.append(peak_x - centre_x)
  # mu = +0.5 peaks right of x = 0, mu = -0.5 left of it, symmetrically (axis width ~ 240 px).
  assert offsets[0] > 40 and offsets[1] < -40
  assert abs(offsets[0] + offsets[1]) <= 3


@pytest.mark.parametrize("params, names, message", [
    ({k: v for k, v in _params(3).items() if k != "sigma_reg_left"}, 3, "sigma_reg_left"),
    (_params(3, mu_reg_right=np.zeros(2)), 3, "'mu_reg_right' has 2 entries but 'mu' has 3"),
    (_params(3, sigma=np.array([1.0, np.inf, 1.0])), 3, r"'sigma'\[1\] = inf is not finite"),
    (_params(3), 4, "class_names has 4 names but the params have 3"),
])
def test_sensitivity_bad_params_name_the_item(tmp_path, params, names, message):
  with pytest.raises(ValueError, match=message):
    vis.plot_sensitivity_curves(params, NAMES[:names], str(tmp_path / "s.png"))


def _write_results(tmp_path):
  path = tmp_path / "results.json"
  path.write_text(json.dumps({"results": {
      "video_a": [{"segment": [1.0, 2.0], "label": "CliffDiving", "score": 0.3},
                  {"segment": [5.0, 9.0], "label": "BasketballDunk", "label_id": 1,
                   "score": 0.8}],
      "video_b": [],
      "v_video_c": [{"segment": [0.0, 1.0], "label_id": 0, "score": 0.5}],
  }}))
  return str(path)


def test_load_results_for_video_sorts_by_score_and_maps_names(tmp_path):
  dets = vis.load_results_for_video(_write_results(tmp_path), "video_a", class_names=NAMES)
  np.testing.assert_array_equal(dets.segments_sec, [[5.0, 9.0], [1.0, 2.0]])
  np.testing.assert_array_equal(dets.scores, [0.8, 0.3])
  np.testing.assert_array_equal(dets.labels, [1, 2])
  empty = vis.load_results_for_video(_write_results(tmp_path), "video_b")
  assert empty.segments_sec.shape == (0, 2) and empty.scores.shape == (0,)


def test_load_results_errors_name_the_video(tmp_path):
  path = _write_results(tmp_path)
  absent = r"'video_z' not in the results \(3 videos, e.g. \['v_video_c'"
  with pytest.raises(KeyError, match=absent):
    vis.load_results_for_video(path, "video_z")
  with pytest.raises(KeyError, match="did you mean 'v_video_c'"):
    vis.load_results_for_video(path, "video_c")
  with pytest.raises(ValueError, match="video 'video_a' detection 0 has label 'CliffDiving'"):
    vis.load_results_for_video(path, "video_a")  # no class_names to map the name


_HOW_TO_INSTALL = r"pip install matplotlib \(in a clone, pip install -e '\.\[plot\]'"


def test_missing_matplotlib_says_how_to_install(tmp_path, monkeypatch):
  for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
    monkeypatch.setitem(sys.modules, name, None)
  monkeypatch.setitem(sys.modules, "matplotlib", None)
  with pytest.raises(ImportError, match=_HOW_TO_INSTALL):
    vis.plot_video_timeline("vid", 10.0, [[1.0, 2.0]], [0], *NO_DETS, NAMES,
                            str(tmp_path / "x.png"))
  with pytest.raises(ImportError, match=_HOW_TO_INSTALL):
    vis.plot_sensitivity_curves(_params(1), NAMES[:1], str(tmp_path / "s.png"))


def test_a_failed_drawing_leaves_the_previous_picture_whole(tmp_path, monkeypatch):
  """savefig wrote into the picture's path: a drawing that failed half-way (a full disk, a
  kill) left a truncated PNG where the previous one had been."""
  path = str(tmp_path / "video.png")
  vis.plot_video_timeline("video", 50.0, np.zeros((0, 2)), [], *NO_DETS, NAMES, path)
  with open(path, "rb") as f:
    before = f.read()
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top

  def fail_half_way(self, target, **kwargs):
    del self, kwargs
    if isinstance(target, str):
      with open(target, "wb") as f:
        f.write(b"\x89PNG half")
    else:
      target.write(b"\x89PNG half")
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(Figure, "savefig", fail_half_way)
  with pytest.raises(OSError, match="No space left"):
    vis.plot_video_timeline("video", 60.0, np.zeros((0, 2)), [], *NO_DETS, NAMES, path)
  with open(path, "rb") as f:
    assert f.read() == before
  assert sorted(p.name for p in tmp_path.iterdir()) == ["video.png"]
