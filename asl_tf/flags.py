"""Every command-line flag of asl_tf. Imported only by the entry points.

Entry points run `absl.app.run(main, flags_parser=cli_parser("asl_tf.<tool>"))`, which expands
`--flagfile` (nested flagfiles resolve relative to the file that names them) and parses; `main`
then converts the flags once into a frozen `asl_tf.config.Config` with `build_config()`. A bad
flag ends the program with one line naming it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import sys
import warnings
from typing import List

from absl import flags
from absl import logging as absl_logging

from asl_tf import config as config_lib

FLAGS = flags.FLAGS

# Data.
flags.DEFINE_string("annotation_file", "", "Annotation JSON (ActionFormer, flat or ActivityNet).")
flags.DEFINE_enum("annotation_format", "auto", list(config_lib.ANNOTATION_FORMATS),
                  "Annotation layout; auto detects it.")
flags.DEFINE_string("label_map_file", "", "Optional file pinning label ids.")
flags.DEFINE_list("feature_dir", [], "Feature folder(s); several are concatenated on channels.")
flags.DEFINE_string("feature_ext", ".npy", "Feature file extension (.npy / npy / .npz).")
flags.DEFINE_string("npz_key", "feats", "Array name inside .npz feature files.")
flags.DEFINE_string("file_prefix", "", "Prefix of feature file names (ANet: v_).")
flags.DEFINE_string("file_suffix", "", "Suffix of feature file names before the extension.")
flags.DEFINE_string("train_subset", "training", "Training subset name (case-insensitive).")
flags.DEFINE_string("eval_subset", "validation", "Evaluation subset name (case-insensitive).")
flags.DEFINE_integer("input_dim", 2048, "Feature channels C (all streams together).")
flags.DEFINE_integer("num_classes", 20, "Number of classes (1 = class-agnostic proposals).")
flags.DEFINE_float("feat_stride", 16.0, "Frames between consecutive features.")
flags.DEFINE_float("num_frames", 16.0, "Frames seen by one feature.")
flags.DEFINE_float("default_fps", 30.0, "fps for videos whose annotation gives none.")
flags.DEFINE_float("fps_override", 0.0, "If > 0, use this fps for every video, ignoring the "
                   "annotation's (ANet TSP: 15).")
flags.DEFINE_integer("max_seq_len", 2304, "Training sequence length (grid units).")
flags.DEFINE_integer("resize_length", 0, "Resize every video to this many features (ANet 192).")
flags.DEFINE_float("trunc_thresh", 0.5, "Minimum kept fraction of an action when truncating.")
flags.DEFINE_list("crop_ratio", [], "LO,HI random crop ratio for short training videos.")
flags.DEFINE_integer("max_segments", 100, "Ground-truth segments per video after padding.")
flags.DEFINE_enum("on_bad_feature", "error", ["error", "skip"],
                  "A missing or malformed feature file is an error, or a counted skip.")
flags.DEFINE_string("demo_dir", "", "Generate the embedded demo dataset here if missing.")

# Model.
flags.DEFINE_list("stream_dims", [], "Per-stream channels for the multi-stream projection.")
flags.DEFINE_list("stream_proj_dims", [], "Per-stream projected channels.")
flags.DEFINE_list("backbone_arch", ["2", "2", "5"], "Embedding convs, stem and branch blocks.")
flags.DEFINE_integer("embd_dim", 512, "Embedding / transformer channels.")
flags.DEFINE_integer("embd_kernel_size", 3, "Embedding conv kernel size.")
flags.DEFINE_integer("fpn_dim", 512, "Neck channels.")
flags.DEFINE_integer("head_dim", 512, "Head channels.")
flags.DEFINE_integer("head_num_layers", 3, "Head conv layers (hidden + output).")
flags.DEFINE_integer("n_head", 4, "Attention heads.")
flags.DEFINE_list("mha_win_size", ["19"], "Local window per level (one value = all levels; "
                  "-1 = global).")
flags.DEFINE_boolean("use_abs_pe", False, "Sinusoidal absolute position encoding.")
flags.DEFINE_float("dropout", 0.0, "Dropout in attention projections and MLPs.")
flags.DEFINE_float("droppath", 0.1, "Stochastic depth probability.")
flags.DEFINE_float("cls_prior_prob", 0.01, "Classification bias prior.")
flags.DEFINE_list("head_empty_cls", [], "Class ids without training data.")
flags.DEFINE_list("regression_range", ["0", "4", "4", "8", "8", "16", "16", "32", "32", "64",
                                       "64", "10000"],
                  "Flattened (lo,hi) regression range per level, in grid units.")
flags.DEFINE_boolean("class_sensitivity", True, "ASL class-level Gaussian loss weights.")
flags.DEFINE_enum("sensitivity_parametrization", "authors",
                  list(config_lib.SENSITIVITY_PARAMETRIZATIONS),
                  "authors: raw sigma as released; stable: softplus sigma, no decay.")
flags.DEFINE_float("sensitivity_lr_scale", 1.0, "Learning-rate multiplier of the class-level "
                   "mu / sigma (1 = as released).")
flags.DEFINE_float("sensitivity_sigma_floor", 0.01, "Lower bound of the class-level sigmas "
                   "with --sensitivity_parametrization=stable.")
flags.DEFINE_boolean("instance_sensitivity", True, "ASL instance-level evaluator.")
flags.DEFINE_integer("evaluator_layers", 2, "Hidden conv layers of the instance evaluator.")
flags.DEFINE_float("contrastive_weight", 0.0, "Action-sensitive contrastive loss weight (0 = off, "
                   "the default: it did not help in the ablation).")
flags.DEFINE_integer("contrastive_proj_dim", 128, "Contrastive projection channels (0 = none).")
flags.DEFINE_enum("kernel_policy", "auto", list(config_lib.KERNEL_POLICIES),
                  "How layers compute, same values: reference (plain ops; GPU), fast (oneDNN "
                  "CPU forms), portable (fast minus oneDNN-only forms), auto (by device).")

# Losses.
flags.DEFINE_float("center_sample_radius", 1.5, "Centre sampling radius in strides.")
flags.DEFINE_float("label_smoothing", 0.0, "Focal-loss label smoothing.")
flags.DEFINE_float("reg_loss_weight", 1.0, "DIoU loss weight.")
flags.DEFINE_float("init_loss_norm", 100.0, "Initial EMA loss normalizer.")
flags.DEFINE_float("evaluator_loss_weight", 1.0, "Instance evaluator loss weight.")
flags.DEFINE_enum("instance_combination", "product", list(config_lib.INSTANCE_COMBINATIONS),
                  "How class- and instance-level weights combine on positives: product "
                  "p * sg(q) or sum p + sg(q) (product without normalisation can collapse "
                  "training; README, ASL ablation).")
flags.DEFINE_integer("instance_start_epoch", 0, "First epoch using instance weights.")
flags.DEFINE_enum("sensitivity_normalization", "instance",
                  list(config_lib.SENSITIVITY_NORMALIZATIONS),
                  "Positives' ASL weights: as they are (none) or divided by their mean over each "
                  "ground-truth instance's positives (instance).")
flags.DEFINE_enum("evaluator_target", "separate", list(config_lib.EVALUATOR_TARGETS),
                  "Instance evaluator targets: separate (sigmoid(logit), tIoU) or fused "
                  "(sigmoid(logit)^0.2 * tIoU^0.8 for both outputs).")
flags.DEFINE_enum("evaluator_loss", "mse", list(config_lib.EVALUATOR_LOSSES),
                  "Instance evaluator loss: mse or bce.")
flags.DEFINE_float("contrastive_temperature", 0.07, "InfoNCE temperature.")
flags.DEFINE_integer("contrastive_topk", 3, "Sensitive points averaged per instance.")
flags.DEFINE_integer("contrastive_num_background", 8, "Background points per video.")

# Training.
flags.DEFINE_string("output_dir", "runs/default", "Run folder: where train writes; evaluate / "
                    "infer write into the checkpoint's run folder unless this is given.")
flags.DEFINE_integer("epochs", 30, "Cosine epochs (excluding warm-up).")
flags.DEFINE_integer("warmup_epochs", 5, "Linear warm-up epochs.")
flags.DEFINE_integer("batch_size", 2, "Per-replica batch size.")
flags.DEFINE_float("learning_rate", 1e-4, "Peak learning rate.")
flags.DEFINE_float("weight_decay", 0.05, "AdamW weight decay on kernels.")
flags.DEFINE_boolean("sensitivity_weight_decay", True, "Weight decay on ASL mu / sigma.")
flags.DEFINE_float("clip_grad_norm", 1.0, "Global gradient norm clip (<= 0 = off).")
flags.DEFINE_float("ema_decay", 0.999, "EMA decay of the weights (0 = off).")
flags.DEFINE_integer("seed", 1234567891, "Random seed.")
flags.DEFINE_boolean("deterministic", False, "Enable TF op determinism.")
flags.DEFINE_boolean("resume", False, "Resume from the latest checkpoint in --output_dir.")
flags.DEFINE_integer("keep_checkpoints", 3, "Epoch checkpoints to keep.")
flags.DEFINE_integer("eval_every", 0, "Evaluate every N epochs (0 = at the end only, -1 = never).")
flags.DEFINE_integer("log_every", 10, "Steps between TensorBoard writes.")
flags.DEFINE_list("profile_steps", [], "START,END steps to profile.")
flags.DEFINE_enum("mixed_precision", "float32", list(config_lib.MIXED_PRECISION_POLICIES),
                  "Keras dtype policy.")
flags.DEFINE_boolean("jit_compile", False, "XLA-compile the train step (single device).")
flags.DEFINE_integer("num_cpu_devices", 0, "Split the CPU into N logical devices.")

# Evaluation / inference / export.
flags.DEFINE_list("tiou_thresholds", ["0.3", "0.4", "0.5", "0.6", "0.7"], "tIoU thresholds.")
flags.DEFINE_float("pre_nms_thresh", 0.001, "Score threshold before NMS.")
flags.DEFINE_integer("pre_nms_topk", 2000, "Candidates per level before NMS.")
flags.DEFINE_integer("max_seg_num", 200, "Detections per video.")
flags.DEFINE_float("min_score", 0.001, "Minimum score after NMS.")
flags.DEFINE_enum("nms_method", "soft", list(config_lib.NMS_METHODS), "NMS variant.")
flags.DEFINE_boolean("multiclass_nms", True, "Per-class NMS (else class-agnostic + voting).")
flags.DEFINE_float("nms_sigma", 0.5, "Soft-NMS sigma.")
flags.DEFINE_float("iou_threshold", 0.1, "Hard-NMS IoU threshold.")
flags.DEFINE_float("voting_thresh", 0.7, "Voting IoU threshold (class-agnostic NMS).")
flags.DEFINE_float("duration_thresh", 0.05, "Minimum segment length (grid units).")
flags.DEFINE_string("ext_score_file", "", "External classifier scores for score fusion.")
flags.DEFINE_integer("fusion_topk", 2, "Classes per video in score fusion.")
flags.DEFINE_integer("eval_batch_size", 1, "Videos per evaluation batch.")
flags.DEFINE_string("checkpoint", "", "Checkpoint, or a training --output_dir.")
flags.DEFINE_string("export_dir", "export/models/asl", "SavedModel base directory.")
flags.DEFINE_integer("version", 0, "Export version (0 = next free).")
flags.DEFINE_integer("max_frames", 0, "export: longest video (features) a served request may "
                     "hold; longer ones are INVALID_ARGUMENT (0 = 16 x --max_seq_len).")
flags.DEFINE_string("features_path", "", "infer: a [T, C] feature file (.npy/.npz) or a folder.")
flags.DEFINE_string("saved_model", "", "infer: an exported SavedModel (version folder) to run "
                    "instead of --checkpoint.")
flags.DEFINE_string("results_file", "", "infer: where to write the detections (ActivityNet "
                    "results JSON); default infer/detections.json in the checkpoint's run "
                    "folder (or in --output_dir when given).")
flags.DEFINE_boolean("overwrite", False, "infer: replace an existing --results_file that is not "
                     "an ActivityNet results file.")
flags.DEFINE_list("video_ids", [], "visualize: videos to draw (default: the first "
                  "--num_videos of --eval_subset).")
flags.DEFINE_integer("num_videos", 3, "visualize: how many videos to draw without --video_ids.")
flags.DEFINE_string("plot_dir", "", "visualize: output folder (default <output_dir>/plots).")
flags.DEFINE_float("fps", 0.0, "infer: fps of the videos (0 = --fps_override, else "
                   "--default_fps).")

# PyTorch checkpoint import (python -m asl_tf.tools.import_torch).
flags.DEFINE_string("torch_checkpoint", "", "import_torch: ActionFormer / ASL .pth.tar to import.")
flags.DEFINE_boolean("use_ema", True, "import_torch: import state_dict_ema (what ActionFormer "
                     "evaluates); --nouse_ema imports the raw state_dict.")
flags.DEFINE_string("output", "", "import_torch: run folder to write (config.json, checkpoints/).")
flags.DEFINE_boolean("allow_missing", False, "import_torch: keep ASL-only variables the source "
                     "lacks (instance evaluator, contrastive projection, mu / sigma) at their "
                     "initialization instead of failing.")
flags.DEFINE_boolean("allow_unused", False, "import_torch: skip checkpoint tensors that nothing "
                     "maps instead of failing.")


def expand_flagfiles(argv: List[str], _depth: int = 0) -> List[str]:
  """Inlines `--flagfile=PATH` arguments, resolving nested paths relative to their file.

  Later arguments win, as in absl, so flags given after a flagfile override it.
  """
  if _depth > 10:
    raise config_lib.ConfigError("--flagfile nesting deeper than 10 (a cycle?)")
  out = []
  for arg in argv:
    if arg.startswith("--flagfile="):
      path = arg.split("=", 1)[1]
      out.extend(_read_flagfile(path, os.getcwd(), _depth))
    else:
      out.append(arg)
  return out


def _read_flagfile(path: str, base_dir: str, depth: int) -> List[str]:
  candidates = [path] if os.path.isabs(path) else [os.path.join(base_dir, path), path]
  found = next((p for p in candidates if os.path.isfile(p)), None)
  if found is None:
    raise config_lib.ConfigError(f"flagfile {path!r} not found (looked in {candidates})")
  args = []
  with open(found) as f:
    for line in f:
      line = line.strip()
      if not line or line.startswith("#") or line.startswith("//"):
        continue
      if line.startswith("--flagfile="):
        nested = line.split("=", 1)[1]
        args.extend(_read_flagfile(nested, os.path.dirname(os.path.abspath(found)), depth + 1))
      else:
        args.append(line)
  return args


def parse_argv(argv: List[str]) -> List[str]:
  """Expands flagfiles, then parses into FLAGS.

  Raises:
    config_lib.ConfigError: an unknown flag (with the closest names) or a malformed value, in
      one line naming the flag.
  """
  global FLAGFILE_GIVEN, COMMAND_LINE_FLAGS
  FLAGFILE_GIVEN = any(a.startswith("--flagfile=") for a in argv)
  COMMAND_LINE_FLAGS = frozenset(_flag_name(a) for a in argv[1:] if a.startswith("-")
                                 and not a.lstrip("-").startswith("flagfile=")) - {""}
  try:
    return FLAGS(expand_flagfiles(list(argv)))
  except flags.Error as e:
    raise config_lib.ConfigError(" ".join(str(e).split())) from None


# The flags each tool reads, grouped, for its --help (every flag is listed by --helpfull).
_DATA = ("annotation_file", "feature_dir", "feature_ext", "train_subset", "eval_subset",
         "input_dim", "num_classes", "feat_stride", "num_frames", "default_fps", "fps_override",
         "max_seq_len", "resize_length", "on_bad_feature")
_MODEL = ("backbone_arch", "embd_dim", "fpn_dim", "head_dim", "n_head", "mha_win_size",
          "use_abs_pe", "regression_range")
_ASL = ("class_sensitivity", "instance_sensitivity", "sensitivity_normalization",
        "instance_combination", "contrastive_weight")
_TRAINING = ("output_dir", "epochs", "warmup_epochs", "batch_size", "learning_rate",
             "weight_decay", "ema_decay", "seed", "resume", "eval_every", "mixed_precision",
             "num_cpu_devices", "kernel_policy")
_EVALUATION = ("tiou_thresholds", "pre_nms_thresh", "max_seg_num", "min_score", "nms_method",
               "multiclass_nms", "nms_sigma", "ext_score_file")
TOOL_FLAGS = {
    "asl_tf.train": {"data": _DATA, "model": _MODEL, "ASL": _ASL, "training": _TRAINING,
                     "evaluation (at the end)": _EVALUATION},
    "asl_tf.evaluate": {"what": ("checkpoint", "output_dir"), "data": _DATA,
                        "evaluation": _EVALUATION + ("kernel_policy",)},
    "asl_tf.infer": {"what": ("checkpoint", "saved_model", "features_path", "results_file",
                              "overwrite", "fps", "output_dir"),
                     "data": ("input_dim", "npz_key", "file_prefix", "feat_stride", "num_frames",
                              "default_fps", "fps_override", "resize_length"),
                     "evaluation": ("pre_nms_thresh", "max_seg_num", "min_score", "nms_method",
                                    "multiclass_nms", "nms_sigma", "kernel_policy")},
    "asl_tf.visualize": {"what": ("checkpoint", "video_ids", "num_videos", "plot_dir"),
                         "data": _DATA, "evaluation": _EVALUATION[:-1] + ("kernel_policy",)},
    "asl_tf.export": {"export": ("checkpoint", "export_dir", "version", "max_frames"),
                      "evaluation": ("pre_nms_thresh", "max_seg_num", "min_score", "nms_method",
                                     "multiclass_nms", "nms_sigma")},
    "asl_tf.tools.import_torch": {
        "import": ("torch_checkpoint", "output", "use_ema", "allow_missing", "allow_unused"),
        "model": ("input_dim", "num_classes", "max_seq_len") + _MODEL + _ASL[:2]},
}
_HELP_ARGS = ("--help", "-h", "--helpshort", "-help")


def tool_help(prog: str, doc: str = "") -> str:
  """The --help text of tool `prog`: its docstring's first line, then its flags by group (name,
  default, help), then how to see everything."""
  lines = [doc.strip().splitlines()[0] if doc.strip() else prog, "",
           f"usage: python -m {prog} [--flagfile=configs/NAME.flags] [--flag=value ...]", ""]
  for group, names in TOOL_FLAGS.get(prog, {}).items():
    lines.append(f"{group}:")
    for name in names:
      flag = FLAGS[name]
      default = flag.default_as_str if flag.default_as_str not in (None, "''", '""') else ""
      lines.append(f"  --{name}{'=' + default.strip(chr(39)) if default else ''}  {flag.help}")
    lines.append("")
  lines.append("--flagfile=FILE reads flags from a file (configs/*.flags); flags after it win. "
               "Every hyper-parameter: --helpfull. TensorFlow's own log lines: --verbosity=1.")
  return "\n".join(lines)


def cli_parser(prog: str):
  """An absl `flags_parser` for entry point `prog`: `parse_argv`, ending the program with one
  line `prog: message` (no traceback) on a flag error, then `prepare_tensorflow()`."""

  def parse(argv: List[str]) -> List[str]:
    if any(a in _HELP_ARGS for a in argv[1:]):
      main = sys.modules.get("__main__")
      print(tool_help(prog, getattr(main, "__doc__", "") or ""))
      sys.exit(0)
    try:
      rest = parse_argv(argv)
    except config_lib.ConfigError as e:
      sys.exit(f"{prog}: {e}")
    prepare_tensorflow(FLAGS.verbosity)
    return rest

  return parse


def prepare_tensorflow(verbosity: int) -> None:
  """Process settings of the command-line tools, made before TensorFlow is imported.

  Turns oneDNN's CPU kernels on unless `TF_ENABLE_ONEDNN_OPTS` is set, and hides TensorFlow's
  own log lines unless `--verbosity >= 1`.

  On a healthy CPU run TensorFlow prints dozens of C++ lines, some at error level ("failed call
  to cuInit" without a GPU, oneDNN notes), and Python deprecation warnings; a real failure still
  reaches the user as an exception, which every tool turns into one line. A
  `TF_CPP_MIN_LOG_LEVEL` set by the user wins.
  """
  os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
  verbose = verbosity >= 1
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "0" if verbose else "3")
  if verbose or "tensorflow" in sys.modules:
    return
  warnings.filterwarnings("ignore", module=r"(tensorflow|keras)(\.|$)")
  # TensorFlow's C++ side prints a few lines while it loads, before TF_CPP_MIN_LOG_LEVEL is read;
  # importing it with stderr pointed at /dev/null hides them (a failed import still raises).
  saved = os.dup(2)
  try:
    with open(os.devnull, "w") as null:
      os.dup2(null.fileno(), 2)
      import tensorflow  # pylint: disable=g-import-not-at-top,unused-import,import-outside-toplevel
  finally:
    os.dup2(saved, 2)
    os.close(saved)
  logging.getLogger("tensorflow").setLevel(logging.ERROR)  # after the import, which resets it
  # Some of TensorFlow logs through absl directly (checkpoint saving: "Sharding callback ...").
  absl_logging.get_absl_handler().addFilter(_drop_tensorflow_info)


def _drop_tensorflow_info(record: logging.LogRecord) -> bool:
  """A log filter: TensorFlow's and Keras' own records below WARNING are dropped."""
  return record.levelno >= logging.WARNING or not re.search(r"[/\\](tensorflow|keras)[/\\]",
                                                             record.pathname)


def _flag_name(arg: str) -> str:
  name = arg.lstrip("-").split("=", 1)[0]
  if "=" not in arg and name.startswith("no") and name not in FLAGS and name[2:] in FLAGS:
    return name[2:]  # --noflag
  return name


# Whether the command line named a --flagfile (evaluation / export then take the model from the
# flags and check it against the checkpoint; without one they use the checkpoint's config.json).
FLAGFILE_GIVEN = False
# The flags named on the command line itself (not inside a flagfile).
COMMAND_LINE_FLAGS: frozenset = frozenset()
# Config fields whose flag has another name.
_FLAG_OF_FIELD = {("eval", "batch_size"): "eval_batch_size"}
# Sections a trained checkpoint's config.json may have changed by flags at evaluation time.
_EVALUATION_SECTIONS = ("data", "eval", "export")


def overlay_command_line(saved: config_lib.Config) -> config_lib.Config:
  """A checkpoint's saved config with the flags given on the command line applied.

  Data, evaluation and export flags (and `--kernel_policy`, which changes how, not what, the
  model computes) replace the saved values. A model or loss flag cannot change
  a trained model, and a training flag does not apply after training: given with another value
  than the checkpoint's, either is an error naming it (`--output_dir` is exempt: tools read it as
  where to write).

  Raises:
    config_lib.ConfigError: naming every such flag.
  """
  given = build_config(check=False)  # defaults of flags not given never meet the checks
  sections, refused = {}, []
  for section in dataclasses.fields(saved):
    old, new = getattr(saved, section.name), getattr(given, section.name)
    changes = {}
    for field in dataclasses.fields(old):
      flag = _FLAG_OF_FIELD.get((section.name, field.name), field.name)
      if flag not in COMMAND_LINE_FLAGS or flag == "output_dir":
        continue
      value = getattr(new, field.name)
      if (section.name in _EVALUATION_SECTIONS
          or (section.name == "model" and field.name in config_lib.RUNTIME_MODEL_FIELDS)):
        changes[field.name] = value
      elif value != getattr(old, field.name):
        why = ("a training flag, unused after training" if section.name == "train" else
               "would change the trained model")
        refused.append(f"--{flag}={value!r} ({why}; the checkpoint was trained with "
                       f"{getattr(old, field.name)!r})")
    sections[section.name] = dataclasses.replace(old, **changes)
  if refused:
    raise config_lib.ConfigError(
        "these flags cannot apply to a trained checkpoint: " + "; ".join(refused)
        + ". Drop them, or pass the run's --flagfile")
  return config_lib.validate(config_lib.Config(**sections))


def checkpoint_tool_config(checkpoint: str, flag_config: config_lib.Config) -> config_lib.Config:
  """The configuration a tool applies to a trained `checkpoint` (evaluate, infer, visualize,
  export): with `--flagfile`, the flags' own config (its model is checked against the
  checkpoint's when loading); without, the run's config.json with the flags given on the command
  line applied (`overlay_command_line`)."""
  if FLAGFILE_GIVEN:
    return flag_config
  from asl_tf import inference  # pylint: disable=g-import-not-at-top (loads TensorFlow)
  return overlay_command_line(inference.checkpoint_config(checkpoint, None))


def build_config(check: bool = True) -> config_lib.Config:
  """The Config of the parsed flags (call after parsing); validated unless `check` is false."""
  return config_lib.from_flags(FLAGS, check)
