"""The SavedModel TF Serving loads: signatures, assets and warm-up records.

`export_saved_model(model, config, export_dir)` writes `<export_dir>/<version>/` (TF Serving's
layout) with three signatures, all taking `features` float32 [B, T, C] (C = input_dim, T any):

  serving_default  (features, lengths int32 [B]) -> segments_sec f32 [B, K, 2],
                   segments_grid f32 [B, K, 2], scores f32 [B, K], labels i32 [B, K],
                   num_detections i32 [B]      (K = eval max_seg_num; slots past
                   num_detections hold 0 and label -1)
  detect_full      (features) -> as serving_default, every frame valid
  raw_scores       (features, lengths) -> cls_scores f32 [B, N, classes] (sigmoid of the
                   logits), offsets f32 [B, N, 2], points f32 [N, 4], valid bool [B, N]

Inside the graph the features are cut to max(lengths) frames and zero-padded to the length
evaluation pads to (`pipeline.eval_padded_length`: max_seq_len, or the next sqrt(2) bucket,
a multiple of max_div_factor), so serving and `python -m asl_tf.evaluate` run the same shapes
and give the same detections. fps, feat_stride and num_frames of the training configuration
are constants of the graph; a video's duration is `(length * feat_stride + num_frames) / fps`.
A model trained on resized features (`--resize_length`, ActivityNet) resizes each video's
`lengths[b]` frames in the graph as training did (`resize_videos`), and times its detections by
the resized timebase of that length (`timebase.resized_timebase`): clients send the features
as extracted.
Inputs are checked in the graph (rank, channels, lengths) with messages naming the expected
shape. The graphs are traced with the `portable` kernel policy: nothing in them is only fast
with oneDNN, which a server may not run.

Assets: `assets/class_names.txt` (label id = line number), `assets/timebase.json` (fps,
feat_stride, num_frames, max_div_factor, max_seq_len, input_dim, num_classes) and
`assets/model_info.json` (signatures, timebase, class names, the full configuration); TF
Serving warm-up records in `assets.extra/tf_serving_warmup_requests`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import socket
import tempfile
from typing import Dict, List, Sequence

from absl import logging
import tensorflow as tf

from asl_tf import config as config_lib
from asl_tf.data import pipeline as pipeline_lib
from asl_tf.data import timebase as timebase_lib
from asl_tf.modeling import detector as detector_lib
from asl_tf.serving import warmup as warmup_lib

SIGNATURE_NAMES = ("serving_default", "detect_full", "raw_scores")
DETECTION_KEYS = ("segments_sec", "segments_grid", "scores", "labels", "num_detections")
RAW_SCORE_KEYS = ("cls_scores", "offsets", "points", "valid")
CLASS_NAMES_FILE = "class_names.txt"
TIMEBASE_FILE = "timebase.json"
MODEL_INFO_FILE = "model_info.json"
_INT32_MAX = 2**31 - 1


class ExportError(RuntimeError):
  """An export that cannot be written; the message says what to change."""


_STAGING_PREFIX = ".export-"


def _staging_prefix(version: int) -> str:
  """`.export-<version>-<pid>@<host>-`: whose staging folder it is."""
  host = re.sub(r"[^A-Za-z0-9]", "_", socket.gethostname())
  return f"{_STAGING_PREFIX}{version}-{os.getpid()}@{host}-"


def remove_leftover_exports(export_dir: str) -> list:
  """Removes staging folders of exports killed mid-write on this host (`.export-<version>-
  <pid>@<host>-*` whose process is gone); returns them. Folders of live exports, of other hosts
  (an export folder shared between machines or containers) and of other names are left alone."""
  removed = []
  if not os.path.isdir(export_dir):
    return removed
  mine = re.sub(r"[^A-Za-z0-9]", "_", socket.gethostname())
  for name in os.listdir(export_dir):
    match = re.fullmatch(re.escape(_STAGING_PREFIX) + r"\d+-(\d{1,9})@([A-Za-z0-9_]+)-.*", name)
    if not match or match.group(2) != mine:
      continue
    try:
      os.kill(int(match.group(1)), 0)
      continue  # that export is still running
    except ProcessLookupError:
      pass
    except OSError:
      continue  # alive (another user's) or not ours to judge
    shutil.rmtree(os.path.join(export_dir, name), ignore_errors=True)
    removed.append(name)
  if removed:
    logging.warning("removed %d leftover staging folder(s) of killed exports in %s: %s",
                    len(removed), export_dir, ", ".join(removed))
  return removed


def export_timebase(config: config_lib.Config) -> Dict[str, float]:
  """The constants the exported graph uses to turn grid units into seconds.

  Returns:
    `{fps, feat_stride, num_frames, max_div_factor, max_seq_len, input_dim, num_classes,
    max_frames, resize_length}`; fps is `data.fps_override` when set, else `data.default_fps`;
    max_frames is `export.max_frames`, else 16 x max_seq_len; resize_length 0 = no resizing
    (exports before it was recorded did not resize).
  """
  data, model = config.data, config.model
  return {
      "resize_length": int(data.resize_length),
      "max_frames": int(config.export.max_frames or 16 * model.max_seq_len),
      "fps": float(data.fps_override if data.fps_override > 0 else data.default_fps),
      "feat_stride": float(data.feat_stride),
      "num_frames": float(data.num_frames),
      "max_div_factor": int(model.max_div_factor),
      "max_seq_len": int(model.max_seq_len),
      "input_dim": int(model.input_dim),
      "num_classes": int(model.num_classes),
  }


def resize_videos(features: tf.Tensor, lengths: tf.Tensor, length_out: int) -> tf.Tensor:
  """Each video's first `lengths[b]` frames linearly resized to `length_out` frames, as
  `features.resize_linear` (`F.interpolate`, linear, align_corners=False) resizes one.

  Args:
    features: float32 [B, T, C].
    lengths: int32 [B], 0 <= lengths <= T (a video of length 0 comes out as zeros).
    length_out: L.

  Returns:
    float32 [B, L, C].
  """
  features = tf.pad(features, [[0, 0], [0, 1], [0, 0]])  # gathers stay in range when T = 0
  last = tf.maximum(lengths, 1)[:, None] - 1  # [B, 1]
  scale = tf.cast(last + 1, tf.float64) / length_out
  src = tf.maximum((tf.range(length_out, dtype=tf.float64)[None] + 0.5) * scale - 0.5, 0.0)
  lo = tf.minimum(tf.cast(tf.floor(src), tf.int32), last)  # [B, L]
  hi = tf.minimum(lo + 1, last)
  w = tf.cast(src - tf.cast(lo, tf.float64), tf.float32)[..., None]  # [B, L, 1]
  resized = (tf.gather(features, lo, batch_dims=1) * (1.0 - w)
             + tf.gather(features, hi, batch_dims=1) * w)
  return resized * tf.cast(lengths > 0, tf.float32)[:, None, None]


def bucket_lengths(max_seq_len: int, max_div_factor: int) -> List[int]:
  """Every padded length `pipeline.eval_padded_length` can return, up to INT32_MAX."""
  buckets = [pipeline_lib.eval_padded_length(0, max_seq_len, max_div_factor)]
  while buckets[-1] < _INT32_MAX // 2:
    buckets.append(pipeline_lib.eval_padded_length(buckets[-1] + 1, max_seq_len,
                                                   max_div_factor))
  return buckets


class ServingModule(tf.Module):
  """The exported object: the detector's variables and the three serving functions.

  The Keras model is not a tracked child (only the variables its functions capture are), so
  the SavedModel holds exactly what serving needs.

  Args:
    model: a built detector holding the weights to export (EMA weights, for a trained one).
    config: its configuration (data timebase, model geometry).
  """

  def __init__(self, model: detector_lib.ASLDetector, config: config_lib.Config):
    super().__init__(name="asl_serving")
    timebase = export_timebase(config)
    input_dim, max_frames = timebase["input_dim"], timebase["max_frames"]
    resize_length = timebase["resize_length"]
    features_spec = tf.TensorSpec([None, None, input_dim], tf.float32, name="features")
    lengths_spec = tf.TensorSpec([None], tf.int32, name="lengths")
    buckets = tf.constant(
        bucket_lengths(timebase["max_seq_len"], timebase["max_div_factor"]), tf.int32)
    expected = f"features must be [batch, time, {input_dim}] float32"

    def check_and_pad(features, lengths):
      """Checks the inputs; returns (features [B, T_pad, C], lengths [B], mask [B, T_pad]) of
      the model's input (resized when the model was trained so) and the sent lengths [B]."""
      shape = _runtime_shape(features)
      rank_ok = tf.debugging.assert_equal(
          tf.size(shape), 3, message=f"{expected} (got another rank)")
      with tf.control_dependencies([rank_ok]):
        shape = tf.identity(shape)
      checks = [
          tf.debugging.assert_equal(shape[2], input_dim,
                                    message=f"{expected} (got another channel count)"),
          tf.debugging.assert_equal(
              tf.size(_runtime_shape(lengths)), 1,
              message="lengths must be [batch] int32"),
      ]
      with tf.control_dependencies(checks):
        lengths = tf.reshape(lengths, [-1])
      checks += [
          tf.debugging.assert_positive(
              shape[0], message="features must hold at least one video (batch >= 1)"),
          tf.debugging.assert_less_equal(
              shape[1], max_frames,
              message=f"features are longer than this model serves ({max_frames} frames, "
              "the export's --max_frames); split the video"),
          tf.debugging.assert_equal(
              tf.size(lengths), shape[0],
              message=f"lengths must be [batch] int32 with one entry per video of features "
              f"[batch, time, {input_dim}] (batch sizes differ)"),
          tf.debugging.assert_non_negative(lengths,
                                           message="lengths must be [batch] int32 >= 0"),
          tf.debugging.assert_less_equal(
              lengths, shape[1],
              message=f"lengths must be <= time, the second dimension of features "
              f"[batch, time, {input_dim}]"),
      ]
      with tf.control_dependencies(checks):
        features = tf.debugging.assert_all_finite(
            features, "features hold NaN or Inf values; send finite features")
        lengths = tf.identity(lengths)
      sent_lengths = lengths
      if resize_length:
        features = resize_videos(features, lengths, resize_length)
        lengths = tf.where(lengths > 0, resize_length, 0)
      longest = tf.reduce_max(tf.concat([lengths, [0]], 0))
      padded = tf.gather(buckets, tf.searchsorted(buckets, [longest]))[0]  # eval's length
      features = tf.pad(features[:, :longest], [[0, 0], [0, padded - longest], [0, 0]])
      mask = tf.sequence_mask(lengths, padded)
      return features, lengths, mask, sent_lengths  # [B, T_pad, C], [B], [B, T_pad], [B]

    def detect(features, lengths):
      features, _, mask, sent_lengths = check_and_pad(features, lengths)
      batch = tf.shape(features)[0]

      def per_video(value):
        return tf.fill([batch], tf.constant(value, tf.float32))

      fps, feat_stride, num_frames = (timebase[k] for k in ("fps", "feat_stride", "num_frames"))
      sent = tf.cast(sent_lengths, tf.float32)
      duration = timebase_lib.duration_sec(sent, fps, feat_stride, num_frames)
      stride_v, frames_v = per_video(feat_stride), per_video(num_frames)
      if resize_length:  # each video's own resized timebase (timebase.resized_timebase)
        stride_v = frames_v = ((tf.maximum(sent, 1.0) - 1.0) * feat_stride
                               + num_frames) / resize_length
      out = model.detect(features, mask, per_video(fps), duration, stride_v, frames_v)
      return {k: out[k] for k in DETECTION_KEYS}

    def detect_full(features):
      shape = tf.concat([_runtime_shape(features), [0, 0]], 0)  # a wrong rank fails the check
      return self.serving_default(features, tf.fill(shape[:1], shape[1]))

    def raw_scores(features, lengths):
      features, _, mask, _ = check_and_pad(features, lengths)
      out = model(features, mask, training=False)
      return {"cls_scores": tf.sigmoid(out["cls_logits"]), "offsets": out["offsets"],
              "points": out["points"], "valid": out["padding_mask"]}

    # autograph off: the post-processing writes its loops with tf.while_loop; tracing is faster.
    self.serving_default = tf.function(detect, input_signature=[features_spec, lengths_spec],
                                       autograph=False)
    self.detect_full = tf.function(detect_full, input_signature=[features_spec],
                                   autograph=False)
    self.raw_scores = tf.function(raw_scores, input_signature=[features_spec, lengths_spec],
                                  autograph=False)
    self.served_variables = _captured_variables(self.concrete_functions().values())

  def concrete_functions(self) -> Dict[str, tf.types.experimental.ConcreteFunction]:
    """Signature name -> concrete function (traced on first use)."""
    return {name: getattr(self, name).get_concrete_function() for name in SIGNATURE_NAMES}


def _runtime_shape(x: tf.Tensor) -> tf.Tensor:
  """tf.shape(x) hidden from the static shape, which TF would use to fold rank checks away.

  A signature enforces dtypes, not shapes: TF Serving can feed a tensor of any shape.
  """
  return tf.shape(tf.compat.v1.placeholder_with_default(x, shape=None))


def _captured_variables(functions) -> List[tf.Variable]:
  seen, out = set(), []
  for fn in functions:
    for v in fn.variables:
      if id(v) not in seen:
        seen.add(id(v))
        out.append(v)
  return out


def next_version(export_dir: str) -> int:
  """1 + the highest integer sub-folder of `export_dir` (1 when there is none)."""
  if not os.path.isdir(export_dir):
    return 1
  versions = [int(d) for d in os.listdir(export_dir) if d.isdigit()]
  return max(versions, default=0) + 1


def read_timebase(saved_model_dir: str) -> Dict[str, float]:
  """The `assets/timebase.json` of an exported version (see `export_timebase`)."""
  with open(os.path.join(saved_model_dir, "assets", TIMEBASE_FILE)) as f:
    return json.load(f)


def signature_info(concrete_functions) -> Dict[str, dict]:
  """`{name: {"inputs"|"outputs": {key: {"dtype", "shape"}}}}` (-1 = any size)."""
  def spec(s):
    return {"dtype": s.dtype.name, "shape": [-1 if d is None else d for d in s.shape.as_list()]}
  info = {}
  for name, fn in concrete_functions.items():
    inputs = fn.structured_input_signature[0]
    info[name] = {"inputs": {s.name: spec(s) for s in inputs},
                  "outputs": {k: spec(v) for k, v in sorted(fn.structured_outputs.items())}}
  return info


def export_saved_model(model: detector_lib.ASLDetector, config: config_lib.Config,
                       export_dir: str, version: int = 0, class_names: Sequence[str] = (),
                       warmup: bool = True) -> str:
  """Exports a detector for TF Serving as `<export_dir>/<version>/`.

  The version folder appears atomically (written under a temporary name, then renamed), so a
  TF Serving instance polling `export_dir` never loads a half-written version.

  Args:
    model: a built detector; its current weights are exported (pass EMA weights, as
      `inference.load_model` loads them).
    config: the model's configuration (timebase from `data`, K from `eval.max_seg_num`).
    export_dir: TF Serving base path (the model's folder, e.g. `export/models/asl`).
    version: version folder; 0 = the next free integer.
    class_names: one name per class (default `class_<i>`).
    warmup: write TF Serving warm-up records (batch 1 at max_seq_len for
      serving_default and detect_full).

  Returns:
    The version folder.

  Raises:
    ExportError: the version exists already or is negative, or class_names do not fit.
  """
  timebase = export_timebase(config)
  num_classes = timebase["num_classes"]
  class_names = list(class_names) or [f"class_{i}" for i in range(num_classes)]
  if len(class_names) != num_classes:
    raise ExportError(f"{len(class_names)} class names for a model of {num_classes} classes")
  if any(not n.strip() or "\n" in n for n in class_names):
    raise ExportError("class names must be non-empty single lines (they go one per line into "
                      f"{CLASS_NAMES_FILE})")
  if version < 0:
    raise ExportError(f"version {version}: TF Serving versions are positive integers (0 = the "
                      "next free one)")
  if os.path.exists(export_dir) and not os.path.isdir(export_dir):
    raise ExportError(f"--export_dir={export_dir} is a file; name the model's folder (TF "
                      "Serving's base path, e.g. export/models/asl)")
  version = version or next_version(export_dir)
  path = os.path.join(export_dir, str(version))
  if os.path.exists(path):
    raise ExportError(f"{path} exists already; pass another --version, or 0 for the next free "
                      "one")
  os.makedirs(export_dir, exist_ok=True)
  model = model.with_kernel_policy("portable")  # the server may run without oneDNN
  config = dataclasses.replace(config, model=dataclasses.replace(config.model,
                                                                 kernel_policy="portable"))
  module = ServingModule(model, config)  # traces the signatures
  functions = module.concrete_functions()
  info = {
      "model_name": os.path.basename(os.path.normpath(export_dir)),
      "version": version,
      "signatures": signature_info(functions),
      "timebase": timebase,
      "max_detections": config.eval.max_seg_num,
      "class_names": class_names,
      "config": config.to_dict(),
  }
  remove_leftover_exports(export_dir)
  staging = tempfile.mkdtemp(prefix=_staging_prefix(version), dir=export_dir)
  try:
    asset_dir = os.path.join(staging, "asset_sources")
    os.makedirs(asset_dir)
    contents = {CLASS_NAMES_FILE: "\n".join(class_names) + "\n",
                TIMEBASE_FILE: json.dumps(timebase, indent=1) + "\n",
                MODEL_INFO_FILE: json.dumps(info, indent=1) + "\n"}
    for name, text in contents.items():
      with open(os.path.join(asset_dir, name), "w") as f:
        f.write(text)
    module.assets = [tf.saved_model.Asset(os.path.join(asset_dir, n)) for n in contents]
    saved = os.path.join(staging, "saved_model")
    tf.saved_model.save(module, saved, signatures=functions)
    if warmup:
      seq_len, input_dim = timebase["max_seq_len"], timebase["input_dim"]
      warmup_lib.write_warmup_requests(saved, info["model_name"], [
          ("serving_default", warmup_lib.constant_inputs(1, seq_len, input_dim)),
          ("detect_full", warmup_lib.constant_inputs(1, seq_len, input_dim, with_lengths=False)),
      ])
    os.rename(saved, path)
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  logging.info("exported %s (signatures %s)", path, ", ".join(SIGNATURE_NAMES))
  return path
