"""Frozen configuration objects for asl_tf: the one place where defaults are written.

Each field is a command-line flag of the same name (`eval.batch_size` is `--eval_batch_size`;
`asl_tf/flags.py` generates them: type and default from the field, help from the `Attributes:`
entry of the class docstring). Flags are read
once by the entry points and turned into these dataclasses with `from_flags`; library code only
ever sees the dataclasses. `Config.to_json` /
`Config.from_json` round-trip the resolved configuration, which is written beside every output.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import typing
from typing import Any, Dict, Optional, Sequence, Tuple

from asl_tf import files

ANNOTATION_FORMATS = ("auto", "actionformer", "flat", "activitynet")
NMS_METHODS = ("soft", "hard", "none")
SENSITIVITY_PARAMETRIZATIONS = ("authors", "stable")
INSTANCE_COMBINATIONS = ("product", "sum")
SENSITIVITY_NORMALIZATIONS = ("none", "instance", "video")
INSTANCE_WEIGHTED_LOSSES = ("both", "classification", "regression")
EVALUATOR_TARGETS = ("separate", "fused")
EVALUATOR_LOSSES = ("mse", "bce")
EVALUATOR_POINTS = ("positives", "inside_gt")
CONTRASTIVE_SAMPLINGS = ("sensitivity_topk", "windows", "windows_clear_background")
MIXED_PRECISION_POLICIES = ("float32", "mixed_float16", "mixed_bfloat16")
# How layers compute (asl_tf/modeling/kernels.py); the values are the same under each.
KERNEL_POLICIES = ("auto", "reference", "fast", "portable")
ADAMW_FORMS = ("pytorch", "keras")
# Model fields that change how, not what, the model computes: a flag may change them for a
# trained checkpoint.
RUNTIME_MODEL_FIELDS = ("kernel_policy",)
# The string fields that take one of a fixed set of values (their flags are enums).
FIELD_CHOICES = {
    "annotation_format": ANNOTATION_FORMATS, "on_bad_feature": ("error", "skip"),
    "sensitivity_parametrization": SENSITIVITY_PARAMETRIZATIONS,
    "instance_combination": INSTANCE_COMBINATIONS,
    "instance_weighted_losses": INSTANCE_WEIGHTED_LOSSES,
    "sensitivity_normalization": SENSITIVITY_NORMALIZATIONS,
    "evaluator_target": EVALUATOR_TARGETS, "evaluator_loss": EVALUATOR_LOSSES,
    "evaluator_points": EVALUATOR_POINTS,
    "contrastive_sampling": CONTRASTIVE_SAMPLINGS,
    "kernel_policy": KERNEL_POLICIES, "mixed_precision": MIXED_PRECISION_POLICIES,
    "adamw_form": ADAMW_FORMS,
    "inference_precision": MIXED_PRECISION_POLICIES,
    "nms_method": NMS_METHODS,
}
# Fields whose flag has another name than the field; every other field's flag is its name (a
# name in two sections, such as input_dim, is one flag that sets both).
_FLAG_OF_FIELD = {("eval", "batch_size"): "eval_batch_size"}


def flag_name(section: str, field: str) -> str:
  """The command-line flag of `Config.<section>.<field>`."""
  return _FLAG_OF_FIELD.get((section, field), field)


class ConfigError(ValueError):
  """A configuration that cannot work; the message says what to change."""


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Where the videos are and how seconds map onto the feature grid.

  Attributes:
    annotation_file: annotation JSON (ActionFormer, flat dict or official ActivityNet layout).
    annotation_format: `auto` (detected from the file), `actionformer`, `flat` or
      `activitynet`.
    label_map_file: optional file pinning label ids (JSON `{name: id}` or one name per line).
    feature_dir: one folder per feature stream; streams are concatenated on channels.
    feature_ext: file extension, `.npy` or `.npz` (with or without the dot).
    npz_key: array name inside `.npz` files.
    file_prefix: prepended to the video id to form the file name (ANet: `v_`).
    file_suffix: appended to the video id before the extension.
    train_subset: subset name used for training (case-insensitive).
    eval_subset: subset name used for evaluation (case-insensitive).
    input_dim: total channels C after concatenating all streams.
    num_classes: number of classes K (1 for class-agnostic ANet proposals).
    feat_stride: input frames between consecutive features.
    num_frames: input frames seen by one feature.
    default_fps: fps used when the annotation gives none.
    fps_override: if > 0, every video uses this fps and the annotation's is ignored
      (ActionFormer's `default_fps` on ANet TSP features, extracted at 15 fps).
    max_seq_len: training length T (padding / truncation target), in grid units.
    resize_length: if > 0, every video is linearly resized to this many features (ANet 192);
      feat_stride / num_frames are then recomputed per video.
    trunc_thresh: minimum kept fraction of an action when a long video is truncated.
    crop_ratio: (lo, hi) random crop length ratio for short training videos, or None.
    max_segments: ground truth per video is padded (label -1) or truncated to this many.
    on_bad_feature: `error` (default) or `skip` (counted) for unreadable feature files.
    demo_dir: where `data/demo.py` writes the embedded demo dataset ('' = not a demo).
  """
  annotation_file: str = ""
  annotation_format: str = "auto"
  label_map_file: str = ""
  feature_dir: Tuple[str, ...] = ()
  feature_ext: str = ".npy"
  npz_key: str = "feats"
  file_prefix: str = ""
  file_suffix: str = ""
  train_subset: str = "training"
  eval_subset: str = "validation"
  input_dim: int = 2048
  num_classes: int = 20
  feat_stride: float = 16.0
  num_frames: float = 16.0
  default_fps: float = 30.0
  fps_override: float = 0.0
  max_seq_len: int = 2304
  resize_length: int = 0
  trunc_thresh: float = 0.5
  crop_ratio: Optional[Tuple[float, float]] = None
  max_segments: int = 100
  on_bad_feature: str = "error"
  demo_dir: str = ""

  def __post_init__(self):
    object.__setattr__(self, "feature_ext", normalize_ext(self.feature_ext))
    object.__setattr__(self, "feature_dir", tuple(self.feature_dir))
    if self.crop_ratio is not None:
      object.__setattr__(self, "crop_ratio", tuple(float(r) for r in self.crop_ratio))


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Detector architecture (ActionFormer ConvTransformer + ASL evaluator).

  Attributes:
    input_dim: total input channels C.
    stream_dims: per-stream channels for the Ego4D multi-stream input projection (empty = one
      stream); must sum to input_dim.
    stream_proj_dims: per-stream projected channels (same length as stream_dims).
    num_classes: K.
    max_seq_len: training length T; also the absolute position-encoding table length.
    backbone_arch: (embedding convs, stem blocks, branch blocks); levels = branch + 1.
    scale_factor: downsampling between levels (2).
    embd_dim: embedding and transformer channels.
    embd_kernel_size: kernel size of the embedding convolutions.
    embd_with_ln: LayerNorm after each embedding convolution.
    fpn_dim: channels of the identity neck (equal to embd_dim).
    fpn_with_ln: LayerNorm on each neck output.
    head_dim: channels of the shared heads.
    head_num_layers: conv layers of each head (hidden layers + output layer).
    head_kernel_size: kernel size of the head convolutions.
    head_with_ln: LayerNorm after each hidden head convolution.
    n_head: attention heads.
    mha_win_size: local window per level; <= 1 (e.g. -1) means global attention.
    use_abs_pe: add the sinusoidal absolute position encoding after the embedding.
    dropout: attention projection / MLP dropout.
    droppath: stochastic depth (LayerScale, init 1e-4, is present only when > 0).
    cls_prior_prob: classification bias prior (bias = -log((1 - p) / p)).
    head_empty_cls: class ids without training data (bias for p = 1e-6); empty: training takes
      the ids that no class name in the annotation file (or label map) has, as ActionFormer.
    regression_range: per level (lo, hi) in base-grid units (on the command line flattened:
      lo0,hi0,lo1,hi1,...).
    class_sensitivity: ASL class-level Gaussian weights (the authors' code, exactly with
      --sensitivity_normalization=none; the default normalises them per instance); off by
      default: on top of the instance level it measured -0.01 / +0.06 average mAP (6 seeds,
      docs/ablation.md).
    sensitivity_parametrization: `authors` (raw sigma, weight decay as in the released code) or
      `stable` (sigma = softplus(rho) + eps, no weight decay on mu / sigma).
    sensitivity_lr_scale: learning-rate multiplier of the class-level mu / sigma (they are
      stored divided by it; 1 = as released). AdamW's decoupled weight decay is not scaled with
      it: relative to the larger steps mu / sigma decay 1 / scale as fast.
    sensitivity_sigma_floor: lower bound of the class-level sigmas with `stable` (in (0, 1)).
    instance_sensitivity: ASL instance-level evaluator.
    evaluator_layers: hidden conv layers of the instance evaluator (0: one conv from the
      features to (q_cls, q_loc), the setting measured best; 2 before that search).
    evaluator_feature_gradient: the evaluator's loss also trains the neck and backbone below
      it (an auxiliary task on the shared features); False = stop-gradient features, so it
      learns only its own weights.
    contrastive_weight: weight of the action-sensitive contrastive loss (0 = off; 0.1, with
      the authors' windows, the default the ablation chose: +0.63 / +0.13 average mAP over
      0.03 on the THUMOS-shaped / dense set, 6 seeds, the dense one within the seeds' noise;
      docs/ablation.md).
    contrastive_proj_dim: output channels of a projection MLP for the contrastive loss; 0 (the
      default: +0.13 / +0.20 average mAP over a 128-d MLP, 6 seeds, docs/ablation.md) compares
      the unit-normalised level-0 features themselves, as the authors' function does.
    kernel_policy: how the layers compute (`reference`, `fast`, `portable` or `auto`; see
      asl_tf/modeling/kernels.py). The same values under each (to float32 rounding; to
      bfloat16 rounding for bfloat16 inference), so it can differ between training and
      evaluation.
  """
  input_dim: int = 2048
  stream_dims: Tuple[int, ...] = ()
  stream_proj_dims: Tuple[int, ...] = ()
  num_classes: int = 20
  max_seq_len: int = 2304
  backbone_arch: Tuple[int, int, int] = (2, 2, 5)
  scale_factor: int = 2
  embd_dim: int = 512
  embd_kernel_size: int = 3
  embd_with_ln: bool = True
  fpn_dim: int = 512
  fpn_with_ln: bool = True
  head_dim: int = 512
  head_num_layers: int = 3
  head_kernel_size: int = 3
  head_with_ln: bool = True
  n_head: int = 4
  mha_win_size: Tuple[int, ...] = (19,)
  use_abs_pe: bool = False
  dropout: float = 0.0
  droppath: float = 0.1
  cls_prior_prob: float = 0.01
  head_empty_cls: Tuple[int, ...] = ()
  regression_range: Tuple[Tuple[float, float], ...] = (
      (0, 4), (4, 8), (8, 16), (16, 32), (32, 64), (64, 10000))
  class_sensitivity: bool = False
  sensitivity_parametrization: str = "authors"
  sensitivity_lr_scale: float = 1.0
  sensitivity_sigma_floor: float = 0.01
  instance_sensitivity: bool = True
  evaluator_layers: int = 0
  evaluator_feature_gradient: bool = False
  contrastive_weight: float = 0.1
  contrastive_proj_dim: int = 0
  kernel_policy: str = "auto"

  def __post_init__(self):
    object.__setattr__(self, "backbone_arch", tuple(int(a) for a in self.backbone_arch))
    object.__setattr__(self, "stream_dims", tuple(int(a) for a in self.stream_dims))
    object.__setattr__(self, "stream_proj_dims", tuple(int(a) for a in self.stream_proj_dims))
    object.__setattr__(self, "head_empty_cls", tuple(int(a) for a in self.head_empty_cls))
    win = tuple(int(w) for w in self.mha_win_size)
    if len(win) == 1:
      win = win * self.num_levels
    object.__setattr__(self, "mha_win_size", win)
    object.__setattr__(self, "regression_range",
                       tuple((float(lo), float(hi)) for lo, hi in self.regression_range))

  @property
  def num_levels(self) -> int:
    """Pyramid levels: the stem output plus one per branch block."""
    return self.backbone_arch[2] + 1

  @property
  def strides(self) -> Tuple[int, ...]:
    """Stride of each pyramid level in base-grid units."""
    return tuple(self.scale_factor ** l for l in range(self.num_levels))

  @property
  def max_div_factor(self) -> int:
    """Every input length must be a multiple of this (ActionFormer's `max_div_factor`)."""
    factor = 1
    for stride, win in zip(self.strides, self.mha_win_size):
      level = stride * (win // 2) * 2 if win > 1 else stride
      factor = max(factor, level)
    return factor


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """Targets and losses.

  Attributes:
    center_sample_radius: centre sampling radius in level strides (<= 0: every point inside a
      ground truth at its level is a positive, which the densely labelled datasets' flagfiles
      set).
    focal_alpha: sigmoid focal loss alpha (weight of the positive targets).
    focal_gamma: sigmoid focal loss gamma (focusing exponent).
    label_smoothing: y <- y (1 - e) + e / (K + 1).
    reg_loss_weight: DIoU loss weight (ActionFormer `loss_weight`; ANet 2.0); <= 0:
      ActionFormer's automatic balance, cls_loss / max(reg_loss, 0.01) each step.
    init_loss_norm: initial value of the EMA positive-count normalizer.
    loss_norm_momentum: EMA momentum of the normalizer (0.9).
    evaluator_loss_weight: weight of the instance evaluator's loss (`evaluator_loss`).
    instance_combination: `product` (w = p * sg(q)) or `sum` (w = p + sg(q)). Without
      normalisation `product` shrinks the weight of positives whose predicted quality q is low,
      which early in training is all of them, and collapsed some runs (README, ASL ablation);
      with `sensitivity_normalization=instance` only the ratios between an instance's frames
      count.
    instance_weight_power: gamma in w = p * sg(q)^gamma (or p + sg(q)^gamma), also in the
      contrastive loss's ranking of sensitive frames: above 1 sharpens the ratios between an
      instance's frames (1 = as reconstructed).
    instance_start_epoch: instance weights are used from this epoch on (the evaluator trains
      from the start).
    instance_weighted_losses: which losses q reweights: `both` (q_cls the focal loss, q_loc the
      DIoU loss), `classification` or `regression` only (the other keeps w = p; the
      contrastive loss's ranking of sensitive frames uses both q either way).
    sensitivity_normalization: `none` (positives keep the combined weights w as they are),
      `instance` (w divided by its mean over the positives of the same ground-truth instance, so
      sensitivity moves weight between an instance's frames without changing its loss mass) or
      `video` (divided by its mean over the video's positives, so weight also moves between a
      video's instances); negatives keep weight 1.
    evaluator_target: `separate` (q_cls -> sigmoid(GT-class logit), q_loc -> tIoU) or `fused`
      (both outputs -> sigmoid(logit)^0.2 * tIoU^0.8, the authors' commented-out target).
    evaluator_loss: `mse` or `bce` (binary cross-entropy of q against the soft targets).
    evaluator_points: the points the evaluator learns from: `positives` (the centre-sampled
      positives its weights act on) or `inside_gt` (also every other point inside a ground
      truth at that GT's pyramid level, with the targets of the shortest GT holding it; the sum
      is still divided by the positive-count normaliser, so it weighs more). Its weights act on
      the positives either way; without `instance_sensitivity` it has no effect.
    contrastive_temperature: InfoNCE temperature tau.
    contrastive_sampling: which features the contrastive loss compares: `sensitivity_topk` (per
      GT the top-k points by class- and by localization-sensitivity, plus background points
      outside every GT), `windows` (the authors' centre, boundary and outside windows; the
      default) or
      `windows_clear_background` (the same, the outside windows without frames inside any GT).
    contrastive_topk: `sensitivity_topk`: sensitive points averaged per instance and sub-task.
    contrastive_num_background: `sensitivity_topk`: background points sampled per video.
    contrastive_window_ratio: `windows*`: half-width of a window as a fraction of the GT's
      length (at least one grid step).
    contrastive_window_gap_grid: `windows*`: distance of the outside windows from the GT.
    video_label_loss_weight: weight of the label-involved loss of the authors' Ego4D code
      (0.2 there; `losses.video_label_loss_sum`): which classes act somewhere in the training
      window, from each class's softmax maximum over the window's points; 0 = off.
  """
  center_sample_radius: float = 1.5
  focal_alpha: float = 0.25
  focal_gamma: float = 2.0
  label_smoothing: float = 0.0
  reg_loss_weight: float = 1.0
  init_loss_norm: float = 100.0
  loss_norm_momentum: float = 0.9
  evaluator_loss_weight: float = 1.0
  instance_combination: str = "product"
  instance_weight_power: float = 1.0
  instance_start_epoch: int = 0
  instance_weighted_losses: str = "both"
  sensitivity_normalization: str = "instance"
  evaluator_target: str = "separate"
  evaluator_loss: str = "bce"
  evaluator_points: str = "positives"
  contrastive_temperature: float = 0.07
  contrastive_sampling: str = "windows"
  contrastive_topk: int = 3
  contrastive_num_background: int = 8
  contrastive_window_ratio: float = 0.2
  contrastive_window_gap_grid: float = 1.0
  video_label_loss_weight: float = 0.0


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Optimization, checkpoints and logging.

  Attributes:
    output_dir: the run folder train writes (config.json, checkpoints/, logs/, eval/); evaluate
      and infer write into the checkpoint's run folder unless it is given.
    epochs: cosine epochs, excluding warm-up (ActionFormer convention).
    warmup_epochs: linear warm-up epochs.
    batch_size: per-replica batch size.
    learning_rate: peak learning rate (not multiplied by the replica count).
    weight_decay: AdamW decay on conv / dense kernels.
    adamw_form: where AdamW adds epsilon. `pytorch` (PyTorch's AdamW, which ActionFormer and
      ASL train with): to the bias-corrected sqrt(v). `keras` (Keras' and TensorFlow's Adam):
      to sqrt(v) before the bias correction, an epsilon 1 / sqrt(1 - beta_2^t) times larger
      (32x at the first step, 1.26x after 1000), which holds back the weights whose gradients
      are near epsilon (those under LayerScale); this project's only form before 2026-12-04.
    sensitivity_weight_decay: apply weight decay to mu / sigma (the authors' code does).
    clip_grad_norm: global L2 clipping (<= 0 = off).
    ema_decay: EMA of weights (0 = off).
    seed: global seed.
    deterministic: enable TF op determinism.
    resume: continue from the latest checkpoint in output_dir.
    keep_checkpoints: epoch checkpoints kept besides the best one.
    eval_every: evaluate on eval_subset every N epochs (0 = only at the end, < 0 = never).
    log_every: steps between TensorBoard scalar writes.
    profile_steps: (start, end) steps to trace, or None.
    mixed_precision: Keras dtype policy: `float32`, `mixed_float16` or `mixed_bfloat16`.
    jit_compile: XLA-compile the train step (single device only).
    num_cpu_devices: split the CPU into N logical devices (tests the distributed path).
  """
  output_dir: str = "runs/default"
  epochs: int = 30
  warmup_epochs: int = 5
  batch_size: int = 2
  learning_rate: float = 1e-4
  weight_decay: float = 0.05
  adamw_form: str = "pytorch"
  sensitivity_weight_decay: bool = True
  clip_grad_norm: float = 1.0
  ema_decay: float = 0.999
  seed: int = 1234567891
  deterministic: bool = False
  resume: bool = False
  keep_checkpoints: int = 3
  eval_every: int = 0
  log_every: int = 10
  profile_steps: Optional[Tuple[int, int]] = None
  mixed_precision: str = "float32"
  jit_compile: bool = False
  num_cpu_devices: int = 0


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """Post-processing and evaluation (ActionFormer test_cfg).

  Attributes:
    tiou_thresholds: thresholds for mAP.
    pre_nms_thresh: minimum sigmoid score kept before NMS.
    pre_nms_topk: candidates kept per level before NMS.
    max_seg_num: detections kept per video.
    min_score: detections below this score after NMS are dropped.
    nms_method: `soft` (Gaussian, score *= exp(-iou^2 / sigma)), `hard` or `none`.
    multiclass_nms: NMS per class; otherwise class-agnostic NMS followed by voting.
    nms_sigma: Soft-NMS sigma.
    iou_threshold: hard-NMS IoU threshold.
    voting_thresh: IoU threshold of score voting (class-agnostic only; <= 0 = off).
    duration_thresh: minimum segment length in grid units.
    ext_score_file: external video-level classifier scores for ANet fusion ('' = none).
    fusion_topk: classes per video used in score fusion.
    batch_size: videos per evaluation batch.
    inference_precision: Keras dtype policy of the evaluate, infer, visualize and export tools
      (evaluation during training runs in `mixed_precision`): `float32`, or
      `mixed_bfloat16` (bfloat16 layers with float32 weights, logits and post-processing; the
      fast mode of CPUs with AMX or AVX512-BF16) or `mixed_float16` (GPUs).
  """
  tiou_thresholds: Tuple[float, ...] = (0.3, 0.4, 0.5, 0.6, 0.7)
  pre_nms_thresh: float = 0.001
  pre_nms_topk: int = 2000
  max_seg_num: int = 200
  min_score: float = 0.001
  nms_method: str = "soft"
  multiclass_nms: bool = True
  nms_sigma: float = 0.5
  iou_threshold: float = 0.1
  voting_thresh: float = 0.7
  duration_thresh: float = 0.05
  ext_score_file: str = ""
  fusion_topk: int = 2
  batch_size: int = 1
  inference_precision: str = "float32"

  def __post_init__(self):
    object.__setattr__(self, "tiou_thresholds", tuple(float(t) for t in self.tiou_thresholds))


@dataclasses.dataclass(frozen=True)
class ExportConfig:
  """SavedModel export.

  Attributes:
    checkpoint: checkpoint file or training output_dir (best, else latest checkpoint).
    export_dir: TF Serving base path; versions are integer sub-folders.
    version: export version (0 = next free integer).
    max_frames: the longest video (features along time) the exported model accepts; longer
      requests are refused as INVALID_ARGUMENT, so a request cannot make the server compute
      without bound (0 = 16 x max_seq_len).
  """
  checkpoint: str = ""
  export_dir: str = "export/models/asl"
  version: int = 0
  max_frames: int = 0


@dataclasses.dataclass(frozen=True)
class Config:
  """Everything one run needs."""
  data: DataConfig = dataclasses.field(default_factory=DataConfig)
  model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
  loss: LossConfig = dataclasses.field(default_factory=LossConfig)
  train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
  eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
  export: ExportConfig = dataclasses.field(default_factory=ExportConfig)

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=2, sort_keys=True)

  @classmethod
  def from_dict(cls, d: dict) -> "Config":
    parts = {}
    for field in dataclasses.fields(cls):
      sub_cls = field.default_factory  # the section's dataclass
      parts[field.name] = _section_from_dict(sub_cls, d.get(field.name, {}))
    return cls(**parts)

  @classmethod
  def from_json(cls, text: str) -> "Config":
    return cls.from_dict(json.loads(text))

  def save(self, path: str) -> None:
    """Writes the resolved configuration as JSON."""
    files.write_text_atomic(path, self.to_json())

  @classmethod
  def load(cls, path: str) -> "Config":
    """Reads a saved config.json.

    Raises:
      ConfigError: naming the file, when it is unreadable, truncated or not a config.
    """
    try:
      with open(path) as f:
        data = json.load(f)
    except OSError as e:
      raise ConfigError(f"{path}: cannot read it ({e.strerror})") from None
    except ValueError as e:
      raise ConfigError(f"{path} is not valid JSON ({e}): the file is damaged (e.g. truncated); "
                        "restore it from a copy of the run or retrain") from None
    if not isinstance(data, dict):
      raise ConfigError(f"{path} holds a {type(data).__name__}, not a saved configuration")
    return cls.from_dict(data)


# Fields older versions saved that never changed a result (dropped when loading them).
_REMOVED_FIELDS = {"ModelConfig": {"max_buffer_len_factor"}}  # the point table has no buffer


def _section_from_dict(section_cls, d: dict):
  known = {f.name for f in dataclasses.fields(section_cls)}
  d = {k: v for k, v in d.items() if k not in _REMOVED_FIELDS.get(section_cls.__name__, ())}
  unknown = sorted(set(d) - known)
  if unknown:
    raise ConfigError(f"unknown {section_cls.__name__} fields {unknown}; "
                      f"known fields are {sorted(known)}")
  kwargs = dict(_BEFORE_THE_FIELD.get(section_cls.__name__, {})) if d else {}
  for key, value in d.items():
    kwargs[key] = _tuplify(value)
  return section_cls(**kwargs)


# What a saved config.json written before a field existed meant, where that differs from the
# field's default today: such a run keeps its behaviour (evaluating or resuming it).
_BEFORE_THE_FIELD = {"LossConfig": {"sensitivity_normalization": "none", "evaluator_loss": "mse"},
                     "TrainConfig": {"adamw_form": "keras"}}


def _tuplify(value: Any) -> Any:
  if isinstance(value, list):
    return tuple(_tuplify(v) for v in value)
  return value


def normalize_ext(ext: str) -> str:
  """`npy` and `.npy` alike -> `.npy`."""
  ext = ext.strip()
  return ext if (not ext or ext.startswith(".")) else "." + ext


def validate(config: Config) -> Config:
  """Checks cross-field consistency; raises ConfigError saying what to change."""
  data, model, loss, train, ev = config.data, config.model, config.loss, config.train, config.eval
  problems = _range_problems(config)
  if problems:  # the checks below divide by some of these
    raise ConfigError("invalid flags:\n  - " + "\n  - ".join(problems))
  if data.input_dim != model.input_dim:
    problems.append(f"data.input_dim={data.input_dim} differs from model.input_dim="
                    f"{model.input_dim}")
  if data.num_classes != model.num_classes:
    problems.append(f"data.num_classes={data.num_classes} differs from model.num_classes="
                    f"{model.num_classes}")
  if data.max_seq_len != model.max_seq_len:
    problems.append(f"data.max_seq_len={data.max_seq_len} differs from model.max_seq_len="
                    f"{model.max_seq_len}")
  if len(model.backbone_arch) != 3 or min(model.backbone_arch) < 0:
    problems.append(f"--backbone_arch={','.join(map(str, model.backbone_arch))} must be three "
                    "non-negative integers (embedding convs, stem blocks, branch blocks)")
  if len(model.mha_win_size) != model.num_levels:
    problems.append(f"--mha_win_size has {len(model.mha_win_size)} entries but the backbone "
                    f"has {model.num_levels} levels (backbone_arch[2] + 1): give one window "
                    "or one per level")
  if len(model.regression_range) != model.num_levels:
    problems.append(f"--regression_range has {len(model.regression_range)} levels but the "
                    f"backbone has {model.num_levels} (backbone_arch[2] + 1); give one "
                    "(lo, hi) pair per level")
  else:
    for l, (lo, hi) in enumerate(model.regression_range):
      if not 0 <= lo < hi:
        problems.append(f"regression_range level {l} = ({lo}, {hi}) needs 0 <= lo < hi")
  if model.max_seq_len % model.max_div_factor:
    problems.append(
        f"--max_seq_len={model.max_seq_len} is not divisible by {model.max_div_factor} "
        f"(max over levels of stride x 2 x (window // 2)); use a multiple such as "
        f"{math.ceil(model.max_seq_len / model.max_div_factor) * model.max_div_factor}")
  if 0 < config.export.max_frames < model.max_seq_len:
    problems.append(f"--max_frames={config.export.max_frames} is below --max_seq_len="
                    f"{model.max_seq_len}: the export's warm-up (and any video of training "
                    "length) would be refused")
  if model.embd_dim % model.n_head:
    problems.append(f"--embd_dim={model.embd_dim} is not divisible by --n_head={model.n_head}")
  if model.fpn_dim != model.embd_dim:
    problems.append(f"--fpn_dim={model.fpn_dim} differs from --embd_dim={model.embd_dim}: the "
                    "neck is the identity (ActionFormer's FPN neck is not implemented); set both "
                    "to one value")
  if model.stream_dims:
    if len(model.stream_dims) != len(model.stream_proj_dims):
      problems.append("--stream_dims and --stream_proj_dims need the same number of entries")
    if sum(model.stream_dims) != model.input_dim:
      problems.append(f"--stream_dims sum to {sum(model.stream_dims)} but --input_dim is "
                      f"{model.input_dim}")
    if len(model.stream_dims) != len(data.feature_dir) and data.feature_dir:
      problems.append(f"{len(model.stream_dims)} --stream_dims for {len(data.feature_dir)} "
                      "--feature_dir folders")
  if data.feature_ext not in (".npy", ".npz"):
    problems.append(f"--feature_ext={data.feature_ext!r}: only .npy and .npz are supported")
  if data.crop_ratio is not None and not (0 < data.crop_ratio[0] <= data.crop_ratio[1] <= 1):
    problems.append(f"--crop_ratio={data.crop_ratio} needs 0 < lo <= hi <= 1")
  if not 0.0 < model.sensitivity_sigma_floor < 1.0:
    problems.append(f"--sensitivity_sigma_floor={model.sensitivity_sigma_floor}: use a value in "
                    "(0, 1) (sigma starts at 1)")
  for section in dataclasses.fields(config):
    for field in dataclasses.fields(getattr(config, section.name)):
      value, choices = getattr(getattr(config, section.name), field.name), FIELD_CHOICES.get(
          field.name)
      if choices is not None and value not in choices:
        problems.append(f"--{flag_name(section.name, field.name)}={value!r}: use one of "
                        f"{choices}")
  if train.profile_steps is not None and not 0 < train.profile_steps[0] <= train.profile_steps[1]:
    problems.append(f"--profile_steps={train.profile_steps} needs 0 < START <= END")
  if problems:
    raise ConfigError("inconsistent configuration:\n  - " + "\n  - ".join(problems))
  return config


# (section, field, test, what its flag needs): single-value ranges checked first; infinity and
# NaN fail every test.
_POSITIVE = lambda v: 0 < v < math.inf  # pylint: disable=unnecessary-lambda-assignment
_POSITIVE_ODD = lambda v: v > 0 and v % 2  # pylint: disable=unnecessary-lambda-assignment
_NON_NEGATIVE = lambda v: 0 <= v < math.inf  # pylint: disable=unnecessary-lambda-assignment
_RANGES = (
    ("data", "input_dim", _POSITIVE, "a positive integer"),
    ("data", "num_classes", _POSITIVE, "a positive integer"),
    ("data", "feat_stride", _POSITIVE, "a positive number of frames"),
    ("data", "num_frames", _NON_NEGATIVE, ">= 0 frames"),
    ("data", "default_fps", _POSITIVE, "a positive fps"),
    ("data", "fps_override", _NON_NEGATIVE, ">= 0 (0 = off)"),
    ("data", "max_seq_len", _POSITIVE, "a positive length"),
    ("data", "resize_length", _NON_NEGATIVE, ">= 0 (0 = off)"),
    ("data", "max_segments", _POSITIVE, "a positive integer"),
    ("data", "trunc_thresh", lambda v: 0 <= v <= 1, "a fraction in [0, 1]"),
    ("model", "embd_dim", _POSITIVE, "a positive integer"),
    ("model", "fpn_dim", _POSITIVE, "a positive integer"),
    ("model", "head_dim", _POSITIVE, "a positive integer"),
    ("model", "n_head", _POSITIVE, "a positive integer"),
    ("model", "embd_kernel_size", _POSITIVE_ODD, "a positive odd integer"),
    ("model", "head_num_layers", _POSITIVE, "a positive integer"),
    ("model", "head_kernel_size", _POSITIVE_ODD, "a positive odd integer"),
    ("model", "scale_factor", lambda v: v >= 2 and v % 2 == 0, "an even integer >= 2"),
    ("model", "dropout", lambda v: 0 <= v < 1, "a probability in [0, 1)"),
    ("model", "droppath", lambda v: 0 <= v < 1, "a probability in [0, 1)"),
    ("model", "cls_prior_prob", lambda v: 0 < v < 1, "a probability in (0, 1)"),
    ("model", "evaluator_layers", _NON_NEGATIVE, ">= 0"),
    ("model", "sensitivity_lr_scale", _POSITIVE, "positive"),
    ("model", "contrastive_weight", _NON_NEGATIVE, ">= 0 (0 = off)"),
    ("model", "contrastive_proj_dim", _NON_NEGATIVE, ">= 0"),
    ("loss", "focal_alpha", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("loss", "focal_gamma", _NON_NEGATIVE, ">= 0"),
    ("loss", "loss_norm_momentum", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("loss", "label_smoothing", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("loss", "reg_loss_weight", math.isfinite, "finite (<= 0: the automatic balance)"),
    ("loss", "init_loss_norm", _POSITIVE, "positive"),
    ("loss", "evaluator_loss_weight", _NON_NEGATIVE, ">= 0"),
    ("loss", "video_label_loss_weight", _NON_NEGATIVE, ">= 0 (0 = off)"),
    ("loss", "instance_start_epoch", _NON_NEGATIVE, ">= 0"),
    ("loss", "instance_weight_power", _POSITIVE, "positive and finite (1 = q as it is)"),
    ("loss", "contrastive_temperature", _POSITIVE, "positive"),
    ("loss", "contrastive_topk", _POSITIVE, "a positive integer"),
    ("loss", "contrastive_num_background", _POSITIVE,
     "a positive integer"),
    ("loss", "contrastive_window_ratio", _POSITIVE, "positive"),
    ("loss", "contrastive_window_gap_grid", _NON_NEGATIVE, ">= 0"),
    ("train", "epochs", _POSITIVE, "at least 1 (cosine epochs after the warm-up)"),
    ("train", "warmup_epochs", _NON_NEGATIVE, ">= 0"),
    ("train", "batch_size", _POSITIVE, "a positive number of videos"),
    ("train", "learning_rate", _POSITIVE,
     "positive (<= 0 would not train, or train backwards)"),
    ("train", "weight_decay", _NON_NEGATIVE, ">= 0"),
    ("train", "ema_decay", lambda v: 0 <= v < 1, "in [0, 1) (0 = off)"),
    ("train", "keep_checkpoints", _POSITIVE, "a positive integer"),
    ("train", "log_every", _POSITIVE, "a positive number of steps"),
    ("train", "num_cpu_devices", _NON_NEGATIVE, ">= 0 (0 = off)"),
    ("eval", "batch_size", _POSITIVE, "a positive number of videos"),
    ("eval", "pre_nms_topk", _POSITIVE, "a positive integer"),
    ("eval", "max_seg_num", _POSITIVE, "a positive integer"),
    ("eval", "nms_sigma", _POSITIVE, "positive"),
    ("eval", "fusion_topk", _POSITIVE, "a positive integer"),
    ("export", "max_frames", _NON_NEGATIVE, ">= 0 (0 = 16 x max_seq_len)"),
)


def _range_problems(config: Config) -> list:
  """One line per flag whose value is out of its range (names the flag and the range)."""
  problems = []
  for section, field, ok, need in _RANGES:
    value = getattr(getattr(config, section), field)
    if not ok(value):
      problems.append(f"--{flag_name(section, field)}={value} must be {need}")
  data, ev = config.data, config.eval
  if not ev.tiou_thresholds or not all(0 < t <= 1 for t in ev.tiou_thresholds):
    problems.append(f"--tiou_thresholds={','.join(map(str, ev.tiou_thresholds))} needs one or "
                    "more values in (0, 1]")
  if any(not d.strip() for d in data.feature_dir):
    problems.append(f"--feature_dir={','.join(data.feature_dir)} has an empty entry (a stray "
                    "comma?); list one folder per feature stream")
  return problems


# (section, field) of every path: stored absolute, so a run folder's config.json works from any
# working directory.
_PATH_FIELDS = (("data", "annotation_file"), ("data", "label_map_file"), ("data", "feature_dir"),
                ("data", "demo_dir"), ("eval", "ext_score_file"), ("train", "output_dir"),
                ("export", "checkpoint"), ("export", "export_dir"))


def absolute_paths(config: Config) -> Config:
  """`config` with every non-empty path made absolute (against the current directory)."""
  sections = {}
  for field in dataclasses.fields(config):
    section = getattr(config, field.name)
    changes = {}
    for section_name, name in _PATH_FIELDS:
      if section_name != field.name:
        continue
      value = getattr(section, name)
      if isinstance(value, tuple):
        changes[name] = tuple(os.path.abspath(v) if v else v for v in value)
      elif value:
        changes[name] = os.path.abspath(value)
    sections[field.name] = dataclasses.replace(section, **changes)
  return Config(**sections)


def field_help(section_cls) -> Dict[str, str]:
  """{field: its description} from the `Attributes:` section of a config class's docstring
  (the flags' help text: the dataclasses are its one source)."""
  text = (section_cls.__doc__ or "").split("Attributes:", 1)[-1]
  helps, name = {}, None
  for line in text.splitlines():
    entry = re.match(r"^    (\w+): (.*)$", line)
    if entry:
      name = entry.group(1)
      helps[name] = entry.group(2).strip()
    elif name and line.startswith("      "):
      helps[name] += " " + line.strip()
    else:
      name = None
  return helps


def from_flags(flags, check: bool = True) -> Config:
  """Builds a Config from parsed absl flags (see asl_tf/flags.py, which defines one flag per
  field, named by `flag_name`); validates it unless `check` is false (a tool that merges the
  flags into a checkpoint's config validates the merge).

  Raises:
    ConfigError: naming the flag whose value does not convert to its field.
  """
  sections = {}
  for section in dataclasses.fields(Config):
    section_cls = section.default_factory
    types = typing.get_type_hints(section_cls)
    sections[section.name] = section_cls(**{
        field.name: _from_flag(getattr(flags, flag_name(section.name, field.name)),
                               types[field.name], flag_name(section.name, field.name))
        for field in dataclasses.fields(section_cls)})
  config = Config(**sections)
  return absolute_paths(validate(config) if check else config)


def _from_flag(value: Any, field_type: Any, flag: str) -> Any:
  """A flag's parsed value (lists are lists of strings) converted to its field's type."""
  args = typing.get_args(field_type)
  optional = typing.get_origin(field_type) is typing.Union and type(None) in args
  if optional:
    field_type = next(a for a in args if a is not type(None))
    args = typing.get_args(field_type)
  if typing.get_origin(field_type) is not tuple:
    return value
  strings = [str(v).strip() for v in value or ()]
  if args[-1] is Ellipsis and typing.get_origin(args[0]) is tuple:  # pairs, flattened
    numbers = _numbers(strings, float, flag)
    if len(numbers) % 2:
      raise ConfigError(f"--{flag} needs an even number of values (lo,hi pairs), got "
                        f"{','.join(strings)}")
    return tuple((numbers[i], numbers[i + 1]) for i in range(0, len(numbers), 2))
  element = args[0]
  values = tuple(strings) if element is str else _numbers(strings, element, flag)
  if optional and not values:
    return None
  if args[-1] is not Ellipsis and len(values) != len(args):
    raise ConfigError(f"--{flag}={','.join(strings)} needs {len(args)} comma-separated values")
  return values


def _numbers(strings: Sequence[str], kind: type, flag: str) -> tuple:
  try:
    return tuple(kind(v) for v in strings)
  except ValueError:
    what = "integers" if kind is int else "numbers"
    raise ConfigError(f"--{flag}={','.join(strings)}: expected comma-separated {what}") from None
