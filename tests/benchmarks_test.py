"""Smoke tests of the benchmark scripts (`benchmarks/`), so that they cannot rot.

The table and bookkeeping code runs in-process on fake data; the TensorFlow scripts run in
`--quick` mode in subprocesses (marked slow).
"""

import importlib.util
import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_BENCH = os.path.join(_REPO, "benchmarks")


def _load(name):
  sys.path.insert(0, _BENCH)
  spec = importlib.util.spec_from_file_location(f"benchmarks_{name}",
                                                os.path.join(_BENCH, f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


ablation = _load("ablation")
run_all = _load("run_all")
thumos_synthetic = _load("thumos_synthetic")
sensitivity_synthetic = _load("sensitivity_synthetic")


def _run(args, timeout=240):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
  env["PYTHONPATH"] = os.pathsep.join(p for p in (_REPO, env.get("PYTHONPATH")) if p)
  proc = subprocess.run([sys.executable, *args], cwd=_REPO, env=env, capture_output=True,
                        text=True, timeout=timeout, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


def _fake_run(variant, seed, avg, at5):
  return {"variant": variant, "seed": seed, "wall_sec": 10.0, "average_mAP": avg,
          "mAP_at_0_5": at5}


def test_ablation_summary_mean_std_and_table():
  runs = [_fake_run("actionformer", 1, 0.50, 0.60), _fake_run("actionformer", 2, 0.52, 0.62),
          _fake_run("asl_all", 1, 0.55, 0.70), {"variant": "+class", "seed": 1,
                                                  "wall_sec": 3.0, "returncode": 1}]
  summary = ablation.summarize(runs)
  assert list(summary) == ["actionformer", "asl_all"]  # the failed run is left out
  row = summary["actionformer"]
  assert row["n"] == 2 and row["seeds"] == [1, 2]
  assert row["average_mAP_mean"] == pytest.approx(51.0)
  assert row["average_mAP_std"] == pytest.approx(np.std([50.0, 52.0], ddof=1), abs=0.01)
  assert summary["asl_all"]["mAP_at_0_5_std"] == 0.0
  table = ablation.markdown_table(summary, "demo")
  assert "| actionformer | 2 | 51.00 +- 1.41 | 61.00 +- 1.41 | 50.00 / 52.00 | 10 |" in table


def test_ablation_reuses_finished_runs(tmp_path):
  out = tmp_path / "run"
  (out / "eval").mkdir(parents=True)
  (out / "eval" / "metrics.json").write_text("{}")
  record = _fake_run("asl_all", 3, 0.4, 0.5)
  (out / "ablation_run.json").write_text(json.dumps(record))
  assert ablation.run_one("unused.flags", "asl_all", 3, str(out)) == record


def test_ablation_variants_set_every_switch_and_add_one_part_each():
  """Every variant names every ASL switch (a changed default never leaks in); the +part
  variants differ from ActionFormer in one part."""
  off = dict(flag[2:].split("=") for flag in ablation.VARIANTS["actionformer"])
  assert off["class_sensitivity"] == "false" and off["instance_sensitivity"] == "false"
  assert off["contrastive_weight"] == "0"
  for name, flags in ablation.VARIANTS.items():
    assert [f.split("=")[0][2:] for f in flags][:len(off)] == list(off), name
  parts = {"+class": {"class_sensitivity"}, "+instance": {"instance_sensitivity"},
           "+contrastive": {"contrastive_weight"},
           "+class_norm": {"class_sensitivity", "sensitivity_normalization"}}
  for name, switched in parts.items():
    flags = dict(flag[2:].split("=") for flag in ablation.VARIANTS[name])
    assert {k for k in off if flags[k] != off[k]} == switched, name
  assert "--instance_combination=product" in ablation.VARIANTS["+instance_product"]
  whole = dict(flag[2:].split("=") for flag in ablation.VARIANTS["actionformer_whole"])
  assert {k: v for k, v in whole.items() if off[k] != v} == {"center_sample_radius": "0"}
  assert set(ablation.DEFAULT_VARIANTS) <= set(ablation.VARIANTS)
  with pytest.raises(ValueError, match="unknown switches"):
    ablation._variant(class_sensitivty="true")


def test_the_shipped_defaults_are_the_ablations_default_variant():
  """The README's "the default" (`+instance_norm_bce_windows_c010_el0_proj0`: instance level
  and contrastive loss at 0.1 on the unprojected features) is what the dataclasses ship: each
  of its switches equals the default of its config field."""
  from asl_tf import config as config_lib  # pylint: disable=g-import-not-at-top
  _assert_trains_variant(config_lib.ModelConfig(), config_lib.LossConfig(),
                         "+instance_norm_bce_windows_c010_el0_proj0", "defaults")


def _assert_trains_variant(model_cfg, loss_cfg, variant: str, where: str):
  """Every switch the ablation's `variant` sets equals the configs' field of that name."""
  fields = {**model_cfg.__dict__, **loss_cfg.__dict__}
  for flag in ablation.VARIANTS[variant]:
    key, value = flag[2:].split("=")
    parsed = value == "true" if isinstance(fields[key], bool) else type(fields[key])(value)
    assert parsed == fields[key], (where, key, value, fields[key])


_DENSE_FLAGFILES = ("ego4d", "multithumos", "charades")


@pytest.mark.parametrize("name", sorted(f[:-len(".flags")] for f in os.listdir(
    os.path.join(_REPO, "configs")) if f.endswith(".flags")))
def test_the_flagfiles_train_the_ablations_shipped_variant(name):
  """The densely labelled datasets' flagfiles train the default ASL parts with whole-segment
  positives and the contrastive weight measured with them (`..._c003_el0_proj0_whole`); every
  other flagfile trains the defaults (`..._c010_el0_proj0`: ActionFormer's centre sampling)."""
  from asl_tf import flags as asl_flags  # pylint: disable=g-import-not-at-top
  asl_flags.FLAGS.unparse_flags()
  asl_flags.parse_argv(["prog", f"--flagfile={os.path.join(_REPO, 'configs', name + '.flags')}"])
  cfg = asl_flags.build_config()
  asl_flags.FLAGS.unparse_flags()
  variant = ("+instance_norm_bce_windows_c003_el0_proj0_whole" if name in _DENSE_FLAGFILES
             else "+instance_norm_bce_windows_c010_el0_proj0")
  _assert_trains_variant(cfg.model, cfg.loss, variant, name)


def test_ablation_collects_every_finished_run_under_the_folder(tmp_path):
  """Two grids writing into one folder each see both: the table is built from the folder."""
  for variant, seed in (("actionformer", 2), ("actionformer", 1), ("+class", 1)):
    folder = tmp_path / variant.lstrip("+") / f"seed{seed}"
    folder.mkdir(parents=True)
    (folder / "ablation_run.json").write_text(json.dumps(_fake_run(variant, seed, 0.5, 0.6)))
  (tmp_path / "class" / "seed9").mkdir()  # a run still going: no record yet
  # A variant a newer copy of the script defines, and a snapshot folder.
  (tmp_path / "newer_variant" / "seed1").mkdir(parents=True)
  (tmp_path / "newer_variant" / "seed1" / "ablation_run.json").write_text(
      json.dumps(_fake_run("newer_variant", 1, 0.5, 0.6)))
  (tmp_path / "code_0123" / "seed1").mkdir(parents=True)
  runs = ablation.collect_runs(str(tmp_path))
  assert [(r["variant"], r["seed"]) for r in runs] == [
      ("actionformer", 1), ("actionformer", 2), ("+class", 1), ("newer_variant", 1)]


def test_ablation_report_keeps_the_records_of_runs_no_longer_on_disk():
  """A fresh checkout has no runs/: the committed records stay, a rerun replaces its own."""
  recorded = [_fake_run("+class", 1, 0.1, 0.2), _fake_run("actionformer", 1, 0.3, 0.4),
              _fake_run("a_removed_variant", 1, 0.5, 0.6)]
  found = [_fake_run("actionformer", 1, 0.7, 0.8), _fake_run("actionformer", 2, 0.9, 1.0)]
  runs = ablation.merge_runs(recorded, found)
  assert [(r["variant"], r["seed"]) for r in runs] == [
      ("actionformer", 1), ("actionformer", 2), ("+class", 1), ("a_removed_variant", 1)]
  assert runs[0] is found[0] and runs[2] is recorded[0]


def test_ablation_a_failed_rerun_does_not_replace_a_recorded_result():
  failed = {"variant": "actionformer", "seed": 1, "returncode": 1}
  recorded = [_fake_run("actionformer", 1, 0.3, 0.4)]
  assert ablation.merge_runs(recorded, [failed]) == recorded
  assert ablation.merge_runs([failed], recorded) == recorded


def _report_only(monkeypatch, tmp_path, output, *flags):
  monkeypatch.setattr(sys, "argv", ["ablation.py", "--dataset=demo", "--report_only",
                                    f"--runs_dir={tmp_path / 'runs'}", f"--output={output}",
                                    *flags])
  ablation.main()


def test_ablation_report_only_adds_the_runs_on_disk_to_the_recorded_ones(tmp_path, monkeypatch):
  output = tmp_path / "ablation_demo.json"
  output.write_text(json.dumps({"dataset": "demo", "extra_flags": [],
                                "runs": [_fake_run("actionformer", 1, 0.3, 0.4)],
                                "code": {"git_head": "abc123"}, "machine": {"cpu_model": "X"},
                                "variants": {"actionformer": ["--as_trained"]}}))
  folder = tmp_path / "runs" / "class" / "seed1"
  folder.mkdir(parents=True)
  (folder / "ablation_run.json").write_text(json.dumps(_fake_run("+class", 1, 0.5, 0.6)))
  _report_only(monkeypatch, tmp_path, output)
  report = json.loads(output.read_text())
  assert [(r["variant"], r["seed"]) for r in report["runs"]] == [("actionformer", 1),
                                                                 ("+class", 1)]
  assert set(report["summary"]) == {"actionformer", "+class"}
  # The last grid's snapshot and host, and the flags a recorded variant trained with, kept.
  assert report["code"] == {"git_head": "abc123"} and report["machine"] == {"cpu_model": "X"}
  assert report["variants"] == {"actionformer": ["--as_trained"],
                                "+class": list(ablation.VARIANTS["+class"])}
  assert "| +class | 1 | 50.00" in (tmp_path / "ablation_demo.md").read_text()


@pytest.mark.parametrize("content,message", [
    ("{not json", "not an ablation report"),
    ('{"dataset": "demo", "extra_flags": [], "runs": [{"seed": 1}]}', "not an ablation report"),
    ('{"dataset": "sensitivity_thumos", "extra_flags": [], "runs": []}',
     "written for --dataset=sensitivity_thumos"),
])
def test_ablation_refuses_a_results_file_it_would_mix_into(tmp_path, monkeypatch, capsys,
                                                           content, message):
  output = tmp_path / "ablation_demo.json"
  output.write_text(content)
  with pytest.raises(SystemExit):
    _report_only(monkeypatch, tmp_path, output)
  err = capsys.readouterr().err.strip().splitlines()[-1]
  assert str(output) in err and message in err
  assert output.read_text() == content  # left as it was


def test_code_digest_follows_the_sources(tmp_path, monkeypatch):
  for sub in ("asl_tf", "configs", "benchmarks"):
    (tmp_path / sub).mkdir()
  (tmp_path / "asl_tf" / "a.py").write_text("x = 1\n")
  (tmp_path / "benchmarks" / "b.flags").write_text("--a=1\n")
  monkeypatch.setattr(ablation, "_REPO_ROOT", str(tmp_path))
  first = ablation.code_digest()
  (tmp_path / "asl_tf" / "notes.txt").write_text("not code")
  assert ablation.code_digest() == first
  (tmp_path / "benchmarks" / "b.flags").write_text("--a=2\n")
  assert ablation.code_digest() != first and len(first) == 12


def test_snapshot_code_copies_the_tree_and_survives_a_grid_started_at_the_same_time(
    tmp_path, monkeypatch):
  for sub in ("asl_tf", "configs", "benchmarks"):
    (tmp_path / sub).mkdir()
  (tmp_path / "asl_tf" / "a.py").write_text("x = 1\n")
  (tmp_path / "configs" / "c.flags").write_text("--c=1\n")
  (tmp_path / "benchmarks" / "b.flags").write_text("--a=1\n")
  monkeypatch.setattr(ablation, "_REPO_ROOT", str(tmp_path))
  dest = tmp_path / "runs" / "code_x"
  info = ablation.snapshot_code(str(dest))
  assert (dest / "asl_tf" / "a.py").read_text() == "x = 1\n"
  assert (dest / "benchmarks" / "b.flags").exists() and info["root"] == str(dest)
  assert ablation.snapshot_code(str(dest)) == info  # reused, not rebuilt

  # Another grid completes the same snapshot while this one is copying.
  other = tmp_path / "runs" / "code_y"
  copytree = ablation.shutil.copytree

  def racing_copytree(src, dst, *args, **kwargs):
    if not other.exists():
      copytree(str(dest), str(other), symlinks=True)
    return copytree(src, dst, *args, **kwargs)

  monkeypatch.setattr(ablation.shutil, "copytree", racing_copytree)
  assert ablation.snapshot_code(str(other)) == info  # the other grid's record
  assert sorted(os.listdir(tmp_path / "runs")) == ["code_x", "code_y"]  # no half-made copy


def test_thumos_synthetic_keeps_real_segments(tmp_path):
  src = tmp_path / "thumos.json"
  database = {
      "video_validation_1": {"subset": "Validation", "duration": 20.0, "fps": 29.97,
                             "annotations": [{"label": "A", "label_id": 0, "segment": [2.0, 5.0]},
                                             {"label": "B", "label_id": 5,
                                              "segment": [10.0, 11.0]}]},
      "video_test_1": {"subset": "Test", "duration": 9.0, "fps": 30.0,
                       "annotations": [{"label": "B", "label_id": 5, "segment": [1.0, 3.0]}]},
  }
  src.write_text(json.dumps({"database": database}))
  out = thumos_synthetic.generate(str(tmp_path / "data"), str(src), input_dim=16)
  written = json.loads((tmp_path / "data" / "annotations.json").read_text())["database"]
  assert set(written) == set(database)
  assert written["video_validation_1"]["annotations"][1]["segment"] == [10.0, 11.0]
  assert written["video_validation_1"]["fps"] == 30.0
  feats = np.load(os.path.join(out, "features", "video_validation_1.npy"))
  assert feats.shape == (int((20.0 * 30 - 16) // 16) + 1, 16) and feats.dtype == np.float32
  mtime = os.path.getmtime(os.path.join(out, "manifest.json"))
  assert thumos_synthetic.generate(out, str(src), input_dim=16) == out
  assert os.path.getmtime(os.path.join(out, "manifest.json")) == mtime  # not regenerated


def test_sensitivity_action_signal_has_key_phase_cues_and_blurred_edges():
  """One 20-feature instance: the class's own direction dominates exactly the key phase, the
  other phases point along the group direction, the start / end cues sit on the first / last
  feature, and the signal ramps up from the boundaries."""
  rng = np.random.default_rng(0)
  bank = sensitivity_synthetic.ClassBank(rng, ((0, 1), (2,)), 64)
  label, n = 1, 20
  signal = bank.action_signal(np.random.default_rng(1), label, n)
  bounds = np.round(np.cumsum(bank.phase_fractions[label]) * n).astype(int)
  key = bank.key_phase[label]
  lo, hi = (0 if key == 0 else bounds[key - 1]), bounds[key]
  own = signal @ bank.own[label]
  generic = signal @ bank.generic[label]
  inner = np.arange(1, n - 1)  # away from the cues
  in_key = (inner >= lo) & (inner < hi)
  assert np.all(own[inner][in_key] > generic[inner][in_key])
  assert np.all(generic[inner][~in_key] > own[inner][~in_key])
  assert signal[0] @ bank.start_cue[label] > 1.0 and signal[-1] @ bank.end_cue[label] > 1.0
  assert abs(signal[n // 2] @ bank.start_cue[label]) < 1.0
  strength = np.linalg.norm(signal - np.outer(signal @ bank.start_cue[label],
                                              bank.start_cue[label]), axis=1)
  mid_phase = [i for i in inner if (i >= lo) == (1 >= lo) and (i < hi) == (1 < hi)]
  assert strength[1] < strength[max(mid_phase)]  # ramped near the start


def test_sensitivity_sets_keep_annotations_subsets_and_reuse_the_folder(tmp_path, monkeypatch):
  src = tmp_path / "thumos.json"
  database = {
      "video_validation_1": {"subset": "Validation", "duration": 120.0, "fps": 29.97,
                             "annotations": [{"label": "A", "label_id": 0, "segment": [2.0, 9.0]},
                                             {"label": "B", "label_id": 19,
                                              "segment": [40.0, 44.0]}]},
      "video_test_1": {"subset": "Test", "duration": 30.0, "fps": 30.0,
                       "annotations": [{"label": "B", "label_id": 19, "segment": [1.0, 3.0]}]},
      "video_other_1": {"subset": "Other", "duration": 30.0, "fps": 30.0, "annotations": []},
  }
  src.write_text(json.dumps({"database": database}))
  sets = dict(sensitivity_synthetic.SETS)
  sets["thumos"] = (str(src),) + sets["thumos"][1:]
  monkeypatch.setattr(sensitivity_synthetic, "SETS", sets)
  out = sensitivity_synthetic.generate("thumos", str(tmp_path / "data"))
  written = json.loads((tmp_path / "data" / "annotations.json").read_text())["database"]
  assert set(written) == {"video_validation_1", "video_test_1"}  # unknown subsets left out
  assert written["video_validation_1"]["annotations"][1]["segment"] == [40.0, 44.0]
  feats = np.load(os.path.join(out, "features", "video_validation_1.npy"))
  assert feats.shape == (int((120.0 * 30 - 16) // 16) + 1, sensitivity_synthetic.INPUT_DIM)
  assert feats.dtype == np.float32 and np.isfinite(feats).all()
  mtime = os.path.getmtime(os.path.join(out, "manifest.json"))
  assert sensitivity_synthetic.generate("thumos", out) == out
  assert os.path.getmtime(os.path.join(out, "manifest.json")) == mtime  # reused


def test_sensitivity_bursts_only_land_on_free_features():
  rng = np.random.default_rng(5)
  bank = sensitivity_synthetic.ClassBank(rng, ((0,), (1,)), 32)
  sensitivity_synthetic.NOISE_STD, noise = 0.0, sensitivity_synthetic.NOISE_STD
  sensitivity_synthetic.DRIFT_STD, drift = 0.0, sensitivity_synthetic.DRIFT_STD
  try:
    feats = sensitivity_synthetic.video_features(np.random.default_rng(2), bank, 600, [],
                                                 np.zeros((4, 32)))
    busy = sensitivity_synthetic.video_features(np.random.default_rng(2), bank, 600,
                                                [(-1.0, 601.0, 0)], np.zeros((4, 32)))
  finally:
    sensitivity_synthetic.NOISE_STD, sensitivity_synthetic.DRIFT_STD = noise, drift
  hit = np.linalg.norm(feats, axis=1) > 0
  assert 0 < hit.sum() < 600  # ~10 bursts of 2-6 features, nothing else
  own = np.abs(feats[hit] @ bank.own.T).max(axis=1)
  np.testing.assert_allclose(own, np.linalg.norm(feats[hit], axis=1), rtol=1e-5)
  # Over one action covering the video, every feature lies in the span of class 0's own,
  # generic and cue directions: no other class's burst was added.
  basis, _ = np.linalg.qr(np.stack([bank.own[0], bank.generic[0], bank.start_cue[0],
                                    bank.end_cue[0]], axis=1))
  residual = busy - (busy @ basis) @ basis.T
  assert np.abs(residual).max() < 1e-4 and np.linalg.norm(busy, axis=1).min() > 0.1


def test_run_all_collects_json_and_writes_table(tmp_path, monkeypatch):
  script = tmp_path / "fake.py"
  script.write_text("import json, sys\nprint('log line')\nprint(json.dumps({'quick': "
                    "'--quick' in sys.argv, 'step': {'median_sec': 0.25, 'min_sec': 0.2, "
                    "'max_sec': 0.3}}, indent=1))\n")
  broken = tmp_path / "broken.py"
  broken.write_text("raise SystemExit('boom')\n")
  monkeypatch.setattr(run_all, "_HERE", str(tmp_path))
  monkeypatch.setattr(run_all, "BENCHMARKS", {"fake": ("fake.py", ()),
                                              "broken": ("broken.py", ()),
                                              "absent": ("absent.py", ())})
  monkeypatch.setattr(sys, "argv", ["run_all.py", "--quick", f"--output_dir={tmp_path}/out"])
  run_all.main()
  result = json.loads((tmp_path / "out" / "results.json").read_text())
  records = {r["name"]: r for r in result["benchmarks"]}
  assert records["fake"]["result"]["quick"] is True
  assert "boom" in records["broken"]["error"]
  assert records["absent"]["skipped"] == "script not present"
  assert result["machine"]["cpu_count"] >= 1
  table = (tmp_path / "out" / "results.md").read_text()
  assert "| fake | step" in table and "250.0 ms" in table
  assert "| broken | failed" in table and "absent" not in table


def test_run_all_formats_inference_rows():
  stats = {"median_sec": 0.4, "min_sec": 0.35, "max_sec": 0.5, "p95_sec": 0.48}
  result = {"config": "thumos", "target_sec": 0.53, "reference_sec": 0.75,
            "model": {"input_dim": 2048, "embd_dim": 512, "mha_win_size": [19]},
            "lengths": [{"num_frames": 2304, "forward_plus_postprocess": stats,
                         "postprocess_share": 0.25}]}
  (row,) = run_all._rows_inference(result)
  assert row[2] == "400.0 ms" and row[4] == "<= 530.0 ms" and row[5] == "750.0 ms (PyTorch)"


@pytest.mark.slow
def test_inference_quick(tmp_path):
  out = tmp_path / "inference.json"
  _run([os.path.join(_BENCH, "inference.py"), "--quick", "--repeats=2", f"--output={out}"])
  result = json.loads(out.read_text())
  assert result["benchmark"] == "inference" and result["config"] == "quick"
  for entry in result["lengths"]:
    assert entry["forward_plus_postprocess"]["median_sec"] > 0
    assert entry["forward_only"]["median_sec"] > 0
    assert entry["num_detections"] > 0
    assert -1.0 < entry["postprocess_share"] < 1.0


@pytest.mark.slow
def test_ab_attention_forms_agree_and_the_block_gather_takes_fewer_ops(tmp_path):
  """The earlier `tf.signal.frame` and slices + concat forms and the layer's block gather give
  the same outputs and gradients (a padded video, a length with a partial last block); the
  gather has fewer graph ops than frame."""
  out = tmp_path / "ab_attention.json"
  _run([os.path.join(_BENCH, "ab_attention.py"), "--quick", "--seq_len=101",
        f"--output={out}"])
  result = json.loads(out.read_text())
  assert result["max_abs_difference"] == 0.0
  ops = {name: r["graph_ops"] for name, r in result["results"].items()}
  assert set(ops) == {"frame", "slices_concat", "gather"}
  assert ops["gather"] < ops["frame"]
  head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=os.path.dirname(_BENCH),
                        capture_output=True, text=True, check=False).stdout.strip() or None
  assert result["run"]["code"]["head"] == head and result["run"]["load_1min"] >= 0


def test_ab_form_reads_op_dtypes_inside_nested_functions():
  """The A/B tells its two traced steps apart by an op's dtypes, counted in `tf.cond` branches
  and gradient functions too (where the MLP's GELU and the convolutions' gradients live)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  ab_form = _load("ab_form")

  def step(x, flag):
    with tf.GradientTape() as tape:
      tape.watch(x)
      y = tf.cond(flag, lambda: tf.nn.gelu(x, approximate=False),
                  lambda: tf.cast(tf.nn.gelu(tf.cast(x, tf.float32), approximate=False), x.dtype))
    return tape.gradient(y, x)

  traced = tf.function(step).get_concrete_function(tf.TensorSpec([4], tf.bfloat16),
                                                   tf.TensorSpec([], tf.bool))
  # Each branch once, and again where it was rewritten for its gradient.
  dtypes = ab_form.op_dtypes(traced, "Erfc")
  assert set(dtypes) == {"bfloat16", "float32"}
  assert dtypes["bfloat16"] == dtypes["float32"] >= 1
  assert ab_form.op_dtypes(traced, "Conv2DBackpropFilter") == {}
  plain = tf.function(lambda x: tf.nn.gelu(x, approximate=False)).get_concrete_function(
      tf.TensorSpec([4], tf.float16))
  assert ab_form.op_dtypes(plain, "Erfc") == {"float16": 1}


def test_op_forms_agree_and_leave_the_library_as_it_was():
  """Every form `op_forms.py` times for an op (the replaced forms of `ab_form.step_forms` swapped
  in while traced) gives the base form's outputs and gradients (float32 rows to float32
  rounding, bfloat16 rows to bfloat16 rounding), the swapped-in forms are what was traced (the
  op each replaced form copies with, or the einsum of the written dense gradient, is in one
  program only), and the attributes are restored."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from asl_tf.modeling import kernels  # pylint: disable=g-import-not-at-top
  from asl_tf.modeling import winograd  # pylint: disable=g-import-not-at-top
  op_forms = _load("op_forms")
  library = (kernels._valid_depthwise_conv1d, kernels.with_next_block, winograd._conv,
             kernels._dense_with_einsum_input_grad)
  rng = np.random.default_rng(0)
  for op, (x_dtype, x_shape, dy_dtype, dy_shape, forms) in op_forms._forms(
      tf, kernels, quick=True).items():
    x = tf.constant(rng.normal(0.0, 3.0, size=x_shape), x_dtype)
    dy = tf.constant(rng.normal(size=dy_shape), dy_dtype)
    outputs = [[t.numpy().astype(np.float64) for t in fn(x, dy)] for fn in forms.values()]
    tol = 1e-5 if x_dtype == tf.float32 and dy_dtype == tf.float32 else 2e-2
    for other in outputs[1:]:
      for got, want in zip(other, outputs[0]):
        np.testing.assert_allclose(got, want, rtol=0, atol=tol * np.abs(want).max(), err_msg=op)
    telling_op = {"depthwise_float32": "StridedSliceGrad", "block_pairs": "UnsortedSegmentSum",
                  "winograd_adjoint": "Transpose", "dense_fc1": "Einsum",
                  "dense_projection": "Einsum"}.get(op)
    if telling_op:
      has_op = {name: bool(op_forms.ab_form.op_dtypes(fn.traced.get_concrete_function(x, dy),
                                                      telling_op))
                for name, fn in forms.items()}
      assert has_op == ({"transpose_b": False, "einsum": True} if op.startswith("dense")
                        else {"copying": True, "not_copying": False}), op
  assert (kernels._valid_depthwise_conv1d, kernels.with_next_block, winograd._conv,
          kernels._dense_with_einsum_input_grad) == library


@pytest.mark.slow
def test_ab_bf16_layer_norm_forms_agree(tmp_path):
  """The A/B's two bfloat16 detectors differ in what they compare (the LayerNorm pattern fed
  float32 after a cast, or bfloat16) and give the same class logits to bfloat16 rounding."""
  out = tmp_path / "ab_bf16_layer_norm.json"
  _run([os.path.join(_BENCH, "ab_bf16_layer_norm.py"), "--quick", f"--output={out}"])
  result = json.loads(out.read_text())
  assert set(result["results"]) == {"cast_to_float32_first", "bfloat16_pattern"}
  assert result["layer_norm_pattern_dtypes"] == {"cast_to_float32_first": ["float32"],
                                                 "bfloat16_pattern": ["bfloat16"]}
  assert 0.0 <= result["max_abs_logit_difference"] < 0.1


@pytest.mark.slow
def test_run_all_quick_evaluation_only(tmp_path):
  _run([os.path.join(_BENCH, "run_all.py"), "--quick", "--only=evaluation",
        f"--output_dir={tmp_path}"])
  result = json.loads((tmp_path / "results.json").read_text())
  (record,) = result["benchmarks"]
  assert "error" not in record, record.get("error")
  assert record["result"]["evaluate_detections"]["median_sec"] > 0
  assert "| evaluation | mAP" in (tmp_path / "results.md").read_text()


def test_run_all_formats_train_step_rows_with_target_on_actionformer_only():
  stats = {"median_sec": 0.2, "min_sec": 0.19, "max_sec": 0.25}
  common = {"config": "bench", "mode": "graph", "seq_len": 768, "input_dim": 256,
            "embd_dim": 128, "batch_size": 2, **stats}
  result = {"results": [dict(common, variant="asl"),
                        dict(common, variant="actionformer", target_sec=0.21,
                             reference_sec=0.265)]}
  asl_row, af_row = run_all._rows_train_step(result)
  assert asl_row[1].startswith("bench asl (graph): T 768") and asl_row[4:] == ["", ""]
  assert af_row[2] == "200.0 ms" and af_row[3] == "190.0 ms / 250.0 ms"
  assert af_row[4] == "<= 210.0 ms" and af_row[5] == "265.0 ms (PyTorch)"


def test_run_all_names_a_bfloat16_row_and_keeps_float32_rows_as_they_were():
  stats = {"median_sec": 0.2, "min_sec": 0.19, "max_sec": 0.25, "p95_sec": 0.24}
  common = {"config": "bench", "mode": "graph", "seq_len": 768, "input_dim": 256,
            "embd_dim": 128, "batch_size": 2, "variant": "asl", **stats}
  bf16_row, f32_row = run_all._rows_train_step(
      {"results": [dict(common, precision="mixed_bfloat16"), dict(common, precision="float32")]})
  assert bf16_row[1].startswith("bench asl (graph, mixed_bfloat16): T 768")
  assert f32_row[1].startswith("bench asl (graph): T 768")
  inference_result = {"config": "thumos", "precision": "mixed_bfloat16", "target_sec": None,
                      "model": {"input_dim": 2048, "embd_dim": 512, "mha_win_size": [19]},
                      "lengths": [{"num_frames": 2304, "forward_plus_postprocess": stats,
                                   "postprocess_share": 0.25}]}
  (row,) = run_all._rows_inference(inference_result)
  assert row[1].startswith("thumos mixed_bfloat16: C 2048") and row[4] == ""


def test_run_all_sets_each_setting_side_by_side_per_precision():
  """results.md pairs a setting's float32 and bfloat16 medians in one row, with their ratio,
  and names the CPU flags on the machine line."""
  def step(precision, median):
    return {"config": "bench", "mode": "graph", "seq_len": 768, "input_dim": 256, "embd_dim": 128,
            "batch_size": 2, "variant": "asl", "precision": precision, "median_sec": median,
            "min_sec": median, "max_sec": median}
  def inference(precision, median):
    stats = {"median_sec": median, "min_sec": median, "max_sec": median, "p95_sec": median}
    return {"config": "thumos", "precision": precision, "target_sec": None,
            "model": {"input_dim": 2048, "embd_dim": 512, "mha_win_size": [19]},
            "lengths": [{"num_frames": 2304, "forward_plus_postprocess": stats,
                         "postprocess_share": 0.1}]}
  records = [{"name": "train_step_bench", "result": {"results": [step("float32", 0.2)]}},
             {"name": "inference", "result": inference("float32", 0.5)},
             {"name": "train_step_bench_bf16", "result": {"results": [step("mixed_bfloat16",
                                                                            0.15)]}},
             {"name": "inference_bf16", "result": inference("mixed_bfloat16", 0.25)},
             {"name": "serving", "error": "exit 1: down"}]
  table = run_all.markdown(records, {"cpu_model": "Xeon", "cpu_affinity": 2,
                                     "cpu_family_model": "6.143",
                                     "cpu_flags": ["amx_bf16", "avx512f"]}, quick=False)
  assert table.startswith("Machine: Xeon, family.model 6.143 (amx_bf16, avx512f), 2 usable")
  per_dtype = table[table.index("| benchmark | setting | float32 |"):].splitlines()[2:]
  assert per_dtype == [
      "| train_step | bench asl (graph): T 768, C 256, dims 128, batch 2 | 200.0 ms | 150.0 ms "
      "| 0.75x |",
      "| inference | thumos: C 2048, dims 512, window 19, T 2304, forward + post-processing | "
      "500.0 ms | 250.0 ms | 0.50x |"]
  assert run_all.dtype_table(records[:2]) == []  # float32 alone: no per-precision table
  # A record of unexpected shape gets the main table's "unrecognized" row and no cell here; a
  # results.json from before the CPU flags were recorded claims none.
  odd = run_all.markdown(records + [{"name": "inference", "result": {"unexpected": 1}}],
                         {"cpu_model": "EPYC", "cpu_affinity": 2}, quick=False)
  assert odd.startswith("Machine: EPYC, 2 usable cores") and "unrecognized JSON" in odd
  assert odd[odd.index("| benchmark | setting | float32 |"):] == table[
      table.index("| benchmark | setting | float32 |"):]


def test_side_by_side_ratios_are_per_round_then_their_median():
  """asl_tf / PyTorch is taken within each round (same machine state), then summarised."""
  sbs = _load("side_by_side_pytorch")
  rounds = [{"pt_train_median_sec": pt, "tf_train_median_sec": tf, "pt_infer_median_sec": 2.0,
             "tf_infer_median_sec": ti} for pt, tf, ti in ((4.0, 2.0, 1.0), (2.0, 1.8, 1.6),
                                                          (3.0, 2.1, 1.2))]
  for record in rounds:
    record.update(sbs.round_ratios(record))
  summary = sbs.summarize(rounds)
  assert summary["ratio_train_tf_over_pt"]["values"] == pytest.approx([0.5, 0.9, 0.7])
  assert summary["ratio_train_tf_over_pt"]["median"] == pytest.approx(0.7)
  assert summary["ratio_infer_tf_over_pt"]["median"] == pytest.approx(0.6)
  assert summary["pt_train_median_sec"] == {"median": 3.0, "min": 2.0, "max": 4.0,
                                            "values": [4.0, 2.0, 3.0]}


def test_side_by_side_both_sides_get_the_same_videos(tmp_path):
  """asl_tf's padded batch and the PyTorch loader's dicts hold the same features, segments and
  labels; a worker that dies before replying is reported with its log, not waited for."""
  sbs = _load("side_by_side_pytorch")
  train, _ = sbs.synthetic_videos()
  batch = sbs.padded_batch(train, 2304, 100)
  videos = [sbs.actionformer_video(i, *v) for i, v in enumerate(train)]
  for b, video in enumerate(videos):
    length = video["feats"].shape[1]  # [C, T]
    np.testing.assert_array_equal(batch["features"][b, :length], video["feats"].T)
    assert batch["padding_mask"][b].sum() == length and not batch["features"][b, length:].any()
    n = len(video["labels"])
    np.testing.assert_array_equal(batch["gt_segments"][b, :n], video["segments"])
    np.testing.assert_array_equal(batch["gt_labels"][b, :n], video["labels"])
    assert (batch["gt_labels"][b, n:] == -1).all() and video["labels"].dtype == np.int64
  assert [v["feats"].shape for v in videos] == [(2048, 2304), (2048, 1800)]
  worker = sbs.Worker([sys.executable, "-c", "print('noise', end=''); raise SystemExit(3)"],
                      str(tmp_path / "w.log"))
  with pytest.raises(RuntimeError, match=r"exited with 3; see .*w\.log"):
    worker.reply()


@pytest.mark.parametrize("precision,policy", [("float32", "float32"),
                                              ("bfloat16", "mixed_bfloat16")])
def test_side_by_side_runs_asl_tf_in_the_asked_precision(precision, policy):
  """`--precision` reaches asl_tf's training and inference policies, with every ASL part off."""
  sbs = _load("side_by_side_pytorch")
  train_step = _load("train_step")
  config = train_step._config("thumos_i3d", False, sbs.tensorflow_flags(precision))
  assert (config.train.mixed_precision, config.eval.inference_precision) == (policy, policy)
  assert not (config.model.class_sensitivity or config.model.instance_sensitivity
              or config.model.contrastive_weight)


@pytest.mark.parametrize("wrong", [None, "pt", "tf_train", "tf_infer"])
def test_side_by_side_passes_precision_and_warmup_to_its_workers(monkeypatch, tmp_path, wrong):
  """Both workers are started with `--precision` and `--warmup`; a worker whose first reply says
  it runs in another precision (PyTorch's autocast, asl_tf's training or inference policy)
  stops the run with an error naming it, before any timed round."""
  sbs = _load("side_by_side_pytorch")
  started, asked = [], []

  class FakeWorker:
    def __init__(self, argv, log_path):
      args = dict(a[2:].split("=", 1) for a in argv if a.startswith("--"))
      started.append(args)
      policy = sbs._KERAS_POLICY[args["precision"]]
      info = ({"autocast": {"pt": "float16"}.get(wrong, "bfloat16")} if args["side"] == "pt" else
              {"mixed_precision": {"tf_train": "float32"}.get(wrong, policy),
               "inference_precision": {"tf_infer": "float32"}.get(wrong, policy)})
      self.replies = iter([{"info": {"num_params": 7, **info}}, {"warmup": {}}])
      self.proc = types.SimpleNamespace(kill=lambda: None)

    def reply(self):
      return next(self.replies)

    def ask(self, cmd, calls):
      asked.append(cmd)
      return {"wall_sec": [1.0] * calls, "cpu_sec": [1.0] * calls, "out": 0}

    def close(self):
      pass

  monkeypatch.setattr(sbs, "Worker", FakeWorker)
  monkeypatch.setattr(sbs.tempfile, "mkdtemp", lambda prefix: str(tmp_path))
  result = sbs.drive(str(tmp_path), sys.executable, rounds_total=2, calls=3,
                     precision="bfloat16", warmup=5)
  assert [(a["side"], a["precision"], a["warmup"]) for a in started] == [
      ("pt", "bfloat16", "5"), ("tf", "bfloat16", "5")][:len(started)]
  assert result["workload"]["precision"] == "bfloat16" and result["warmup_calls"] == 5
  if wrong is None:
    assert "error" not in result and result["summary"]["ratio_train_tf_over_pt"]["median"] == 1.0
    assert len(asked) == 2 * 2 * 2  # rounds x sides x (train, infer)
  else:
    want = {"pt": "PyTorch's autocast bfloat16, the worker runs float16",
            "tf_train": "('mixed_bfloat16', 'mixed_bfloat16'), the worker runs ('float32', "
                        "'mixed_bfloat16')",
            "tf_infer": "('mixed_bfloat16', 'mixed_bfloat16'), the worker runs "
                        "('mixed_bfloat16', 'float32')"}[wrong]
    assert want in result["error"] and not asked and not result["per_round"]
    assert len(started) == (1 if wrong == "pt" else 2)  # PyTorch's worker fails before ours


def test_run_all_records_when_the_run_started(tmp_path, monkeypatch):
  """`started` is the wall time before the first benchmark, not when the last one ended."""
  clock = {"now": 1_700_000_000.0}
  def fake_run(name, quick, timeout):
    clock["now"] += 7200.0  # each benchmark takes two hours
    return {"name": name, "skipped": "fake"}
  monkeypatch.setattr(run_all, "run_benchmark", fake_run)
  real_time = run_all.time
  fake_time = types.SimpleNamespace(
      strftime=lambda fmt: real_time.strftime(fmt, real_time.gmtime(clock["now"])),
      perf_counter=lambda: clock["now"])
  monkeypatch.setattr(run_all, "time", fake_time)  # run_all's clock only
  monkeypatch.setattr(run_all.common, "machine_info", lambda: {"cpu_model": "test"})
  monkeypatch.setattr(sys, "argv", ["run_all.py", "--only=evaluation,serving",
                                    f"--output_dir={tmp_path}"])
  run_all.main()
  with open(tmp_path / "results.json") as f:
    assert json.load(f)["started"] == "2023-11-14 22:13"  # 1_700_000_000 s, UTC


def test_benchmarks_build_the_model_in_the_precision_asked_for(monkeypatch, capsys):
  inference_bench, train_step = _load("inference"), _load("train_step")
  from asl_tf import flags as asl_flags  # pylint: disable=g-import-not-at-top
  from asl_tf import inference  # pylint: disable=g-import-not-at-top
  try:
    for precision, compute in (("float32", "float32"), ("mixed_bfloat16", "bfloat16")):
      asl_flags.FLAGS.unparse_flags()
      model = inference.build_detector(inference_bench._config("quick", precision))
      assert model.dtype_policy.compute_dtype == compute
      # The training-step benchmark's main() hands the precision to the measuring child and
      # keeps the float32 target and reference off other precisions' rows.
      calls = []
      monkeypatch.setattr(train_step.common, "run_in_subprocess",
                          lambda target, kwargs, timeout=None: calls.append(kwargs) or {
                              "result": {"median_sec": 0.1}, "peak_rss_mb": 1.0})
      monkeypatch.setattr(sys, "argv", ["train_step.py", "--config=bench", "--modes=graph",
                                        "--variants=actionformer", f"--precision={precision}"])
      train_step.main()
      (row,) = json.loads(capsys.readouterr().out)["results"]
      assert calls[0]["extra_flags"][-1] == f"--mixed_precision={precision}"
      assert row["precision"] == precision
      assert ("target_sec" in row) == (precision == "float32")
      assert inference_bench.float32_targets("thumos", precision) == (
          (0.53, 0.75) if precision == "float32" else (None, None))
  finally:
    asl_flags.FLAGS.unparse_flags()


def test_run_all_formats_model_memory_rows_and_slope():
  result = {"config": "thumos", "results": [
      {"seq_len": 2304, "peak_delta_mb": 60.0, "seconds": 0.7},
      {"seq_len": 4608, "peak_delta_mb": 120.0, "seconds": 1.5}],
            "linear_fit": {"slope_mb_per_1k_frames": 26.04, "intercept_mb": 0.0,
                           "max_abs_residual_mb": 0.0}}
  rows = run_all._rows_model_memory(result)
  assert [r[1] for r in rows[:2]] == ["thumos forward T 2304, peak +60.0 MiB",
                                      "thumos forward T 4608, peak +120.0 MiB"]
  assert "slope 26.04 MiB per 1000 frames" in rows[2][1]


@pytest.mark.slow
def test_run_all_quick_train_memory_pipeline_serving(tmp_path):
  """The remaining scripts in --quick mode through run_all (tiny sizes, one process each)."""
  names = ["data_pipeline", "train_step", "model_memory", "serving"]
  _run([os.path.join(_BENCH, "run_all.py"), "--quick", f"--only={','.join(names)}",
        f"--output_dir={tmp_path}"], timeout=420)
  records = {r["name"]: r for r in json.loads((tmp_path / "results.json").read_text())[
      "benchmarks"]}
  for name in names:
    assert "error" not in records[name], records[name].get("error")
  (step,) = records["train_step"]["result"]["results"]
  assert step["variant"] == "asl" and step["mode"] == "graph" and step["median_sec"] > 0
  memory = records["model_memory"]["result"]
  assert [r["seq_len"] for r in memory["results"]] == [576, 1152, 2304]
  assert all(r["peak_delta_mb"] >= 0 for r in memory["results"])
  table = (tmp_path / "results.md").read_text()
  for name in names:
    assert f"| {name} |" in table and f"| {name} | failed" not in table


def test_profile_summary_sums_op_events_per_step_by_type_category_and_part():
  from tensorflow.tsl.profiler.protobuf import xplane_pb2  # pylint: disable=g-import-not-at-top
  profile_step = _load("profile_step")
  space = xplane_pb2.XSpace()
  plane = space.planes.add(name="/host:CPU")
  names = {1: "asl_detector_1/backbone_1/stem_0_1/mlp_fc1_1/Tensordot/MatMul:MatMul",
           2: "gradient_tape/asl_detector_1/cls_head_1/conv_0_1/conv1d/Conv2DBackpropFilter:"
              "Conv2DBackpropFilter",
           3: "adam_w/Mul_3:Mul",
           4: "ExecutorState::Process",
           5: "EagerLocalExecute: __inference_train_step_1",
           6: "global_norm/L2Loss:L2Loss"}
  for key, name in names.items():
    plane.event_metadata[key].name = name
  line = plane.lines.add(name="tf_Compute")
  # two profiled steps: (metadata id, duration in ms)
  for key, ms in [(1, 300), (1, 100), (2, 200), (3, 40), (4, 5000), (5, 9000), (6, 60)]:
    line.events.add(metadata_id=key, duration_ps=int(ms * 1e9))
  out = profile_step.summarize_xspace(space, steps=2)
  assert out["op_thread_sec"] == pytest.approx(0.35)  # executor / function events left out
  assert out["gemm_thread_sec"] == pytest.approx(0.30)
  assert out["gemm_share"] == pytest.approx(0.30 / 0.35)
  assert out["by_type"][0] == {"op": "MatMul", "sec": pytest.approx(0.2), "events": 1}
  parts = {p["part"]: p["sec"] for p in out["by_part"]}
  assert parts == {"forward backbone": pytest.approx(0.2), "backward cls_head": pytest.approx(0.1),
                   "optimizer": pytest.approx(0.02), "other": pytest.approx(0.03)}


def test_profile_summary_busy_time_is_the_union_of_op_intervals():
  """`busy_sec`: time with at least one op running, overlaps across threads counted once."""
  from tensorflow.tsl.profiler.protobuf import xplane_pb2  # pylint: disable=g-import-not-at-top
  profile_step = _load("profile_step")
  space = xplane_pb2.XSpace()
  plane = space.planes.add(name="/host:CPU")
  plane.event_metadata[1].name = "asl_detector/backbone/embd_0/MatMul:MatMul"
  plane.event_metadata[2].name = "ExecutorState::Process"
  ms = int(1e9)  # picoseconds
  first = plane.lines.add(name="tf_Compute", timestamp_ns=0)
  for offset, duration in [(0, 100), (300, 100)]:
    first.events.add(metadata_id=1, offset_ps=offset * ms, duration_ps=duration * ms)
  second = plane.lines.add(name="tf_Compute", timestamp_ns=20_000_000)  # starts at 20 ms
  second.events.add(metadata_id=1, offset_ps=30 * ms, duration_ps=100 * ms)  # 50-150 ms
  second.events.add(metadata_id=1, offset_ps=300 * ms, duration_ps=50 * ms)  # 320-370: inside
  second.events.add(metadata_id=2, offset_ps=480 * ms, duration_ps=400 * ms)  # not an op
  out = profile_step.summarize_xspace(space, steps=2)
  assert out["busy_sec"] == pytest.approx(0.125)  # [0, 150) and [300, 400) ms over 2 steps
  assert out["op_thread_sec"] == pytest.approx(0.175)


def test_profile_wall_shares_split_each_instant_among_the_ops_running():
  """Two ops overlapping for 50 of their 100 ps each take 75 ps of wall time; a third running
  alone takes all of its time, a zero-length one none; the shares sum to the busy time."""
  profile_step = _load("profile_step")
  events = [(0, 100, "MatMul"), (50, 150, "Mul"), (200, 260, "Mul"), (120, 120, "Pack"),
            (300, 330, "MatMul"), (300, 330, "Mul"), (300, 330, "Pack")]
  shares = profile_step.wall_shares(events)
  assert shares == {"MatMul": pytest.approx(85.0), "Mul": pytest.approx(145.0),
                    "Pack": pytest.approx(10.0)}
  assert sum(shares.values()) == pytest.approx(150 + 60 + 30)  # the union of the intervals


@pytest.mark.slow
@pytest.mark.parametrize("forward", [False, True])
def test_profile_step_quick(forward, tmp_path):
  out = tmp_path / "profile.json"
  _run([os.path.join(_BENCH, "profile_step.py"), "--quick", "--steps=1", "--top=30",
        f"--logdir={tmp_path / 'trace'}", f"--output={out}"] + (["--forward"] if forward else []))
  result = json.loads(out.read_text())
  profile = result["profile"]
  assert result["step"]["median_sec"] > 0 and os.path.exists(result["trace"])
  assert set(result["run"]) == {"started", "load_1min", "code"}  # which code was profiled
  assert 0 < profile["gemm_thread_sec"] < profile["op_thread_sec"]
  assert 0 < profile["busy_sec"] <= profile["op_thread_sec"]
  assert profile["profiled_wall_sec"] > 0
  assert len(profile["by_type"]) == 30  # --top keeps the largest; every part fits in 30
  parts = {part["part"].split()[0] for part in profile["by_part"]}
  assert parts <= ({"forward", "other"} if forward else {"forward", "backward", "optimizer",
                                                         "other"}), parts
  if forward:  # both heads run: no output is left for TensorFlow to prune (a pruned head has
    # no op event at all; how long each head takes varies with the load, so it is not compared)
    sec = {p["part"]: p["sec"] for p in profile["by_part"]}
    assert sec.get("forward reg_head", 0.0) > 0 and sec.get("forward cls_head", 0.0) > 0
    assert result["variant"] is None


def test_ab_step_comparisons_differ_only_in_what_they_compare():
  """Each comparison's variants build configs equal but for the compared fields, so a timing
  difference is that field's."""
  ab_step = _load("ab_step")
  train_step = _load("train_step")
  from asl_tf import config as config_lib  # pylint: disable=g-import-not-at-top
  from asl_tf import flags as asl_flags  # pylint: disable=g-import-not-at-top
  compared = {"kernel_policy": {"kernel_policy"},
              "asl": {"class_sensitivity", "instance_sensitivity", "contrastive_weight",
                      "contrastive_sampling", "evaluator_layers"},
              "dtype": {"mixed_precision", "kernel_policy"},
              # The same config; only the optimizer's form differs (below).
              "optimizer": set()}
  for comparison in ab_step.COMPARISONS:
    for flagfile in ("bench", "thumos_i3d"):  # THUMOS14's turns on the class level
      models = {}
      for name, extra in ab_step.variant_flags(comparison).items():
        asl_flags.FLAGS.unparse_flags()
        config = train_step._config(flagfile, False, extra)
        models[name] = {**config.model.__dict__, **config.train.__dict__,
                        **config.loss.__dict__}
      first = next(iter(models.values()))
      differing = {k for m in models.values() for k in m if m[k] != first[k]}
      assert differing == compared[comparison], (comparison, flagfile)
      # Every variant trains the default model's contrastive loss unless it names another, and
      # every one but `asl_class_level` without the class level.
      for name, model in models.items():
        want = {"actionformer": (0.0, "windows"), "asl_no_contrastive": (0.0, "windows"),
                "asl_contrastive_topk": (0.1, "sensitivity_topk")}.get(
                    name, (config_lib.ModelConfig().contrastive_weight, "windows"))
        assert (model["contrastive_weight"], model["contrastive_sampling"]) == want, (name,
                                                                                      flagfile)
        assert model["class_sensitivity"] == (name == "asl_class_level"), (name, flagfile)
  asl_flags.FLAGS.unparse_flags()
  optimizer_policies = train_step.OPTIMIZER_FORMS
  assert set(optimizer_policies) == set(ab_step.COMPARISONS["optimizer"])
  assert sorted(optimizer_policies.values()) == ["fast", "reference"]


def test_train_memory_counts_ops_by_top_level_scope():
  train_memory = _load("train_memory")
  scope = train_memory._scope  # pylint: disable=protected-access
  assert scope("gradient_tape/asl_detector_1/backbone_1/Mul") == "gradient"
  assert scope("fused_adam_w_3/ResourceApplyAdam") == "fused_adam_w"
  assert scope("adam_w/Pow") == "adam_w"
  assert scope("asl_detector_1/neck_1/norm_0_1/Mean") == "asl_detector"
