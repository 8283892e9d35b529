"""Inference time and peak memory of ASLDetector versus sequence length; prints JSON.

Each length runs in a fresh subprocess: the model is built and traced on a short input, the
resident-set high-water mark (VmHWM in /proc/self/status) is read as the baseline, then one
forward pass at length T is timed (after a warm-up pass) and VmHWM is read again. The reported
`peak_delta_mb` is the memory the forward pass at T needed on top of the built model; a least
squares line through (T, peak_delta_mb) gives the slope per 1000 frames. Linear growth shows as
a near-constant `delta_per_1k_frames_mb` and a fit residual that is small relative to the peak.

Usage:
  python benchmarks/model_memory.py            # THUMOS config, T = 2304 ... 36864
  python benchmarks/model_memory.py --quick    # tiny model and lengths (seconds)
"""

import argparse
import json
import os
import subprocess
import sys

THUMOS = dict(input_dim=2048, embd_dim=512, fpn_dim=512, head_dim=512, n_head=4,
              mha_win_size=(19,), num_classes=20, max_seq_len=2304)
QUICK = dict(input_dim=64, embd_dim=32, fpn_dim=32, head_dim=32, n_head=4, mha_win_size=(19,),
             num_classes=5, max_seq_len=576)
FULL_LENGTHS = (2304, 4608, 9216, 18432, 36864)
QUICK_LENGTHS = (576, 1152, 2304)


def _vm_hwm_mb():
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmHWM:"):
        return int(line.split()[1]) / 1024.0
  raise RuntimeError("VmHWM not found in /proc/self/status (Linux only)")


def _measure(model_kwargs, seq_len, batch_size):
  """Runs in the child process: returns one result row."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  import time  # pylint: disable=g-import-not-at-top

  import numpy as np  # pylint: disable=g-import-not-at-top

  # Beside this script; sets oneDNN's flag as the command-line tools do.
  import common  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  from asl_tf import config as config_lib  # pylint: disable=g-import-not-at-top
  from asl_tf.modeling import detector as detector_lib  # pylint: disable=g-import-not-at-top

  model_config = config_lib.ModelConfig(**model_kwargs)
  detector = detector_lib.ASLDetector(model_config)
  small = model_config.max_div_factor
  # Weights created eagerly, as the command-line tools create them: created inside the traced
  # function, each weight's initialisation is traced as a conditional and the function traced
  # twice (29 s of tracing against 2.5 s for the --quick model, measured beside other work).
  detector.build_for_length(small, batch_size)
  forward = common.forward_function(detector, model_config.input_dim, mask_dtype="bool")
  forward(tf.zeros([batch_size, small, model_config.input_dim]), tf.ones([batch_size, small],
                                                                          tf.bool))
  baseline = _vm_hwm_mb()
  features = tf.constant(np.random.default_rng(0).normal(
      size=(batch_size, seq_len, model_config.input_dim)).astype(np.float32))
  mask = tf.ones([batch_size, seq_len], tf.bool)
  forward(features, mask)["cls_logits"].numpy()
  start = time.perf_counter()
  forward(features, mask)["cls_logits"].numpy()
  seconds = time.perf_counter() - start
  peak = _vm_hwm_mb()
  return {"seq_len": seq_len, "batch_size": batch_size, "seconds": round(seconds, 3),
          "baseline_mb": round(baseline, 1), "peak_mb": round(peak, 1),
          "peak_delta_mb": round(peak - baseline, 1)}


def _fit(rows):
  xs = [r["seq_len"] / 1000.0 for r in rows]
  ys = [r["peak_delta_mb"] for r in rows]
  n = len(xs)
  mx, my = sum(xs) / n, sum(ys) / n
  sxx = sum((x - mx) ** 2 for x in xs)
  slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0
  intercept = my - slope * mx
  residual = max(abs(y - (intercept + slope * x)) for x, y in zip(xs, ys))
  return {"slope_mb_per_1k_frames": round(slope, 2), "intercept_mb": round(intercept, 1),
          "max_abs_residual_mb": round(residual, 1)}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="tiny model and lengths")
  parser.add_argument("--lengths", type=str, default="",
                      help="comma-separated lengths (multiples of max_div_factor)")
  parser.add_argument("--batch_size", type=int, default=1)
  parser.add_argument("--_child", type=str, default="", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args._child:  # pylint: disable=protected-access
    spec = json.loads(args._child)  # pylint: disable=protected-access
    print(json.dumps(_measure(spec["model"], spec["seq_len"], spec["batch_size"])))
    return
  model = QUICK if args.quick else THUMOS
  lengths = ([int(t) for t in args.lengths.split(",")] if args.lengths
             else (QUICK_LENGTHS if args.quick else FULL_LENGTHS))
  rows = []
  for seq_len in lengths:
    spec = json.dumps({"model": model, "seq_len": seq_len, "batch_size": args.batch_size})
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--_child", spec],
                          capture_output=True, text=True, check=False)
    if proc.returncode:
      raise SystemExit(f"length {seq_len} failed:\n{proc.stderr[-3000:]}")
    rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
  for row in rows:
    row["delta_per_1k_frames_mb"] = round(row["peak_delta_mb"] / (row["seq_len"] / 1000.0), 2)
  print(json.dumps({"benchmark": "model_memory", "config": "quick" if args.quick else "thumos",
                    "model": model, "results": rows, "linear_fit": _fit(rows)}, indent=2))


if __name__ == "__main__":
  main()
