"""The embedded demo dataset: synthetic features over THUMOS-like annotation statistics.

`ensure_demo_data(data_config)` writes, into `data_config.demo_dir`,

    annotations.json        ActionFormer layout, subsets `training` (100) and `validation` (30)
    features/<vid>.npy      float32 [T, input_dim], 96 <= T <= min(256, max_seq_len)
    manifest.json           generator version and parameters

Each video has 1-6 actions of 4-48 features (log-uniform, so short actions dominate as in
THUMOS14), of `num_classes` classes; about one action in ten may overlap another of a different
class. An action of class k adds `amplitude * profile(t) * direction_k` to the features, where
direction_k is a fixed random unit vector and profile ramps linearly from 0.5 to 1 over the
first and last quarter of the action (so boundaries are visible), on top of white noise and a
slowly drifting background. A small detector learns it to a high mAP in a few CPU minutes.

The data depends only on the parameters in the manifest (input_dim, num_classes, feat_stride,
num_frames, fps, max_seq_len and GENERATOR_VERSION); it is regenerated only when the manifest is
missing or differs, and written to a temporary folder first so that readers never see a partial
dataset.
"""

from __future__ import annotations

import json
import os
from typing import Dict, List, Tuple

import numpy as np

from asl_tf import config as config_lib
from asl_tf.data import dataset_dir
from asl_tf.data import timebase

GENERATOR_VERSION = 1
NUM_TRAIN_VIDEOS = 100
NUM_VAL_VIDEOS = 30
MIN_LENGTH_GRID = 96
MAX_LENGTH_GRID = 256
ACTIONS_PER_VIDEO = (1, 6)
ACTION_LENGTH_GRID = (4, 48)
OVERLAP_PROB = 0.1
SIGNAL_AMPLITUDE = 5.0
NOISE_STD = 1.0
DRIFT_STD = 0.5
_SEED = 20230601


def demo_parameters(data_config: config_lib.DataConfig) -> Dict[str, float]:
  """The generator parameters a config implies (what the manifest records)."""
  return {
      "generator_version": GENERATOR_VERSION,
      "input_dim": int(data_config.input_dim),
      "num_classes": int(data_config.num_classes),
      "feat_stride": float(data_config.feat_stride),
      "num_frames": float(data_config.num_frames),
      "fps": float(data_config.default_fps),
      "max_length_grid": int(min(MAX_LENGTH_GRID, data_config.max_seq_len)),
  }


def ensure_demo_data(data_config: config_lib.DataConfig) -> str:
  """Generates the demo dataset into `data_config.demo_dir` unless it is already there.

  Args:
    data_config: demo_dir (no-op when empty); annotation_file and feature_dir must point into
      it; input_dim, num_classes, feat_stride, num_frames, default_fps, max_seq_len shape it.

  Returns:
    The demo folder ('' when demo_dir is empty).

  Raises:
    config_lib.ConfigError: annotation_file / feature_dir do not point at the demo folder, the
      parameters cannot make a dataset, or demo_dir holds files the demo generator did not
      write.
  """
  demo_dir = data_config.demo_dir
  if not demo_dir:
    return ""
  ann_path = os.path.join(demo_dir, "annotations.json")
  feat_dir = os.path.join(demo_dir, "features")
  if (os.path.abspath(data_config.annotation_file) != os.path.abspath(ann_path) or
      [os.path.abspath(d) for d in data_config.feature_dir] != [os.path.abspath(feat_dir)]):
    raise config_lib.ConfigError(
        f"--demo_dir={demo_dir} needs --annotation_file={ann_path} and --feature_dir={feat_dir} "
        f"(got {data_config.annotation_file!r}, {list(data_config.feature_dir)}); or set "
        "--demo_dir=''")
  if data_config.feature_ext != ".npy" or data_config.file_prefix or data_config.file_suffix:
    raise config_lib.ConfigError("the demo writes <video_id>.npy: use --feature_ext=.npy and no "
                                 "--file_prefix / --file_suffix")
  params = demo_parameters(data_config)
  if params["max_length_grid"] < MIN_LENGTH_GRID or params["num_classes"] < 1:
    raise config_lib.ConfigError(
        f"demo needs max_seq_len >= {MIN_LENGTH_GRID} and num_classes >= 1, got "
        f"{data_config.max_seq_len}, {data_config.num_classes}")
  try:
    return dataset_dir.build_once(demo_dir, params,
                                  lambda folder: _write_dataset(folder, params),
                                  tmp_prefix=".demo_tmp_")
  except dataset_dir.FolderNotGeneratedError as e:
    raise config_lib.ConfigError(f"--demo_dir: {e}") from None


def _place_actions(rng: np.random.Generator, length: int,
                   num_classes: int) -> List[Tuple[int, int, int]]:
  """(start, end, label) in grid units; features start..end inclusive are in the action."""
  actions = []
  for _ in range(int(rng.integers(ACTIONS_PER_VIDEO[0], ACTIONS_PER_VIDEO[1] + 1))):
    for _ in range(50):
      lo, hi = np.log(ACTION_LENGTH_GRID[0]), np.log(ACTION_LENGTH_GRID[1])
      dur = int(round(np.exp(rng.uniform(lo, hi))))
      start = int(rng.integers(0, length - dur))
      end = start + dur
      label = int(rng.integers(0, num_classes))
      overlaps = [a for a in actions if start <= a[1] and a[0] <= end]
      allow_overlap = rng.random() < OVERLAP_PROB
      if not overlaps or (allow_overlap and num_classes > 1 and
                          all(a[2] != label for a in overlaps)):
        actions.append((start, end, label))
        break
  return sorted(actions)


def _video_features(rng: np.random.Generator, length: int, actions, directions: np.ndarray,
                    drift_basis: np.ndarray) -> np.ndarray:
  """float32 [length, C]: noise + drifting background + ramped class directions."""
  channels = directions.shape[1]
  feats = rng.normal(0.0, NOISE_STD, size=[length, channels])
  walk = np.cumsum(rng.normal(0.0, 1.0, size=[length, drift_basis.shape[0]]), axis=0)
  walk /= np.sqrt(np.arange(1, length + 1))[:, None]
  feats += DRIFT_STD * walk @ drift_basis
  for start, end, label in actions:
    n = end - start + 1
    t = np.arange(n, dtype=np.float64)
    ramp = max(1.0, n / 4.0)
    profile = np.clip(0.5 + 0.5 * np.minimum(t, n - 1 - t) / ramp, 0.5, 1.0)
    feats[start:end + 1] += SIGNAL_AMPLITUDE * profile[:, None] * directions[label][None, :]
  return feats.astype(np.float32)


def _write_dataset(out_dir: str, params: Dict[str, float]) -> None:
  rng = np.random.default_rng(_SEED)
  channels, num_classes = params["input_dim"], params["num_classes"]
  directions = rng.normal(size=[num_classes, channels])
  directions /= np.linalg.norm(directions, axis=1, keepdims=True)
  drift_basis = rng.normal(size=[4, channels]) / np.sqrt(channels)
  class_names = [f"action_{k:02d}" for k in range(num_classes)]
  stride, frames, fps = params["feat_stride"], params["num_frames"], params["fps"]
  os.makedirs(os.path.join(out_dir, "features"))
  database = {}
  splits = [("training", NUM_TRAIN_VIDEOS), ("validation", NUM_VAL_VIDEOS)]
  for subset, count in splits:
    for i in range(count):
      video_id = f"demo_{subset}_{i:04d}"
      length = int(rng.integers(MIN_LENGTH_GRID, params["max_length_grid"] + 1))
      actions = _place_actions(rng, length, num_classes)
      feats = _video_features(rng, length, actions, directions, drift_basis)
      np.save(os.path.join(out_dir, "features", video_id + ".npy"), feats)
      duration = ((length - 1) * stride + frames) / fps
      anns = []
      for start, end, label in actions:
        seg = timebase.grid_to_sec(np.array([start, end], np.float64), fps, stride, frames,
                                   duration)
        anns.append({"label": class_names[label], "label_id": label,
                     "segment": [float(seg[0]), float(seg[1])]})
      database[video_id] = {"subset": subset, "duration": duration, "fps": fps,
                            "annotations": anns}
  with open(os.path.join(out_dir, "annotations.json"), "w") as f:
    json.dump({"version": f"asl_tf demo v{GENERATOR_VERSION}", "database": database}, f)
