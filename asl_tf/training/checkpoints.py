"""Run folders, checkpoints that survive a kill, and finding the checkpoint to evaluate.

Layout of a run (`TrainConfig.output_dir`):
  config.json            the resolved configuration
  checkpoints/ckpt-E.*   one checkpoint per finished epoch E (the newest `keep_checkpoints`)
  checkpoints/best/      the checkpoint with the best validation average mAP
  logs/                  TensorBoard
  eval/                  metrics and detections
  .lock                  held by the training writing the run (the holder's pid inside)

TensorFlow writes a checkpoint's files under temporary names and only then records it in the
`checkpoint` state file (an atomic rename), so a write interrupted by a kill or a full disk
leaves the previously recorded checkpoint as the latest one.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import json
import os
from typing import Dict, List, Optional, Sequence, Tuple

import keras
import tensorflow as tf
from absl import logging

from asl_tf import config as config_lib
from asl_tf import files

CONFIG_FILE = "config.json"
CLASS_NAMES_FILE = "class_names.json"  # the training data's class names, in label-id order
LOCK_FILE = ".lock"
CHECKPOINT_DIR = "checkpoints"
BEST_DIR = os.path.join(CHECKPOINT_DIR, "best")

# Train fields that may differ between the run that wrote a checkpoint and the one resuming it.
# The replica count is not one of them: it sets the global batch and so the schedule.
RESUMABLE_TRAIN_FIELDS = ("output_dir", "resume", "log_every", "profile_steps", "eval_every",
                          "keep_checkpoints", "jit_compile", "deterministic")


class CheckpointError(RuntimeError):
  """A checkpoint that cannot be used; the message names it and says what to do."""


class RunLock:
  """Exclusive use of a run folder by one training process.

  An advisory `flock` on `<run_dir>/.lock`, which records the holder's pid. The kernel drops
  the lock when its process ends, however it ends, so a killed training leaves no stale lock:
  the file may remain, and the next run takes it over.

  Args:
    run_dir: the run folder (created by `acquire` if missing).
  """

  def __init__(self, run_dir: str):
    self.path = os.path.join(run_dir, LOCK_FILE)
    self._fd = None

  def acquire(self) -> None:
    """Takes the lock.

    Raises:
      CheckpointError: another process holds it (the message names its pid).
    """
    os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
      if e.errno not in (errno.EAGAIN, errno.EACCES):
        # A file system without locks (some NFS / FUSE mounts): train unlocked, say so.
        logging.warning("cannot lock %s (%s): nothing stops a second training from writing "
                        "into this run folder at the same time", self.path, e.strerror)
        os.close(fd)
        return
      os.close(fd)
      raise CheckpointError(
          f"{os.path.dirname(self.path)} is in use by another training (pid {holder}); wait "
          "for it to finish or choose another --output_dir") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    self._fd = fd

  def release(self) -> None:
    """Drops the lock (the file stays; it is free for the next run)."""
    if self._fd is not None:
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None


def write_class_names(run_dir: str, names: Sequence[str]) -> None:
  """Records a run's class names (label-id order) in `<run_dir>/class_names.json`."""
  files.write_json_atomic(os.path.join(run_dir, CLASS_NAMES_FILE), {"class_names": list(names)},
                          indent=1)


def read_class_names(run_dir: str) -> Optional[List[str]]:
  """A run's recorded class names, or None for runs written before the file existed.

  Raises:
    CheckpointError: the file is unreadable.
  """
  path = os.path.join(run_dir, CLASS_NAMES_FILE)
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      names = json.load(f)["class_names"]
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise CheckpointError(f"{path} is unreadable ({type(e).__name__}: {e})") from None
  return [str(n) for n in names]


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
      if section == "model" and field.name in config_lib.RUNTIME_MODEL_FIELDS:
        continue  # how, not what, the model computes
      if section == "model" and field.name == "head_empty_cls":
        continue  # initial biases only: a resumed run restores its weights
      va, vb = getattr(a, field.name), getattr(b, field.name)
      if va != vb:
        diffs.append(f"{section}.{field.name}: {va!r} (checkpoint) vs {vb!r} (now)")
  return diffs


def variable_paths(model: keras.Layer) -> Dict[str, tf.Variable]:
  """Every variable of `model` keyed by where it lives: `backbone/embd/0/kernel`.

  The key joins the public attribute names (and list indices) leading from `model` to the layer
  that owns the variable, then the variable's name; a dropout's random state is
  `.../seed_generator/state`. Unlike Keras' `Variable.path`, it does not depend on how many
  models or seed generators the process built before (`asl_detector_1`, `seed_generator_7`), and
  unlike a position it survives layers being created in another order.

  Raises:
    ValueError: a variable is reachable by no public attribute or under two keys, or two
      variables share a key.
  """
  found: Dict[str, tf.Variable] = {}
  visited = set()

  def add(key, variable):
    if key in found:
      raise ValueError(f"two variables of {model.name} share the checkpoint key {key!r}")
    found[key] = variable

  def visit(obj, prefix):
    if isinstance(obj, keras.random.SeedGenerator):
      add(f"{prefix}/state", obj.state)
    elif isinstance(obj, keras.Layer) and id(obj) not in visited:
      visited.add(id(obj))
      # The variables the layer itself created (not its sublayers'), in Keras' own lists.
      own = (obj._trainable_variables  # pylint: disable=protected-access
             + obj._non_trainable_variables)  # pylint: disable=protected-access
      for variable in own:
        add(f"{prefix}/{variable.name}" if prefix else variable.name, variable)
      for name, value in sorted(vars(obj).items()):
        if not name.startswith("_"):
          visit(value, f"{prefix}/{name}" if prefix else name)
    elif isinstance(obj, (list, tuple)):
      for i, value in enumerate(obj):
        visit(value, f"{prefix}/{i}")
    elif isinstance(obj, dict):
      for key in sorted(obj):
        visit(obj[key], f"{prefix}/{key}")

  visit(model, "")
  keyed = {id(v) for v in found.values()}
  if len(keyed) != len(found):
    twice = sorted(k for k, v in found.items() if sum(u is v for u in found.values()) > 1)
    raise ValueError(f"variables of {model.name} reachable under two keys: {twice}")
  unreached = [v.path for v in model.variables if id(v) not in keyed]
  if unreached:
    raise ValueError(f"variables of {model.name} reachable by no public attribute, so without "
                     f"a checkpoint key: {unreached}")
  return found


def trainable_paths(model: keras.Layer) -> List[str]:
  """The `variable_paths` keys of `model.trainable_variables`, in that order."""
  key_of = {id(v): k for k, v in variable_paths(model).items()}
  return [key_of[id(v)] for v in model.trainable_variables]


def ema_objects(saved: set, model: keras.Layer, ema_variables: Sequence) -> Dict:
  """The checkpoint object holding `ema_variables` (one per `model.trainable_variables`, in
  that order) in a checkpoint whose top-level objects are `saved`: `ema_weights` keyed like
  `variable_paths` keys the variables they average, or, in the positional layout written
  before, `ema_variables`."""
  if len(ema_variables) != len(model.trainable_variables):
    raise ValueError(f"{len(ema_variables)} EMA variables for "
                     f"{len(model.trainable_variables)} trainable variables")
  if "model_weights" in saved or "model_variables" not in saved:
    return {"ema_weights": dict(zip(trainable_paths(model), ema_variables))}
  return {"ema_variables": list(ema_variables)}


def saved_objects(names: Sequence[str]) -> set:
  """The top-level objects (`model_weights`, `optimizer`...) of a checkpoint holding the tensors
  `names` (`name for name, _ in tf.train.list_variables(path)`)."""
  return {name.split("/")[0] for name in names}


def weight_objects(saved: set, model: keras.Layer, ema_variables: Sequence = ()) -> Dict:
  """The checkpoint objects that hold `model`'s weights (and their EMA) in a checkpoint whose
  top-level objects are `saved`.

  Checkpoints keep `model_weights` and `ema_weights` keyed by `variable_paths`; those written
  before (`model_variables`, `ema_variables`) held them by position, which is read back in the
  same order.
  """
  if "model_weights" in saved or "model_variables" not in saved:
    objects = {"model_weights": variable_paths(model)}
  else:
    objects = {"model_variables": list(model.variables)}
  if ema_variables:
    objects.update(ema_objects(saved, model, ema_variables))
  return objects


class RunCheckpointer:
  """Per-epoch and best checkpoints of one training run.

  Besides `objects`, every checkpoint holds the model's variables (`model_weights`: weights and
  the dropout / drop-path random states) and the EMA of its trainable variables (`ema_weights`,
  what evaluation, inference and export load; also part of the optimizer's state), both keyed by
  `variable_paths`, and the training task's state (`task_variables`: the loss normaliser). The
  optimizer keeps its moments in the order of the trainable variables: that order is saved
  (`trainable_order`, their keys) and a checkpoint of another order is refused on restore.
  Checkpoints of the earlier positional layouts are restored too.

  Args:
    run_dir: the run folder; checkpoints are restored from `run_dir/checkpoints`.
    keep: epoch checkpoints kept.
    model: the Keras model.
    write_dir: where checkpoints are written (default `run_dir`; a scratch folder on
      non-chief workers, which must take part in every save).
    task_variables: the training task's state (`DetectionTask.state_variables`).
    ema_variables: the EMA of `model.trainable_variables` (`optimizer.ema_variables`).
    **objects: other trackables to save (optimizer, epoch counter, ...).
  """

  def __init__(self, run_dir: str, keep: int, model, write_dir: Optional[str] = None,
               task_variables: Sequence = (), ema_variables: Sequence = (), **objects):
    self.run_dir = run_dir
    self._model = model
    self._ema_variables = list(ema_variables)
    self._num_model_variables = len(model.variables)
    self._task_variables = list(task_variables)
    if self._task_variables:
      objects["task_variables"] = self._task_variables
    # The optimizer's moments are held in the order of the trainable variables: saved with it,
    # so that a checkpoint of another order is refused instead of resumed with mixed moments.
    self._trainable_order = trainable_paths(model)
    objects["trainable_order"] = tf.Variable(self._trainable_order, dtype=tf.string,
                                             trainable=False)
    self._objects = objects
    self.checkpoint = tf.train.Checkpoint(
        **weight_objects({"model_weights"}, model, self._ema_variables), **objects)
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
    return newest_checkpoint_file(self.run_dir)

  def restore_latest(self) -> Optional[str]:
    """Restores the newest intact epoch checkpoint; returns its path (None when there is none).

    A damaged checkpoint (truncated `.index` or `.data`, e.g. a disk that filled up outside
    TensorFlow's atomic write) is skipped with a warning naming it, and the next older one is
    tried.

    Raises:
      CheckpointError: every kept checkpoint is damaged, or one does not fit the model.
    """
    folder = os.path.join(self.run_dir, CHECKPOINT_DIR)
    candidates = checkpoint_files(self.run_dir)
    if not candidates:
      return None
    damaged = []
    for path in reversed(candidates):
      problem = damage(path)
      if problem:
        logging.warning("skipping the damaged checkpoint %s (%s)%s", path, problem,
                        "; trying an older one" if path != candidates[0] else "")
        damaged.append(path)
        continue
      try:
        self._restore(path)
      except (tf.errors.OpError, AssertionError, ValueError) as e:
        raise CheckpointError(f"cannot restore {path}: {e}. The run's configuration or code "
                              "changed since it was written; start a new --output_dir.") from e
      if damaged:
        logging.warning("resuming from %s, the newest intact checkpoint (%d newer one(s) "
                        "damaged: %s)", path, len(damaged), ", ".join(damaged))
      return path
    raise CheckpointError(f"every checkpoint in {folder} is damaged ({', '.join(damaged)}); "
                          "start a new --output_dir")

  def _restore(self, path: str) -> None:
    saved = saved_objects([name for name, _ in tf.train.list_variables(path)])
    if "model_weights" in saved:
      order = self._trainable_order
      if "trainable_order" in saved:
        order = [key.decode() for key in tf.train.load_checkpoint(path).get_tensor(
            "trainable_order/.ATTRIBUTES/VARIABLE_VALUE")]
      if order != self._trainable_order:
        first = next((a, b) for a, b in zip(order + [None], self._trainable_order + [None])
                     if a != b)
        raise ValueError(f"its optimizer state follows the trainable variables in another "
                         f"order (first difference: {first[0]} saved, {first[1]} now)")
      self.checkpoint.restore(path).assert_existing_objects_matched()
      return
    # The positional layout. Checkpoints older still lack `task_variables` and
    # `ema_variables`: the EMA is then restored with the optimizer's state, and the loss
    # normaliser followed the model's variables in `model_variables`.
    ema = self._ema_variables if "ema_variables" in saved else ()
    objects = {k: v for k, v in self._objects.items()
               if k in saved or k not in ("task_variables", "trainable_order")}
    older = tf.train.Checkpoint(**weight_objects(saved, self._model, ema), **objects)
    older.restore(path).assert_existing_objects_matched().expect_partial()
    self.checkpoint.save_counter.assign(older.save_counter)
    if self._task_variables and "task_variables" not in saved:
      reader = tf.train.load_checkpoint(path)
      for i, variable in enumerate(self._task_variables):
        variable.assign(reader.get_tensor(
            f"model_variables/{self._num_model_variables + i}/.ATTRIBUTES/VARIABLE_VALUE"))

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


def checkpoint_files(run_dir: str) -> List[str]:
  """Prefixes of the epoch checkpoints in `run_dir/checkpoints` (`ckpt-N` with an index file),
  oldest first. Read from the files themselves, not TensorFlow's `checkpoint` state file, which
  a full disk or a kill outside TensorFlow's atomic write can leave empty or truncated."""
  return _checkpoints_in(os.path.join(run_dir, CHECKPOINT_DIR))


def _checkpoints_in(folder: str) -> List[str]:
  found = []
  for index in tf.io.gfile.glob(os.path.join(folder, "ckpt-*.index")):
    number = os.path.basename(index)[len("ckpt-"):-len(".index")]
    if number.isdigit():
      found.append((int(number), index[:-len(".index")]))
  return [prefix for _, prefix in sorted(found)]


def newest_checkpoint_file(run_dir: str) -> Optional[str]:
  """The newest `checkpoint_files` entry, or None."""
  files = checkpoint_files(run_dir)
  return files[-1] if files else None


def best_checkpoint_files(run_dir: str) -> List[str]:
  """Prefixes of the best-checkpoint folder's checkpoints (`checkpoints/best/ckpt-N`)."""
  return _checkpoints_in(os.path.join(run_dir, BEST_DIR))


def remove_leftover_writes(run_dir: str) -> List[str]:
  """Removes the `ckpt-N_temp*` files / folders of checkpoint writes that were killed, in
  `run_dir/checkpoints` and its `best/`; returns what was removed (logged)."""
  found = []
  for folder in (os.path.join(run_dir, CHECKPOINT_DIR), os.path.join(run_dir, BEST_DIR)):
    for name in tf.io.gfile.glob(os.path.join(folder, "ckpt-*_temp*")):
      if tf.io.gfile.isdir(name):
        tf.io.gfile.rmtree(name)
      else:
        tf.io.gfile.remove(name)
      found.append(name)
  if found:
    logging.warning("removed %d leftover partial checkpoint(s) of a killed write: %s",
                    len(found), ", ".join(found))
  return found


def damage(prefix: str) -> str:
  """'' if the checkpoint `prefix` reads back whole, else what is wrong with it.

  Reads the index and every saved tensor (a checkpoint of this project is a few hundred MB at
  most), so truncated `.index` and `.data` files are both found.
  """
  try:
    reader = tf.train.load_checkpoint(prefix)
    for name in reader.get_variable_to_shape_map():
      reader.get_tensor(name)
  except (tf.errors.OpError, ValueError, IndexError, RuntimeError) as e:
    return (getattr(e, "message", None) or str(e)).strip().splitlines()[0]
  return ""


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
  saved = config_lib.absolute_paths(config_lib.Config.load(path))  # older runs stored them relative
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
      folder = os.path.join(path, sub)
      try:
        latest = tf.train.latest_checkpoint(folder)
      except (ValueError, tf.errors.OpError):  # a damaged `checkpoint` state file
        latest = None
      latest = latest or (_checkpoints_in(folder) or [None])[-1]
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
