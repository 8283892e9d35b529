"""Feature files -> float32 [T, C].

A video's features are `<feature_dir>/<file_prefix><video_id><file_suffix><feature_ext>` in every
folder of `DataConfig.feature_dir`; several folders (streams) are concatenated on channels.
Files are `.npy` arrays [T, C_i] or `.npz` archives holding one under `DataConfig.npz_key`.

`scan_features` checks every file's header when a dataset is opened (no array data is read):
existence, rank 2, a numeric dtype, T > 0, channels summing to `input_dim`, and stream lengths
within `MAX_STREAM_LENGTH_DIFF` rows of each other (longer streams are cropped to the shortest,
counted). A failed check raises `FeatureError` naming the file, or is a counted skip with
`on_bad_feature='skip'`. Non-finite values can only be seen when the data is read:
`load_features` raises `FeatureError` then.

With `resize_length > 0` (ActivityNet) every video is linearly resized to that many features, as
`F.interpolate(mode='linear', align_corners=False)`, and its feat_stride / num_frames follow
`timebase.resized_timebase`.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import zipfile
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from asl_tf import config as config_lib
from asl_tf.data import timebase

# Streams whose lengths differ by at most this many rows are cropped to the shortest.
MAX_STREAM_LENGTH_DIFF = 2

FEATURE_RULES = collections.OrderedDict([
    ("skipped_missing_features", "feature file missing: video skipped (on_bad_feature=skip)"),
    ("skipped_bad_features", "feature file unreadable, wrong rank, dtype or channels, or empty: "
                             "video skipped (on_bad_feature=skip)"),
    ("stream_length_cropped", f"feature streams differ by <= {MAX_STREAM_LENGTH_DIFF} rows: "
                              "cropped to the shortest"),
])


class FeatureError(ValueError):
  """A feature file that cannot be used; the message names the file and what was expected.

  Attributes:
    kind: `skipped_missing_features` or `skipped_bad_features` (the count it becomes when
      `on_bad_feature='skip'`).
  """

  def __init__(self, message: str, kind: str = "skipped_bad_features"):
    super().__init__(message)
    self.kind = kind


@dataclasses.dataclass(frozen=True)
class FeatureInfo:
  """Where a video's features are and how they sit on the time axis.

  Attributes:
    paths: one file per stream, concatenated on channels in this order.
    raw_length: rows used from every file (the shortest stream).
    length: T on the feature grid (resize_length when resizing, else raw_length).
    feat_stride: input frames between consecutive grid features (after any resize).
    num_frames: input frames per grid feature (after any resize).
  """
  paths: Tuple[str, ...]
  raw_length: int
  length: int
  feat_stride: float
  num_frames: float


# Errors numpy raises on files that are not what their name says (0 bytes: EOFError; a zip
# named .npy: an NpzFile instead of an array; a pickle: ValueError with allow_pickle=False).
_READ_ERRORS = (OSError, ValueError, EOFError, KeyError, TypeError, AttributeError,
                zipfile.BadZipFile)
_F32_MAX = float(np.finfo(np.float32).max)


def _unreadable(path: str, error: BaseException) -> FeatureError:
  kind = ".npz" if path.endswith(".npz") else ".npy"
  if "allow_pickle" in str(error):  # numpy would suggest loading it "unsafely": never here
    return FeatureError(f"feature file {path} cannot be read as {kind}: it holds pickled Python "
                        "objects or is not a NumPy file at all; feature files are never "
                        "unpickled: save the features with numpy.save of a float array")
  return FeatureError(f"feature file {path} cannot be read as {kind} "
                      f"({type(error).__name__}: {error or 'empty file'})")


def check_feature_array(array, where: str, input_dim: Optional[int] = None,
                        ranks: Sequence[int] = (2,)) -> np.ndarray:
  """The one set of checks every reader of features applies; returns float32.

  Args:
    array: what was read (anything).
    where: the file (or `name`) the message names.
    input_dim: the expected channel count (last axis), or None to skip that check.
    ranks: accepted ranks (the serving client also takes [B, T, C]).

  Raises:
    FeatureError: not an array, not real numbers (bool, complex, strings, objects), wrong rank,
      no rows, wrong channels, non-finite values or values beyond float32's range.
  """
  if not isinstance(array, np.ndarray):
    raise FeatureError(f"{where} holds a {type(array).__name__}, not a feature array")
  kind = array.dtype.kind
  if kind not in "fiu":
    raise FeatureError(f"{where} has dtype {array.dtype}; features must be real numbers "
                       "(float or integer)")
  if array.ndim not in ranks:
    expected = " or ".join({2: "[T, C]", 3: "[B, T, C]"}[r] for r in ranks)
    raise FeatureError(f"{where} has shape {array.shape}; expected {expected} (time first)")
  if array.shape[-2] < 1:
    raise FeatureError(f"{where} has no rows (shape {array.shape})")
  if input_dim is not None and array.shape[-1] != input_dim:
    raise FeatureError(f"{where} has shape {array.shape}, expected [T, {input_dim}] (channels "
                       "= --input_dim)")
  if kind == "f" and array.dtype.itemsize > 4:
    big = np.abs(array[np.isfinite(array)]) > _F32_MAX
    if big.any():
      raise FeatureError(f"{where} has values beyond float32's range (e.g. "
                         f"{array[np.isfinite(array)][big][0]:.3g}); rescale the features")
  out = np.asarray(array, np.float32)
  if not np.isfinite(out).all():
    index = tuple(int(i) for i in np.argwhere(~np.isfinite(out))[0])
    raise FeatureError(f"{where} has a non-finite value at index {index}; fix or drop the file")
  return out


def read_feature_file(path: str, npz_key: str = "feats", input_dim: Optional[int] = None,
                      ranks: Sequence[int] = (2,)) -> np.ndarray:
  """Reads one `.npy` (or `npz_key` of a `.npz`) feature file, checked, as float32.

  Never unpickles. Used by inference, the serving client and anything reading a whole file.

  Raises:
    FeatureError: naming the file: missing, unreadable or failing `check_feature_array`.
  """
  if not os.path.isfile(path):
    raise FeatureError(f"feature file {path} does not exist", "skipped_missing_features")
  try:
    if path.endswith(".npz"):
      with np.load(path, allow_pickle=False) as archive:
        if npz_key not in archive.files:
          raise FeatureError(f"feature file {path} has no array {npz_key!r} (it has "
                             f"{sorted(archive.files)}); set --npz_key")
        array = archive[npz_key]
    else:
      array = np.load(path, allow_pickle=False)
      if isinstance(array, np.lib.npyio.NpzFile):
        array.close()
        raise FeatureError(f"feature file {path} is a .npz archive, not a .npy array; rename "
                           "it to .npz (and set --feature_ext=.npz / --npz_key)")
  except FeatureError:
    raise
  except _READ_ERRORS as e:
    raise _unreadable(path, e) from None
  return check_feature_array(array, f"feature file {path}", input_dim, ranks)


def feature_paths(video_id: str, data_config: config_lib.DataConfig) -> Tuple[str, ...]:
  """One path per feature folder for `video_id`."""
  name = f"{data_config.file_prefix}{video_id}{data_config.file_suffix}{data_config.feature_ext}"
  return tuple(os.path.join(folder, name) for folder in data_config.feature_dir)


def read_header(path: str, npz_key: str = "feats") -> Tuple[Tuple[int, ...], np.dtype]:
  """Shape and dtype of a `.npy` file or of `npz_key` in a `.npz` file, without reading data.

  Raises:
    FeatureError: missing or unreadable file, missing npz key.
  """
  if not os.path.isfile(path):
    raise FeatureError(f"feature file {path} does not exist", "skipped_missing_features")
  try:
    if path.endswith(".npz"):
      with zipfile.ZipFile(path) as archive:
        member = npz_key + ".npy"
        if member not in archive.namelist():
          keys = [n[:-4] for n in archive.namelist() if n.endswith(".npy")]
          raise FeatureError(f"feature file {path} has no array {npz_key!r} (it has {keys}); "
                             "set --npz_key")
        with archive.open(member) as f:
          version = np.lib.format.read_magic(f)
          if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(f)
          else:
            shape, _, dtype = np.lib.format.read_array_header_2_0(f)
      return tuple(shape), np.dtype(dtype)
    array = np.load(path, mmap_mode="r", allow_pickle=False)
    if not isinstance(array, np.ndarray):
      raise FeatureError(f"feature file {path} is a {type(array).__name__}, not a .npy array "
                         "(a .npz archive? set --feature_ext=.npz)")
    return tuple(array.shape), array.dtype
  except FeatureError:
    raise
  except _READ_ERRORS as e:
    raise _unreadable(path, e) from None


def probe_features(video_id: str, data_config: config_lib.DataConfig
                   ) -> Tuple[FeatureInfo, Optional[str]]:
  """Checks a video's feature headers against the config.

  Args:
    video_id: the video.
    data_config: feature folders, naming, input_dim, resize settings.

  Returns:
    (info, crop_detail): crop_detail describes a stream-length crop, else None.

  Raises:
    FeatureError: naming the file, the video and what was expected.
  """
  paths = feature_paths(video_id, data_config)
  shapes = []
  for path in paths:
    shape, dtype = read_header(path, data_config.npz_key)
    if len(shape) != 2:
      raise FeatureError(f"feature file {path} (video {video_id!r}) has shape {shape}; expected "
                         "rank 2 [T, C] (time first)")
    if dtype.kind not in "fiu":
      raise FeatureError(f"feature file {path} (video {video_id!r}) has dtype {dtype}; expected "
                         "a numeric array")
    if shape[0] == 0:
      raise FeatureError(f"feature file {path} (video {video_id!r}) has no rows (shape {shape})")
    shapes.append(shape)
  channels = sum(s[1] for s in shapes)
  if channels != data_config.input_dim:
    per_file = ", ".join(f"{p}: {s[1]}" for p, s in zip(paths, shapes))
    raise FeatureError(f"video {video_id!r}: features have {channels} channels ({per_file}); "
                       f"expected input_dim={data_config.input_dim} (--input_dim; if every "
                       f"video's features have {channels}, set --input_dim={channels})")
  lengths = [s[0] for s in shapes]
  raw_length, crop_detail = min(lengths), None
  if max(lengths) - raw_length > MAX_STREAM_LENGTH_DIFF:
    per_file = ", ".join(f"{p}: {n}" for p, n in zip(paths, lengths))
    raise FeatureError(f"video {video_id!r}: feature streams have different lengths ({per_file});"
                       f" at most {MAX_STREAM_LENGTH_DIFF} rows of difference are cropped")
  if max(lengths) != raw_length:
    crop_detail = f"lengths {lengths} cropped to {raw_length}"
  if data_config.resize_length > 0:
    length = data_config.resize_length
    stride, frames = timebase.resized_timebase(raw_length, data_config.feat_stride,
                                               data_config.num_frames, length)
  else:
    length, stride, frames = raw_length, data_config.feat_stride, data_config.num_frames
  return FeatureInfo(paths=paths, raw_length=raw_length, length=length, feat_stride=float(stride),
                     num_frames=float(frames)), crop_detail


def scan_features(video_ids: Sequence[str], data_config: config_lib.DataConfig
                  ) -> Tuple[Dict[str, FeatureInfo], Dict[str, List[Tuple[str, str]]]]:
  """Probes every video's feature headers (cheap: no array data is read).

  Args:
    video_ids: videos to check.
    data_config: feature settings; `on_bad_feature` decides between raising and skipping.

  Returns:
    (infos, events): infos maps each usable video id to its FeatureInfo; events maps a
    FEATURE_RULES kind to (video_id, detail) pairs.

  Raises:
    FeatureError: a `feature_dir` that is not a folder, or the first bad video when
      `on_bad_feature='error'`.
  """
  missing = [d for d in data_config.feature_dir if not os.path.isdir(d)]
  if missing:
    raise FeatureError(f"--feature_dir={missing[0]} is not a folder (it does not exist, or is a "
                       "file); point --feature_dir at the folder of feature files",
                       "skipped_missing_features")
  infos, events = {}, collections.defaultdict(list)
  for video_id in video_ids:
    try:
      info, crop_detail = probe_features(video_id, data_config)
    except FeatureError as e:
      if data_config.on_bad_feature != "skip":
        raise FeatureError(f"{e}. Fix the file or pass --on_bad_feature=skip to skip such "
                           "videos (counted).", e.kind) from None
      events[e.kind].append((video_id, str(e)))
      continue
    if crop_detail:
      events["stream_length_cropped"].append((video_id, crop_detail))
    infos[video_id] = info
  return infos, dict(events)


def resize_linear(x: np.ndarray, length: int) -> np.ndarray:
  """Linear resize along time, as `F.interpolate(mode='linear', align_corners=False)`.

  Args:
    x: [T, C] features.
    length: L, output rows.

  Returns:
    float32 [L, C].
  """
  t = x.shape[0]
  src = np.maximum((np.arange(length, dtype=np.float64) + 0.5) * (t / length) - 0.5, 0.0)
  lo = np.minimum(np.floor(src).astype(np.int64), t - 1)
  hi = np.minimum(lo + 1, t - 1)
  w = (src - lo)[:, None]
  return (x[lo] * (1.0 - w) + x[hi] * w).astype(np.float32)


def load_features(video_id: str, info: FeatureInfo, data_config: config_lib.DataConfig,
                  start: int = 0, stop: Optional[int] = None,
                  out: Optional[np.ndarray] = None) -> np.ndarray:
  """Reads grid rows [start, stop) of a video's features (streams concatenated, resized).

  Without resizing, `.npy` files are memory-mapped and only the requested rows are read.

  Args:
    video_id: the video (for error messages).
    info: its FeatureInfo from `scan_features`.
    data_config: npz_key, resize_length.
    start, stop: grid rows to return (stop None = info.length).
    out: optional float32 [>= stop - start, C] buffer written in place (rows beyond are left).

  Returns:
    float32 [stop - start, C] (a view of `out` when given).

  Raises:
    FeatureError: unreadable file or non-finite values, naming the file.
  """
  stop = info.length if stop is None else stop
  n = stop - start
  channels = data_config.input_dim
  if out is None:
    out = np.empty([n, channels], np.float32)
  view = out[:n]
  resize = data_config.resize_length > 0
  col = 0
  for path in info.paths:
    try:
      if path.endswith(".npz"):
        with np.load(path, allow_pickle=False) as archive:
          array = archive[data_config.npz_key]
      else:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
      array = array[:info.raw_length]
      if resize:
        array = resize_linear(np.asarray(array, np.float32), info.length)
      block = array[start:stop]
      if block.shape[0] != n:
        raise ValueError(f"expected rows [{start}, {stop}) but the file has {array.shape[0]}")
      view[:, col:col + block.shape[1]] = block
    except _READ_ERRORS as e:
      raise FeatureError(f"feature file {path} (video {video_id!r}) could not be read: {e}") \
          from None
    if not np.isfinite(view[:, col:col + block.shape[1]]).all():
      bad = np.argwhere(~np.isfinite(view[:, col:col + block.shape[1]]))[0]
      raise FeatureError(f"feature file {path} (video {video_id!r}) has non-finite values "
                         f"(first at row {start + bad[0]}, channel {bad[1]}); fix or drop the file")
    col += block.shape[1]
  return view
