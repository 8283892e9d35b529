"""Where a training step's or the inference forward's time goes: a profile, summed; prints JSON.

A TensorBoard profile of a few steps (or forward calls).

  python benchmarks/profile_step.py                                  # THUMOS config, ActionFormer
  python benchmarks/profile_step.py --config=bench --variant=asl     # bench config, ASL
  python benchmarks/profile_step.py --mixed_precision=mixed_bfloat16  # the bfloat16 step
  python benchmarks/profile_step.py --forward [--mixed_precision=mixed_bfloat16]  # inference
  python benchmarks/profile_step.py --quick                          # tiny model (seconds)

The step is built exactly as in `benchmarks/train_step.py` (same synthetic batch), warmed up,
timed, then `--steps` steps are recorded with `tf.profiler` into `--logdir` (open it in
TensorBoard with the `profile` extra). The durations of the TensorFlow op events in the trace are
summed per step by op type, by category (`gemm`: MatMul, BatchMatMul, Einsum, Conv2D, fused or
not, and their gradients, Eigen or oneDNN; `other`) and by model part (`forward backbone`,
`backward cls_head`, `optimizer`, ...). Op events sit on the executor threads, so two ops
running at once both count: `op_thread_sec` can exceed the wall time, and `gemm_thread_sec / 2`
on 2 cores is a floor for the step no scheduling can beat. `busy_sec` is the time per step
during which at least one op ran (the union of the op events' intervals); when it is close to
`profiled_wall_sec` (the profiled steps' wall time, per step), the executor was never idle.
`by_type_wall` splits that busy time among op types, each instant evenly among the ops running
then: a GEMM alone holds both cores and is charged all of its time, two ops at once half each.
(Op events also span waits for the shared thread pool, so a small op beside a GEMM can look
long in `by_type`; its wall share is the fairer figure.)

`--forward` profiles the inference forward instead (`model(x, mask, training=False)` in a
tf.function with a dynamic batch and length, as `benchmarks/inference.py` times it): one video
of `max_seq_len` random features, the layers in `--mixed_precision` (the flag
`--inference_precision`), the config's kernel policy. The forward is the same for every
`--variant` (the ASL parts act in training only), so the JSON's `variant` is null.
"""

from __future__ import annotations

import collections
import glob
import os
import re
import sys
import tempfile
import time
from typing import Dict

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # pylint: disable=g-import-not-at-top,wrong-import-position
import train_step  # pylint: disable=g-import-not-at-top,wrong-import-position

from asl_tf import config as config_lib  # pylint: disable=g-import-not-at-top,wrong-import-position

GEMM_OPS = frozenset({"MatMul", "BatchMatMulV2", "Conv2D", "Conv2DBackpropFilter",
                      "Conv2DBackpropInput", "_MklMatMul", "_MklNativeConv2D",
                      "_FusedMatMul", "_MklFusedMatMul", "_MklNativeFusedMatMul",
                      "_FusedConv2D", "_MklNativeFusedConv2D",
                      "_MklNativeConv2DBackpropFilter", "_MklNativeConv2DBackpropInput",
                      "_MklBatchMatMulV2", "_MklEinsum", "Einsum"})
# "scope/op_name:OpType": exactly one colon, no spaces (executor and function events differ).
_OP_EVENT = re.compile(r"^([^:\s]+):([A-Za-z_]\w*)$")
_MODEL_SCOPE = re.compile(r"^asl_detector(_\d+)?$")


def model_part(op_name: str) -> str:
  """`forward <layer>` / `backward <layer>` for ops under the detector, `optimizer`, `other`."""
  parts = op_name.split("/")
  backward = parts[0] == "gradient_tape"
  if backward:
    parts = parts[1:]
  if len(parts) > 1 and _MODEL_SCOPE.match(parts[0]):
    layer = re.sub(r"_\d+$", "", parts[1])
    return f"{'backward' if backward else 'forward'} {layer}"
  if parts[0].startswith("adam"):
    return "optimizer"
  return "other"


def wall_shares(events) -> Dict[str, float]:
  """{key: ps} of the busy wall time, each instant split evenly among the events running then.

  Args:
    events: (start_ps, end_ps, key) triples; zero-length events take no time.
  """
  changes = sorted([(start, 1, i) for i, (start, end, _) in enumerate(events) if end > start]
                   + [(end, -1, i) for i, (start, end, _) in enumerate(events) if end > start])
  shares: Dict[str, float] = collections.Counter()
  running, last = set(), None
  for time, change, i in changes:  # at equal times ends (-1) come before starts
    if running and time > last:
      for j in running:
        shares[events[j][2]] += (time - last) / len(running)
    last = time
    if change > 0:
      running.add(i)
    else:
      running.discard(i)
  return shares


def summarize_xspace(xspace, steps: int) -> Dict[str, object]:
  """Sums op event durations of a profiler `XSpace` proto, per step.

  Args:
    xspace: `tensorflow.tsl.profiler.protobuf.xplane_pb2.XSpace`.
    steps: how many steps the trace holds (the sums are divided by it).

  Returns:
    `op_thread_sec`, `gemm_thread_sec`, `gemm_share`, `busy_sec`, `gemm_wall_sec` and
    `by_type` / `by_type_wall` / `by_part` (seconds, largest first; `by_type` rows with their
    event count per step).
  """
  by_type: Dict[str, float] = collections.Counter()
  count: Dict[str, int] = collections.Counter()
  by_part: Dict[str, float] = collections.Counter()
  intervals = []  # (start, end) in ps
  for plane in xspace.planes:
    for line in plane.lines:
      for event in line.events:
        match = _OP_EVENT.match(plane.event_metadata[event.metadata_id].name)
        if not match:
          continue
        op_name, op_type = match.groups()
        start = line.timestamp_ns * 1000 + event.offset_ps
        intervals.append((start, start + event.duration_ps, op_type))
        sec = event.duration_ps * 1e-12 / steps
        by_type[op_type] += sec
        count[op_type] += 1
        by_part[model_part(op_name)] += sec
  total = sum(by_type.values())
  gemm = sum(v for k, v in by_type.items() if k in GEMM_OPS)
  busy, end = 0, None
  for start, stop, _ in sorted(intervals):
    if end is None or start > end:
      busy, end = busy + stop - start, stop
    elif stop > end:
      busy, end = busy + stop - end, stop
  wall = {k: v * 1e-12 / steps for k, v in wall_shares(intervals).items()}
  return {
      "op_thread_sec": total, "gemm_thread_sec": gemm,
      "gemm_share": gemm / total if total else 0.0, "busy_sec": busy * 1e-12 / steps,
      "gemm_wall_sec": sum(v for k, v in wall.items() if k in GEMM_OPS),
      "by_type": [{"op": k, "sec": v, "events": count[k] // steps}
                  for k, v in sorted(by_type.items(), key=lambda kv: -kv[1])],
      "by_type_wall": [{"op": k, "wall_sec": v}
                       for k, v in sorted(wall.items(), key=lambda kv: -kv[1])],
      "by_part": [{"part": k, "sec": v}
                  for k, v in sorted(by_part.items(), key=lambda kv: -kv[1])],
  }


def _forward(config_name, quick, variant, precision):
  """(config, run): the inference forward of one video of `max_seq_len` random features."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from asl_tf import inference  # pylint: disable=g-import-not-at-top
  config = train_step._config(  # pylint: disable=protected-access
      config_name, quick,
      train_step.VARIANT_FLAGS[variant] + (f"--inference_precision={precision}",))
  model = inference.build_detector(config)
  raw = np.random.default_rng(0).normal(
      size=[config.model.max_seq_len, config.model.input_dim]).astype(np.float32)
  feats, mask = inference.features_for_inference(raw, config.data.max_seq_len,
                                                 config.model.max_div_factor)
  feats, mask = tf.constant(feats), tf.constant(mask)
  forward = common.forward_function(model, config.model.input_dim)
  return config, lambda: forward(feats, mask)["cls_logits"].numpy()


def main():
  parser = common.benchmark_parser(__doc__.splitlines()[0], default_repeats=5)
  parser.add_argument("--config", default="thumos_i3d", help="flagfile name in configs/")
  parser.add_argument("--variant", default="actionformer", choices=sorted(train_step.VARIANT_FLAGS))
  parser.add_argument("--mixed_precision", default="float32",
                      choices=config_lib.MIXED_PRECISION_POLICIES,
                      help="the Keras dtype policy of the profiled step")
  parser.add_argument("--steps", type=int, default=3, help="profiled steps")
  parser.add_argument("--logdir", default="", help="profile folder (default: a temporary one)")
  parser.add_argument("--top", type=int, default=25, help="op types / parts kept in the JSON")
  parser.add_argument("--forward", action="store_true",
                      help="profile the inference forward of one video instead of a training step")
  args = parser.parse_args()
  run_info = common.run_start()  # before anything is built or profiled
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from tensorflow.tsl.profiler.protobuf import xplane_pb2  # pylint: disable=g-import-not-at-top
  if args.forward:
    config, run = _forward(args.config, args.quick, args.variant, args.mixed_precision)
  else:
    setup = train_step.build_step(
        args.config, args.quick, False,
        train_step.VARIANT_FLAGS[args.variant] + (f"--mixed_precision={args.mixed_precision}",))
    config, run = setup.config, setup.run
  timing = common.time_repeated(run, repeats=2 if args.quick else args.repeats, warmup=2)
  logdir = args.logdir or tempfile.mkdtemp(prefix="asl_profile_")
  tf.profiler.experimental.start(logdir)
  start = time.perf_counter()
  for _ in range(args.steps):
    run()
  profiled_wall_sec = (time.perf_counter() - start) / args.steps
  tf.profiler.experimental.stop()
  paths = sorted(glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True))
  if not paths:
    raise SystemExit(f"tf.profiler wrote no *.xplane.pb under {logdir}")
  path = paths[-1]
  xspace = xplane_pb2.XSpace()
  with open(path, "rb") as f:
    xspace.ParseFromString(f.read())
  summary = summarize_xspace(xspace, args.steps)
  summary["profiled_wall_sec"] = profiled_wall_sec
  summary["by_type"] = summary["by_type"][:args.top]
  summary["by_type_wall"] = summary["by_type_wall"][:args.top]
  summary["by_part"] = summary["by_part"][:args.top]
  common.emit({"benchmark": "profile_step", "command": " ".join(["python"] + sys.argv),
               "run": run_info, "config": args.config,
               "variant": None if args.forward else args.variant,
               "what": "inference forward, one video" if args.forward else "training step",
               "mixed_precision": args.mixed_precision,
               "seq_len": config.model.max_seq_len, "step": timing, "profile": summary,
               "trace": path, "machine": common.machine_info()}, args.output)


if __name__ == "__main__":
  main()
