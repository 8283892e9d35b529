"""Evaluate a checkpoint: `python -m asl_tf.evaluate --flagfile=... --checkpoint=RUN_OR_CKPT`.

Prints the mAP table and writes `eval/metrics.json`, `detections.json` (ActivityNet results
layout) and `per_class_ap.csv` into the checkpoint's run folder, or into `--output_dir` when that
is given on the command line. `--checkpoint` may be a checkpoint prefix, a checkpoint folder or a
training `--output_dir` (its best checkpoint, else its latest). Without `--flagfile` the run's
saved config.json is used, with the data / evaluation flags given on the command line applied
(model and training flags that would change the trained model are refused).
"""

import os
import sys

from absl import app

from asl_tf import config as config_lib
from asl_tf import flags as asl_flags

HELP_GROUPS = {"what": ("checkpoint", "output_dir"), "data": asl_flags.DATA_FLAGS,
               "evaluation": asl_flags.EVALUATION_FLAGS + ("kernel_policy", "inference_precision")}


def main(argv):
  del argv
  from asl_tf import inference  # pylint: disable=g-import-not-at-top
  from asl_tf.data import annotations  # pylint: disable=g-import-not-at-top
  from asl_tf.data import features  # pylint: disable=g-import-not-at-top
  from asl_tf.training import checkpoints  # pylint: disable=g-import-not-at-top
  try:
    config = asl_flags.build_config(check=asl_flags.FLAGFILE_GIVEN)
    checkpoint = config.export.checkpoint or config.train.output_dir
    config = asl_flags.checkpoint_tool_config(checkpoint, config)
    output_dir = (asl_flags.FLAGS.output_dir if "output_dir" in asl_flags.COMMAND_LINE_FLAGS
                  else checkpoints.run_folder(checkpoint))
    model, config = inference.load_model(checkpoint, config)
    metrics = inference.evaluate_model(model, config, output_dir=output_dir,
                                       trained_names=inference.trained_class_names(checkpoint))
  except (config_lib.ConfigError, checkpoints.CheckpointError, annotations.AnnotationError,
          features.FeatureError, ValueError) as e:
    sys.exit(f"asl_tf.evaluate: {e}")
  print(inference.format_metrics_table(metrics))
  print(f"wrote {os.path.join(output_dir, 'eval')}/metrics.json, detections.json, "
        "per_class_ap.csv")


if __name__ == "__main__":
  app.run(main, flags_parser=asl_flags.cli_parser("asl_tf.evaluate", HELP_GROUPS))
