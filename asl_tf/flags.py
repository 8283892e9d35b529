"""The configuration flags of asl_tf and the command-line plumbing. Imported only by the entry
points.

Every `asl_tf.config.Config` field has one flag, generated from the dataclasses (name, type,
default and help), so the defaults live in one place; a tool's own flags (`--features_path`,
`--torch_checkpoint`, ...) are defined in the tool. Entry points run
`absl.app.run(main, flags_parser=cli_parser("asl_tf.<tool>", HELP_GROUPS))`, which expands
`--flagfile` (nested flagfiles resolve relative to the file that names them) and parses; `main`
then converts the flags once into a frozen `asl_tf.config.Config` with `build_config()`. A bad
flag ends the program with one line naming it.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
import typing
from typing import List, Mapping, Sequence

from absl import flags

from asl_tf import config as config_lib
from asl_tf import tool_process

FLAGS = flags.FLAGS


def _flag_default(value):
  """A field's default as an absl default: tuples (of pairs too) flattened to lists."""
  if value is None:
    return []
  if isinstance(value, tuple):
    return [f"{x:g}" if isinstance(x, float) else str(x)
            for v in value for x in (v if isinstance(v, tuple) else (v,))]
  return value


def _define_config_flags() -> None:
  """One flag per `Config` field, named by `config.flag_name`, typed, defaulted and documented
  by the dataclasses (their docstrings' `Attributes:`). A field name in two sections (input_dim,
  num_classes, max_seq_len) is one flag that sets both."""
  for section in dataclasses.fields(config_lib.Config):
    section_cls = section.default_factory
    types = typing.get_type_hints(section_cls)
    helps = config_lib.field_help(section_cls)
    for field in dataclasses.fields(section_cls):
      name = config_lib.flag_name(section.name, field.name)
      if name in FLAGS:
        continue
      # The declared default, before __post_init__ (one window stands for every level).
      default = _flag_default(field.default)
      help_text, kind = helps[field.name], types[field.name]
      if kind is bool:
        flags.DEFINE_boolean(name, default, help_text)
      elif kind is int:
        flags.DEFINE_integer(name, default, help_text)
      elif kind is float:
        flags.DEFINE_float(name, default, help_text)
      elif field.name in config_lib.FIELD_CHOICES:
        flags.DEFINE_enum(name, default, list(config_lib.FIELD_CHOICES[field.name]), help_text)
      elif kind is str:
        flags.DEFINE_string(name, default, help_text)
      else:
        flags.DEFINE_list(name, default, help_text)


_define_config_flags()


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
    hint = ("; base.flags held the defaults, which now live in asl_tf/config.py: drop the line "
            "that includes it" if os.path.basename(path) == "base.flags" else "")
    raise config_lib.ConfigError(f"flagfile {path!r} not found (looked in {candidates}){hint}")
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


# Groups of configuration flags for the tools' --help (every flag is listed by --helpfull).
DATA_FLAGS = ("annotation_file", "feature_dir", "feature_ext", "train_subset", "eval_subset",
              "input_dim", "num_classes", "feat_stride", "num_frames", "default_fps",
              "fps_override", "max_seq_len", "resize_length", "on_bad_feature")
MODEL_FLAGS = ("backbone_arch", "embd_dim", "fpn_dim", "head_dim", "n_head", "mha_win_size",
               "use_abs_pe", "regression_range")
ASL_FLAGS = ("class_sensitivity", "instance_sensitivity", "sensitivity_normalization",
             "instance_combination", "contrastive_weight", "contrastive_sampling")
TRAINING_FLAGS = ("output_dir", "epochs", "warmup_epochs", "batch_size", "learning_rate",
                  "weight_decay", "adamw_form", "ema_decay", "seed", "resume", "eval_every",
                  "mixed_precision", "num_cpu_devices", "kernel_policy")
EVALUATION_FLAGS = ("tiou_thresholds", "pre_nms_thresh", "max_seg_num", "min_score",
                    "nms_method", "multiclass_nms", "nms_sigma", "ext_score_file")
_HELP_ARGS = ("--help", "-h", "--helpshort", "-help")


def tool_help(prog: str, help_groups: Mapping[str, Sequence[str]], doc: str = "") -> str:
  """The --help text of tool `prog`: its docstring's first line, then the flags of
  `help_groups` ({group: flag names}) with default and the first sentence of their help, then
  how to see everything."""
  lines = [doc.strip().splitlines()[0] if doc.strip() else prog, "",
           f"usage: python -m {prog} [--flagfile=configs/NAME.flags] [--flag=value ...]", ""]
  for group, names in help_groups.items():
    lines.append(f"{group}:")
    for name in names:
      flag = FLAGS[name]
      default = flag.default_as_str if flag.default_as_str not in (None, "''", '""') else ""
      lines.append(f"  --{name}{'=' + default.strip(chr(39)) if default else ''}  "
                   f"{first_sentence(flag.help)}")
    lines.append("")
  lines.append("--flagfile=FILE reads flags from a file (configs/*.flags); flags after it win. "
               "Every hyper-parameter: --helpfull. TensorFlow's own log lines: --verbosity=1.")
  return "\n".join(lines)


def first_sentence(text: str) -> str:
  """`text` up to the end of its first sentence."""
  return re.split(r"(?<=[a-z0-9)`'])\. (?=[A-Z`(])", text, maxsplit=1)[0].rstrip(".") + "."


def cli_parser(prog: str, help_groups: Mapping[str, Sequence[str]]):
  """An absl `flags_parser` for entry point `prog`: `--help` prints `tool_help` (the flags of
  `help_groups`); otherwise `parse_argv`, ending the program with one line `prog: message` (no
  traceback) on a flag error, then `tool_process.prepare_tensorflow()`."""

  def parse(argv: List[str]) -> List[str]:
    if any(a in _HELP_ARGS for a in argv[1:]):
      main = sys.modules.get("__main__")
      print(tool_help(prog, help_groups, getattr(main, "__doc__", "") or ""))
      sys.exit(0)
    try:
      rest = parse_argv(argv)
    except config_lib.ConfigError as e:
      sys.exit(f"{prog}: {e}")
    tool_process.prepare_tensorflow(FLAGS.verbosity)
    return rest

  return parse


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
      flag = config_lib.flag_name(section.name, field.name)
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
