"""python -m asl_tf.export: a tiny training run's checkpoint -> TF Serving versions."""

import dataclasses
import json
import os
import subprocess
import sys

from absl import flags
import keras
import numpy as np
import pytest
import tensorflow as tf

from asl_tf import config as config_lib
from asl_tf import export as export_main
from asl_tf import flags as asl_flags
from asl_tf import inference
from asl_tf.data import timebase as timebase_lib
from asl_tf.serving import module
from asl_tf.training import checkpoints as ckpt_lib
from asl_tf.training import optimizer as optimizer_lib
from asl_tf.training import task as task_lib

C = 8
CLASS_NAMES = ["walk", "run", "jump"]


def _write_annotations(path):
  database = {
      f"video_{i}": {"subset": "validation" if i % 2 else "training", "duration": 20.0,
                     "fps": 30.0, "annotations": [
                         {"label": name, "label_id": k, "segment": [1.0 + k, 4.0 + k]}
                         for k, name in enumerate(CLASS_NAMES)]}
      for i in range(2)}
  with open(path, "w") as f:
    json.dump({"database": database}, f)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  """A run folder as training leaves it: config.json and checkpoints/ckpt-1 after two AdamW
  steps with EMA (so the EMA differs from the raw weights). `<run>_positional` and `<run>_legacy`
  hold the same state in the layouts written before the weights were keyed by path."""
  run = str(tmp_path_factory.mktemp("run"))
  annotation_file = os.path.join(run, "annotations.json")
  _write_annotations(annotation_file)
  model = config_lib.ModelConfig(
      input_dim=C, num_classes=3, max_seq_len=32, backbone_arch=(1, 1, 1), embd_dim=16,
      fpn_dim=16, head_dim=16, n_head=2, mha_win_size=(5,), regression_range=((0, 4), (4, 1e4)))
  config = config_lib.validate(config_lib.Config(
      data=config_lib.DataConfig(annotation_file=annotation_file, input_dim=C, num_classes=3,
                                 max_seq_len=32, feat_stride=4, num_frames=16),
      model=model,
      train=config_lib.TrainConfig(output_dir=run, warmup_epochs=0, learning_rate=0.05,
                                   ema_decay=0.5),
      eval=config_lib.EvalConfig(max_seg_num=30)))
  keras.utils.set_random_seed(0)
  detector = inference.build_detector(config)
  optimizer = optimizer_lib.build_optimizer(detector, config.train, config.model,
                                            steps_per_epoch=1)
  optimizer.build(detector.trainable_variables)
  for _ in range(2):  # Keras' EMA equals the weights after the first step.
    optimizer.apply([tf.ones_like(v) for v in detector.trainable_variables],
                    detector.trainable_variables)
  counters = ckpt_lib.counters()
  task = task_lib.DetectionTask(config.model, config.loss)
  ckpt_lib.RunCheckpointer(run, 1, model=detector, optimizer=optimizer,
                           task_variables=task.state_variables,
                           ema_variables=optimizer_lib.ema_variables(optimizer), **counters).save(1)
  config.save(os.path.join(run, ckpt_lib.CONFIG_FILE))
  # The two earlier layouts, by position: `_positional` with the EMA and the task's state as
  # their own objects, `_legacy` with the EMA only in the optimizer's state.
  for suffix, objects in (
      ("_positional", dict(model_variables=list(detector.variables),
                           ema_variables=optimizer_lib.ema_variables(optimizer),
                           task_variables=task.state_variables)),
      ("_legacy", dict(model=detector, model_variables=list(detector.variables)))):
    old = tf.train.Checkpoint(optimizer=optimizer, **objects, **counters)
    tf.train.CheckpointManager(old, os.path.join(run + suffix, ckpt_lib.CHECKPOINT_DIR), 1,
                               checkpoint_name="ckpt").save(checkpoint_number=1)
    config.save(os.path.join(run + suffix, ckpt_lib.CONFIG_FILE))
  return run


@pytest.fixture
def parsed_flags():
  """Parses argv into the global FLAGS for one test, then resets them."""
  flags.FLAGS.unparse_flags()
  yield lambda *args: asl_flags.parse_argv(["asl_tf.export", *args])
  flags.FLAGS.unparse_flags()


def _raw_scores(model, features, lengths):
  mask = np.arange(features.shape[1])[None] < lengths[:, None]
  return tf.sigmoid(model(features, mask)["cls_logits"]).numpy()


def test_export_writes_the_ema_weights_and_class_names(run_dir, tmp_path, parsed_flags, capsys):
  export_dir = str(tmp_path / "models" / "asl")
  parsed_flags(f"--checkpoint={run_dir}", f"--export_dir={export_dir}")
  export_main.main([])
  path = os.path.join(export_dir, "1")
  out = capsys.readouterr().out
  assert f"exported {path}" in out
  assert f"saved_model_cli run --dir {path} --tag_set serve" in out
  with open(os.path.join(path, "assets", "class_names.txt")) as f:
    assert f.read().split() == CLASS_NAMES

  features = np.random.default_rng(0).normal(size=(1, 32, C)).astype(np.float32)
  lengths = np.array([29], np.int32)
  loaded = tf.saved_model.load(path)
  served = loaded.signatures["raw_scores"](features=tf.constant(features),
                                           lengths=tf.constant(lengths))["cls_scores"].numpy()
  ema_model, _ = inference.load_model(run_dir, use_ema=True)
  raw_model, _ = inference.load_model(run_dir, use_ema=False)
  ema, raw = _raw_scores(ema_model, features, lengths), _raw_scores(raw_model, features, lengths)
  assert np.abs(ema - raw).max() > 1e-3  # the two weight sets give different scores
  np.testing.assert_allclose(served, ema, atol=1e-6)


def test_a_bfloat16_export_detects_what_float32_does_within_bfloat16_rounding(
    run_dir, tmp_path, parsed_flags):
  """`--inference_precision=mixed_bfloat16`: the SavedModel computes its layers in bfloat16 (8
  significant bits) and keeps float32 inputs, scores and post-processing. Stated tolerance:
  class scores within 0.02 of float32's; float32's top detections are among bfloat16's with the
  same labels, scores within 0.02 and boundaries within 0.1 s (under 1 feature step here)."""
  # The fixture's model scores every frame near the prior (0.01) and regresses near-empty
  # segments: no detection survives. Its output biases at 0 (classes) and 2 (offsets) give
  # scores between 0.1 and 0.5 and segments that follow the features.
  float32_model, config = inference.load_model(run_dir, use_ema=True)
  weights = ckpt_lib.variable_paths(float32_model)
  weights["cls_head/output_conv/bias"].assign(tf.zeros([3]))
  weights["reg_head/output_conv/bias"].assign(tf.fill([2], 2.0))
  run = str(tmp_path / "run")
  ckpt_lib.RunCheckpointer(run, 1, model=float32_model).save(1)
  config.save(os.path.join(run, ckpt_lib.CONFIG_FILE))
  export_dir = str(tmp_path / "asl")
  parsed_flags(f"--checkpoint={run}", f"--export_dir={export_dir}",
               "--inference_precision=mixed_bfloat16")
  export_main.main([])
  loaded = tf.saved_model.load(os.path.join(export_dir, "1"))
  with open(os.path.join(export_dir, "1", "assets", "model_info.json")) as f:
    assert json.load(f)["config"]["eval"]["inference_precision"] == "mixed_bfloat16"
  features = np.random.default_rng(1).normal(size=(2, 32, C)).astype(np.float32)
  lengths = np.array([32, 27], np.int32)
  inputs = dict(features=tf.constant(features), lengths=tf.constant(lengths))
  served = loaded.signatures["raw_scores"](**inputs)["cls_scores"].numpy()
  want = _raw_scores(float32_model, features, lengths)
  assert served.dtype == np.float32 and want.min() < 0.2
  difference = np.abs(served - want).max()
  assert 0 < difference < 0.02  # bfloat16 did run, and rounded little

  got = loaded.signatures["serving_default"](**inputs)
  timebase = module.read_timebase(os.path.join(export_dir, "1"))
  fps, stride, frames = (np.full([2], timebase[k], np.float32)
                         for k in ("fps", "feat_stride", "num_frames"))
  duration = timebase_lib.duration_sec(lengths.astype(np.float32), fps, stride, frames)
  want = float32_model.detect(features, np.arange(32)[None] < lengths[:, None], fps, duration,
                              stride, frames)
  # Near-tied scores may swap ranks between the precisions: each of float32's top 8 detections
  # must be among bfloat16's top 16, same label, within the tolerance.
  for v in range(2):
    assert int(got["num_detections"][v]) > 8
    candidates = list(zip(got["labels"][v, :16].numpy(), got["segments_sec"][v, :16].numpy(),
                          got["scores"][v, :16].numpy()))
    for label, segment, score in zip(want["labels"][v, :8], want["segments_sec"][v, :8],
                                     want["scores"][v, :8]):
      assert any(l == label and np.abs(seg - segment).max() < 0.1 and abs(sc - score) < 0.02
                 for l, seg, sc in candidates), (v, label, segment, score)


def test_the_ema_loads_without_an_optimizer_and_equals_the_one_read_from_older_checkpoints(
    run_dir, monkeypatch):
  legacy, _ = inference.load_model(run_dir + "_legacy", use_ema=True)  # via the optimizer
  legacy_raw, _ = inference.load_model(run_dir + "_legacy", use_ema=False)
  names = {n for n, _ in tf.train.list_variables(os.path.join(run_dir, "checkpoints", "ckpt-1"))}
  assert "ema_weights/backbone.Sembd.S0.Skernel/.ATTRIBUTES/VARIABLE_VALUE" in names
  assert not any(n.startswith(("model_variables/", "ema_variables/")) for n in names)

  def no_optimizer(*args, **kwargs):
    raise AssertionError("inference built an optimizer to reach the EMA")

  monkeypatch.setattr(optimizer_lib, "build_optimizer", no_optimizer)
  ema, _ = inference.load_model(run_dir, use_ema=True)
  raw, _ = inference.load_model(run_dir, use_ema=False)
  positional, _ = inference.load_model(run_dir + "_positional", use_ema=True)
  positional_raw, _ = inference.load_model(run_dir + "_positional", use_ema=False)
  for old, old_raw in ((legacy, legacy_raw), (positional, positional_raw)):
    for a, b in zip(ema.get_weights(), old.get_weights()):
      np.testing.assert_array_equal(a, b)
    for a, b in zip(raw.get_weights(), old_raw.get_weights()):
      np.testing.assert_array_equal(a, b)
  assert max(np.abs(a - b).max() for a, b in zip(ema.get_weights(), raw.get_weights())) > 1e-3


def test_a_checkpoint_saved_before_any_step_loads_its_raw_weights_not_the_empty_ema(
    run_dir, tmp_path):
  """Keras' EMA slots are zeros until the first optimizer step."""
  config = config_lib.Config.load(os.path.join(run_dir, ckpt_lib.CONFIG_FILE))
  detector = inference.build_detector(config)
  optimizer = optimizer_lib.build_optimizer(detector, config.train, config.model,
                                            steps_per_epoch=1)
  optimizer.build(detector.trainable_variables)
  run = str(tmp_path / "unstepped")
  ckpt_lib.RunCheckpointer(run, 1, model=detector, optimizer=optimizer,
                           ema_variables=optimizer_lib.ema_variables(optimizer),
                           **ckpt_lib.counters()).save(1)
  config.save(os.path.join(run, ckpt_lib.CONFIG_FILE))
  loaded, _ = inference.load_model(run, use_ema=True)
  for a, b in zip(loaded.get_weights(), detector.get_weights()):
    np.testing.assert_array_equal(a, b)
  assert any(np.abs(w).max() > 0 for w in loaded.get_weights())


@pytest.mark.slow  # two more exports: ~50 s on 2 cores
def test_exports_take_the_next_free_version(run_dir, tmp_path, parsed_flags):
  export_dir = str(tmp_path / "asl")
  assert export_main.export_checkpoint(run_dir, export_dir) == os.path.join(export_dir, "1")
  parsed_flags(f"--checkpoint={run_dir}/checkpoints/ckpt-1", f"--export_dir={export_dir}")
  export_main.main([])
  assert sorted(os.listdir(export_dir)) == ["1", "2"]
  parsed_flags(f"--checkpoint={run_dir}", f"--export_dir={export_dir}", "--version=2")
  with pytest.raises(SystemExit, match=r"^asl_tf.export: .*/2 exists already"):
    export_main.main([])


def test_an_export_dir_that_is_a_file_is_one_line(run_dir, tmp_path, parsed_flags):
  """A FileExistsError traceback from os.makedirs before."""
  taken = tmp_path / "det.json"
  taken.write_text("{}")
  parsed_flags(f"--checkpoint={run_dir}", f"--export_dir={taken}")
  with pytest.raises(SystemExit, match=r"^asl_tf.export: --export_dir=.*det.json is a file; "
                                       "name the model's folder"):
    export_main.main([])
  assert taken.read_text() == "{}"


def test_flags_contradicting_the_checkpoint_are_one_clear_error(run_dir, tmp_path,
                                                                parsed_flags):
  args = [f"--input_dim={C}", "--num_classes=3", "--max_seq_len=32", "--backbone_arch=1,1,1",
          "--embd_dim=16", "--fpn_dim=16", "--head_dim=16", "--n_head=2", "--mha_win_size=5",
          "--regression_range=0,4,4,10000"]
  parsed_flags(f"--checkpoint={run_dir}", f"--export_dir={tmp_path}", *args, "--embd_dim=32",
               "--fpn_dim=32", "--head_dim=32")
  with pytest.raises(SystemExit) as exit_info:
    export_main.main([])
  message = str(exit_info.value.code)
  assert message.startswith("asl_tf.export: these flags cannot apply to a trained checkpoint")
  assert "--embd_dim=32 (would change the trained model; the checkpoint was trained with 16)" \
      in message
  assert "--n_head" not in message  # only the fields that differ
  assert not os.listdir(tmp_path)


def test_an_export_flag_alone_keeps_the_runs_timebase(run_dir, tmp_path, parsed_flags):
  """--max_frames without a flagfile applies on top of config.json; it used to switch the whole
  config to the flag defaults (feat_stride 16 instead of the run's 4: segments 4x too long)."""
  export_dir = str(tmp_path / "asl")
  parsed_flags(f"--checkpoint={run_dir}", f"--export_dir={export_dir}", "--max_frames=100")
  export_main.main([])
  with open(os.path.join(export_dir, "1", "assets", "timebase.json")) as f:
    timebase = json.load(f)
  assert timebase["max_frames"] == 100 and timebase["feat_stride"] == 4.0


def test_missing_checkpoint_is_one_line_without_traceback(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "asl_tf.export", f"--checkpoint={tmp_path}/nope",
       f"--export_dir={tmp_path}/models"], capture_output=True, text=True, timeout=120,
      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
  assert result.returncode == 1
  assert "Traceback" not in result.stderr
  last = result.stderr.strip().splitlines()[-1]
  assert last == (f"asl_tf.export: --checkpoint={tmp_path}/nope is neither a checkpoint prefix "
                  f"(no {tmp_path}/nope.index) nor a folder")
  assert not os.path.exists(tmp_path / "models")


def test_kernel_policy_may_differ_from_the_checkpoints(run_dir, parsed_flags):
  """`--kernel_policy` changes how, not what, the model computes: evaluate / infer / export take
  another one than training used (no "would change the trained model" error) and the scores
  agree."""
  saved = config_lib.Config.load(os.path.join(run_dir, ckpt_lib.CONFIG_FILE))
  assert saved.model.kernel_policy == "auto"
  parsed_flags(f"--checkpoint={run_dir}", "--kernel_policy=reference")
  assert asl_flags.overlay_command_line(saved).model.kernel_policy == "reference"
  scores = {}
  for policy in ("reference", "fast"):
    config = dataclasses.replace(saved, model=dataclasses.replace(saved.model,
                                                                  kernel_policy=policy))
    model, resolved = inference.load_model(run_dir, config)
    assert resolved.model.kernel_policy == policy == model.model_config.kernel_policy
    features = np.random.default_rng(4).normal(size=(2, 24, C)).astype(np.float32)
    scores[policy] = _raw_scores(model, features, np.array([24, 13]))
  np.testing.assert_allclose(scores["fast"], scores["reference"], rtol=1e-5, atol=1e-6)
  portable = model.with_kernel_policy("portable")  # what the export traces
  assert portable.name == model.name and portable.dtype_policy.name == model.dtype_policy.name
  assert ([v.path for v in portable.trainable_variables]
          == [v.path for v in model.trainable_variables])
  np.testing.assert_allclose(_raw_scores(portable, features, np.array([24, 13])),
                             scores["fast"], rtol=1e-5, atol=1e-6)


def test_tools_without_flagfile_apply_command_line_flags_to_the_runs_config(run_dir,
                                                                             parsed_flags):
  """`checkpoint_tool_config` (evaluate, infer, export, visualize): without --flagfile the run's
  config.json with the given flags on top. visualize used to drop them (its --eval_subset and
  evaluation flags were ignored without a flagfile)."""
  parsed_flags(f"--checkpoint={run_dir}", "--eval_subset=training", "--max_seg_num=7")
  config = asl_flags.checkpoint_tool_config(run_dir, asl_flags.build_config(check=False))
  saved = config_lib.Config.load(os.path.join(run_dir, ckpt_lib.CONFIG_FILE))
  assert config.data.eval_subset == "training" and config.eval.max_seg_num == 7
  assert config.data.feat_stride == saved.data.feat_stride == 4  # not the flag default 16
  assert config.model == saved.model
