"""Imports a PyTorch ActionFormer / ASL checkpoint into an asl_tf run folder.

  python -m asl_tf.tools.import_torch --flagfile=configs/thumos_i3d.flags \
      --torch_checkpoint=epoch_034.pth.tar --output=runs/thumos_imported \
      [--nouse_ema] [--allow_missing] [--allow_unused] [--export_dir=export/models/thumos]

The flags describe the model (a PyTorch checkpoint holds weights only). The checkpoint is read
without PyTorch and without unpickling anything but tensors (`asl_tf.tools.torch_checkpoint`),
checked against the flags (levels, classes, dims, head layers, norms, LayerScale, ASL class-level
parameters; see `asl_tf.modeling.weight_mapping`) before any weight is copied, and written as a
run folder that `asl_tf.inference.load_model`, `asl_tf.evaluate` and `asl_tf.export` accept:
`<output>/config.json` and `<output>/checkpoints/ckpt-<epoch>` (written by `RunCheckpointer` as
training does, but without optimizer state, so the imported weights are used as they are).
Attention heads, windows and the absolute position encoding leave no trace in the weights: they
come from the flags, and the report prints them.

What is mapped: every ActionFormer weight (backbone, neck, heads, Scale) and, when present, the ASL
class-level Gaussians `mu`, `sigma`, `mu_reg_left`, `sigma_reg_left`, `mu_reg_right`,
`sigma_reg_right` ([K, 1] in PyTorch, [K] here; with `--sensitivity_parametrization=stable` sigma
is stored as rho = softplus^-1(sigma - SIGMA_FLOOR)). Strictness:
- an ActionFormer weight the detector needs but the checkpoint lacks is always an error;
- a checkpoint tensor that nothing maps (e.g. the authors' extra heads) is an error unless
  `--allow_unused`;
- a trainable ASL-only variable the checkpoint lacks (instance evaluator, mu / sigma, a contrastive
  projection, where on, of a plain ActionFormer checkpoint) is an error unless `--allow_missing`,
  which keeps it at its initialization. These parts only shape the training losses, so
  detections do not depend on them; fine-tuning starts them from scratch.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
from typing import Dict, List, Mapping, Tuple

import numpy as np
from absl import app
from absl import flags
from absl import logging

from asl_tf import config as config_lib
from asl_tf import flags as asl_flags
from asl_tf.tools import torch_checkpoint

flags.DEFINE_string("torch_checkpoint", "", "ActionFormer / ASL .pth.tar to import.")
flags.DEFINE_boolean("use_ema", True, "import state_dict_ema (what ActionFormer evaluates); "
                     "--nouse_ema imports the raw state_dict.")
flags.DEFINE_string("output", "", "run folder to write (config.json, checkpoints/).")
flags.DEFINE_boolean("allow_missing", False, "keep ASL-only variables the source lacks "
                     "(instance evaluator, mu / sigma, contrastive projection) at their "
                     "initialization instead of failing.")
flags.DEFINE_boolean("allow_unused", False, "skip checkpoint tensors that nothing maps instead "
                     "of failing.")
HELP_GROUPS = {"import": ("torch_checkpoint", "output", "use_ema", "allow_missing",
                          "allow_unused"),
               "model": ("input_dim", "num_classes", "max_seq_len") + asl_flags.MODEL_FLAGS
                        + asl_flags.ASL_FLAGS[:2]}

# The authors' class-level parameter names, each [K, 1]: (mu, sigma) per Gaussian.
SENSITIVITY_KEYS = ("mu", "sigma", "mu_reg_left", "sigma_reg_left", "mu_reg_right",
                    "sigma_reg_right")


class ImportTorchError(ValueError):
  """The checkpoint cannot be imported with these flags; the message says what differs."""


@dataclasses.dataclass
class ImportReport:
  """What `import_checkpoint` did.

  Attributes:
    source: the PyTorch checkpoint read.
    state_dict_key: `state_dict_ema` or `state_dict`.
    checkpoint: the asl_tf checkpoint prefix written (`<output>/checkpoints/ckpt-<epoch>`).
    epoch: the source's `epoch` (0 when it has none).
    loaded: source keys copied into the detector.
    unused: source keys nothing maps (skipped with `allow_unused`).
    kept_at_init: trainable detector variables not in the source (kept with `allow_missing`).
    unchecked: settings the weights cannot show, taken from the flags (heads, windows, ...).
  """
  source: str
  state_dict_key: str
  checkpoint: str = ""
  epoch: int = 0
  loaded: List[str] = dataclasses.field(default_factory=list)
  unused: List[str] = dataclasses.field(default_factory=list)
  kept_at_init: List[str] = dataclasses.field(default_factory=list)
  unchecked: Dict[str, object] = dataclasses.field(default_factory=dict)

  def summary(self) -> str:
    """A multi-line account: counts, then the names of unused and missing entries."""
    lines = [f"{self.source} [{self.state_dict_key}, epoch {self.epoch}] -> {self.checkpoint}",
             f"  mapped: {len(self.loaded)} tensors",
             f"  unused (in the source, not mapped): {len(self.unused)}"]
    lines += [f"    {name}" for name in self.unused]
    lines.append(f"  not in the source, kept at initialization: {len(self.kept_at_init)}")
    lines += [f"    {name}" for name in self.kept_at_init]
    lines.append("  taken from the flags (the weights cannot show them): "
                 + ", ".join(f"{k}={v}" for k, v in self.unchecked.items()))
    return "\n".join(lines)


def softplus_inverse(y: np.ndarray) -> np.ndarray:
  """rho with softplus(rho) = y, for y > 0 (float64, exact for large y)."""
  y = np.asarray(y, np.float64)
  return np.where(y > 30.0, y, np.log(np.expm1(np.minimum(y, 30.0))))


def _count(state: Mapping[str, np.ndarray], pattern: str) -> int:
  indices = {int(m.group(1)) for m in (re.match(pattern, k) for k in state) if m}
  return max(indices) + 1 if indices else 0


def source_architecture(state: Mapping[str, np.ndarray]) -> Dict[str, object]:
  """What the weights of an ActionFormer / ASL state dict say about its architecture.

  Args:
    state: PyTorch name -> array (DataParallel prefix already stripped).

  Returns:
    dict with whichever of these the weights show: `num_levels` (`reg_head.scale.*`),
    `num_classes` and `head_dim` (`cls_head.cls_head.conv.weight` [K, C, k]), `embd_dim` and
    `input_dim` (`backbone.embd.0.conv.weight` [C, D, k]; D is the input only without the
    multi-stream projection), `fpn_dim` (`neck.fpn_norms.0.weight`), `backbone_arch` (counts
    of embedding convs, stem and branch blocks).
    Attention heads, windows and position encoding leave no trace in the weights.
  """
  arch = {}
  levels = _count(state, r"reg_head\.scale\.(\d+)\.")
  if levels:
    arch["num_levels"] = levels
  cls = state.get("cls_head.cls_head.conv.weight")
  if cls is not None and cls.ndim == 3:
    arch["num_classes"], arch["head_dim"] = int(cls.shape[0]), int(cls.shape[1])
  embd = state.get("backbone.embd.0.conv.weight")
  if embd is not None and embd.ndim == 3:
    arch["embd_dim"] = int(embd.shape[0])
    if "backbone.proj.0.conv.weight" not in state:
      arch["input_dim"] = int(embd.shape[1])
  norm = state.get("neck.fpn_norms.0.weight")
  if norm is not None:
    arch["fpn_dim"] = int(norm.size)
  if "backbone.embd.0.conv.weight" in state:
    arch["backbone_arch"] = (_count(state, r"backbone\.embd\.(\d+)\."),
                             _count(state, r"backbone\.stem\.(\d+)\."),
                             _count(state, r"backbone\.branch\.(\d+)\."))
  return arch


def architecture_problems(source: Mapping[str, object],
                          model_config: config_lib.ModelConfig) -> List[str]:
  """Differences between `source_architecture(...)` and the flags' ModelConfig.

  Returns:
    one line per difference, naming both values and the flag to change.
  """
  mc = model_config
  embd, stem, _ = mc.backbone_arch
  expected = {
      "num_levels": ("pyramid levels", mc.num_levels,
                     lambda v: f"--backbone_arch={embd},{stem},{v - 1}"),
      "num_classes": ("classes", mc.num_classes, lambda v: f"--num_classes={v}"),
      "head_dim": ("head dim", mc.head_dim, lambda v: f"--head_dim={v}"),
      "embd_dim": ("embedding dim", mc.embd_dim, lambda v: f"--embd_dim={v}"),
      "input_dim": ("input dim", mc.input_dim, lambda v: f"--input_dim={v}"),
      "fpn_dim": ("neck dim", mc.fpn_dim, lambda v: f"--fpn_dim={v}"),
      "backbone_arch": ("backbone arch", tuple(mc.backbone_arch),
                        lambda v: f"--backbone_arch={','.join(map(str, v))}"),
  }
  problems = []
  for key, (what, flag_value, hint) in expected.items():
    if key in source and source[key] != flag_value:
      problems.append(f"{what}: checkpoint has {source[key]}, the flags {flag_value} "
                      f"(set {hint(source[key])})")
  return problems


def sensitivity_values(state: Mapping[str, np.ndarray],
                       model_config: config_lib.ModelConfig) -> Dict[str, np.ndarray]:
  """The ASL class-level parameters of a state dict, converted to the detector's variables.

  Args:
    state: PyTorch name -> array (prefix already stripped); `mu`, `sigma`, ... are [K, 1].
    model_config: `num_classes`, `sensitivity_parametrization` and `sensitivity_sigma_floor`.

  Returns:
    `{source name: float32 [K]}`, each the value of the matching detector variable (with the
    `stable` parametrization, sigma becomes rho = softplus^-1(sigma - floor), floor =
    `sensitivity_sigma_floor`). Empty when
    class-level sensitivity is off (the source keys are then reported as unused).

  Raises:
    ImportTorchError: a parameter that is not [K, 1] / [K] with the flags' K, or a sigma at or
      below the sigma floor with the `stable` parametrization.
  """
  if not model_config.class_sensitivity:
    return {}
  floor = model_config.sensitivity_sigma_floor
  out, problems = {}, []
  for name in SENSITIVITY_KEYS:
    if name not in state:
      continue
    value = np.asarray(state[name])
    if value.ndim not in (1, 2) or (value.ndim == 2 and value.shape[1] != 1):
      problems.append(f"{name} has shape {list(value.shape)}; expected [K, 1] or [K]")
      continue
    if value.shape[0] != model_config.num_classes:
      problems.append(f"{name}: checkpoint has {value.shape[0]} classes (shape "
                      f"{list(value.shape)}), the flags {model_config.num_classes} "
                      "(--num_classes)")
      continue
    value = value.reshape(-1).astype(np.float64)
    if name.startswith("sigma") and model_config.sensitivity_parametrization == "stable":
      if not np.all(value > floor):
        problems.append(
            f"{name} has values down to {value.min():.6g}, at or below the floor {floor} "
            "of the stable parametrization (sigma = softplus(rho) + floor); import with "
            "--sensitivity_parametrization=authors or a lower --sensitivity_sigma_floor")
        continue
      value = softplus_inverse(value - floor)
    out[name] = value.astype(np.float32)
  if problems:
    raise ImportTorchError("the ASL class-level parameters do not fit the flags; nothing was "
                           "copied:\n  - " + "\n  - ".join(problems))
  return out


def _sensitivity_mapping(detector, names) -> Dict[str, Tuple[object, str]]:
  """`extra_mapping` entries for `weight_mapping.load_actionformer_weights`."""
  if not names:
    return {}
  if detector.model_config.sensitivity_lr_scale != 1.0:
    raise config_lib.ConfigError(
        f"--sensitivity_lr_scale={detector.model_config.sensitivity_lr_scale}: mu / sigma are "
        "then stored scaled; import with --sensitivity_lr_scale=1")
  variables = {v.name: v for v in detector.sensitivity.sensitivity_variables}
  stable = detector.model_config.sensitivity_parametrization == "stable"
  return {name: (variables[name + "_rho" if stable and name.startswith("sigma") else name],
                 "plain") for name in names}


def import_checkpoint(config: config_lib.Config, torch_checkpoint_path: str, output_dir: str,
                      use_ema: bool = True, allow_missing: bool = False,
                      allow_unused: bool = False) -> Tuple[object, ImportReport]:
  """Imports a PyTorch ActionFormer / ASL checkpoint into a new asl_tf run folder.

  Args:
    config: the resolved configuration (the model must match the checkpoint).
    torch_checkpoint_path: a `torch.save` file with `state_dict` / `state_dict_ema`.
    output_dir: the run folder to write; it must not hold checkpoints or a config.json yet. It
      gets `class_names.json` too when the flags name an annotation file.
    use_ema: import `state_dict_ema` (else `state_dict`).
    allow_missing: keep trainable ASL-only variables absent from the source at their
      initialization instead of raising.
    allow_unused: skip source tensors nothing maps instead of raising.

  Returns:
    (detector with the imported weights, `ImportReport`).

  Raises:
    torch_checkpoint.CheckpointError: unreadable or unsafe checkpoint.
    weight_mapping.WeightMappingError / ImportTorchError: the checkpoint does not fit the
      configuration (nothing is copied or written), or the mapping is incomplete.
  """
  ckpt = torch_checkpoint.load_torch_checkpoint(torch_checkpoint_path)
  state = torch_checkpoint.select_state_dict(ckpt, use_ema)
  epoch = ckpt.get("epoch", 0)
  epoch = epoch if isinstance(epoch, int) and epoch >= 0 else 0
  report = ImportReport(source=str(torch_checkpoint_path),
                        state_dict_key="state_dict_ema" if use_ema else "state_dict",
                        epoch=epoch,
                        unchecked={"n_head": config.model.n_head,
                                   "mha_win_size": config.model.mha_win_size,
                                   "use_abs_pe": config.model.use_abs_pe})
  problems = architecture_problems(source_architecture(state), config.model)
  if problems:
    raise ImportTorchError("the checkpoint does not match the flags; nothing was copied:\n  - "
                           + "\n  - ".join(problems))
  diverged = sorted(k for k, v in state.items()
                    if isinstance(v, np.ndarray) and np.issubdtype(v.dtype, np.floating)
                    and not np.isfinite(v).all())
  if diverged:
    raise ImportTorchError(f"{torch_checkpoint_path}: NaN or Inf in {len(diverged)} tensors of "
                           f"{report.state_dict_key} ({', '.join(diverged[:5])}"
                           f"{', ...' if len(diverged) > 5 else ''}): the run had diverged; "
                           "import an earlier epoch's checkpoint")
  converted = sensitivity_values(state, config.model)
  # TensorFlow is imported once the checkpoint has been read and checked: mistakes fail fast.
  from asl_tf import inference  # pylint: disable=g-import-not-at-top
  from asl_tf.modeling import weight_mapping  # pylint: disable=g-import-not-at-top
  from asl_tf.training import checkpoints as ckpt_lib  # pylint: disable=g-import-not-at-top
  # Read from the files (not TensorFlow's state file, which a kill can leave empty).
  held = (ckpt_lib.checkpoint_files(output_dir) + ckpt_lib.best_checkpoint_files(output_dir)
          + [p for p in [os.path.join(output_dir, ckpt_lib.CONFIG_FILE)] if os.path.exists(p)])
  if held:
    raise ImportTorchError(f"--output={output_dir} already holds a run ({held[-1]}); choose a "
                           "new --output")

  model = inference.build_detector(config)
  # Checks the rest of the architecture and every shape, and only then copies.
  mapped = weight_mapping.load_actionformer_weights(
      model, {**state, **converted}, strict=False,
      extra_mapping=_sensitivity_mapping(model, converted))
  if mapped.missing:
    raise ImportTorchError("the checkpoint lacks ActionFormer weights the detector needs; "
                           "nothing was written:\n  - "
                           + "\n  - ".join(mapped.missing))
  report.loaded = mapped.loaded
  report.unused = mapped.unused
  report.kept_at_init = list(mapped.other_targets)
  problems = []
  if report.unused and not allow_unused:
    problems.append(f"{len(report.unused)} checkpoint tensors are not mapped (pass "
                    "--allow_unused to skip them, or switch on the part they belong to, e.g. "
                    "--class_sensitivity for mu / sigma): " + ", ".join(report.unused))
  if report.kept_at_init and not allow_missing:
    problems.append(f"{len(report.kept_at_init)} trainable variables are not in the checkpoint "
                    "(pass --allow_missing to keep them at initialization, or switch the ASL "
                    "parts off: --noclass_sensitivity --noinstance_sensitivity "
                    "--contrastive_weight=0): " + ", ".join(report.kept_at_init))
  if problems:
    raise ImportTorchError("incomplete mapping; nothing was written:\n  - "
                           + "\n  - ".join(problems))

  try:  # read before anything is written
    names = _class_names(config)
  except ValueError as e:  # the names are a check for later evaluations, not the import itself
    logging.warning("class names not recorded (%s): evaluate will not check annotation files' "
                    "label ids against them", e)
    names = ()
  os.makedirs(output_dir, exist_ok=True)
  saved = dataclasses.replace(config,
                              train=dataclasses.replace(config.train, output_dir=output_dir))
  saved.save(os.path.join(output_dir, ckpt_lib.CONFIG_FILE))
  if names:  # what evaluate checks an annotation file's label ids against, as for a trained run
    ckpt_lib.write_class_names(output_dir, names)
  # The layout training writes, without optimizer state (load_model then uses these weights).
  try:
    report.checkpoint = ckpt_lib.RunCheckpointer(output_dir, keep=1, model=model).save(epoch)
  except ckpt_lib.CheckpointError as e:
    raise ImportTorchError(str(e)) from e
  return model, report


def _class_names(config: config_lib.Config) -> Tuple[str, ...]:
  """The annotation file's class names; () when there is none (the export then names them)."""
  if not config.data.annotation_file or not os.path.exists(config.data.annotation_file):
    return ()
  from asl_tf.data import annotations  # pylint: disable=g-import-not-at-top
  _, report = annotations.load_annotations(
      config.data.annotation_file, config.data.eval_subset, num_classes=config.data.num_classes,
      annotation_format=config.data.annotation_format,
      label_map_file=config.data.label_map_file, default_fps=config.data.default_fps,
      fps_override=config.data.fps_override)
  return tuple(report.class_names)


def main(argv):
  del argv
  flag_values = asl_flags.FLAGS
  try:
    config = asl_flags.build_config()
    if not flag_values.torch_checkpoint:
      raise ImportTorchError("pass --torch_checkpoint=FILE.pth.tar")
    if not flag_values.output:
      raise ImportTorchError("pass --output=RUN_DIR (the run folder to write)")
    model, report = import_checkpoint(
        config, flag_values.torch_checkpoint, flag_values.output, use_ema=flag_values.use_ema,
        allow_missing=flag_values.allow_missing, allow_unused=flag_values.allow_unused)
  except (config_lib.ConfigError, torch_checkpoint.CheckpointError, ValueError, OSError) as e:
    sys.exit(f"asl_tf.tools.import_torch: {e}")
  print(report.summary())
  print(f"wrote {flag_values.output}: evaluate with python -m asl_tf.evaluate "
        f"--checkpoint={flag_values.output}")
  if flag_values["export_dir"].present:
    from asl_tf.serving import module as serving_module  # pylint: disable=g-import-not-at-top
    try:
      path = serving_module.export_saved_model(model, config, flag_values.export_dir, version=0,
                                               class_names=_class_names(config))
    except (serving_module.ExportError, ValueError, OSError) as e:
      sys.exit(f"asl_tf.tools.import_torch: export failed: {e}")
    print(f"exported the SavedModel to {path}")


if __name__ == "__main__":
  app.run(main, flags_parser=asl_flags.cli_parser("asl_tf.tools.import_torch", HELP_GROUPS))
