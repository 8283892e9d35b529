"""In-process A/B of the local attention's key blocks: `tf.signal.frame` against a block gather.

Until 4174c07 `MaskedSelfAttention._local_attention` cut each query block's keys out of the
padded keys with `tf.signal.frame` (window 2 * block, step block); it now gathers the padded key
blocks n and n + 1 for each n (one `tf.gather`), the same values. (4174c07 itself joined them
with two slices and a concat: fewer ops, but 1.4x slower at THUMOS size by this script, and
replaced.) This script keeps the `frame` form (`frame_local_attention`, below) to time both
forms of one layer in alternating rounds, forward + backward, and counts each form's graph ops;
the outputs and gradients are compared first.

  python benchmarks/ab_attention.py                                   # THUMOS level 0
  python benchmarks/ab_attention.py --seq_len=768 --dim=128 --window=9  # bench config
  python benchmarks/ab_attention.py --quick      # dim 16, T 96 unless given, 2 rounds x 2 calls
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # pylint: disable=g-import-not-at-top,wrong-import-position


def frame_local_attention(layer, q, k, v, mask):
  """The local attention as it was before 4174c07 (`tf.signal.frame` for the key blocks).

  q, k, v [B, H, T, D], mask bool [B, T] -> [B, H, T, D], as `layer._local_attention`.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from asl_tf.modeling import attention  # pylint: disable=g-import-not-at-top
  h = layer.half_window
  block = 2 * h
  span = block + 2 * h
  b, t = tf.shape(q)[0], tf.shape(q)[2]
  num_blocks = (t + block - 1) // block
  tail = num_blocks * block - t
  q = tf.pad(q, [[0, 0], [0, 0], [0, tail], [0, 0]])
  q = tf.reshape(q, [b, layer.num_heads, num_blocks, block, layer.head_dim])
  key_pad = [[0, 0], [0, 0], [h, tail + h], [0, 0]]
  k = tf.signal.frame(tf.pad(k, key_pad), span, block, axis=2)
  v = tf.signal.frame(tf.pad(v, key_pad), span, block, axis=2)
  key_valid = tf.signal.frame(tf.pad(mask, [[0, 0], [h, tail + h]]), span, block, axis=1)
  positions = tf.signal.frame(tf.range(-h, num_blocks * block + h), span, block)
  in_sequence = (positions >= 0) & (positions < t)
  offsets = tf.range(span)[None, :] - tf.range(block)[:, None]
  in_band = (offsets >= 0) & (offsets <= 2 * h)
  allowed = in_band[None, None] & in_sequence[None, :, None, :]
  bias = tf.where(allowed, tf.where(key_valid[:, :, None, :], 0.0, attention.PADDED_KEY_BIAS),
                  attention.EXCLUDED_KEY_BIAS)
  scores = tf.cast(tf.einsum("bhnld,bhnsd->bhnls", q, k), tf.float32)
  probs = tf.cast(tf.nn.softmax(scores + bias[:, None], axis=-1), v.dtype)
  out = tf.einsum("bhnls,bhnsd->bhnld", probs, v)
  out = tf.reshape(out, [b, layer.num_heads, num_blocks * block, layer.head_dim])
  return out[:, :, :t]


def main():
  parser = common.benchmark_parser(__doc__.splitlines()[0], default_repeats=10)
  parser.add_argument("--seq_len", type=int, default=None, help="frames (2304; 96 with --quick)")
  parser.add_argument("--dim", type=int, default=512)
  parser.add_argument("--heads", type=int, default=4)
  parser.add_argument("--window", type=int, default=19)
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--steps", type=int, default=10, help="calls per form and round")
  args = parser.parse_args()
  if args.seq_len is None:
    args.seq_len = 96 if args.quick else 2304
  if args.quick:
    args.dim, args.repeats, args.steps = 16, 2, 2

  import numpy as np  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from asl_tf.modeling import attention  # pylint: disable=g-import-not-at-top

  tf.keras.utils.set_random_seed(0)
  x = tf.random.normal([args.batch, args.seq_len, args.dim])
  lengths = [args.seq_len, args.seq_len * 3 // 4][:args.batch]
  mask = tf.sequence_mask(lengths + [args.seq_len] * (args.batch - len(lengths)), args.seq_len)
  forms = {}
  for name in ("frame", "block_pairs"):
    layer = attention.MaskedSelfAttention(args.dim, args.heads, args.window, name=name)
    layer(x, mask)
    if forms:
      layer.set_weights(next(iter(forms.values()))[0].get_weights())
    if name == "frame":
      layer._local_attention = (  # pylint: disable=protected-access
          lambda q, k, v, m, layer=layer: frame_local_attention(layer, q, k, v, m))

    @tf.function
    def step(x, mask, layer=layer):
      with tf.GradientTape() as tape:
        tape.watch(x)
        y, _ = layer(x, mask)
        loss = tf.reduce_sum(y * y)
      return y, tape.gradient(loss, [x] + layer.trainable_variables)

    ops = len(step.get_concrete_function(x, mask).graph.get_operations())
    forms[name] = (layer, step, ops)
  outputs = {name: step(x, mask) for name, (_, step, _) in forms.items()}
  (y_a, g_a), (y_b, g_b) = outputs.values()
  max_diff = max(float(tf.reduce_max(tf.abs(a - b))) for a, b in zip([y_a] + g_a, [y_b] + g_b))

  times = {name: [] for name in forms}
  for round_index in range(args.repeats + 1):  # round 0: warm-up
    for name, (_, step, _) in forms.items():
      start = time.perf_counter()
      for _ in range(args.steps):
        y, _ = step(x, mask)
      y.numpy()
      if round_index:
        times[name].append((time.perf_counter() - start) / args.steps)
  results = {name: {"graph_ops": forms[name][2], "median_sec": round(float(np.median(t)), 6),
                    "ratio_to_frame": round(float(np.median(t) / np.median(times["frame"])), 3),
                    "rounds_sec": [round(v, 6) for v in t]}
             for name, t in times.items()}
  common.emit({"benchmark": "ab_attention", "command": " ".join(["python"] + sys.argv),
               "shape": {"batch": args.batch, "seq_len": args.seq_len, "dim": args.dim,
                         "heads": args.heads, "window": args.window},
               "max_abs_difference": max_diff, "machine": common.machine_info(),
               "results": results}, args.output)


if __name__ == "__main__":
  main()
