"""The training loop: a custom loop over `strategy.run(task.train_step)`.

One code path serves the default strategy, MirroredStrategy and MultiWorkerMirroredStrategy
(Keras' `fit` does not work with multi-worker here, docs/method.md 7). Each epoch: a seeded data
order, the steps, TensorBoard scalars, optional evaluation with the EMA weights, a checkpoint.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import shutil
import sys
import tempfile
import time
from typing import Callable, Dict, List, Optional, Tuple

import keras
import tensorflow as tf
from absl import logging

from asl_tf import config as config_lib
from asl_tf.data import annotations as annotations_lib
from asl_tf.data import demo as demo_lib
from asl_tf.data import pipeline as pipeline_lib
from asl_tf.modeling import detector as detector_lib
from asl_tf.training import checkpoints as ckpt_lib
from asl_tf.training import optimizer as optimizer_lib
from asl_tf.training import strategy as strategy_lib
from asl_tf.training import summaries as summaries_lib
from asl_tf.training import task as task_lib


# The batch entries `DetectionTask.train_step` reads (video ids and metadata stay outside the step,
# where XLA would reject the string tensor).
TRAIN_STEP_KEYS = ("features", "padding_mask", "gt_segments", "gt_labels")


class NonFiniteLossError(RuntimeError):
  """Training produced a NaN / Inf loss; the message names the step, terms and checkpoint."""


@dataclasses.dataclass
class TrainResult:
  """What `train` returns: the run folder, the last metrics and the final epoch."""
  output_dir: str
  epochs_done: int
  history: List[Dict[str, float]]
  metrics: Optional[dict]


def is_chief(strategy: tf.distribute.Strategy) -> bool:
  """True on the worker that owns the run folder (always true without multi-worker)."""
  resolver = getattr(strategy, "cluster_resolver", None)
  if resolver is None or not resolver.task_type:
    return True
  return resolver.task_type == "chief" or (resolver.task_type == "worker"
                                           and resolver.task_id == 0
                                           and "chief" not in resolver.cluster_spec().as_dict())


def setup_run(config: config_lib.Config) -> None:
  """Seeds, determinism and dtype policy (call before building the model)."""
  keras.utils.set_random_seed(config.train.seed)
  if config.train.deterministic:
    tf.config.experimental.enable_op_determinism()
  keras.mixed_precision.set_global_policy(config.train.mixed_precision)


def check_run_folder(config: config_lib.Config) -> None:
  """Refuses a run folder that would be corrupted: checkpoints without --resume, --resume with a
  configuration that differs from the saved one (the message names the fields), or a folder
  whose only checkpoint is its best one (nothing to resume from; a new run would replace it).
  --resume into a folder without checkpoints starts a new run, with a warning that says so."""
  out = config.train.output_dir
  latest = ckpt_lib.newest_checkpoint_file(out)
  best = ckpt_lib.best_checkpoint_files(out)
  if best and not latest:
    raise ckpt_lib.CheckpointError(
        f"{out} holds a best checkpoint ({best[-1]}) but no epoch checkpoint to resume from; a "
        "run there would replace it: choose a new --output_dir (evaluate or export that "
        "checkpoint with --checkpoint)")
  if config.train.resume:
    ckpt_lib.check_resume_config(out, config)
    if not latest:
      logging.warning("--resume: %s holds no checkpoint yet; training starts at epoch 1", out)
  elif latest:
    raise ckpt_lib.CheckpointError(
        f"{out} already holds checkpoints ({latest}); pass --resume to continue that run or "
        "choose a new --output_dir")


class Trainer:
  """Owns the model, optimizer, checkpoints and data of one run.

  On a multi-worker cluster only the chief writes the run folder (config, checkpoints,
  TensorBoard, evaluation); the other workers take part in every checkpoint save (as
  tf.distribute requires) into a scratch folder that is removed at the end.

  Args:
    config: the resolved configuration.
    strategy: a tf.distribute strategy (default: chosen by `strategy_lib.make_strategy`).
    evaluate_fn: `(model, config) -> metrics dict` run by the chief with the EMA weights every
      `eval_every` epochs and at the end (None or `eval_every < 0` = no evaluation). The
      metrics need `average_mAP`.
  """

  def __init__(self, config: config_lib.Config,
               strategy: Optional[tf.distribute.Strategy] = None,
               evaluate_fn: Optional[Callable] = None):
    self.config = config
    self.strategy = strategy or strategy_lib.make_strategy(config.train.num_cpu_devices)
    self.evaluate_fn = evaluate_fn
    self.output_dir = config.train.output_dir
    self.chief = is_chief(self.strategy)
    self.replicas = self.strategy.num_replicas_in_sync
    self._lock = ckpt_lib.RunLock(self.output_dir) if self.chief else None
    if self._lock:
      self._lock.acquire()  # before anything reads or writes the run folder
    try:
      self._setup(config)
    except BaseException:
      if self._lock:
        self._lock.release()
      raise

  def _setup(self, config: config_lib.Config) -> None:
    self._traced = False  # the first training step of this process traces the graph
    check_run_folder(config)
    if self.chief:
      ckpt_lib.remove_leftover_writes(self.output_dir)
    self.global_batch = config.train.batch_size * self.replicas
    if config.train.jit_compile and self.replicas > 1:
      raise config_lib.ConfigError(
          f"--jit_compile with {self.replicas} replicas: XLA under MirroredStrategy fails on "
          "this TensorFlow (docs/method.md 7); use --jit_compile on a single device")

    if config.data.demo_dir:
      demo_lib.ensure_demo_data(config.data)
    self.records, self.data_report = annotations_lib.load_video_records(
        config.data, config.data.train_subset)
    unnamed = self.data_report.unnamed_class_ids
    if unnamed and not config.model.head_empty_cls:
      # As ActionFormer: classes the annotation file never names start at a 1e-6 prior.
      config = dataclasses.replace(config, model=dataclasses.replace(config.model,
                                                                     head_empty_cls=unnamed))
      self.config = config
    if self.evaluate_fn is not None and self.chief and config.train.eval_every >= 0:
      # Evaluation reads its subset after the first epoch it runs: a missing feature file or a
      # misspelt --eval_subset is found now, not after hours of training.
      annotations_lib.load_video_records(config.data, config.data.eval_subset)
    self.steps_per_epoch = pipeline_lib.train_steps_per_epoch(self.records, config.data,
                                                              self.global_batch)
    if self.steps_per_epoch == 0:
      raise config_lib.ConfigError(
          f"{len(self.records)} training videos in subset {config.data.train_subset!r} of "
          f"{config.data.annotation_file} cannot fill one global batch of {self.global_batch} "
          f"(--batch_size={config.train.batch_size} x {self.replicas} replicas)")

    if self.chief:
      print(f"building the model ({config.model.num_levels} levels, dims {config.model.embd_dim})"
            " and the optimizer", flush=True)
    with self.strategy.scope():
      self.model = detector_lib.ASLDetector(config.model, eval_config=config.eval)
      self.model.build_for_training()
      self.task = task_lib.DetectionTask(config.model, config.loss, config.train.clip_grad_norm)
      self.optimizer = optimizer_lib.build_optimizer(self.model, config.train, config.model,
                                                     self.steps_per_epoch)
      self.optimizer.build(self.model.trainable_variables)
      state = ckpt_lib.counters()
    self.epoch_var = state["epoch"]
    self.best_var = state["best_metric"]
    self._scratch_dir = None if self.chief else tempfile.mkdtemp(prefix="asl_tf_worker_")
    self.checkpointer = ckpt_lib.RunCheckpointer(
        self.output_dir, config.train.keep_checkpoints, model=self.model,
        write_dir=self._scratch_dir, task_variables=self.task.state_variables,
        ema_variables=optimizer_lib.ema_variables(self.optimizer), optimizer=self.optimizer,
        **state)
    self._step_fn = None

  def _distributed_dataset(self, first_epoch: int, num_epochs: int):
    dataset = pipeline_lib.make_train_dataset(self.records, self.config.data, self.global_batch,
                                              seed=self.config.train.seed, epoch=first_epoch,
                                              num_epochs=num_epochs)
    return self.strategy.experimental_distribute_dataset(dataset)

  def _make_step_fn(self):
    replica_step = functools.partial(self.task.train_step, self.model, self.optimizer)
    if self.config.train.jit_compile:
      replica_step = tf.function(replica_step, jit_compile=True)

    @tf.function
    def step_fn(iterator, epoch):
      batch = {k: v for k, v in next(iterator).items() if k in TRAIN_STEP_KEYS}
      per_replica = self.strategy.run(replica_step, args=(batch, epoch))
      return {k: self.strategy.reduce(tf.distribute.ReduceOp.SUM, v, axis=None)
              for k, v in per_replica.items()}

    return step_fn

  def _start(self) -> int:
    """Restores the latest checkpoint on --resume; returns the first epoch to train."""
    if self.config.train.resume:
      restored = self.checkpointer.restore_latest()
      if restored:
        logging.info("resumed from %s (epoch %d done)", restored, int(self.epoch_var.numpy()))
        return int(self.epoch_var.numpy())
    return 0

  def train(self) -> TrainResult:
    """Trains from scratch or, with `--resume`, from the latest checkpoint."""
    try:
      return self._train()
    finally:
      if self._scratch_dir:
        shutil.rmtree(self._scratch_dir, ignore_errors=True)
      if self._lock:
        self._lock.release()

  def _train(self) -> TrainResult:
    cfg = self.config
    start_epoch = self._start()
    if self.chief:
      os.makedirs(self.output_dir, exist_ok=True)
      cfg.save(os.path.join(self.output_dir, ckpt_lib.CONFIG_FILE))
      ckpt_lib.write_class_names(self.output_dir, self.data_report.class_names)
    total_epochs = cfg.train.epochs + cfg.train.warmup_epochs
    if self.chief:
      print(f"asl_tf training: output_dir={os.path.abspath(self.output_dir)}\n"
            f"  {len(self.records)} videos ({cfg.data.train_subset}), {self.replicas} "
            f"replica(s), global batch {self.global_batch} = {cfg.train.batch_size} per replica "
            f"x {self.replicas}, {self.steps_per_epoch} steps/epoch, {total_epochs} epochs "
            f"({cfg.train.warmup_epochs} warm-up), starting at epoch {start_epoch + 1}",
            flush=True)
    writer = summaries_lib.SummaryWriter(os.path.join(self.output_dir, "logs"),
                                         enabled=self.chief)
    profiler = _Profiler(cfg.train.profile_steps, os.path.join(self.output_dir, "logs"),
                         enabled=self.chief)
    self._step_fn = self._step_fn or self._make_step_fn()
    history, metrics = [], None
    iterator = None
    if start_epoch < total_epochs:
      iterator = iter(self._distributed_dataset(start_epoch, total_epochs - start_epoch))
    try:
      for epoch in range(start_epoch, total_epochs):
        history.append(self._train_one_epoch(iterator, epoch, total_epochs, writer, profiler))
        self.epoch_var.assign(epoch + 1)
        try:
          metrics, best = self._maybe_evaluate(epoch, total_epochs, writer) or (metrics, False)
        except Exception:
          # The epoch's training is kept: fix what evaluation tripped on, then `--resume` (or
          # `asl_tf.evaluate`) from this checkpoint.
          logging.error("evaluation after epoch %d failed; its checkpoint is %s", epoch + 1,
                        self.checkpointer.save(epoch + 1, best=False))
          raise
        if cfg.model.class_sensitivity:
          writer.sensitivity(self._global_step(), self.model, epoch,
                             image_every=max(1, total_epochs // 4))
        path = self.checkpointer.save(epoch + 1, best=best)
        logging.info("epoch %d: checkpoint %s", epoch + 1, path)
      if start_epoch == total_epochs and start_epoch > 0:  # resuming a finished run
        metrics, _ = self._maybe_evaluate(total_epochs - 1, total_epochs, writer) or (None, 0)
    finally:
      profiler.stop()
      writer.close()
    return TrainResult(self.output_dir, int(self.epoch_var.numpy()), history, metrics)

  def _maybe_evaluate(self, epoch: int, total_epochs: int, writer):
    """Chief only: evaluates with the EMA weights when due; returns (metrics, best) or None."""
    cfg = self.config
    is_last = epoch + 1 == total_epochs
    if self.evaluate_fn is None or not self.chief or cfg.train.eval_every < 0 or not (
        is_last or (cfg.train.eval_every > 0 and (epoch + 1) % cfg.train.eval_every == 0)):
      return None
    with optimizer_lib.ema_weights(self.model, self.optimizer):
      metrics = self.evaluate_fn(self.model, cfg)
    writer.scalars(self._global_step(), {f"eval/{k}": v for k, v in
                                         summaries_lib.flat_metrics(metrics).items()})
    best = metrics["average_mAP"] > float(self.best_var.numpy())
    if best:
      self.best_var.assign(metrics["average_mAP"])
    return metrics, best

  def _global_step(self) -> int:
    return int(optimizer_lib.base_optimizer(self.optimizer).iterations.numpy())

  def _learning_rate(self) -> float:
    return float(optimizer_lib.base_optimizer(self.optimizer).learning_rate.numpy())

  def _train_one_epoch(self, iterator, epoch: int, total_epochs: int, writer,
                       profiler) -> Dict[str, float]:
    cfg = self.config
    if self.chief:
      print(f"epoch {epoch + 1}/{total_epochs}", flush=True)
    bar = None  # made after the first step of the run, which traces: its ETA starts true
    sums: Dict[str, float] = {}
    epoch_tensor = tf.constant(epoch, tf.int64)
    t_epoch = time.perf_counter()
    timed_from, t_timed = 0, t_epoch
    for i in range(self.steps_per_epoch):
      if not self._traced and self.chief:
        print("tracing the training step: the first step builds the graph (about a minute on "
              "a CPU; progress and ETA follow)", flush=True)
      step = self._global_step() + 1  # 1-based number of the update about to run
      lr = self._learning_rate()  # the rate this update uses
      profiler.before(step)
      t0 = time.perf_counter()
      logs = {k: float(v) for k, v in self._step_fn(iterator, epoch_tensor).items()}
      elapsed = time.perf_counter() - t0
      profiler.after(step)
      if not all(math.isfinite(v) for v in logs.values()):
        raise NonFiniteLossError(
            f"non-finite loss at step {step} (epoch {epoch + 1}): "
            + ", ".join(f"{k}={v:.4g}" for k, v in sorted(logs.items()))
            + ". Training stopped without saving; the last good checkpoint is "
            f"{self.checkpointer.latest or 'none (no epoch finished)'}. Lower --learning_rate "
            "or check the features for extreme values, then rerun (with --resume to continue "
            "from that checkpoint).")
      for k, v in logs.items():
        sums[k] = sums.get(k, 0.0) + v
      if not self._traced:
        self._traced = True
        timed_from, t_timed = i + 1, time.perf_counter()
        if self.chief:
          print(f"first step done in {elapsed:.0f} s (tracing); the ETA counts from here",
                flush=True)
      rate = (i + 1 - timed_from) / max(time.perf_counter() - t_timed, 1e-9)
      if self.chief:
        bar = bar or _Progress(self.steps_per_epoch, epoch, total_epochs)
        bar.update(i + 1, logs, lr, rate if i + 1 > timed_from else None)
      if step % max(1, cfg.train.log_every) == 0 or i + 1 == self.steps_per_epoch:
        writer.scalars(step, {**{f"train/{k}": v for k, v in logs.items()},
                              "train/learning_rate": lr,
                              "train/videos_per_sec": self.global_batch / elapsed})
    means = {k: v / self.steps_per_epoch for k, v in sums.items()}
    means["epoch_sec"] = time.perf_counter() - t_epoch
    return means


class _Progress:
  """Per-step progress of one epoch: Keras' progress bar on a terminal; in a file or pipe (no
  terminal, e.g. `> train.log`), plain lines: at most one per tenth of the epoch and per
  MIN_LINE_SEC, and one at its end."""

  MIN_LINE_SEC = 15.0

  def __init__(self, steps: int, epoch: int, total_epochs: int):
    self.steps = steps
    self.prefix = f"epoch {epoch + 1}/{total_epochs}"
    self.every = max(1, steps // 10)
    self.last_line = time.perf_counter()
    self.bar = None
    if getattr(sys.stdout, "isatty", lambda: False)():
      self.bar = keras.utils.Progbar(steps, stateful_metrics=["lr", "num_pos", "steps/s"])

  def update(self, done: int, logs: Dict[str, float], lr: float, rate: Optional[float]):
    if self.bar is not None:
      self.bar.update(done, values=[(k, v) for k, v in logs.items() if k != "num_pos"]
                      + [("lr", lr), ("num_pos", logs.get("num_pos", 0.0))]
                      + ([("steps/s", rate)] if rate else []))
      return
    now = time.perf_counter()
    if done != self.steps and (done % self.every or now - self.last_line < self.MIN_LINE_SEC):
      return
    self.last_line = now
    losses = " ".join(f"{k} {v:.4f}" for k, v in logs.items() if k.endswith("loss"))
    speed = f", {rate:.2f} steps/s, epoch ETA {(self.steps - done) / rate:.0f} s" if rate else ""
    print(f"{self.prefix} step {done}/{self.steps}: {losses} lr {lr:.3g}{speed}", flush=True)


class _Profiler:
  """Traces optimizer steps START..END (1-based, inclusive) into `logdir/plugins/profile`."""

  def __init__(self, steps: Optional[Tuple[int, int]], logdir: str, enabled: bool):
    self.steps = steps if enabled else None
    self.logdir = logdir
    self.running = False

  def before(self, step: int) -> None:
    if self.steps and not self.running and self.steps[0] <= step <= self.steps[1]:
      tf.profiler.experimental.start(self.logdir)
      self.running = True
      logging.info("profiling steps %d-%d into %s", step, self.steps[1], self.logdir)

  def after(self, step: int) -> None:
    if self.running and step >= self.steps[1]:
      self.stop()

  def stop(self) -> None:
    if self.running:
      tf.profiler.experimental.stop()
      self.running = False


def train(config: config_lib.Config, evaluate_fn: Optional[Callable] = None,
          strategy: Optional[tf.distribute.Strategy] = None) -> TrainResult:
  """Sets up the run and trains it (see `Trainer`)."""
  setup_run(config)
  return Trainer(config, strategy=strategy, evaluate_fn=evaluate_fn).train()
