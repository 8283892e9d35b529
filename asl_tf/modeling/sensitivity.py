"""Action Sensitivity Evaluator (ASL): class-level Gaussians, instance evaluator, ASCL features.

* Class level (VERIFIED against the authors' Ego4D code, docs/method.md 1): per class, learnable
  unnormalised Gaussians g(x; mu, sigma) = exp(-(x - mu)^2 / (2 sigma^2)) of the normalised
  distance x = (c_n - t) / (stride * L_n) between a point and the centre of its matched GT;
  p_cls = g(x; mu_c, sigma_c), p_loc = mean of the two localization Gaussians * p_cls; weight 1 on
  negatives. Gradients reach mu / sigma through the weights (nothing is detached).
* Instance level (reconstructed, docs/method.md 2): a light conv head on the neck features
  (stop-gradient by default) predicting (q_cls, q_loc) in (0, 1) per point; its targets and
  loss live in `asl_tf.losses`.
* Action Sensitive Contrastive Loss features (reconstructed, docs/method.md 4): a projection of
  level-0 neck features and the ranks of every (point, GT) pair; the sampling of sensitive and
  background frames and the loss live in `asl_tf.losses`.
"""

import math

import keras
import tensorflow as tf

from asl_tf.modeling import heads
from asl_tf.modeling import layers

# Default lower bound of sigma in the `stable` parametrization (sigma = softplus(rho) + floor).
# It keeps 1 / sigma^2 finite (no NaN when sigma would reach 0) while allowing Gaussians far
# narrower than the spread of the positives (|x| <= radius / L_n): it does not constrain the fit.
SIGMA_FLOOR = 1e-2

# Initial values of the authors' parameters: (mu, sigma) per Gaussian.
_INIT = {
    "mu": 0.0, "sigma": 1.0,
    "mu_reg_left": -0.5, "sigma_reg_left": 1.0,
    "mu_reg_right": 0.5, "sigma_reg_right": 1.0,
}
_GAUSSIANS = (("mu", "sigma"), ("mu_reg_left", "sigma_reg_left"),
              ("mu_reg_right", "sigma_reg_right"))
PARAMETRIZATIONS = ("authors", "stable")


def gaussian(x, mu, sigma):
  """Unnormalised Gaussian exp(-(x - mu)^2 / (2 sigma^2)) (peak 1). Shapes broadcast."""
  return tf.exp(-tf.square(x - mu) / (2.0 * tf.square(sigma)))


def center_distance(t, stride, segments):
  """Normalised signed distance x = (c - t) / (stride * L) of points to segment centres.

  Positive before the centre; on level 0 the start boundary is x = +0.5. Degenerate segments
  (L <= 0, e.g. padding) give x = 0, so that masked-out entries stay finite.

  Args:
    t: float32 point locations, broadcastable against `segments[..., 0]`.
    stride: float32 strides, same shape as `t`.
    segments: float32 [..., 2] (start, end).

  Returns:
    float32 x, the broadcast shape of `t` and `segments[..., 0]`.
  """
  start, end = segments[..., 0], segments[..., 1]
  length = end - start
  scale = stride * length
  ok = scale > 0
  return tf.where(ok, (0.5 * (start + end) - t) / tf.where(ok, scale, 1.0), 0.0)


@keras.saving.register_keras_serializable(package="asl_tf")
class ClassSensitivity(keras.layers.Layer):
  """Per-class learnable Gaussians of the normalised centre distance (docs/method.md 1, verified).

  Variables, each of shape [K] (the authors' [K, 1] `nn.Parameter`s, same names): `mu` (0),
  `sigma` (1) for classification; `mu_reg_left` (-0.5), `sigma_reg_left` (1), `mu_reg_right`
  (+0.5), `sigma_reg_right` (1) for localization. With parametrization `stable` the sigmas are
  stored as `sigma_rho`, `sigma_reg_left_rho`, `sigma_reg_right_rho`, with
  sigma = softplus(rho) + sigma_floor, initialised so that sigma starts at exactly 1.

  Inputs: `x` float [...] normalised distances (`center_distance`), `labels` int [...] class ids
  (negative ids are clipped to 0; mask those entries yourself).
  Outputs: `(g_cls, g_loc)` float32 [...]: g_cls = g(x; mu_c, sigma_c) and
  g_loc = (g(x; mu_left_c, sigma_left_c) + g(x; mu_right_c, sigma_right_c)) / 2 * g_cls.

  Args:
    num_classes: K.
    parametrization: `authors` (raw sigma) or `stable` (softplus).
    lr_scale: every parameter is stored divided by this and used multiplied by it, so that an
      Adam step (about the learning rate in the stored value) moves the parameter `lr_scale`
      times as far: a learning-rate multiplier for mu / sigma alone (1 = as released).
    sigma_floor: lower bound of every sigma with `stable` (in (0, 1)); a larger floor keeps a
      Gaussian from concentrating an instance's weight on a few frames.
  """

  def __init__(self, num_classes, parametrization="authors", lr_scale=1.0,
               sigma_floor=SIGMA_FLOOR, **kwargs):
    super().__init__(**kwargs)
    if parametrization not in PARAMETRIZATIONS:
      raise ValueError(f"sensitivity parametrization {parametrization!r}: use one of "
                       f"{PARAMETRIZATIONS}")
    if not lr_scale > 0:
      raise ValueError(f"sensitivity lr_scale must be positive, got {lr_scale}")
    if not 0.0 < sigma_floor < 1.0:
      raise ValueError(f"sensitivity sigma_floor must be in (0, 1) (sigma starts at 1), got "
                       f"{sigma_floor}")
    self.num_classes = num_classes
    self.sigma_floor = float(sigma_floor)
    self.parametrization = parametrization
    self.lr_scale = float(lr_scale)
    self._params = {}
    for mu_name, sigma_name in _GAUSSIANS:
      self._params[mu_name] = self._add(mu_name, _INIT[mu_name])
      if parametrization == "authors":
        self._params[sigma_name] = self._add(sigma_name, _INIT[sigma_name])
      else:
        rho = math.log(math.expm1(_INIT[sigma_name] - self.sigma_floor))
        self._params[sigma_name] = self._add(sigma_name + "_rho", rho)

  def _add(self, name, value):
    # autocast=False: the Gaussians are loss weights, always computed in float32.
    return self.add_weight(name=name, shape=(self.num_classes,), dtype="float32",
                           initializer=keras.initializers.Constant(value / self.lr_scale),
                           autocast=False)

  def _value(self, name):
    """A parameter as used: the stored variable times `lr_scale`."""
    return tf.convert_to_tensor(self._params[name]) * self.lr_scale

  @property
  def sensitivity_variables(self):
    """The mu / sigma (or rho) variables, e.g. to exclude them from weight decay."""
    return list(self._params.values())

  def sigmas(self):
    """Returns (sigma, sigma_reg_left, sigma_reg_right), each float32 [K]."""
    out = []
    for _, sigma_name in _GAUSSIANS:
      value = self._value(sigma_name)
      if self.parametrization == "stable":
        value = tf.nn.softplus(value) + self.sigma_floor
      out.append(value)
    return tuple(out)

  def gaussian_parameters(self):
    """The effective (mu, sigma) values under the authors' names, for logging and export.

    Returns:
      dict name -> float32 [K]: `mu`, `sigma`, `mu_reg_left`, `sigma_reg_left`, `mu_reg_right`,
      `sigma_reg_right` (sigmas after the softplus with `stable`).
    """
    out = {}
    for (mu_name, sigma_name), sigma in zip(_GAUSSIANS, self.sigmas()):
      out[mu_name] = self._value(mu_name)
      out[sigma_name] = sigma
    return out

  def call(self, x, labels):
    x = tf.cast(x, tf.float32)
    labels = tf.maximum(tf.cast(labels, tf.int32), 0)
    g = []
    for (mu_name, _), sigma in zip(_GAUSSIANS, self.sigmas()):
      mu = tf.gather(self._value(mu_name), labels)
      g.append(gaussian(x, mu, tf.gather(sigma, labels)))
    g_cls = g[0]
    return g_cls, 0.5 * (g[1] + g[2]) * g_cls

  def get_config(self):
    config = super().get_config()
    config.update({"num_classes": self.num_classes, "parametrization": self.parametrization,
                   "lr_scale": self.lr_scale, "sigma_floor": self.sigma_floor})
    return config


def fixed_gaussians(x):
  """The class-level Gaussians at their initial values (for ranking when they are off).

  Args:
    x: float [...] normalised distances.

  Returns:
    `(g_cls, g_loc)` float32 [...], as `ClassSensitivity` at initialisation.
  """
  x = tf.cast(x, tf.float32)
  g = [gaussian(x, _INIT[mu], _INIT[sigma]) for mu, sigma in _GAUSSIANS]
  return g[0], 0.5 * (g[1] + g[2]) * g[0]


@keras.saving.register_keras_serializable(package="asl_tf")
class InstanceEvaluator(heads.ConvHead):
  """Instance-level evaluator (docs/method.md 2, reconstructed), shared across pyramid levels.

  num_layers x [MaskedConv1D(k) -> ChannelLayerNorm -> ReLU] -> MaskedConv1D(k, 2) -> sigmoid
  (the heads' `ConvHead`), applied to the neck features (zeroed at padding); with
  `feature_gradient` off (the default) they are stop-gradient, so the evaluator's loss trains
  only the evaluator.

  Inputs: `level_features` list of [B, T_l, C], `level_masks` list of bool [B, T_l].
  Outputs: q float32 [B, N, 2] = (q_cls, q_loc) in (0, 1), levels concatenated (N = sum T_l);
  their logits with `logits=True`.

  Args:
    hidden_dim: channels of the hidden convolutions.
    num_layers: hidden conv layers (ModelConfig.evaluator_layers).
    kernel_size: temporal kernel size (odd).
    kernel_policy: `kernels.POLICIES` entry of the convolutions, LayerNorms and level joining.
    feature_gradient: let the evaluator's loss reach the features (ModelConfig.
      evaluator_feature_gradient).
  """

  def __init__(self, hidden_dim, num_layers=0, kernel_size=3, kernel_policy="auto",
               feature_gradient=False, **kwargs):
    super().__init__(2, hidden_dim, num_layers + 1, kernel_size, True, "zeros",
                     kernel_policy=kernel_policy, **kwargs)
    self.hidden_dim = hidden_dim
    self.num_layers = num_layers
    self.kernel_size = kernel_size
    self.feature_gradient = feature_gradient

  def call(self, level_features, level_masks, training=False, logits=False):
    if not self.feature_gradient:
      level_features = [tf.stop_gradient(f) for f in level_features]
    xs = [f * tf.cast(layers.as_bool_mask(m), f.dtype)[..., None]  # pad -> 0
          for f, m in zip(level_features, level_masks)]
    outputs = self._levels(xs, level_masks, training=training)  # [B, T_l, 2] each
    z = tf.concat([tf.cast(y, tf.float32) for y in outputs], axis=1)  # [B, N, 2]
    return z if logits else tf.sigmoid(z)

  def get_config(self):
    config = super().get_config()
    config.update({"hidden_dim": self.hidden_dim, "num_layers": self.num_layers,
                   "kernel_size": self.kernel_size, "kernel_policy": self.kernel_policy,
                   "feature_gradient": self.feature_gradient})
    return config


@keras.saving.register_keras_serializable(package="asl_tf")
class ContrastiveProjection(keras.layers.Layer):
  """Features of the contrastive loss: L2 normalisation, after Dense -> ReLU -> Dense if asked.

  With `proj_dim` 0 (the default) there is no MLP: the features are only L2-normalised.

  Inputs: [B, T, C]. Outputs: float32 [B, T, proj_dim or C], unit norm on the last axis.

  Args:
    proj_dim: output channels of both Dense layers (0 = no projection).
  """

  def __init__(self, proj_dim=0, **kwargs):
    super().__init__(**kwargs)
    self.proj_dim = proj_dim
    self.dense_layers = []
    if proj_dim > 0:
      self.dense_layers = [
          keras.layers.Dense(proj_dim, activation="relu", dtype=self.dtype_policy,
                             name="dense_0"),
          keras.layers.Dense(proj_dim, dtype=self.dtype_policy, name="dense_1"),
      ]

  def call(self, x):
    for dense in self.dense_layers:
      x = dense(x)
    return tf.math.l2_normalize(tf.cast(x, tf.float32), axis=-1, epsilon=1e-12)

  def get_config(self):
    config = super().get_config()
    config.update({"proj_dim": self.proj_dim})
    return config


@keras.saving.register_keras_serializable(package="asl_tf")
class ActionSensitivityEvaluator(keras.layers.Layer):
  """ASL's Action Sensitivity Evaluator: every part switchable.

  Call with the detector's neck outputs, the point table, the padded GT and the targets of
  `asl_tf.targets.assign_targets`; feed the returned dict to `asl_tf.losses.asl_loss_sums`.

  Inputs: `level_features` list of [B, T_l, C]; `level_masks` list of bool [B, T_l];
  `points` [N, 4]; `gt_segments` [B, M, 2]; `gt_labels` int [B, M]; `targets` dict.
  Outputs: dict of float32 tensors:
    `p_cls`, `p_loc` [B, N]: class-level weights at each point's matched GT, 1 on negatives
      (all ones when `class_sensitivity` is off);
    `q` [B, N, 2]: the instance evaluator's (q_cls, q_loc), and `q_logits` their logits (only
      with `instance_sensitivity`);
    with `contrastive`: `embeddings` [B, T_0, D] (projected, unit-norm level-0 features),
    `level0_mask` bool [B, T_0], `level0_t` [T_0] point locations, and `rank_cls`, `rank_loc`
    [B, T_0, M] stop-gradient class-level Gaussians of every (level-0 point, GT) pair used to
    rank sensitive frames (the initial Gaussians when `class_sensitivity` is off).

  Args:
    num_classes: K.
    hidden_dim: channels of the instance evaluator (e.g. ModelConfig.head_dim).
    class_sensitivity: learn the class-level Gaussians.
    sensitivity_parametrization: `authors` or `stable` (see ClassSensitivity).
    sensitivity_lr_scale: ClassSensitivity's `lr_scale`.
    sensitivity_sigma_floor: ClassSensitivity's `sigma_floor` (`stable` only).
    instance_sensitivity: build the instance evaluator.
    evaluator_layers: hidden layers of the instance evaluator.
    evaluator_feature_gradient: InstanceEvaluator's `feature_gradient`.
    contrastive: produce the contrastive-loss features (ModelConfig.contrastive_weight > 0).
    contrastive_proj_dim: projection channels (0 = L2 normalisation only).
    kernel_policy: `kernels.POLICIES` entry of the instance evaluator.
  """

  def __init__(self, num_classes, hidden_dim, class_sensitivity=False,
               sensitivity_parametrization="authors", instance_sensitivity=True,
               evaluator_layers=0, contrastive=True, contrastive_proj_dim=0,
               sensitivity_lr_scale=1.0, kernel_policy="auto",
               sensitivity_sigma_floor=SIGMA_FLOOR, evaluator_feature_gradient=False, **kwargs):
    super().__init__(**kwargs)
    self.num_classes = num_classes
    self.hidden_dim = hidden_dim
    self.class_sensitivity = class_sensitivity
    self.sensitivity_parametrization = sensitivity_parametrization
    self.sensitivity_lr_scale = sensitivity_lr_scale
    self.sensitivity_sigma_floor = sensitivity_sigma_floor
    self.instance_sensitivity = instance_sensitivity
    self.evaluator_layers = evaluator_layers
    self.evaluator_feature_gradient = evaluator_feature_gradient
    self.contrastive = contrastive
    self.contrastive_proj_dim = contrastive_proj_dim
    self.kernel_policy = kernel_policy
    self.class_level = None
    self.instance_level = None
    self.projection = None
    if class_sensitivity:
      self.class_level = ClassSensitivity(num_classes, sensitivity_parametrization,
                                          lr_scale=sensitivity_lr_scale,
                                          sigma_floor=sensitivity_sigma_floor,
                                          dtype=self.dtype_policy, name="class_sensitivity")
    if instance_sensitivity:
      self.instance_level = InstanceEvaluator(hidden_dim, evaluator_layers,
                                              kernel_policy=kernel_policy,
                                              feature_gradient=evaluator_feature_gradient,
                                              dtype=self.dtype_policy, name="instance_evaluator")
    if contrastive:
      self.projection = ContrastiveProjection(contrastive_proj_dim, dtype=self.dtype_policy,
                                              name="contrastive_projection")

  @property
  def sensitivity_variables(self):
    """The class-level mu / sigma variables (empty when class sensitivity is off)."""
    return self.class_level.sensitivity_variables if self.class_level is not None else []

  def gaussian_parameters(self):
    """`ClassSensitivity.gaussian_parameters()`, or {} when class sensitivity is off."""
    return self.class_level.gaussian_parameters() if self.class_level is not None else {}

  def call(self, level_features, level_masks, points, gt_segments, gt_labels, targets,
           training=False):
    points = tf.cast(points, tf.float32)
    gt_segments = tf.cast(gt_segments, tf.float32)
    gt_labels = tf.cast(gt_labels, tf.int32)
    positive = targets["positive_mask"]
    out = {}
    if self.class_level is not None:
      matched = tf.gather(gt_segments, targets["matched_gt"], batch_dims=1)  # [B, N, 2]
      x = center_distance(points[None, :, 0], points[None, :, 3], matched)  # [B, N]
      g_cls, g_loc = self.class_level(x, targets["matched_label"])
      out["p_cls"] = tf.where(positive, g_cls, 1.0)
      out["p_loc"] = tf.where(positive, g_loc, 1.0)
    else:
      out["p_cls"] = tf.ones(tf.shape(positive), tf.float32)
      out["p_loc"] = out["p_cls"]
    if self.instance_level is not None:
      out["q_logits"] = self.instance_level(level_features, level_masks, training=training,
                                            logits=True)
      out["q"] = tf.sigmoid(out["q_logits"])
    if self.projection is not None:
      num_level0 = tf.shape(level_features[0])[1]
      t0 = points[:num_level0, 0]  # level-0 points (stride 1)
      x0 = center_distance(t0[None, :, None], 1.0, gt_segments[:, None, :, :])  # [B, T0, M]
      labels0 = tf.broadcast_to(gt_labels[:, None, :], tf.shape(x0))
      if self.class_level is not None:
        rank_cls, rank_loc = self.class_level(x0, labels0)
      else:
        rank_cls, rank_loc = fixed_gaussians(x0)
      out["embeddings"] = self.projection(level_features[0])
      out["level0_mask"] = layers.as_bool_mask(level_masks[0])
      out["level0_t"] = t0
      out["rank_cls"] = tf.stop_gradient(rank_cls)
      out["rank_loc"] = tf.stop_gradient(rank_loc)
    return out

  def get_config(self):
    config = super().get_config()
    config.update({
        "num_classes": self.num_classes,
        "hidden_dim": self.hidden_dim,
        "class_sensitivity": self.class_sensitivity,
        "sensitivity_parametrization": self.sensitivity_parametrization,
        "sensitivity_lr_scale": self.sensitivity_lr_scale,
        "sensitivity_sigma_floor": self.sensitivity_sigma_floor,
        "instance_sensitivity": self.instance_sensitivity,
        "evaluator_layers": self.evaluator_layers,
        "evaluator_feature_gradient": self.evaluator_feature_gradient,
        "contrastive": self.contrastive,
        "contrastive_proj_dim": self.contrastive_proj_dim,
        "kernel_policy": self.kernel_policy,
    })
    return config
