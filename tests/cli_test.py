"""The entry points on a tiny checkpoint (random weights): evaluate / infer / visualize, and train's
start-up errors."""

import csv
import dataclasses
import json
import logging
import os
import re
import shutil

import numpy as np
import pytest
import tensorflow as tf

from asl_tf import config as config_lib
from asl_tf import evaluate
from asl_tf import flags as asl_flags
from asl_tf import infer
from asl_tf import inference
from asl_tf import train
from asl_tf import visualize
from asl_tf.data import demo
from asl_tf.training import checkpoints
from asl_tf.training import optimizer as optimizer_lib

TINY_FLAGS = [
    "--input_dim=8", "--num_classes=3", "--feat_stride=4", "--num_frames=16",
    "--default_fps=30", "--max_seq_len=96", "--backbone_arch=1,1,1",
    "--regression_range=0,4,4,10000", "--mha_win_size=5", "--embd_dim=16", "--fpn_dim=16",
    "--head_dim=16", "--contrastive_proj_dim=8", "--max_seg_num=20", "--train_subset=training",
    "--eval_subset=validation", "--tiou_thresholds=0.3,0.5,0.7", "--class_sensitivity",
]


def _run(main, argv):
  asl_flags.FLAGS.unparse_flags()
  asl_flags.parse_argv(["prog"] + argv)
  main([])


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  """A demo dataset and a run folder with config.json and one checkpoint."""
  root = tmp_path_factory.mktemp("cli")
  data_dir = str(root / "data")
  flagfile = root / "tiny.flags"
  flagfile.write_text("\n".join(TINY_FLAGS + [
      f"--demo_dir={data_dir}", f"--annotation_file={data_dir}/annotations.json",
      f"--feature_dir={data_dir}/features", f"--output_dir={root}/run"]) + "\n")
  asl_flags.FLAGS.unparse_flags()
  asl_flags.parse_argv(["prog", f"--flagfile={flagfile}"])
  config = asl_flags.build_config()
  demo.ensure_demo_data(config.data)
  tf.keras.utils.set_random_seed(1)
  model = inference.build_detector(config)
  optimizer = optimizer_lib.build_optimizer(model, config.train, config.model, 10)
  optimizer.build(model.trainable_variables)
  os.makedirs(config.train.output_dir)
  config.save(os.path.join(config.train.output_dir, "config.json"))
  checkpoints.RunCheckpointer(config.train.output_dir, 1, model=model,
                              optimizer=optimizer).save(1)
  return {"root": root, "flagfile": str(flagfile), "config": config, "model": model,
          "run": config.train.output_dir, "data": data_dir}


def test_train_states_a_start_up_error_once(run_dir, tmp_path, caplog):
  """The one-line error was printed twice: as a log line and as the exit message."""
  with caplog.at_level(logging.INFO), pytest.raises(SystemExit) as e:
    _run(train.main, [f"--flagfile={run_dir['flagfile']}", f"--output_dir={tmp_path}/run",
                      "--train_subset=nosuch"])
  assert re.fullmatch(r"asl_tf\.train: \S+annotations\.json: subset 'nosuch' not found; .*",
                      str(e.value))
  assert "nosuch" not in caplog.text


def test_evaluate_writes_the_contract_files(run_dir):
  _run(evaluate.main, [f"--checkpoint={run_dir['run']}"])
  eval_dir = os.path.join(run_dir["run"], "eval")
  with open(os.path.join(eval_dir, "metrics.json")) as f:
    metrics = json.load(f)
  assert metrics["tiou_thresholds"] == [0.3, 0.5, 0.7]
  assert len(metrics["mAP"]) == 3 and all(0.0 <= m <= 1.0 for m in metrics["mAP"])
  assert metrics["average_mAP"] == pytest.approx(np.mean(metrics["mAP"]))
  with open(os.path.join(eval_dir, "detections.json")) as f:
    results = json.load(f)["results"]
  records = demo_records(run_dir)
  assert set(results) == {r.video_id for r in records}
  for dets in results.values():
    assert len(dets) <= 20
    for d in dets:
      assert d["segment"][0] <= d["segment"][1]
      assert d["label"] == f"action_{d['label_id']:02d}"  # names from the annotation file
      assert 0.0 <= d["score"] <= 1.0
  with open(os.path.join(eval_dir, "per_class_ap.csv")) as f:
    rows = list(csv.reader(f))
  assert rows[0] == ["class", "AP@0.30", "AP@0.50", "AP@0.70", "average"]
  assert len(rows) - 1 == len(metrics["per_class_ap"])


def test_evaluate_scores_a_segment_past_the_video_as_a_miss(run_dir, tmp_path):
  """The reference evaluation keeps a ground-truth segment that lies after the video's end (no
  detection can reach it); evaluation dropped it with training's cleaning, raising that
  class's AP by npos / (npos - 1) (THUMOS14 test has 26 such segments)."""
  with open(run_dir["config"].data.annotation_file) as f:
    data = json.load(f)
  video_id, entry = next((k, v) for k, v in data["database"].items()
                         if v["subset"] == "validation" and v["annotations"])
  label, label_id = entry["annotations"][0]["label"], entry["annotations"][0]["label_id"]
  entry["annotations"].append({"label": label, "label_id": label_id,
                               "segment": [entry["duration"] + 5, entry["duration"] + 9]})
  extended = tmp_path / "annotations.json"
  extended.write_text(json.dumps(data))

  def metrics(annotation_file, folder):
    _run(evaluate.main, [f"--checkpoint={run_dir['run']}", f"--output_dir={tmp_path / folder}",
                         f"--annotation_file={annotation_file}"])
    with open(tmp_path / folder / "eval" / "metrics.json") as f:
      return json.load(f)

  before = metrics(run_dir["config"].data.annotation_file, "before")
  after = metrics(extended, "after")
  records = demo_records(run_dir)
  assert before["num_ground_truth_segments"] == sum(len(r.eval_labels) for r in records)
  assert after["num_ground_truth_segments"] == before["num_ground_truth_segments"] + 1
  npos = sum(int(np.sum(r.eval_labels == label_id)) for r in records)
  for name, ap in before["per_class_ap"].items():  # one miss more: recall, so AP, x npos / +1
    expected = np.multiply(ap, npos / (npos + 1)) if name == label else ap
    np.testing.assert_allclose(after["per_class_ap"][name], expected, rtol=1e-9)


def demo_records(run_dir):
  from asl_tf.data import annotations  # pylint: disable=g-import-not-at-top
  records, _ = annotations.load_video_records(run_dir["config"].data, "validation")
  return records


def test_evaluate_refuses_flags_that_contradict_the_checkpoint(run_dir):
  with pytest.raises(SystemExit, match=r"model.embd_dim: 16 \(checkpoint\) vs 32 \(flags\)"):
    _run(evaluate.main, [f"--flagfile={run_dir['flagfile']}", "--embd_dim=32", "--fpn_dim=32",
                         f"--checkpoint={run_dir['run']}"])


def _copy_run(run_dir, tmp_path):
  copy = tmp_path / "copied_run"
  shutil.copytree(run_dir["run"], copy, ignore=shutil.ignore_patterns("eval", "infer"))
  return str(copy)


def _mtime(path):
  return os.path.getmtime(path) if os.path.exists(path) else None


def test_evaluate_writes_into_the_checkpoints_run_not_the_one_in_config_json(run_dir, tmp_path):
  """A copied run keeps the original's output_dir in config.json; evaluating the copy by a
  checkpoint prefix writes into the copy and leaves the original alone."""
  copy = _copy_run(run_dir, tmp_path)
  prefix = tf.train.latest_checkpoint(os.path.join(copy, "checkpoints"))
  original = os.path.join(run_dir["run"], "eval", "metrics.json")
  before = _mtime(original)
  _run(evaluate.main, [f"--checkpoint={prefix}"])
  assert os.path.exists(os.path.join(copy, "eval", "metrics.json"))
  assert _mtime(original) == before
  out = tmp_path / "elsewhere"
  _run(evaluate.main, [f"--checkpoint={prefix}", f"--output_dir={out}"])
  assert os.path.exists(out / "eval" / "metrics.json")


def test_evaluate_without_flagfile_applies_or_refuses_every_given_flag(run_dir, tmp_path):
  copy = _copy_run(run_dir, tmp_path)
  _run(evaluate.main, [f"--checkpoint={copy}", "--tiou_thresholds=0.5", "--max_seg_num=5"])
  with open(os.path.join(copy, "eval", "metrics.json")) as f:
    assert json.load(f)["tiou_thresholds"] == [0.5]
  with open(os.path.join(copy, "eval", "detections.json")) as f:
    assert max(len(d) for d in json.load(f)["results"].values()) <= 5
  with pytest.raises(SystemExit, match=r"--embd_dim=32 \(would change the trained model; the "
                                       r"checkpoint was trained with 16\)"):
    _run(evaluate.main, [f"--checkpoint={copy}", "--embd_dim=32"])


@pytest.mark.parametrize("part", [".index", ".data-00000-of-00001"])
def test_truncated_checkpoint_is_one_line_naming_it(run_dir, tmp_path, part):
  copy = _copy_run(run_dir, tmp_path)
  prefix = tf.train.latest_checkpoint(os.path.join(copy, "checkpoints"))
  with open(prefix + part, "r+b") as f:
    f.truncate(os.path.getsize(prefix + part) // 2)
  for main, extra in ((evaluate.main, []),
                      (infer.main, [f"--features_path={run_dir['data']}/features"])):
    with pytest.raises(SystemExit, match=f"{prefix} is damaged"):
      _run(main, [f"--checkpoint={prefix}"] + extra)


def test_infer_with_a_missing_checkpoint_is_one_line(tmp_path):
  missing = tmp_path / "nothing_here"
  with pytest.raises(SystemExit, match=f"asl_tf.infer: --checkpoint={missing} is neither"):
    _run(infer.main, [f"--checkpoint={missing}", f"--features_path={tmp_path}"])


def test_infer_refuses_flags_a_saved_model_cannot_honour(tmp_path):
  """An export's precision, kernels and post-processing are baked in: asking --saved_model for
  others is one line naming them, not detections computed otherwise than asked (checked before
  the SavedModel is read)."""
  with pytest.raises(SystemExit, match=r"^asl_tf.infer: --inference_precision, --max_seg_num "
                     r"cannot change --saved_model: .* re-export with the flag"):
    _run(infer.main, [f"--saved_model={tmp_path}", f"--features_path={tmp_path}",
                      "--inference_precision=mixed_bfloat16", "--max_seg_num=5"])


def test_infer_writes_beside_the_run_and_never_replaces_a_foreign_file(run_dir, tmp_path):
  copy = _copy_run(run_dir, tmp_path)
  video = sorted(os.listdir(os.path.join(run_dir["data"], "features")))[0]
  feats = os.path.join(run_dir["data"], "features", video)
  _run(infer.main, [f"--checkpoint={copy}", f"--features_path={feats}"])
  default = os.path.join(copy, "infer", "detections.json")
  with open(default) as f:
    assert list(json.load(f)["results"]) == [os.path.splitext(video)[0]]
  _run(infer.main, [f"--checkpoint={copy}", f"--features_path={feats}"])  # own output: replaced
  precious = tmp_path / "annotations.json"
  precious.write_text('{"database": {}}')
  with pytest.raises(SystemExit, match=r"annotations.json exists and is not an ActivityNet "
                                       r"results file; .* --overwrite"):
    _run(infer.main, [f"--checkpoint={copy}", f"--features_path={feats}",
                      f"--results_file={precious}"])
  assert precious.read_text() == '{"database": {}}'
  _run(infer.main, [f"--checkpoint={copy}", f"--features_path={feats}",
                    f"--results_file={precious}", "--overwrite"])
  assert "results" in json.loads(precious.read_text())


def test_infer_matches_the_detector_and_writes_results(run_dir, tmp_path):
  feats = os.path.join(run_dir["data"], "features")
  videos = sorted(os.listdir(feats))[:2]
  folder = tmp_path / "videos"
  folder.mkdir()
  for v in videos:
    os.link(os.path.join(feats, v), folder / v)
  out = tmp_path / "det.json"
  _run(infer.main, [f"--checkpoint={run_dir['run']}", f"--features_path={folder}",
                    f"--results_file={out}"])
  results = json.loads(out.read_text())["results"]
  assert sorted(results) == sorted(os.path.splitext(v)[0] for v in videos)
  # Same detections as running the model directly on the padded video.
  model, cfg = run_dir["model"], run_dir["config"]
  vid = os.path.splitext(videos[0])[0]
  x = np.load(os.path.join(feats, videos[0]))
  padded, mask = inference.features_for_inference(x, 96, model.model_config.max_div_factor)
  duration = (x.shape[0] * 4 + 16) / 30.0
  direct = inference.detect_function(model)(padded, mask, *[np.array([v], np.float32)
                                                            for v in (30, duration, 4, 16)])
  n = int(direct["num_detections"][0])
  got = results[vid]
  assert len(got) == n
  np.testing.assert_allclose([d["segment"] for d in got], direct["segments_sec"][0, :n],
                             atol=1e-4)
  np.testing.assert_allclose([d["score"] for d in got], direct["scores"][0, :n], atol=1e-6)
  assert cfg.model.num_classes == 3


def test_infer_names_a_file_with_the_wrong_channel_count(run_dir, tmp_path):
  bad = tmp_path / "bad.npy"
  np.save(bad, np.zeros([40, 5], np.float32))
  with pytest.raises(SystemExit, match=r"bad.npy has shape \(40, 5\), expected \[T, 8\]"):
    _run(infer.main, [f"--checkpoint={run_dir['run']}", f"--features_path={bad}"])


def test_visualize_draws_timelines_and_sensitivity_curves(run_dir, tmp_path):
  pytest.importorskip("matplotlib")
  records = demo_records(run_dir)
  _run(visualize.main, [f"--checkpoint={run_dir['run']}", f"--plot_dir={tmp_path}",
                        f"--video_ids={records[0].video_id}"])
  assert (tmp_path / f"{records[0].video_id}.png").stat().st_size > 10_000
  assert (tmp_path / "sensitivity_curves.png").stat().st_size > 10_000


def test_visualize_unknown_video_is_named(run_dir, tmp_path):
  with pytest.raises(SystemExit, match="nope_video"):
    _run(visualize.main, [f"--checkpoint={run_dir['run']}", f"--plot_dir={tmp_path}",
                          "--video_ids=nope_video"])


def test_a_checkpoint_without_model_weights_is_refused(run_dir, tmp_path):
  """tf.train.Checkpoint(model=...) alone misses Keras 3's list-held layers: refuse it."""
  bare = tmp_path / "bare"
  os.makedirs(bare / "checkpoints")
  run_dir["config"].save(str(bare / "config.json"))
  tf.train.Checkpoint(model=run_dir["model"]).save(str(bare / "checkpoints" / "ckpt"))
  with pytest.raises(checkpoints.CheckpointError, match="holds no `model_weights`"):
    inference.load_model(str(bare))


def test_config_file_round_trips_through_the_run_folder(run_dir):
  saved = config_lib.Config.load(os.path.join(run_dir["run"], "config.json"))
  assert saved == run_dir["config"]


def test_a_video_with_both_npy_and_npz_is_named(tmp_path):
  np.save(tmp_path / "vid.npy", np.zeros([4, 8], np.float32))
  np.savez(tmp_path / "vid.npz", feats=np.zeros([4, 8], np.float32))
  with pytest.raises(infer.InferError, match=r"video 'vid' has two feature files, .*vid.npy and "
                                            r".*vid.npz"):
    infer.list_feature_files(str(tmp_path))


def test_a_run_folder_works_from_any_working_directory(run_dir, tmp_path, monkeypatch):
  """Flags given relative to where training started are stored absolute in config.json, so
  evaluate / infer find the data from elsewhere (they used to fail after loading the model)."""
  monkeypatch.chdir(run_dir["root"])
  asl_flags.FLAGS.unparse_flags()
  asl_flags.parse_argv(["prog"] + TINY_FLAGS + [
      "--annotation_file=data/annotations.json", "--feature_dir=data/features",
      "--output_dir=relative_run"])
  config = asl_flags.build_config()
  assert os.path.isabs(config.data.annotation_file) and os.path.isabs(config.data.feature_dir[0])
  run = tmp_path / "moved_run"
  shutil.copytree(run_dir["run"], run, ignore=shutil.ignore_patterns("eval", "infer"))
  config.save(str(run / "config.json"))
  monkeypatch.chdir(tmp_path)
  _run(evaluate.main, [f"--checkpoint={run}"])
  assert (run / "eval" / "metrics.json").exists()
  video = sorted(os.listdir(os.path.join(run_dir["data"], "features")))[0]
  _run(infer.main, [f"--checkpoint={run}",
                    f"--features_path={os.path.join(run_dir['data'], 'features', video)}"])
  assert (run / "infer" / "detections.json").exists()


def test_infer_without_flagfile_uses_the_runs_timebase_and_single_dash_flags_apply(run_dir,
                                                                                  tmp_path):
  """A run trained at 15 fps: infer without --flagfile used the flag default (30), halving every
  time; `-tiou_thresholds` (one dash) was parsed by absl but not applied by evaluate."""
  video = sorted(os.listdir(os.path.join(run_dir["data"], "features")))[0]
  feats = os.path.join(run_dir["data"], "features", video)
  seconds = {}
  for fps in (30.0, 15.0):
    copy = tmp_path / f"run_{int(fps)}"
    shutil.copytree(run_dir["run"], copy, ignore=shutil.ignore_patterns("eval", "infer"))
    config = config_lib.Config.load(str(copy / "config.json"))
    config = dataclasses.replace(config, data=dataclasses.replace(config.data, fps_override=fps))
    config.save(str(copy / "config.json"))
    out = tmp_path / f"det_{int(fps)}.json"
    _run(infer.main, [f"--checkpoint={copy}", f"--features_path={feats}",
                      f"--results_file={out}"])
    dets = json.loads(out.read_text())["results"][os.path.splitext(video)[0]]
    seconds[fps] = np.array([d["segment"] for d in dets])
  assert len(seconds[30.0]) and seconds[15.0].max() > seconds[30.0].max() * 1.5
  _run(evaluate.main, [f"--checkpoint={tmp_path / 'run_15'}", "-tiou_thresholds=0.5"])
  with open(tmp_path / "run_15" / "eval" / "metrics.json") as f:
    assert json.load(f)["tiou_thresholds"] == [0.5]


def test_score_curve_is_the_max_over_levels_per_frame():
  """A stride-2 point covers two base frames; the curve takes each frame's best level (it showed
  level 0 only, where long actions hardly fire)."""
  points = np.array([[0, 0, 4, 1], [1, 0, 4, 1], [2, 0, 4, 1], [3, 0, 4, 1],
                     [0, 4, 1e4, 2], [2, 4, 1e4, 2]], np.float32)
  probs = np.array([[0.1, 0.0], [0.2, 0.0], [0.3, 0.9], [0.4, 0.0], [0.5, 0.0], [0.05, 0.6]])
  np.testing.assert_allclose(visualize.max_over_levels(probs, points, 4),
                             [[0.5, 0.0], [0.5, 0.0], [0.3, 0.9], [0.4, 0.6]])
  np.testing.assert_allclose(visualize.max_over_levels(probs, points, 3)[:, 1], [0.0, 0.0, 0.9])


def _resized_run(run_dir, tmp_path, resize_length):
  """A copy of the run whose config resizes every video to `resize_length` features (ANet)."""
  copy = _copy_run(run_dir, tmp_path)
  config = config_lib.Config.load(os.path.join(copy, "config.json"))
  config = dataclasses.replace(config, data=dataclasses.replace(config.data,
                                                                resize_length=resize_length))
  config.save(os.path.join(copy, "config.json"))
  return copy


def test_infer_of_a_resized_run_times_each_video_by_its_own_length(run_dir, tmp_path):
  """With --resize_length (ActivityNet), seconds come from the file's feature count: infer
  took the timebase of the resized count, so a 200-feature video's detections came out at
  about a fifth of their time."""
  copy = _resized_run(run_dir, tmp_path, 96)
  raw = np.random.default_rng(3).normal(size=[200, 8]).astype(np.float32)
  video = tmp_path / "long_video.npy"
  np.save(video, raw)
  out = tmp_path / "det.json"
  _run(infer.main, [f"--checkpoint={copy}", f"--features_path={video}", f"--results_file={out}"])
  got = json.loads(out.read_text())["results"]["long_video"]
  model = run_dir["model"]
  from asl_tf.data import features  # pylint: disable=g-import-not-at-top
  padded, mask = inference.features_for_inference(features.resize_linear(raw, 96), 96,
                                                  model.model_config.max_div_factor)
  stride = (199 * 4 + 16) / 96  # ((T - 1) * feat_stride + num_frames) / resize_length
  duration = (200 * 4 + 16) / 30.0
  direct = inference.detect_function(model)(padded, mask, *[
      np.array([v], np.float32) for v in (30, duration, stride, stride)])
  n = int(direct["num_detections"][0])
  assert len(got) == n > 0
  np.testing.assert_allclose([d["segment"] for d in got], direct["segments_sec"][0, :n],
                             atol=1e-3)
  assert max(d["segment"][1] for d in got) > 0.5 * duration


def test_infer_with_a_saved_model_equals_the_checkpoint_at_another_fps(run_dir, tmp_path):
  """`--saved_model` ignored --fps and never resized: its seconds were the export's baked
  timebase (30 fps here, unresized videos) whatever the videos were."""
  from asl_tf.serving import module as module_lib  # pylint: disable=g-import-not-at-top
  copy = _resized_run(run_dir, tmp_path, 96)
  model, config = inference.load_model(copy)
  version = module_lib.export_saved_model(model, config, str(tmp_path / "export"), warmup=False)
  raw = np.random.default_rng(4).normal(size=[150, 8]).astype(np.float32)
  video = tmp_path / "video.npy"
  np.save(video, raw)
  results = []
  for source in (f"--checkpoint={copy}", f"--saved_model={version}"):
    out = tmp_path / f"det_{len(results)}.json"
    _run(infer.main, [source, f"--features_path={video}", f"--results_file={out}", "--fps=15"])
    results.append(json.loads(out.read_text())["results"]["video"])
  ckpt, served = results
  assert len(ckpt) == len(served) > 0
  np.testing.assert_allclose([d["segment"] for d in served], [d["segment"] for d in ckpt],
                             atol=1e-3)
  np.testing.assert_allclose([d["score"] for d in served], [d["score"] for d in ckpt], atol=1e-5)


def test_a_served_resized_model_times_each_video_it_is_sent(run_dir, tmp_path):
  """An export of a model trained on resized features (ActivityNet) took the features as sent
  and timed them as unresized videos: a TF Serving client got seconds about 2x off. The graph
  now resizes each video and times it by its own length: serving_default on the features as
  extracted equals infer --checkpoint."""
  from asl_tf.serving import module as module_lib  # pylint: disable=g-import-not-at-top
  copy = _resized_run(run_dir, tmp_path, 96)
  model, config = inference.load_model(copy)
  version = module_lib.export_saved_model(model, config, str(tmp_path / "export"), warmup=False)
  rng = np.random.default_rng(6)
  raws = [rng.normal(size=[n, 8]).astype(np.float32) for n in (150, 61)]
  served = tf.saved_model.load(version).signatures["serving_default"]
  batch = np.zeros([2, 150, 8], np.float32)
  batch[0], batch[1, :61] = raws
  out = served(features=tf.constant(batch), lengths=tf.constant([150, 61], tf.int32))
  for i, raw in enumerate(raws):
    video = tmp_path / f"video{i}.npy"
    np.save(video, raw)
    results = tmp_path / f"ckpt{i}.json"
    _run(infer.main, [f"--checkpoint={copy}", f"--features_path={video}",
                      f"--results_file={results}"])
    want = json.loads(results.read_text())["results"][f"video{i}"]
    n = int(out["num_detections"][i])
    assert n == len(want) > 0
    np.testing.assert_allclose(out["segments_sec"].numpy()[i, :n],
                               [d["segment"] for d in want], atol=1e-3)
    np.testing.assert_allclose(out["scores"].numpy()[i, :n], [d["score"] for d in want],
                               atol=1e-5)


@pytest.mark.parametrize("fps", ["-30", "nan", "inf"])
def test_infer_refuses_an_fps_that_is_not_a_rate(tmp_path, fps):
  with pytest.raises(SystemExit, match=r"^asl_tf.infer: --fps=\S+: the videos' frames per "
                                       "second"):
    _run(infer.main, [f"--saved_model={tmp_path}", f"--features_path={tmp_path}",
                      f"--results_file={tmp_path / 'd.json'}", f"--fps={fps}"])


def test_infer_names_a_saved_model_that_is_not_an_asl_tf_export(tmp_path):
  """A timebase without input_dim was a KeyError traceback."""
  version = tmp_path / "1"
  (version / "assets").mkdir(parents=True)
  (version / "assets" / "timebase.json").write_text('{"fps": 30, "feat_stride": 4, '
                                                     '"num_frames": 16}')
  (version / "assets" / "class_names.txt").write_text("a\n")
  video = tmp_path / "v.npy"
  np.save(video, np.zeros([10, 8], np.float32))
  with pytest.raises(SystemExit, match=r"^asl_tf.infer: --saved_model=.*/1: .*timebase.json "
                                       r"lacks input_dim; pass a version folder asl_tf.export"):
    _run(infer.main, [f"--saved_model={version}", f"--features_path={video}",
                      f"--results_file={tmp_path / 'd.json'}"])
  with pytest.raises(SystemExit, match=r"^asl_tf.infer: --saved_model=.*: not an asl_tf export "
                                       r".*; it is the model's base path: pass a version folder "
                                       r"such as .*/1$"):
    _run(infer.main, [f"--saved_model={tmp_path}", f"--features_path={video}",
                      f"--results_file={tmp_path / 'd.json'}"])


def test_an_annotation_file_that_renames_the_classes_is_refused(run_dir, tmp_path):
  """Evaluating on a file whose label ids name other classes than training's scored every
  detection against the wrong class: a lower mAP, silently."""
  copy = _copy_run(run_dir, tmp_path)
  with open(os.path.join(run_dir["data"], "annotations.json")) as f:
    database = json.load(f)
  names = inference.class_names(run_dir["config"])
  with open(os.path.join(copy, "class_names.json"), "w") as f:
    json.dump({"class_names": names}, f)
  swapped = {0: 1, 1: 0}
  for video in database["database"].values():
    for ann in video["annotations"]:
      ann["label_id"] = swapped.get(ann["label_id"], ann["label_id"])
  other = tmp_path / "swapped.json"
  other.write_text(json.dumps(database))
  for tool in (evaluate.main, visualize.main):
    with pytest.raises(SystemExit, match=rf"swapped.json maps label ids to other classes than "
                                         rf"the run trained on \(id 0: {names[1]!r} here, "
                                         rf"{names[0]!r} in training; id 1: .*"
                                         r"--label_map_file=<run folder>/class_names.json"):
      _run(tool, [f"--checkpoint={copy}", f"--annotation_file={other}",
                  f"--output_dir={tmp_path / 'out'}"])
  assert not (tmp_path / "out" / "eval").exists()
  # What the message says to do: the run's own names pin the ids.
  _run(evaluate.main, [f"--checkpoint={copy}", f"--annotation_file={other}",
                       f"--label_map_file={copy}/class_names.json",
                       f"--output_dir={tmp_path / 'pinned'}"])
  with open(tmp_path / "pinned" / "eval" / "metrics.json") as f:
    pinned = json.load(f)
  _run(evaluate.main, [f"--checkpoint={copy}", f"--output_dir={tmp_path / 'out'}"])
  with open(tmp_path / "out" / "eval" / "metrics.json") as f:
    assert json.load(f)["average_mAP"] == pinned["average_mAP"]
  assert (tmp_path / "out" / "eval" / "metrics.json").exists()


def test_visualize_refuses_a_plot_dir_that_is_a_file_and_no_videos(run_dir, tmp_path):
  """--plot_dir naming a file was a FileExistsError traceback; --num_videos=-3 drew all but
  three videos (a Python slice), 0 drew nothing and said nothing."""
  taken = tmp_path / "det.json"
  taken.write_text("{}")
  with pytest.raises(SystemExit, match=r"^asl_tf.visualize: --plot_dir=.*det.json is a file"):
    _run(visualize.main, [f"--checkpoint={run_dir['run']}", f"--plot_dir={taken}"])
  for bad in ("-3", "0"):
    with pytest.raises(config_lib.ConfigError, match=f"--num_videos={bad}: {bad} is not a "
                                                     "positive integer"):
      _run(visualize.main, [f"--checkpoint={run_dir['run']}", f"--num_videos={bad}"])


def test_the_class_name_check_skips_what_neither_file_names_and_fused_scores():
  """An id the training file did not name (`class_1` in class_names.json) was refused when an
  evaluation file named it; score fusion labels by the classifier's names, not training's."""
  base = config_lib.Config()
  config = dataclasses.replace(base, data=dataclasses.replace(base.data, num_classes=3,
                                                              annotation_file="eval.json"))
  inference.check_class_names(["a", "b", "c"], ["a", "class_1", "c"], config)
  inference.check_class_names(["a", "class_1", "c"], ["a", "b", "c"], config)
  with pytest.raises(config_lib.ConfigError, match=r"eval.json maps label ids .*id 2: 'd' here, "
                                                   r"'c' in training"):
    inference.check_class_names(["a", "b", "d"], ["a", "b", "c"], config)
  fused = dataclasses.replace(config, eval=dataclasses.replace(config.eval,
                                                               ext_score_file="cls.json"))
  inference.check_class_names(["a", "b", "d"], ["a", "b", "c"], fused)
