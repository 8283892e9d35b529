"""Annotation files -> `VideoRecord`s (seconds, label ids, fps, duration, subset).

Supported layouts (`DataConfig.annotation_format`, `auto` detects them):

* `actionformer`: `{"database": {vid: {subset, duration, fps, annotations: [{label, label_id,
  segment}]}}}` (THUMOS14, ActivityNet as shipped with ActionFormer).
* `flat`: the same video dicts without the `database` wrapper (Ego4D-MQ, MultiTHUMOS, Charades).
* `activitynet`: the official ActivityNet JSON (`taxonomy` + `database`, labels by name only).

Label ids come from, in this order: `label_map_file` (JSON `{name: id}` or one name per line);
the ActivityNet taxonomy (index among sorted leaf names); the file's `label_id` fields when any
segment has one (a row without one must name a label another row gives an id, else the file is
refused as ambiguous); otherwise the index among the sorted label names. `num_classes == 1` is
class-agnostic: every label becomes id 0 (ActionFormer ANet proposals). Densely labelled data
(overlapping segments of different classes) is kept as is.

Dirty rows are fixed or dropped by the rules in `DIRTY_ROW_RULES`; each kind is counted and one
summary warning per dataset names the counts and a few examples. Structurally broken input
(unknown labels, ids >= num_classes, non-numeric segments, missing durations) raises
`AnnotationError` naming the file, the video and the field.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import reprlib
import os
from typing import Dict, List, Optional, Sequence, Tuple

from absl import logging
import numpy as np

from asl_tf import config as config_lib
from asl_tf.data import features as features_lib

# Segments shorter than this (seconds) are dropped and two segments of one label whose start and
# end both differ by at most this are duplicates (ActionFormer `remove_duplicate_annotations`).
SEGMENT_TOL_SEC = 1e-3

DIRTY_ROW_RULES = collections.OrderedDict([
    ("end_before_start", "segment end < start: dropped"),
    ("start_before_zero", "segment start < 0 s: start clipped to 0 for training"),
    ("end_past_duration", "segment end > video duration: end clipped to the duration for "
                          "training"),
    ("outside_video", "segment starts at or after the video's end (nothing left after "
                      "clipping): dropped from training, still scored by evaluation (as the "
                      "ActivityNet evaluation does; no detection can match it)"),
    ("zero_length", f"segment shorter than {SEGMENT_TOL_SEC} s: dropped"),
    ("duplicate", f"same label, start and end within {SEGMENT_TOL_SEC} s of an earlier segment: "
                  "dropped"),
    ("label_id_overridden", "the segment's label_id disagrees with the label map: the map's id "
                            "(looked up by name) is used"),
    ("missing_fps", "video without fps: --default_fps is used"),
    ("video_without_segments", "video with no segment left: kept for evaluation / inference, "
                               "excluded from training"),
])

_MAX_EXAMPLES = 3


class AnnotationError(ValueError):
  """An annotation file that cannot be read; the message names file, video and field."""


@dataclasses.dataclass(frozen=True, eq=False)
class VideoRecord:
  """One video: ground truth in seconds and its place on the feature grid.

  Attributes:
    video_id: key of the video in the annotation file (also the feature file stem).
    subset: subset name as written in the file.
    duration_sec: video duration in seconds.
    fps: frames per second used for the seconds <-> grid conversion.
    segments_sec: float64 [M, 2] (start, end) in seconds, cleaned (see DIRTY_ROW_RULES).
    labels: int32 [M] label ids in [0, num_classes).
    label_names: the M label names as written in the file.
    features: feature files and per-video timebase; None until `features.scan_features` ran.
    eval_segments_sec: float64 [E, 2], the ground truth evaluation scores against, as
      ActionFormer's evaluation reads the file (the ActivityNet evaluation code, less rows
      shorter than SEGMENT_TOL_SEC and duplicates): nothing is clipped to the video (a segment
      past its end stays, and no detection can match it). None: segments_sec.
    eval_labels: int32 [E], their label ids (None: labels).
  """
  video_id: str
  subset: str
  duration_sec: float
  fps: float
  segments_sec: np.ndarray
  labels: np.ndarray
  label_names: Tuple[str, ...]
  features: Optional[features_lib.FeatureInfo] = None
  eval_segments_sec: Optional[np.ndarray] = None
  eval_labels: Optional[np.ndarray] = None

  def evaluation_ground_truth(self) -> Dict[str, object]:
    """{"video_id", "segments_sec", "labels"} as evaluation scores them (see above)."""
    if self.eval_segments_sec is None:
      return {"video_id": self.video_id, "segments_sec": self.segments_sec,
              "labels": self.labels}
    return {"video_id": self.video_id, "segments_sec": self.eval_segments_sec,
            "labels": self.eval_labels}

  @property
  def num_segments(self) -> int:
    return int(self.labels.shape[0])


@dataclasses.dataclass
class DataReport:
  """What loading a dataset found.

  Attributes:
    source: the annotation file.
    subsets: the selected subset names (lower case).
    class_names: names indexed by label id (length num_classes).
    num_videos: videos returned.
    num_segments: segments returned (after cleaning).
    counts: dirty-row kind -> count; every kind of DIRTY_ROW_RULES (and of
      features.FEATURE_RULES once features were scanned) is present, zeros included.
    examples: kind -> up to three `video_id: detail` strings.
    unnamed_class_ids: label ids below num_classes that neither the file nor the label map
      names (no video can have them: their outputs learn only background).
  """
  source: str
  subsets: Tuple[str, ...]
  class_names: Tuple[str, ...]
  unnamed_class_ids: Tuple[int, ...] = ()
  num_videos: int = 0
  num_segments: int = 0
  counts: Dict[str, int] = dataclasses.field(default_factory=dict)
  examples: Dict[str, List[str]] = dataclasses.field(default_factory=dict)

  def add(self, kind: str, video_id: str, detail: str = "", n: int = 1) -> None:
    """Counts `n` occurrences of `kind` in `video_id`."""
    self.counts[kind] = self.counts.get(kind, 0) + n
    examples = self.examples.setdefault(kind, [])
    if len(examples) < _MAX_EXAMPLES:
      examples.append(f"{video_id}: {detail}" if detail else video_id)

  def summary(self) -> str:
    """One human-readable paragraph: totals, then every non-zero kind with its rule."""
    lines = [f"{self.source} [{','.join(self.subsets)}]: {self.num_videos} videos, "
             f"{self.num_segments} segments, {len(self.class_names)} classes"]
    rules = dict(DIRTY_ROW_RULES, **features_lib.FEATURE_RULES)
    for kind, count in self.counts.items():
      if count:
        lines.append(f"  {kind}: {count} ({rules.get(kind, '')}); e.g. "
                     f"{'; '.join(self.examples.get(kind, []))}")
    return "\n".join(lines)

  @property
  def num_issues(self) -> int:
    return sum(self.counts.values())


def load_video_records(data_config: config_lib.DataConfig,
                       subset: str) -> Tuple[List[VideoRecord], DataReport]:
  """Loads one subset, scans its feature headers (if feature_dir is set) and logs one summary.

  Args:
    data_config: annotation file, format, label map, classes, fps and feature settings.
    subset: subset name(s), comma-separated, case-insensitive (e.g. `data_config.train_subset`).

  Returns:
    (records, report): records have `features` set when `data_config.feature_dir` is non-empty
    (videos with bad feature files are skipped and counted when `on_bad_feature='skip'`).

  Raises:
    AnnotationError: unreadable annotations (message names file, video and field).
    features.FeatureError: a missing or malformed feature file with `on_bad_feature='error'`.
  """
  records, report = load_annotations(
      data_config.annotation_file, subset,
      num_classes=data_config.num_classes,
      annotation_format=data_config.annotation_format,
      label_map_file=data_config.label_map_file,
      default_fps=data_config.default_fps,
      fps_override=data_config.fps_override)
  if data_config.feature_dir:
    infos, feature_counts = features_lib.scan_features(
        [r.video_id for r in records], data_config)
    for kind in features_lib.FEATURE_RULES:
      report.counts.setdefault(kind, 0)
    for kind, items in feature_counts.items():
      for video_id, detail in items:
        report.add(kind, video_id, detail)
    records = [dataclasses.replace(r, features=infos[r.video_id])
               for r in records if r.video_id in infos]
    report.num_videos = len(records)
    report.num_segments = sum(r.num_segments for r in records)
  log_report(report)
  return records, report


def log_report(report: DataReport) -> None:
  """Logs the report: one warning if any row was fixed, dropped or skipped, else one info line;
  one more warning if --num_classes leaves label ids that no class name has."""
  if report.unnamed_class_ids:
    ids, num_classes = report.unnamed_class_ids, len(report.class_names)
    named = num_classes - len(ids)
    fix = (f"lower --num_classes to {named}" if ids == tuple(range(named, num_classes))
           else "name every id with --label_map_file")
    plural = "s" * (len(ids) > 1)
    logging.warning("%s: --num_classes=%d but %d label ids have a class name: no label has "
                    "id%s %s, whose output%s learn%s only background; %s", report.source,
                    num_classes, named, plural, _id_ranges(ids), plural, "s" * (len(ids) == 1),
                    fix)
  if report.num_issues:
    logging.warning("annotation / feature issues (fixed or skipped, see rules):\n%s",
                    report.summary())
  else:
    logging.info("%s", report.summary())


def _id_ranges(ids: Sequence[int]) -> str:
  """Sorted ids as ranges: (3, 4, 5, 9) -> '3-5, 9'."""
  runs = []
  for i in ids:
    if runs and i == runs[-1][1] + 1:
      runs[-1][1] = i
    else:
      runs.append([i, i])
  return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def load_annotations(path: str,
                     subset: str,
                     *,
                     num_classes: int,
                     annotation_format: str = "auto",
                     label_map_file: str = "",
                     default_fps: float = 30.0,
                     fps_override: float = 0.0) -> Tuple[List[VideoRecord], DataReport]:
  """Reads an annotation file and returns the cleaned videos of `subset` (no logging).

  Args:
    path: annotation JSON.
    subset: subset name(s), comma-separated, case-insensitive.
    num_classes: K; 1 = class-agnostic (every label -> 0).
    annotation_format: one of config.ANNOTATION_FORMATS.
    label_map_file: optional file pinning label ids ('' = none).
    default_fps: fps of videos whose entry has none.
    fps_override: if > 0, used for every video instead of the file's fps.

  Returns:
    (records, report), records in file order.

  Raises:
    AnnotationError: see module docstring.
  """
  database, fmt, taxonomy = _read_database(path, annotation_format)
  # Class-agnostic (num_classes 1): every label is 0, so the file's ids do not matter.
  name_to_id = (_label_map(path, database, fmt, taxonomy, label_map_file) if num_classes != 1
                else {})
  _check_label_ids(path, database, name_to_id, num_classes)
  if num_classes == 1:
    class_names, unnamed = ("action",), ()
  else:
    id_to_name = {i: n for n, i in name_to_id.items()}
    class_names = tuple(id_to_name.get(i, f"class_{i}") for i in range(num_classes))
    unnamed = tuple(i for i in range(num_classes) if i not in id_to_name)

  wanted = tuple(s.strip().lower() for s in subset.split(",") if s.strip())
  available = collections.Counter(str(v.get("subset", "")).lower() for v in database.values())
  missing = [s for s in wanted if s not in available]
  if not wanted or missing:
    raise AnnotationError(
        f"{path}: subset {subset!r} not found; the file has subsets "
        f"{dict(sorted(available.items()))} (names are case-insensitive)")

  report = DataReport(source=path, subsets=wanted, class_names=class_names,
                      unnamed_class_ids=unnamed,
                      counts={kind: 0 for kind in DIRTY_ROW_RULES})
  records = []
  for video_id, entry in database.items():
    if str(entry.get("subset", "")).lower() not in wanted:
      continue
    records.append(_parse_video(path, str(video_id), entry, name_to_id, num_classes, default_fps,
                                fps_override, report))
  report.num_videos = len(records)
  report.num_segments = sum(r.num_segments for r in records)
  return records, report


def _read_database(path: str, annotation_format: str) -> Tuple[dict, str, Optional[list]]:
  """Returns ({video_id: entry}, format, taxonomy or None)."""
  if annotation_format not in config_lib.ANNOTATION_FORMATS:
    raise AnnotationError(f"annotation_format={annotation_format!r}; use one of "
                          f"{config_lib.ANNOTATION_FORMATS}")
  if not os.path.isfile(path):
    raise AnnotationError(f"annotation file {path!r} does not exist (--annotation_file)")
  try:
    with open(path) as f:
      data = json.load(f)
  except (ValueError, UnicodeDecodeError, RecursionError) as e:
    # ValueError covers JSONDecodeError and integers longer than Python parses (4300 digits).
    raise AnnotationError(f"{path}: not valid JSON ({str(e)[:200]})") from None
  if not isinstance(data, dict):
    raise AnnotationError(f"{path}: expected a JSON object at the top level, got "
                          f"{type(data).__name__}")
  wrapped = isinstance(data.get("database"), dict)
  taxonomy = data.get("taxonomy") if wrapped else None
  database = data["database"] if wrapped else data
  for video_id, entry in database.items():
    if not isinstance(entry, dict):
      raise AnnotationError(
          f"{path}: video {video_id!r} is a {type(entry).__name__}, expected an object with "
          "subset, duration and annotations" +
          ("" if wrapped else " (or wrap the videos in a 'database' key)"))

  fmt = annotation_format
  if fmt == "auto":
    if not wrapped:
      fmt = "flat"
    elif taxonomy is not None or not _any_label_ids(database):
      fmt = "activitynet"
    else:
      fmt = "actionformer"
  elif fmt in ("actionformer", "activitynet") and not wrapped:
    raise AnnotationError(f"{path}: annotation_format={fmt} expects a top-level 'database' key; "
                          "use --annotation_format=flat or auto for a flat dict")
  elif fmt == "flat" and wrapped:
    raise AnnotationError(f"{path}: annotation_format=flat but the file has a 'database' "
                          "wrapper; use --annotation_format=actionformer or auto")
  return database, fmt, taxonomy


def _annotations_of(entry: dict) -> list:
  anns = entry.get("annotations")
  return anns if isinstance(anns, list) else []


def _any_label_ids(database: dict) -> bool:
  return any(isinstance(a, dict) and "label_id" in a
             for e in database.values() for a in _annotations_of(e))


def _label_map(path: str, database: dict, fmt: str, taxonomy: Optional[list],
               label_map_file: str) -> Dict[str, int]:
  """name -> id, from the label map file, the taxonomy, the label_id fields or sorted names."""
  if label_map_file:
    return read_label_map(label_map_file)
  if fmt == "activitynet" and taxonomy:
    nodes = taxonomy if isinstance(taxonomy, list) else [taxonomy]
    for i, node in enumerate(nodes):
      if (not isinstance(node, dict) or not isinstance(node.get("nodeName"), str)
          or not isinstance(node.get("parentName"), (str, type(None)))):
        raise AnnotationError(
            f"{path}: taxonomy node {i} ({reprlib.repr(node)}) needs 'nodeName' text and a "
            "'parentName' that is text or null; the taxonomy is a list of {\"nodeName\": ..., "
            "\"parentName\": ...} objects (fix it, or pin ids with --label_map_file)")
    parents = {n.get("parentName") for n in nodes}
    leaves = sorted({n["nodeName"] for n in nodes if n["nodeName"] not in parents})
    return {name: i for i, name in enumerate(leaves)}
  if fmt != "activitynet" and _any_label_ids(database):
    # The file's ids, wherever a row gives one; a row without one must name a label that
    # another row gives an id (anything else would need a guess).
    name_to_id, id_to_name = {}, {}
    seen_in = {}  # ("name", name) / ("id", id) -> the first video that gave that pair
    unnamed = {}  # ids of rows without a label -> the first such video
    for video_id, entry in database.items():
      for a in _annotations_of(entry):
        if not isinstance(a, dict) or "label_id" not in a:
          continue
        label_id = a["label_id"]
        if not isinstance(label_id, int) or isinstance(label_id, bool) or label_id < 0:
          raise AnnotationError(f"{path}: video {video_id!r}: label_id {label_id!r} of label "
                                f"{a.get('label')!r} is not a non-negative integer")
        if "label" not in a:  # named by the rows that give this id a label, else by the id
          unnamed.setdefault(label_id, video_id)
          continue
        name = str(a["label"])
        seen_in.setdefault(("name", name), video_id)
        seen_in.setdefault(("id", label_id), video_id)
        if name_to_id.setdefault(name, label_id) != label_id:
          raise AnnotationError(
              f"{path}: video {video_id!r}: label {name!r} has label_id {label_id} here but "
              f"{name_to_id[name]} in video {seen_in['name', name]!r}; fix the file or pin ids "
              "with --label_map_file")
        if id_to_name.setdefault(label_id, name) != name:
          raise AnnotationError(
              f"{path}: video {video_id!r}: label_id {label_id} names {name!r} here but "
              f"{id_to_name[label_id]!r} in video {seen_in['id', label_id]!r}; fix the file or "
              "pin ids with --label_map_file")
    for label_id, video_id in unnamed.items():
      if label_id not in id_to_name:
        if name_to_id.setdefault(str(label_id), label_id) != label_id:
          raise AnnotationError(
              f"{path}: video {video_id!r}: a row with label_id {label_id} and no label takes "
              f"the name {str(label_id)!r}, which video {seen_in['name', str(label_id)]!r} "
              "gives another id; add the row's label or pin ids with --label_map_file")
        id_to_name[label_id] = str(label_id)
    for video_id, entry in database.items():
      for a in _annotations_of(entry):
        if isinstance(a, dict) and "label_id" not in a and str(a.get("label")) not in name_to_id:
          raise AnnotationError(
              f"{path}: video {video_id!r}: label {a.get('label')!r} has no label_id, and no "
              "other row gives it one (the file's other rows carry label_id); add its "
              "label_id or pin ids with --label_map_file")
    return name_to_id
  names = sorted({str(a["label"]) for e in database.values() for a in _annotations_of(e)
                  if isinstance(a, dict) and "label" in a})
  return {name: i for i, name in enumerate(names)}


def read_label_map(path: str) -> Dict[str, int]:
  """Reads a label map: JSON `{name: id}` (or a JSON list of names, or a run folder's
  `class_names.json`), or one name per line.

  Args:
    path: the label map file.

  Returns:
    name -> id.

  Raises:
    AnnotationError: missing file, duplicate names or ids, non-integer ids.
  """
  if not os.path.isfile(path):
    raise AnnotationError(f"label map file {path!r} does not exist (--label_map_file)")
  try:
    with open(path, encoding="utf-8") as f:
      text = f.read()
  except UnicodeDecodeError as e:
    raise AnnotationError(f"label map {path}: not UTF-8 text ({e.reason} at byte {e.start}); "
                          "write it as JSON or one name per line") from None
  try:
    data = json.loads(text)
  except json.JSONDecodeError:
    data = [line.strip() for line in text.splitlines() if line.strip()]
  if isinstance(data, dict) and list(data) == ["class_names"]:  # a run's class_names.json
    data = data["class_names"]
  if isinstance(data, list):
    bad = [n for n in data if not isinstance(n, str)]
    if bad:
      raise AnnotationError(f"label map {path}: a list of names holds {reprlib.repr(bad[0])}; "
                            "every name must be text")
    if len(set(data)) != len(data):
      dup = [n for n, c in collections.Counter(data).items() if c > 1]
      raise AnnotationError(f"label map {path}: names listed twice: {dup}")
    return {str(name): i for i, name in enumerate(data)}
  if not isinstance(data, dict):
    raise AnnotationError(f"label map {path}: expected {{name: id}}, a JSON list or one name "
                          "per line")
  bad = {n: i for n, i in data.items()
         if not isinstance(i, int) or isinstance(i, bool) or i < 0}
  if bad:
    raise AnnotationError(f"label map {path}: ids must be non-negative integers, got {bad}")
  dup = [i for i, c in collections.Counter(data.values()).items() if c > 1]
  if dup:
    raise AnnotationError(f"label map {path}: ids used by several names: {dup}")
  return {str(n): int(i) for n, i in data.items()}


def _check_label_ids(path: str, database: dict, name_to_id: Dict[str, int],
                     num_classes: int) -> None:
  if num_classes < 1:
    raise AnnotationError(f"num_classes={num_classes}; it must be >= 1")
  if num_classes == 1:
    return
  too_big = {n: i for n, i in name_to_id.items() if i >= num_classes}
  if not too_big:
    return
  example = next((vid for vid, e in database.items() for a in _annotations_of(e)
                  if isinstance(a, dict) and str(a.get("label")) in too_big), None)
  raise AnnotationError(
      f"{path}: label ids {too_big} are >= num_classes={num_classes}" +
      (f" (e.g. in video {example!r})" if example else "") +
      "; raise --num_classes or pin ids with --label_map_file")


def _finite_number(x) -> bool:
  if not isinstance(x, (int, float)) or isinstance(x, bool):
    return False
  try:
    return math.isfinite(float(x))
  except OverflowError:  # a JSON integer beyond float range
    return False


def _parse_video(path: str, video_id: str, entry: dict, name_to_id: Dict[str, int],
                 num_classes: int, default_fps: float, fps_override: float,
                 report: DataReport) -> VideoRecord:
  """Validates and cleans one video entry (rules in DIRTY_ROW_RULES)."""
  where = f"{path}: video {video_id!r}"
  if (not video_id or video_id in (".", "..") or os.path.isabs(video_id)
      or any(c in video_id for c in ("/", "\\", "\0"))):
    raise AnnotationError(f"{where}: a video id names its feature file "
                          "(<feature_dir>/<file_prefix><id><file_suffix><ext>) and must not be "
                          "empty, absolute or hold '/', '\\', NUL or be '..'; rename the video")
  duration = entry.get("duration")
  if not _finite_number(duration) or duration <= 0:
    raise AnnotationError(f"{where}: field 'duration' is {reprlib.repr(duration)}; it must be "
                          "a positive number of seconds")
  duration = float(duration)
  if fps_override > 0:
    fps = float(fps_override)
  elif _finite_number(entry.get("fps")) and entry["fps"] > 0:
    fps = float(entry["fps"])
  else:
    fps = float(default_fps)
    report.add("missing_fps", video_id, f"fps={entry.get('fps')!r} -> {fps}")
  anns = entry.get("annotations", [])
  if anns is None:
    anns = []
  if not isinstance(anns, list):
    raise AnnotationError(f"{where}: field 'annotations' must be a list, got "
                          f"{type(anns).__name__}")

  kept: List[Tuple[float, float, str]] = []
  scored: List[Tuple[float, float, str]] = []  # the evaluation's rows: see VideoRecord
  for k, ann in enumerate(anns):
    seg = ann.get("segment") if isinstance(ann, dict) else None
    if (not isinstance(seg, (list, tuple)) or len(seg) != 2 or
        not all(_finite_number(x) for x in seg)):
      raise AnnotationError(f"{where}: annotations[{k}] field 'segment' is {reprlib.repr(seg)}; "
                            "expected [start_sec, end_sec] with two finite numbers")
    if "label" in ann:
      name = str(ann["label"])
    elif "label_id" in ann and num_classes == 1:
      name = str(ann["label_id"])
    elif "label_id" in ann and ann["label_id"] in name_to_id.values():
      name = next(n for n, i in name_to_id.items() if i == ann["label_id"])
    else:
      raise AnnotationError(f"{where}: annotations[{k}] has neither 'label' nor a known "
                            f"'label_id' ({ann!r})")
    if num_classes > 1 and name not in name_to_id:
      raise AnnotationError(
          f"{where}: annotations[{k}] field 'label' = {name!r} is not a known label "
          f"({len(name_to_id)} in the label map); add it to --label_map_file or fix the row")
    if (num_classes > 1 and "label_id" in ann and "label" in ann and
        ann["label_id"] != name_to_id[name]):
      report.add("label_id_overridden", video_id,
                 f"{name!r} label_id {ann['label_id']} -> {name_to_id[name]}")
    start, end = float(seg[0]), float(seg[1])
    if end - start >= SEGMENT_TOL_SEC and not _repeats(scored, start, end, name):
      scored.append((start, end, name))
    if end < start:
      report.add("end_before_start", video_id, f"[{start}, {end}]")
      continue
    if start < 0:
      report.add("start_before_zero", video_id, f"[{start}, {end}]")
      start = 0.0
    if end > duration:
      report.add("end_past_duration", video_id, f"[{start}, {end}] > {duration}")
      if start >= duration:
        report.add("outside_video", video_id, f"[{start}, {end}] vs duration {duration}")
        continue
      end = duration
    if end - start < SEGMENT_TOL_SEC:
      report.add("zero_length", video_id, f"[{start}, {end}]")
      continue
    if _repeats(kept, start, end, name):
      report.add("duplicate", video_id, f"{name} [{start}, {end}]")
      continue
    kept.append((start, end, name))

  if not kept:
    report.add("video_without_segments", video_id)

  def table(rows):
    segments = np.array([(s, e) for s, e, _ in rows], np.float64).reshape(-1, 2)
    ids = [0 if num_classes == 1 else name_to_id[n] for _, _, n in rows]
    return segments, np.array(ids, np.int32).reshape(-1)

  segments, labels = table(kept)
  eval_segments, eval_labels = table(scored)
  return VideoRecord(video_id=video_id, subset=str(entry.get("subset", "")),
                     duration_sec=duration, fps=fps, segments_sec=segments, labels=labels,
                     label_names=tuple(n for _, _, n in kept), eval_segments_sec=eval_segments,
                     eval_labels=eval_labels)


def _repeats(rows: Sequence[Tuple[float, float, str]], start: float, end: float,
             name: str) -> bool:
  """Whether a row of label `name` starts and ends within SEGMENT_TOL_SEC of (start, end)."""
  return any(n == name and abs(s - start) <= SEGMENT_TOL_SEC and abs(e - end) <= SEGMENT_TOL_SEC
             for s, e, n in rows)

