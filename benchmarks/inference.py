"""Per-video latency of checkpoint-style inference (forward + post-processing); prints JSON.

  python benchmarks/inference.py                  # THUMOS config at T = 2304 and 9216
  python benchmarks/inference.py --config=bench   # the config the PyTorch reference was timed in
  python benchmarks/inference.py --quick          # tiny model, seconds
  python benchmarks/inference.py --precision=mixed_bfloat16   # bfloat16 layers, float32 outputs

The model is built from a flagfile (`build_detector`, random weights: the cost does not depend
on the values, and the classification prior puts every point above `pre_nms_thresh`, so
`pre_nms_topk` candidates reach Soft-NMS as in a real evaluation). One video of T random
features is padded as evaluation pads it (`features_for_inference`) and run through
`detect_function(model)` (the tf.function `evaluate` and `infer` use); the forward pass alone
runs through the same kind of tf.function. Both are timed after warm-up calls, alternating
call by call so that both see the same machine load; the post-processing time is the median of
the paired differences and its share is that over the median of forward + post-processing.
`cpu_sec_per_video` (process CPU time of one forward + post-processing call, all threads) is
less sensitive to other processes on a shared machine than the wall times.
"""

from __future__ import annotations

import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # pylint: disable=g-import-not-at-top,wrong-import-position

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {
    # name: (flagfile, lengths, target sec / video at the first length, reference sec / video)
    "thumos": ("configs/thumos_i3d.flags", (2304, 9216), 0.53, 0.75),
    "bench": ("configs/bench.flags", (768,), 0.05, 0.071),
    "quick": ("configs/demo.flags", (256,), None, None),
}
REFERENCE_NOTE = ("public PyTorch ActionFormer on this machine kind (issue 8); forward + NMS")


def _config(name: str, precision: str = "float32"):
  from asl_tf import flags as asl_flags  # pylint: disable=g-import-not-at-top
  flagfile = os.path.join(_REPO_ROOT, CONFIGS[name][0])
  asl_flags.parse_argv(["inference_benchmark", f"--flagfile={flagfile}",
                        f"--inference_precision={precision}"])
  return asl_flags.build_config()


def float32_targets(name: str, precision: str):
  """(target, PyTorch reference) seconds per video of config `name`: float32 figures, so
  (None, None) for another precision."""
  if precision != "float32":
    return None, None
  return CONFIGS[name][2], CONFIGS[name][3]


def _stats(times, warmup):
  t = np.asarray(times)
  return {"median_sec": float(np.median(t)), "mean_sec": float(t.mean()),
          "min_sec": float(t.min()), "max_sec": float(t.max()),
          "p95_sec": float(np.percentile(t, 95)), "repeats": len(t), "warmup": warmup}


def _interleaved(run_total, run_forward, repeats, warmup):
  """Alternates the two workloads so that both see the same machine load.

  Returns:
    (total stats, forward stats, median of the paired differences total - forward in seconds,
    median process CPU seconds of one total call), stats as `common.time_repeated` reports
    them. CPU time (all threads) is less sensitive to other processes than wall time.
  """
  for _ in range(warmup):
    run_total()
    run_forward()
  totals, forwards, cpu = [], [], []
  for _ in range(repeats):
    for fn, times in ((run_total, totals), (run_forward, forwards)):
      start, start_cpu = time.perf_counter(), time.process_time()
      fn()
      times.append(time.perf_counter() - start)
      if fn is run_total:
        cpu.append(time.process_time() - start_cpu)
  post = float(np.median(np.asarray(totals) - np.asarray(forwards)))
  return _stats(totals, warmup), _stats(forwards, warmup), post, float(np.median(cpu))


def measure(name: str, repeats: int, warmup: int = 2, lengths=None,
            precision: str = "float32") -> dict:
  """Times forward and forward + post-processing of one video per length of config `name`,
  the layers computing in `precision` (a Keras dtype policy; outputs stay float32)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from asl_tf import inference  # pylint: disable=g-import-not-at-top

  config = _config(name, precision)
  mc, ec, dc = config.model, config.eval, config.data
  model = inference.build_detector(config)
  detect = inference.detect_function(model)
  forward = common.forward_function(model, mc.input_dim)
  flagfile, default_lengths, _, _ = CONFIGS[name]
  target, reference = float32_targets(name, precision)
  lengths = lengths or default_lengths
  rows = []
  for length in lengths:
    rng = np.random.default_rng(length)
    raw = rng.normal(size=[length, mc.input_dim]).astype(np.float32)
    feats, mask = inference.features_for_inference(raw, dc.max_seq_len, mc.max_div_factor)
    feats, mask = tf.constant(feats), tf.constant(mask)
    duration = ((length - 1) * dc.feat_stride + dc.num_frames) / dc.default_fps
    meta = [tf.constant([v], tf.float32)
            for v in (dc.default_fps, duration, dc.feat_stride, dc.num_frames)]

    def run_detect(f=feats, m=mask, meta=meta):
      return detect(f, m, *meta)["num_detections"].numpy()

    def run_forward(f=feats, m=mask):
      return forward(f, m)["cls_logits"].numpy()

    load_before = os.getloadavg()[0]
    total, fwd, post, cpu = _interleaved(run_detect, run_forward, repeats, warmup)
    num_det = int(run_detect()[0])
    rows.append({
        "num_frames": length, "padded_length": int(feats.shape[1]),
        "forward_plus_postprocess": total, "forward_only": fwd,
        "postprocess_median_sec": post,
        "cpu_sec_per_video": cpu,
        "postprocess_share": round(post / total["median_sec"], 3),
        "num_detections": num_det,
        "load_avg_1min_before_after": [load_before, os.getloadavg()[0]],
    })
  return {
      "config": name, "flagfile": flagfile, "precision": precision,
      "model": {"input_dim": mc.input_dim, "embd_dim": mc.embd_dim, "fpn_dim": mc.fpn_dim,
                "head_dim": mc.head_dim, "mha_win_size": list(mc.mha_win_size),
                "num_classes": mc.num_classes, "max_seq_len": dc.max_seq_len},
      "eval": {"pre_nms_topk": ec.pre_nms_topk, "max_seg_num": ec.max_seg_num,
               "multiclass_nms": ec.multiclass_nms, "nms_method": ec.nms_method},
      "weights": "random", "batch": 1, "lengths": rows,
      "target_sec": target, "reference_sec": reference,
      "reference": REFERENCE_NOTE if reference else None,
      "meets_target": (rows[0]["forward_plus_postprocess"]["median_sec"] <= target
                       if target and rows[0]["num_frames"] == default_lengths[0] else None),
  }


def main():
  parser = common.benchmark_parser(__doc__.splitlines()[0], default_repeats=10)
  parser.add_argument("--config", default="", help=f"one of {sorted(CONFIGS)}; default thumos "
                      "(quick with --quick)")
  parser.add_argument("--lengths", default="", help="comma-separated T (default per config)")
  parser.add_argument("--precision", default="float32", choices=("float32", "mixed_bfloat16"),
                      help="--inference_precision of the detector")
  args = parser.parse_args()
  name = args.config or ("quick" if args.quick else "thumos")
  if name not in CONFIGS:
    parser.error(f"--config must be one of {sorted(CONFIGS)}")
  repeats = min(args.repeats, 3) if args.quick else args.repeats
  result = {"benchmark": "inference", "machine": common.machine_info()}
  lengths = tuple(int(t) for t in args.lengths.split(",") if t) or None
  result.update(measure(name, repeats, warmup=1 if args.quick else 2, lengths=lengths,
                        precision=args.precision))
  common.emit(result, args.output)


if __name__ == "__main__":
  main()
