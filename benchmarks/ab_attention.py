"""In-process A/B of the local attention's key blocks: `tf.signal.frame`, slices + concat, gather.

Until 4174c07 `MaskedSelfAttention._local_attention` cut each query block's keys out of the
padded keys with `tf.signal.frame` (window 2 * block, step block); 4174c07 joined the padded key
blocks n and n + 1 with two slices and a concat; cd47f13 gathers them (one `tf.gather`, the
layer as it is now). The same values in all three. This script keeps the two earlier forms
(`frame_local_attention`, below) to time the three forms of one layer in alternating rounds,
forward + backward, and counts each form's graph ops; the outputs and gradients are compared
first.

  python benchmarks/ab_attention.py                                   # THUMOS level 0
  python benchmarks/ab_attention.py --seq_len=768 --dim=128 --window=9  # bench config
  python benchmarks/ab_attention.py --quick      # dim 16, T 96 unless given, 2 rounds x 2 calls
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # pylint: disable=g-import-not-at-top,wrong-import-position


def _frame(x, span, block, axis):
  """Before 4174c07: windows of `span` with step `block` along `axis`."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return tf.signal.frame(x, span, block, axis=axis)


def _slices_concat(x, span, block, axis):
  """4174c07: blocks n and n + 1 joined by two slices and a concat (span == 2 * block)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  shape = tf.shape(x)
  blocks = tf.reshape(x, tf.concat([shape[:axis], [shape[axis] // block, block],
                                    shape[axis + 1:]], 0))
  lead = (slice(None),) * axis
  pairs = tf.concat([blocks[lead + (slice(None, -1),)], blocks[lead + (slice(1, None),)]],
                    axis=axis + 1)
  pairs_shape = tf.shape(pairs)
  return tf.reshape(pairs, tf.concat([pairs_shape[:axis], [pairs_shape[axis], span],
                                      pairs_shape[axis + 2:]], 0))


def frame_local_attention(layer, q, k, v, mask, windows=_frame):
  """The local attention with an earlier form of its key blocks (`windows`: `_frame`, before
  4174c07, or `_slices_concat`, 4174c07).

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
  k = windows(tf.pad(k, key_pad), span, block, 2)  # [B, H, N, S, D]
  v = windows(tf.pad(v, key_pad), span, block, 2)
  key_valid = windows(tf.pad(mask, [[0, 0], [h, tail + h]]), span, block, 1)  # [B, N, S]
  positions = tf.signal.frame(tf.range(-h, num_blocks * block + h), span, block)  # [N, S]
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
  run = common.run_start()  # before anything is built or timed
  if args.seq_len is None:
    args.seq_len = 96 if args.quick else 2304
  if args.quick:
    args.dim, args.repeats, args.steps = 16, 2, 2

  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from asl_tf.modeling import attention  # pylint: disable=g-import-not-at-top

  tf.keras.utils.set_random_seed(0)
  x = tf.random.normal([args.batch, args.seq_len, args.dim])
  lengths = [args.seq_len, args.seq_len * 3 // 4][:args.batch]
  mask = tf.sequence_mask(lengths + [args.seq_len] * (args.batch - len(lengths)), args.seq_len)
  forms = {}
  earlier = {"frame": _frame, "slices_concat": _slices_concat}
  for name in ("frame", "slices_concat", "gather"):
    layer = attention.MaskedSelfAttention(args.dim, args.heads, args.window, name=name)
    layer(x, mask)
    if forms:
      layer.set_weights(next(iter(forms.values()))[0].get_weights())
    if name in earlier:
      layer._local_attention = (  # pylint: disable=protected-access
          lambda q, k, v, m, layer=layer, w=earlier[name]: frame_local_attention(
              layer, q, k, v, m, w))

    @tf.function
    def step(x, mask, layer=layer):
      with tf.GradientTape() as tape:
        tape.watch(x)
        y, _ = layer(x, mask)
        loss = tf.reduce_sum(y * y)
      return y, tape.gradient(loss, [x] + layer.trainable_variables)

    ops = len(step.get_concrete_function(x, mask).graph.get_operations())
    forms[name] = (layer, step, ops)
  outputs = [step(x, mask) for _, step, _ in forms.values()]
  (y_a, g_a) = outputs[0]
  max_diff = max(float(tf.reduce_max(tf.abs(a - b))) for y_b, g_b in outputs[1:]
                 for a, b in zip([y_a] + g_a, [y_b] + g_b))

  times = {name: [] for name in forms}
  for round_index in range(args.repeats + 1):  # round 0: warm-up
    for name, (_, step, _) in forms.items():
      start = time.perf_counter()
      for _ in range(args.steps):
        y, _ = step(x, mask)
      y.numpy()
      if round_index:
        times[name].append((time.perf_counter() - start) / args.steps)
  results = {name: {"graph_ops": forms[name][2], **timed} for name, timed in
             common.ab_results(times, "frame", "median_sec", "rounds_sec", digits=6).items()}
  common.emit({"benchmark": "ab_attention", "command": " ".join(["python"] + sys.argv),
               "run": run,
               "shape": {"batch": args.batch, "seq_len": args.seq_len, "dim": args.dim,
                         "heads": args.heads, "window": args.window},
               "max_abs_difference": max_diff, "machine": common.machine_info(),
               "results": results}, args.output)


if __name__ == "__main__":
  main()
