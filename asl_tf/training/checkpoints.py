"""Run folders, checkpoints that survive a kill, and finding the checkpoint to evaluate.

Layout of a run (`TrainConfig.output_dir`):
  config.json            the resolved configuration
  checkpoints/ckpt-E.*   one checkpoint per finished epoch E (the newest `keep_checkpoints`)
  checkpoints/best/      the checkpoint with the best validation average mAP
  logs/                  TensorBoard
  eval/                  metrics and detections

TensorFlow writes a checkpoint's files under temporary names and only then records it in the
`checkpoint` state file (an atomic rename), so a write interrupted by a kill or a full disk
leaves the previously recorded checkpoint as the latest one.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Dict, List, Optional, Tuple

import tensorflow as tf
from absl import logging

from asl_tf import config as config_lib

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"
BEST_DIR = os.path.join(CHECKPOINT_DIR, "best")

# Train fields that may differ between the run that wrote a checkpoint and the one resuming it.
# The replica count is not one of them: it sets the global batch and so the schedule.
RESUMABLE_TRAIN_FIELDS = ("output_dir", "resume", "log_every", "profile_steps", "eval_every",
                          "keep_checkpoints", "jit_compile", "deterministic")


class CheckpointError(RuntimeError):
  """A checkpoint that cannot be used; the message names it and says what to do."""


def config_differences(saved: config_lib.Config, new: config_lib.Config) -> List[str]:
  """Fields that differ and would change the result of resuming (`section.field: a -> b`)."""
  diffs = []
  for section in ("data", "model", "loss", "train", "eval"):
    a, b = getattr(saved, section), getattr(new, section)
    for field in dataclasses.fields(a):
      if section == "train" and field.name in RESUMABLE_TRAIN_FIELDS:
        continue
      if section == "eval":
        continue  # post-processing does not affect training state
      va, vb = getattr(a, field.name), getattr(b, field.name)
      if va != vb:
        diffs.append(f"{section}.{field.name}: {va!r} (checkpoint) vs {vb!r} (now)")
  return diffs


class RunCheckpointer:
  """Per-epoch and best checkpoints of one training run.

  Besides `objects`, every checkpoint holds the model's variables by position
  (`model.variables`: weights, the loss normalizer and the dropout / drop-path SeedGenerator
  states, which Keras 3 does not expose to `tf.train.Checkpoint` through the model itself).

  Args:
    run_dir: the run folder; checkpoints are restored from `run_dir/checkpoints`.
    keep: epoch checkpoints kept.
    model: the Keras model.
    write_dir: where checkpoints are written (default `run_dir`; a scratch folder on
      non-chief workers, which must take part in every save).
    **objects: other trackables to save (optimizer, epoch counter, ...).
  """

  def __init__(self, run_dir: str, keep: int, model, write_dir: Optional[str] = None,
               **objects):
    self.run_dir = run_dir
    self.checkpoint = tf.train.Checkpoint(model=model, model_variables=list(model.variables),
                                          **objects)
    write_dir = write_dir or run_dir
    self.manager = tf.train.CheckpointManager(
        self.checkpoint, os.path.join(write_dir, CHECKPOINT_DIR), max_to_keep=max(1, keep),
        checkpoint_name="ckpt")
    self.best_manager = tf.train.CheckpointManager(
        self.checkpoint, os.path.join(write_dir, BEST_DIR), max_to_keep=1,
        checkpoint_name="ckpt")

  @property
  def latest(self) -> Optional[str]:
    """The newest epoch checkpoint of the run folder (None when there is none)."""
    return tf.train.latest_checkpoint(os.path.join(self.run_dir, CHECKPOINT_DIR))

  def restore_latest(self) -> Optional[str]:
    """Restores the newest epoch checkpoint; returns its path (None when there is none)."""
    path = self.latest
    if path is None:
      return None
    try:
      self.checkpoint.restore(path).assert_existing_objects_matched()
    except (tf.errors.OpError, AssertionError, ValueError) as e:
      raise CheckpointError(f"cannot restore {path}: {e}. The run's configuration or code "
                            "changed since it was written; start a new --output_dir.") from e
    return path

  def save(self, epoch: int, best: bool = False) -> str:
    """Writes the checkpoint of a finished epoch (and the best copy when `best`).

    Raises:
      CheckpointError: the write failed (e.g. a full disk); the partial files are removed and
        the previously recorded checkpoint stays the latest one.
    """
    managers = [self.manager] + ([self.best_manager] if best else [])
    path = None
    for manager in managers:
      try:
        saved = manager.save(checkpoint_number=epoch)
      except (tf.errors.OpError, OSError) as e:
        _remove_partial(os.path.join(manager.directory, f"ckpt-{epoch}"))
        raise CheckpointError(
            f"writing the checkpoint of epoch {epoch} into {manager.directory} failed ({e}); "
            f"the last good checkpoint is {self.latest or 'none'} and is intact. Free disk "
            "space and rerun with --resume.") from e
      path = path or saved
    return path


def _remove_partial(prefix: str) -> None:
  for name in tf.io.gfile.glob(prefix + ".*") + tf.io.gfile.glob(prefix + "_temp*"):
    try:
      if tf.io.gfile.isdir(name):
        tf.io.gfile.rmtree(name)
      else:
        tf.io.gfile.remove(name)
    except (tf.errors.OpError, OSError) as e:
      logging.warning("could not remove the partial checkpoint file %s: %s", name, e)


def check_resume_config(output_dir: str, config: config_lib.Config) -> None:
  """Refuses to resume a run whose saved config.json differs in a field that matters."""
  path = os.path.join(output_dir, CONFIG_FILE)
  if not os.path.exists(path):
    return
  saved = config_lib.Config.load(path)
  diffs = config_differences(saved, config)
  if diffs:
    raise CheckpointError(
        f"--resume: the configuration differs from the one saved in {path}:\n  - "
        + "\n  - ".join(diffs)
        + "\nResume with the same flags, or train into a new --output_dir.")


def resolve_checkpoint(path: str) -> Tuple[str, Optional[str]]:
  """Finds the checkpoint to load and the run's config.json.

  Args:
    path: a checkpoint prefix (`.../ckpt-7`), a checkpoint folder, or a training output_dir
      (its best checkpoint, else its latest).

  Returns:
    (checkpoint prefix, path of config.json or None).
  """
  if not path:
    raise CheckpointError("no --checkpoint given: pass a checkpoint or a training --output_dir")
  if tf.io.gfile.exists(path + ".index"):
    run_dir = _run_dir_of(os.path.dirname(path))
    return path, _config_in(run_dir)
  if tf.io.gfile.isdir(path):
    for sub in (BEST_DIR, CHECKPOINT_DIR, ""):
      latest = tf.train.latest_checkpoint(os.path.join(path, sub))
      if latest:
        return latest, _config_in(_run_dir_of(os.path.dirname(latest)))
    raise CheckpointError(f"no checkpoint in {path} (looked in {BEST_DIR}/, {CHECKPOINT_DIR}/ "
                          "and the folder itself); train first or pass a checkpoint prefix")
  raise CheckpointError(f"--checkpoint={path} is neither a checkpoint prefix (no {path}.index) "
                        "nor a folder")


def run_folder(path: str) -> str:
  """The run folder of a checkpoint (`resolve_checkpoint`'s argument): the folder holding its
  config.json, else the checkpoint's own folder."""
  prefix, config_path = resolve_checkpoint(path)
  return os.path.dirname(config_path) if config_path else os.path.dirname(prefix)


def _run_dir_of(checkpoint_dir: str) -> str:
  d = os.path.normpath(checkpoint_dir)
  for _ in range(3):  # ckpt folder, checkpoints/, the run folder
    if os.path.exists(os.path.join(d, CONFIG_FILE)):
      return d
    d = os.path.dirname(d)
  return os.path.normpath(checkpoint_dir)


def _config_in(run_dir: str) -> Optional[str]:
  path = os.path.join(run_dir, CONFIG_FILE)
  return path if os.path.exists(path) else None


def counters() -> Dict[str, tf.Variable]:
  """Run-state variables saved with every checkpoint."""
  return {
      "epoch": tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch"),
      "best_metric": tf.Variable(-1.0, dtype=tf.float64, trainable=False, name="best_metric"),
  }
