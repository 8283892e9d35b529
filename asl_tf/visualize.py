"""Pictures of what a model found: `python -m asl_tf.visualize --checkpoint=RUN [--flagfile=...]`.

For each chosen video of the evaluation subset, a timeline PNG with the ground truth, the top
detections per class and the per-class score curve; and one PNG of the learned class-level
sensitivity Gaussians. Needs matplotlib (`pip install matplotlib`; the README's command 1
installs it).
"""

import os
import sys

import numpy as np
from absl import app
from absl import flags

from asl_tf import config as config_lib
from asl_tf import flags as asl_flags

flags.DEFINE_list("video_ids", [], "videos to draw (default: the first --num_videos of "
                  "--eval_subset).")
flags.DEFINE_integer("num_videos", 3, "how many videos to draw without --video_ids (>= 1).",
                     lower_bound=1)
flags.DEFINE_string("plot_dir", "", "output folder (default <output_dir>/plots).")
HELP_GROUPS = {"what": ("checkpoint", "video_ids", "num_videos", "plot_dir"),
               "data": asl_flags.DATA_FLAGS,
               "evaluation": asl_flags.EVALUATION_FLAGS[:-1] + ("kernel_policy",
                                                                 "inference_precision")}


def max_over_levels(probs, points, length):
  """Per base-grid frame, the max score over the pyramid levels: [N, K] -> [length, K].

  A point of stride s at t = i * s covers the frames t .. t + s - 1 (long actions fire on the
  coarse levels, short ones on level 0: the max shows both).

  Args:
    probs: [N, K] scores of one video, levels concatenated; points: [N, 4] (t, lo, hi, stride).
    length: valid frames of the video on the base grid.
  """
  out = np.zeros((length, probs.shape[1]), probs.dtype)
  for stride in np.unique(points[:, 3]):
    level = points[:, 3] == stride
    level_probs = np.repeat(probs[level], int(stride), axis=0)[:length]  # [<= length, K]
    out[:len(level_probs)] = np.maximum(out[:len(level_probs)], level_probs)
  return out


def score_curve(model, features, mask, record):
  """(times_sec [T0], scores [T0, K]) for one padded video: per frame of the base grid, the
  max over the pyramid levels (`max_over_levels`)."""
  from asl_tf.data import timebase  # pylint: disable=g-import-not-at-top
  out = model(features, mask, training=False)
  length = record.features.length
  probs = 1.0 / (1.0 + np.exp(-out["cls_logits"].numpy()[0]))  # [N, K]
  valid = out["padding_mask"].numpy()[0]
  probs = max_over_levels(np.where(valid[:, None], probs, 0.0), out["points"].numpy(), length)
  t_grid = np.arange(length, dtype=np.float64)
  times = timebase.grid_to_sec(t_grid, record.fps, record.features.feat_stride,
                               record.features.num_frames, record.duration_sec)
  return times, probs


def main(argv):
  del argv
  f = asl_flags.FLAGS
  from asl_tf import inference  # pylint: disable=g-import-not-at-top
  from asl_tf import visualization  # pylint: disable=g-import-not-at-top
  from asl_tf.data import annotations  # pylint: disable=g-import-not-at-top
  from asl_tf.data import features as features_lib  # pylint: disable=g-import-not-at-top
  from asl_tf.training import checkpoints  # pylint: disable=g-import-not-at-top
  try:
    config = asl_flags.build_config(check=asl_flags.FLAGFILE_GIVEN)
    checkpoint = config.export.checkpoint or config.train.output_dir
    config = asl_flags.checkpoint_tool_config(checkpoint, config)
    model, config = inference.load_model(checkpoint, config)
    records, report = annotations.load_video_records(config.data, config.data.eval_subset)
    inference.check_class_names(report.class_names, inference.trained_class_names(checkpoint),
                                config)
    by_id = {r.video_id: r for r in records}
    wanted = list(f.video_ids) or [r.video_id for r in records[:f.num_videos]]
    unknown = [v for v in wanted if v not in by_id]
    if unknown:
      raise ValueError(f"videos {unknown} are not in subset {config.data.eval_subset!r} of "
                       f"{config.data.annotation_file} (e.g. {list(by_id)[:3]})")
    plot_dir = f.plot_dir or os.path.join(config.train.output_dir, "plots")
    if os.path.exists(plot_dir) and not os.path.isdir(plot_dir):
      raise ValueError(f"--plot_dir={plot_dir} is a file; name a folder for the pictures")
    os.makedirs(plot_dir, exist_ok=True)
    detect = inference.detect_function(model)
    class_names = list(report.class_names)
    for video_id in wanted:
      rec = by_id[video_id]
      x = features_lib.load_features(video_id, rec.features, config.data)
      feats, mask = inference.features_for_inference(x, config.data.max_seq_len,
                                                     model.model_config.max_div_factor)
      meta = [np.array([v], np.float32) for v in (rec.fps, rec.duration_sec,
                                                  rec.features.feat_stride,
                                                  rec.features.num_frames)]
      det = detect(feats, mask, *meta)
      n = int(det["num_detections"][0])
      path = visualization.plot_video_timeline(
          video_id, rec.duration_sec, rec.segments_sec, rec.labels,
          det["segments_sec"].numpy()[0, :n], det["scores"].numpy()[0, :n],
          det["labels"].numpy()[0, :n], class_names,
          os.path.join(plot_dir, f"{video_id}.png"),
          score_curve=score_curve(model, feats, mask, rec))
      print(f"wrote {path}")
    params = model.sensitivity_parameters()
    if params:
      path = visualization.plot_sensitivity_curves(
          params, class_names, os.path.join(plot_dir, "sensitivity_curves.png"))
      print(f"wrote {path}")
  except (config_lib.ConfigError, checkpoints.CheckpointError, annotations.AnnotationError,
          features_lib.FeatureError, ValueError, ImportError) as e:
    sys.exit(f"asl_tf.visualize: {e}")


if __name__ == "__main__":
  app.run(main, flags_parser=asl_flags.cli_parser("asl_tf.visualize", HELP_GROUPS))
