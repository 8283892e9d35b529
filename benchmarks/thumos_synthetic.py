"""A THUMOS14-shaped synthetic dataset: real durations and segments, synthetic 256-d features.

  python benchmarks/thumos_synthetic.py                # -> runs/thumos_synthetic (skips if there)
  python -m asl_tf.train --flagfile=benchmarks/thumos_synthetic.flags --output_dir=runs/x

The 200 validation and 212 test videos of thumos14.json keep their durations, action segments
and labels (20 classes); each gets a feature sequence at fps 30, feat_stride 16, num_frames 16
(configs/bench.flags), so T = duration * 30 / 16 and actions are as short and as crowded as in
THUMOS14 (median 3 s = 5-6 features). The features are harder than the demo's
(asl_tf/data/demo.py): class directions share a component within sport groups (e.g. the four
throws, the three jumps, cricket bowling / shot), so related classes are confusable; the action
amplitude varies per instance (1.5-3.5 against unit noise); the whole video carries a weak
context signal of its sport group (as THUMOS backgrounds show the venue) plus a drifting
background, and boundaries ramp in over the first and last quarter of each action.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np

from asl_tf.data import dataset_dir

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_ANNOTATIONS = os.path.join(os.path.dirname(_REPO_ROOT), "shared", "data", "thumos14",
                                   "thumos14.json")
GENERATOR_VERSION = 1
FPS, FEAT_STRIDE, NUM_FRAMES = 30.0, 16, 16
AMPLITUDE = (1.5, 3.5)
NOISE_STD = 1.0
DRIFT_STD = 0.5
CONTEXT_AMPLITUDE = 0.75
# Sport groups of THUMOS14's label ids; classes in a group share part of their direction.
GROUPS = ((0,), (1, 19), (2,), (3,), (4, 7), (5, 6), (8,), (9, 17), (10, 12, 15, 18),
          (11, 13, 14), (16,))
_SEED = 20230602


def _directions(rng, num_classes, channels):
  """Unit class directions [K, C] and per-class group directions [K, C] (cos ~0.5 in a group)."""
  group_dirs = rng.normal(size=[len(GROUPS), channels])
  group_dirs /= np.linalg.norm(group_dirs, axis=1, keepdims=True)
  group_of = np.zeros(num_classes, int)
  for g, members in enumerate(GROUPS):
    group_of[[m for m in members if m < num_classes]] = g
  own = rng.normal(size=[num_classes, channels])
  own /= np.linalg.norm(own, axis=1, keepdims=True)
  directions = own + group_dirs[group_of]
  directions /= np.linalg.norm(directions, axis=1, keepdims=True)
  return directions, group_dirs[group_of]


def _video_features(rng, length, actions, directions, class_context, drift_basis):
  """float32 [length, C]: noise + drift + group context + ramped action signals."""
  channels = directions.shape[1]
  feats = rng.normal(0.0, NOISE_STD, size=[length, channels])
  walk = np.cumsum(rng.normal(0.0, 1.0, size=[length, drift_basis.shape[0]]), axis=0)
  walk /= np.sqrt(np.arange(1, length + 1))[:, None]
  feats += DRIFT_STD * walk @ drift_basis
  labels = sorted({label for _, _, label in actions})
  if labels:
    context = np.mean(class_context[labels], axis=0)
    feats += CONTEXT_AMPLITUDE * context / np.linalg.norm(context)
  for start, end, label in actions:
    lo, hi = max(0, int(np.floor(start))), min(length - 1, int(np.ceil(end)))
    if hi < lo:
      continue
    n = hi - lo + 1
    t = np.arange(n, dtype=np.float64)
    profile = np.clip(0.5 + 0.5 * np.minimum(t, n - 1 - t) / max(1.0, n / 4.0), 0.5, 1.0)
    amplitude = rng.uniform(*AMPLITUDE)
    feats[lo:hi + 1] += amplitude * profile[:, None] * directions[label][None, :]
  return feats.astype(np.float32)


def generate(out_dir: str, annotation_file: str = DEFAULT_ANNOTATIONS, input_dim: int = 256,
             max_videos: int = 0) -> str:
  """Writes `annotations.json`, `features/<vid>.npy` and `manifest.json` into `out_dir`.

  Args:
    out_dir: destination; left as is when its manifest matches these parameters.
    annotation_file: THUMOS14 annotations in the ActionFormer layout.
    input_dim: feature channels.
    max_videos: keep only the first N videos of each subset (0 = all), for tests.

  Returns:
    `out_dir`.
  """
  params = {"generator_version": GENERATOR_VERSION, "source": os.path.abspath(annotation_file),
            "input_dim": input_dim, "max_videos": max_videos, "fps": FPS,
            "feat_stride": FEAT_STRIDE, "num_frames": NUM_FRAMES}
  return dataset_dir.build_once(
      out_dir, params, lambda folder: _write_dataset(folder, annotation_file, input_dim,
                                                     max_videos),
      tmp_prefix=".thumos_synthetic_tmp_")


def _write_dataset(out_dir: str, annotation_file: str, input_dim: int, max_videos: int) -> None:
  """Writes `annotations.json` and `features/<vid>.npy` into the (empty) `out_dir`."""
  with open(annotation_file) as f:
    database = json.load(f)["database"]
  num_classes = 1 + max(a["label_id"] for v in database.values() for a in v["annotations"])
  rng = np.random.default_rng(_SEED)
  directions, class_context = _directions(rng, num_classes, input_dim)
  drift_basis = rng.normal(size=[4, input_dim]) / np.sqrt(input_dim)
  os.makedirs(os.path.join(out_dir, "features"))
  out_db, kept = {}, {}
  for vid in sorted(database):
    entry = database[vid]
    subset = entry["subset"]
    if max_videos and kept.get(subset, 0) >= max_videos:
      continue
    kept[subset] = kept.get(subset, 0) + 1
    duration = float(entry["duration"])
    length = max(1, int((duration * FPS - NUM_FRAMES) // FEAT_STRIDE) + 1)
    actions = []
    for ann in entry["annotations"]:
      s, e = (np.asarray(ann["segment"], np.float64) * FPS - 0.5 * NUM_FRAMES) / FEAT_STRIDE
      actions.append((s, e, int(ann["label_id"])))
    feats = _video_features(rng, length, actions, directions, class_context, drift_basis)
    np.save(os.path.join(out_dir, "features", vid + ".npy"), feats)
    out_db[vid] = {"subset": subset, "duration": duration, "fps": FPS,
                   "annotations": [{"label": a["label"], "label_id": a["label_id"],
                                    "segment": a["segment"]} for a in entry["annotations"]]}
  with open(os.path.join(out_dir, "annotations.json"), "w") as f:
    json.dump({"version": f"thumos14-shaped synthetic v{GENERATOR_VERSION}",
               "database": out_db}, f)

def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out_dir", default=os.path.join(_REPO_ROOT, "runs", "thumos_synthetic"))
  parser.add_argument("--annotation_file", default=DEFAULT_ANNOTATIONS)
  parser.add_argument("--input_dim", type=int, default=256)
  parser.add_argument("--max_videos", type=int, default=0)
  args = parser.parse_args()
  print(generate(args.out_dir, args.annotation_file, args.input_dim, args.max_videos))


if __name__ == "__main__":
  main()
