"""Resident memory of training, phase by phase, and the size of the traced step; prints JSON.

Each row runs in a fresh subprocess and reads /proc/self/status after each phase: TensorFlow
imported, detector + optimizer built, the training step traced (`get_concrete_function`), the
first step run (the runtime instantiates the graph: placement, Grappler, kernels), and after
`--steps` more, then after glibc's `malloc_trim` (what was freed but stayed resident; read
after the peak, so it does not lower it). `peak_mb` is VmHWM; `anon_mb` / `file_mb` split the
resident set into heap and mapped files (mostly TensorFlow's shared libraries). The traced
step's graph ops are counted by top-level name scope (forward, gradient, optimizer, clipping) and
by type: on CPU the runtime's memory grows with the op count, so this says what holds it.

  python benchmarks/train_memory.py                       # bench config, both optimizer forms
  python benchmarks/train_memory.py --config=thumos_i3d
  python benchmarks/train_memory.py --quick
"""

import collections
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # pylint: disable=g-import-not-at-top,wrong-import-position
import train_step  # pylint: disable=g-import-not-at-top,wrong-import-position

# Peak resident memory of the public PyTorch ActionFormer training at the bench config on this
# machine kind (issue 19), and the target ratio to it.
PEER_PEAK_MB = {"bench": 650.0}
TARGET_RATIO = 1.5
VARIANTS = train_step.VARIANT_FLAGS


_STATUS_NAMES = {"VmHWM": "peak_mb", "VmRSS": "rss_mb", "RssAnon": "anon_mb", "RssFile": "file_mb"}


def _status_mb():
  return {_STATUS_NAMES[k]: round(v, 1) for k, v in common.status_mb(*_STATUS_NAMES).items()}


def _scope(op_name):
  parts = op_name.split("/")
  if parts[0] == "gradient_tape":
    return "gradient"
  return parts[0].rstrip("_0123456789")


def measure(config_name, quick, variant, optimizer_form, steps):
  """Child process: memory after each phase of one configuration."""
  phases = {"start": _status_mb()}
  import tensorflow as tf  # pylint: disable=g-import-not-at-top,unused-import
  phases["tensorflow_imported"] = _status_mb()
  setup = train_step.build_step(config_name, quick, False, ("--kernel_policy=fast",)
                                + VARIANTS[variant],
                                optimizer_kernel_policy=train_step.OPTIMIZER_FORMS[
                                    optimizer_form])
  phases["built"] = _status_mb()
  graph = setup.step.get_concrete_function(setup.batch, setup.epoch).graph
  ops = graph.get_operations()
  by_scope = collections.Counter(_scope(op.name) for op in ops)
  phases["traced"] = _status_mb()
  setup.run()
  phases["first_step"] = _status_mb()
  for _ in range(steps):
    setup.run()
  phases[f"after_{steps + 1}_steps"] = _status_mb()
  # After the peak is read: what of the resident memory was freed but kept by glibc.
  if common.malloc_trim() is not None:
    phases["after_malloc_trim"] = _status_mb()
  return {"config": config_name, "variant": variant, "optimizer": optimizer_form,
          "graph_ops": len(ops), "graph_ops_by_scope": dict(by_scope.most_common()),
          "graph_ops_by_type": dict(collections.Counter(op.type for op in ops).most_common(12)),
          "phases": phases}


def main():
  parser = common.benchmark_parser(__doc__.splitlines()[0], default_repeats=1)
  parser.add_argument("--config", default="bench", help="flagfile name in configs/")
  parser.add_argument("--variants", default="actionformer,asl")
  parser.add_argument("--optimizers", default="keras_adamw,fused_adamw")
  parser.add_argument("--steps", type=int, default=3, help="steps after the first one")
  args = parser.parse_args()
  run = common.run_start()
  rows = []
  for variant in args.variants.split(","):
    for form in args.optimizers.split(","):
      if variant not in VARIANTS or form not in train_step.OPTIMIZER_FORMS:
        parser.error(f"unknown variant {variant!r} or optimizer {form!r}")
      child = common.run_in_subprocess(
          "train_memory:measure", {"config_name": args.config, "quick": args.quick,
                                   "variant": variant, "optimizer_form": form,
                                   "steps": args.steps})
      row = child["result"]
      row["peak_mb"] = child["peak_rss_mb"]
      peer = PEER_PEAK_MB.get(args.config)
      if peer and not args.quick:
        row["ratio_to_pytorch_peak"] = round(row["peak_mb"] / peer, 2)
      rows.append(row)
  common.emit({"benchmark": "train_memory", "command": " ".join(["python"] + sys.argv),
               "run": run, "machine": common.machine_info(),
               "peer_peak_mb": PEER_PEAK_MB.get(args.config),
               "target_ratio": TARGET_RATIO, "rows": rows}, args.output)


if __name__ == "__main__":
  main()
