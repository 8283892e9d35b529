"""asl_tf against the public PyTorch ActionFormer, same inputs, alternating rounds; JSON.

  python benchmarks/side_by_side_pytorch.py --actionformer_dir=DIR --torch_python=PY \\
      --rounds=5 --output=benchmarks/results/side_by_side_pytorch_thumos_<host>.json

DIR is a checkout of the public ActionFormer (github.com/happyharrycn/actionformer_release) with
its NMS extension built in place (`cd DIR/libs/utils && PY setup.py build_ext --inplace`); PY is
a Python with torch, numpy and pyyaml. Neither is part of this repository or its dependencies.

Two long-lived workers, one per framework, each free to use every core, never running at the
same time: each round asks them in turn (the order alternates between rounds) for `--calls`
training steps and then `--calls` inference calls, and records their medians; the summary gives
per-round ratios asl_tf / PyTorch and their median. Workers warm up with `--warmup` calls of
each.

Both sides run the same workload in the THUMOS14 I3D geometry both projects ship
(`configs/thumos_i3d.flags`: 2048 channels, 20 classes, stride 4, windows of 19, up to 2304
features): the ActionFormer model (every ASL part off on our side), training on one fixed batch
of two videos (2304 and 1800 features, four random segments each) with AdamW, its schedule,
gradient clipping at 1.0 and the EMA update; inference on one 2304-feature video, NMS included,
with the untrained random weights on both sides. The PyTorch side is seeded and set up as its
training script does (deterministic algorithms on, as that script sets them), and pads its
batch inside the timed step, as its model does; ours is padded before, as our input pipeline
does. `--precision=bfloat16` runs PyTorch's forward (losses included) under CPU autocast to
bfloat16 and asl_tf under `--mixed_precision` / `--inference_precision=mixed_bfloat16`: each
framework's own way to ask for bfloat16. Under autocast PyTorch runs its convolutions and
matmuls in bfloat16; ActionFormer's mask products bring activations and logits back to float32,
so its scores and NMS run in float32, as ours do. Each worker reports, once built, the precision
it runs in (PyTorch: the dtype autocast is set to inside its context; asl_tf: the built
detectors' Keras policies), and the driver stops before any timed round if that is not the one
asked for.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

_HERE = os.path.dirname(os.path.abspath(__file__))
_REPO = os.path.dirname(_HERE)
_REPLY = "@@side_by_side "  # prefix of a worker's reply line; other output is logging
TRAIN_LENGTHS, INFER_LENGTH, NUM_SEGMENTS = (2304, 1800), 2304, 4
# The THUMOS14 I3D geometry of both projects' configs (asserted against ours by the worker).
INPUT_DIM, NUM_CLASSES, FPS, FEAT_STRIDE, NUM_FRAMES = 2048, 20, 30.0, 4, 16
# --precision: asl_tf's Keras policy for training and inference (PyTorch: autocast or not).
_KERAS_POLICY = {"float32": "float32", "bfloat16": "mixed_bfloat16"}


def synthetic_videos():
  """The shared workload: `(train, infer)`; train is two (features [T, C], segments [N, 2] in
  feature steps, labels [N]), infer one features [T, C]."""
  rng = np.random.default_rng(0)
  train = []
  for length in TRAIN_LENGTHS:
    starts = rng.uniform(0, length * 0.8, NUM_SEGMENTS)
    ends = np.minimum(length - 1, starts + rng.uniform(2, length * 0.2, NUM_SEGMENTS))
    train.append((rng.normal(size=[length, INPUT_DIM]).astype(np.float32),
                  np.stack([starts, ends], -1).astype(np.float32),
                  rng.integers(NUM_CLASSES, size=NUM_SEGMENTS)))
  return train, rng.normal(size=[INFER_LENGTH, INPUT_DIM]).astype(np.float32)


def _duration_sec(length: int) -> float:
  return ((length - 1) * FEAT_STRIDE + NUM_FRAMES) / FPS


def padded_batch(train, seq_len: int, max_segments: int) -> dict:
  """asl_tf's training batch of `train`: features [B, seq_len, C], padding_mask [B, seq_len],
  gt_segments [B, max_segments, 2] (feature steps), gt_labels [B, max_segments] (-1 = none)."""
  features = np.zeros([len(train), seq_len, INPUT_DIM], np.float32)
  mask = np.zeros([len(train), seq_len], np.float32)
  segments = np.zeros([len(train), max_segments, 2], np.float32)
  labels = np.full([len(train), max_segments], -1, np.int32)
  for b, (f, s, l) in enumerate(train):
    features[b, :len(f)], mask[b, :len(f)] = f, 1.0
    segments[b, :len(s)], labels[b, :len(l)] = s, l
  return {"features": features, "padding_mask": mask, "gt_segments": segments,
          "gt_labels": labels}


def actionformer_video(index: int, features, segments=None, labels=None) -> dict:
  """A video as the PyTorch ActionFormer's data loader hands it over, in numpy: feats [C, T],
  segments [N, 2] (feature steps), labels [N] int64, and its timing fields."""
  return {"video_id": f"v{index}", "feats": np.ascontiguousarray(features.T),
          "segments": segments, "labels": None if labels is None else labels.astype(np.int64),
          "fps": FPS, "duration": _duration_sec(len(features)), "feat_stride": FEAT_STRIDE,
          "feat_num_frames": NUM_FRAMES}


class TorchSide:
  """The public ActionFormer, set up as its training script sets it up (without DataParallel:
  this is a CPU)."""

  def __init__(self, actionformer_dir: str, precision: str):
    import copy  # pylint: disable=g-import-not-at-top
    import torch  # pylint: disable=g-import-not-at-top
    sys.path.insert(0, actionformer_dir)
    sys.path.insert(0, os.path.join(actionformer_dir, "libs", "utils"))  # nms_1d_cpu
    from libs.core import load_config  # pylint: disable=g-import-not-at-top
    from libs.modeling import make_meta_arch  # pylint: disable=g-import-not-at-top
    # pylint: disable-next=g-import-not-at-top
    from libs.utils import fix_random_seed, make_optimizer, make_scheduler, ModelEma
    self.torch = torch
    # bfloat16 as PyTorch users ask for it: autocast around the forward (losses included, as
    # ActionFormer computes them inside it; at inference its NMS too); backward, optimizer and
    # EMA outside.
    self.autocast = ((lambda: torch.autocast("cpu", dtype=torch.bfloat16))
                     if precision == "bfloat16" else contextlib.nullcontext)
    cfg = load_config(os.path.join(actionformer_dir, "configs", "thumos_i3d.yaml"))
    fix_random_seed(cfg["init_rand_seed"], include_cuda=True)
    self.model = make_meta_arch(cfg["model_name"], **cfg["model"])
    self.infer_model = copy.deepcopy(self.model).eval()  # untrained, like ours
    self.optimizer = make_optimizer(self.model, cfg["opt"])
    self.scheduler = make_scheduler(self.optimizer, cfg["opt"], 100)
    self.ema = ModelEma(self.model)
    self.clip = cfg["train_cfg"]["clip_grad_l2norm"]
    train, infer = synthetic_videos()
    self.train_list = [self._tensors(actionformer_video(i, *v)) for i, v in enumerate(train)]
    self.infer_list = [self._tensors(actionformer_video(len(train), infer))]
    self.info = {"torch": torch.__version__, "num_threads": torch.get_num_threads(),
                 "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
                 "num_params": sum(p.numel() for p in self.model.parameters()),
                 "clip_grad_l2norm": self.clip,
                 "autocast": self._autocast_dtype()}

  def _autocast_dtype(self):
    """The dtype CPU autocast computes in inside `self.autocast()` (None: autocast off)."""
    with self.autocast():
      if not self.torch.is_autocast_enabled("cpu"):
        return None
      return str(self.torch.get_autocast_dtype("cpu")).replace("torch.", "")

  def _tensors(self, video: dict) -> dict:
    return {k: self.torch.from_numpy(v) if isinstance(v, np.ndarray) else v
            for k, v in video.items()}

  def train(self) -> float:
    """One training step; returns its loss."""
    self.model.train()
    self.optimizer.zero_grad(set_to_none=True)
    with self.autocast():
      losses = self.model(self.train_list)
    losses["final_loss"].backward()
    if self.clip > 0.0:
      self.torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
    self.optimizer.step()
    self.scheduler.step()
    self.ema.update(self.model)
    return float(losses["final_loss"].detach())

  def infer(self) -> int:
    """Detects on the inference video; returns the number of detections."""
    with self.torch.no_grad(), self.autocast():
      return int(len(self.infer_model(self.infer_list)[0]["segments"]))


def tensorflow_flags(precision: str) -> tuple:
  """asl_tf's flags for `--precision`: the ActionFormer model (every ASL part off), trained and
  run for inference in that precision's Keras policy."""
  sys.path.insert(0, _HERE)
  import train_step  # pylint: disable=g-import-not-at-top
  policy = _KERAS_POLICY[precision]
  return tuple(train_step.VARIANT_FLAGS["actionformer"]) + (
      f"--mixed_precision={policy}", f"--inference_precision={policy}")


class TensorFlowSide:
  """asl_tf's ActionFormer (every ASL part off): the training-step benchmark's step and the
  inference benchmark's detection function."""

  def __init__(self, precision: str):
    sys.path.insert(0, _HERE)
    import common  # pylint: disable=g-import-not-at-top,unused-import  # sets oneDNN first
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    import train_step  # pylint: disable=g-import-not-at-top
    from asl_tf import inference  # pylint: disable=g-import-not-at-top
    self.tf = tf
    setup = train_step.build_step("thumos_i3d", quick=False, jit_compile=False,
                                  extra_flags=tensorflow_flags(precision))
    config = setup.config
    train, infer = synthetic_videos()
    batch = padded_batch(train, config.model.max_seq_len, config.data.max_segments)
    setup.batch = {k: tf.constant(v) for k, v in batch.items()}
    self.setup = setup
    model = inference.build_detector(config)
    self.detect = inference.detect_function(model)
    feats, pad = inference.features_for_inference(infer, config.data.max_seq_len,
                                                  config.model.max_div_factor)
    self.infer_args = [tf.constant(feats), tf.constant(pad)] + [
        tf.constant([v], tf.float32)
        for v in (FPS, _duration_sec(len(infer)), FEAT_STRIDE, NUM_FRAMES)]
    assert (config.data.feat_stride, config.data.num_frames, config.model.input_dim,
            config.model.num_classes) == (FEAT_STRIDE, NUM_FRAMES, INPUT_DIM, NUM_CLASSES)
    self.info = {"tensorflow": tf.__version__, "kernel_policy": config.model.kernel_policy,
                 # The built detectors' Keras policies, not the flags: what the steps run in.
                 "mixed_precision": setup.model.dtype_policy.name,
                 "inference_precision": model.dtype_policy.name,
                 "clip_grad_norm": config.train.clip_grad_norm,
                 "ema_decay": config.train.ema_decay,
                 "num_params": int(sum(v.numpy().size
                                       for v in setup.model.trainable_variables))}

  def train(self) -> float:
    """One training step; returns its loss."""
    return float(self.setup.step(self.setup.batch, self.setup.epoch)["total_loss"])

  def infer(self) -> int:
    """Detects on the inference video; returns the number of detections."""
    return int(self.detect(*self.infer_args)["num_detections"].numpy()[0])


def check_precision(side: str, info: dict, precision: str) -> None:
  """Raises RuntimeError unless worker `side`'s `info` says it runs in `precision`: PyTorch's
  autocast dtype (None: off), asl_tf's training and inference Keras policies."""
  if side == "pt":
    want, got = ("bfloat16" if precision == "bfloat16" else None), info.get("autocast")
  else:
    want = (_KERAS_POLICY[precision],) * 2
    got = (info.get("mixed_precision"), info.get("inference_precision"))
  if got != want:
    name = "PyTorch's autocast" if side == "pt" else "asl_tf's training / inference policies"
    raise RuntimeError(f"--precision={precision} wants {name} {want}, the worker runs {got}")


def _timed(fn, calls: int) -> dict:
  """Calls `fn` `calls` times: wall and process CPU seconds of each call, the last output."""
  wall_sec, cpu_sec, out = [], [], None
  for _ in range(calls):
    start, start_cpu = time.perf_counter(), time.process_time()
    out = fn()
    wall_sec.append(time.perf_counter() - start)
    cpu_sec.append(time.process_time() - start_cpu)
  return {"wall_sec": wall_sec, "cpu_sec": cpu_sec, "out": out}


def worker(side: str, actionformer_dir: str, precision: str, warmup: int) -> None:
  """Serves `{"cmd": "train" | "infer", "calls": n}` lines on stdin until `quit`; replies on
  the original stdout, everything else printed goes to stderr."""
  replies = os.fdopen(os.dup(1), "w")
  os.dup2(2, 1)
  start = time.perf_counter()
  impl = TorchSide(actionformer_dir, precision) if side == "pt" else TensorFlowSide(precision)
  # Two replies: what was built (the driver checks its precision during the warm-up), then
  # the warm-up's times.
  replies.write(_REPLY + json.dumps({"side": side, "pid": os.getpid(), "info": impl.info,
                                     "setup_sec": time.perf_counter() - start}) + "\n")
  replies.flush()
  warmed = {"warmup": {"train": _timed(impl.train, warmup), "infer": _timed(impl.infer, warmup)}}
  replies.write(_REPLY + json.dumps(warmed) + "\n")
  replies.flush()
  calls = {"train": impl.train, "infer": impl.infer}
  for line in sys.stdin:
    request = json.loads(line)
    if request["cmd"] == "quit":
      return
    if request["cmd"] not in calls:
      raise ValueError(f"unknown command {request['cmd']!r}; expected train, infer or quit")
    replies.write(_REPLY + json.dumps(_timed(calls[request["cmd"]], request["calls"])) + "\n")
    replies.flush()


class Worker:
  """A worker process (`argv`), its stderr in `log_path`; `reply` reads its next reply."""

  def __init__(self, argv, log_path: str):
    self.log = open(log_path, "w")  # pylint: disable=consider-using-with
    self.proc = subprocess.Popen(  # pylint: disable=consider-using-with
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True,
        cwd=_REPO)

  def reply(self) -> dict:
    for line in self.proc.stdout:
      if line.startswith(_REPLY):
        return json.loads(line[len(_REPLY):])
    raise RuntimeError(f"worker exited with {self.proc.wait()}; see {self.log.name}")

  def ask(self, cmd: str, calls: int) -> dict:
    """Sends one request and returns its reply."""
    self.proc.stdin.write(json.dumps({"cmd": cmd, "calls": calls}) + "\n")
    self.proc.stdin.flush()
    return self.reply()

  def close(self):
    """Asks the worker to quit and waits for it."""
    self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
    self.proc.stdin.close()
    self.proc.wait()
    self.log.close()


def _spread(values):
  return {"median": float(np.median(values)), "min": float(min(values)),
          "max": float(max(values)), "values": values}


def round_ratios(record: dict) -> dict:
  """A round's ratios asl_tf / PyTorch of its medians: `ratio_<train|infer>_tf_over_pt`."""
  return {f"ratio_{cmd}_tf_over_pt": record[f"tf_{cmd}_median_sec"]
                                     / record[f"pt_{cmd}_median_sec"]
          for cmd in ("train", "infer")}


def summarize(rounds) -> dict:
  """Median / min / max over the rounds of each side's medians and of the ratios."""
  return {key: _spread([r[key] for r in rounds])
          for key in ("pt_train_median_sec", "tf_train_median_sec", "pt_infer_median_sec",
                      "tf_infer_median_sec", "ratio_train_tf_over_pt", "ratio_infer_tf_over_pt")}


def drive(actionformer_dir: str, torch_python: str, rounds_total: int, calls: int,
          precision: str, warmup: int) -> dict:
  """Starts both workers (their stderr in a temporary folder), runs the rounds and returns the
  JSON record: `error` names a worker that failed (the rounds before it are kept), `warning` a
  machine busy at the start (PyTorch's OpenMP threads slow down badly on taken cores)."""
  sys.path.insert(0, _HERE)
  import common  # pylint: disable=g-import-not-at-top
  started, load_start = time.strftime("%Y-%m-%dT%H:%M:%S%z"), os.getloadavg()
  ours = common.git_state()  # the code the workers import, before anything can change it
  log_dir = tempfile.mkdtemp(prefix="side_by_side_")
  workers, rounds, record = {}, [], {}
  try:
    for side, python in (("pt", torch_python), ("tf", sys.executable)):
      workers[side] = Worker([python, os.path.abspath(__file__), f"--side={side}",
                              f"--actionformer_dir={actionformer_dir}",
                              f"--precision={precision}", f"--warmup={warmup}"],
                             os.path.join(log_dir, f"{side}.log"))
      built = workers[side].reply()  # one at a time: setup and warm-up alone
      check_precision(side, built["info"], precision)
      workers[side].ready = {**built, **workers[side].reply()}
    params = {side: w.ready["info"]["num_params"] for side, w in workers.items()}
    if params["pt"] != params["tf"]:
      raise RuntimeError(f"the two models differ: {params} parameters")
    for r in range(rounds_total):
      order = ("pt", "tf") if r % 2 == 0 else ("tf", "pt")
      record = {"order": list(order)}
      for side in order:
        for cmd in ("train", "infer"):
          timed = workers[side].ask(cmd, calls)
          record[f"{side}_{cmd}"] = timed
          record[f"{side}_{cmd}_median_sec"] = float(np.median(timed["wall_sec"]))
      record.update(round_ratios(record))
      rounds.append(record)
      print(f"round {r + 1}: train {record['ratio_train_tf_over_pt']:.3f}, infer "
            f"{record['ratio_infer_tf_over_pt']:.3f}", file=sys.stderr, flush=True)
    for w in workers.values():
      w.close()
    outcome = {"summary": summarize(rounds)}
  except (RuntimeError, OSError, ValueError) as e:
    for w in workers.values():
      w.proc.kill()
    outcome = {"error": str(e), "summary": summarize(rounds) if rounds else None}
  return {"command": sys.argv, "machine": common.machine_info(),
          "code": {"asl_tf_head": ours["head"],
                   "asl_tf_modified_tracked_files": ours["modified_tracked_files"],
                   "actionformer_release_commit": common.git_state(actionformer_dir)["head"]},
          "started": started, "loadavg_start": list(load_start),
          "loadavg_end": list(os.getloadavg()), "rounds": rounds_total,
          "calls_per_round": calls, "warmup_calls": warmup, "worker_logs": log_dir,
          "workload": {"train_lengths": list(TRAIN_LENGTHS), "infer_length": INFER_LENGTH,
                       "input_dim": INPUT_DIM, "num_classes": NUM_CLASSES,
                       "precision": precision},
          "sides": {side: getattr(w, "ready", None) for side, w in workers.items()},
          "per_round": rounds, **outcome,
          **({"warning": f"1-minute load {load_start[0]:.2f} at the start: other processes "
                         "ran, the times are not valid"} if load_start[0] > 0.5 else {})}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--actionformer_dir", required=True,
                      help="checkout of the public ActionFormer with nms_1d_cpu built")
  parser.add_argument("--torch_python", default="",
                      help="Python with torch for the PyTorch worker (required to drive)")
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--calls", type=int, default=3, help="calls of each kind per round")
  parser.add_argument("--output", default="", help="JSON path (default: stdout only)")
  parser.add_argument("--precision", choices=sorted(_KERAS_POLICY), default="float32",
                      help="bfloat16: PyTorch autocast against asl_tf's mixed_bfloat16")
  parser.add_argument("--warmup", type=int, default=4,
                      help="untimed calls of each kind per worker before the rounds")
  parser.add_argument("--side", choices=("pt", "tf"), help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.side:
    worker(args.side, args.actionformer_dir, args.precision, args.warmup)
    return
  if not args.torch_python:
    parser.error("--torch_python is required: a Python with torch, numpy and pyyaml")
  sys.path.insert(0, _HERE)
  import common  # pylint: disable=g-import-not-at-top
  result = drive(os.path.abspath(args.actionformer_dir), os.path.abspath(args.torch_python),
                 args.rounds, args.calls, args.precision, args.warmup)
  common.emit(result, args.output or None)
  if "error" in result:
    sys.exit(f"side_by_side_pytorch: {result['error']}")


if __name__ == "__main__":
  main()
