"""Detect actions in new videos: `python -m asl_tf.infer --checkpoint=RUN --features_path=F`.

`--features_path` is one `[T, C]` feature file (.npy / .npz) or a folder of them (the file stem,
less `--file_prefix`, is the video id). Runs a training checkpoint (EMA weights) or, with
`--saved_model=DIR`, an exported SavedModel; both give the same detections (the features
resized as the training config says, seconds from each video's own feature count at `--fps`).
Videos are never cut: longer ones are padded to the model's divisibility factor. Writes the
ActivityNet results layout (`{"results": {video_id: [{"segment": [s, e], "label", "label_id",
"score"}]}}`). Durations are taken as (T * feat_stride + num_frames) / fps of the file's T
features, as ActionFormer does.
"""

import json
import math
import os
import sys
from typing import Dict, List, Sequence, Tuple

import numpy as np
from absl import app
from absl import flags

from asl_tf import config as config_lib
from asl_tf import evaluation
from asl_tf import flags as asl_flags
from asl_tf.data import timebase

flags.DEFINE_string("features_path", "", "a [T, C] feature file (.npy/.npz) or a folder of "
                    "them.")
flags.DEFINE_string("saved_model", "", "an exported SavedModel (version folder) to run instead "
                    "of --checkpoint.")
flags.DEFINE_string("results_file", "", "where to write the detections (ActivityNet results "
                    "JSON); default infer/detections.json in the checkpoint's run folder (or in "
                    "--output_dir when given).")
flags.DEFINE_boolean("overwrite", False, "replace an existing --results_file that is not an "
                     "ActivityNet results file.")
flags.DEFINE_float("fps", 0.0, "fps of the videos (0 = --fps_override, else "
                   "--default_fps; with --saved_model, the export's).")
HELP_GROUPS = {"what": ("checkpoint", "saved_model", "features_path", "results_file",
                        "overwrite", "fps", "output_dir"),
               "data": ("input_dim", "npz_key", "file_prefix", "feat_stride", "num_frames",
                        "default_fps", "fps_override", "resize_length"),
               "evaluation": ("pre_nms_thresh", "max_seg_num", "min_score", "nms_method",
                              "multiclass_nms", "nms_sigma", "kernel_policy",
                              "inference_precision")}

FEATURE_EXTS = (".npy", ".npz")


class InferError(ValueError):
  """Unusable inference input; the message names the file and what to do."""


def list_feature_files(path: str, file_prefix: str = "") -> List[Tuple[str, str]]:
  """(video_id, file) pairs of a feature file or a folder of them, sorted by video id."""
  if os.path.isfile(path):
    files = [path]
  elif os.path.isdir(path):
    files = sorted(os.path.join(path, f) for f in os.listdir(path)
                   if os.path.splitext(f)[1] in FEATURE_EXTS)
    if not files:
      raise InferError(f"{path} holds no {'/'.join(FEATURE_EXTS)} feature files")
  else:
    raise InferError(f"--features_path={path} does not exist")
  out, seen = [], {}
  for f in files:
    stem = os.path.splitext(os.path.basename(f))[0]
    if file_prefix and stem.startswith(file_prefix):
      stem = stem[len(file_prefix):]
    if stem in seen:
      raise InferError(f"video {stem!r} has two feature files, {seen[stem]} and {f}; keep one")
    seen[stem] = f
    out.append((stem, f))
  return out


def read_features(path: str, input_dim: int, npz_key: str) -> np.ndarray:
  """float32 [T, C] features of one file (`features.read_feature_file`: the checks training
  applies); errors name the file and the expected shape."""
  from asl_tf.data import features  # pylint: disable=g-import-not-at-top
  try:
    return features.read_feature_file(path, npz_key, input_dim)
  except features.FeatureError as e:
    raise InferError(str(e)) from None


def run_checkpoint(config: config_lib.Config, videos: Sequence[Tuple[str, str]],
                   fps: float) -> Tuple[Dict[str, Dict[str, np.ndarray]], List[str]]:
  """Detections of every video with a checkpoint's detector; returns (per_video, class_names).

  `config` is the flags' config (with `--flagfile`) or the run's config.json with the given
  flags applied (`flags.overlay_command_line`): its model is checked against the checkpoint's,
  its data section gives the timebase.
  """
  from asl_tf import inference  # pylint: disable=g-import-not-at-top
  model, config = inference.load_model(config.export.checkpoint, config)
  detect = inference.detect_function(model)
  data = config.data
  per_video = {}
  for video_id, path in videos:
    raw = read_features(path, data.input_dim, data.npz_key)
    feats, mask = inference.features_for_inference(resize_features(raw, data.resize_length),
                                                   data.max_seq_len,
                                                   model.model_config.max_div_factor)
    feat_stride, num_frames, duration = video_timebase(raw.shape[0], fps, data.feat_stride,
                                                       data.num_frames, data.resize_length)
    out = detect(feats, mask, *[np.array([v], np.float32)
                                for v in (fps, duration, feat_stride, num_frames)])
    n = int(out["num_detections"][0])
    per_video[video_id] = {k: out[k].numpy()[0, :n] for k in ("segments_sec", "scores",
                                                              "labels")}
  return per_video, (inference.trained_class_names(config.export.checkpoint)
                     or inference.class_names(config))


def _export_assets(saved_model: str) -> Tuple[dict, int, List[str]]:
  """(timebase.json, the trained config's resize_length, class names) of an asl_tf export."""
  from asl_tf.serving import module  # pylint: disable=g-import-not-at-top (loads TensorFlow)
  assets = os.path.join(saved_model, "assets")
  try:
    info = module.read_timebase(saved_model)
    with open(os.path.join(assets, module.CLASS_NAMES_FILE)) as f:
      class_names = [line.rstrip("\n") for line in f if line.strip()]
    resize_length = 0
    if os.path.exists(os.path.join(assets, module.MODEL_INFO_FILE)):
      with open(os.path.join(assets, module.MODEL_INFO_FILE)) as f:
        resize_length = int(json.load(f)["config"]["data"].get("resize_length", 0))
    missing = [k for k in ("fps", "feat_stride", "num_frames", "input_dim") if k not in info]
  except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
    versions = sorted((int(d) for d in os.listdir(saved_model) if d.isdigit()),
                      reverse=True) if os.path.isdir(saved_model) else []
    hint = (f"it is the model's base path: pass a version folder such as "
            f"{os.path.join(saved_model, str(versions[0]))}" if versions else
            "pass the version folder asl_tf.export wrote")
    raise InferError(f"--saved_model={saved_model}: not an asl_tf export ({assets} unreadable: "
                     f"{type(e).__name__}); {hint}") from None
  if missing:
    raise InferError(f"--saved_model={saved_model}: {assets}/timebase.json lacks "
                     f"{', '.join(missing)}; pass a version folder asl_tf.export wrote")
  return info, resize_length, class_names


def run_saved_model(saved_model: str, config: config_lib.Config,
                    videos: Sequence[Tuple[str, str]], fps: float = 0.0):
  """Detections of every video with an exported SavedModel's `serving_default`.

  The features are resized as the export's training config resized them (an export that
  resizes in its graph then leaves them as they are), and `segments_grid` is turned into
  seconds with each video's own timebase at `fps` (0 = the export's), as `run_checkpoint` does:
  the export's `segments_sec` use its baked fps (and exports made before the graph resized
  assume unresized videos).
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  info, resize_length, class_names = _export_assets(saved_model)
  fps = fps or float(info["fps"])
  loaded = tf.saved_model.load(saved_model)
  serve = loaded.signatures["serving_default"]
  max_frames = int(info.get("max_frames", 0))
  per_video = {}
  for video_id, path in videos:
    raw = read_features(path, int(info["input_dim"]), config.data.npz_key)
    x = resize_features(raw, resize_length)
    if max_frames and x.shape[0] > max_frames:
      raise InferError(f"{path}: {x.shape[0]} features, but {saved_model} serves at most "
                       f"{max_frames} (its export's --max_frames); re-export with a larger "
                       "--max_frames or run the checkpoint (--checkpoint)")
    try:
      out = serve(features=tf.constant(x[None]), lengths=tf.constant([x.shape[0]], tf.int32))
    except tf.errors.InvalidArgumentError as e:
      raise InferError(f"{path}: the SavedModel refused it: {e.message.splitlines()[0]}") from None
    n = int(out["num_detections"][0])
    feat_stride, num_frames, duration = video_timebase(
        raw.shape[0], fps, float(info["feat_stride"]), float(info["num_frames"]), resize_length)
    per_video[video_id] = {
        "segments_sec": timebase.grid_to_sec(out["segments_grid"].numpy()[0, :n], fps,
                                             feat_stride, num_frames, duration),
        "scores": out["scores"].numpy()[0, :n], "labels": out["labels"].numpy()[0, :n]}
  return per_video, class_names


def resize_features(x: np.ndarray, resize_length: int) -> np.ndarray:
  """ANet-style linear resize to `resize_length` features (0 = none)."""
  if resize_length > 0 and x.shape[0] != resize_length:
    from asl_tf.data import features  # pylint: disable=g-import-not-at-top
    return features.resize_linear(x, resize_length)
  return x


def video_timebase(num_features: int, fps: float, feat_stride: float, num_frames: float,
                   resize_length: int) -> Tuple[float, float, float]:
  """(feat_stride, num_frames, duration_sec) of the model's input for a video of `num_features`
  features in its file: the duration from the file, and after a resize the resized timebase
  (`timebase.resized_timebase`), both from the count before resizing."""
  duration = timebase.duration_sec(num_features, fps, feat_stride, num_frames)
  if resize_length > 0:
    feat_stride, num_frames = timebase.resized_timebase(num_features, feat_stride, num_frames,
                                                        resize_length)
  return feat_stride, num_frames, duration


def results_path(config: config_lib.Config, results_file: str, saved_model: str,
                 overwrite: bool) -> str:
  """Where infer writes, checked before any work: the folder exists (it is created) and an
  existing file is only replaced if it is a results file (ActivityNet layout) or `overwrite`.

  Default: `infer/detections.json` in `--output_dir` when given on the command line, else in the
  checkpoint's run folder.
  """
  if results_file:
    path = results_file
  elif "output_dir" in asl_flags.COMMAND_LINE_FLAGS:
    path = os.path.join(asl_flags.FLAGS.output_dir, "infer", "detections.json")
  elif saved_model:
    raise InferError("with --saved_model, pass --results_file (where to write the detections)")
  else:
    from asl_tf.training import checkpoints  # pylint: disable=g-import-not-at-top
    path = os.path.join(checkpoints.run_folder(config.export.checkpoint), "infer",
                        "detections.json")
  if os.path.isdir(path):
    raise InferError(f"--results_file={path} is a folder; name a .json file")
  if os.path.exists(path) and not overwrite and not evaluation.is_results_file(path):
    raise InferError(f"--results_file={path} exists and is not an ActivityNet results file; "
                     "choose another path or pass --overwrite to replace it")
  folder = os.path.dirname(os.path.abspath(path))
  try:
    os.makedirs(folder, exist_ok=True)
  except OSError as e:
    raise InferError(f"--results_file={path}: cannot create {folder} ({e.strerror})") from None
  if not os.access(folder, os.W_OK):
    raise InferError(f"--results_file={path}: {folder} is not writable")
  return path


def main(argv):
  del argv
  f = asl_flags.FLAGS
  from asl_tf.training import checkpoints  # pylint: disable=g-import-not-at-top
  try:
    config = asl_flags.build_config(check=asl_flags.FLAGFILE_GIVEN)
    if not f.saved_model and not config.export.checkpoint:
      raise InferError("pass --checkpoint (a checkpoint or training output_dir) or "
                       "--saved_model")
    baked = sorted(set(HELP_GROUPS["evaluation"]) & asl_flags.COMMAND_LINE_FLAGS)
    if f.saved_model and baked:
      raise InferError(
          f"{', '.join('--' + name for name in baked)} cannot change --saved_model: an export "
          "computes and post-processes as it was exported (its assets/model_info.json says "
          "how); re-export with the flag, or run the checkpoint (--checkpoint)")
    if not (math.isfinite(f.fps) and f.fps >= 0):
      raise InferError(f"--fps={f.fps}: the videos' frames per second, a positive number (0 = "
                       "the run's --fps_override, else --default_fps; with --saved_model the "
                       "export's)")
    out_path = results_path(config, f.results_file, f.saved_model, f.overwrite)
    videos = list_feature_files(f.features_path, config.data.file_prefix)
    if f.saved_model:
      per_video, class_names = run_saved_model(f.saved_model, config, videos, f.fps)
    else:
      config = asl_flags.checkpoint_tool_config(config.export.checkpoint, config)
      fps = f.fps or config.data.fps_override or config.data.default_fps
      per_video, class_names = run_checkpoint(config, videos, fps)
    evaluation.write_results_json(out_path, evaluation.Detections.from_per_video(per_video),
                                  class_names, [v for v, _ in videos])
  except (InferError, config_lib.ConfigError, checkpoints.CheckpointError, ValueError,
          OSError) as e:
    sys.exit(f"asl_tf.infer: {e}")
  for video_id, det in per_video.items():
    top = ", ".join(f"{class_names[int(k)]} {s:.1f}-{e:.1f}s ({p:.2f})"
                    for (s, e), k, p in list(zip(det["segments_sec"], det["labels"],
                                                 det["scores"]))[:3])
    print(f"{video_id}: {len(det['scores'])} detections; top: {top}")
  print(f"wrote {out_path}")


if __name__ == "__main__":
  app.run(main, flags_parser=asl_flags.cli_parser("asl_tf.infer", HELP_GROUPS))
