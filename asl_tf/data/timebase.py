"""Seconds <-> feature grid: the only place where this conversion is written down.

Feature `i` covers input frames `[i * feat_stride, i * feat_stride + num_frames)`, so its centre
sits at frame `i * feat_stride + 0.5 * num_frames` (ActionFormer FAQ):

    grid = (sec * fps - 0.5 * num_frames) / feat_stride
    sec  = (grid * feat_stride + 0.5 * num_frames) / fps      clipped to [0, duration]

Every function accepts NumPy arrays, Python floats or TF tensors (the exported SavedModel converts
in-graph) and follows the usual broadcasting rules: for a batch of segments `[B, M, 2]` pass the
per-video scalars as `[B, 1, 1]`.
"""

from __future__ import annotations

import sys
from typing import Tuple

import numpy as np


def feat_offset_grid(feat_stride, num_frames):
  """Grid position of second 0 is `-feat_offset_grid`: `0.5 * num_frames / feat_stride`."""
  return 0.5 * num_frames / feat_stride


def sec_to_grid(sec, fps, feat_stride, num_frames):
  """Seconds -> feature-grid units (small negative values are expected near 0 s).

  Args:
    sec: times in seconds, any shape.
    fps: frames per second, broadcastable to `sec`.
    feat_stride: input frames between consecutive features, broadcastable.
    num_frames: input frames seen by one feature, broadcastable.

  Returns:
    Grid positions, same type and broadcast shape as the inputs.
  """
  return (sec * fps - 0.5 * num_frames) / feat_stride


def grid_to_sec(grid, fps, feat_stride, num_frames, duration_sec):
  """Feature-grid units -> seconds, clipped to [0, duration_sec].

  Args:
    grid: grid positions, any shape.
    fps, feat_stride, num_frames: as in `sec_to_grid`, broadcastable to `grid`.
    duration_sec: video duration in seconds, broadcastable to `grid`.

  Returns:
    Seconds, same type and broadcast shape as the inputs.
  """
  sec = (grid * feat_stride + 0.5 * num_frames) / fps
  tf = sys.modules.get("tensorflow")  # a tensor implies TF is loaded; NumPy callers skip it
  if tf is not None and tf.is_tensor(sec):
    return tf.minimum(tf.maximum(sec, 0.0), tf.cast(duration_sec, sec.dtype))
  return np.clip(sec, 0.0, duration_sec)


def duration_sec(num_features, fps, feat_stride, num_frames):
  """A video's duration from its feature count, as ActionFormer takes it when the annotation
  gives none: `(num_features * feat_stride + num_frames) / fps`. Broadcasts like the others."""
  return (num_features * feat_stride + num_frames) / fps


def resized_timebase(num_features: int, feat_stride: float, num_frames: float,
                     resize_length: int) -> Tuple[float, float]:
  """feat_stride / num_frames after linearly resizing `num_features` features to `resize_length`.

  ActionFormer `anet.py` (force_upsampling): the resized features span the same
  `(T - 1) * feat_stride + num_frames` input frames, and each one is centred on its span.

  Args:
    num_features: T, features in the file.
    feat_stride: input frames between consecutive features before resizing.
    num_frames: input frames per feature before resizing.
    resize_length: L, features after resizing.

  Returns:
    (feat_stride, num_frames) of the resized features; both equal
    `((T - 1) * feat_stride + num_frames) / L`.
  """
  stride = ((num_features - 1) * feat_stride + num_frames) / float(resize_length)
  return stride, stride
