"""FusedAdamW: Keras' AdamW updates (decay groups, schedule, EMA) with one kernel per variable."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from asl_tf import config as config_lib
from asl_tf.training import optimizer as optimizer_lib
from asl_tf.training import schedules

_SHAPES = {"kernel": (3, 4), "bias": (4,), "scale": ()}


def _variables(seed=0):
  rng = np.random.default_rng(seed)
  return [keras.Variable(rng.normal(size=shape).astype(np.float32), name=name)
          for name, shape in _SHAPES.items()]


def _optimizer(cls, variables, use_ema=True):
  schedule = schedules.WarmupCosineDecay(base_lr=1e-2, warmup_steps=2, total_steps=8)
  optimizer = cls(learning_rate=schedule, weight_decay=0.05, beta_1=0.9, beta_2=0.999,
                  epsilon=1e-8, use_ema=use_ema, ema_momentum=0.9)
  optimizer.exclude_from_weight_decay(var_list=variables[1:])  # decay the kernel only
  optimizer.build(variables)
  return optimizer


def _gradients(steps, seed=1):
  rng = np.random.default_rng(seed)
  return [[tf.constant(rng.normal(size=shape).astype(np.float32)) for shape in _SHAPES.values()]
          for _ in range(steps)]


def _state(optimizer, variables):
  """Weights, first moments, second moments and EMA, in that order."""
  slots = optimizer._momentums + optimizer._velocities  # pylint: disable=protected-access
  return ([v.numpy() for v in variables] + [s.numpy() for s in slots]
          + [a.numpy() for a in optimizer_lib.ema_variables(optimizer)])


def _apply_fn(optimizer, variables, graph):
  def apply(grads):
    optimizer.apply(grads, variables)
  return tf.function(apply) if graph else apply


@pytest.mark.parametrize("graph", [False, True])
def test_fused_adamw_equals_keras_adamw_with_decay_groups_schedule_and_ema(graph):
  """Six steps through warm-up and cosine decay: weights, both moments and the EMA agree to
  float32 rounding (the kernel's 1 - beta_2 = 1 - float32(0.999) is 1.3e-5 below Keras'
  float32(0.001)); a decay applied twice or not at all would be off by lr * wd = 5e-4 a step."""
  results = []
  for cls in (keras.optimizers.AdamW, optimizer_lib.FusedAdamW):
    variables = _variables()
    optimizer = _optimizer(cls, variables)
    apply = _apply_fn(optimizer, variables, graph)
    for grads in _gradients(6):
      apply(grads)
    results.append(_state(optimizer, variables))
  assert len(results[0]) == 3 * 3 + 3
  for keras_value, fused_value in zip(*results):
    np.testing.assert_allclose(fused_value, keras_value, rtol=2e-5, atol=1e-7)
  # The decayed kernel moved differently from an undecayed copy: the groups took effect.
  variables = _variables()
  optimizer = _optimizer(optimizer_lib.FusedAdamW, variables)
  optimizer.exclude_from_weight_decay(var_list=variables)
  for grads in _gradients(6):
    optimizer.apply(grads, variables)
  assert np.abs(variables[0].numpy() - results[1][0]).max() > 1e-5
  np.testing.assert_allclose(variables[1].numpy(), results[1][1], rtol=1e-6)


def test_under_a_loss_scale_optimizer_fused_equals_keras_and_skips_the_same_step():
  """mixed_float16 wraps the AdamW: scaled gradients, one non-finite step skipped by both."""
  results = []
  for cls in (keras.optimizers.AdamW, optimizer_lib.FusedAdamW):
    variables = _variables()
    inner = _optimizer(cls, variables)
    optimizer = keras.optimizers.LossScaleOptimizer(inner, initial_scale=8.0)
    optimizer.build(variables)
    grads = _gradients(4)
    grads[2][1] = tf.constant([np.inf, 0, 0, 0], tf.float32)
    for step_grads in grads:
      optimizer.apply([g * 8.0 for g in step_grads], variables)
    assert int(inner.iterations.numpy()) == 3
    results.append(_state(inner, variables))
  for keras_value, fused_value in zip(*results):
    np.testing.assert_allclose(fused_value, keras_value, rtol=2e-5, atol=1e-7)


def test_fused_adamw_traces_one_adam_kernel_per_variable_and_the_step_scalars_once():
  variables = _variables()
  optimizer = _optimizer(optimizer_lib.FusedAdamW, variables)
  graph = _apply_fn(optimizer, variables, True).get_concrete_function(_gradients(1)[0]).graph
  types = [op.type for op in graph.get_operations()]
  assert types.count("ResourceApplyAdam") == len(variables)
  assert types.count("Pow") == 2  # beta_1^t and beta_2^t, not once per variable
  assert types.count("Cos") == 1  # the schedule, once


@pytest.mark.parametrize("saved_cls,loaded_cls", [
    (keras.optimizers.AdamW, optimizer_lib.FusedAdamW),
    (optimizer_lib.FusedAdamW, keras.optimizers.AdamW)])
def test_fused_and_keras_adamw_read_each_others_checkpoints(tmp_path, saved_cls, loaded_cls):
  """A run may resume under another kernel policy: the optimizer state is the same objects."""
  variables = _variables()
  optimizer = _optimizer(saved_cls, variables)
  for grads in _gradients(3):
    optimizer.apply(grads, variables)
  path = tf.train.Checkpoint(optimizer=optimizer).save(str(tmp_path / "ckpt"))
  restored_vars = _variables(seed=5)
  restored = _optimizer(loaded_cls, restored_vars)
  tf.train.Checkpoint(optimizer=restored).restore(path).assert_existing_objects_matched()
  assert int(restored.iterations.numpy()) == 3
  for saved, loaded in zip(_state(optimizer, variables)[3:], _state(restored, restored_vars)[3:]):
    np.testing.assert_array_equal(loaded, saved)


@pytest.mark.parametrize("policy,expected", [("reference", keras.optimizers.AdamW),
                                             ("fast", optimizer_lib.FusedAdamW),
                                             ("portable", optimizer_lib.FusedAdamW)])
def test_the_kernel_policy_chooses_the_optimizer_form(policy, expected):
  model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
  optimizer = optimizer_lib.build_optimizer(
      model, config_lib.TrainConfig(), config_lib.ModelConfig(kernel_policy=policy), 10)
  assert type(optimizer) is expected  # pylint: disable=unidiomatic-typecheck
