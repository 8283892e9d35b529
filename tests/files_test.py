import errno
import json
import os

import numpy as np
import pytest

from asl_tf import evaluation
from asl_tf import files


def _full_disk(fd):
  raise OSError(errno.ENOSPC, "No space left on device")


def test_a_failed_write_keeps_the_previous_file_and_leaves_no_temporary(tmp_path, monkeypatch):
  path = tmp_path / "metrics.json"
  files.write_json_atomic(str(path), {"average_mAP": 0.5})
  monkeypatch.setattr(os, "fsync", _full_disk)
  with pytest.raises(OSError, match="No space"):
    files.write_json_atomic(str(path), {"average_mAP": 0.7})
  assert json.loads(path.read_text()) == {"average_mAP": 0.5}
  assert os.listdir(tmp_path) == ["metrics.json"]
  with pytest.raises(TypeError):  # not serialisable: the file is not even opened
    files.write_json_atomic(str(path), {"bad": {1, 2}})
  assert json.loads(path.read_text()) == {"average_mAP": 0.5}


def test_results_json_survives_a_full_disk(tmp_path, monkeypatch):
  """evaluate / infer results: the previous valid file stays when the new one cannot be written
  (before, the file was truncated first and invalid JSON was left)."""
  path = tmp_path / "detections.json"
  dets = evaluation.Detections(video_ids=np.array(["v"]), segments_sec=np.array([[1.0, 2.0]]),
                               labels=np.array([0]), scores=np.array([0.9]))
  evaluation.write_results_json(str(path), dets, ["run"])
  before = path.read_text()
  monkeypatch.setattr(os, "fsync", _full_disk)
  with pytest.raises(OSError):
    evaluation.write_results_json(str(path), dets, ["jump"])
  assert path.read_text() == before and json.loads(before)["results"]["v"][0]["label"] == "run"
  assert sorted(os.listdir(tmp_path)) == ["detections.json"]


def test_permissions_and_symlinks_survive_a_rewrite(tmp_path):
  """mkstemp makes 0600 files: the rewrite keeps 0664 of the old file, the umask's mode for a
  new one, and writes through a symbolic link instead of replacing it."""
  old = tmp_path / "config.json"
  old.write_text("{}")
  os.chmod(old, 0o664)
  files.write_json_atomic(str(old), {"a": 1})
  assert oct(os.stat(old).st_mode & 0o777) == oct(0o664)
  umask = os.umask(0o022)
  try:
    files.write_json_atomic(str(tmp_path / "new.json"), {})
  finally:
    os.umask(umask)
  assert oct(os.stat(tmp_path / "new.json").st_mode & 0o777) == oct(0o644)
  link = tmp_path / "latest.json"
  link.symlink_to(old)
  files.write_json_atomic(str(link), {"b": 2})
  assert link.is_symlink() and json.loads(old.read_text()) == {"b": 2}
