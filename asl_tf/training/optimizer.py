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
class FusedAdamW(keras.optimizers.AdamW):
  """`keras.optimizers.AdamW` with one fused kernel per variable (the `fast` / `portable` form).

  The same updates up to float32 rounding (the kernel's 1 - beta_2 is 1 - float32(0.999), 1.3e-5
  below Keras' float32(0.001)), in the same order per variable: the decoupled decay
  `var -= var * wd * lr`, then Adam's moments and step in one `ResourceApplyAdam`
  (`alpha = lr sqrt(1 - beta_2^t) / (1 - beta_1^t)`, `var -= alpha m / (sqrt(v) + eps)`), then
  the EMA. The step's scalars (learning rate, beta powers, EMA momentum) are computed once per
  `apply` rather than once per variable. Keras' form spends ~64 graph ops per variable, half of
  the bench config's training-step graph; this one ~12 (README, Benchmarks: memory). Its state
  is Keras AdamW's, so checkpoints of either load into the other.
  """

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    if self.amsgrad:
      raise ValueError("FusedAdamW has no amsgrad form; use keras.optimizers.AdamW")
    self._step_scalars = []

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
    scalars = (tf.cast(learning_rate, dtype), tf.pow(beta_1, step), tf.pow(beta_2, step), beta_1,
               beta_2, tf.cast(self.epsilon, dtype), tf.cast(self.weight_decay, dtype))
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
  """AdamW (betas 0.9 / 0.999) with the warm-up cosine schedule and optional EMA.

  Under the `reference` kernel policy Keras' AdamW, else `FusedAdamW` (the same updates).

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
  adamw = (keras.optimizers.AdamW if kernels.resolve(model_config.kernel_policy) == "reference"
           else FusedAdamW)
  optimizer = adamw(
      learning_rate=schedule, weight_decay=train_config.weight_decay, beta_1=0.9,
      beta_2=0.999, epsilon=1e-8, use_ema=use_ema,
      ema_momentum=train_config.ema_decay if use_ema else 0.99)
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
