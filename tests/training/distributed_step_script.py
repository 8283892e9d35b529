"""Run by task_test.py in a fresh process: train steps on 1 device vs 2 replicas.

  distributed_step_script.py CLIP_NORM SEED STEPS SINGLE_OPTIMIZER [CONTRASTIVE_SAMPLING]

SINGLE_OPTIMIZER `fused` gives the single device the optimizer the policy chooses (FusedAdamW,
as the replicas get), `keras` gives it the `reference` policy's unfused form (PyTorchAdamW under
the default --adamw_form; the same updates up to rounding).
Prints JSON {"max_abs_diff", "max_abs_diff_ema", "weights_moved", "ema_lag", "replicas",
"normalizer_1", "normalizer_2", "logs_1", "logs_2"} (logs of the last step). TensorFlow must not be
initialized before the logical CPUs are configured, hence the subprocess.
"""

import dataclasses
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top
import tensorflow as tf  # pylint: disable=g-import-not-at-top

from asl_tf import config as config_lib  # pylint: disable=g-import-not-at-top
from asl_tf.modeling import detector as detector_lib  # pylint: disable=g-import-not-at-top
from asl_tf.training import optimizer as optimizer_lib  # pylint: disable=g-import-not-at-top
from asl_tf.training import strategy as strategy_lib  # pylint: disable=g-import-not-at-top
from asl_tf.training import task as task_lib  # pylint: disable=g-import-not-at-top


def make_batch(seq_len, channels):
  rng = np.random.default_rng(7)
  lengths = [seq_len, seq_len - 30, seq_len - 5, seq_len - 20]
  mask = np.stack([np.arange(seq_len) < n for n in lengths]).astype(np.float32)
  features = rng.normal(size=(4, seq_len, channels)).astype(np.float32) * mask[..., None]
  segments = np.array([[[3, 20], [30, 50], [0, 0]], [[5, 12], [14, 30], [2, 9]],
                       [[20, 40], [0, 0], [0, 0]], [[10, 30], [12, 28], [33, 40]]], np.float32)
  labels = np.array([[0, 1, -1], [2, 2, 0], [1, -1, -1], [0, 1, 2]], np.int32)
  return {"features": features, "padding_mask": mask, "gt_segments": segments,
          "gt_labels": labels}


def build(strategy, model_config, train_config, contrastive_sampling, weights=None,
          optimizer_config=None):
  with strategy.scope():
    model = detector_lib.ASLDetector(model_config)
    model.build_for_training()
    if weights is not None:
      model.set_weights(weights)
    # The loss options that are off by default, on.
    loss_config = config_lib.LossConfig(evaluator_points="inside_gt", video_label_loss_weight=0.2,
                                        contrastive_sampling=contrastive_sampling)
    task = task_lib.DetectionTask(model_config, loss_config,
                                  clip_grad_norm=train_config.clip_grad_norm)
    optimizer = optimizer_lib.build_optimizer(model, train_config,
                                              optimizer_config or model_config, 10)
    optimizer.build(model.trainable_variables)
  return model, task, optimizer


def main():
  clip, seed, steps, single_form = float(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), \
      sys.argv[4]
  sampling = sys.argv[5] if len(sys.argv) > 5 else config_lib.LossConfig().contrastive_sampling
  strategy_lib.configure_devices(2)
  model_config = config_lib.ModelConfig(
      input_dim=16, num_classes=3, max_seq_len=64, embd_dim=16, fpn_dim=16, head_dim=16,
      backbone_arch=(1, 1, 2), regression_range=((0, 4), (4, 8), (8, 10000)),
      mha_win_size=(5,), droppath=0.0, contrastive_proj_dim=8, contrastive_weight=0.1,
      class_sensitivity=True, kernel_policy="portable")  # every ASL part on
  # EMA decay 0.5: every step's update shows in the average.
  train_config = config_lib.TrainConfig(learning_rate=1e-4, warmup_epochs=0, epochs=2,
                                        clip_grad_norm=clip, ema_decay=0.5)
  batch = make_batch(64, 16)
  keras.utils.set_random_seed(seed)
  # The reference policy picks the unfused PyTorchAdamW; the model's own policy stays `auto`.
  keras_adamw = dataclasses.replace(model_config, kernel_policy="reference")
  single, single_task, single_optimizer = build(
      tf.distribute.get_strategy(), model_config, train_config, sampling,
      optimizer_config=keras_adamw if single_form == "keras" else None)
  initial = [v.numpy() for v in single.trainable_variables]
  mirrored_strategy = tf.distribute.MirroredStrategy(
      [d.name for d in tf.config.list_logical_devices("CPU")])
  mirrored, mirrored_task, mirrored_optimizer = build(mirrored_strategy, model_config,
                                                      train_config, sampling,
                                                      single.get_weights())

  epoch = tf.constant(0, tf.int64)
  single_step = tf.function(lambda b: single_task.train_step(single, single_optimizer, b, epoch))
  for _ in range(steps):
    logs_1 = single_step(batch)

  dataset = tf.data.Dataset.from_tensors(batch).unbatch().batch(4)
  dist_batch = next(iter(mirrored_strategy.experimental_distribute_dataset(dataset)))

  @tf.function
  def step(b):
    per_replica = mirrored_strategy.run(
        lambda x: mirrored_task.train_step(mirrored, mirrored_optimizer, x, epoch), args=(b,))
    return {k: mirrored_strategy.reduce("sum", v, axis=None) for k, v in per_replica.items()}

  for _ in range(steps):
    logs_2 = step(dist_batch)
  diffs = [float(np.max(np.abs(a - b)))
           for a, b in zip(single.get_weights(), mirrored.get_weights())]
  ema_diffs = [float(np.max(np.abs(a.numpy() - b.numpy()))) for a, b in zip(
      optimizer_lib.ema_variables(single_optimizer),
      optimizer_lib.ema_variables(mirrored_optimizer), strict=True)]
  final = [v.numpy() for v in single.trainable_variables]
  ema_lag = max(float(np.max(np.abs(a.numpy() - w))) for a, w in zip(
      optimizer_lib.ema_variables(single_optimizer), final, strict=True))
  moved = max(float(np.max(np.abs(v.numpy() - w)))
              for v, w in zip(single.trainable_variables, initial))
  print(json.dumps({
      "max_abs_diff": max(diffs),
      "max_abs_diff_ema": max(ema_diffs),
      "ema_lag": ema_lag,
      "single_optimizer": type(single_optimizer).__name__,
      "mirrored_optimizer": type(mirrored_optimizer).__name__,
      "weights_moved": moved,
      "replicas": mirrored_strategy.num_replicas_in_sync,
      "normalizer_1": float(single_task.loss_normalizer.normalizer.numpy()),
      "normalizer_2": float(mirrored_task.loss_normalizer.normalizer.numpy()),
      "logs_1": {k: float(v) for k, v in logs_1.items()},
      "logs_2": {k: float(v) for k, v in logs_2.items()},
  }))


if __name__ == "__main__":
  main()
