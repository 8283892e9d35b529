"""Generated dataset folders: built once per parameter set and replaced atomically.

A generator's folder holds `manifest.json` (the parameters it was built from, with a
`generator_version`) beside its data. `build_once` leaves a folder whose manifest equals the
requested parameters alone; otherwise it writes the dataset into a temporary sibling folder, adds
the manifest last and swaps the folder in, so that readers never see a partial dataset. A folder
that a generator did not write (no such manifest) is never replaced: it may be the user's.
Processes that build the same folder at once (the workers of one machine) take turns on a lock
file beside it: the first builds, the others find its manifest and leave it alone. A folder
that is already built is used without the lock (its parent may be read-only).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import tempfile
from typing import Any, Callable, Mapping, Optional

MANIFEST_FILE = "manifest.json"


class FolderNotGeneratedError(ValueError):
  """The destination holds files that no generator wrote; the message names the folder."""


def read_manifest(out_dir: str) -> Optional[dict]:
  """The folder's manifest, or None when it is missing or unreadable."""
  try:
    with open(os.path.join(out_dir, MANIFEST_FILE)) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def build_once(out_dir: str, params: Mapping[str, Any], write_fn: Callable[[str], None],
               tmp_prefix: str) -> str:
  """Builds `out_dir` with `write_fn` unless its manifest already equals `params`.

  Args:
    out_dir: the dataset folder: missing, empty, or written by a generator.
    params: JSON-serializable generator parameters (the manifest), with `generator_version`.
    write_fn: `write_fn(folder)` writes the dataset (everything but the manifest) into `folder`.
    tmp_prefix: name prefix of the temporary sibling folders.

  Returns:
    `out_dir`.

  Raises:
    FolderNotGeneratedError: `out_dir` is not empty and has no generator's manifest.
  """
  if read_manifest(out_dir) == params:
    return out_dir
  parent = os.path.dirname(os.path.abspath(out_dir))
  name = os.path.basename(os.path.abspath(out_dir))
  os.makedirs(parent, exist_ok=True)
  with _exclusive(os.path.join(parent, f"{tmp_prefix}{name}.lock")):
    return _build_locked(out_dir, parent, name, params, write_fn, tmp_prefix)


@contextlib.contextmanager
def _exclusive(path: str):
  """Holds an exclusive `flock` on `path` (created, and removed on exit: no file is left
  behind). A waiter that wakes on a file its holder removed opens the new one."""
  while True:
    lock = open(path, "a")  # pylint: disable=consider-using-with
    fcntl.flock(lock, fcntl.LOCK_EX)  # the kernel releases it if the process dies
    try:
      if os.path.samestat(os.fstat(lock.fileno()), os.stat(path)):
        break
    except FileNotFoundError:
      pass
    lock.close()
  try:
    yield
  finally:
    try:
      os.unlink(path)
    except FileNotFoundError:
      pass
    lock.close()


def _build_locked(out_dir: str, parent: str, name: str, params: Mapping[str, Any],
                  write_fn: Callable[[str], None], tmp_prefix: str) -> str:
  """`build_once` under its lock."""
  # The replaced folder while the new one is swapped in: one name per dataset folder, so that a
  # swap killed between its two renames is undone for this folder and no other.
  old = os.path.join(parent, f"{tmp_prefix}{name}.old")
  if not os.path.exists(out_dir) and os.path.isdir(old):
    os.rename(old, out_dir)
  manifest = read_manifest(out_dir)
  if manifest == params:
    return out_dir
  if os.path.isdir(out_dir) and os.listdir(out_dir) and not (
      isinstance(manifest, dict) and "generator_version" in manifest):
    raise FolderNotGeneratedError(
        f"{out_dir} holds files that no dataset generator wrote (no {MANIFEST_FILE} with a "
        "generator_version), so it is left alone: choose a new or empty folder")
  if os.path.exists(out_dir) and not os.path.isdir(out_dir):
    raise FolderNotGeneratedError(f"{out_dir} is a file, not a dataset folder: choose a folder")
  tmp = tempfile.mkdtemp(prefix=tmp_prefix, dir=parent)
  try:
    write_fn(tmp)
    with open(os.path.join(tmp, MANIFEST_FILE), "w") as f:
      json.dump(dict(params), f, indent=1, sort_keys=True)
    if os.path.exists(out_dir):
      os.rename(out_dir, old)
    os.replace(tmp, out_dir)
  finally:
    if os.path.isdir(old) and not os.path.exists(out_dir):
      os.rename(old, out_dir)  # the swap failed or was interrupted: the previous dataset back
    for leftover in (tmp, old):
      if os.path.exists(leftover):
        shutil.rmtree(leftover)
  return out_dir
