"""The training task of an ASLDetector: what the model is trained to do and how one step runs.

The detector does the forward pass (`call`) and post-processing (`detect`); this task owns the
rest of a step: targets -> ASL weights -> loss terms -> the EMA loss normaliser, and the
distributed train / validation steps (gradient all-reduce and clipping).
"""

from typing import Dict, Optional, Tuple

import keras
import tensorflow as tf

from asl_tf import config as config_lib
from asl_tf import losses as losses_lib
from asl_tf import targets as targets_lib

LOSS_LOG_KEYS = ("cls_loss", "reg_loss", "evaluator_loss", "contrastive_loss", "video_label_loss",
                 "total_loss")


def active_loss_keys(model_config: config_lib.ModelConfig,
                     loss_config: config_lib.LossConfig) -> Tuple[str, ...]:
  """The LOSS_LOG_KEYS this configuration trains (a term that is off is not logged)."""
  off = set()
  if not model_config.instance_sensitivity:
    off.add("evaluator_loss")
  if model_config.contrastive_weight <= 0:
    off.add("contrastive_loss")
  if loss_config.video_label_loss_weight <= 0:
    off.add("video_label_loss")
  return tuple(k for k in LOSS_LOG_KEYS if k not in off)


@keras.saving.register_keras_serializable(package="asl_tf")
class LossNormalizer(keras.layers.Layer):
  """ActionFormer's EMA of the positive count: n <- m n + (1 - m) max(num_pos, 1).

  The state is a non-trainable float32 variable (saved with checkpoints). It is updated before
  use, every step. Under tf.distribute, pass the all-reduced (global) positive count: every
  replica then computes the same value, and the variable (aggregation `only_first_replica`) is
  written once.

  Inputs: `num_pos` scalar (any numeric dtype). Outputs: the updated normalizer, float32 scalar.

  Args:
    initial_value: the starting normalizer (LossConfig.init_loss_norm).
    momentum: EMA momentum (LossConfig.loss_norm_momentum).
  """

  def __init__(self, initial_value=100.0, momentum=0.9, **kwargs):
    super().__init__(**kwargs)
    self.initial_value = initial_value
    self.momentum = momentum
    self.normalizer = self.add_weight(
        name="normalizer", shape=(), dtype="float32", trainable=False, autocast=False,
        initializer=keras.initializers.Constant(initial_value),
        aggregation="only_first_replica")

  def call(self, num_pos):
    return self.update(num_pos)

  def update(self, num_pos):
    """Folds this step's (global) positive count in; returns the new value (float32 scalar)."""
    num_pos = tf.maximum(tf.cast(num_pos, tf.float32), 1.0)
    new_value = (self.momentum * tf.convert_to_tensor(self.normalizer)
                 + (1.0 - self.momentum) * num_pos)
    self.normalizer.assign(new_value)
    return new_value

  def get_config(self):
    config = super().get_config()
    config.update({"initial_value": self.initial_value, "momentum": self.momentum})
    return config


class DetectionTask:
  """Losses and steps of temporal action localization with ASL (docs/method.md 6).

  `train_step(model, optimizer, batch, epoch)` / `validation_step(model, batch)` take the
  pipeline's batch dict (`features` [B, T, C], `padding_mask` [B, T], `gt_segments` [B, M, 2]
  in grid units, `gt_labels` int [B, M], -1 = padding) and return this replica's share of every
  loss term that is on (`log_keys`; summing the values over replicas gives the global loss)
  and its positive count `num_pos`.

  Args:
    model_config: the detector's configuration (classes, ASL switches).
    loss_config: targets and losses.
    clip_grad_norm: global L2 norm the summed gradient is clipped to (<= 0: off).
  """

  def __init__(self, model_config: config_lib.ModelConfig,
               loss_config: Optional[config_lib.LossConfig] = None,
               clip_grad_norm: float = 1.0):
    self.model_config = model_config
    self.loss_config = loss_config or config_lib.LossConfig()
    self.clip_grad_norm = float(clip_grad_norm)
    self.log_keys = active_loss_keys(model_config, self.loss_config)
    self.loss_normalizer = LossNormalizer(
        self.loss_config.init_loss_norm, self.loss_config.loss_norm_momentum,
        name="loss_normalizer")

  @property
  def state_variables(self):
    """The task's own state, saved with every checkpoint: [the loss normaliser]."""
    return [self.loss_normalizer.normalizer]

  def losses(self, model, batch: Dict[str, tf.Tensor], epoch=None, training: bool = False,
             update_normalizer: bool = False) -> Tuple[Dict[str, tf.Tensor], tf.Tensor]:
    """Forward pass, targets, ASL weights and the loss terms of this replica.

    Args:
      model: an `ASLDetector`.
      batch: the batch dict (see the class docstring).
      epoch: int scalar, the 0-based epoch (for `LossConfig.instance_start_epoch`; None = on).
      training: forward in training mode (dropout, droppath).
      update_normalizer: fold this step's positive count into the normaliser before using it.

    Returns:
      (logs: `log_keys` and `num_pos`, float32 scalars; the total loss scalar).
    """
    lc, mc = self.loss_config, self.model_config
    gt_segments = tf.cast(batch["gt_segments"], tf.float32)
    gt_labels = tf.cast(batch["gt_labels"], tf.int32)
    out = model(batch["features"], batch["padding_mask"], training=training)
    targets = targets_lib.assign_targets(out["points"], gt_segments, gt_labels, mc.num_classes,
                                         lc.center_sample_radius, out["padding_mask"])
    evaluator_targets = None
    if mc.instance_sensitivity and lc.evaluator_points == "inside_gt":
      evaluator_targets = targets_lib.assign_targets(
          out["points"], gt_segments, gt_labels, mc.num_classes, 0.0, out["padding_mask"])
    sens = None
    if model.sensitivity is not None:
      sens = model.sensitivity(out["level_features"], out["level_masks"], out["points"],
                               gt_segments, gt_labels, targets, training=training)
    use_instance = True if epoch is None else epoch >= lc.instance_start_epoch
    ctx = tf.distribute.get_replica_context()
    replicas = ctx.num_replicas_in_sync if ctx is not None else 1
    gather_fn = _replica_gather_fn(ctx) if replicas > 1 else None
    sums = losses_lib.asl_loss_sums(out, targets, sens, gt_segments, gt_labels, lc,
                                    use_instance_weights=use_instance, gather_fn=gather_fn,
                                    evaluator_targets=evaluator_targets)
    num_pos, num_anchors = sums["num_pos"], sums["contrastive_num_anchors"]
    global_sums = None
    if replicas > 1:
      num_pos, num_anchors = ctx.all_reduce(tf.distribute.ReduceOp.SUM, [num_pos, num_anchors])
      if lc.reg_loss_weight <= 0:  # the automatic balance weighs the global batch's losses
        global_sums = tuple(ctx.all_reduce(tf.distribute.ReduceOp.SUM,
                                           [sums["cls_loss_sum"], sums["reg_loss_sum"]]))
    if update_normalizer:
      normalizer = self.loss_normalizer.update(num_pos)
    else:
      normalizer = tf.convert_to_tensor(self.loss_normalizer.normalizer)
    terms = losses_lib.combine_losses(sums, normalizer, num_anchors, lc, mc.contrastive_weight,
                                      global_sums)
    logs = {k: terms[k] for k in self.log_keys}
    logs["num_pos"] = sums["num_pos"]
    return logs, terms["total_loss"]

  def train_step(self, model, optimizer, batch: Dict[str, tf.Tensor],
                 epoch=None) -> Dict[str, tf.Tensor]:
    """One optimizer step on this replica's batch (docs/method.md 6.2).

    Gradients are all-reduced here, clipped by their global norm (as ActionFormer clips the
    full-batch gradient), and divided by the replica count before `optimizer.apply`, which sums
    them across replicas again. The loss is this replica's sum over the global normaliser.

    Returns:
      dict of float32 scalars: `log_keys` and `num_pos` (this replica's shares).
    """
    with tf.GradientTape() as tape:
      logs, total = self.losses(model, batch, epoch, training=True, update_normalizer=True)
      scaled = optimizer.scale_loss(total)
    variables = model.trainable_variables
    grads = tape.gradient(scaled, variables)
    grads = [tf.zeros_like(v) if g is None else tf.convert_to_tensor(g)
             for g, v in zip(grads, variables)]
    ctx = tf.distribute.get_replica_context()
    replicas = ctx.num_replicas_in_sync if ctx is not None else 1
    if replicas > 1:
      grads = ctx.all_reduce(tf.distribute.ReduceOp.SUM, grads)
    if self.clip_grad_norm > 0:
      loss_scale = tf.cast(getattr(optimizer, "dynamic_scale", 1.0), tf.float32)
      grads, _ = tf.clip_by_global_norm(grads, self.clip_grad_norm * loss_scale)
    if replicas > 1:
      grads = [g / replicas for g in grads]
    optimizer.apply(grads, variables)
    return logs

  def validation_step(self, model, batch: Dict[str, tf.Tensor]) -> Dict[str, tf.Tensor]:
    """The loss terms without an update (the normaliser is read, not updated)."""
    logs, _ = self.losses(model, batch, None, training=False, update_normalizer=False)
    return logs


def _replica_gather_fn(ctx):
  """Gathers the contrastive features of every replica; marks this replica's rows."""

  def gather(feats, labels, valid):
    num_rows = tf.shape(feats)[0]
    all_feats = ctx.all_gather(tf.cast(feats, tf.float32), axis=0)  # [R * F, D]
    all_labels = tf.cast(ctx.all_gather(tf.cast(labels, tf.float32), axis=0), tf.int32)
    all_valid = ctx.all_gather(tf.cast(valid, tf.float32), axis=0) > 0.5
    replica = tf.cast(ctx.replica_id_in_sync_group, tf.int32)
    own = tf.equal(tf.range(tf.shape(all_labels)[0]) // num_rows, replica)
    return all_feats, all_labels, all_valid, own

  return gather
