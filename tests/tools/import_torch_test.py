"""Tests for `python -m asl_tf.tools.import_torch` (PyTorch checkpoint -> asl_tf run folder)."""

import collections
import contextlib
import dataclasses
import io
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from asl_tf import config as config_lib
from asl_tf import flags as asl_flags
from asl_tf import inference
from asl_tf.modeling import sensitivity
from asl_tf.modeling import weight_mapping
from asl_tf.tools import import_torch
from asl_tf.tools import torch_checkpoint
from parity_cases import load_parity_case, parity_file
from torch_checkpoint_test import _reduce_payload, _Storage, _Tensor, _write_zip, _zip_with_pickle

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_ASL_ONLY = ["--class_sensitivity", "--noinstance_sensitivity", "--contrastive_weight=0"]


def _fixture(name):
  return parity_file(name + ".pth.tar")


def _case_flags(case):
  """Command-line flags describing a parity case's model, grid and test settings."""
  mc, meta, test = case.model_config, case.meta, case.meta["test_cfg"]
  flat_ranges = [str(v) for pair in mc.regression_range for v in pair]
  flags = [
      f"--input_dim={mc.input_dim}", f"--num_classes={mc.num_classes}",
      f"--max_seq_len={mc.max_seq_len}", f"--backbone_arch={','.join(map(str, mc.backbone_arch))}",
      f"--embd_dim={mc.embd_dim}", f"--embd_kernel_size={mc.embd_kernel_size}",
      f"--fpn_dim={mc.fpn_dim}", f"--head_dim={mc.head_dim}",
      f"--head_num_layers={mc.head_num_layers}", f"--n_head={mc.n_head}",
      f"--mha_win_size={','.join(map(str, mc.mha_win_size))}",
      f"--use_abs_pe={str(mc.use_abs_pe).lower()}", f"--dropout={mc.dropout}",
      f"--droppath={mc.droppath}", f"--cls_prior_prob={mc.cls_prior_prob}",
      f"--regression_range={','.join(flat_ranges)}", f"--feat_stride={meta['feat_stride']}",
      f"--num_frames={meta['num_frames']}", f"--default_fps={meta['fps']}",
      f"--multiclass_nms={str(test['multiclass_nms']).lower()}",
  ]
  flags += [f"--{k}={test[k]}" for k in ("pre_nms_thresh", "pre_nms_topk", "max_seg_num",
                                         "min_score", "nms_method", "nms_sigma", "iou_threshold",
                                         "voting_thresh", "duration_thresh")]
  return flags


def _run_cli(tmp_dir, flags, *args):
  """Runs `import_torch.main` as the command line would, with `flags` in a flagfile.

  Returns:
    what it printed.
  """
  flagfile = os.path.join(tmp_dir, "model.flags")
  with open(flagfile, "w") as f:
    f.write("\n".join(flags) + "\n")
  asl_flags.FLAGS.unparse_flags()
  out = io.StringIO()
  try:
    asl_flags.parse_argv(["import_torch", f"--flagfile={flagfile}", *args])
    with contextlib.redirect_stdout(out):
      import_torch.main([])
  finally:
    asl_flags.FLAGS.unparse_flags()
  return out.getvalue()


@pytest.fixture(scope="module", params=["thumos_like", "anet_like"])
def imported(request, tmp_path_factory):
  case = load_parity_case(request.param)
  tmp = tmp_path_factory.mktemp(request.param)
  run_dir = str(tmp / "run")
  printed = _run_cli(str(tmp), _case_flags(case) + _ASL_ONLY,
                     f"--torch_checkpoint={_fixture(case.name)}", f"--output={run_dir}",
                     "--allow_missing")
  model, config = inference.load_model(run_dir, use_ema=True)
  return case, model, config, run_dir, printed


def test_fixture_import_writes_a_run_folder_and_reports(imported):
  case, _, config, run_dir, printed = imported
  assert os.path.exists(os.path.join(run_dir, "config.json"))
  assert os.path.exists(os.path.join(run_dir, "checkpoints", "ckpt-35.index"))
  assert config.model == dataclasses.replace(case.model_config, class_sensitivity=True,
                                             instance_sensitivity=False, contrastive_weight=0.0)
  assert f"mapped: {len(case.params)} tensors" in printed
  assert "unused (in the source, not mapped): 0" in printed
  # A plain ActionFormer checkpoint has no ASL parameters: they are named as kept at init.
  kept = printed.split("kept at initialization: ")[1].split("taken from the flags")[0]
  assert kept.split()[0] == "6"
  for name in import_torch.SENSITIVITY_KEYS:
    assert f"class_sensitivity/{name}\n" in kept


def test_fixture_import_reproduces_actionformer_outputs(imported):
  case, model, _, _, _ = imported
  features = np.transpose(case.arrays["input/features"], (0, 2, 1))  # [B, C, T] -> [B, T, C]
  mask = case.arrays["input/mask"]
  out = model(features, mask)
  offset = 0
  for l in range(case.model_config.num_levels):
    valid = case.arrays[f"output/mask_{l}"]
    t_l = valid.shape[1]
    for key in ("cls_logits", "offsets"):
      got = out[key].numpy()[:, offset:offset + t_l][valid]
      want = case.arrays[f"output/{key}_{l}"][valid]
      np.testing.assert_allclose(got, want, rtol=0, atol=1e-4, err_msg=f"{key}_{l}")
    offset += t_l


def test_fixture_import_reproduces_actionformer_detections(imported):
  case, model, _, _, _ = imported
  meta, arrays = case.meta, case.arrays
  features = np.transpose(arrays["input/features"][1:], (0, 2, 1))  # second video, padded
  mask = arrays["input/mask"][1:]
  duration = (meta["lengths"][1] * meta["feat_stride"] + meta["num_frames"]) / meta["fps"]
  as_batch = lambda v: np.array([v], np.float32)
  out = model.detect(features, mask, as_batch(meta["fps"]), as_batch(duration),
                     as_batch(meta["feat_stride"]), as_batch(meta["num_frames"]))
  n = int(out["num_detections"][0])
  assert n == len(arrays["output/det_scores"]) == meta["num_detections"]
  np.testing.assert_allclose(out["segments_sec"][0, :n], arrays["output/det_segments_sec"],
                             rtol=0, atol=1e-4)
  np.testing.assert_allclose(out["scores"][0, :n], arrays["output/det_scores"], rtol=0, atol=1e-5)
  np.testing.assert_array_equal(out["labels"][0, :n], arrays["output/det_labels"])


def test_plain_checkpoint_into_asl_model_needs_allow_missing(tmp_path):
  case = load_parity_case("thumos_like")
  run_dir = tmp_path / "run"
  with pytest.raises(SystemExit) as e:
    _run_cli(str(tmp_path), _case_flags(case) + ["--class_sensitivity", "--contrastive_weight=0.1",
                                                 "--contrastive_proj_dim=128"],
             f"--torch_checkpoint={_fixture(case.name)}", f"--output={run_dir}")
  message = str(e.value.code)
  assert message.startswith("asl_tf.tools.import_torch: incomplete mapping; nothing was written")
  assert "--allow_missing" in message
  for name in ("class_sensitivity/mu", "class_sensitivity/sigma_reg_right",
               "instance_evaluator/output_conv/kernel", "contrastive_projection/dense_1/bias"):
    assert name in message
  assert not run_dir.exists()


@pytest.mark.parametrize("held", ["checkpoints/ckpt-3.index", "checkpoints/best/ckpt-9.index",
                                  "config.json"])
def test_an_output_folder_holding_a_run_is_left_alone(tmp_path, held):
  """The check read TensorFlow's `checkpoint` state file: without it (a kill can leave it
  empty), a run's checkpoints and config.json were overwritten."""
  case = load_parity_case("thumos_like")
  run_dir = tmp_path / "run"
  (run_dir / held).parent.mkdir(parents=True, exist_ok=True)
  (run_dir / held).write_text("theirs")
  with pytest.raises(SystemExit, match=r"--output=.*run already holds a run \(.*run/"
                                       r"(checkpoints/|config.json).*\); choose a new --output"):
    _run_cli(str(tmp_path), _case_flags(case) + _ASL_ONLY,
             f"--torch_checkpoint={_fixture(case.name)}", f"--output={run_dir}", "--allow_missing")
  assert sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.is_file()) == [held]
  assert (run_dir / held).read_text() == "theirs"


def test_an_import_records_the_annotation_files_class_names(tmp_path):
  """Imported runs had no class_names.json, so evaluate's check of another file's label ids was
  skipped for them; without an annotation file there are no names to record."""
  case = load_parity_case("thumos_like")
  names = [f"kind_{i}" for i in range(case.model_config.num_classes)]
  annotations = tmp_path / "ann.json"
  annotations.write_text(json.dumps({"database": {
      "v": {"subset": "test", "duration": 9.0, "annotations": [
          {"label": n, "label_id": i, "segment": [1, 2]} for i, n in enumerate(names)]}}}))
  with_file = tmp_path / "run"
  _run_cli(str(tmp_path), _case_flags(case) + _ASL_ONLY + [f"--annotation_file={annotations}",
                                                           "--eval_subset=test"],
           f"--torch_checkpoint={_fixture(case.name)}", f"--output={with_file}", "--allow_missing")
  assert json.loads((with_file / "class_names.json").read_text()) == {"class_names": names}
  assert inference.trained_class_names(str(with_file)) == names
  # An annotation problem (here a subset the file lacks) skips the names, not the import.
  without = tmp_path / "run_without"
  _run_cli(str(tmp_path), _case_flags(case) + _ASL_ONLY + [f"--annotation_file={annotations}",
                                                           "--eval_subset=validation"],
           f"--torch_checkpoint={_fixture(case.name)}", f"--output={without}", "--allow_missing")
  assert (without / "config.json").exists() and not (without / "class_names.json").exists()


def test_a_diverged_checkpoint_is_refused_naming_its_tensors(tmp_path):
  case = load_parity_case("thumos_like")
  state = dict(torch_checkpoint.load_torch_checkpoint(_fixture(case.name))["state_dict_ema"])
  name = sorted(state)[0]
  state[name] = np.full(state[name].shape, np.nan, np.float32)
  path = tmp_path / "diverged.pth.tar"
  _write_checkpoint(path, state)
  with pytest.raises(SystemExit, match=rf"diverged.pth.tar: NaN or Inf in 1 tensors of "
                                       rf"state_dict_ema \({re.escape(name)}\): the run had "
                                       "diverged"):
    _run_cli(str(tmp_path), _case_flags(case) + _ASL_ONLY, f"--torch_checkpoint={path}",
             f"--output={tmp_path / 'run'}", "--allow_missing")
  assert not (tmp_path / "run").exists()


def test_config_mismatch_names_both_values_before_copying(tmp_path):
  case = load_parity_case("thumos_like")
  run_dir = tmp_path / "run"
  with pytest.raises(SystemExit) as e:
    _run_cli(str(tmp_path), _case_flags(case) + ["--num_classes=20"],
             f"--torch_checkpoint={_fixture(case.name)}", f"--output={run_dir}", "--allow_missing")
  message = str(e.value.code)
  assert "nothing was copied" in message
  assert "classes: checkpoint has 5, the flags 20 (set --num_classes=5)" in message
  assert not run_dir.exists()


def _tensor(key, array):
  """A torch-like tensor pickling `array` (C order) from its own float32 storage."""
  array = np.array(array, np.float32, order="C")
  strides = tuple(s // 4 for s in array.strides)
  return _Tensor(_Storage(key, "FloatStorage", array.ravel()), 0, array.shape, strides)


def _write_checkpoint(path, state, raw_state=None):
  """Writes `{"epoch": 7, "state_dict": raw_state or state, "state_dict_ema": state}`."""
  counter = iter(range(10**6))
  as_tensors = lambda d: collections.OrderedDict(
      (k, _tensor(str(next(counter)), v)) for k, v in d.items())
  _write_zip(path, {"epoch": 7, "state_dict": as_tensors(raw_state or state),
                    "state_dict_ema": as_tensors(state)})


# A small ASL model (3 levels, window 3) for the round trips: building it is quick.
_TINY_FLAGS = ["--input_dim=8", "--num_classes=5", "--max_seq_len=32", "--backbone_arch=2,1,2",
               "--embd_dim=16", "--fpn_dim=16", "--head_dim=16", "--n_head=2",
               "--mha_win_size=3", "--regression_range=0,4,4,8,8,10000"] + _ASL_ONLY


def _build(flags):
  """A detector built from command-line flags."""
  asl_flags.FLAGS.unparse_flags()
  try:
    asl_flags.parse_argv(["test"] + flags)
    config = asl_flags.build_config()
  finally:
    asl_flags.FLAGS.unparse_flags()
  return inference.build_detector(config)


@pytest.mark.parametrize("parametrization,use_ema", [("authors", True), ("stable", False)])
def test_asl_gaussians_round_trip(tmp_path, parametrization, use_ema):
  flags = _TINY_FLAGS + [f"--sensitivity_parametrization={parametrization}"]
  source = _build(flags)
  known = {"mu": [0.3, -0.2, 0.0, 0.45, -0.05], "sigma": [0.02, 1.0, 5.0, 0.4, 0.011],
           "mu_reg_left": [-0.5, -0.1, -0.7, 0.2, -0.3],
           "sigma_reg_left": [0.8, 2.5, 0.05, 1.2, 0.3],
           "mu_reg_right": [0.5, 0.6, 0.1, 0.9, 0.25],
           "sigma_reg_right": [1.5, 0.2, 0.9, 3.0, 0.07]}
  variables = {v.name: v for v in source.sensitivity.sensitivity_variables}
  for name, values in known.items():
    if name.startswith("sigma") and parametrization == "stable":
      values = import_torch.softplus_inverse(np.array(values) - sensitivity.SIGMA_FLOOR)
      name += "_rho"
    variables[name].assign(np.asarray(values, np.float32))
  rng = np.random.default_rng(0)
  for var in source.cls_head.trainable_variables:
    var.assign(rng.normal(size=var.shape).astype(np.float32))
  ema_state = weight_mapping.to_actionformer_state_dict(source)
  exported = source.sensitivity_parameters()
  ema_state.update({k: v.reshape(-1, 1) for k, v in exported.items()})  # [K] -> [K, 1]
  raw_state = {k: v + 1.0 for k, v in ema_state.items()}
  path = tmp_path / "asl.pth.tar"
  _write_checkpoint(path, ema_state, raw_state)

  run_dir = str(tmp_path / "run")
  printed = _run_cli(str(tmp_path), flags, f"--torch_checkpoint={path}", f"--output={run_dir}",
                     f"--use_ema={str(use_ema).lower()}")
  key = "state_dict_ema" if use_ema else "state_dict"
  assert f"[{key}, epoch 7]" in printed
  assert "unused (in the source, not mapped): 0" in printed
  assert "not in the source, kept at initialization: 0" in printed
  model, _ = inference.load_model(run_dir)
  state, offset = (ema_state, 0.0) if use_ema else (raw_state, 1.0)
  got = model.sensitivity_parameters()
  for name, values in known.items():
    np.testing.assert_allclose(got[name], np.array(values) + offset, rtol=1e-5, atol=1e-7,
                               err_msg=name)
  if use_ema:
    for a, b in zip(source.sensitivity.sensitivity_variables,
                    model.sensitivity.sensitivity_variables):
      assert a.path == b.path
      np.testing.assert_array_equal(b.numpy(), a.numpy(), err_msg=a.path)
  back = weight_mapping.to_actionformer_state_dict(model)
  assert back.keys() | exported.keys() == state.keys()
  for name, value in back.items():
    np.testing.assert_array_equal(value, state[name], err_msg=name)


@pytest.mark.parametrize("parametrization,name,value,expected", [
    ("stable", "sigma", np.array([1.0, 0.005, 1.0, 1.0, 1.0]),
     "sigma has values down to 0.005, at or below the floor 0.01"),
    ("authors", "mu_reg_left", np.zeros(3),
     "mu_reg_left: checkpoint has 3 classes (shape [3, 1]), the flags 5 (--num_classes)"),
])
def test_bad_asl_parameters_are_refused(tmp_path, parametrization, name, value, expected):
  case = load_parity_case("thumos_like")
  state = dict(case.params)
  state.update({k: np.ones((5, 1), np.float32) for k in import_torch.SENSITIVITY_KEYS})
  state[name] = value.reshape(-1, 1)
  path = tmp_path / "bad.pth.tar"
  _write_checkpoint(path, state)
  with pytest.raises(SystemExit) as e:
    _run_cli(str(tmp_path), _case_flags(case) + _ASL_ONLY
             + [f"--sensitivity_parametrization={parametrization}"],
             f"--torch_checkpoint={path}", f"--output={tmp_path / 'run'}")
  assert expected in str(e.value.code)
  assert "nothing was copied" in str(e.value.code)
  assert not (tmp_path / "run").exists()


def test_stable_import_uses_the_configured_sigma_floor():
  """sigma = softplus(rho) + floor with the model's own floor (it once used the default 0.01:
  imported sigmas came out 0.09 too large at floor 0.1, and sigmas under the floor passed)."""
  model_config = config_lib.ModelConfig(num_classes=2, class_sensitivity=True,
                                        sensitivity_parametrization="stable",
                                        sensitivity_sigma_floor=0.1)
  state = {k: np.ones((2, 1), np.float32) for k in import_torch.SENSITIVITY_KEYS}
  state["sigma"] = np.array([[0.5], [2.0]], np.float32)
  values = import_torch.sensitivity_values(state, model_config)
  layer = sensitivity.ClassSensitivity(2, "stable", sigma_floor=0.1)
  layer.weights[1].assign(values["sigma"])
  np.testing.assert_allclose(layer.sigmas()[0].numpy(), [0.5, 2.0], rtol=1e-5)
  state["sigma"] = np.array([[0.05], [1.0]], np.float32)
  with pytest.raises(import_torch.ImportTorchError, match="at or below the floor 0.1"):
    import_torch.sensitivity_values(state, model_config)


def test_missing_file_is_one_clear_line(tmp_path):
  with pytest.raises(SystemExit) as e:
    _run_cli(str(tmp_path), [], f"--torch_checkpoint={tmp_path / 'nope.pth.tar'}",
             f"--output={tmp_path / 'run'}")
  assert str(e.value.code).startswith("asl_tf.tools.import_torch: cannot read checkpoint ")
  assert "nope.pth.tar" in str(e.value.code)


def test_tampered_checkpoint_is_refused_without_running(tmp_path):
  marker = tmp_path / "pwned"
  path = tmp_path / "evil.pth.tar"
  _zip_with_pickle(path, _reduce_payload("os", "system", f"touch {marker}"))
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
  proc = subprocess.run(
      [sys.executable, "-m", "asl_tf.tools.import_torch", f"--torch_checkpoint={path}",
       f"--output={tmp_path / 'run'}"], cwd=_REPO, env=env, capture_output=True, text=True,
      timeout=120, check=False)
  assert proc.returncode == 1
  assert "Traceback" not in proc.stderr
  assert proc.stderr.strip().splitlines()[-1] == (
      f"asl_tf.tools.import_torch: refusing to unpickle os.system from {path}: only tensors and "
      "plain containers are allowed")
  assert not marker.exists()
  assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_export_dir_writes_a_saved_model(tmp_path):
  flags = _TINY_FLAGS + ["--noclass_sensitivity"]
  path = tmp_path / "actionformer.pth.tar"
  _write_checkpoint(path, weight_mapping.to_actionformer_state_dict(_build(flags)))
  export_dir = tmp_path / "export"
  printed = _run_cli(str(tmp_path), flags, f"--torch_checkpoint={path}",
                     f"--output={tmp_path / 'run'}", f"--export_dir={export_dir}")
  assert f"exported the SavedModel to {export_dir / '1'}" in printed
  assert (export_dir / "1" / "saved_model.pb").exists()
