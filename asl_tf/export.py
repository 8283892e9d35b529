"""Export a checkpoint for TF Serving: `python -m asl_tf.export --checkpoint=runs/x`.

  python -m asl_tf.export --checkpoint=runs/thumos_i3d [--export_dir=export/models/asl] \
      [--version=N] [--flagfile=configs/thumos_i3d.flags]

Loads the checkpoint's EMA weights (the best checkpoint of a run folder, else its latest),
takes the class names from the annotation file when it is readable (else `class_<i>`), and
writes `<export_dir>/<version>/` (version 0 = the next free integer) with the signatures,
assets and warm-up records described in `asl_tf/serving/module.py`. Without `--flagfile` the
run's `config.json` is used, with the data / evaluation / export flags given on the command line
applied (e.g. `--max_frames`) and model flags refused; with one, the flags' model is checked
against the checkpoint's.
"""

import dataclasses
import sys
from typing import Optional

from absl import app

from asl_tf import config as config_lib
from asl_tf import flags as asl_flags

HELP_GROUPS = {"export": ("checkpoint", "export_dir", "version", "max_frames",
                          "inference_precision"),
               "evaluation": ("pre_nms_thresh", "max_seg_num", "min_score", "nms_method",
                              "multiclass_nms", "nms_sigma")}

def export_checkpoint(checkpoint: str, export_dir: str, version: int = 0,
                      config: Optional[config_lib.Config] = None) -> str:
  """Loads a checkpoint with its EMA weights and exports it (see module docstring).

  Args:
    checkpoint: checkpoint prefix, checkpoint folder or training output_dir.
    export_dir: TF Serving base path.
    version: version folder; 0 = the next free integer.
    config: flags-derived config checked against the checkpoint's config.json (None = use
      config.json as is).

  Returns:
    The exported version folder.
  """
  from asl_tf import inference  # pylint: disable=g-import-not-at-top
  from asl_tf.serving import module  # pylint: disable=g-import-not-at-top
  config = inference.checkpoint_config(checkpoint, config)
  # SavedModels always compute under `portable` (a server may run without oneDNN).
  config = dataclasses.replace(config, model=dataclasses.replace(config.model,
                                                                 kernel_policy="portable"))
  model, config = inference.load_model(checkpoint, config, use_ema=True)
  return module.export_saved_model(model, config, export_dir, version=version,
                                   class_names=inference.class_names(config))


def usage_example(path: str, max_seq_len: int, input_dim: int) -> str:
  """Shell commands that try an export with saved_model_cli."""
  return (f"saved_model_cli show --dir {path} --all\n"
          f"python -c \"import numpy as np; np.save('features.npy', "
          f"np.zeros([1, {max_seq_len}, {input_dim}], np.float32))\"\n"
          f"saved_model_cli run --dir {path} --tag_set serve --signature_def serving_default "
          f"--inputs features=features.npy --input_exprs 'lengths=[{max_seq_len}]'")


def main(argv):
  del argv
  try:
    flag_config = asl_flags.build_config(check=asl_flags.FLAGFILE_GIVEN)
  except config_lib.ConfigError as e:
    sys.exit(f"asl_tf.export: {e}")
  from asl_tf.serving import module  # pylint: disable=g-import-not-at-top
  from asl_tf.training import checkpoints  # pylint: disable=g-import-not-at-top
  export = flag_config.export
  try:
    config = asl_flags.checkpoint_tool_config(export.checkpoint, flag_config)
    path = export_checkpoint(export.checkpoint, export.export_dir, export.version, config)
  except (config_lib.ConfigError, checkpoints.CheckpointError, module.ExportError) as e:
    sys.exit(f"asl_tf.export: {e}")
  timebase = module.read_timebase(path)
  print(f"exported {path}\nTry it:\n"
        + usage_example(path, timebase["max_seq_len"], timebase["input_dim"]))


if __name__ == "__main__":
  app.run(main, flags_parser=asl_flags.cli_parser("asl_tf.export", HELP_GROUPS))
