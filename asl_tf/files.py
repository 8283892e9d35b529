"""Durable writes of result and config files: a full new file or the old one, never half.

Each writer writes a temporary file in the destination's folder, flushes it to disk and renames
it over the destination (atomic on POSIX), so a full disk or a kill mid-write leaves the
previous file intact and no partial JSON behind.
"""

from __future__ import annotations

import json
import os
import stat
import tempfile
from typing import Any


def _mode_for(path: str) -> int:
  """The existing file's permission bits, else what `open(path, "w")` would give."""
  try:
    return stat.S_IMODE(os.stat(path).st_mode)
  except FileNotFoundError:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def write_text_atomic(path: str, text: str) -> None:
  """Replaces `path` with `text` (UTF-8) atomically; creates no folders.

  The new file keeps the old one's permissions (or the umask's for a new file); a symbolic link
  keeps pointing at its target, which is the file replaced.

  Raises:
    OSError: the folder is missing or not writable, or the disk is full; `path` is unchanged.
  """
  write_bytes_atomic(path, text.encode("utf-8"))


def write_bytes_atomic(path: str, data: bytes) -> None:
  """Replaces `path` with `data` atomically, as `write_text_atomic` does."""
  path = os.path.realpath(path)
  folder = os.path.dirname(path)
  fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
  try:
    os.fchmod(fd, _mode_for(path))
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def write_json_atomic(path: str, obj: Any, **dump_kwargs) -> None:
  """`json.dumps(obj, **dump_kwargs)` written with `write_text_atomic` (the object is fully
  serialised before the file is touched)."""
  write_text_atomic(path, json.dumps(obj, **dump_kwargs))
