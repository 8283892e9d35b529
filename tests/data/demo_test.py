"""Tests for asl_tf.data.demo (the embedded demo dataset)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from asl_tf import config as config_lib
from asl_tf import flags as flags_lib
from asl_tf.data import annotations
from asl_tf.data import demo
from asl_tf.data import timebase

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _demo_config(tmp_path, **kwargs):
  d = str(tmp_path / "demo")
  base = dict(demo_dir=d, annotation_file=os.path.join(d, "annotations.json"),
              feature_dir=(os.path.join(d, "features"),), input_dim=64, num_classes=10,
              feat_stride=4, num_frames=16, default_fps=30, max_seq_len=256)
  base.update(kwargs)
  return config_lib.DataConfig(**base)


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
  cfg = _demo_config(tmp_path_factory.mktemp("d"))
  demo.ensure_demo_data(cfg)
  train, train_report = annotations.load_video_records(cfg, cfg.train_subset)
  val, val_report = annotations.load_video_records(cfg, cfg.eval_subset)
  return cfg, train, train_report, val, val_report


def test_layout_and_statistics(demo_data):
  cfg, train, train_report, val, val_report = demo_data
  assert (len(train), len(val)) == (demo.NUM_TRAIN_VIDEOS, demo.NUM_VAL_VIDEOS)
  assert train_report.num_issues == 0 and val_report.num_issues == 0
  assert len(train_report.class_names) == 10
  assert {int(l) for r in train for l in r.labels} == set(range(10))
  lengths = [r.features.length for r in train + val]
  assert min(lengths) >= demo.MIN_LENGTH_GRID and max(lengths) <= 256
  per_video = [r.num_segments for r in train]
  assert 1 <= min(per_video) and max(per_video) <= 6 and np.mean(per_video) > 2
  overlapping = 0
  for r in train:
    s = r.segments_sec
    for i in range(len(s)):
      overlapping += int(np.any((s[i, 0] < s[i + 1:, 1]) & (s[i + 1:, 0] < s[i, 1])))
  assert overlapping >= 5  # a few densely labelled spots


def test_signal_is_learnable(demo_data):
  """Nearest class mean (from training) labels >= 90% of validation features of one action."""
  cfg, train, _, val, _ = demo_data

  def action_rows(records):
    feats, labels = [], []
    for r in records:
      x = np.load(r.features.paths[0])
      grid = np.rint(timebase.sec_to_grid(r.segments_sec, r.fps, r.features.feat_stride,
                                          r.features.num_frames)).astype(int)
      cover = np.zeros(len(x), int)
      for s, e in grid:
        cover[s:e + 1] += 1
      for (s, e), label in zip(grid, r.labels):
        single = cover[s:e + 1] == 1
        feats.append(x[s:e + 1][single])
        labels.append(np.full(single.sum(), label))
    return np.concatenate(feats), np.concatenate(labels)

  x_train, y_train = action_rows(train)
  means = np.stack([x_train[y_train == k].mean(0) for k in range(10)])
  x_val, y_val = action_rows(val)
  pred = np.argmax(x_val @ means.T - 0.5 * (means ** 2).sum(1), axis=1)
  assert np.mean(pred == y_val) > 0.9


def test_idempotent_and_regenerates_on_change(tmp_path):
  cfg = _demo_config(tmp_path)
  demo.ensure_demo_data(cfg)
  ann = os.path.join(cfg.demo_dir, "annotations.json")
  first = os.stat(ann).st_mtime_ns
  with open(ann) as f:
    content = f.read()
  demo.ensure_demo_data(cfg)
  assert os.stat(ann).st_mtime_ns == first
  manifest = os.path.join(cfg.demo_dir, "manifest.json")
  with open(manifest) as f:
    params = json.load(f)
  params["generator_version"] = -1
  with open(manifest, "w") as f:
    json.dump(params, f)
  demo.ensure_demo_data(cfg)
  with open(ann) as f:
    assert f.read() == content  # deterministic regeneration
  assert json.load(open(manifest)) == demo.demo_parameters(cfg)
  smaller = _demo_config(tmp_path, input_dim=8)
  demo.ensure_demo_data(smaller)
  vid = sorted(os.listdir(smaller.feature_dir[0]))[0]
  assert np.load(os.path.join(smaller.feature_dir[0], vid)).shape[1] == 8
  assert not [p for p in os.listdir(tmp_path) if p.startswith(".demo_tmp_")]


def test_paths_must_point_into_demo_dir(tmp_path):
  cfg = _demo_config(tmp_path, annotation_file=str(tmp_path / "elsewhere.json"))
  with pytest.raises(config_lib.ConfigError, match="needs --annotation_file="):
    demo.ensure_demo_data(cfg)
  assert demo.ensure_demo_data(_demo_config(tmp_path, demo_dir="")) == ""


def test_demo_flagfile_is_consistent():
  argv = flags_lib.expand_flagfiles(["prog", f"--flagfile={REPO}/configs/demo.flags"])
  flags_lib.FLAGS.unparse_flags()
  flags_lib.FLAGS(argv)
  try:
    cfg = config_lib.from_flags(flags_lib.FLAGS)
  finally:
    flags_lib.FLAGS.unparse_flags()
  assert cfg.data.demo_dir and cfg.data.max_seq_len % cfg.model.max_div_factor == 0
  params = demo.demo_parameters(cfg.data)
  assert (params["input_dim"], params["num_classes"], params["max_length_grid"]) == (64, 10, 256)


@pytest.mark.parametrize("manifest", [None, {"videos": 3}, "not json"])
def test_a_folder_the_generator_did_not_write_is_left_alone(tmp_path, manifest):
  """--demo_dir pointing at the user's own data (no generator manifest) is refused, file by
  file intact, instead of being replaced by the demo."""
  cfg = _demo_config(tmp_path)
  features = os.path.join(cfg.demo_dir, "features")
  os.makedirs(features)
  own = {os.path.join(cfg.demo_dir, "annotations.json"): "{\"database\": {}}",
         os.path.join(cfg.demo_dir, "notes.txt"): "mine",
         os.path.join(features, "my_video.npy"): "not really"}
  if manifest is not None:
    own[os.path.join(cfg.demo_dir, "manifest.json")] = (
        manifest if isinstance(manifest, str) else json.dumps(manifest))
  for path, text in own.items():
    with open(path, "w") as f:
      f.write(text)
  with pytest.raises(config_lib.ConfigError, match=r"--demo_dir: .*demo holds files that no "
                     r"dataset generator wrote.*choose a new or empty folder"):
    demo.ensure_demo_data(cfg)
  for path, text in own.items():
    with open(path) as f:
      assert f.read() == text
  assert sorted(os.listdir(tmp_path)) == ["demo"]


def test_an_empty_folder_is_filled(tmp_path):
  cfg = _demo_config(tmp_path)
  os.makedirs(cfg.demo_dir)
  demo.ensure_demo_data(cfg)
  assert json.load(open(os.path.join(cfg.demo_dir, "manifest.json"))) == (
      demo.demo_parameters(cfg))


def test_a_failed_swap_puts_the_previous_dataset_back(tmp_path, monkeypatch):
  """The old folder, renamed aside for the swap, was deleted when the swap itself failed."""
  cfg = _demo_config(tmp_path)
  demo.ensure_demo_data(cfg)
  before = sorted(os.listdir(os.path.join(cfg.demo_dir, "features")))
  real_replace = os.replace

  def fail_on_the_folder(src, dst):
    if os.path.abspath(dst) == os.path.abspath(cfg.demo_dir):
      raise OSError(28, "No space left on device")
    return real_replace(src, dst)

  monkeypatch.setattr(os, "replace", fail_on_the_folder)
  with pytest.raises(OSError, match="No space left"):
    demo.ensure_demo_data(_demo_config(tmp_path, input_dim=8))
  assert sorted(os.listdir(os.path.join(cfg.demo_dir, "features"))) == before
  assert json.load(open(os.path.join(cfg.demo_dir, "manifest.json"))) == (
      demo.demo_parameters(cfg))
  assert sorted(os.listdir(tmp_path)) == ["demo"]


def test_a_swap_killed_between_its_renames_is_undone_at_the_next_run(tmp_path):
  """The previous dataset, renamed aside, stayed hidden there, and the next run regenerated."""
  cfg = _demo_config(tmp_path)
  demo.ensure_demo_data(cfg)
  ann = os.path.join(cfg.demo_dir, "annotations.json")
  first = os.stat(ann).st_mtime_ns
  os.rename(cfg.demo_dir, str(tmp_path / ".demo_tmp_demo.old"))
  other = _demo_config(tmp_path, demo_dir=str(tmp_path / "other"),
                       annotation_file=str(tmp_path / "other" / "annotations.json"),
                       feature_dir=(str(tmp_path / "other" / "features"),))
  demo.ensure_demo_data(other)  # another folder beside it leaves that copy alone
  assert (tmp_path / ".demo_tmp_demo.old" / "annotations.json").exists()
  demo.ensure_demo_data(cfg)
  assert os.stat(ann).st_mtime_ns == first  # put back, not regenerated
  assert sorted(os.listdir(tmp_path)) == ["demo", "other"]


def test_an_interrupt_during_the_swap_keeps_the_previous_dataset(tmp_path, monkeypatch):
  """Ctrl-C right after the old folder was renamed aside deleted both datasets."""
  cfg = _demo_config(tmp_path)
  demo.ensure_demo_data(cfg)
  real_rename = os.rename

  def rename_then_interrupt(src, dst):
    real_rename(src, dst)
    if os.path.abspath(src) == os.path.abspath(cfg.demo_dir):
      raise KeyboardInterrupt

  monkeypatch.setattr(os, "rename", rename_then_interrupt)
  with pytest.raises(KeyboardInterrupt):
    demo.ensure_demo_data(_demo_config(tmp_path, input_dim=8))
  monkeypatch.undo()
  assert json.load(open(os.path.join(cfg.demo_dir, "manifest.json"))) == (
      demo.demo_parameters(cfg))
  assert sorted(os.listdir(tmp_path)) == ["demo"]


_CONCURRENT_BUILD = """
import sys, time
from asl_tf.data import dataset_dir

def write(folder):
  with open(sys.argv[2], "a") as log:
    log.write("built\\n")
  time.sleep(1.0)
  open(folder + "/data.txt", "w").write("x")

dataset_dir.build_once(sys.argv[1], {"generator_version": 1}, write, ".t_")
print(open(sys.argv[1] + "/data.txt").read())
"""


def test_processes_building_one_folder_at_once_build_it_once(tmp_path):
  """Two workers of one machine generating the demo together each built it, and the second
  swapped the first's folder out from under it while it read."""
  log = tmp_path / "builds.log"
  procs = [subprocess.Popen([sys.executable, "-c", _CONCURRENT_BUILD, str(tmp_path / "d"),
                             str(log)], stdout=subprocess.PIPE, text=True, cwd=REPO)
           for _ in range(2)]
  outputs = [p.communicate(timeout=60)[0] for p in procs]
  assert [p.returncode for p in procs] == [0, 0] and outputs == ["x\n", "x\n"]
  assert log.read_text() == "built\n"
  assert sorted(os.listdir(tmp_path)) == ["builds.log", "d"]  # no lock file or copy left


def test_a_built_folder_is_used_without_taking_the_lock(tmp_path, monkeypatch):
  """The lock file is created beside the folder: a dataset built once and then shared from a
  read-only place failed with a PermissionError where it had been used as it was."""
  from asl_tf.data import dataset_dir  # pylint: disable=g-import-not-at-top
  cfg = _demo_config(tmp_path)
  demo.ensure_demo_data(cfg)

  def no_lock(path):
    raise AssertionError(f"took the lock {path}")

  monkeypatch.setattr(dataset_dir, "_exclusive", no_lock)
  assert demo.ensure_demo_data(cfg) == cfg.demo_dir
  with pytest.raises(AssertionError, match="took the lock"):
    demo.ensure_demo_data(_demo_config(tmp_path, input_dim=8))  # a rebuild still locks
