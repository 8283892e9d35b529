"""ASLDetector: ActionFormer's backbone, neck and heads as one Keras model."""

import dataclasses

import keras
import tensorflow as tf

from asl_tf import config as config_lib
from asl_tf import postprocess as postprocess_lib
from asl_tf.modeling import backbone as backbone_lib
from asl_tf.modeling import heads
from asl_tf.modeling import layers
from asl_tf.modeling import neck as neck_lib
from asl_tf.modeling import points as points_lib
from asl_tf.modeling import sensitivity as sensitivity_lib


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
  and the Action Sensitivity Evaluator (`sensitivity`, used by the training task only).

  `call(features [B, T, C], padding_mask [B, T], training=False)` returns a dict:
    cls_logits: float32 [B, N, K], levels concatenated (N = sum_l T_l, T_l = T / stride_l).
    offsets: float32 [B, N, 2], (left, right) distances in units of the level stride.
    padding_mask: bool [B, N].
    points: float32 [N, 4], (t, reg_lo, reg_hi, stride) in base-grid units.
    level_features: list of [B, T_l, fpn_dim], the neck outputs.
    level_masks: list of bool [B, T_l].
  T must be a multiple of `model_config.max_div_factor`.

  `detect(...)` returns final detections. Training (targets, losses, steps) is
  `asl_tf.training.task.DetectionTask`.

  Args:
    model_config: the architecture and ASL switches.
    eval_config: post-processing used by `detect` (defaults: EvalConfig()).
  """

  def __init__(self, model_config: config_lib.ModelConfig,
               eval_config: config_lib.EvalConfig = None, **kwargs):
    super().__init__(**kwargs)
    check_model_config(model_config)
    self.model_config = model_config
    self.eval_config = eval_config or config_lib.EvalConfig()
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
        evaluator_feature_gradient=mc.evaluator_feature_gradient,
        contrastive=mc.contrastive_weight > 0, contrastive_proj_dim=mc.contrastive_proj_dim,
        kernel_policy=mc.kernel_policy, name="sensitivity", dtype=dtype) if uses_asl else None

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
    out = self(tf.zeros([1, seq_len, self.model_config.input_dim]),
               tf.ones([1, seq_len], tf.bool))
    if self.sensitivity is not None:  # a batch without positives: weights, no loss
      num_points = tf.shape(out["points"])[0]
      no_match = {"positive_mask": tf.zeros([1, num_points], tf.bool),
                  "matched_gt": tf.zeros([1, num_points], tf.int32),
                  "matched_label": tf.zeros([1, num_points], tf.int32)}
      self.sensitivity(out["level_features"], out["level_masks"], out["points"],
                       tf.constant([[[1.0, 9.0]]]), tf.constant([[0]], tf.int32), no_match)

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
    cls_logits = self.cls_head(level_features, level_masks, training=training)
    offsets = self.reg_head(level_features, level_masks, training=training)
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
    other = ASLDetector(model_config, eval_config=self.eval_config, name=self.name,
                        dtype=self.dtype_policy)
    other.build_for_training()
    other.set_weights(self.get_weights())
    return other

  def get_config(self):
    config = super().get_config()
    config.update({"model_config": dataclasses.asdict(self.model_config),
                   "eval_config": dataclasses.asdict(self.eval_config)})
    return config

  @classmethod
  def from_config(cls, config):
    config = dict(config)
    for key in _TRAINING_KEYS:  # written by versions whose detector also trained
      config.pop(key, None)
    sections = config_lib.Config.from_dict({
        "model": config.pop("model_config"), "eval": config.pop("eval_config", {})})
    return cls(sections.model, eval_config=sections.eval, **config)


_TRAINING_KEYS = ("loss_config", "clip_grad_norm")
