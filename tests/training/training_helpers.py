"""Training-test helpers: a tiny annotation + .npy feature set, tiny-run flags, subprocesses."""

import json
import os
import subprocess
import sys

import numpy as np

from asl_tf import flags as asl_flags

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAIN_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train_script.py")
FEAT_STRIDE, NUM_FRAMES, FPS = 4.0, 16.0, 30.0


def write_tiny_dataset(root, num_train=16, num_val=4, input_dim=8, num_classes=3, seed=0,
                       nan_video=None):
  """One action per video (class direction x 4 over noise), lengths 20-40 (max_seq_len 32).

  Returns:
    (annotation file, feature folder).
  """
  rng = np.random.default_rng(seed)
  feat_dir = os.path.join(root, "features")
  os.makedirs(feat_dir, exist_ok=True)
  directions = rng.normal(size=[num_classes, input_dim])
  directions /= np.linalg.norm(directions, axis=1, keepdims=True)
  database = {}
  for subset, count in (("training", num_train), ("validation", num_val)):
    for i in range(count):
      video_id = f"{subset}_{i:02d}"
      length = int(rng.integers(20, 41))
      feats = rng.normal(size=[length, input_dim]).astype(np.float32)
      start = int(rng.integers(1, length // 2 - 6))
      end = start + int(rng.integers(3, 8))
      label = int(rng.integers(num_classes))
      feats[start:end + 1] += 4.0 * directions[label]
      if video_id == nan_video:
        feats[length // 2] = np.nan
      np.save(os.path.join(feat_dir, video_id + ".npy"), feats)
      to_sec = lambda g: (g * FEAT_STRIDE + 0.5 * NUM_FRAMES) / FPS
      database[video_id] = {
          "subset": subset, "fps": FPS,
          "duration": ((length - 1) * FEAT_STRIDE + NUM_FRAMES) / FPS,
          "annotations": [{"label": f"class_{label}", "label_id": label,
                           "segment": [to_sec(start), to_sec(end)]}]}
  ann = os.path.join(root, "annotations.json")
  with open(ann, "w") as f:
    json.dump({"database": database}, f)
  return ann, feat_dir


def tiny_flags(data_root, output_dir, **overrides):
  """Command-line flags of a tiny run: 8 steps/epoch x (1 warm-up + 2) epochs."""
  values = {
      "annotation_file": os.path.join(data_root, "annotations.json"),
      "feature_dir": os.path.join(data_root, "features"), "input_dim": 8, "num_classes": 3,
      "feat_stride": FEAT_STRIDE, "num_frames": NUM_FRAMES, "default_fps": FPS,
      "max_seq_len": 32, "backbone_arch": "1,1,1", "regression_range": "0,4,4,10000",
      "mha_win_size": 5, "embd_dim": 16, "fpn_dim": 16, "head_dim": 16, "n_head": 4,
      "epochs": 2, "warmup_epochs": 1, "batch_size": 2,
      "learning_rate": 1e-3, "init_loss_norm": 5, "output_dir": output_dir,
      "train_subset": "training", "eval_subset": "validation", "log_every": 1,
      "dropout": 0.1, "droppath": 0.1, "eval_every": -1, "ema_decay": 0.9,
      "class_sensitivity": True,  # every trained part of ASL (the defaults and the class level)
  }
  values.update(overrides)
  return [f"--{k}={v}" for k, v in values.items()]


def make_config(args):
  """The Config of these command-line flags (absl FLAGS reset before and after)."""
  asl_flags.FLAGS.unparse_flags()
  try:
    asl_flags.parse_argv(["prog"] + list(args))
    return asl_flags.build_config()
  finally:
    asl_flags.FLAGS.unparse_flags()


def start_run(args, env=None, log_path=None):
  """Starts `tests/training/train_script.py ARGS` (asl_tf.train with test hooks)."""
  full_env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=REPO, **(env or {}))
  out = open(log_path, "w") if log_path else subprocess.DEVNULL
  return subprocess.Popen([sys.executable, TRAIN_SCRIPT] + list(args), cwd=REPO, env=full_env,
                          stdout=out, stderr=subprocess.STDOUT)


def wait_all(procs, timeout):
  """Waits for every process; kills all of them on timeout or error."""
  try:
    return [p.wait(timeout=timeout) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()


def checkpoint_tensors(prefix):
  """{name: array} of every tensor in a checkpoint (weights, optimizer slots, EMA, RNG...)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  reader = tf.train.load_checkpoint(prefix)
  return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()
          if not name.startswith("_CHECKPOINTABLE_OBJECT_GRAPH")}
