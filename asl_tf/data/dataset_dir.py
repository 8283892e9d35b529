"""Generated dataset folders: built once per parameter set and replaced atomically.

A generator's folder holds `manifest.json` (the parameters it was built from) beside its data.
`build_once` leaves a folder whose manifest equals the requested parameters alone; otherwise it
writes the dataset into a temporary sibling folder, adds the manifest last and swaps the folder
in, so that readers never see a partial dataset.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any, Callable, Mapping, Optional

MANIFEST_FILE = "manifest.json"


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
    out_dir: the dataset folder.
    params: JSON-serializable generator parameters (the manifest).
    write_fn: `write_fn(folder)` writes the dataset (everything but the manifest) into `folder`.
    tmp_prefix: name prefix of the temporary sibling folder.

  Returns:
    `out_dir`.
  """
  if read_manifest(out_dir) == params:
    return out_dir
  parent = os.path.dirname(os.path.abspath(out_dir))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=tmp_prefix, dir=parent)
  try:
    write_fn(tmp)
    with open(os.path.join(tmp, MANIFEST_FILE), "w") as f:
      json.dump(dict(params), f, indent=1, sort_keys=True)
    if os.path.exists(out_dir):
      shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
  finally:
    if os.path.exists(tmp):
      shutil.rmtree(tmp)
  return out_dir
