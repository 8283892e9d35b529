"""Action Sensitivity Evaluator: class-level Gaussians (verified), instance evaluator, ASCL."""

import inspect
import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from asl_tf import config as config_lib
from asl_tf import losses
from asl_tf import targets as targets_lib
from asl_tf.modeling import sensitivity

AUTHORS_NAMES = ["mu", "sigma", "mu_reg_left", "sigma_reg_left", "mu_reg_right",
                 "sigma_reg_right"]
_INIT_VALUE = {"mu": 0.0, "sigma": 1.0, "mu_reg_left": -0.5, "sigma_reg_left": 1.0,
               "mu_reg_right": 0.5, "sigma_reg_right": 1.0}


def _one_gt_case():
  """K = 2, GT [0, 8] with label 1; level 0 t = 0..7 (stride 1), level 1 t = 0, 2, 4, 6
  (stride 2), ranges (0, 100), radius 1.5. Positives: level 0 window (2.5, 5.5) -> t 3, 4, 5;
  level 1 window (1, 7) -> t 2, 4, 6."""
  points = np.array([[t, 0, 100, 1] for t in range(8)] + [[t, 0, 100, 2] for t in (0, 2, 4, 6)],
                    np.float32)
  segments = np.array([[[0.0, 8.0]]], np.float32)
  labels = np.array([[1]], np.int32)
  return points, segments, labels, targets_lib.assign_targets(points, segments, labels, 2)


def test_class_level_weights_match_authors_formula_golden():
  """Verified behaviour (docs/method.md 1): x = (c - t) / (stride L), unnormalised Gaussians
  gathered with the GT's label; p_loc = mean(left, right) * p_cls; 1 on negatives.

  Class 1 set to mu 0.1, sigma 0.5, mu_left -0.5, sigma_left 1, mu_right 0.5, sigma_right 2
  (class 0 keeps the initial values, so a wrong gather shows). c = 4, L = 8:
  level 0 t 3 -> x = 1/8; t 4 -> 0; t 5 -> -1/8; level 1 t 2 -> 2/16; t 4 -> 0; t 6 -> -2/16.
  x = 0.125: g_cls = exp(-(0.025)^2 / 0.5) = exp(-0.00125), g_left = exp(-(0.625)^2 / 2) =
    exp(-0.1953125), g_right = exp(-(0.375)^2 / 8) = exp(-0.017578125).
  x = 0: exp(-0.01 / 0.5) = exp(-0.02); exp(-0.125); exp(-0.25 / 8) = exp(-0.03125).
  x = -0.125: exp(-(0.225)^2 / 0.5) = exp(-0.10125); exp(-(0.375)^2 / 2) = exp(-0.0703125);
    exp(-(0.625)^2 / 8) = exp(-0.048828125).
  """
  points, segments, labels, targets = _one_gt_case()
  evaluator = sensitivity.ActionSensitivityEvaluator(
      2, 8, class_sensitivity=True, instance_sensitivity=False, contrastive=False)
  layer = evaluator.class_level
  for name, value in zip(AUTHORS_NAMES, [0.1, 0.5, -0.5, 1.0, 0.5, 2.0]):
    var = next(v for v in layer.weights if v.name == name)
    var.assign([_INIT_VALUE[name], value])
  out = evaluator([], [], points, segments, labels, targets)
  e = math.exp
  per_x = {
      0.125: (e(-0.00125), e(-0.1953125), e(-0.017578125)),
      0.0: (e(-0.02), e(-0.125), e(-0.03125)),
      -0.125: (e(-0.10125), e(-0.0703125), e(-0.048828125)),
  }
  xs = [None, None, None, 0.125, 0.0, -0.125, None, None, None, 0.125, 0.0, -0.125]
  expected_cls = [1.0 if x is None else per_x[x][0] for x in xs]
  expected_loc = [1.0 if x is None else 0.5 * (per_x[x][1] + per_x[x][2]) * per_x[x][0]
                  for x in xs]
  np.testing.assert_allclose(out["p_cls"].numpy()[0], expected_cls, rtol=1e-6)
  np.testing.assert_allclose(out["p_loc"].numpy()[0], expected_loc, rtol=1e-6)


def test_authors_parameter_names_shapes_and_initial_values():
  layer = sensitivity.ClassSensitivity(3)
  assert [v.name for v in layer.weights] == AUTHORS_NAMES
  for var in layer.weights:
    assert tuple(var.shape) == (3,) and var.trainable
    np.testing.assert_array_equal(var.numpy(), [_INIT_VALUE[var.name]] * 3)
  assert len(layer.sensitivity_variables) == 6


def test_gradient_reaches_mu_and_sigma_of_the_gt_class_only():
  points, segments, labels, targets = _one_gt_case()
  evaluator = sensitivity.ActionSensitivityEvaluator(
      2, 8, class_sensitivity=True, instance_sensitivity=False, contrastive=False)
  with tf.GradientTape() as tape:
    out = evaluator([], [], points, segments, labels, targets)
    loss = tf.reduce_sum(out["p_cls"]) + tf.reduce_sum(out["p_loc"])
  grads = tape.gradient(loss, evaluator.sensitivity_variables)
  assert all(g is not None for g in grads)
  grads = [tf.convert_to_tensor(g) for g in grads]
  for var, grad in zip(evaluator.sensitivity_variables, grads):
    assert grad.numpy()[0] == 0.0, var.name  # class 0 has no positive
  # The positives sit at x in {0.125, 0, -0.125}: a symmetric set around mu = 0, so d/dmu of
  # the cls Gaussian cancels, but every sigma and both (asymmetric) loc means move.
  for name in ("sigma", "mu_reg_left", "sigma_reg_left", "mu_reg_right", "sigma_reg_right"):
    index = AUTHORS_NAMES.index(name)
    assert abs(grads[index].numpy()[1]) > 1e-3, name


def test_stable_parametrization_starts_at_sigma_one_and_stays_positive():
  layer = sensitivity.ClassSensitivity(4, parametrization="stable")
  assert [v.name for v in layer.weights] == [
      "mu", "sigma_rho", "mu_reg_left", "sigma_reg_left_rho", "mu_reg_right",
      "sigma_reg_right_rho"]
  params = layer.gaussian_parameters()
  assert list(params) == AUTHORS_NAMES
  for name, value in params.items():
    np.testing.assert_allclose(value.numpy(), [_INIT_VALUE[name]] * 4, rtol=1e-6)
  authors = sensitivity.ClassSensitivity(4)
  x = tf.constant([0.3, -0.2, 0.0, 0.1])
  labels = tf.constant([0, 1, 2, 3])
  for got, want in zip(layer(x, labels), authors(x, labels)):
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-6)
  layer.weights[1].assign([-50.0] * 4)  # rho -> -inf: sigma floors at SIGMA_FLOOR
  np.testing.assert_allclose(layer.sigmas()[0].numpy(), [sensitivity.SIGMA_FLOOR] * 4)
  with pytest.raises(ValueError, match="parametrization"):
    sensitivity.ClassSensitivity(2, parametrization="softplus")


def test_stable_sigma_floor_bounds_sigma_and_still_starts_at_one():
  layer = sensitivity.ClassSensitivity(2, parametrization="stable", sigma_floor=0.1)
  np.testing.assert_allclose(layer.sigmas()[0].numpy(), [1.0, 1.0], rtol=1e-6)
  layer.weights[1].assign([-50.0, 0.0])  # sigma = softplus(rho) + 0.1
  np.testing.assert_allclose(layer.sigmas()[0].numpy(), [0.1, np.log(2.0) + 0.1], rtol=1e-6)
  # g(x = 0.1; mu 0, sigma 0.1) = exp(-0.5): the floor bounds how narrow the weights become.
  g_cls, _ = layer(tf.constant([0.1]), tf.constant([0]))
  np.testing.assert_allclose(g_cls.numpy(), [np.exp(-0.5)], rtol=1e-5)
  assert sensitivity.ClassSensitivity.from_config(layer.get_config()).sigma_floor == 0.1
  with pytest.raises(ValueError, match=r"sigma_floor must be in \(0, 1\)"):
    sensitivity.ClassSensitivity(2, parametrization="stable", sigma_floor=1.0)


def test_class_sensitivity_stays_float32_under_mixed_precision():
  layer = sensitivity.ClassSensitivity(2, dtype="mixed_float16")
  g_cls, g_loc = layer(tf.constant([0.1], tf.float16), tf.constant([0]))
  assert g_cls.dtype == tf.float32 and g_loc.dtype == tf.float32
  assert all(v.dtype == "float32" for v in layer.weights)
  np.testing.assert_allclose(g_cls.numpy(), [math.exp(-0.005)], rtol=1e-3)  # x from fp16


def _levels(batch=2, lengths=(9, 5, 3), channels=8, seed=0):
  rng = np.random.default_rng(seed)
  feats = [tf.constant(rng.normal(size=(batch, t, channels)), tf.float32) for t in lengths]
  valid = [7, 4, 2]  # second video shorter on every level
  masks = [np.stack([np.ones(t, bool), np.arange(t) < v]) for t, v in zip(lengths, valid)]
  return feats, masks


def test_instance_evaluator_shapes_range_and_stop_gradient():
  feats, masks = _levels()
  layer = sensitivity.InstanceEvaluator(6, num_layers=2)
  with tf.GradientTape() as tape:
    tape.watch(feats)
    q = layer(feats, masks)
  assert tuple(q.shape) == (2, 17, 2) and q.dtype == tf.float32
  assert ((q.numpy() > 0) & (q.numpy() < 1)).all()
  assert all(g is None for g in tape.gradient(q, feats))
  assert len(layer.hidden) == 2 and len(layer.trainable_weights) == 2 + 4 + 2


def test_instance_evaluator_feature_gradient_reaches_the_valid_frames_only():
  """With `feature_gradient` the features get the gradient of q (the same q as without), and
  none at padded frames (they are zeroed before the convolutions)."""
  feats, masks = _levels()
  detached = sensitivity.InstanceEvaluator(6, num_layers=2)
  layer = sensitivity.InstanceEvaluator(6, num_layers=2, feature_gradient=True)
  q_detached = detached(feats, masks).numpy()
  layer(feats, masks)
  layer.set_weights(detached.get_weights())
  with tf.GradientTape() as tape:
    tape.watch(feats)
    q = layer(feats, masks)
  np.testing.assert_allclose(q.numpy(), q_detached, rtol=1e-6)
  for g, m in zip(tape.gradient(q, feats), masks):
    g = np.abs(g.numpy()).sum(-1)
    assert (g[m] > 0).all() and (g[~m] == 0).all()


@pytest.mark.parametrize("num_layers", [0, 2])  # the default, and with hidden layers
def test_instance_evaluator_ignores_padded_inputs(num_layers):
  feats, masks = _levels()
  layer = sensitivity.InstanceEvaluator(6, num_layers=num_layers)
  q = layer(feats, masks).numpy()
  noisy = [tf.where(m[..., None], f, 1e3) for f, m in zip(feats, masks)]
  q_noisy = layer(noisy, masks).numpy()
  valid = np.concatenate(masks, axis=1)
  np.testing.assert_allclose(q_noisy[valid], q[valid], rtol=1e-5, atol=1e-6)


def test_instance_evaluator_traced_first_in_a_graph_with_dynamic_lengths():
  """Built inside a tf.function over unknown lengths (its bias-free convs must keep the channel
  count for the norms' weights); `training` reaches the norms: only the inference trace takes the
  oneDNN LayerNorm form (under the `fast` policy)."""
  feats, masks = _levels()
  layer = sensitivity.InstanceEvaluator(6, num_layers=2, kernel_policy="fast")
  specs = ([tf.TensorSpec([None, None, feats[0].shape[-1]], tf.float32)] * 3,
           [tf.TensorSpec([None, None], tf.bool)] * 3)
  ops = {}
  for training in (True, False):
    fn = tf.function(lambda f, m, training=training: layer(f, m, training=training))
    graph = fn.get_concrete_function(*specs).graph
    ops[training] = {op.type for op in graph.get_operations()}
    q = fn(feats, [tf.constant(m) for m in masks])
    assert tuple(q.shape) == (2, 17, 2)
  assert "FusedBatchNormV3" not in ops[True]
  assert "FusedBatchNormV3" in ops[False]


def test_instance_evaluator_mixed_precision():
  feats, masks = _levels()
  q = sensitivity.InstanceEvaluator(6, dtype="mixed_float16")(feats, masks)
  assert q.dtype == tf.float32 and np.isfinite(q.numpy()).all()


def test_contrastive_projection_unit_norm():
  x = tf.constant(np.random.default_rng(1).normal(size=(2, 5, 8)), tf.float32)
  keras.utils.set_random_seed(0)
  for dim, out_dim in [(0, 8), (32, 32)]:
    y = sensitivity.ContrastiveProjection(dim)(x).numpy()
    assert y.shape == (2, 5, out_dim)
    np.testing.assert_allclose(np.linalg.norm(y, axis=-1), 1.0, rtol=1e-5)


def test_sample_contrastive_features_golden():
  """T = 10 points with one-hot embeddings e_t (so picks are readable); point 9 is padding.

  GT0 [1, 4] label 0: inside 1..4; rank_cls favours 2, 3 -> f_cls = (e2 + e3) / sqrt 2;
  rank_loc favours 1, 4 -> f_loc = (e1 + e4) / sqrt 2. GT1 [6, 8] label 1: rank_cls favours 7, 6;
  rank_loc 8, 6. GT2 [4.2, 4.8] holds no point -> invalid. GT3 is padding. Background
  candidates (valid, outside every GT): 0 and 5; asking for 4 gives both (ranks 0, 1, two
  invalid slots); asking for 1 gives rank floor(0.5 * 2 / 1) = 1 -> point 5.
  """
  t = np.arange(10, dtype=np.float32)
  emb = tf.constant(np.eye(10, dtype=np.float32)[None])
  mask = tf.constant((np.arange(10) < 9)[None])
  segments = tf.constant([[[1, 4], [6, 8], [4.2, 4.8], [0, 9]]], tf.float32)
  labels = tf.constant([[0, 1, 0, -1]])
  rank_cls = np.zeros((1, 10, 4), np.float32)
  rank_loc = np.zeros((1, 10, 4), np.float32)
  rank_cls[0, [2, 3], 0] = [0.9, 0.8]
  rank_loc[0, [1, 4], 0] = [0.9, 0.8]
  rank_cls[0, [7, 6], 1] = [0.9, 0.8]
  rank_loc[0, [8, 6], 1] = [0.9, 0.8]
  feats, labels_out, valid = losses.sample_contrastive_features(
      emb, mask, t, segments, labels, rank_cls, rank_loc, topk=2, num_background=4)
  r = 1 / math.sqrt(2)
  expected = np.zeros((12, 10), np.float32)
  expected[0, [2, 3]] = r
  expected[1, [6, 7]] = r
  expected[4, [1, 4]] = r
  expected[5, [6, 8]] = r
  expected[8, 0] = 1
  expected[9, 5] = 1
  np.testing.assert_allclose(feats.numpy()[[0, 1, 4, 5, 8, 9]], expected[[0, 1, 4, 5, 8, 9]],
                             atol=1e-6)
  np.testing.assert_array_equal(labels_out.numpy(), [0, 1, 0, -1, 0, 1, 0, -1, -1, -1, -1, -1])
  np.testing.assert_array_equal(valid.numpy(), [1, 1, 0, 0, 1, 1, 0, 0, 1, 1, 0, 0])
  feats, _, valid = losses.sample_contrastive_features(
      emb, mask, t, segments, labels, rank_cls, rank_loc, topk=2, num_background=1)
  np.testing.assert_array_equal(feats.numpy()[-1], np.eye(10)[5])
  assert valid.numpy()[-1]


def test_sample_window_features_golden():
  """T = 12 points with one-hot embeddings e_t; point 11 is padding; ratio 0.2, gap 1.

  GT0 [3, 7] (label 0): half-width max(0.8, 1) = 1, centre window [4, 6]; boundary windows
  [3, 4] and [6, 7]; outside windows [1, 2] and [8, 9]. GT1 [0, 10] (label 1): half-width 2,
  centre [3, 7], boundary [0, 2] and [8, 10] (three points each); outside [-3, -1] and [11, 13]
  hold no valid point -> invalid. GT2 [8.5, 10.5] (label 0): centre [8.5, 10.5] -> 9, 10;
  boundary [8.5, 9.5] -> 9 and [9.5, 10.5] -> 10; outside [6.5, 7.5] -> 7 and [11.5, 12.5] ->
  nothing, so the outside feature is e7 alone. GT3 [8, 10.8] (label 1): boundary windows [8, 9]
  (two points) and [9.8, 10.8] (one): the mean of the two means, (e8 + e9) / 4 + e10 / 2, not
  the pooled (e8 + e9 + e10) / 3; outside [6, 7] and nothing. GT4 is padding.
  """
  t = np.arange(12, dtype=np.float32)
  emb = tf.constant(np.eye(12, dtype=np.float32)[None])
  mask = tf.constant((np.arange(12) < 11)[None])
  segments = tf.constant([[[3, 7], [0, 10], [8.5, 10.5], [8, 10.8], [0, 0]]], tf.float32)
  labels = tf.constant([[0, 1, 0, 1, -1]])
  feats, labels_out, valid = losses.sample_window_features(
      emb, mask, t, segments, labels, window_ratio=0.2, gap_grid=1.0)

  def unit(*weights):
    v = np.zeros(12, np.float32)
    for point, weight in weights:
      v[point] += weight
    return v / np.linalg.norm(v)

  def even(*points):
    return unit(*((p, 1.0) for p in points))

  expected = {0: even(4, 5, 6), 1: even(3, 4, 5, 6, 7), 2: even(9, 10), 3: even(9, 10),
              5: even(3, 4, 6, 7), 6: even(0, 1, 2, 8, 9, 10), 7: even(9, 10),
              8: unit((8, 0.25), (9, 0.25), (10, 0.5)),
              10: even(1, 2, 8, 9), 12: even(7), 13: even(6, 7)}
  for row, vector in expected.items():
    np.testing.assert_allclose(feats.numpy()[row], vector, atol=1e-6, err_msg=str(row))
  np.testing.assert_array_equal(labels_out.numpy(), [0, 1, 0, 1, -1] * 2 + [-1] * 5)
  np.testing.assert_array_equal(valid.numpy(), [1, 1, 1, 1, 0] * 2 + [1, 0, 1, 1, 0])
  feats, _, _ = losses.sample_window_features(emb, mask, t, segments, labels, window_ratio=0.2,
                                              gap_grid=0.0)
  np.testing.assert_allclose(feats.numpy()[10], even(2, 3, 7, 8), atol=1e-6)
  # Clear background: every outside window above lies inside GT1 [0, 10] -> all invalid. GT
  # [3, 5] beside GT [7, 9]: its outside windows [1, 2] and [6, 7] lose frame 7.
  _, _, valid = losses.sample_window_features(emb, mask, t, segments, labels, window_ratio=0.2,
                                              gap_grid=1.0, clear_background=True)
  np.testing.assert_array_equal(valid.numpy()[10:], [0, 0, 0, 0, 0])
  feats, _, valid = losses.sample_window_features(
      emb, mask, t, tf.constant([[[3, 5], [7, 9]]], tf.float32), tf.constant([[0, 1]]),
      window_ratio=0.2, gap_grid=1.0, clear_background=True)
  np.testing.assert_allclose(feats.numpy()[4], unit((1, 0.25), (2, 0.25), (6, 0.5)), atol=1e-6)
  assert valid.numpy()[4]


def _pyramid_inputs(labels, segments, seed=0):
  """Two levels (T 16 and 8, strides 1 and 2), batch 2, C 8."""
  rng = np.random.default_rng(seed)
  points = np.array([[t, 0, 8, 1] for t in range(16)] + [[t, 8, 1e4, 2] for t in range(0, 16, 2)],
                    np.float32)
  feats = [tf.constant(rng.normal(size=(2, n, 8)), tf.float32) for n in (16, 8)]
  masks = [np.ones((2, 16), bool), np.ones((2, 8), bool)]
  outputs = {
      "cls_logits": tf.constant(rng.normal(size=(2, 24, 3)), tf.float32),
      "offsets": tf.constant(rng.uniform(0.5, 3, size=(2, 24, 2)), tf.float32),
      "padding_mask": np.concatenate(masks, axis=1),
  }
  return points, feats, masks, outputs, np.array(segments, np.float32), np.array(labels)


@pytest.mark.parametrize("labels,num_anchors,sampling", [
    ([[-1, -1], [-1, -1]], 0, "sensitivity_topk"),   # no instance in the batch
    # One instance: its two features (cls and loc, or centre and boundary) are each other's pair.
    ([[2, -1], [-1, -1]], 2, "sensitivity_topk"),
    ([[2, -1], [-1, -1]], 2, "windows"),
])
def test_full_asl_loss_is_finite_with_zero_or_one_instance(labels, num_anchors, sampling):
  points, feats, masks, outputs, segments, labels = _pyramid_inputs(
      labels, [[[3, 9], [0, 0]], [[0, 0], [0, 0]]])
  evaluator = sensitivity.ActionSensitivityEvaluator(3, 8, class_sensitivity=True,
                                                     contrastive_proj_dim=4)
  cfg = config_lib.LossConfig(contrastive_sampling=sampling)
  targets = targets_lib.assign_targets(points, segments, labels, 3, 1.5, outputs["padding_mask"])
  with tf.GradientTape() as tape:
    tape.watch(feats)
    sens = evaluator(feats, masks, points, segments, labels, targets)
    sums = losses.asl_loss_sums(outputs, targets, sens, segments, labels, cfg)
    total = losses.combine_losses(sums, 50.0, sums["contrastive_num_anchors"], cfg, 0.1)
  assert float(sums["contrastive_num_anchors"]) == num_anchors
  for key, value in total.items():
    assert np.isfinite(value.numpy()), key
  if num_anchors == 0:
    assert float(sums["reg_loss_sum"]) == 0.0 and float(sums["contrastive_loss_sum"]) == 0.0
    assert float(sums["evaluator_loss_sum"]) == 0.0
  else:
    assert float(sums["num_pos"]) > 0 and float(sums["contrastive_loss_sum"]) > 0
  grads = tape.gradient(total["total_loss"], evaluator.trainable_variables + feats)
  for grad in grads:
    if grad is not None:
      assert np.isfinite(tf.convert_to_tensor(grad).numpy()).all()

  @tf.function(reduce_retracing=True)
  def graph_sums(level_feats):
    graph_targets = targets_lib.assign_targets(points, segments, labels, 3, 1.5,
                                               outputs["padding_mask"])
    graph_sens = evaluator(level_feats, masks, points, segments, labels, graph_targets)
    return losses.asl_loss_sums(outputs, graph_targets, graph_sens, segments, labels, cfg)

  for key, value in graph_sums(feats).items():
    np.testing.assert_allclose(value.numpy(), sums[key].numpy(), rtol=1e-5, err_msg=key)


def test_switches_select_the_outputs():
  points, feats, masks, outputs, segments, labels = _pyramid_inputs(
      [[2, -1], [0, -1]], [[[3, 9], [0, 0]], [[1, 4], [0, 0]]])
  targets = targets_lib.assign_targets(points, segments, labels, 3)
  off = sensitivity.ActionSensitivityEvaluator(
      3, 8, class_sensitivity=False, instance_sensitivity=False, contrastive=False)
  out = off(feats, masks, points, segments, labels, targets)
  assert sorted(out) == ["p_cls", "p_loc"] and not off.weights
  np.testing.assert_array_equal(out["p_cls"].numpy(), np.ones((2, 24)))
  on = sensitivity.ActionSensitivityEvaluator(3, 8, class_sensitivity=True,
                                              contrastive_proj_dim=0)
  out = on(feats, masks, points, segments, labels, targets)
  assert {"q", "embeddings", "rank_cls", "rank_loc"} <= set(out)
  assert tuple(out["embeddings"].shape) == (2, 16, 8)
  assert tuple(out["rank_cls"].shape) == (2, 16, 2)
  assert len(on.sensitivity_variables) == 6
  assert not set(map(id, on.sensitivity_variables)) & set(
      map(id, on.instance_level.trainable_variables))


def test_the_evaluators_defaults_are_the_configs():
  """A layer built without arguments is the one the shipped config builds (class level off,
  instance level on, no hidden evaluator layer, no projection, ...)."""
  params = inspect.signature(sensitivity.ActionSensitivityEvaluator.__init__).parameters
  shipped = config_lib.ModelConfig()
  named = [p for p in params
           if hasattr(shipped, p) and params[p].default is not inspect.Parameter.empty]
  assert len(named) == 9, named  # the switches and kernel_policy
  for name in named:
    assert params[name].default == getattr(shipped, name), name
  assert params["contrastive"].default == (shipped.contrastive_weight > 0)


def test_lr_scale_gives_the_same_weights_and_a_proportionally_larger_adam_step():
  """lr_scale stores mu / sigma divided by it: same Gaussians at the start, and one Adam step
  (about lr in the stored value) moves mu lr_scale times further."""
  x = tf.constant([[0.3, -0.2, 0.0]])
  labels = tf.constant([[0, 1, 1]])
  moved = {}
  for scale in (1.0, 50.0):
    layer = sensitivity.ClassSensitivity(2, lr_scale=scale)
    g_cls, g_loc = layer(x, labels)
    np.testing.assert_allclose(g_cls.numpy(), np.exp(-x.numpy() ** 2 / 2), rtol=1e-6)
    optimizer = keras.optimizers.Adam(learning_rate=1e-3)
    with tf.GradientTape() as tape:
      loss = tf.reduce_sum(layer(x, labels)[0])
    optimizer.apply_gradients(zip(tape.gradient(loss, layer.trainable_variables),
                                  layer.trainable_variables))
    moved[scale] = layer.gaussian_parameters()["mu"].numpy()
  np.testing.assert_allclose(moved[50.0], 50.0 * moved[1.0], rtol=1e-3)
  assert abs(moved[1.0][0]) == pytest.approx(1e-3, rel=1e-3)
