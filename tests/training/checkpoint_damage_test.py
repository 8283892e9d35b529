"""Damaged checkpoints and leftovers of killed writes: named, skipped or cleaned."""

import os
import re
import socket

import keras
import numpy as np
import pytest
import tensorflow as tf

from asl_tf import config as config_lib
from asl_tf.serving import module as serving_module
from asl_tf.training import checkpoints as ckpt_lib


def _layer():
  layer = keras.layers.Dense(3, name="dense")
  layer.build((None, 4))
  return layer


def _truncate(path, keep=0.5):
  size = os.path.getsize(path)
  with open(path, "r+b") as f:
    f.truncate(int(size * keep))


def _three_epochs(run_dir):
  layer = _layer()
  ckpt = ckpt_lib.RunCheckpointer(str(run_dir), 3, model=layer)
  values = []
  for epoch in (1, 2, 3):
    layer.kernel.assign(np.full((4, 3), float(epoch), np.float32))
    ckpt.save(epoch)
    values.append(epoch)
  return layer, ckpt


@pytest.mark.parametrize("part", [".data-00000-of-00001", ".index"])
def test_resume_skips_damaged_checkpoints_to_the_newest_intact_one(tmp_path, part, caplog):
  layer, ckpt = _three_epochs(tmp_path)
  folder = tmp_path / "checkpoints"
  _truncate(str(folder / f"ckpt-3{part}"))
  layer.kernel.assign(np.zeros((4, 3), np.float32))
  assert ckpt.restore_latest() == str(folder / "ckpt-2")
  np.testing.assert_array_equal(layer.kernel.numpy(), np.full((4, 3), 2.0))
  assert "damaged checkpoint" in caplog.text and "ckpt-3" in caplog.text
  assert ckpt_lib.damage(str(folder / "ckpt-2")) == ""
  assert ckpt_lib.damage(str(folder / "ckpt-3"))


def test_every_checkpoint_damaged_is_one_error(tmp_path):
  _, ckpt = _three_epochs(tmp_path)
  for epoch in (1, 2, 3):
    _truncate(str(tmp_path / "checkpoints" / f"ckpt-{epoch}.data-00000-of-00001"), 0.1)
  with pytest.raises(ckpt_lib.CheckpointError, match="every checkpoint in .* is damaged"):
    ckpt.restore_latest()


def test_truncated_config_json_names_the_file(tmp_path):
  path = tmp_path / "config.json"
  config_lib.Config().save(str(path))
  _truncate(str(path))
  with pytest.raises(config_lib.ConfigError, match=f"{path} is not valid JSON .* damaged"):
    config_lib.Config.load(str(path))


def test_leftovers_of_killed_checkpoint_writes_are_removed(tmp_path):
  _three_epochs(tmp_path)
  temp = tmp_path / "checkpoints" / "ckpt-4_temp"
  temp.mkdir()
  (temp / "part-00000-of-00001.data-00000-of-00001").write_bytes(b"half")
  best_temp = tmp_path / "checkpoints" / "best" / "ckpt-2_temp"
  best_temp.mkdir(parents=True)
  removed = ckpt_lib.remove_leftover_writes(str(tmp_path))
  assert sorted(map(os.path.basename, removed)) == ["ckpt-2_temp", "ckpt-4_temp"]
  assert not temp.exists() and not best_temp.exists()
  assert os.path.exists(tmp_path / "checkpoints" / "ckpt-3.index")


def test_staging_folders_of_killed_exports_are_removed_live_ones_kept(tmp_path):
  host = re.sub(r"[^A-Za-z0-9]", "_", socket.gethostname())
  dead = tmp_path / f".export-3-999999999@{host}-abc"  # no such pid
  live = tmp_path / f".export-4-{os.getpid()}@{host}-def"
  other_host = tmp_path / ".export-5-999999999@elsewhere_box-ghi"  # shared folder, not ours
  huge_pid = tmp_path / f".export-6-99999999999999999999@{host}-x"
  other = tmp_path / "3"
  for folder in (dead, live, other_host, huge_pid, other):
    folder.mkdir()
  assert serving_module.remove_leftover_exports(str(tmp_path)) == [dead.name]
  assert all(f.exists() for f in (live, other_host, huge_pid, other)) and not dead.exists()
  assert serving_module._staging_prefix(7).startswith(f".export-7-{os.getpid()}@{host}-")


@pytest.mark.parametrize("state", [b"", b'model_checkpoint_path: "ckpt-3"\nall_mod'])
def test_a_damaged_checkpoint_state_file_neither_hides_nor_breaks_the_run(tmp_path, state):
  """An empty or truncated `checkpoints/checkpoint`: a new training is still refused (it would
  overwrite the epochs) and --resume still finds ckpt-3 (before: a restart from epoch 0, or a
  ValueError traceback)."""
  layer, ckpt = _three_epochs(tmp_path)
  (tmp_path / "checkpoints" / "checkpoint").write_bytes(state)
  assert ckpt_lib.newest_checkpoint_file(str(tmp_path)) == str(tmp_path / "checkpoints" /
                                                                "ckpt-3")
  layer.kernel.assign(np.zeros((4, 3), np.float32))
  assert ckpt.restore_latest() == str(tmp_path / "checkpoints" / "ckpt-3")
  np.testing.assert_array_equal(layer.kernel.numpy(), np.full((4, 3), 3.0))
  assert ckpt_lib.resolve_checkpoint(str(tmp_path))[0].endswith("ckpt-3")
