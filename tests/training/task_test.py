"""DetectionTask: its train step is exact under MirroredStrategy, a tiny model overfits, and the
EMA loss normaliser."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf

from asl_tf import config as config_lib
from asl_tf.modeling import detector as detector_lib
from asl_tf.training import optimizer as optimizer_lib
from asl_tf.training import task as task_lib

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.slow
@pytest.mark.parametrize("contrastive_sampling", ["windows", "sensitivity_topk"])
def test_two_replica_steps_equal_one_device_steps_with_every_asl_option(contrastive_sampling):
  """Global batch of 4 on 1 device vs 2 logical CPUs x 2: same weights and EMA after 3 steps,
  the replicas with FusedAdamW, the single device with the reference policy's PyTorchAdamW;
  every ASL option and the
  loss options that are off by default (evaluator on every GT point, label-involved loss) on.

  Covers the all-reduced positive count and normalizer, the contrastive loss over gathered
  features (the default windows and the top-k sampling), clipping of the summed gradient (a clip
  norm of 1e-3 always clips, so per-replica clipping would give different weights), and
  FusedAdamW's once-per-apply scalars and EMA under
  the strategy against the unfused optimizer.
  """
  proc = subprocess.run([sys.executable, os.path.join(HERE, "distributed_step_script.py"),
                         "1e-3", "0", "3", "keras", contrastive_sampling],
                        capture_output=True, text=True,
                        timeout=600, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert result["replicas"] == 2
  assert (result["single_optimizer"], result["mirrored_optimizer"]) == ("PyTorchAdamW",
                                                                        "FusedAdamW")
  assert result["weights_moved"] > 2e-4  # 3 steps did something (Adam: ~lr per weight each)
  assert result["max_abs_diff"] < 1e-6  # measured 6e-8
  # EMA decay 0.5: the average trails the weights by about a step (~lr); equal on both sides.
  assert result["ema_lag"] > 1e-5
  assert result["max_abs_diff_ema"] < 1e-6
  for key in ("cls_loss", "reg_loss", "evaluator_loss", "contrastive_loss", "video_label_loss",
              "total_loss", "num_pos"):
    np.testing.assert_allclose(result["logs_2"][key], result["logs_1"][key], rtol=1e-5)
  assert result["logs_1"]["contrastive_loss"] > 0 and result["logs_1"]["video_label_loss"] > 0
  # The task's normaliser folded the global positive count in on both (not this replica's).
  assert result["normalizer_2"] == pytest.approx(result["normalizer_1"], rel=1e-6)
  # The same batch each step: n_3 = 0.9^3 100 + (1 - 0.9^3) num_pos.
  assert result["normalizer_1"] == pytest.approx(
      0.729 * 100 + 0.271 * result["logs_1"]["num_pos"])


def _tiny_config(**asl):
  return config_lib.ModelConfig(
      input_dim=8, num_classes=2, max_seq_len=32, embd_dim=16, fpn_dim=16, head_dim=16,
      backbone_arch=(1, 1, 1), regression_range=((0, 4), (4, 10000)), mha_win_size=(5,),
      droppath=0.0, contrastive_proj_dim=8, **asl)


def _overfit_batch():
  rng = np.random.default_rng(3)
  features = rng.normal(size=(2, 32, 8)).astype(np.float32) * 0.1
  segments = np.array([[[4, 12], [18, 26]], [[2, 9], [20, 30]]], np.float32)
  labels = np.array([[0, 1], [1, 0]], np.int32)
  for b in range(2):
    for (s, e), k in zip(segments[b], labels[b]):
      features[b, int(s):int(e), k] += 1.0  # class k lights up channel k inside its action
  return {"features": features, "padding_mask": np.ones((2, 32), np.float32),
          "gt_segments": segments, "gt_labels": labels}


# (model switches, loss switches). `all_asl` trains the evaluator with MSE, whose minimum is 0
# whatever the targets, so its loss must fall; under BCE (the default) the minimum is the
# targets' entropy, which grows as the detector's confidence (a target) leaves the prior.
ASL_VARIANTS = {
    "actionformer": (dict(class_sensitivity=False, instance_sensitivity=False,
                          contrastive_weight=0.0), {}),
    "all_asl": (dict(class_sensitivity=True, instance_sensitivity=True, contrastive_weight=0.1),
                dict(evaluator_loss="mse")),
    "default": ({}, {}),
}


@pytest.mark.parametrize("variant", sorted(ASL_VARIANTS))
def test_tiny_model_overfits(variant):
  tf.keras.utils.set_random_seed(0)
  model_switches, loss_switches = ASL_VARIANTS[variant]
  model_config = _tiny_config(**model_switches)
  train_config = config_lib.TrainConfig(learning_rate=5e-3, warmup_epochs=0, epochs=1,
                                        weight_decay=0.0, ema_decay=0.0)
  model = detector_lib.ASLDetector(model_config)
  model.build_for_training()
  task = task_lib.DetectionTask(model_config, config_lib.LossConfig(**loss_switches),
                                clip_grad_norm=1.0)
  optimizer = optimizer_lib.build_optimizer(model, train_config, model_config, 1000)
  batch = _overfit_batch()
  step = tf.function(lambda b, e: task.train_step(model, optimizer, b, e))
  epoch = tf.constant(0, tf.int64)
  first = step(batch, epoch)
  for _ in range(150):
    last = step(batch, epoch)
  base = float(first["cls_loss"] + first["reg_loss"])
  end = float(last["cls_loss"] + last["reg_loss"])
  assert end < base / 10, (variant, base, end)
  if variant == "all_asl":
    assert float(last["evaluator_loss"]) < float(first["evaluator_loss"])
  if variant != "actionformer":
    assert 0 < float(last["evaluator_loss"]) < float("inf")
  # The class-level Gaussians exist only where that part is on (off in the defaults).
  assert len(model.sensitivity_parameters().get("sigma", ())) == (2 if variant == "all_asl" else 0)


def test_detector_config_round_trips_and_reads_configs_of_the_detector_that_trained():
  model = detector_lib.ASLDetector(_tiny_config(class_sensitivity=True),
                                   eval_config=config_lib.EvalConfig(max_seg_num=7))
  again = detector_lib.ASLDetector.from_config(model.get_config())
  assert again.model_config == model.model_config
  assert again.eval_config.max_seg_num == 7
  old = dict(model.get_config(), loss_config={"label_smoothing": 0.1}, clip_grad_norm=0.5)
  assert detector_lib.ASLDetector.from_config(old).model_config == model.model_config


def test_the_detector_holds_no_training_state():
  """Losses, normaliser and steps live in the task: the model's variables are its weights (and
  dropout seed states) only."""
  model = detector_lib.ASLDetector(_tiny_config(class_sensitivity=True, instance_sensitivity=True))
  model.build_for_training()
  assert not any("normalizer" in v.path for v in model.variables)
  assert all(v.trainable or "seed_generator" in v.path for v in model.variables)
  task = task_lib.DetectionTask(model.model_config)
  assert [v.path for v in task.state_variables] == ["loss_normalizer/normalizer"]


def test_asl_off_has_no_sensitivity_layer_and_matches_plain_losses():
  model = detector_lib.ASLDetector(_tiny_config(**ASL_VARIANTS["actionformer"][0]))
  model.build_for_training()
  assert model.sensitivity is None
  assert model.sensitivity_parameters() == {}
  logs = task_lib.DetectionTask(model.model_config).validation_step(model, _overfit_batch())
  assert sorted(logs) == ["cls_loss", "num_pos", "reg_loss", "total_loss"]  # no term that is off
  np.testing.assert_allclose(float(logs["total_loss"]),
                             float(logs["cls_loss"]) + float(logs["reg_loss"]), rtol=1e-6)


@pytest.mark.parametrize("feature_gradient", [False, True])
def test_evaluator_loss_reaches_the_backbone_only_with_feature_gradient(feature_gradient):
  """The evaluator's loss trains the evaluator either way; the embedding convolution below the
  neck only with `evaluator_feature_gradient`."""
  model = detector_lib.ASLDetector(_tiny_config(class_sensitivity=False, instance_sensitivity=True,
                                                evaluator_feature_gradient=feature_gradient))
  model.build_for_training()
  task = task_lib.DetectionTask(model.model_config)
  with tf.GradientTape() as tape:
    logs, _ = task.losses(model, _overfit_batch())
  evaluator_weights = model.sensitivity.instance_level.trainable_weights
  embedding = [w for w in model.trainable_weights if "embd_0" in w.path]
  assert embedding
  grads = tape.gradient(logs["evaluator_loss"], evaluator_weights + embedding)
  assert all(g is not None and np.abs(g.numpy()).max() > 0 for g in grads[:len(evaluator_weights)])
  reached = [g is not None and np.abs(g.numpy()).max() > 0 for g in grads[len(evaluator_weights):]]
  assert all(reached) if feature_gradient else not any(reached)


def test_evaluator_inside_gt_learns_from_the_whole_segment_assignment():
  """With `evaluator_points=inside_gt` the evaluator's loss is the one it has when every point
  inside a GT is a positive (centre radius 0; the batch's GTs do not overlap, so a positive's GT
  is the same in both assignments), while the detector's own losses stay those of centre
  sampling; the normaliser is read, not updated, so the sums compare directly."""
  model = detector_lib.ASLDetector(_tiny_config(instance_sensitivity=True))
  model.build_for_training()
  batch = _overfit_batch()

  def logs(**loss):
    return task_lib.DetectionTask(model.model_config, config_lib.LossConfig(**loss)
                                  ).validation_step(model, batch)

  centre = logs()
  inside = logs(evaluator_points="inside_gt")
  whole = logs(center_sample_radius=0.0)
  assert float(whole["num_pos"]) > float(centre["num_pos"])  # the case tells them apart
  np.testing.assert_allclose(float(inside["evaluator_loss"]), float(whole["evaluator_loss"]),
                             rtol=1e-6)
  assert float(inside["evaluator_loss"]) > float(centre["evaluator_loss"])
  for key in ("cls_loss", "reg_loss", "num_pos"):
    np.testing.assert_allclose(float(inside[key]), float(centre[key]), rtol=1e-6)


def test_loss_normalizer_ema():
  """100 -> 0.9 * 100 + 0.1 * 27 = 92.7 -> (no positive: max(0, 1)) 0.9 * 92.7 + 0.1 = 83.53."""
  norm = task_lib.LossNormalizer(100.0, 0.9)
  assert not norm.trainable_weights
  np.testing.assert_allclose(float(norm.update(27)), 92.7, rtol=1e-6)
  np.testing.assert_allclose(float(norm.update(0)), 83.53, rtol=1e-6)
  np.testing.assert_allclose(float(norm.normalizer.numpy()), 83.53, rtol=1e-6)
  clone = task_lib.LossNormalizer.from_config(norm.get_config())
  assert (clone.initial_value, clone.momentum) == (100.0, 0.9)


_DISTRIBUTED_SCRIPT = textwrap.dedent("""
    import numpy as np, tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    from asl_tf.training import task as task_lib
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
      norm = task_lib.LossNormalizer(100.0, 0.9)

    @tf.function
    def step():
      def replica_fn():
        ctx = tf.distribute.get_replica_context()
        local = tf.cast(10 + 7 * ctx.replica_id_in_sync_group, tf.float32)  # 10 and 17
        return norm.update(ctx.all_reduce("sum", local))
      return strategy.run(replica_fn)

    values = strategy.experimental_local_results(step())
    print("RESULT", *[float(v) for v in values], float(norm.normalizer.numpy()))
""")


def test_loss_normalizer_under_mirrored_strategy():
  """Two replicas with 10 and 17 positives: both see 0.9 * 100 + 0.1 * 27 = 92.7, stored once."""
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
  proc = subprocess.run([sys.executable, "-c", _DISTRIBUTED_SCRIPT], capture_output=True,
                        text=True, env=env, timeout=120, check=False)
  lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT")]
  assert lines, proc.stderr[-2000:]
  replica_0, replica_1, stored = (float(v) for v in lines[0].split()[1:])
  np.testing.assert_allclose([replica_0, replica_1, stored], [92.7] * 3, rtol=1e-6)
