"""In-process training checks: run-folder refusals, weight decay groups, the optimizer's LR,
non-finite losses, failing checkpoint writes, mixed precision and XLA."""

import dataclasses
import errno
import json
import logging
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from asl_tf.modeling import detector as detector_lib
from asl_tf.training import checkpoints as ckpt_lib
from asl_tf.training import loop
from asl_tf.training import optimizer as optimizer_lib
from asl_tf.training import schedules
from asl_tf.training import task as task_lib
import training_helpers as helpers


def _config(tiny_data, output_dir, **overrides):
  return helpers.make_config(helpers.tiny_flags(tiny_data, str(output_dir), **overrides))


def _detector_and_optimizer(config, steps_per_epoch=8):
  model = detector_lib.ASLDetector(config.model)
  model.build_for_training()
  optimizer = optimizer_lib.build_optimizer(model, config.train, config.model, steps_per_epoch)
  optimizer.build(model.trainable_variables)
  return model, optimizer


# -- run folder ------------------------------------------------------------------------------
def _fake_run(tiny_data, run_dir):
  config = _config(tiny_data, run_dir)
  os.makedirs(run_dir)
  config.save(os.path.join(run_dir, ckpt_lib.CONFIG_FILE))
  tf.train.CheckpointManager(tf.train.Checkpoint(v=tf.Variable(1.0)),
                             os.path.join(run_dir, "checkpoints"), 1,
                             checkpoint_name="ckpt").save(1)


def test_existing_checkpoints_without_resume_are_refused(tiny_data, tmp_path):
  _fake_run(tiny_data, str(tmp_path / "run"))
  with pytest.raises(ckpt_lib.CheckpointError, match="already holds checkpoints.*--resume"):
    loop.check_run_folder(_config(tiny_data, tmp_path / "run"))


def test_a_folder_holding_only_a_best_checkpoint_is_a_run_too(tiny_data, tmp_path):
  """Epoch checkpoints deleted to save space, the best one kept: a new run without --resume
  was accepted there and replaced that checkpoint at its first evaluation; with --resume it
  starts from epoch 1 and does the same."""
  run = str(tmp_path / "run")
  os.makedirs(run)
  tf.train.CheckpointManager(tf.train.Checkpoint(v=tf.Variable(1.0)),
                             os.path.join(run, ckpt_lib.BEST_DIR), 1,
                             checkpoint_name="ckpt").save(3)
  for resume in (False, True):  # --resume would start at epoch 1 and replace it as well
    with pytest.raises(ckpt_lib.CheckpointError, match=r"holds a best checkpoint \(.*best/ckpt-3"
                                                       r"\) but no epoch checkpoint to resume "
                                                       r"from; .* choose a new --output_dir"):
      loop.check_run_folder(_config(tiny_data, run, resume=resume))


def test_resume_into_a_folder_without_checkpoints_says_it_starts_anew(tiny_data, tmp_path,
                                                                     caplog):
  """A mistyped --output_dir with --resume trained from epoch 1 without a word."""
  run = str(tmp_path / "typo")
  with caplog.at_level(logging.WARNING):
    loop.check_run_folder(_config(tiny_data, run, resume=True))
  assert f"--resume: {run} holds no checkpoint yet; training starts at epoch 1" in caplog.text
  caplog.clear()
  _fake_run(tiny_data, run)
  with caplog.at_level(logging.WARNING):
    loop.check_run_folder(_config(tiny_data, run, resume=True))
  assert "holds no checkpoint" not in caplog.text


def test_classes_the_annotation_file_never_names_start_at_the_empty_prior(tiny_data, tmp_path):
  """ActionFormer sets the bias of classes its annotation file has no label for to a 1e-6 prior
  (EPIC's head_empty_cls); here they started at 0.01 like the trained ones. A run saved with
  them still resumes: they set initial biases only."""
  from asl_tf.modeling import heads  # pylint: disable=g-import-not-at-top
  config = _config(tiny_data, tmp_path / "run", num_classes=5)
  trainer = loop.Trainer(config)
  try:
    assert trainer.config.model.head_empty_cls == (3, 4)
    assert trainer.model.cls_head.empty_classes == (3, 4)
  finally:
    trainer._lock.release()  # pylint: disable=protected-access
  saved = dataclasses.replace(config, model=dataclasses.replace(config.model,
                                                                head_empty_cls=(3, 4)))
  assert ckpt_lib.config_differences(saved, config) == []
  expected = [heads.prior_bias(0.01)] * 3 + [heads.prior_bias(heads.EMPTY_CLASS_PRIOR)] * 2
  bias = trainer.model.cls_head.get_weights()[-1]
  np.testing.assert_allclose(bias, expected, rtol=1e-6)


_HOLDER = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, f"{os.getpid()}\\n".encode())
print("locked", flush=True)
time.sleep(60)
"""


def test_a_run_folder_in_use_is_refused_naming_the_holder(tiny_data, tmp_path):
  """A second training into a folder another process trains into is refused before it reads
  or writes anything; once the holder is gone (killed), the lock is free again."""
  run = tmp_path / "run"
  run.mkdir()
  holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(run / ckpt_lib.LOCK_FILE)],
                            stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(ckpt_lib.CheckpointError,
                       match=f"{run} is in use by another training \\(pid {holder.pid}\\)"):
      loop.Trainer(_config(tiny_data, run))
    assert not (run / "config.json").exists()
  finally:
    holder.kill()
    holder.wait()
  lock = ckpt_lib.RunLock(str(run))  # stale file of a killed holder: taken over
  lock.acquire()
  assert (run / ckpt_lib.LOCK_FILE).read_text().strip() == str(os.getpid())
  with pytest.raises(ckpt_lib.CheckpointError, match=f"pid {os.getpid()}"):
    ckpt_lib.RunLock(str(run)).acquire()
  lock.release()
  ckpt_lib.RunLock(str(run)).acquire()


def test_resume_with_an_incompatible_config_names_the_field(tiny_data, tmp_path):
  _fake_run(tiny_data, str(tmp_path / "run"))
  config = _config(tiny_data, tmp_path / "run", resume=True, learning_rate=2e-3,
                   log_every=5)
  with pytest.raises(ckpt_lib.CheckpointError) as e:
    loop.check_run_folder(config)
  assert "train.learning_rate: 0.001 (checkpoint) vs 0.002 (now)" in str(e.value)
  assert "log_every" not in str(e.value)  # logging may change on resume
  loop.check_run_folder(_config(tiny_data, tmp_path / "run", resume=True, log_every=5))
  # The kernel policy changes how, not what, the model computes: a run may resume under another.
  loop.check_run_folder(_config(tiny_data, tmp_path / "run", resume=True,
                                kernel_policy="reference"))


# -- weight decay and learning rate ------------------------------------------------------------
@pytest.mark.parametrize("parametrization,sensitivity_decay,mu_decayed", [
    ("authors", True, True), ("authors", False, False), ("stable", True, False)])
def test_weight_decay_groups_on_the_real_detector(tiny_data, tmp_path, parametrization,
                                                  sensitivity_decay, mu_decayed):
  config = _config(tiny_data, tmp_path, sensitivity_parametrization=parametrization,
                   sensitivity_weight_decay=sensitivity_decay, warmup_epochs=0, epochs=2,
                   weight_decay=0.05, ema_decay=0, contrastive_weight=0.1,
                   contrastive_proj_dim=8)
  model, optimizer = _detector_and_optimizer(config)
  variables = model.trainable_variables
  use_decay = optimizer._use_weight_decay  # pylint: disable=protected-access
  decayed = {v.path for v in variables if use_decay(v)}
  sensitivity = {v.path for v in model.sensitivity.class_level.sensitivity_variables}
  kernels = {v.path for v in variables if v.name == "kernel"}
  groups = [layer for layer in model._flatten_layers()  # pylint: disable=protected-access
            if getattr(layer, "groups", 1) > 1]
  assert groups and {layer.kernel.path for layer in groups} <= kernels  # depthwise convs
  assert any("contrastive_projection" in p for p in kernels)  # dense kernels
  assert decayed == kernels | (sensitivity if mu_decayed else set())
  for v in variables:  # biases, norms, Scale, LayerScale are never decayed
    if v.name in ("bias", "gamma", "beta", "scale"):
      assert v.path not in decayed

  # One update with zero gradients: only decay acts, by exactly lr * wd * value.
  lr = float(optimizer.learning_rate.numpy())
  assert lr == pytest.approx(1e-3)
  before = [v.numpy() for v in variables]
  optimizer.apply([tf.zeros_like(v) for v in variables], variables)
  for v, b in zip(variables, before):
    if v.path in decayed:
      np.testing.assert_allclose(v.numpy(), b * (1 - lr * 0.05), rtol=1e-6, atol=1e-9)
      assert np.abs(v.numpy()).sum() < np.abs(b).sum() or not b.any()
    else:
      np.testing.assert_array_equal(v.numpy(), b)


def test_optimizer_uses_the_actionformer_schedule(tiny_data, tmp_path):
  config = _config(tiny_data, tmp_path, warmup_epochs=1, epochs=2, weight_decay=0.05,
                   ema_decay=0, sensitivity_weight_decay=False)
  model, optimizer = _detector_and_optimizer(config, steps_per_epoch=8)
  ref = schedules.WarmupCosineDecay(1e-3, warmup_steps=8, total_steps=24)
  kernel = next(v for v in model.trainable_variables if v.name == "kernel")
  for step in (0, 3, 7, 8, 15, 23):
    optimizer.iterations.assign(step)
    lr = float(optimizer.learning_rate.numpy())
    assert lr == pytest.approx(float(ref(step)), rel=1e-6, abs=1e-12)
    before = kernel.numpy()
    optimizer.apply([tf.zeros_like(v) for v in model.trainable_variables],
                    model.trainable_variables)
    np.testing.assert_allclose(kernel.numpy(), before * (1 - lr * 0.05), rtol=1e-6)
  assert float(ref(8)) == pytest.approx(1e-3)
  assert float(ref(23)) < 1e-4


# -- checkpoints and failures --------------------------------------------------------------------
def test_failed_checkpoint_write_keeps_the_previous_one(tiny_data, tmp_path):
  config = _config(tiny_data, tmp_path)
  model, optimizer = _detector_and_optimizer(config)
  checkpointer = ckpt_lib.RunCheckpointer(str(tmp_path), 3, model=model, optimizer=optimizer,
                                          **ckpt_lib.counters())
  first = checkpointer.save(1)
  saved = [v.numpy() for v in model.variables]
  real_write = checkpointer.checkpoint._write  # pylint: disable=protected-access

  def write_then_fill_the_disk(prefix, options=None):
    del options  # the state-file callback never runs: the write does not finish
    path = real_write(prefix)
    data = tf.io.gfile.glob(path + ".data-*")[0]
    with open(data, "r+b") as f:
      f.truncate(os.path.getsize(data) // 2)
    raise OSError(errno.ENOSPC, "No space left on device", data)

  checkpointer.checkpoint._write = write_then_fill_the_disk  # pylint: disable=protected-access
  for v in model.variables:
    v.assign(tf.ones_like(v) * 7)
  with pytest.raises(ckpt_lib.CheckpointError) as e:
    checkpointer.save(2)
  message = str(e.value)
  assert "epoch 2" in message and "No space left" in message and first in message
  assert checkpointer.latest == first
  assert not tf.io.gfile.glob(str(tmp_path / "checkpoints" / "ckpt-2*"))
  assert checkpointer.restore_latest() == first
  for v, s in zip(model.variables, saved):
    np.testing.assert_array_equal(v.numpy(), s)


def test_checkpoints_hold_the_tasks_normaliser_and_read_those_written_before_the_task(
    tiny_data, tmp_path):
  """The loss normaliser is the task's: saved as `task_variables`. A checkpoint written while the
  detector held it (then the last of `model_variables`) still resumes with its value."""
  config = _config(tiny_data, tmp_path)
  model, optimizer = _detector_and_optimizer(config)
  task = task_lib.DetectionTask(config.model, config.loss)
  counters = ckpt_lib.counters()
  task.loss_normalizer.normalizer.assign(42.0)
  ckpt_lib.RunCheckpointer(str(tmp_path / "new"), 3, model=model, optimizer=optimizer,
                           task_variables=task.state_variables, **counters).save(1)
  old_layout = tf.train.Checkpoint(
      model=model, model_variables=list(model.variables) + [tf.Variable(17.0)],
      optimizer=optimizer, **counters)
  tf.train.CheckpointManager(old_layout, str(tmp_path / "old" / "checkpoints"), 1,
                             checkpoint_name="ckpt").save(checkpoint_number=1)
  weights = [v.numpy() for v in model.variables]
  for run, value in (("new", 42.0), ("old", 17.0)):
    for v in model.variables:
      v.assign(tf.zeros_like(v))
    task.loss_normalizer.normalizer.assign(1.0)
    checkpointer = ckpt_lib.RunCheckpointer(str(tmp_path / run), 3, model=model,
                                            optimizer=optimizer,
                                            task_variables=task.state_variables, **counters)
    assert checkpointer.restore_latest().endswith("ckpt-1"), run
    assert float(task.loss_normalizer.normalizer.numpy()) == value, run
    for v, w in zip(model.variables, weights):
      np.testing.assert_array_equal(v.numpy(), w)


def test_weights_and_ema_are_keyed_by_path_so_a_second_build_restores_them(tiny_data, tmp_path):
  """Keras' own paths depend on what the process built before (`asl_detector_1`,
  `seed_generator_12`); checkpoint keys do not, and a positional checkpoint still resumes."""
  config = _config(tiny_data, tmp_path)
  model, optimizer = _detector_and_optimizer(config)
  for _ in range(2):
    optimizer.apply([tf.ones_like(v) for v in model.trainable_variables],
                    model.trainable_variables)
  keys = ckpt_lib.variable_paths(model)
  assert len(keys) == len(model.variables)
  assert keys["backbone/embd/0/kernel"] is model.backbone.embd[0].kernel
  assert any(k.endswith("/seed_generator/state") for k in keys)  # dropout / drop-path RNGs
  ema = optimizer_lib.ema_variables(optimizer)
  ckpt_lib.RunCheckpointer(str(tmp_path / "paths"), 1, model=model, optimizer=optimizer,
                           ema_variables=ema, **ckpt_lib.counters()).save(1)
  positional = tf.train.Checkpoint(model_variables=list(model.variables), ema_variables=ema,
                                   optimizer=optimizer, **ckpt_lib.counters())
  tf.train.CheckpointManager(positional, str(tmp_path / "positional" / "checkpoints"), 1,
                             checkpoint_name="ckpt").save(checkpoint_number=1)

  for run in ("paths", "positional"):
    again, again_optimizer = _detector_and_optimizer(config)
    assert again.variables[0].path != model.variables[0].path
    assert list(ckpt_lib.variable_paths(again)) == list(keys)
    again_ema = optimizer_lib.ema_variables(again_optimizer)
    checkpointer = ckpt_lib.RunCheckpointer(str(tmp_path / run), 1, model=again,
                                            optimizer=again_optimizer, ema_variables=again_ema,
                                            **ckpt_lib.counters())
    assert checkpointer.restore_latest().endswith("ckpt-1"), run
    for key, variable in ckpt_lib.variable_paths(again).items():
      np.testing.assert_array_equal(variable.numpy(), keys[key].numpy(), err_msg=key)
    for a, b in zip(again_ema, ema):
      np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert max(np.abs(a.numpy() - b.numpy()).max()
               for a, b in zip(ema, model.trainable_variables)) > 0  # the EMA is not the weights

  # A checkpoint whose optimizer moments follow another variable order is refused, not resumed.
  checkpointer = ckpt_lib.RunCheckpointer(str(tmp_path / "reordered"), 1, model=model,
                                          optimizer=optimizer, ema_variables=ema)
  order = checkpointer.checkpoint.trainable_order
  order.assign(tf.reverse(order, [0]))
  checkpointer.save(1)
  with pytest.raises(ckpt_lib.CheckpointError, match="another order .first difference: "
                     "sensitivity/"):
    ckpt_lib.RunCheckpointer(str(tmp_path / "reordered"), 1, model=model, optimizer=optimizer,
                             ema_variables=ema).restore_latest()


@pytest.mark.slow
def test_non_finite_loss_stops_and_names_step_terms_and_checkpoint(tiny_data, tmp_path):
  config = _config(tiny_data, tmp_path / "run")
  loop.setup_run(config)
  trainer = loop.Trainer(config)
  real_save = trainer.checkpointer.save

  def save_then_diverge(epoch, best=False):
    path = real_save(epoch, best=best)
    kernel = next(v for v in trainer.model.trainable_variables if v.name == "kernel")
    kernel.assign(tf.fill(kernel.shape, np.nan))
    return path

  trainer.checkpointer.save = save_then_diverge
  with pytest.raises(loop.NonFiniteLossError) as e:
    trainer.train()
  message = str(e.value)
  assert "step 9 (epoch 2)" in message
  assert "cls_loss=nan" in message and "total_loss=nan" in message
  assert message.count("ckpt-1") == 1 and "last good checkpoint" in message
  assert [os.path.basename(p) for p in sorted(
      tf.io.gfile.glob(str(tmp_path / "run" / "checkpoints" / "ckpt-*.index")))] == [
          "ckpt-1.index"]


def test_a_bad_evaluation_subset_is_found_before_training(tiny_data, tmp_path):
  """A misspelt --eval_subset (or a missing evaluation feature file) surfaced only after the
  last epoch, when evaluation first read its data."""
  from asl_tf.data import annotations  # pylint: disable=g-import-not-at-top
  config = _config(tiny_data, tmp_path / "run", eval_every=0, eval_subset="valdation")
  with pytest.raises(annotations.AnnotationError, match="valdation"):
    loop.Trainer(config, evaluate_fn=lambda model, cfg: pytest.fail("evaluated"))
  assert not (tmp_path / "run" / "checkpoints").exists()
  loop.Trainer(_config(tiny_data, tmp_path / "run", eval_every=-1, eval_subset="valdation"),
               evaluate_fn=lambda model, cfg: {})  # no evaluation: nothing to check


def test_the_epochs_checkpoint_is_kept_when_its_evaluation_fails(tiny_data, tmp_path):
  """Evaluation ran before the epoch's checkpoint was written: when it failed (a NaN in an
  evaluation feature file, say), the epoch's training was lost with it."""
  config = _config(tiny_data, tmp_path / "run", epochs=1, warmup_epochs=0, eval_every=0)
  loop.setup_run(config)

  def fail(model, cfg):
    raise ValueError("validation_03.npy: non-finite value")

  with pytest.raises(ValueError, match="non-finite"):
    loop.Trainer(config, evaluate_fn=fail).train()
  assert ckpt_lib.checkpoint_files(str(tmp_path / "run"))[-1].endswith("ckpt-1")
  assert not ckpt_lib.best_checkpoint_files(str(tmp_path / "run"))
  with open(tmp_path / "run" / ckpt_lib.CLASS_NAMES_FILE) as f:  # what evaluate checks against
    assert json.load(f) == {"class_names": ["class_0", "class_1", "class_2"]}


# -- precision and XLA ---------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("overrides", [{"mixed_precision": "mixed_float16"},
                                       {"mixed_precision": "mixed_bfloat16"},
                                       {"jit_compile": True}])
def test_mixed_precision_and_xla_train_with_finite_losses(tiny_data, tmp_path, overrides):
  config = _config(tiny_data, tmp_path, epochs=1, warmup_epochs=0, **overrides)
  try:
    result = loop.train(config)
  finally:
    keras.mixed_precision.set_global_policy("float32")
  assert result.epochs_done == 1
  (logs,) = result.history
  for key in ("cls_loss", "reg_loss", "total_loss"):
    assert np.isfinite(logs[key]) and logs[key] > 0


# -- flags that contradict the data --------------------------------------------------------------
def test_flags_contradicting_the_data_fail_with_one_line_naming_both_values(tiny_data, tmp_path):
  cases = {"input_dim": ({"input_dim": 6}, ["8 channels", "input_dim=6"]),
           "num_classes": ({"num_classes": 2}, [">= num_classes=2", "class_2': 2"])}
  procs = {}
  for name, (overrides, _) in cases.items():
    args = helpers.tiny_flags(tiny_data, str(tmp_path / name), **overrides)
    procs[name] = subprocess.Popen(
        [sys.executable, "-m", "asl_tf.train"] + args, cwd=helpers.REPO,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
  try:
    for name, proc in procs.items():
      _, err = proc.communicate(timeout=240)
      assert proc.returncode == 1, err
      assert "Traceback" not in err
      last = err.strip().splitlines()[-1]
      assert last.startswith("asl_tf.train: ")
      for fragment in cases[name][1]:
        assert fragment in last, last
      assert not os.path.exists(tmp_path / name / "checkpoints")
  finally:
    for proc in procs.values():
      if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("step_sec,expected_steps", [(1.0, [20, 40, 60, 80, 100]),
                                                     (0.01, [100])])
def test_progress_in_a_file_is_a_few_plain_lines(monkeypatch, capsys, step_sec, expected_steps):
  """Without a terminal: a line per tenth of the epoch but at most one per 15 s, and the last
  step's line (a 25-step demo epoch printed 13 lines before)."""
  clock = [0.0]
  monkeypatch.setattr(loop.time, "perf_counter", lambda: clock[0])
  progress = loop._Progress(100, epoch=2, total_epochs=5)  # pylint: disable=protected-access
  for done in range(1, 101):
    clock[0] += step_sec
    progress.update(done, {"cls_loss": 0.5, "total_loss": 0.75}, 1e-4, 1.0 / step_sec)
  lines = capsys.readouterr().out.splitlines()
  assert [int(l.split()[3].split("/")[0]) for l in lines] == expected_steps
  assert lines[-1] == (f"epoch 3/5 step 100/100: cls_loss 0.5000 total_loss 0.7500 lr 0.0001, "
                       f"{1.0 / step_sec:.2f} steps/s, epoch ETA 0 s")
