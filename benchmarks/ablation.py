"""Accuracy ablation of the ASL options: trains each variant with several seeds; JSON + Markdown.

  python benchmarks/ablation.py --dataset=demo --seeds=1,2,3
  python benchmarks/ablation.py --dataset=thumos_synthetic --seeds=1 --extra_flags=--epochs=6

Each run is `python -m asl_tf.train --flagfile=<dataset flagfile> <variant flags> --seed=S
--output_dir=<runs_dir>/<variant>/seed<S> <extra flags>`; its `eval/metrics.json` gives the
average mAP and mAP@0.5. Runs whose metrics already exist are reused (the script resumes), and
the JSON and Markdown are rewritten after every run, so a stopped grid still reports what ran.
Variants add one ASL option at a time to ActionFormer, then all of them together (and, on request,
the two instance-level variants with the `product` combination).

The runs use a copy of `asl_tf/` and the flagfiles (`<runs_dir>/code_<digest>`, named after a
hash of their contents, with `runs/` linked back; each record names its copy), so that edits to
the working tree during a long grid neither mix code versions within a run nor break it
(AutoGraph re-reads source files when it traces, e.g. the evaluation at the end of training).
The tables summarise every finished run under the runs folder and every run the results JSON
already records (`runs/` is not committed, so a fresh checkout keeps the earlier records; a
finished run on disk replaces the recorded one of its variant and seed unless it failed), so
several grids can run side by side, one per core:

  taskset -c 0 python benchmarks/ablation.py --dataset=sensitivity_thumos --variants=a,b &
  taskset -c 1 python benchmarks/ablation.py --dataset=sensitivity_thumos --variants=c,d &
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
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
# Every variant sets every ASL switch, so changing a default in asl_tf/config.py never changes
# what a variant trains.
_OFF = {"class_sensitivity": "false", "instance_sensitivity": "false", "contrastive_weight": "0",
        "instance_combination": "sum", "sensitivity_normalization": "none",
        "evaluator_target": "separate", "evaluator_loss": "mse",
        "sensitivity_parametrization": "authors", "sensitivity_lr_scale": "1",
        "sensitivity_sigma_floor": "0.01", "contrastive_sampling": "sensitivity_topk",
        "evaluator_loss_weight": "1", "evaluator_points": "positives",
        "video_label_loss_weight": "0", "contrastive_temperature": "0.07",
        "instance_weight_power": "1", "instance_start_epoch": "0",
        "evaluator_feature_gradient": "false", "instance_weighted_losses": "both",
        "evaluator_layers": "2", "contrastive_proj_dim": "128", "center_sample_radius": "1.5"}


def _variant(**switches) -> tuple:
  unknown = set(switches) - set(_OFF)
  if unknown:
    raise ValueError(f"unknown switches {sorted(unknown)}")
  return tuple(f"--{k}={switches.get(k, v)}" for k, v in _OFF.items())


_CLS, _INST = {"class_sensitivity": "true"}, {"instance_sensitivity": "true"}
_NORM = {"sensitivity_normalization": "instance"}
_CONTRA = {"contrastive_weight": "0.1"}
# The search's base (class + instance level, normalised, BCE evaluator), the defaults as it
# ran them, with a two-layer evaluator. The shipped defaults since are
# `+instance_norm_bce_windows_c010_el0_proj0` (no hidden evaluator layer, class level off, the
# contrastive loss on the authors' windows at 0.1, on the unprojected level-0 features).
_DEFAULT = {**_CLS, **_INST, **_NORM, "instance_combination": "product", "evaluator_loss": "bce"}
# The instance level of the shipped defaults: that base without the class level or hidden layers.
_INSTANCE_EL0 = {**_INST, **_NORM, "instance_combination": "product", "evaluator_loss": "bce",
                 "evaluator_layers": "0"}
# The contrastive loss on the authors' windows at weight 0.01 (the default from the search until
# weight 0.03).
_WINDOWS_C001 = {"contrastive_weight": "0.01", "contrastive_sampling": "windows"}
# The parts shipped on every set (instance level, unprojected contrastive loss on the windows),
# at the weight 0.01 of the search; `..._c003_...` variants raise it to 0.03 (the default before
# 0.1; the dense flagfiles' weight), `..._c010_...` to 0.1 (the default).
_SHIPPED = {**_INSTANCE_EL0, **_WINDOWS_C001, "contrastive_proj_dim": "0"}
# The same parts at weight 0.03 (the default from its measurement until 0.1's; the dense
# flagfiles' weight) and at 0.1 (the shipped defaults).
_SHIPPED_C003 = {**_SHIPPED, "contrastive_weight": "0.03"}
_SHIPPED_C010 = {**_SHIPPED, "contrastive_weight": "0.1"}
# Every frame inside a ground truth a positive (ActionFormer's label assignment without centre
# sampling).
_WHOLE = {"center_sample_radius": "0"}
VARIANTS: Dict[str, tuple] = {
    "actionformer": _variant(),
    "+class": _variant(**_CLS),
    "+instance": _variant(**_INST),
    "+contrastive": _variant(**_CONTRA),
    # The defaults shipped before issue 15: class + instance (sum) + contrastive 0.1.
    "asl_all": _variant(**_CLS, **_INST, **_CONTRA),
    # The instance weights as first reconstructed (w = p * sg(q)); it collapses some
    # runs without normalisation (README, ASL ablation).
    "+instance_product": _variant(**_INST, instance_combination="product"),
    "asl_all_product": _variant(**_CLS, **_INST, **_CONTRA, instance_combination="product"),
    # Issue 15's search: weights normalised to mean 1 over each GT instance's positives.
    "+class_norm": _variant(**_CLS, **_NORM),
    "+instance_norm": _variant(**_INST, **_NORM, instance_combination="product"),
    "class_instance_norm": _variant(**_CLS, **_INST, **_NORM, instance_combination="product"),
    "asl_all_norm": _variant(**_CLS, **_INST, **_NORM, **_CONTRA,
                             instance_combination="product"),
    "class_instance_norm_fused": _variant(**_CLS, **_INST, **_NORM, instance_combination="product",
                                          evaluator_target="fused"),
    "class_instance_norm_bce": _variant(**_CLS, **_INST, **_NORM, instance_combination="product",
                                        evaluator_loss="bce"),
    "+instance_norm_bce": _variant(**_INST, **_NORM, instance_combination="product",
                                   evaluator_loss="bce"),
    # The defaults chosen by the search above, plus the contrastive loss.
    "asl_all_norm_bce": _variant(**_CLS, **_INST, **_NORM, **_CONTRA,
                                 instance_combination="product", evaluator_loss="bce"),
    "asl_all_norm_bce_c001": _variant(**_CLS, **_INST, **_NORM, contrastive_weight="0.01",
                                      instance_combination="product", evaluator_loss="bce"),
    # The contrastive loss on the authors' centre / boundary / outside windows instead of the
    # top-k sensitive points.
    "asl_all_norm_bce_windows": _variant(**_CLS, **_INST, **_NORM, **_CONTRA,
                                         instance_combination="product", evaluator_loss="bce",
                                         contrastive_sampling="windows"),
    "asl_all_norm_bce_windows_c001": _variant(**_CLS, **_INST, **_NORM,
                                              contrastive_weight="0.01",
                                              instance_combination="product",
                                              evaluator_loss="bce",
                                              contrastive_sampling="windows"),
    # The same at temperatures 0.2 and 0.5 (0.07, the authors' config value, above); values
    # fixed before any run.
    "asl_all_norm_bce_windows_c001_t02": _variant(**_DEFAULT, **_WINDOWS_C001,
                                                  contrastive_temperature="0.2"),
    "asl_all_norm_bce_windows_c001_t05": _variant(**_DEFAULT, **_WINDOWS_C001,
                                                  contrastive_temperature="0.5"),
    # The default trained in bfloat16 (Keras mixed_bfloat16: layers in bfloat16, variables,
    # losses and logits float32), to compare with its float32 runs.
    "class_instance_norm_bce_bf16": _variant(**_CLS, **_INST, **_NORM,
                                             instance_combination="product",
                                             evaluator_loss="bce")
                                    + ("--mixed_precision=mixed_bfloat16",),
    # The same with the outside windows cleared of frames inside other GTs (dense data).
    "asl_all_norm_bce_windows_clear_c001": _variant(
        **_CLS, **_INST, **_NORM, contrastive_weight="0.01", instance_combination="product",
        evaluator_loss="bce", contrastive_sampling="windows_clear_background"),
    # The default with the evaluator's loss weighted 4x (it learns only from its own loss, so
    # the weight sets how fast q follows its targets) and with q and p summed instead of
    # multiplied (a softer reweighting inside each instance).
    "class_instance_norm_bce_elw4": _variant(**_DEFAULT, evaluator_loss_weight="4"),
    "class_instance_norm_bce_sum": _variant(**{**_DEFAULT, "instance_combination": "sum"}),
    # The default with the evaluator learning from every point inside a GT (at the GT's level;
    # the paper's "ground-truth location sampling" read as the evaluator's input), its weights
    # still on the centre-sampled positives.
    "class_instance_norm_bce_inside": _variant(**_DEFAULT, evaluator_points="inside_gt"),
    # The default with the authors' fused target sigmoid(logit)^0.2 tIoU^0.8 for both outputs:
    # with BCE, their commented-out remnant's loss (the fused row above used MSE).
    "class_instance_norm_bce_fused": _variant(**_DEFAULT, evaluator_target="fused"),
    # The default with w = p * sg(q)^2: sharper ratios between an instance's frames (with the
    # per-instance normalisation only those ratios count).
    "class_instance_norm_bce_q2": _variant(**_DEFAULT, instance_weight_power="2"),
    # ... and with w = p * sg(q)^0.5: softer ratios (the other side of gamma = 1). Value fixed
    # before any run.
    "class_instance_norm_bce_qhalf": _variant(**_DEFAULT, instance_weight_power="0.5"),
    # Where the evaluator's gain comes from: q reweighting only the focal loss, only the DIoU
    # loss (the other keeps w = p).
    "class_instance_norm_bce_iwcls": _variant(**_DEFAULT,
                                              instance_weighted_losses="classification"),
    "class_instance_norm_bce_iwreg": _variant(**_DEFAULT, instance_weighted_losses="regression"),
    # The default normalised over each video's positives instead of each instance's (the
    # issue's "over the batch's positives", per video so that every replica's loss stays its
    # own): q can also move weight between a video's instances.
    "class_instance_norm_bce_vnorm": _variant(**{**_DEFAULT,
                                                 "sensitivity_normalization": "video"}),
    # The default with the instance weights from epoch 2 on (the evaluator still learns from
    # the start): early q is noise, and under the normalisation only its ratios count.
    "class_instance_norm_bce_start2": _variant(**_DEFAULT, instance_start_epoch="2"),
    # The default with the evaluator's loss reaching the shared features (no stop-gradient:
    # predicting the model's confidence and tIoU as an auxiliary task of the backbone).
    "class_instance_norm_bce_featgrad": _variant(**_DEFAULT, evaluator_feature_gradient="true"),
    # The default with 0, 1 and 3 hidden conv layers in the evaluator (it had 2): whether its
    # capacity limits how well q ranks an instance's frames, and whether a lighter evaluator
    # keeps the gain at a smaller step cost. Values fixed before any run.
    "class_instance_norm_bce_el0": _variant(**_DEFAULT, evaluator_layers="0"),
    "class_instance_norm_bce_el1": _variant(**_DEFAULT, evaluator_layers="1"),
    "class_instance_norm_bce_el3": _variant(**_DEFAULT, evaluator_layers="3"),
    # The contrastive loss on the authors' windows at 0.01 on top of class + instance with that
    # evaluator (the THUMOS14 flagfile's ASL settings until the unprojected default).
    "asl_all_norm_bce_windows_c001_el0": _variant(**_DEFAULT, **_WINDOWS_C001,
                                                  evaluator_layers="0"),
    # The instance level alone with that evaluator (what the class level adds on top of it).
    "+instance_norm_bce_el0": _variant(**_INSTANCE_EL0),
    # The same contrastive loss on the instance level alone (the class level off after it
    # measured -0.01 / +0.06 on top of the instance level): the shipped defaults until `_proj0`.
    "+instance_norm_bce_windows_c001_el0": _variant(**_INSTANCE_EL0, **_WINDOWS_C001),
    # The same contrastive loss on the unit-norm level-0 features themselves, without the
    # projection MLP, as the authors' segment-level function compares them: the shipped defaults
    # until `_c003_el0_proj0`.
    "+instance_norm_bce_windows_c001_el0_proj0": _variant(**_SHIPPED),
    # The label-involved loss of the authors' Ego4D code at their weight 0.2, on the default
    # and on ActionFormer alone.
    "class_instance_norm_bce_al02": _variant(**_DEFAULT, video_label_loss_weight="0.2"),
    "actionformer_al02": _variant(video_label_loss_weight="0.2"),
    "+class_contrastive": _variant(**_CLS, **_CONTRA),
    # The class-level Gaussians barely move from their initial values at lr 1e-4 (mu within
    # +-0.02, sigma 0.97-1.0 after 1,800 steps): mu / sigma with a 100x learning rate.
    "class_instance_norm_lr100": _variant(**_CLS, **_INST, **_NORM,
                                          instance_combination="product",
                                          sensitivity_lr_scale="100"),
    # Every frame inside a ground truth is a positive (--center_sample_radius=0, the paper's
    # "ground-truth location sampling" read as the positives the sensitivity weights act on).
    "actionformer_whole": _variant(**_WHOLE),
    "class_instance_norm_whole": _variant(**_CLS, **_INST, **_NORM,
                                          instance_combination="product", **_WHOLE),
    # The default with whole-segment positives: on the dense set's long moments the centre
    # leaves most of an action's frames out, and the Gaussians and q can weigh the rest.
    "class_instance_norm_bce_whole": _variant(**_DEFAULT, **_WHOLE),
    # The defaults of the time (projected contrastive loss) with whole-segment positives.
    "+instance_norm_bce_windows_c001_el0_whole": _variant(**_INSTANCE_EL0, **_WINDOWS_C001,
                                                          **_WHOLE),
    # The shipped parts (at weight 0.01) with whole-segment positives.
    "+instance_norm_bce_windows_c001_el0_proj0_whole": _variant(**_SHIPPED, **_WHOLE),
    # Whole-segment positives span x in [-0.5, 0.5] on level 0, where a class-specific Gaussian
    # can say which part of an action matters: Gaussians that learn (30x learning rate) but
    # cannot collapse onto a few frames (softplus sigma >= 0.1). Values fixed before any run.
    "class_instance_norm_whole_learned": _variant(**_CLS, **_INST, **_NORM,
                                                  instance_combination="product",
                                                  sensitivity_parametrization="stable",
                                                  sensitivity_lr_scale="30",
                                                  sensitivity_sigma_floor="0.1", **_WHOLE),
    # Candidates on top of the shipped parts with whole-segment positives, aimed at the dense
    # set's gap to ActionFormer given the same positives: the class level as released (its
    # Gaussians are nearly flat over centre-sampled positives, not over whole segments), and a
    # contrastive weight of 0.03 (the dense flagfiles' setting since). Fixed before any run.
    "asl_all_norm_bce_windows_c001_el0_proj0_whole": _variant(**_SHIPPED, **_CLS, **_WHOLE),
    "+instance_norm_bce_windows_c003_el0_proj0_whole": _variant(**_SHIPPED_C003, **_WHOLE),
    # The dense flagfiles' setting without one of its two ASL parts: is each >= 0 there?
    "+instance_norm_bce_el0_whole": _variant(**_INSTANCE_EL0, **_WHOLE),
    "+windows_c003_proj0_whole": _variant(**{**_WINDOWS_C001, "contrastive_weight": "0.03"},
                                          contrastive_proj_dim="0", **_WHOLE),
    # Weight 0.03 with the default's centre sampling (it was +0.35 over 0.01 at THUMOS-shaped
    # seeds 1-2 with whole-segment positives): the default from its measurement until 0.1.
    "+instance_norm_bce_windows_c003_el0_proj0": _variant(**_SHIPPED_C003),
    # Both (class level +0.08, weight 0.03 +0.07 over the shipped parts at dense seeds 1-3,
    # no seed below -0.01).
    "asl_all_norm_bce_windows_c003_el0_proj0_whole": _variant(**_SHIPPED_C003, **_CLS,
                                                              **_WHOLE),
    # The default's weight of the time, 0.03, was the larger of two tried on this base: does a
    # larger one (0.1 lowered both sets on older bases) keep going up? The default since.
    "+instance_norm_bce_windows_c010_el0_proj0": _variant(**_SHIPPED_C010),
    # Halfway to 0.1, which was +0.67 on the THUMOS-shaped set (4 seeds) and -0.10 on the dense
    # one (3 seeds) over 0.03: does a smaller step keep the first without the second?
    "+instance_norm_bce_windows_c005_el0_proj0": _variant(**{**_SHIPPED,
                                                             "contrastive_weight": "0.05"}),
    # After 0.1 passed the rule over 0.03 (+0.63 / +0.13, 6 seeds): does the rise go on (0.3),
    # and do the dense flagfiles' whole-segment positives take 0.1 as well? Fixed before any run.
    "+instance_norm_bce_windows_c030_el0_proj0": _variant(**{**_SHIPPED,
                                                             "contrastive_weight": "0.3"}),
    "+instance_norm_bce_windows_c010_el0_proj0_whole": _variant(**_SHIPPED_C010, **_WHOLE),
    # The default without its instance level: is that part still >= 0 at weight 0.1? Fixed
    # before any run.
    "+windows_c010_proj0": _variant(**{**_SHIPPED_C010, "instance_sensitivity": "false"}),
    # The current default trained in bfloat16 (issue 19: equal to float32 within seed noise?);
    # the evaluation at the end of training then runs in bfloat16 too. Fixed before any run.
    "+instance_norm_bce_windows_c010_el0_proj0_bf16": _variant(**_SHIPPED_C010)
                                                      + ("--mixed_precision=mixed_bfloat16",),
}
DEFAULT_VARIANTS = ("actionformer", "+class", "+instance", "+contrastive", "asl_all")
DATASETS = {
    "demo": "configs/demo.flags",
    "thumos_synthetic": "benchmarks/thumos_synthetic.flags",
    "sensitivity_thumos": "benchmarks/sensitivity_thumos.flags",
    "sensitivity_ego4d": "benchmarks/sensitivity_ego4d.flags",
}
# Datasets generated by a benchmarks/ script before the first run: name -> (module, set).
GENERATED = {
    "thumos_synthetic": ("thumos_synthetic", None),
    "sensitivity_thumos": ("sensitivity_synthetic", "thumos"),
    "sensitivity_ego4d": ("sensitivity_synthetic", "ego4d"),
}


def _map_at(metrics: dict, tiou: float) -> Optional[float]:
  for t, m in zip(metrics["tiou_thresholds"], metrics["mAP"]):
    if abs(t - tiou) < 1e-6:
      return float(m)
  return None


def code_digest() -> str:
  """12 hex digits of SHA-256 over asl_tf/**.py, configs/* and benchmarks/*.flags (names and
  contents): runs trained by equal digests ran the same code."""
  digest = hashlib.sha256()
  paths = []
  for sub, suffix in (("asl_tf", ".py"), ("configs", ".flags"), ("benchmarks", ".flags")):
    for folder, _, names in os.walk(os.path.join(_REPO_ROOT, sub)):
      paths += [os.path.join(folder, n) for n in names if n.endswith(suffix)]
  for path in sorted(paths):
    digest.update(os.path.relpath(path, _REPO_ROOT).encode() + b"\0")
    with open(path, "rb") as f:
      digest.update(f.read() + b"\0")
  return digest.hexdigest()[:12]


def snapshot_code(dest: str) -> dict:
  """Copies asl_tf/, configs/ and benchmarks/*.flags into `dest` and links runs/ back.

  An existing snapshot is reused, so a resumed grid runs the same code. `main` names the folder
  after `code_digest()`, so an edited tree gets a new snapshot while finished runs are kept.

  Returns:
    `root` (dest) and `git_head` / `modified` / `taken` (the working tree the copy came from).
  """
  info_path = os.path.join(dest, "snapshot.json")
  if os.path.exists(info_path):
    with open(info_path) as f:
      return json.load(f)
  # Built under a private name and renamed into place, so two grids started together never
  # see (or delete) each other's half-made copy: `dest` exists only complete.
  building = f"{dest}.building-{os.getpid()}"
  ignore = shutil.ignore_patterns("__pycache__")
  shutil.copytree(os.path.join(_REPO_ROOT, "asl_tf"), os.path.join(building, "asl_tf"),
                  ignore=ignore)
  shutil.copytree(os.path.join(_REPO_ROOT, "configs"), os.path.join(building, "configs"))
  os.makedirs(os.path.join(building, "benchmarks"))
  for name in os.listdir(os.path.join(_REPO_ROOT, "benchmarks")):
    if name.endswith(".flags"):
      shutil.copy(os.path.join(_REPO_ROOT, "benchmarks", name),
                  os.path.join(building, "benchmarks"))
  os.makedirs(os.path.join(_REPO_ROOT, "runs"), exist_ok=True)
  os.symlink(os.path.join(_REPO_ROOT, "runs"), os.path.join(building, "runs"))

  def git(*args):
    return subprocess.run(["git", *args], cwd=_REPO_ROOT, capture_output=True, text=True,
                          check=False).stdout.strip()

  info = {"root": dest, "git_head": git("rev-parse", "HEAD"),
          "modified": git("status", "--short", "--", "asl_tf", "configs").splitlines(),
          "taken": time.strftime("%Y-%m-%d %H:%M:%S")}
  with open(os.path.join(building, "snapshot.json"), "w") as f:
    json.dump(info, f, indent=1)
  try:
    os.rename(building, dest)
  except OSError:  # another grid finished the same snapshot first: use theirs
    shutil.rmtree(building)
    with open(info_path) as f:
      return json.load(f)
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
            "code": os.path.basename(code_root),
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


def collect_runs(runs_dir: str) -> List[dict]:
  """The records (`ablation_run.json`) of every finished run under `runs_dir`, also of
  variants this copy of the script does not define (a grid started with an older VARIANTS
  list must not drop a newer grid's runs from the table); sorted like `merge_runs`."""
  runs = []
  folders = sorted(os.listdir(runs_dir)) if os.path.isdir(runs_dir) else []
  for folder in folders:
    if folder.startswith("code_") or not os.path.isdir(os.path.join(runs_dir, folder)):
      continue
    for name in sorted(os.listdir(os.path.join(runs_dir, folder))):
      path = os.path.join(runs_dir, folder, name, "ablation_run.json")
      if os.path.exists(path):
        with open(path) as f:
          record = json.load(f)
        if str(record.get("variant", "")).lstrip("+") == folder:
          runs.append(record)
  return merge_runs([], runs)


def merge_runs(recorded: Sequence[dict], found: Sequence[dict]) -> List[dict]:
  """The records of an earlier report (`recorded`, e.g. from a checkout whose runs/ is gone)
  with this checkout's finished runs (`found`); a found run replaces the recorded one of the
  same variant and seed unless it failed (no `average_mAP`) where the recorded one did not.
  Sorted like `collect_runs`; variants no longer defined are kept, last."""
  merged = {(r["variant"], r["seed"]): r for r in recorded}
  for r in found:
    old = merged.get((r["variant"], r["seed"]))
    if old is None or "average_mAP" in r or "average_mAP" not in old:
      merged[(r["variant"], r["seed"])] = r
  order = {v: i for i, v in enumerate(VARIANTS)}
  return sorted(merged.values(),
                key=lambda r: (order.get(r["variant"], len(order)), r["variant"], r["seed"]))


def load_recorded_report(output: str, dataset: str, extra_flags: Sequence[str]) -> dict:
  """An earlier report at `output` ({} when there is none), its run records checked.

  Raises:
    ValueError: one line naming the file, when it is not such a report or was written for
      another dataset or other extra flags (its records would mix into this table).
  """
  if not os.path.exists(output):
    return {}
  try:
    with open(output) as f:
      report = json.load(f)
    runs = report["runs"]
    if not all(isinstance(r, dict) and "variant" in r and "seed" in r for r in runs):
      raise TypeError("a run record without variant / seed")
  except (OSError, ValueError, TypeError, KeyError) as e:
    raise ValueError(f"{output}: not an ablation report ({type(e).__name__}: {e}); move it "
                     "away or pass another --output") from None
  if (report.get("dataset"), list(report.get("extra_flags", []))) != (dataset, list(extra_flags)):
    raise ValueError(f"{output}: written for --dataset={report.get('dataset')} --extra_flags="
                     f"'{' '.join(report.get('extra_flags', []))}', not --dataset={dataset} "
                     f"--extra_flags='{' '.join(extra_flags)}'; pass another --output")
  return report


def _write_atomic(path: str, text: str) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)


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
           # Runs of one row may come from different code snapshots (each record names its own).
           "code": sorted({r.get("code", "") for r in ok}),
           "per_seed_average_mAP": [round(100.0 * r["average_mAP"], 2) for r in ok],
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
  lines += ["| variant | seeds | average mAP (%) | mAP@0.5 (%) | per seed (average mAP) | "
            "time / run (s) |", "|---|---|---|---|---|---|"]
  for variant, row in summary.items():
    per_seed = " / ".join(f"{v:.2f}" for v in row.get("per_seed_average_mAP", []))
    lines.append(f"| {variant} | {row['n']} | {row['average_mAP_mean']:.2f} +- "
                 f"{row['average_mAP_std']:.2f} | {row['mAP_at_0_5_mean']:.2f} +- "
                 f"{row['mAP_at_0_5_std']:.2f} | {per_seed} | {row['mean_wall_sec']:.0f} |")
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
  parser.add_argument("--report_only", action="store_true",
                      help="rewrite the JSON / Markdown from the finished runs and the records "
                      "the JSON holds, train nothing")
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
  try:  # checked before any training; re-read at each report (other grids write it too)
    recorded = load_recorded_report(output, args.dataset, extra)
  except ValueError as e:
    parser.error(str(e))
  # `code` / `machine`: a report alone keeps the recorded snapshot and host; a grid records the
  # snapshot it trains with and this host.
  code, machine = recorded.get("code", {"report_only": True}), recorded.get("machine")
  if not args.report_only:
    if args.dataset in GENERATED:
      module, name = GENERATED[args.dataset]
      generator = importlib.import_module(module)
      out = os.path.join(_REPO_ROOT, "runs", f"sensitivity_{name}" if name else module)
      print(generator.generate(name, out) if name else generator.generate(out), flush=True)
    code, machine = snapshot_code(os.path.join(runs_dir, "code_" + code_digest())), None
  flagfile = os.path.join(code.get("root", ""), DATASETS[args.dataset])

  def report():
    # Every finished run under runs_dir, so grids run side by side (e.g. one per core under
    # taskset) each write the whole table, and every run the output already records (runs/ is
    # not committed: a fresh checkout keeps the earlier sessions' records).
    report_so_far = load_recorded_report(output, args.dataset, extra)
    runs = merge_runs(report_so_far.get("runs", []), collect_runs(runs_dir))
    # A variant's recorded flags stay (its runs trained with them; each run's `command` has
    # its own); the script's definition only for a variant recorded for the first time.
    variants = dict(report_so_far.get("variants", {}))
    for v in sorted({r["variant"] for r in runs} - set(variants)):
      if v in VARIANTS:
        variants[v] = list(VARIANTS[v])
    result = {"benchmark": "ablation", "dataset": args.dataset,
              "flagfile": DATASETS[args.dataset], "extra_flags": extra,
              "variants": dict(sorted(variants.items())),
              "summary": summarize(runs), "runs": runs, "code": code,
              "machine": machine or common.machine_info()}
    title = f"{args.dataset} ({DATASETS[args.dataset]} {' '.join(extra)})".replace(" )", ")")
    _write_atomic(output, json.dumps(result, indent=1, default=common.json_default))
    _write_atomic(os.path.splitext(output)[0] + ".md", markdown_table(result["summary"], title))
    return result["summary"]

  # Seed-major order: an interrupted grid still covers every variant.
  for seed in seeds if not args.report_only else ():
    for variant in variants:
      record = run_one(flagfile, variant, seed,
                       os.path.join(runs_dir, variant.lstrip("+"), f"seed{seed}"), extra,
                       code["root"])
      print(json.dumps(record), flush=True)
      report()
  print(markdown_table(report()))


if __name__ == "__main__":
  main()
