"""Seconds per training step (batch 2, synthetic inputs), ASL and ActionFormer-only; prints JSON.

Each variant (`asl`: the default ASL parts, instance level and contrastive loss, as on any
flagfile; `actionformer`: every ASL option off, the model the PyTorch reference ran) and mode
(`graph`: tf.function; `xla`: `jit_compile=True`) runs in a fresh subprocess: the detector is
built with its optimizer, `task.train_step` is wrapped in a `tf.function`, warmed up (tracing /
compilation, timed separately) and then timed over `--repeats` steps on one fixed synthetic
batch (random features, two videos of full and 3/4 length, a few segments).
`peak_rss_mb` is the process high-water mark, which includes XLA compilation.

Usage:
  python benchmarks/train_step.py                   # configs/thumos_i3d.flags (T=2304, C=2048)
  python benchmarks/train_step.py --config=bench --modes=graph   # configs/bench.flags (T=768)
  python benchmarks/train_step.py --quick           # tiny sizes (seconds)
  python benchmarks/train_step.py --precision=mixed_bfloat16   # bfloat16 layers (Keras policy)
"""

import dataclasses
import functools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # pylint: disable=g-import-not-at-top,wrong-import-position

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The public PyTorch ActionFormer on this machine kind (issue 8): seconds per training step, and
# the targets (0.8 of it). They apply to the `actionformer` variant, the reference's model.
TARGETS = {"bench": (0.21, 0.265), "thumos_i3d": (3.4, 4.30)}
# The default ASL parts (instance level, contrastive loss) on any flagfile, the class level off
# whatever a flagfile says (`ab_step.py --compare=asl` times it on its own).
DEFAULT_ASL = ("--noclass_sensitivity",)
VARIANT_FLAGS = {
    "asl": DEFAULT_ASL,
    "actionformer": ("--class_sensitivity=false", "--instance_sensitivity=false",
                     "--contrastive_weight=0"),
}
# The optimizer's two forms and the kernel policy that picks each (Keras' AdamW under
# `reference`, FusedAdamW otherwise), for comparisons under one model policy.
OPTIMIZER_FORMS = {"keras_adamw": "reference", "fused_adamw": "fast"}
QUICK_FLAGS = ["--input_dim=16", "--embd_dim=16", "--fpn_dim=16", "--head_dim=16",
               "--max_seq_len=64", "--mha_win_size=5", "--backbone_arch=2,1,2",
               "--regression_range=0,4,4,8,8,10000"]


def _config(config_name, quick, extra_flags=()):
  from asl_tf import flags as asl_flags  # pylint: disable=g-import-not-at-top
  argv = ["bench", f"--flagfile={os.path.join(REPO, 'configs', config_name + '.flags')}",
          "--batch_size=2"]
  asl_flags.parse_argv(argv + (QUICK_FLAGS if quick else []) + list(extra_flags))
  return asl_flags.build_config()


def _batch(config):
  import numpy as np  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  seq_len, channels = config.model.max_seq_len, config.model.input_dim
  lengths = [seq_len, seq_len * 3 // 4]
  mask = np.stack([np.arange(seq_len) < n for n in lengths]).astype(np.float32)
  segments = np.zeros([2, config.data.max_segments, 2], np.float32)
  labels = np.full([2, config.data.max_segments], -1, np.int32)
  for b, n in enumerate(lengths):
    for m in range(4):
      start = rng.uniform(0, n * 0.8)
      segments[b, m] = (start, min(n - 1, start + rng.uniform(2, n * 0.2)))
      labels[b, m] = rng.integers(config.model.num_classes)
  return {"features": rng.normal(size=[2, seq_len, channels]).astype(np.float32) * mask[..., None],
          "padding_mask": mask, "gt_segments": segments, "gt_labels": labels}


class StepSetup:
  """One variant's detector, task and optimizer, its traced-on-first-call step and a batch."""

  def __init__(self, config, model, step, batch, epoch):
    self.config, self.model, self.step, self.batch, self.epoch = config, model, step, batch, epoch

  def run(self):
    """One training step, blocking on its loss."""
    float(self.step(self.batch, self.epoch)["total_loss"])


def build_step(config_name, quick, jit_compile, extra_flags=(), weights=None, epoch=0,
               optimizer_kernel_policy=None):
  """Builds the detector (in the flags' `--mixed_precision` policy), its optimizer and one
  synthetic batch.

  Args:
    weights: `model.get_weights()` of another variant to start from (same shapes).
    epoch: the epoch the step is told it runs in (ASL parts may start after a few).
    optimizer_kernel_policy: the kernel policy the optimizer's form follows (default: the
      model's), to compare optimizer forms under one model policy.

  Returns:
    a `StepSetup`.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from asl_tf.modeling import detector as detector_lib  # pylint: disable=g-import-not-at-top
  from asl_tf.training import optimizer as optimizer_lib  # pylint: disable=g-import-not-at-top
  from asl_tf.training import task as task_lib  # pylint: disable=g-import-not-at-top
  config = _config(config_name, quick, extra_flags)
  model = detector_lib.ASLDetector(config.model, dtype=config.train.mixed_precision)
  model.build_for_training()
  if weights is not None:
    model.set_weights(weights)
  task = task_lib.DetectionTask(config.model, config.loss, config.train.clip_grad_norm)
  optimizer_model_config = config.model
  if optimizer_kernel_policy is not None:
    optimizer_model_config = dataclasses.replace(config.model,
                                                 kernel_policy=optimizer_kernel_policy)
  optimizer = optimizer_lib.build_optimizer(model, config.train, optimizer_model_config, 100)
  optimizer.build(model.trainable_variables)
  batch = {k: tf.constant(v) for k, v in _batch(config).items()}
  step = tf.function(functools.partial(task.train_step, model, optimizer),
                     jit_compile=jit_compile)
  return StepSetup(config, model, step, batch, tf.constant(epoch, tf.int64))


def measure(config_name, quick, jit_compile, repeats, extra_flags=()):
  """Child process: times the train step of one configuration; returns a result row."""
  import time  # pylint: disable=g-import-not-at-top
  setup = build_step(config_name, quick, jit_compile, extra_flags)
  config, model = setup.config, setup.model
  start = time.perf_counter()
  setup.run()
  first_sec = time.perf_counter() - start
  timing = common.time_repeated(setup.run, repeats=repeats, warmup=1)
  return {"config": config_name, "jit_compile": jit_compile, "extra_flags": list(extra_flags),
          "seq_len": config.model.max_seq_len, "input_dim": config.model.input_dim,
          "embd_dim": config.model.embd_dim, "mha_win_size": config.model.mha_win_size[0],
          "batch_size": 2, "num_params": int(sum(v.numpy().size
                                                 for v in model.trainable_variables)),
          "first_step_sec": first_sec, **timing}


def main():
  parser = common.benchmark_parser(__doc__.splitlines()[0], default_repeats=10)
  parser.add_argument("--config", default="thumos_i3d",
                      help="flagfile name in configs/ (thumos_i3d, bench, ...)")
  parser.add_argument("--modes", default="",
                      help="comma-separated: graph (tf.function) and/or xla (jit_compile=True); "
                      "default graph,xla (graph alone with --quick)")
  parser.add_argument("--variants", default="",
                      help="comma-separated: asl (the flagfile's ASL options) and/or "
                      "actionformer (every ASL option off, the reference's model); default "
                      "asl,actionformer (asl alone with --quick)")
  parser.add_argument("--precision", default="float32", choices=("float32", "mixed_bfloat16"),
                      help="--mixed_precision of the trained model")
  args = parser.parse_args()
  repeats = 2 if args.quick and args.repeats == 10 else args.repeats
  modes = args.modes or ("graph" if args.quick else "graph,xla")
  variants = args.variants or ("asl" if args.quick else "asl,actionformer")
  target, reference = TARGETS.get(args.config, (None, None))
  rows = []
  for variant in variants.split(","):
    if variant not in VARIANT_FLAGS:
      parser.error(f"unknown variant {variant!r}; choose from {sorted(VARIANT_FLAGS)}")
    for mode in modes.split(","):
      out = common.run_in_subprocess(
          "benchmarks.train_step:measure",
          {"config_name": args.config, "quick": args.quick, "jit_compile": mode == "xla",
           "repeats": repeats,
           "extra_flags": list(VARIANT_FLAGS[variant]) + [f"--mixed_precision={args.precision}"]},
          timeout=3600)
      row = {"mode": mode, "variant": variant, "precision": args.precision, **out["result"],
             "peak_rss_mb": out["peak_rss_mb"]}
      if (variant == "actionformer" and target and not args.quick
          and args.precision == "float32"):
        row.update(target_sec=target, reference_sec=reference)
      rows.append(row)
  common.emit({"benchmark": "train_step", "machine": common.machine_info(),
               "results": rows}, args.output)


if __name__ == "__main__":
  main()
