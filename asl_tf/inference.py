"""Loading trained models, running them over datasets, and evaluating the detections.

Used by `python -m asl_tf.evaluate`, `python -m asl_tf.infer`, the training loop's periodic
evaluation and the export.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import tempfile
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf
from absl import logging

from asl_tf import config as config_lib
from asl_tf import evaluation
from asl_tf import files
from asl_tf import postprocess
from asl_tf.data import annotations as annotations_lib
from asl_tf.data import pipeline as pipeline_lib
from asl_tf.modeling import detector as detector_lib
from asl_tf.training import checkpoints as ckpt_lib
from asl_tf.training import optimizer as optimizer_lib

def build_detector(config: config_lib.Config) -> detector_lib.ASLDetector:
  """A built (weights created) detector for `config`, computing in `eval.inference_precision`."""
  model = detector_lib.ASLDetector(config.model, eval_config=config.eval,
                                   dtype=config.eval.inference_precision)
  model.build_for_training()
  return model


def checkpoint_config(checkpoint: str, config: Optional[config_lib.Config]) -> config_lib.Config:
  """The config to build a checkpoint's model with.

  The model section comes from the run's saved config.json (when present); other sections
  (data, eval) come from `config`, so evaluation settings can change, and so can the model's
  `RUNTIME_MODEL_FIELDS` (kernel_policy). Another model field in `config` that contradicts the
  checkpoint's is an error naming both values.
  """
  _, config_path = ckpt_lib.resolve_checkpoint(checkpoint)
  if config_path is None:
    if config is None:
      raise ckpt_lib.CheckpointError(
          f"{checkpoint} has no config.json beside it; pass the training flags (--flagfile)")
    return config
  saved = config_lib.Config.load(config_path)
  if config is None:
    return saved
  diffs = [f"model.{f.name}: {getattr(saved.model, f.name)!r} (checkpoint) vs "
           f"{getattr(config.model, f.name)!r} (flags)"
           for f in dataclasses.fields(saved.model)
           if f.name not in config_lib.RUNTIME_MODEL_FIELDS
           and getattr(saved.model, f.name) != getattr(config.model, f.name)]
  if diffs:
    raise ckpt_lib.CheckpointError(
        f"the flags do not match the checkpoint's configuration ({config_path}):\n  - "
        + "\n  - ".join(diffs) + "\nUse the training run's flagfile, or drop the conflicting "
        "flags (the checkpoint's config.json is used when no --flagfile is given).")
  model = dataclasses.replace(saved.model, **{name: getattr(config.model, name)
                                               for name in config_lib.RUNTIME_MODEL_FIELDS})
  return config_lib.Config(data=config.data, model=model, loss=saved.loss,
                           train=saved.train, eval=config.eval, export=config.export)


def load_model(checkpoint: str, config: Optional[config_lib.Config] = None,
               use_ema: bool = True) -> Tuple[detector_lib.ASLDetector, config_lib.Config]:
  """Builds the detector of a checkpoint and loads its (EMA) weights.

  Args:
    checkpoint: checkpoint prefix, checkpoint folder or training output_dir (best checkpoint,
      else the latest).
    config: flags-derived config; see `checkpoint_config`.
    use_ema: load the EMA of the weights when the checkpoint has one (what ActionFormer
      evaluates).

  Returns:
    (model, resolved config).
  """
  path, _ = ckpt_lib.resolve_checkpoint(checkpoint)
  config = checkpoint_config(checkpoint, config)
  problem = ckpt_lib.damage(path)
  if problem:
    raise ckpt_lib.CheckpointError(
        f"{path} is damaged ({problem}): its .index or .data file is truncated or corrupt; "
        "pass another checkpoint of the run (checkpoints/ckpt-N) or retrain")
  model = build_detector(config)
  names = [name for name, _ in tf.train.list_variables(path)]
  saved = ckpt_lib.saved_objects(names)
  if "model_weights" not in saved and "model_variables" not in saved:
    raise ckpt_lib.CheckpointError(
        f"{path} holds no `model_weights`: it was not written by asl_tf's RunCheckpointer "
        "(training or asl_tf.tools.import_torch); re-create it with one of those")
  objects = ckpt_lib.weight_objects(saved, model)
  optimizer = None
  if use_ema and "ema_weights" not in saved and "ema_variables" not in saved and (
      "task_variables" not in saved and "optimizer" in saved):
    # Written before the EMA was its own checkpoint object: it is in the optimizer's state.
    optimizer = optimizer_lib.build_optimizer(model, config.train, config.model,
                                              steps_per_epoch=1)
    optimizer.build(model.trainable_variables)
    objects["optimizer"] = optimizer
  status = tf.train.Checkpoint(**objects).restore(path)
  try:
    status.assert_existing_objects_matched()
  except AssertionError as e:
    raise ckpt_lib.CheckpointError(
        f"{path} does not fit the model built from its configuration: {e}") from e
  status.expect_partial()
  ema = False
  if use_ema and _ema_written(path, names, model):
    # The EMA read straight into the trainable variables it averages.
    tf.train.Checkpoint(**ckpt_lib.ema_objects(saved, model, model.trainable_variables)).restore(
        path).assert_existing_objects_matched().expect_partial()
    ema = True
  elif optimizer is not None:
    ema = optimizer_lib.copy_ema_into_model(model, optimizer)
  # Imported checkpoints (asl_tf.tools.import_torch) and runs without EMA hold raw weights.
  logging.info("loaded the %s weights of %s", "EMA" if ema else "raw", path)
  return model, config


def _ema_written(path: str, names: Sequence[str], model) -> bool:
  """Whether `path` (whose tensors are `names`) holds an EMA of this model's trainable variables
  (`ema_weights`, or the positional `ema_variables`): one per variable, after at least one
  optimizer step (before it, Keras' EMA slots are still zeros).

  Raises:
    CheckpointError: the checkpoint's EMA has another number of variables than the model.
  """
  saved = ckpt_lib.saved_objects(names)
  key = "ema_weights" if "ema_weights" in saved else "ema_variables"
  if key not in saved:
    return False
  count = sum(n.startswith(key + "/") and n.endswith("/.ATTRIBUTES/VARIABLE_VALUE")
              for n in names)
  if count != len(model.trainable_variables):
    raise ckpt_lib.CheckpointError(
        f"{path} holds {count} EMA variables but the model built from its configuration has "
        f"{len(model.trainable_variables)} trainable variables")
  steps = "optimizer/_iterations/.ATTRIBUTES/VARIABLE_VALUE"
  return steps not in names or int(tf.train.load_checkpoint(path).get_tensor(steps)) > 0


def class_names(config: config_lib.Config) -> List[str]:
  """Class names from the annotation file (class_<i> when it cannot be read)."""
  if config.data.num_classes == 1:
    return ["action"]
  try:
    _, report = annotations_lib.load_annotations(
        config.data.annotation_file, config.data.eval_subset,
        num_classes=config.data.num_classes, annotation_format=config.data.annotation_format,
        label_map_file=config.data.label_map_file)
    return list(report.class_names)
  except (annotations_lib.AnnotationError, OSError) as e:
    logging.warning("class names unavailable (%s); using class_<i>", e)
    return [f"class_{i}" for i in range(config.data.num_classes)]


def trained_class_names(checkpoint: str) -> Optional[List[str]]:
  """The class names the checkpoint's run trained on (its `class_names.json`,
  `checkpoints.read_class_names`), or None for runs written before the file existed."""
  return ckpt_lib.read_class_names(ckpt_lib.run_folder(checkpoint))


def check_class_names(names: Sequence[str], trained: Optional[Sequence[str]],
                      config: config_lib.Config) -> None:
  """Refuses annotations whose label ids name other classes than the run trained on: their
  detections would be scored or labelled against the wrong classes, silently.

  Raises:
    config_lib.ConfigError: naming the first classes that differ.
  """
  if trained is None or config.data.num_classes == 1 or config.eval.ext_score_file:
    return  # class-agnostic, or labelled by the external classifier's names
  # `class_<i>` is the loader's name for an id a file does not name (a split without a rare
  # class), on either side: nothing to contradict.
  differ = [f"id {i}: {a!r} here, {b!r} in training"
            for i, (a, b) in enumerate(zip(names, trained))
            if a != b and f"class_{i}" not in (a, b)]
  if len(names) != len(trained):
    differ.append(f"{len(names)} classes here, {len(trained)} in training")
  if not differ:
    return
  raise config_lib.ConfigError(
      f"{config.data.annotation_file} maps label ids to other classes than the run trained on "
      f"({'; '.join(differ[:3])}{'; ...' if len(differ) > 3 else ''}): pass the training's "
      "label map (--label_map_file=<run folder>/class_names.json), or an annotation file with "
      "the training's label ids")


def detect_function(model: detector_lib.ASLDetector):
  """`model.detect` as a tf.function over any batch size and length (one trace)."""
  input_dim = model.model_config.input_dim
  spec = [tf.TensorSpec([None, None, input_dim], tf.float32), tf.TensorSpec([None, None])]
  spec += [tf.TensorSpec([None], tf.float32)] * 4
  return tf.function(model.detect, input_signature=spec)


def predict(model: detector_lib.ASLDetector, dataset: tf.data.Dataset,
            detect_fn=None) -> Dict[str, Dict[str, np.ndarray]]:
  """Runs the detector over an evaluation dataset.

  Returns:
    video id -> {"segments_sec" [D, 2], "segments_grid" [D, 2], "scores" [D], "labels" [D]},
    each cut to that video's number of detections.
  """
  detect_fn = detect_fn or detect_function(model)
  results = {}
  for batch in dataset:
    out = detect_fn(batch["features"], batch["padding_mask"], batch["fps"], batch["duration"],
                    batch["feat_stride"], batch["num_frames"])
    out = {k: v.numpy() for k, v in out.items()}
    for i, vid in enumerate(batch["video_id"].numpy()):
      n = int(out["num_detections"][i])
      results[vid.decode()] = {k: out[k][i, :n] for k in ("segments_sec", "segments_grid",
                                                          "scores", "labels")}
  return results


def fused_ground_truth(config: config_lib.Config, class_names: Sequence[str]):
  """Evaluation ground truth labelled with an external classifier's classes (ANet fusion)."""
  with tempfile.TemporaryDirectory() as tmp:
    label_map = os.path.join(tmp, "label_map.json")
    with open(label_map, "w") as f:
      json.dump({name: i for i, name in enumerate(class_names)}, f)
    return annotations_lib.load_annotations(
        config.data.annotation_file, config.data.eval_subset, num_classes=len(class_names),
        annotation_format=config.data.annotation_format, label_map_file=label_map,
        default_fps=config.data.default_fps, fps_override=config.data.fps_override)


def evaluate_model(model: detector_lib.ASLDetector, config: config_lib.Config,
                   output_dir: Optional[str] = None,
                   trained_names: Optional[Sequence[str]] = None) -> dict:
  """Detects on the evaluation subset, scores the detections and writes `eval/` files.

  Writes `<output_dir>/eval/metrics.json` (`tiou_thresholds`, `mAP`, `average_mAP` as
  fractions, per-class AP, Recall@1x/5x, the videos and ground-truth segments scored),
  `detections.json` (ActivityNet results layout) and `per_class_ap.csv`. The ground truth is
  the file's segments as ActionFormer's evaluation reads them (`VideoRecord.eval_segments_sec`:
  not clipped to the video, unlike training's).

  `trained_names` (the run's class names, `trained_class_names`) are checked against the
  annotation file's (`check_class_names`) before anything runs.

  Returns:
    the metrics dict.
  """
  records, report = annotations_lib.load_video_records(config.data, config.data.eval_subset)
  check_class_names(report.class_names, trained_names, config)
  dataset = pipeline_lib.make_eval_dataset(records, config.data, config.model.max_div_factor,
                                           batch_size=config.eval.batch_size)
  per_video = predict(model, dataset)
  class_names = list(report.class_names)
  ground_truth = records
  if config.eval.ext_score_file:
    video_scores = postprocess.load_video_scores(config.eval.ext_score_file)
    if not video_scores.class_names:
      raise ValueError(f"{config.eval.ext_score_file}: score fusion needs the class names "
                       "(`class` list) to label detections")
    fusion = postprocess.fuse_video_scores(per_video, video_scores, topk=config.eval.fusion_topk,
                                           num_pred=config.eval.max_seg_num)
    if fusion.missing_videos:
      logging.warning("score fusion: %d of %d videos are missing from %s and get no "
                      "detections (e.g. %s)", len(fusion.missing_videos), len(per_video),
                      config.eval.ext_score_file, fusion.missing_videos[:3])
    per_video = fusion.detections
    class_names = list(video_scores.class_names)
    ground_truth, _ = fused_ground_truth(config, class_names)
  detections = evaluation.Detections.from_per_video(per_video)
  scored = [r.evaluation_ground_truth() for r in ground_truth]
  result = evaluation.evaluate_detections(scored, detections, config.eval.tiou_thresholds,
                                          video_ids=[r.video_id for r in ground_truth])
  metrics = result.to_dict(class_names)
  metrics["num_videos"] = len(records)
  metrics["num_ground_truth_segments"] = sum(len(g["labels"]) for g in scored)
  write_eval_outputs(output_dir or config.train.output_dir, metrics, detections, class_names,
                     [r.video_id for r in records])
  return metrics


def write_eval_outputs(output_dir: str, metrics: dict, detections: evaluation.Detections,
                       class_names: Sequence[str], video_ids: Iterable[str]) -> str:
  """Writes metrics.json, detections.json and per_class_ap.csv into `<output_dir>/eval`."""
  eval_dir = os.path.join(output_dir, "eval")
  os.makedirs(eval_dir, exist_ok=True)
  files.write_json_atomic(os.path.join(eval_dir, "metrics.json"), metrics, indent=2)
  evaluation.write_results_json(os.path.join(eval_dir, "detections.json"), detections,
                                class_names, list(video_ids))
  table = io.StringIO()
  writer = csv.writer(table)
  writer.writerow(["class"] + [f"AP@{t:.2f}" for t in metrics["tiou_thresholds"]]
                  + ["average"])
  for name, aps in metrics["per_class_ap"].items():
    writer.writerow([name] + [f"{a:.4f}" for a in aps] + [f"{np.mean(aps):.4f}"])
  files.write_text_atomic(os.path.join(eval_dir, "per_class_ap.csv"), table.getvalue())
  return eval_dir


def format_metrics_table(metrics: dict) -> str:
  """The mAP table printed at the end of training and evaluation (percent)."""
  thresholds = metrics["tiou_thresholds"]
  head = " | ".join(f"mAP@{t:.2f}" for t in thresholds) + " | average mAP"
  values = " | ".join(f"{100 * m:9.2f}" for m in metrics["mAP"])
  line = "-" * len(head)
  return f"{head}\n{line}\n{values} | {100 * metrics['average_mAP']:11.2f}"


def features_for_inference(features: np.ndarray, max_seq_len: int,
                           max_div_factor: int) -> Tuple[np.ndarray, np.ndarray]:
  """Pads one video's [T, C] features as evaluation does (whole video, never cut).

  Returns:
    (features [1, T_pad, C], padding_mask [1, T_pad] float32).
  """
  length = features.shape[0]
  padded = pipeline_lib.eval_padded_length(length, max_seq_len, max_div_factor)
  out = np.zeros([1, padded, features.shape[1]], np.float32)
  out[0, :length] = features
  mask = (np.arange(padded) < length).astype(np.float32)[None]
  return out, mask


def detections_to_rows(per_video: Dict[str, Dict[str, np.ndarray]]) -> List[dict]:
  """Flat rows (video_id, start_sec, end_sec, label_id, score) sorted by video then score."""
  rows = []
  for vid in sorted(per_video):
    det = per_video[vid]
    for (s, e), k, score in zip(det["segments_sec"], det["labels"], det["scores"]):
      rows.append({"video_id": vid, "start_sec": float(s), "end_sec": float(e),
                   "label_id": int(k), "score": float(score)})
  return rows
