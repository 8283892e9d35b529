"""export_saved_model: a tiny detector exported once, reloaded every way TF Serving users do."""

import dataclasses
import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from asl_tf import config as config_lib
from asl_tf import inference
from asl_tf.data import pipeline
from asl_tf.serving import client as client_lib
from asl_tf.serving import module
from asl_tf.serving import testing_server
from asl_tf.serving import warmup

C, K, MAX_SEQ_LEN = 8, 60, 32
TIMEBASE = {"fps": 25.0, "feat_stride": 4.0, "num_frames": 16.0}
CLASS_NAMES = ("walk", "run", "jump")
SAVED_MODEL_CLI = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")


def tiny_config():
  model = config_lib.ModelConfig(
      input_dim=C, num_classes=3, max_seq_len=MAX_SEQ_LEN, backbone_arch=(1, 1, 1),
      embd_dim=16, fpn_dim=16, head_dim=16, n_head=2, mha_win_size=(5,),
      regression_range=((0, 4), (4, 10000)))
  data = config_lib.DataConfig(input_dim=C, num_classes=3, max_seq_len=MAX_SEQ_LEN,
                               feat_stride=TIMEBASE["feat_stride"],
                               num_frames=TIMEBASE["num_frames"], fps_override=TIMEBASE["fps"])
  return config_lib.validate(config_lib.Config(data=data, model=model,
                                               eval=config_lib.EvalConfig(max_seg_num=K)))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  """(model, config, base path, version dir, loaded SavedModel): one export per module. The model
  computes under the `fast` kernel policy; the export must trace it as `portable`."""
  keras.utils.set_random_seed(0)
  config = tiny_config()
  model = inference.build_detector(
      dataclasses.replace(config, model=dataclasses.replace(config.model, kernel_policy="fast")))
  base = str(tmp_path_factory.mktemp("models") / "asl")
  path = module.export_saved_model(model, config, base, class_names=CLASS_NAMES)
  return model, config, base, path, tf.saved_model.load(path)


def _batch(lengths, time_steps, seed=0):
  """Client-padded features [B, time, C] (garbage past each length) and lengths [B]."""
  rng = np.random.default_rng(seed)
  features = rng.normal(size=(len(lengths), time_steps, C)).astype(np.float32)
  for b, n in enumerate(lengths):
    features[b, n:] = 50.0
  return features, np.asarray(lengths, np.int32)


def _reference_inputs(model, features, lengths):
  """What evaluation feeds the model: zero-padded to eval_padded_length(max length)."""
  padded = pipeline.eval_padded_length(int(lengths.max()), MAX_SEQ_LEN,
                                       model.model_config.max_div_factor)
  mask = np.arange(padded)[None] < lengths[:, None]  # [B, T_pad]
  x = np.zeros((len(lengths), padded, C), np.float32)
  width = min(padded, features.shape[1])
  x[:, :width] = features[:, :width]
  x[~mask] = 0.0
  return x, mask


def _reference_detections(model, features, lengths):
  x, mask = _reference_inputs(model, features, lengths)
  per_video = lambda v: tf.fill([len(lengths)], v)
  duration = (lengths * TIMEBASE["feat_stride"] + TIMEBASE["num_frames"]) / TIMEBASE["fps"]
  out = model.detect(x, mask, per_video(TIMEBASE["fps"]), tf.constant(duration, tf.float32),
                     per_video(TIMEBASE["feat_stride"]), per_video(TIMEBASE["num_frames"]))
  return {k: v.numpy() for k, v in out.items()}


def _call(loaded, signature, **inputs):
  out = loaded.signatures[signature](**{k: tf.constant(v) for k, v in inputs.items()})
  return {k: v.numpy() for k, v in out.items()}


def _assert_same_detections(got, want):
  assert set(got) == set(module.DETECTION_KEYS)
  np.testing.assert_array_equal(got["num_detections"], want["num_detections"])
  np.testing.assert_array_equal(got["labels"], want["labels"])
  for key in ("segments_sec", "segments_grid", "scores"):
    np.testing.assert_allclose(got[key], want[key], atol=1e-5, rtol=0, err_msg=key)


def test_layout_assets_and_warmup(exported):
  _, config, base, path, _ = exported
  assert path == os.path.join(base, "1")
  assert sorted(d for d in os.listdir(base)) == ["1"]  # no staging folder left behind
  with open(os.path.join(path, "assets", "class_names.txt")) as f:
    assert f.read().splitlines() == list(CLASS_NAMES)
  timebase = module.read_timebase(path)
  assert timebase == dict(TIMEBASE, max_div_factor=8, max_seq_len=MAX_SEQ_LEN, input_dim=C,
                          num_classes=3, max_frames=16 * MAX_SEQ_LEN, resize_length=0)
  with open(os.path.join(path, "assets", "model_info.json")) as f:
    info = json.load(f)
  assert info["signatures"]["serving_default"]["inputs"] == {
      "features": {"dtype": "float32", "shape": [-1, -1, C]},
      "lengths": {"dtype": "int32", "shape": [-1]}}
  assert info["signatures"]["raw_scores"]["outputs"]["points"]["shape"] == [-1, 4]
  assert info["max_detections"] == K and info["class_names"] == list(CLASS_NAMES)
  assert info["config"]["model"]["kernel_policy"] == "portable"
  assert config_lib.Config.from_dict(info["config"]) == dataclasses.replace(
      config, model=dataclasses.replace(config.model, kernel_policy="portable"))
  records = warmup.read_warmup_requests(path)
  assert [r.predict_log.request.model_spec.signature_name for r in records] == [
      "serving_default", "detect_full"]
  shape = records[0].predict_log.request.inputs["features"].tensor_shape
  assert [d.size for d in shape.dim] == [1, MAX_SEQ_LEN, C]


def test_the_graphs_are_portable_across_onednn_settings(exported):
  """No computation that is only fast with oneDNN (the inference LayerNorm as FusedBatchNorm,
  3x slower without it), though the model computes under `fast`: a server may run without
  oneDNN."""
  from tensorflow.core.protobuf import saved_model_pb2  # pylint: disable=g-import-not-at-top
  saved = saved_model_pb2.SavedModel()
  with open(os.path.join(exported[3], "saved_model.pb"), "rb") as f:
    saved.ParseFromString(f.read())
  graph = saved.meta_graphs[0].graph_def
  ops = {node.op for node in graph.node}
  ops |= {node.op for fn in graph.library.function for node in fn.node_def}
  assert "Mean" in ops  # the element-wise LayerNorm
  assert not {op for op in ops if op.startswith("FusedBatchNorm")}


def test_serving_default_equals_model_detect(exported):
  model, _, _, _, loaded = exported
  # 37: not a multiple of max_div_factor (8) and > max_seq_len, padded in-graph to 48.
  features, lengths = _batch([37, 20], time_steps=40)
  got = _call(loaded, "serving_default", features=features, lengths=lengths)
  want = _reference_detections(model, features, lengths)
  _assert_same_detections(got, want)
  assert got["segments_sec"].shape == (2, K, 2) and got["labels"].dtype == np.int32
  assert 0 < got["num_detections"][1] < K  # both a full and a partly padded result
  n = got["num_detections"][1]
  assert (got["labels"][1, n:] == -1).all() and (got["scores"][1, n:] == 0).all()
  assert got["segments_sec"].max() <= (37 * 4 + 16) / 25 + 1e-6  # clipped to the duration


def test_detect_full_equals_serving_default_with_full_lengths(exported):
  model, _, _, _, loaded = exported
  features, lengths = _batch([50], time_steps=50, seed=1)  # padded in-graph to 64
  full = _call(loaded, "detect_full", features=features)
  _assert_same_detections(full, _call(loaded, "serving_default", features=features,
                                      lengths=lengths))
  _assert_same_detections(full, _reference_detections(model, features, lengths))


def test_a_video_without_candidates_gives_no_detections(exported):
  loaded = exported[-1]
  # Zero features give zero-length segments, all below duration_thresh (the warm-up input).
  got = _call(loaded, "detect_full", features=np.zeros([1, MAX_SEQ_LEN, C], np.float32))
  assert got["num_detections"].tolist() == [0]
  assert (got["labels"] == -1).all() and (got["scores"] == 0).all()


def test_raw_scores_equal_the_model_outputs(exported):
  model, _, _, _, loaded = exported
  features, lengths = _batch([37, 20], time_steps=40, seed=2)
  got = _call(loaded, "raw_scores", features=features, lengths=lengths)
  x, mask = _reference_inputs(model, features, lengths)
  want = model(x, mask)
  np.testing.assert_allclose(got["cls_scores"], tf.sigmoid(want["cls_logits"]).numpy(),
                             atol=1e-6)
  np.testing.assert_allclose(got["offsets"], want["offsets"].numpy(), atol=1e-5)
  np.testing.assert_array_equal(got["points"], want["points"].numpy())
  np.testing.assert_array_equal(got["valid"], want["padding_mask"].numpy())
  assert got["cls_scores"].shape == (2, 48 + 24, 3) and got["valid"].dtype == bool


@pytest.mark.parametrize("signature,inputs,message", [
    ("serving_default", {"features": np.zeros([1, 32, 5], np.float32),
                         "lengths": np.array([32], np.int32)},
     r"features must be \[batch, time, 8\] float32 \(got another channel count\)"),
    ("detect_full", {"features": np.zeros([32, C], np.float32)},
     r"features must be \[batch, time, 8\] float32 \(got another rank\)"),
    ("raw_scores", {"features": np.zeros([1, 32, C], np.float32),
                    "lengths": np.array([-1], np.int32)},
     r"lengths must be \[batch\] int32 >= 0"),
    ("serving_default", {"features": np.zeros([1, 32, C], np.float32),
                         "lengths": np.array([33], np.int32)},
     r"lengths must be <= time"),
    ("serving_default", {"features": np.zeros([1, 32, C], np.float32),
                         "lengths": np.array([3, 4], np.int32)},
     r"one entry per video .*batch sizes differ"),
    # Used to fail inside a convolution / answer "0 detections" / compute without bound.
    ("serving_default", {"features": np.zeros([0, 32, C], np.float32),
                         "lengths": np.zeros([0], np.int32)},
     r"features must hold at least one video"),
    ("serving_default", {"features": np.full([1, 32, C], np.nan, np.float32),
                         "lengths": np.array([32], np.int32)}, r"features hold NaN or Inf"),
    ("detect_full", {"features": np.full([1, 32, C], np.inf, np.float32)},
     r"features hold NaN or Inf"),
    ("serving_default", {"features": np.zeros([1, 16 * MAX_SEQ_LEN + 1, C], np.float32),
                         "lengths": np.array([1], np.int32)},
     r"features are longer than this model serves \(512 frames"),
])
def test_bad_inputs_are_rejected_with_the_expected_shape(exported, signature, inputs, message):
  loaded = exported[-1]
  with pytest.raises(tf.errors.InvalidArgumentError, match=message):
    _call(loaded, signature, **inputs)


def test_tf1_session_loader_runs_the_signatures_by_tensor_name(exported):
  path, loaded = exported[3], exported[4]
  features, lengths = _batch([37, 20], time_steps=40, seed=3)
  want = _call(loaded, "serving_default", features=features, lengths=lengths)
  with tf.Graph().as_default() as graph, tf.compat.v1.Session(graph=graph) as sess:
    meta_graph = tf.compat.v1.saved_model.loader.load(sess, ["serve"], path)
    signature = meta_graph.signature_def["serving_default"]
    assert signature.method_name == "tensorflow/serving/predict"
    fetches = {k: v.name for k, v in signature.outputs.items()}
    got = sess.run(fetches, {signature.inputs["features"].name: features,
                             signature.inputs["lengths"].name: lengths})
    assert set(meta_graph.signature_def) >= set(module.SIGNATURE_NAMES)
  _assert_same_detections(got, want)


def _cli(*args):
  result = subprocess.run([SAVED_MODEL_CLI, *args], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
  assert result.returncode == 0, result.stderr[-2000:]
  return result.stdout


@pytest.mark.slow  # two saved_model_cli processes: ~25 s on 2 cores
def test_saved_model_cli_show_and_run(exported, tmp_path):
  path, loaded = exported[3], exported[4]
  shown = _cli("show", "--dir", path, "--all")
  for name in module.SIGNATURE_NAMES:
    assert f"signature_def['{name}']" in shown
  for key in module.DETECTION_KEYS + module.RAW_SCORE_KEYS + ("features", "lengths"):
    assert f"['{key}'] tensor_info" in shown
  assert "shape: (-1, -1, 8)" in shown
  features, _ = _batch([37], time_steps=37, seed=4)
  np.save(tmp_path / "f.npy", features)
  _cli("run", "--dir", path, "--tag_set", "serve", "--signature_def", "serving_default",
       "--inputs", f"features={tmp_path / 'f.npy'}", "--input_exprs", "lengths=[37]",
       "--outdir", str(tmp_path / "out"))
  want = _call(loaded, "serving_default", features=features, lengths=np.array([37], np.int32))
  _assert_same_detections({k: np.load(tmp_path / "out" / f"{k}.npy") for k in want}, want)


def test_grpc_round_trip_through_the_testing_server(exported):
  base, loaded = exported[2], exported[4]
  rng = np.random.default_rng(5)
  with testing_server.TestingServer(base, model_name="asl") as server:
    assert server.servable.num_warmup_requests == 2  # replayed at load, both succeeded
    with client_lib.ASLServingClient(server.address, model_name="asl", timeout_sec=60,
                                     class_names=CLASS_NAMES) as client:
      assert set(client.signature_defs()) == set(module.SIGNATURE_NAMES)
      for lengths in ([29], [37, 5, 20, 64]):
        videos = [rng.normal(size=(n, C)).astype(np.float32) for n in lengths]
        served = client.detect(videos)
        batch, lengths = client_lib.pad_videos(videos)
        want = _call(loaded, "serving_default", features=batch, lengths=lengths)
        assert len(served) == len(lengths)
        for b, video in enumerate(served):
          n = int(want["num_detections"][b])
          assert len(video["scores"]) == n > 0
          for key in ("segments_sec", "segments_grid", "scores", "labels"):
            np.testing.assert_array_equal(video[key], want[key][b, :n], err_msg=key)
          assert video["label_names"] == [CLASS_NAMES[k] for k in video["labels"]]


def test_bucket_lengths_mirror_the_evaluation_padding():
  buckets = module.bucket_lengths(MAX_SEQ_LEN, 8)
  assert buckets[:4] == [32, 48, 64, 96] and buckets[-1] < 2**31
  for n in list(range(0, 300)) + [10_000, 123_457]:
    want = pipeline.eval_padded_length(n, MAX_SEQ_LEN, 8)
    assert buckets[int(np.searchsorted(buckets, n))] == want


def test_versions_and_refusals(exported, tmp_path):
  model, config, base, _, _ = exported
  assert module.next_version(base) == 2
  assert module.next_version(str(tmp_path / "absent")) == 1
  with pytest.raises(module.ExportError, match="exists already"):
    module.export_saved_model(model, config, base, version=1)
  with pytest.raises(module.ExportError, match="positive integers"):
    module.export_saved_model(model, config, base, version=-1)
  with pytest.raises(module.ExportError, match="2 class names for a model of 3 classes"):
    module.export_saved_model(model, config, base, class_names=("a", "b"))
