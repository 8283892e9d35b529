"""Tests for asl_tf.data.features."""

import os

import numpy as np
import pytest

from asl_tf import config as config_lib
from asl_tf.data import features


def _config(dirs, **kwargs):
  kwargs.setdefault("input_dim", 6)
  return config_lib.DataConfig(feature_dir=tuple(str(d) for d in dirs), **kwargs)


def _save(folder, name, array):
  os.makedirs(folder, exist_ok=True)
  np.save(os.path.join(folder, name), array)


def test_npy_header_and_load(tmp_path):
  x = np.arange(30, dtype=np.float32).reshape(5, 6)
  _save(tmp_path, "vid.npy", x)
  cfg = _config([tmp_path])
  info, crop = features.probe_features("vid", cfg)
  assert (info.raw_length, info.length, crop) == (5, 5, None)
  assert (info.feat_stride, info.num_frames) == (cfg.feat_stride, cfg.num_frames)
  np.testing.assert_array_equal(features.load_features("vid", info, cfg), x)
  np.testing.assert_array_equal(features.load_features("vid", info, cfg, 1, 3), x[1:3])


def test_npz_key_prefix_suffix(tmp_path):
  x = np.random.default_rng(0).normal(size=[4, 6]).astype(np.float16)
  np.savez(tmp_path / "v_abc_rgb.npz", feats=x, other=np.zeros(3))
  cfg = _config([tmp_path], feature_ext="npz", file_prefix="v_", file_suffix="_rgb")
  info, _ = features.probe_features("abc", cfg)
  assert info.paths == (os.path.join(str(tmp_path), "v_abc_rgb.npz"),)
  out = features.load_features("abc", info, cfg)
  assert out.dtype == np.float32
  np.testing.assert_allclose(out, x.astype(np.float32))
  bad_key = _config([tmp_path], feature_ext="npz", file_prefix="v_", file_suffix="_rgb",
                    npz_key="x")
  with pytest.raises(features.FeatureError, match=r"no array 'x' \(it has \['feats', 'other'\]"):
    features.probe_features("abc", bad_key)


def test_streams_concatenated_and_cropped(tmp_path):
  a = np.ones([10, 4], np.float32)
  b = np.full([9, 2], 2.0, np.float32)
  _save(tmp_path / "a", "v.npy", a)
  _save(tmp_path / "b", "v.npy", b)
  cfg = _config([tmp_path / "a", tmp_path / "b"])
  infos, events = features.scan_features(["v"], cfg)
  assert infos["v"].raw_length == 9
  assert events == {"stream_length_cropped": [("v", "lengths [10, 9] cropped to 9")]}
  out = features.load_features("v", infos["v"], cfg)
  assert out.shape == (9, 6)
  np.testing.assert_array_equal(out[:, :4], 1.0)
  np.testing.assert_array_equal(out[:, 4:], 2.0)
  _save(tmp_path / "b", "w.npy", np.zeros([6, 2], np.float32))
  _save(tmp_path / "a", "w.npy", np.zeros([10, 4], np.float32))
  with pytest.raises(features.FeatureError, match=r"video 'w'.*different lengths.*: 10.*: 6"):
    features.scan_features(["w"], cfg)


@pytest.mark.parametrize("array,pattern", [
    (np.zeros([5, 6, 1], np.float32), r"shape \(5, 6, 1\); expected rank 2"),
    (np.zeros([5, 7], np.float32), r"7 channels .*expected input_dim=6"),
    (np.zeros([0, 6], np.float32), "has no rows"),
    (np.array([["a"] * 6], dtype="U1"), "expected a numeric array"),
])
def test_bad_headers_name_file_and_expectation(tmp_path, array, pattern):
  _save(tmp_path, "bad.npy", array)
  cfg = _config([tmp_path])
  with pytest.raises(features.FeatureError, match=pattern) as err:
    features.scan_features(["bad"], cfg)
  assert "bad" in str(err.value) and "--on_bad_feature=skip" in str(err.value)


def test_missing_file_error_and_counted_skip(tmp_path):
  _save(tmp_path, "ok.npy", np.zeros([3, 6], np.float32))
  _save(tmp_path, "rank3.npy", np.zeros([3, 6, 1], np.float32))
  with pytest.raises(features.FeatureError, match=r"gone\.npy does not exist"):
    features.scan_features(["ok", "gone"], _config([tmp_path]))
  infos, events = features.scan_features(["ok", "gone", "rank3"],
                                         _config([tmp_path], on_bad_feature="skip"))
  assert list(infos) == ["ok"]
  assert [v for v, _ in events["skipped_missing_features"]] == ["gone"]
  assert [v for v, _ in events["skipped_bad_features"]] == ["rank3"]


@pytest.mark.parametrize("on_bad_feature", ["error", "skip"])
def test_a_feature_dir_that_is_not_a_folder_is_named_once(tmp_path, on_bad_feature):
  """It was reported file by file (and, with skip, every video skipped)."""
  _save(tmp_path / "ok", "v.npy", np.zeros([3, 6], np.float32))
  missing = tmp_path / "nodir"
  with pytest.raises(features.FeatureError, match=r"--feature_dir=.*nodir is not a folder"):
    features.scan_features(["v"], _config([tmp_path / "ok", missing],
                                          on_bad_feature=on_bad_feature))


def test_a_channel_mismatch_says_which_input_dim_the_files_have(tmp_path):
  _save(tmp_path, "v.npy", np.zeros([3, 6], np.float32))
  with pytest.raises(features.FeatureError, match=r"features have 6 channels .*expected "
                                                  r"input_dim=7 .*set --input_dim=6"):
    features.scan_features(["v"], _config([tmp_path], input_dim=7))


def test_non_finite_detected_on_read(tmp_path):
  x = np.zeros([8, 6], np.float32)
  x[5, 2] = np.nan
  _save(tmp_path, "nan.npy", x)
  cfg = _config([tmp_path])
  info, _ = features.probe_features("nan", cfg)
  np.testing.assert_array_equal(features.load_features("nan", info, cfg, 0, 4), 0.0)
  with pytest.raises(features.FeatureError, match=r"nan\.npy.*non-finite.*row 5, channel 2"):
    features.load_features("nan", info, cfg)


def test_resize_linear_matches_torch_align_corners_false():
  x = np.arange(4, dtype=np.float32)[:, None]
  # torch.nn.functional.interpolate(x[None].T, size=8, mode='linear', align_corners=False)
  np.testing.assert_allclose(features.resize_linear(x, 8)[:, 0],
                             [0.0, 0.25, 0.75, 1.25, 1.75, 2.25, 2.75, 3.0])
  np.testing.assert_allclose(features.resize_linear(x, 2)[:, 0], [0.5, 2.5])
  np.testing.assert_allclose(features.resize_linear(x, 4), x)
  np.testing.assert_allclose(features.resize_linear(x[:1], 3)[:, 0], [0.0, 0.0, 0.0])


def test_resize_bookkeeping_and_load(tmp_path):
  x = np.random.default_rng(1).normal(size=[100, 6]).astype(np.float32)
  _save(tmp_path, "v.npy", x)
  cfg = _config([tmp_path], resize_length=192, feat_stride=16, num_frames=16)
  info, _ = features.probe_features("v", cfg)
  assert (info.raw_length, info.length) == (100, 192)
  assert info.feat_stride == pytest.approx((99 * 16 + 16) / 192)
  assert info.num_frames == info.feat_stride
  out = features.load_features("v", info, cfg)
  np.testing.assert_allclose(out, features.resize_linear(x, 192), rtol=1e-6)
  np.testing.assert_allclose(features.load_features("v", info, cfg, 10, 20), out[10:20])


def test_load_into_buffer(tmp_path):
  x = np.arange(12, dtype=np.float32).reshape(2, 6)
  _save(tmp_path, "v.npy", x)
  cfg = _config([tmp_path])
  info, _ = features.probe_features("v", cfg)
  buf = np.full([5, 6], -1.0, np.float32)
  view = features.load_features("v", info, cfg, out=buf)
  assert np.shares_memory(view, buf)
  np.testing.assert_array_equal(buf[:2], x)
  np.testing.assert_array_equal(buf[2:], -1.0)


def _zip_named_npy(path):
  np.savez(str(path) + ".tmp.npz", feats=np.zeros([3, 6], np.float32))
  os.replace(str(path) + ".tmp.npz", path)


@pytest.mark.parametrize("make,pattern", [
    (lambda p: p.write_bytes(b""), r"empty\.npy cannot be read as \.npy \(EOFError"),
    (_zip_named_npy, r"empty\.npy is a \.npz archive, not a \.npy array"),
    (lambda p: np.save(p, np.ones([4, 6], bool)), r"dtype bool; features must be real numbers"),
    (lambda p: np.save(p, np.ones([4, 6], np.complex64)), r"dtype complex64"),
    (lambda p: np.save(p, np.array([["a"] * 6] * 2)), r"dtype <U1"),
    (lambda p: np.save(p, np.full([4, 6], 1e300)), r"values beyond float32's range"),
    (lambda p: np.save(p, np.array([[None] * 6], object)), r"cannot be read as \.npy: it holds "
                                                             r"pickled Python objects .*never "
                                                             r"unpickled"),
    (lambda p: p.write_text("a README, not features\n"), r"cannot be read as \.npy: it holds "
                                                        r"pickled .* or is not a NumPy file"),
    (lambda p: np.save(p, np.zeros([6], np.float32)), r"shape \(6,\); expected \[T, C\]"),
    (lambda p: np.save(p, np.full([2, 6], np.inf, np.float32)),
     r"non-finite value at index \(0, 0\)"),
])
def test_one_reader_names_every_bad_file(tmp_path, make, pattern):
  """Each used to crash inference (EOFError, AttributeError, TypeError) or pass through as
  wrong numbers (bool, complex, inf after the float32 cast)."""
  path = tmp_path / "empty.npy"
  make(path)
  with pytest.raises(features.FeatureError, match=pattern):
    features.read_feature_file(str(path), input_dim=6)


def test_reader_returns_float32_and_checks_channels(tmp_path):
  np.save(tmp_path / "v.npy", np.arange(12, dtype=np.int16).reshape(2, 6))
  x = features.read_feature_file(str(tmp_path / "v.npy"), input_dim=6)
  assert x.dtype == np.float32 and x[1, 5] == 11.0
  with pytest.raises(features.FeatureError, match=r"expected \[T, 8\]"):
    features.read_feature_file(str(tmp_path / "v.npy"), input_dim=8)


def test_empty_or_zip_npy_is_a_counted_skip_in_training(tmp_path):
  _save(tmp_path, "ok.npy", np.zeros([3, 6], np.float32))
  (tmp_path / "empty.npy").write_bytes(b"")
  _zip_named_npy(tmp_path / "zipped.npy")
  infos, events = features.scan_features(["ok", "empty", "zipped"],
                                         _config([tmp_path], on_bad_feature="skip"))
  assert list(infos) == ["ok"]
  assert sorted(v for v, _ in events["skipped_bad_features"]) == ["empty", "zipped"]
