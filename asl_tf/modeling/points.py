"""Point table of the feature pyramid (ActionFormer's PointGenerator, computed on the fly).

Every pyramid level l with stride s_l contributes one point per frame, at t = i * s_l in base-grid
units (no 0.5 offset), carrying the level's regression range and stride. Unlike ActionFormer there
is no precomputed buffer of points (its `max_buffer_len_factor`): any length works.
"""

from typing import Sequence, Tuple

import tensorflow as tf


def level_points(length, stride: int, regression_range: Tuple[float, float]) -> tf.Tensor:
  """Points of one level.

  Args:
    length: T_l, frames on this level (int or scalar int tensor).
    stride: s_l, the level's stride in base-grid units.
    regression_range: (lo, hi) in base-grid units.

  Returns:
    float32 [T_l, 4]: (t = i * s_l, lo, hi, s_l).
  """
  t = tf.cast(tf.range(length), tf.float32) * float(stride)  # [T_l]
  const = tf.constant([regression_range[0], regression_range[1], float(stride)], tf.float32)
  const = tf.broadcast_to(const[None], [tf.shape(t)[0], 3])  # [T_l, 3]
  return tf.concat([t[:, None], const], axis=1)


def point_table(level_lengths: Sequence, strides: Sequence[int],
                regression_range: Sequence[Tuple[float, float]]) -> tf.Tensor:
  """Points of all levels, concatenated in level order.

  Args:
    level_lengths: T_l per level (ints or scalar int tensors).
    strides: s_l per level.
    regression_range: (lo, hi) per level, base-grid units.

  Returns:
    float32 [N, 4] with N = sum_l T_l: (t, reg_lo, reg_hi, stride).
  """
  if not len(level_lengths) == len(strides) == len(regression_range):
    raise ValueError(f"point_table got {len(level_lengths)} level lengths, {len(strides)} "
                     f"strides and {len(regression_range)} regression ranges; give one per "
                     "pyramid level")
  return tf.concat([level_points(n, s, r)
                    for n, s, r in zip(level_lengths, strides, regression_range)], axis=0)


def point_table_for_length(seq_len, strides: Sequence[int],
                           regression_range: Sequence[Tuple[float, float]]) -> tf.Tensor:
  """Points for an input of `seq_len` base-grid frames (T_l = ceil(seq_len / s_l)).

  Returns:
    float32 [N, 4] as `point_table`.
  """
  return point_table([(seq_len + s - 1) // s for s in strides], strides, regression_range)
