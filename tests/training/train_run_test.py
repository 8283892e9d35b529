"""End-to-end training runs in subprocesses: kill -9 + --resume equals an uninterrupted run;
1 device = 2 logical CPUs = 2 workers; TensorBoard scalars, images and the profiler trace."""

import glob
import json
import os
import re
import socket

import numpy as np
import pytest
import tensorflow as tf

import training_helpers as helpers

TIMEOUT = 540


def _scalars(logdir):
  """{tag: {step: value}} and the image tags of every event file under logdir."""
  scalars, images = {}, set()
  for path in glob.glob(os.path.join(logdir, "events.out.tfevents.*")):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        if value.metadata.plugin_data.plugin_name == "images":
          images.add(value.tag)
        elif value.HasField("tensor"):
          scalars.setdefault(value.tag, {})[event.step] = float(tf.make_ndarray(value.tensor))
  return scalars, images


@pytest.mark.slow
def test_kill_and_resume_equals_uninterrupted_run_with_logs_and_profile(tiny_data, tmp_path):
  full, killed = str(tmp_path / "full"), str(tmp_path / "killed")
  procs = [
      helpers.start_run(helpers.tiny_flags(tiny_data, full, eval_every=0,
                                             profile_steps="2,3"),
                         log_path=str(tmp_path / "full.log")),
      # Killed in the middle of epoch 2 (8 steps per epoch), after checkpoint 1.
      helpers.start_run(helpers.tiny_flags(tiny_data, killed),
                         env={"ASL_TEST_KILL_AT_STEP": "13"},
                         log_path=str(tmp_path / "killed.log")),
  ]
  assert helpers.wait_all(procs, TIMEOUT) == [0, -9]
  assert tf.train.latest_checkpoint(os.path.join(killed, "checkpoints")).endswith("ckpt-1")
  resumed = helpers.start_run(helpers.tiny_flags(tiny_data, killed, resume=True),
                               log_path=str(tmp_path / "resumed.log"))
  assert helpers.wait_all([resumed], TIMEOUT) == [0]

  # Every saved tensor is equal: weights, Adam moments, EMA, iterations, loss normalizer,
  # dropout / drop-path RNG states, epoch. Only the best metric differs (no evaluation).
  want = helpers.checkpoint_tensors(os.path.join(full, "checkpoints", "ckpt-3"))
  got = helpers.checkpoint_tensors(os.path.join(killed, "checkpoints", "ckpt-3"))
  assert set(want) == set(got)
  # model.variables are saved by path: 91 weights + 4 dropout / drop-path RNG states (class- and
  # instance-level ASL, the evaluator one conv; the default contrastive loss has no projection
  # layers); the task's loss normaliser as task_variables.
  assert len([k for k in want if k.startswith("model_weights/")]) == 95
  assert "model_weights/backbone.Sembd.S0.Skernel/.ATTRIBUTES/VARIABLE_VALUE" in want
  assert [k for k in want if k.startswith("task_variables/")] == [
      "task_variables/0/.ATTRIBUTES/VARIABLE_VALUE"]
  differing = [k for k in want if not np.array_equal(want[k], got[k])]
  assert differing == ["best_metric/.ATTRIBUTES/VARIABLE_VALUE"]
  assert int(want["epoch/.ATTRIBUTES/VARIABLE_VALUE"]) == 3
  with open(tmp_path / "resumed.log") as f:
    log = f.read()
  # What a person sees: the resumed run's first step traces, said before it starts; the ETA
  # starts after it; the run folder and the next commands close the output; no TensorFlow line.
  assert "starting at epoch 2" in log
  assert log.index("building the model") < log.index("tracing the training step") < log.index(
      "first step done in") < log.index("steps/s")
  assert f"run folder: {killed}" in log and f"--checkpoint={killed}" in log
  assert "cudart_stub" not in log and "port.cc" not in log and "Sharding callback" not in log
  # In a file, progress is plain lines (a terminal's progress bar wrote escape codes and one
  # ever-growing line into train.log).
  assert "\x1b[" not in log
  assert re.search(r"^epoch 3/3 step (\d+)/\1: cls_loss \d+\.\d{4} .*steps/s, epoch ETA 0 s$",
                   log, re.M)

  scalars, images = _scalars(os.path.join(full, "logs"))
  for tag in ("cls_loss", "reg_loss", "evaluator_loss", "contrastive_loss", "total_loss",
              "num_pos", "learning_rate", "videos_per_sec"):
    assert sorted(scalars[f"train/{tag}"]) == list(range(1, 25)), tag
  # Terms the defaults leave off are not logged (no curve of zeros, no "0.0000" in the log).
  assert "train/video_label_loss" not in scalars and "video_label_loss" not in log
  assert "contrastive_loss" in log
  assert scalars["train/learning_rate"][1] == 0.0  # warm-up starts at 0 (ActionFormer)
  assert scalars["train/learning_rate"][9] == pytest.approx(1e-3)
  assert 0.0 <= scalars["eval/average_mAP"][24] <= 1.0
  assert "eval/mAP@0.50" in scalars
  for name in ("mu", "sigma", "mu_reg_left", "sigma_reg_right"):
    assert sorted(scalars[f"sensitivity/{name}/class_2"]) == [8, 16, 24]
  assert images == {"sensitivity_curves/cls", "sensitivity_curves/loc_left",
                    "sensitivity_curves/loc_right"}
  assert glob.glob(os.path.join(full, "logs", "plugins", "profile", "*", "*.xplane.pb"))
  with open(os.path.join(full, "eval", "metrics.json")) as f:
    assert json.load(f)["average_mAP"] == pytest.approx(scalars["eval/average_mAP"][24])


def _free_ports(n):
  socks = [socket.socket() for _ in range(n)]
  try:
    for s in socks:
      s.bind(("127.0.0.1", 0))
    return [s.getsockname()[1] for s in socks]
  finally:
    for s in socks:
      s.close()


@pytest.mark.slow
def test_one_device_equals_two_cpu_replicas_equals_two_workers(tiny_data, tmp_path):
  # Keras' Adam form: PyTorch's (the default) adds a 32x smaller epsilon early on, so Adam's
  # step of a near-zero gradient follows that gradient's float32 noise (summed in another order
  # across replicas): under it one element of a 16-wide vector ended 2.6e-5 apart. The
  # strategies, not the form, are what this compares (the form: optimizer_test.py).
  common = {"dropout": 0.0, "droppath": 0.0, "epochs": 1, "warmup_epochs": 1,
            "adamw_form": "keras"}
  runs = {"one": ({"batch_size": 2}, {}),
          "mirrored": ({"batch_size": 1, "num_cpu_devices": 2}, {})}
  ports = _free_ports(2)
  cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
  for task in (0, 1):
    tf_config = {"cluster": cluster, "task": {"type": "worker", "index": task}}
    runs[f"worker{task}"] = ({"batch_size": 1}, {"TF_CONFIG": json.dumps(tf_config)})
  procs = []
  for name, (flags, env) in runs.items():
    out = str(tmp_path / ("multi" if name.startswith("worker") else name))
    env = dict(env, ASL_TEST_RESULT=str(tmp_path / f"{name}_result"))
    procs.append(helpers.start_run(helpers.tiny_flags(tiny_data, out, **common, **flags),
                                    env=env, log_path=str(tmp_path / f"{name}.log")))
  assert helpers.wait_all(procs, TIMEOUT) == [0, 0, 0, 0]

  info = {}
  weights = {}
  for name in runs:
    with open(tmp_path / f"{name}_result.json") as f:
      info[name] = json.load(f)
    with np.load(tmp_path / f"{name}_result.npz") as npz:
      weights[name] = [npz[k] for k in sorted(npz.files, key=lambda s: int(s.split("_")[1]))]
  assert [info[n]["replicas"] for n in runs] == [1, 2, 2, 2]
  assert info["worker0"]["chief"] and not info["worker1"]["chief"]
  assert not os.path.exists(info["worker1"]["scratch_dir"])
  # The workers end bit-identical; every run equals one device on the same global batch.
  for a, b in zip(weights["worker0"], weights["worker1"]):
    np.testing.assert_array_equal(a, b)
  for name in ("mirrored", "worker0"):
    for a, b in zip(weights["one"], weights[name]):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5)

  losses = {}
  for name in ("one", "mirrored", "multi"):
    scalars, _ = _scalars(os.path.join(tmp_path, name, "logs"))
    losses[name] = [scalars["train/total_loss"][s] for s in range(1, 17)]
    assert len(glob.glob(os.path.join(tmp_path, name, "logs", "events.*"))) == 1
  np.testing.assert_allclose(losses["mirrored"], losses["one"], rtol=1e-4)
  np.testing.assert_allclose(losses["multi"], losses["one"], rtol=1e-4)
  assert sorted(os.listdir(tmp_path / "multi")) == [".lock", "checkpoints", "class_names.json",
                                                    "config.json", "logs"]
  assert tf.train.latest_checkpoint(str(tmp_path / "multi" / "checkpoints")).endswith("ckpt-2")
