"""ASLDetector: ActionFormer's backbone, neck and heads as one Keras model."""

import dataclasses

import keras
import tensorflow as tf

from asl_tf import config as config_lib
from asl_tf import losses as losses_lib
from asl_tf import postprocess as postprocess_lib
from asl_tf import targets as targets_lib
from asl_tf.modeling import backbone as backbone_lib
from asl_tf.modeling import heads
from asl_tf.modeling import layers
from asl_tf.modeling import neck as neck_lib
from asl_tf.modeling import points as points_lib
from asl_tf.modeling import sensitivity as sensitivity_lib

LOSS_LOG_KEYS = ("cls_loss", "reg_loss", "evaluator_loss", "contrastive_loss", "total_loss")


def check_model_config(model_config: config_lib.ModelConfig) -> None:
  """Raises ValueError if the pyramid geometry cannot work; the message says what to change."""
  mc = model_config
  if len(mc.backbone_arch) != 3 or min(mc.backbone_arch) < 0:
    raise ValueError(f"--backbone_arch={mc.backbone_arch} must be three non-negative integers")
  if len(mc.mha_win_size) != mc.num_levels:
    raise ValueError(f"--mha_win_size has {len(mc.mha_win_size)} entries but the backbone has "
                     f"{mc.num_levels} levels (backbone_arch[2] + 1); give one or one per level")
  if len(mc.regression_range) != mc.num_levels:
    raise ValueError(f"--regression_range has {len(mc.regression_range)} levels but the backbone "
                     f"has {mc.num_levels}; give one (lo, hi) pair per level")
  if mc.fpn_dim != mc.embd_dim:
    raise ValueError(f"the identity neck needs --fpn_dim ({mc.fpn_dim}) equal to --embd_dim "
                     f"({mc.embd_dim})")
  if mc.max_seq_len % mc.max_div_factor:
    raise ValueError(
        f"--max_seq_len={mc.max_seq_len} is not divisible by {mc.max_div_factor} (max over "
        "levels of stride x 2 x (window // 2)); use a multiple such as "
        f"{-(-mc.max_seq_len // mc.max_div_factor) * mc.max_div_factor}, or smaller windows")


@keras.saving.register_keras_serializable(package="asl_tf")
class ASLDetector(keras.Model):
  """ActionFormer detector + ASL: ConvTransformer backbone -> identity neck -> shared heads,
  the Action Sensitivity Evaluator, and the training / evaluation / detection steps.

  `call(features [B, T, C], padding_mask [B, T], training=False)` returns a dict:
    cls_logits: float32 [B, N, K], levels concatenated (N = sum_l T_l, T_l = T / stride_l).
    offsets: float32 [B, N, 2], (left, right) distances in units of the level stride.
    padding_mask: bool [B, N].
    points: float32 [N, 4], (t, reg_lo, reg_hi, stride) in base-grid units.
    level_features: list of [B, T_l, fpn_dim], the neck outputs.
    level_masks: list of bool [B, T_l].
  T must be a multiple of `model_config.max_div_factor`.

  `train_step(batch, epoch)` / `test_step(batch)` take the pipeline's batch dict and return this
  replica's share of every loss term (summing the values over replicas gives the global loss)
  and its positive count `num_pos`. `detect(...)` returns final detections.

  Args:
    model_config: the architecture and ASL switches.
    loss_config: targets and losses (defaults: LossConfig()).
    eval_config: post-processing used by `detect` (defaults: EvalConfig()).
    clip_grad_norm: global L2 norm the summed gradient is clipped to (<= 0: off).
  """

  def __init__(self, model_config: config_lib.ModelConfig,
               loss_config: config_lib.LossConfig = None,
               eval_config: config_lib.EvalConfig = None, clip_grad_norm: float = 1.0,
               **kwargs):
    super().__init__(**kwargs)
    check_model_config(model_config)
    self.model_config = model_config
    self.loss_config = loss_config or config_lib.LossConfig()
    self.eval_config = eval_config or config_lib.EvalConfig()
    self.clip_grad_norm = float(clip_grad_norm)
    mc = model_config
    dtype = self.dtype_policy
    self.backbone = backbone_lib.ConvTransformerBackbone(
        input_dim=mc.input_dim, embd_dim=mc.embd_dim, num_heads=mc.n_head,
        embd_kernel_size=mc.embd_kernel_size, max_seq_len=mc.max_seq_len,
        arch=mc.backbone_arch, mha_win_size=mc.mha_win_size, scale_factor=mc.scale_factor,
        embd_with_ln=mc.embd_with_ln, dropout=mc.dropout, droppath=mc.droppath,
        use_abs_pe=mc.use_abs_pe, stream_dims=mc.stream_dims,
        stream_proj_dims=mc.stream_proj_dims, kernel_policy=mc.kernel_policy,
        name="backbone", dtype=dtype)
    self.neck = neck_lib.IdentityNeck(mc.num_levels, with_ln=mc.fpn_with_ln,
                                      kernel_policy=mc.kernel_policy, name="neck", dtype=dtype)
    self.cls_head = heads.ClassificationHead(
        mc.num_classes, mc.head_dim, num_layers=mc.head_num_layers,
        kernel_size=mc.head_kernel_size, with_ln=mc.head_with_ln, prior_prob=mc.cls_prior_prob,
        empty_classes=mc.head_empty_cls, kernel_policy=mc.kernel_policy, name="cls_head",
        dtype=dtype)
    self.reg_head = heads.RegressionHead(
        mc.num_levels, mc.head_dim, num_layers=mc.head_num_layers,
        kernel_size=mc.head_kernel_size, with_ln=mc.head_with_ln,
        kernel_policy=mc.kernel_policy, name="reg_head", dtype=dtype)
    uses_asl = mc.class_sensitivity or mc.instance_sensitivity or mc.contrastive_weight > 0
    self.sensitivity = sensitivity_lib.ActionSensitivityEvaluator(
        mc.num_classes, mc.head_dim, class_sensitivity=mc.class_sensitivity,
        sensitivity_parametrization=mc.sensitivity_parametrization,
        sensitivity_lr_scale=mc.sensitivity_lr_scale,
        sensitivity_sigma_floor=mc.sensitivity_sigma_floor,
        instance_sensitivity=mc.instance_sensitivity, evaluator_layers=mc.evaluator_layers,
        contrastive=mc.contrastive_weight > 0, contrastive_proj_dim=mc.contrastive_proj_dim,
        kernel_policy=mc.kernel_policy, name="sensitivity", dtype=dtype) if uses_asl else None
    self.loss_normalizer = losses_lib.LossNormalizer(
        self.loss_config.init_loss_norm, self.loss_config.loss_norm_momentum,
        name="loss_normalizer")

  def build(self, features_shape, padding_mask_shape=None):
    """Sublayers create their weights on the first call (see `build_for_length`)."""
    self.built = True

  def build_for_length(self, seq_len: int, batch_size: int = 1) -> None:
    """Creates the detector's weights by running one zero batch of `seq_len` frames."""
    features = tf.zeros([batch_size, seq_len, self.model_config.input_dim])
    self(features, tf.ones([batch_size, seq_len], tf.bool))

  def build_for_training(self) -> None:
    """Creates every weight, the ASL evaluator's included, with one max_seq_len forward."""
    seq_len = self.model_config.max_seq_len
    self.build_for_length(seq_len)
    if self.sensitivity is not None:
      batch = {
          "features": tf.zeros([1, seq_len, self.model_config.input_dim]),
          "padding_mask": tf.ones([1, seq_len]),
          "gt_segments": tf.constant([[[1.0, 9.0]]]),
          "gt_labels": tf.constant([[0]], tf.int32),
      }
      self._forward_losses(batch, epoch=None, training=False, update_normalizer=False)

  def sensitivity_parameters(self):
    """{name: [K] array} of the learned class-level Gaussians ({} when that part is off)."""
    if self.sensitivity is None or not self.model_config.class_sensitivity:
      return {}
    return {k: keras.ops.convert_to_numpy(v)
            for k, v in self.sensitivity.gaussian_parameters().items()}

  def _check_inputs(self, features, padding_mask):
    mc = self.model_config
    if features.shape.rank != 3:
      raise ValueError(f"ASLDetector expects features [B, T, C], got shape {features.shape}")
    if features.shape[-1] is not None and features.shape[-1] != mc.input_dim:
      raise ValueError(f"ASLDetector was built for {mc.input_dim} input channels but features "
                       f"have shape {features.shape}; set --input_dim to the feature dimension "
                       "or pass channels-last [B, T, C] features")
    seq_len = features.shape[1]
    if seq_len is not None and seq_len % mc.max_div_factor:
      raise ValueError(
          f"sequence length {seq_len} is not a multiple of max_div_factor={mc.max_div_factor}; "
          f"pad the features (and mask) to {-(-seq_len // mc.max_div_factor) * mc.max_div_factor}")
    if padding_mask.shape.rank != 2:
      raise ValueError(f"padding_mask must be [B, T], got shape {padding_mask.shape}")
    if seq_len is None:
      tf.debugging.assert_equal(
          tf.shape(features)[1] % mc.max_div_factor, 0,
          message=f"sequence length must be a multiple of max_div_factor={mc.max_div_factor}; "
          "pad the features and the mask")

  def call(self, features, padding_mask, training=False):
    features = tf.convert_to_tensor(features)
    padding_mask = layers.as_bool_mask(padding_mask)
    self._check_inputs(features, padding_mask)
    level_features, level_masks = self.backbone(features, padding_mask, training=training)
    level_features, level_masks = self.neck(level_features, level_masks)
    cls_logits = self.cls_head(level_features, level_masks)
    offsets = self.reg_head(level_features, level_masks)
    mc = self.model_config
    points = points_lib.point_table([tf.shape(x)[1] for x in level_features], mc.strides,
                                    mc.regression_range)
    return {
        "cls_logits": tf.concat(cls_logits, axis=1),  # [B, N, K]
        "offsets": tf.concat(offsets, axis=1),  # [B, N, 2]
        "padding_mask": tf.concat(level_masks, axis=1),  # [B, N]
        "points": points,  # [N, 4]
        "level_features": level_features,
        "level_masks": level_masks,
    }

  # -- training and evaluation ------------------------------------------------------------
  def _forward_losses(self, batch, epoch, training, update_normalizer):
    """Forward pass, targets, ASL weights and the loss terms of this replica.

    Returns:
      (logs dict of scalars, total loss scalar).
    """
    lc, mc = self.loss_config, self.model_config
    gt_segments = tf.cast(batch["gt_segments"], tf.float32)
    gt_labels = tf.cast(batch["gt_labels"], tf.int32)
    out = self(batch["features"], batch["padding_mask"], training=training)
    targets = targets_lib.assign_targets(out["points"], gt_segments, gt_labels, mc.num_classes,
                                         lc.center_sample_radius, out["padding_mask"])
    sens = None
    if self.sensitivity is not None:
      sens = self.sensitivity(out["level_features"], out["level_masks"], out["points"],
                              gt_segments, gt_labels, targets, training=training)
    use_instance = True if epoch is None else epoch >= lc.instance_start_epoch
    ctx = tf.distribute.get_replica_context()
    replicas = ctx.num_replicas_in_sync if ctx is not None else 1
    gather_fn = _replica_gather_fn(ctx) if replicas > 1 else None
    sums = losses_lib.asl_loss_sums(out, targets, sens, gt_segments, gt_labels, lc,
                                    use_instance_weights=use_instance, gather_fn=gather_fn)
    num_pos, num_anchors = sums["num_pos"], sums["contrastive_num_anchors"]
    if replicas > 1:
      num_pos, num_anchors = ctx.all_reduce(tf.distribute.ReduceOp.SUM, [num_pos, num_anchors])
    if update_normalizer:
      normalizer = self.loss_normalizer.update(num_pos)
    else:
      normalizer = tf.convert_to_tensor(self.loss_normalizer.normalizer)
    terms = losses_lib.combine_losses(sums, normalizer, num_anchors, lc, mc.contrastive_weight)
    logs = {k: terms[k] for k in LOSS_LOG_KEYS}
    logs["num_pos"] = sums["num_pos"]
    return logs, terms["total_loss"]

  def train_step(self, data, epoch=None):
    """One optimizer step on this replica's batch (docs/method.md 6.2).

    Gradients are all-reduced here, clipped by their global norm (as ActionFormer clips the
    full-batch gradient), and divided by the replica count before `optimizer.apply`, which sums
    them across replicas again. The loss is this replica's sum over the global normalizer.

    Args:
      data: the pipeline's batch dict (or a Keras `(x, y, sample_weight)` tuple whose x is it).
      epoch: int scalar, the 0-based epoch (for `LossConfig.instance_start_epoch`).

    Returns:
      dict of float32 scalars: LOSS_LOG_KEYS and `num_pos` (this replica's shares).
    """
    if not isinstance(data, dict):
      data = keras.utils.unpack_x_y_sample_weight(data)[0]
    optimizer = self.optimizer
    with tf.GradientTape() as tape:
      logs, total = self._forward_losses(data, epoch, training=True, update_normalizer=True)
      scaled = optimizer.scale_loss(total)
    variables = self.trainable_variables
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

  def test_step(self, data):
    """The loss terms without an update (the normalizer is read, not updated)."""
    if not isinstance(data, dict):
      data = keras.utils.unpack_x_y_sample_weight(data)[0]
    logs, _ = self._forward_losses(data, None, training=False, update_normalizer=False)
    return logs

  def detect(self, features, padding_mask, fps, duration, feat_stride, num_frames):
    """Final detections (`postprocess.postprocess_detections` with `eval_config`).

    Args:
      features: float32 [B, T, C]; padding_mask: bool/float [B, T]; fps, duration (seconds),
        feat_stride, num_frames: float32 [B].

    Returns:
      dict: `segments_sec` [B, D, 2], `segments_grid` [B, D, 2], `scores` [B, D],
      `labels` int32 [B, D], `num_detections` int32 [B] (D = eval_config.max_seg_num).
    """
    out = self(features, padding_mask, training=False)
    return postprocess_lib.postprocess_detections(
        out["cls_logits"], out["offsets"], out["padding_mask"], out["points"], fps, duration,
        feat_stride, num_frames, self.eval_config)

  def with_kernel_policy(self, policy: str) -> "ASLDetector":
    """This detector (same weights) computing under `policy` (kernels.POLICIES); self if it
    does already."""
    if policy == self.model_config.kernel_policy:
      return self
    model_config = dataclasses.replace(self.model_config, kernel_policy=policy)
    other = ASLDetector(model_config, loss_config=self.loss_config,
                        eval_config=self.eval_config, clip_grad_norm=self.clip_grad_norm,
                        name=self.name, dtype=self.dtype_policy)
    other.build_for_training()
    other.set_weights(self.get_weights())
    return other

  def get_config(self):
    config = super().get_config()
    config.update({"model_config": dataclasses.asdict(self.model_config),
                   "loss_config": dataclasses.asdict(self.loss_config),
                   "eval_config": dataclasses.asdict(self.eval_config),
                   "clip_grad_norm": self.clip_grad_norm})
    return config

  @classmethod
  def from_config(cls, config):
    config = dict(config)
    sections = config_lib.Config.from_dict({
        "model": config.pop("model_config"), "loss": config.pop("loss_config", {}),
        "eval": config.pop("eval_config", {})})
    return cls(sections.model, loss_config=sections.loss, eval_config=sections.eval, **config)


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
