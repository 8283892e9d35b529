"""AdamW with ActionFormer's parameter groups, the LR schedule, and EMA weight swapping."""

from __future__ import annotations

import contextlib
from typing import List, Sequence

import keras
import tensorflow as tf

from asl_tf import config as config_lib
from asl_tf.modeling import kernels
from asl_tf.training import schedules

# Variable names (Keras `Variable.name`, the last path component) that receive weight decay:
# the kernels of convolutions and dense layers, as ActionFormer's `make_optimizer` (Conv1d,
# Linear and MaskedConv1D weights). Biases, norms, Scale, LayerScale and position encodings do
# not; the ASL sensitivity parameters (found by identity, not by name) only when configured.
DECAYED_VARIABLE_NAMES = ("kernel", "depthwise_kernel")


def decayed_variables(model: keras.Model, train_config: config_lib.TrainConfig,
                      model_config: config_lib.ModelConfig) -> List:
  """The trainable variables of `model` that AdamW decays.

  Args:
    model: the detector (its `sensitivity.sensitivity_variables` are the class-level mu / sigma).
    train_config: `sensitivity_weight_decay` adds mu / sigma (the authors' released code decays
      them; the `stable` parametrization never does).
    model_config: for `sensitivity_parametrization`.
  """
  sensitivity = getattr(model, "sensitivity", None)
  sensitivity_ids = {id(v) for v in (sensitivity.sensitivity_variables if sensitivity else [])}
  decay_sensitivity = (train_config.sensitivity_weight_decay
                       and model_config.sensitivity_parametrization == "authors")
  return [v for v in model.trainable_variables
          if (decay_sensitivity if id(v) in sensitivity_ids else v.name in DECAYED_VARIABLE_NAMES)]


@keras.saving.register_keras_serializable(package="asl_tf")
class PyTorchAdamW(keras.optimizers.AdamW):
  """`keras.optimizers.AdamW` with PyTorch's update, which ActionFormer and ASL train with:

    m <- beta_1 m + (1 - beta_1) g,   v <- beta_2 v + (1 - beta_2) g^2
    var <- var - lr / (1 - beta_1^t) * m / (sqrt(v) / sqrt(1 - beta_2^t) + epsilon)

  after the decoupled decay `var <- var - lr * wd * var` (Keras' base optimizer applies it
  first, as PyTorch does). Keras adds epsilon to sqrt(v) before the bias correction instead
  (`TrainConfig.adamw_form`). The state is Keras AdamW's: checkpoints load into either.
  """

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    if self.amsgrad:
      raise ValueError(f"{type(self).__name__} has no amsgrad form; use keras.optimizers.AdamW")

  def update_step(self, gradient, variable, learning_rate):
    dtype = variable.dtype
    step = tf.cast(self.iterations + 1, dtype)
    beta_1, beta_2 = tf.cast(self.beta_1, dtype), tf.cast(self.beta_2, dtype)
    gradient = tf.cast(gradient, dtype)
    index = self._get_variable_index(variable)
    m, v = self._momentums[index], self._velocities[index]
    self.assign_add(m, (gradient - m) * (1.0 - beta_1))
    self.assign_add(v, (tf.square(gradient) - v) * (1.0 - beta_2))
    denominator = tf.sqrt(v) / tf.sqrt(1.0 - tf.pow(beta_2, step)) + tf.cast(self.epsilon, dtype)
    step_size = tf.cast(learning_rate, dtype) / (1.0 - tf.pow(beta_1, step))
    self.assign_sub(variable, m * step_size / denominator)


@keras.saving.register_keras_serializable(package="asl_tf")
class FusedAdamW(keras.optimizers.AdamW):
  """AdamW with one fused kernel per variable (the `fast` / `portable` form).

  The updates of `PyTorchAdamW` (`epsilon_form="pytorch"`) or of `keras.optimizers.AdamW`
  (`"keras"`), up to float32 rounding (the kernel's 1 - beta_2 is 1 - float32(0.999), 1.3e-5
  below Keras' float32(0.001)), in the same order per variable: the decoupled decay
  `var -= var * wd * lr`, then Adam's moments and step in one `ResourceApplyAdam`
  (`alpha = lr sqrt(1 - beta_2^t) / (1 - beta_1^t)`, `var -= alpha m / (sqrt(v) + eps_hat)`,
  where eps_hat = epsilon sqrt(1 - beta_2^t) gives PyTorch's form and eps_hat = epsilon Keras'),
  then the EMA. The step's scalars (learning rate, beta powers, eps_hat, EMA momentum) are
  computed once per `apply` rather than once per variable. Keras' form spends ~64 graph ops per
  variable, half of the bench config's training-step graph; this one ~12 (README, Benchmarks:
  memory). Its state is Keras AdamW's, so checkpoints of either load into the other.

  Args:
    epsilon_form: `pytorch` or `keras` (`TrainConfig.adamw_form`); the rest as Keras' AdamW.
  """

  def __init__(self, *args, epsilon_form="pytorch", **kwargs):
    super().__init__(*args, **kwargs)
    if self.amsgrad:
      raise ValueError("FusedAdamW has no amsgrad form; use keras.optimizers.AdamW")
    if epsilon_form not in config_lib.ADAMW_FORMS:
      raise ValueError(f"epsilon_form={epsilon_form!r}: use one of {config_lib.ADAMW_FORMS}")
    self.epsilon_form = epsilon_form
    self._step_scalars = []

  def get_config(self):
    config = super().get_config()
    config["epsilon_form"] = self.epsilon_form
    return config

  def apply(self, grads, trainable_variables=None):
    self._step_scalars = []
    try:
      return super().apply(grads, trainable_variables)
    finally:
      self._step_scalars = []

  def _apply_weight_decay(self, variables):
    """Nothing: `update_step` decays each variable right before its Adam update."""

  def _scalars(self, learning_rate, dtype):
    """(lr, beta_1^t, beta_2^t, beta_1, beta_2, epsilon, weight decay) of this `apply`, in
    `dtype`; built once per learning-rate tensor (one per replica under tf.distribute)."""
    for rate, rate_dtype, scalars in self._step_scalars:
      if rate is learning_rate and rate_dtype == dtype:
        return scalars
    step = tf.cast(self.iterations + 1, dtype)
    beta_1, beta_2 = tf.cast(self.beta_1, dtype), tf.cast(self.beta_2, dtype)
    beta_2_power = tf.pow(beta_2, step)
    epsilon = tf.cast(self.epsilon, dtype)
    if self.epsilon_form == "pytorch":
      epsilon *= tf.sqrt(1.0 - beta_2_power)
    scalars = (tf.cast(learning_rate, dtype), tf.pow(beta_1, step), beta_2_power, beta_1,
               beta_2, epsilon, tf.cast(self.weight_decay, dtype))
    self._step_scalars.append((learning_rate, dtype, scalars))
    return scalars

  def update_step(self, gradient, variable, learning_rate):
    lr, beta_1_power, beta_2_power, beta_1, beta_2, epsilon, decay = self._scalars(
        learning_rate, variable.dtype)
    if self._use_weight_decay(variable):
      variable.assign_sub(variable * decay * lr)
    index = self._get_variable_index(variable)
    tf.raw_ops.ResourceApplyAdam(
        var=variable.handle, m=self._momentums[index].value.handle,
        v=self._velocities[index].value.handle, beta1_power=beta_1_power,
        beta2_power=beta_2_power, lr=lr, beta1=beta_1, beta2=beta_2, epsilon=epsilon,
        grad=tf.cast(gradient, variable.dtype))

  def _update_model_variables_moving_average(self, trainable_variables):
    if not self.use_ema:
      return
    momentum = tf.cast(tf.not_equal(self.iterations, 0), tf.float32) * self.ema_momentum
    keep, take = momentum, 1.0 - momentum
    for variable, average in zip(trainable_variables, self._model_variables_moving_average):
      if average is not None:
        average.assign(tf.cast(keep, variable.dtype) * average
                       + tf.cast(take, variable.dtype) * variable)


def build_optimizer(model: keras.Model, train_config: config_lib.TrainConfig,
                    model_config: config_lib.ModelConfig,
                    steps_per_epoch: int) -> keras.optimizers.Optimizer:
  """AdamW (betas 0.9 / 0.999, epsilon 1e-8) with the warm-up cosine schedule and optional EMA.

  Its update is PyTorch's or Keras' (`train_config.adamw_form`). Under the `reference` kernel
  policy `PyTorchAdamW` or Keras' AdamW, else `FusedAdamW` (the same updates, fused).

  Gradient clipping is not configured here: the train step clips the all-reduced gradient
  itself so that clipping sees the global gradient under a distribution strategy.

  Args:
    model: a built model (its trainable variables decide the decay groups).
    train_config: learning rate, epochs, weight decay, EMA.
    model_config: sensitivity parametrization and kernel policy.
    steps_per_epoch: optimizer steps per epoch.
  """
  schedule = schedules.WarmupCosineDecay(
      base_lr=train_config.learning_rate,
      warmup_steps=train_config.warmup_epochs * steps_per_epoch,
      total_steps=(train_config.epochs + train_config.warmup_epochs) * steps_per_epoch)
  use_ema = train_config.ema_decay > 0
  settings = dict(learning_rate=schedule, weight_decay=train_config.weight_decay, beta_1=0.9,
                  beta_2=0.999, epsilon=1e-8, use_ema=use_ema,
                  ema_momentum=train_config.ema_decay if use_ema else 0.99)
  if kernels.resolve(model_config.kernel_policy) != "reference":
    optimizer = FusedAdamW(epsilon_form=train_config.adamw_form, **settings)
  elif train_config.adamw_form == "pytorch":
    optimizer = PyTorchAdamW(**settings)
  else:
    optimizer = keras.optimizers.AdamW(**settings)
  decayed = {id(v) for v in decayed_variables(model, train_config, model_config)}
  optimizer.exclude_from_weight_decay(
      var_list=[v for v in model.trainable_variables if id(v) not in decayed])
  if train_config.mixed_precision == "mixed_float16":
    optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
  return optimizer


def base_optimizer(optimizer: keras.optimizers.Optimizer) -> keras.optimizers.Optimizer:
  """The AdamW inside a LossScaleOptimizer (or the optimizer itself)."""
  return getattr(optimizer, "inner_optimizer", optimizer)


@contextlib.contextmanager
def ema_weights(model: keras.Model, optimizer: keras.optimizers.Optimizer):
  """Temporarily loads the EMA weights into `model` (no-op without EMA or before training).

  Keras 3.15's `SwapEMAWeights` callback never swaps back after predict; this context manager
  swaps in, yields, and always swaps back.
  """
  opt = base_optimizer(optimizer)
  averages = getattr(opt, "_model_variables_moving_average", None)
  if not opt.use_ema or not averages or int(opt.iterations.numpy()) == 0:
    yield
    return
  variables = model.trainable_variables
  _check_same_length(variables, averages)
  originals = [v.numpy() for v in variables]
  for v, avg in zip(variables, averages):
    v.assign(avg)
  try:
    yield
  finally:
    for v, orig in zip(variables, originals):
      v.assign(orig)


def ema_variables(optimizer: keras.optimizers.Optimizer) -> List:
  """The optimizer's EMA of the trainable variables, in their order ([] without EMA)."""
  opt = base_optimizer(optimizer)
  return list(getattr(opt, "_model_variables_moving_average", None) or []) if opt.use_ema else []


def copy_ema_into_model(model: keras.Model, optimizer: keras.optimizers.Optimizer) -> bool:
  """Overwrites the model's weights with their EMA (for export). Returns False without EMA."""
  opt = base_optimizer(optimizer)
  averages = getattr(opt, "_model_variables_moving_average", None)
  if not opt.use_ema or not averages or int(opt.iterations.numpy()) == 0:
    return False
  _check_same_length(model.trainable_variables, averages)
  for v, avg in zip(model.trainable_variables, averages):
    v.assign(avg)
  return True


def _check_same_length(variables: Sequence, averages: Sequence) -> None:
  if len(variables) != len(averages):
    raise ValueError(f"the optimizer tracks {len(averages)} EMA variables but the model has "
                     f"{len(variables)} trainable variables: was the optimizer built for "
                     "another model?")
