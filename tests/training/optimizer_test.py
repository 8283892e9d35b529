"""AdamW: PyTorch's update (golden values), FusedAdamW equal to its unfused forms (decay groups,
schedule, EMA), checkpoints shared between the forms, and which form the policy chooses."""

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


def _optimizer(cls, variables, use_ema=True, **kwargs):
  schedule = schedules.WarmupCosineDecay(base_lr=1e-2, warmup_steps=2, total_steps=8)
  optimizer = cls(learning_rate=schedule, weight_decay=0.05, beta_1=0.9, beta_2=0.999,
                  epsilon=1e-8, use_ema=use_ema, ema_momentum=0.9, **kwargs)
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


# Each form's unfused optimizer, and FusedAdamW's arguments for it.
_FORMS = {"pytorch": (optimizer_lib.PyTorchAdamW, {"epsilon_form": "pytorch"}),
          "keras": (keras.optimizers.AdamW, {"epsilon_form": "keras"})}


def _fused(form):
  return lambda **kwargs: optimizer_lib.FusedAdamW(**_FORMS[form][1], **kwargs)


def test_pytorch_form_golden_first_step_at_a_gradient_near_epsilon():
  """Step 1, constant lr 0.01, no decay, g = 1e-8 = epsilon: PyTorch's AdamW moves the weight by
  lr * g / (|g| + eps) = lr / 2 = 5e-3 (m, v bias-corrected to g, g^2); Keras' form by
  lr sqrt(1 - b2) / (1 - b1) * 0.1 g / (sqrt(0.001) g + eps) = 0.31623 * 0.096935 lr =
  3.0654e-4: 16x less, the gap that held back the weights under LayerScale."""
  moved = {}
  for name, cls in (("pytorch", optimizer_lib.PyTorchAdamW), ("fused_pytorch", _fused("pytorch")),
                    ("keras", keras.optimizers.AdamW), ("fused_keras", _fused("keras"))):
    variable = keras.Variable(np.float32(1.0), name="scale")
    optimizer = cls(learning_rate=0.01, weight_decay=0.0, epsilon=1e-8)
    optimizer.build([variable])
    optimizer.apply([tf.constant(1e-8, tf.float32)], [variable])
    moved[name] = 1.0 - float(variable.numpy())
  np.testing.assert_allclose([moved["pytorch"], moved["fused_pytorch"]], 5e-3, rtol=1e-4)
  np.testing.assert_allclose([moved["keras"], moved["fused_keras"]], 3.0654e-4, rtol=1e-3)


def _pytorch_adamw(weights, grads, lrs, decay_mask, wd=0.05, b1=0.9, b2=0.999, eps=1e-8):
  """PyTorch's AdamW step by step in float64 (torch.optim.AdamW's documented algorithm)."""
  weights = [w.astype(np.float64) for w in weights]
  m = [np.zeros_like(w) for w in weights]
  v = [np.zeros_like(w) for w in weights]
  for t, (step_grads, lr) in enumerate(zip(grads, lrs), start=1):
    for i, g in enumerate(step_grads):
      g = np.asarray(g, np.float64)
      if decay_mask[i]:
        weights[i] = weights[i] * (1 - lr * wd)
      m[i] = b1 * m[i] + (1 - b1) * g
      v[i] = b2 * v[i] + (1 - b2) * g * g
      denominator = np.sqrt(v[i]) / np.sqrt(1 - b2 ** t) + eps
      weights[i] = weights[i] - lr / (1 - b1 ** t) * m[i] / denominator
  return weights


@pytest.mark.parametrize("scale", [1.0, 1e-8])
def test_pytorch_forms_follow_pytorchs_algorithm(scale):
  """Six steps of warm-up and cosine decay, the kernel decayed, gradients of size 1 and of size
  1e-8 (where the epsilon forms differ most): both PyTorch forms track a float64 transcription
  of torch.optim.AdamW."""
  grads = [[g * scale for g in step] for step in _gradients(6)]
  schedule = schedules.WarmupCosineDecay(base_lr=1e-2, warmup_steps=2, total_steps=8)
  lrs = [float(schedule(step)) for step in range(6)]
  expected = _pytorch_adamw([v.numpy() for v in _variables()], grads, lrs, [True, False, False])
  for cls in (optimizer_lib.PyTorchAdamW, _fused("pytorch")):
    variables = _variables()
    optimizer = _optimizer(cls, variables, use_ema=False)
    for step_grads in grads:
      optimizer.apply(step_grads, variables)
    for got, want in zip(variables, expected):
      np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("form", sorted(_FORMS))
@pytest.mark.parametrize("graph", [False, True])
def test_fused_adamw_equals_its_unfused_form_with_decay_groups_schedule_and_ema(graph, form):
  """Six steps through warm-up and cosine decay: weights, both moments and the EMA agree to
  float32 rounding (the kernel's 1 - beta_2 = 1 - float32(0.999) is 1.3e-5 below Keras'
  float32(0.001)); a decay applied twice or not at all would be off by lr * wd = 5e-4 a step."""
  results = []
  for cls in (_FORMS[form][0], _fused(form)):
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
  optimizer = _optimizer(_fused(form), variables)
  optimizer.exclude_from_weight_decay(var_list=variables)
  for grads in _gradients(6):
    optimizer.apply(grads, variables)
  assert np.abs(variables[0].numpy() - results[1][0]).max() > 1e-5
  np.testing.assert_allclose(variables[1].numpy(), results[1][1], rtol=1e-6)


def test_under_a_loss_scale_optimizer_fused_equals_unfused_and_skips_the_same_step():
  """mixed_float16 wraps the AdamW: scaled gradients, one non-finite step skipped by both."""
  results = []
  for cls in (optimizer_lib.PyTorchAdamW, optimizer_lib.FusedAdamW):
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
  assert types.count("Sqrt") == 1  # PyTorch's epsilon scale sqrt(1 - beta_2^t), once
  assert types.count("Cos") == 1  # the schedule, once


@pytest.mark.parametrize("saved_cls,loaded_cls", [
    (keras.optimizers.AdamW, optimizer_lib.FusedAdamW),
    (optimizer_lib.FusedAdamW, optimizer_lib.PyTorchAdamW),
    (optimizer_lib.PyTorchAdamW, keras.optimizers.AdamW)])
def test_every_adamw_form_reads_the_others_checkpoints(tmp_path, saved_cls, loaded_cls):
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


@pytest.mark.parametrize("policy,form,expected", [
    ("reference", "pytorch", optimizer_lib.PyTorchAdamW),
    ("reference", "keras", keras.optimizers.AdamW),
    ("fast", "pytorch", optimizer_lib.FusedAdamW), ("portable", "keras", optimizer_lib.FusedAdamW)])
def test_the_kernel_policy_and_adamw_form_choose_the_optimizer(policy, form, expected):
  model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
  optimizer = optimizer_lib.build_optimizer(
      model, config_lib.TrainConfig(adamw_form=form),
      config_lib.ModelConfig(kernel_policy=policy), 10)
  assert type(optimizer) is expected  # pylint: disable=unidiomatic-typecheck
  assert getattr(optimizer, "epsilon_form", form) == form
  assert type(optimizer).from_config(optimizer.get_config()).get_config() == optimizer.get_config()
