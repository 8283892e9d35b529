"""Tests for asl_tf.data.annotations on hand-built files and the real annotation files."""

import json
import logging
import os
import re
import time

import numpy as np
import pytest

from asl_tf import config as config_lib
from asl_tf.data import annotations

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHARED_DATA = os.path.join(REPO, "..", "shared", "data")
THUMOS = os.path.join(SHARED_DATA, "thumos14", "thumos14.json")
ANET = os.path.join(SHARED_DATA, "activitynet13", "anet1.3_annotations.json")
EGO4D = os.path.join(SHARED_DATA, "ego4d_mq", "ego4d_clip_annotations_v2.json")
needs_shared = pytest.mark.skipif(
    not os.path.isdir(SHARED_DATA),
    reason=f"real annotation files not found at {SHARED_DATA} (../shared/data beside the repo)")


def _write(tmp_path, data, name="ann.json"):
  path = tmp_path / name
  path.write_text(json.dumps(data))
  return str(path)


def _ann(label, label_id, start, end):
  return {"label": label, "label_id": label_id, "segment": [start, end]}


DIRTY = {
    "database": {
        "v1": {"subset": "Training", "duration": 100.0, "fps": 25.0, "annotations": [
            _ann("a", 0, 10.0, 20.0),
            _ann("a", 0, 10.0005, 20.0004),   # duplicate of the first (within 1e-3 s)
            _ann("b", 1, 10.0, 20.0),         # same times, other label: dense, kept
            _ann("a", 0, 30.0, 25.0),         # end < start
            _ann("b", 1, -2.0, 5.0),          # start < 0: clipped
            _ann("a", 0, 95.0, 104.0),        # end past duration: clipped
            _ann("b", 1, 101.0, 110.0),       # outside the video: clipped to nothing, dropped
            _ann("a", 0, 50.0, 50.0),         # zero length
        ]},
        "v2": {"subset": "training", "duration": 40.0, "annotations": []},
        "v3": {"subset": "validation", "duration": 40.0, "fps": 30.0,
               "annotations": [_ann("b", 1, 1.0, 2.0)]},
    }
}


def test_dirty_rows_fixed_and_counted(tmp_path):
  path = _write(tmp_path, DIRTY)
  records, report = annotations.load_annotations(path, "TRAINING", num_classes=2,
                                                 default_fps=12.0)
  assert [r.video_id for r in records] == ["v1", "v2"]
  v1, v2 = records
  np.testing.assert_allclose(v1.segments_sec, [[10, 20], [10, 20], [0, 5], [95, 100]])
  np.testing.assert_array_equal(v1.labels, [0, 1, 1, 0])
  assert v1.label_names == ("a", "b", "b", "a")
  assert v1.fps == 25.0 and v1.duration_sec == 100.0
  assert v2.num_segments == 0 and v2.fps == 12.0
  assert report.counts == {
      "end_before_start": 1, "start_before_zero": 1, "end_past_duration": 2, "outside_video": 1,
      "zero_length": 1, "duplicate": 1, "label_id_overridden": 0, "missing_fps": 1,
      "video_without_segments": 1}
  assert report.num_videos == 2 and report.num_segments == 4
  assert report.class_names == ("a", "b")
  assert "v1" in report.summary() and "duplicate: 1" in report.summary()


def test_evaluation_rows_are_the_files_as_actionformers_evaluation_reads_them(tmp_path):
  """Training clips and drops rows past the video; evaluation scored those clipped rows too,
  so a segment after the video's end (26 in THUMOS14 test) was one miss fewer than the
  reference evaluation counts: HammerThrow's AP of a perfect detector was 1.0, not 0.909."""
  records, _ = annotations.load_annotations(_write(tmp_path, DIRTY), "training", num_classes=2)
  v1 = records[0]
  np.testing.assert_array_equal(v1.segments_sec, [[10, 20], [10, 20], [0, 5], [95, 100]])
  # Only the duplicate, end < start and zero-length rows go; nothing is clipped.
  np.testing.assert_array_equal(v1.eval_segments_sec,
                                [[10, 20], [10, 20], [-2, 5], [95, 104], [101, 110]])
  np.testing.assert_array_equal(v1.eval_labels, [0, 1, 1, 0, 1])
  truth = v1.evaluation_ground_truth()
  assert truth["video_id"] == "v1" and truth["segments_sec"] is v1.eval_segments_sec
  assert records[1].eval_segments_sec.shape == (0, 2)


def test_class_agnostic_maps_every_label_to_zero(tmp_path):
  path = _write(tmp_path, DIRTY)
  records, report = annotations.load_annotations(path, "training", num_classes=1)
  np.testing.assert_array_equal(records[0].labels, [0, 0, 0, 0])
  assert report.class_names == ("action",)
  assert records[0].label_names == ("a", "b", "b", "a")


def test_subset_selection_case_insensitive_and_comma_list(tmp_path):
  path = _write(tmp_path, DIRTY)
  records, report = annotations.load_annotations(path, "Training, VALIDATION", num_classes=2)
  assert sorted(r.video_id for r in records) == ["v1", "v2", "v3"]
  assert report.subsets == ("training", "validation")
  with pytest.raises(annotations.AnnotationError, match=r"subset 'test' not found.*training"):
    annotations.load_annotations(path, "test", num_classes=2)


def test_label_id_at_or_above_num_classes_names_video_and_label(tmp_path):
  path = _write(tmp_path, {"database": {"vid_x": {"subset": "training", "duration": 9.0,
                                                  "annotations": [_ann("jump", 5, 1, 2)]}}})
  with pytest.raises(annotations.AnnotationError, match=r"'jump': 5.*num_classes=3.*vid_x"):
    annotations.load_annotations(path, "training", num_classes=3)


def test_unknown_label_with_label_map_names_video_and_label(tmp_path):
  path = _write(tmp_path, {"database": {"vid_y": {"subset": "training", "duration": 9.0,
                                                  "annotations": [_ann("swim", 0, 1, 2)]}}})
  label_map = tmp_path / "labels.txt"
  label_map.write_text("run\njump\n")
  with pytest.raises(annotations.AnnotationError, match=r"vid_y.*'label' = 'swim'"):
    annotations.load_annotations(path, "training", num_classes=2,
                                 label_map_file=str(label_map))


def test_label_map_file_pins_ids_json_and_lines(tmp_path):
  path = _write(tmp_path, {"database": {"v": {"subset": "training", "duration": 9.0,
                                              "annotations": [_ann("run", 0, 1, 2),
                                                              _ann("jump", 1, 3, 4)]}}})
  as_json = tmp_path / "map.json"
  as_json.write_text(json.dumps({"jump": 0, "run": 2}))
  records, report = annotations.load_annotations(path, "training", num_classes=3,
                                                 label_map_file=str(as_json))
  np.testing.assert_array_equal(records[0].labels, [2, 0])
  assert report.counts["label_id_overridden"] == 2
  assert report.class_names == ("jump", "class_1", "run")
  as_lines = tmp_path / "map.txt"
  as_lines.write_text("jump\nrun\n\n")
  records, report = annotations.load_annotations(path, "training", num_classes=2,
                                                 label_map_file=str(as_lines))
  np.testing.assert_array_equal(records[0].labels, [1, 0])
  dup = tmp_path / "dup.json"
  dup.write_text(json.dumps({"jump": 0, "run": 0}))
  with pytest.raises(annotations.AnnotationError, match="ids used by several names"):
    annotations.read_label_map(str(dup))


def test_flat_layout_detected(tmp_path):
  flat = {"clip1": {"subset": "train", "duration": 30.0, "fps": 1.874,
                    "annotations": [{"segment": [1, 4], "label": "cut", "label_id": 3}]},
          "clip2": {"subset": "test", "duration": 20.0, "fps": 1.874, "annotations": []}}
  path = _write(tmp_path, flat)
  records, report = annotations.load_annotations(path, "train", num_classes=4)
  assert records[0].video_id == "clip1"
  np.testing.assert_array_equal(records[0].labels, [3])
  with pytest.raises(annotations.AnnotationError, match="expects a top-level 'database'"):
    annotations.load_annotations(path, "train", num_classes=4, annotation_format="actionformer")


def test_official_activitynet_taxonomy_and_sorted_names(tmp_path):
  taxonomy = [{"nodeName": "Root", "parentName": None},
              {"nodeName": "Sports", "parentName": "Root"},
              {"nodeName": "Surfing", "parentName": "Sports"},
              {"nodeName": "Archery", "parentName": "Sports"},
              {"nodeName": "Cooking", "parentName": "Root"}]
  database = {"abc": {"subset": "validation", "duration": 50.0, "url": "u",
                      "annotations": [{"segment": [1.0, 9.0], "label": "Surfing"},
                                      {"segment": [2.0, 3.0], "label": "Archery"}]}}
  path = _write(tmp_path, {"version": "VERSION 1.3", "taxonomy": taxonomy,
                           "database": database})
  records, report = annotations.load_annotations(path, "validation", num_classes=3,
                                                 default_fps=15.0)
  # Leaves sorted: Archery 0, Cooking 1, Surfing 2.
  np.testing.assert_array_equal(records[0].labels, [2, 0])
  assert report.class_names == ("Archery", "Cooking", "Surfing")
  assert report.counts["missing_fps"] == 1 and records[0].fps == 15.0
  path = _write(tmp_path, {"database": database}, "no_taxonomy.json")
  records, report = annotations.load_annotations(path, "validation", num_classes=2)
  np.testing.assert_array_equal(records[0].labels, [1, 0])  # sorted names: Archery, Surfing


@pytest.mark.parametrize("taxonomy,node", [
    ([{"nodeName": "Root"}, {"parentName": "Root"}], r"1 \(\{'parentName': 'Root'\}\)"),
    ({"Root": "Sports"}, r"0 \(\{'Root': 'Sports'\}\)"),
    (["Root", "Sports"], r"0 \('Root'\)"),
    ([{"nodeName": "Run", "parentName": ["Root"]}],  # was an unhashable-list TypeError
     r"0 \(\{'nodeName': 'Run', 'parentName': \['Root'\]\}\)"),
])
def test_a_malformed_taxonomy_names_the_node(tmp_path, taxonomy, node):
  """Were KeyError / AttributeError tracebacks from train, evaluate and visualize."""
  database = {"abc": {"subset": "validation", "duration": 50.0, "url": "u",
                      "annotations": [{"segment": [1.0, 9.0], "label": "Surfing"}]}}
  path = _write(tmp_path, {"version": "VERSION 1.3", "taxonomy": taxonomy, "database": database})
  with pytest.raises(annotations.AnnotationError,
                     match=f"{re.escape(path)}: taxonomy node {node} needs 'nodeName' text and "
                           "a 'parentName' that is text or null"):
    annotations.load_annotations(path, "validation", num_classes=2)


@pytest.mark.parametrize("content,message", [
    (json.dumps([{"name": "run"}, {"name": "jump"}]).encode(),
     r"a list of names holds \{'name': 'run'\}; every name must be text"),
    (b"caf\xe9\njump\n", r"not UTF-8 text \(invalid continuation byte at byte 3\)"),
])
def test_a_malformed_label_map_is_named(tmp_path, content, message):
  """Were TypeError (unhashable dict) and UnicodeDecodeError tracebacks."""
  path = tmp_path / "labels.json"
  path.write_bytes(content)
  with pytest.raises(annotations.AnnotationError, match=f"label map {path}: {message}"):
    annotations.read_label_map(str(path))


def test_fps_override_wins(tmp_path):
  path = _write(tmp_path, DIRTY)
  records, report = annotations.load_annotations(path, "training", num_classes=2,
                                                 fps_override=15.0)
  assert [r.fps for r in records] == [15.0, 15.0]
  assert report.counts["missing_fps"] == 0


@pytest.mark.parametrize("entry,field", [
    ({"subset": "training", "duration": 9.0, "annotations": [{"segment": [1], "label": "a",
                                                              "label_id": 0}]}, "'segment'"),
    ({"subset": "training", "duration": 9.0, "annotations": [{"segment": [1, "x"],
                                                              "label": "a", "label_id": 0}]},
     "'segment'"),
    ({"subset": "training", "annotations": []}, "'duration'"),
    ({"subset": "training", "duration": -3, "annotations": []}, "'duration'"),
])
def test_malformed_rows_name_video_and_field(tmp_path, entry, field):
  path = _write(tmp_path, {"database": {"bad_video": entry}})
  with pytest.raises(annotations.AnnotationError, match=f"bad_video.*{field}"):
    annotations.load_annotations(path, "training", num_classes=2)


@pytest.mark.parametrize("video_id", ["../../outside/secret", "/tmp/outside/secret", "a/b",
                                      "a\\b", "..", "", "v\0"])
def test_a_video_id_that_would_leave_the_feature_folder_is_refused(tmp_path, video_id):
  """The id names the feature file (and the picture `visualize` writes): one with a path in it
  would read or write outside the folders the flags name."""
  entry = {"subset": "training", "duration": 9.0, "annotations": []}
  path = _write(tmp_path, {"database": {video_id: entry, "fine..name": entry}})
  with pytest.raises(annotations.AnnotationError,
                     match=f"ann.json: video {re.escape(repr(video_id))}: a video id names its "
                           "feature file"):
    annotations.load_annotations(path, "training", num_classes=2)
  records, _ = annotations.load_annotations(_write(tmp_path, {"database": {"fine..name": entry}}),
                                            "training", num_classes=2)
  assert [r.video_id for r in records] == ["fine..name"]


def test_a_label_id_clash_names_both_videos(tmp_path):
  """The message blamed the second video's correct row and said 'elsewhere'."""
  entry = lambda label, label_id: {"subset": "training", "duration": 9.0,
                                   "annotations": [_ann(label, label_id, 1, 2)]}
  path = _write(tmp_path, {"database": {"v_first": entry("a", 0), "v_second": entry("b", 0)}})
  with pytest.raises(annotations.AnnotationError, match=r"video 'v_second': label_id 0 names "
                                                        r"'b' here but 'a' in video 'v_first'"):
    annotations.load_annotations(path, "training", num_classes=2)


def test_a_row_with_a_label_id_and_no_label_takes_the_name_other_rows_give_it(tmp_path):
  """Such a row was read as a class named '1', clashing with the row that names id 1 'b'."""
  row = {"label_id": 1, "segment": [3, 4]}
  path = _write(tmp_path, {"database": {
      "v1": {"subset": "training", "duration": 9.0,
             "annotations": [_ann("a", 0, 1, 2), _ann("b", 1, 5, 6)]},
      "v2": {"subset": "training", "duration": 9.0, "annotations": [row]}}})
  records, report = annotations.load_annotations(path, "training", num_classes=2)
  assert report.class_names == ("a", "b") and list(records[1].labels) == [1]
  ids_only = _write(tmp_path, {"database": {"v": {"subset": "training", "duration": 9.0,
                                                  "annotations": [row, {"label_id": 0,
                                                                        "segment": [1, 2]}]}}},
                    name="ids.json")
  _, report = annotations.load_annotations(ids_only, "training", num_classes=2)
  assert report.class_names == ("0", "1")


def test_huge_json_integers_are_named_not_overflowing(tmp_path):
  huge = 10 ** 400
  path = _write(tmp_path, {"database": {"v": {"subset": "training", "duration": huge,
                                              "annotations": []}}})
  with pytest.raises(annotations.AnnotationError, match=r"video 'v': field 'duration' is 1000"):
    annotations.load_annotations(path, "training", num_classes=2)
  path = _write(tmp_path, {"database": {"v": {"subset": "training", "duration": 9.0,
                                              "annotations": [_ann("a", 0, 1, huge)]}}})
  with pytest.raises(annotations.AnnotationError, match=r"annotations\[0\] field 'segment'"):
    annotations.load_annotations(path, "training", num_classes=2)


def test_a_row_without_label_id_keeps_the_files_ids(tmp_path):
  """Ids 5 and 2 from the file (sorted names would give a -> 0, b -> 1); the row without
  label_id takes the id its label has elsewhere."""
  path = _write(tmp_path, {"database": {
      "v1": {"subset": "training", "duration": 9.0,
             "annotations": [_ann("b", 2, 1, 2), _ann("a", 5, 3, 4)]},
      "v2": {"subset": "training", "duration": 9.0,
             "annotations": [{"label": "a", "segment": [1, 2]}]}}})
  records, report = annotations.load_annotations(path, "training", num_classes=6)
  assert [r.labels.tolist() for r in records] == [[2, 5], [5]]
  assert report.class_names[2] == "b" and report.class_names[5] == "a"


def test_a_row_whose_label_has_no_id_anywhere_is_refused_naming_it(tmp_path):
  path = _write(tmp_path, {"database": {
      "v1": {"subset": "training", "duration": 9.0, "annotations": [_ann("a", 0, 1, 2)]},
      "v2": {"subset": "training", "duration": 9.0,
             "annotations": [{"label": "zebra", "segment": [1, 2]}]}}})
  with pytest.raises(annotations.AnnotationError, match=r"video 'v2': label 'zebra' has no "
                                                        r"label_id"):
    annotations.load_annotations(path, "training", num_classes=2)


def test_class_agnostic_files_ignore_label_ids(tmp_path):
  """num_classes=1: mixed or inconsistent ids do not matter (everything is 0)."""
  path = _write(tmp_path, {"database": {
      "v1": {"subset": "training", "duration": 9.0, "annotations": [_ann("a", 0, 1, 2)]},
      "v2": {"subset": "training", "duration": 9.0,
             "annotations": [{"label": "b", "segment": [1, 2]}, _ann("a", 7, 3, 4)]}}})
  records, _ = annotations.load_annotations(path, "training", num_classes=1)
  assert [r.labels.tolist() for r in records] == [[0], [0, 0]]


def test_inconsistent_label_ids_in_file(tmp_path):
  path = _write(tmp_path, {"database": {
      "v1": {"subset": "training", "duration": 9.0, "annotations": [_ann("a", 0, 1, 2)]},
      "v2": {"subset": "training", "duration": 9.0, "annotations": [_ann("a", 1, 1, 2)]}}})
  with pytest.raises(annotations.AnnotationError, match="label 'a' has label_id 1 here but 0"):
    annotations.load_annotations(path, "training", num_classes=2)


def test_not_json_and_missing_file(tmp_path):
  bad = tmp_path / "bad.json"
  bad.write_text("{not json")
  with pytest.raises(annotations.AnnotationError, match="bad.json: not valid JSON"):
    annotations.load_annotations(str(bad), "training", num_classes=2)
  with pytest.raises(annotations.AnnotationError, match="does not exist"):
    annotations.load_annotations(str(tmp_path / "nope.json"), "training", num_classes=2)


def test_load_video_records_logs_one_summary_warning(tmp_path, caplog):
  path = _write(tmp_path, DIRTY)
  data_config = config_lib.DataConfig(annotation_file=path, num_classes=2)
  with caplog.at_level(logging.INFO):
    records, report = annotations.load_video_records(data_config, "training")
  warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
  assert len(warnings) == 1
  message = warnings[0].getMessage()
  for kind in ("end_before_start: 1", "outside_video: 1", "zero_length: 1", "duplicate: 1",
               "video_without_segments: 1"):
    assert kind in message
  assert len(records) == 2 and records[0].features is None


def test_num_classes_above_the_named_classes_warns_with_what_to_do(tmp_path, caplog):
  """--num_classes=5 over a file naming 2 classes trained 3 outputs on background, silently."""
  path = _write(tmp_path, DIRTY)

  def warnings(num_classes, label_map_file=""):
    caplog.clear()
    data_config = config_lib.DataConfig(annotation_file=path, num_classes=num_classes,
                                        label_map_file=label_map_file)
    with caplog.at_level(logging.INFO):
      _, report = annotations.load_video_records(data_config, "validation")
    return report, [r.getMessage() for r in caplog.records
                    if r.levelno == logging.WARNING and "--num_classes" in r.getMessage()]

  report, logged = warnings(2)
  assert report.unnamed_class_ids == () and logged == []
  report, logged = warnings(5)
  assert report.unnamed_class_ids == (2, 3, 4)
  assert logged == [f"{path}: --num_classes=5 but 2 label ids have a class name: no label has "
                    "ids 2-4, whose outputs learn only background; lower --num_classes to 2"]
  # Ids pinned with a gap: lowering --num_classes would cut a named id, so the advice differs.
  label_map = tmp_path / "labels.json"
  label_map.write_text(json.dumps({"a": 0, "b": 3}))
  report, logged = warnings(4, str(label_map))
  assert report.unnamed_class_ids == (1, 2) and len(logged) == 1
  assert "no label has ids 1-2," in logged[0] and logged[0].endswith(
      "name every id with --label_map_file")
  assert annotations.load_annotations(path, "validation", num_classes=1)[1].unnamed_class_ids == ()


@needs_shared
def test_thumos14_test_scores_every_segment_the_reference_scores():
  records, report = _load(THUMOS, "test", 20)
  assert report.counts["outside_video"] == 26
  assert sum(len(r.labels) for r in records) == 3332  # training's rows
  assert sum(len(r.eval_labels) for r in records) == 3358  # the reference evaluation's


def _load(path, subset, num_classes):
  return annotations.load_annotations(path, subset, num_classes=num_classes)


@needs_shared
def test_thumos14_real_counts():
  val, val_report = _load(THUMOS, "validation", 20)
  test, test_report = _load(THUMOS, "test", 20)
  assert (len(val), len(test)) == (200, 212)
  assert len(val_report.class_names) == 20 and "class_" not in "".join(val_report.class_names)
  # 3,007 + 3,358 raw segments; 4 + 26 lie wholly after their video's end.
  assert (val_report.num_segments, test_report.num_segments) == (3003, 3332)
  assert val_report.counts["end_past_duration"] == 4
  assert test_report.counts["end_past_duration"] == 26
  assert test_report.counts["outside_video"] == 26
  assert sum(test_report.counts.values()) == 52
  v270 = next(r for r in test if r.video_id == "video_test_0000270")
  assert v270.num_segments == 29 - 22
  assert v270.segments_sec.max() <= v270.duration_sec == 176.25
  # Dense labels: CliffDiving lies inside Diving and both are kept.
  names = {n for r in val for n in r.label_names}
  assert {"CliffDiving", "Diving"} <= names


@needs_shared
def test_activitynet_real_counts_and_speed():
  start = time.perf_counter()
  train, train_report = _load(ANET, "training", 200)
  val, val_report = _load(ANET, "validation", 200)
  elapsed = time.perf_counter() - start
  assert elapsed < 4.0, f"loading 14k ActivityNet videos took {elapsed:.2f} s"
  assert (len(train), len(val)) == (9649, 4728)
  assert len(train_report.class_names) == 200
  assert (train_report.num_segments, val_report.num_segments) == (14819, 7271)
  assert (train_report.counts["zero_length"], val_report.counts["zero_length"]) == (9, 3)
  assert (train_report.counts["duplicate"], val_report.counts["duplicate"]) == (31, 19)
  assert (train_report.counts["end_past_duration"],
          val_report.counts["end_past_duration"]) == (141, 68)
  # Videos whose only segment was [0, 0].
  assert (train_report.counts["video_without_segments"],
          val_report.counts["video_without_segments"]) == (8, 2)
  assert all((r.segments_sec[:, 1] - r.segments_sec[:, 0] >= annotations.SEGMENT_TOL_SEC).all()
             for r in train)
  agnostic, _ = _load(ANET, "validation", 1)
  assert all((r.labels == 0).all() for r in agnostic)
  assert sum(r.num_segments for r in agnostic) == 7271


@needs_shared
def test_ego4d_real_counts():
  train, train_report = _load(EGO4D, "train", 110)
  val, val_report = _load(EGO4D, "val", 110)
  test, test_report = _load(EGO4D, "test", 110)
  assert (len(train), len(val), len(test)) == (1486, 521, 488)
  assert len(train_report.class_names) == 110
  assert "class_" not in "".join(train_report.class_names)
  assert (train_report.num_segments, val_report.num_segments, test_report.num_segments) == (
      13543, 4287, 0)
  assert (train_report.counts["duplicate"], val_report.counts["duplicate"]) == (16, 8)
  assert (train_report.counts["end_past_duration"],
          val_report.counts["end_past_duration"]) == (1055, 421)
  assert val_report.counts["outside_video"] == 1
  assert test_report.counts["video_without_segments"] == 488
  # Key is the clip id (the feature file stem), fps the feature rate.
  assert train[0].video_id == "9df49083-577b-43f9-9874-6e4b21f104b4"
  assert train[0].fps == pytest.approx(1.8741513727840071)
