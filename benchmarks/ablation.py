"""Accuracy ablation of the ASL options: trains each variant with several seeds; JSON + Markdown.

  python benchmarks/ablation.py --dataset=demo --seeds=1,2,3
  python benchmarks/ablation.py --dataset=thumos_synthetic --seeds=1 --extra_flags=--epochs=6

Each run is `python -m asl_tf.train --flagfile=<dataset flagfile> <variant flags> --seed=S
--output_dir=<runs_dir>/<variant>/seed<S> <extra flags>`; its `eval/metrics.json` gives the
average mAP and mAP@0.5. Runs whose metrics already exist are reused (the script resumes), and
the JSON and Markdown are rewritten after every run, so a stopped grid still reports what ran.
Variants add one ASL option at a time to ActionFormer, then all of them together (and, on request,
the two instance-level variants with the `product` combination).

The runs use a copy of `asl_tf/` and the flagfiles taken when the grid first starts
(`<runs_dir>/code_snapshot`, with `runs/` linked back; reused on resume), so that edits to the
working tree during a long grid neither mix code versions nor break a run (AutoGraph re-reads
source files when it traces, e.g. the evaluation at the end of training).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # pylint: disable=g-import-not-at-top,wrong-import-position

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_OFF = ("--class_sensitivity=false", "--instance_sensitivity=false", "--contrastive_weight=0")
VARIANTS: Dict[str, tuple] = {
    "actionformer": _OFF,
    "+class": ("--class_sensitivity=true", "--instance_sensitivity=false",
               "--contrastive_weight=0"),
    "+instance": ("--class_sensitivity=false", "--instance_sensitivity=true",
                  "--instance_combination=sum", "--contrastive_weight=0"),
    "+contrastive": ("--class_sensitivity=false", "--instance_sensitivity=false",
                     "--contrastive_weight=0.1"),
    "asl_all": ("--class_sensitivity=true", "--instance_sensitivity=true",
                "--instance_combination=sum", "--contrastive_weight=0.1"),
    # The instance weights as ASL_SPEC 2.2 first recommended (w = p * sg(q)); not in the default
    # grid: it collapses some runs (README, ASL ablation).
    "+instance_product": ("--class_sensitivity=false", "--instance_sensitivity=true",
                          "--instance_combination=product", "--contrastive_weight=0"),
    "asl_all_product": ("--class_sensitivity=true", "--instance_sensitivity=true",
                        "--instance_combination=product", "--contrastive_weight=0.1"),
}
DEFAULT_VARIANTS = ("actionformer", "+class", "+instance", "+contrastive", "asl_all")
DATASETS = {
    "demo": "configs/demo.flags",
    "thumos_synthetic": "benchmarks/thumos_synthetic.flags",
}


def _map_at(metrics: dict, tiou: float) -> Optional[float]:
  for t, m in zip(metrics["tiou_thresholds"], metrics["mAP"]):
    if abs(t - tiou) < 1e-6:
      return float(m)
  return None


def snapshot_code(dest: str) -> dict:
  """Copies asl_tf/, configs/ and benchmarks/*.flags into `dest` and links runs/ back.

  An existing snapshot is reused, so a resumed grid runs the same code; delete it to take a
  new one.

  Returns:
    `root` (dest) and `git_head` / `modified` / `taken` (the working tree the copy came from).
  """
  info_path = os.path.join(dest, "snapshot.json")
  if os.path.exists(info_path):
    with open(info_path) as f:
      return json.load(f)
  if os.path.exists(dest):
    shutil.rmtree(dest)
  ignore = shutil.ignore_patterns("__pycache__")
  shutil.copytree(os.path.join(_REPO_ROOT, "asl_tf"), os.path.join(dest, "asl_tf"), ignore=ignore)
  shutil.copytree(os.path.join(_REPO_ROOT, "configs"), os.path.join(dest, "configs"))
  os.makedirs(os.path.join(dest, "benchmarks"))
  for name in os.listdir(os.path.join(_REPO_ROOT, "benchmarks")):
    if name.endswith(".flags"):
      shutil.copy(os.path.join(_REPO_ROOT, "benchmarks", name), os.path.join(dest, "benchmarks"))
  os.makedirs(os.path.join(_REPO_ROOT, "runs"), exist_ok=True)
  os.symlink(os.path.join(_REPO_ROOT, "runs"), os.path.join(dest, "runs"))

  def git(*args):
    return subprocess.run(["git", *args], cwd=_REPO_ROOT, capture_output=True, text=True,
                          check=False).stdout.strip()

  info = {"root": dest, "git_head": git("rev-parse", "HEAD"),
          "modified": git("status", "--short", "--", "asl_tf", "configs").splitlines(),
          "taken": time.strftime("%Y-%m-%d %H:%M:%S")}
  with open(info_path, "w") as f:
    json.dump(info, f, indent=1)
  return info


def run_one(flagfile: str, variant: str, seed: int, output_dir: str,
            extra_flags: Sequence[str] = (), code_root: str = _REPO_ROOT) -> dict:
  """Trains one variant / seed (unless its metrics exist) and returns its record.

  `flagfile` and the data paths in it resolve against `code_root`, whose asl_tf/ is used.
  """
  metrics_path = os.path.join(output_dir, "eval", "metrics.json")
  timing_path = os.path.join(output_dir, "ablation_run.json")
  if os.path.exists(metrics_path) and os.path.exists(timing_path):
    with open(timing_path) as f:
      return json.load(f)
  if os.path.exists(output_dir):
    shutil.rmtree(output_dir)
  os.makedirs(output_dir)
  cmd = [sys.executable, "-m", "asl_tf.train", f"--flagfile={flagfile}", *VARIANTS[variant],
         f"--seed={seed}", f"--output_dir={output_dir}", *extra_flags]
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=code_root)
  start = time.perf_counter()
  with open(os.path.join(output_dir, "train.log"), "w") as log:
    proc = subprocess.run(cmd, cwd=code_root, env=env, stdout=log, stderr=subprocess.STDOUT,
                          check=False)
  wall = time.perf_counter() - start
  record = {"variant": variant, "seed": seed, "command": " ".join(cmd[1:]),
            "wall_sec": round(wall, 1), "load_avg_after": os.getloadavg()[0],
            "returncode": proc.returncode}
  if proc.returncode == 0 and os.path.exists(metrics_path):
    with open(metrics_path) as f:
      metrics = json.load(f)
    record.update(average_mAP=float(metrics["average_mAP"]), mAP_at_0_5=_map_at(metrics, 0.5),
                  mAP=[float(m) for m in metrics["mAP"]],
                  tiou_thresholds=list(metrics["tiou_thresholds"]))
  with open(timing_path, "w") as f:
    json.dump(record, f, indent=1)
  return record


def summarize(runs: List[dict]) -> Dict[str, dict]:
  """Mean / std (ddof 1 when n > 1, else 0) of average mAP and mAP@0.5 per variant, in %."""
  out = {}
  for variant in VARIANTS:
    ok = [r for r in runs if r["variant"] == variant and "average_mAP" in r]
    if not ok:
      continue
    # `paused_sec`: time the run was stopped (SIGSTOP) for other measurements, if recorded.
    walls = [r["wall_sec"] - r.get("paused_sec", 0.0) for r in ok]
    row = {"n": len(ok), "seeds": [r["seed"] for r in ok],
           "mean_wall_sec": round(float(np.mean(walls)), 1)}
    for key in ("average_mAP", "mAP_at_0_5"):
      vals = 100.0 * np.asarray([r[key] for r in ok if r[key] is not None])
      row[key + "_mean"] = round(float(vals.mean()), 2) if len(vals) else None
      row[key + "_std"] = round(float(vals.std(ddof=1)), 2) if len(vals) > 1 else 0.0
    out[variant] = row
  return out


def markdown_table(summary: Dict[str, dict], title: str = "") -> str:
  """The per-variant table (mean +- std over seeds, percent)."""
  lines = [f"**{title}**", ""] if title else []
  lines += ["| variant | seeds | average mAP (%) | mAP@0.5 (%) | time / run (s) |",
            "|---|---|---|---|---|"]
  for variant, row in summary.items():
    lines.append(f"| {variant} | {row['n']} | {row['average_mAP_mean']:.2f} +- "
                 f"{row['average_mAP_std']:.2f} | {row['mAP_at_0_5_mean']:.2f} +- "
                 f"{row['mAP_at_0_5_std']:.2f} | {row['mean_wall_sec']:.0f} |")
  return "\n".join(lines) + "\n"


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--dataset", choices=sorted(DATASETS), default="demo")
  parser.add_argument("--seeds", default="1,2,3", help="comma-separated training seeds")
  parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                      help=f"comma-separated subset of {','.join(VARIANTS)}")
  parser.add_argument("--extra_flags", default="",
                      help="space-separated training flags added to every run (e.g. --epochs=6)")
  parser.add_argument("--runs_dir", default="", help="default runs/ablation/<dataset>")
  parser.add_argument("--output", default="", help="default benchmarks/results/ablation_<dataset>"
                      ".json (a .md beside it)")
  args = parser.parse_args()
  variants = [v for v in args.variants.split(",") if v]
  unknown = sorted(set(variants) - set(VARIANTS))
  if unknown:
    parser.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
  seeds = [int(s) for s in args.seeds.split(",") if s]
  extra = args.extra_flags.split()
  runs_dir = os.path.abspath(args.runs_dir or os.path.join(_REPO_ROOT, "runs", "ablation",
                                                          args.dataset))
  output = args.output or os.path.join(_REPO_ROOT, "benchmarks", "results",
                                       f"ablation_{args.dataset}.json")
  code = snapshot_code(os.path.join(runs_dir, "code_snapshot"))
  flagfile = os.path.join(code["root"], DATASETS[args.dataset])
  runs = []
  # Seed-major order: an interrupted grid still covers every variant.
  for seed in seeds:
    for variant in variants:
      record = run_one(flagfile, variant, seed,
                       os.path.join(runs_dir, variant.lstrip("+"), f"seed{seed}"), extra,
                       code["root"])
      runs.append(record)
      print(json.dumps(record), flush=True)
      summary = summarize(runs)
      result = {"benchmark": "ablation", "dataset": args.dataset,
                "flagfile": DATASETS[args.dataset], "extra_flags": extra,
                "variants": {v: list(VARIANTS[v]) for v in variants}, "summary": summary,
                "runs": runs, "code": code, "machine": common.machine_info()}
      os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
      with open(output, "w") as f:
        json.dump(result, f, indent=1, default=common.json_default)
      title = f"{args.dataset} ({DATASETS[args.dataset]} {' '.join(extra)})".replace(" )", ")")
      with open(os.path.splitext(output)[0] + ".md", "w") as f:
        f.write(markdown_table(summary, title))
  print(markdown_table(summarize(runs)))


if __name__ == "__main__":
  main()
