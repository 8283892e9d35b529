"""Train ASL: `python -m asl_tf.train --flagfile=configs/anet.flags [--flag=value ...]`.

Generates the demo data when `--demo_dir` is set, trains under the strategy the machine offers
(see asl_tf/training/strategy.py), evaluates with the EMA weights and prints the mAP table.
Problems with the flags, the data or the run folder end the program with one line on stderr.
"""

import os
import re
import sys

from absl import app

from asl_tf import config as config_lib
from asl_tf import flags as asl_flags

HELP_GROUPS = {"data": asl_flags.DATA_FLAGS, "model": asl_flags.MODEL_FLAGS,
               "ASL": asl_flags.ASL_FLAGS, "training": asl_flags.TRAINING_FLAGS,
               "evaluation (at the end)": asl_flags.EVALUATION_FLAGS}


def _data_error(error) -> str:
  """The FeatureError line inside a tf.data error (e.g. NaN found while reading), or ''."""
  found = re.findall(r"(?:FeatureError|AnnotationError|PipelineError): ([^\n]+)", str(error))
  return found[-1] if found else ""


def main(argv):
  del argv
  try:
    config = asl_flags.build_config()
  except config_lib.ConfigError as e:
    sys.exit(f"asl_tf.train: {e}")
  # TensorFlow is imported after the flags so that --num_cpu_devices can split the CPU first.
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from asl_tf import inference  # pylint: disable=g-import-not-at-top
  from asl_tf.data import annotations  # pylint: disable=g-import-not-at-top
  from asl_tf.data import features  # pylint: disable=g-import-not-at-top
  from asl_tf.data import pipeline  # pylint: disable=g-import-not-at-top
  from asl_tf.training import checkpoints  # pylint: disable=g-import-not-at-top
  from asl_tf.training import loop  # pylint: disable=g-import-not-at-top
  from asl_tf.training import strategy as strategy_lib  # pylint: disable=g-import-not-at-top
  from asl_tf import postprocess  # pylint: disable=g-import-not-at-top
  expected = (config_lib.ConfigError, annotations.AnnotationError, features.FeatureError,
              pipeline.PipelineError, checkpoints.CheckpointError, loop.NonFiniteLossError)
  if config.eval.ext_score_file:  # read at the first evaluation: check it before training
    try:
      postprocess.load_video_scores(config.eval.ext_score_file)
    except ValueError as e:
      sys.exit(f"asl_tf.train: {e}")
  try:
    strategy = strategy_lib.make_strategy(config.train.num_cpu_devices)
    result = loop.train(config, evaluate_fn=inference.evaluate_model, strategy=strategy)
  except expected as e:
    sys.exit(f"asl_tf.train: {e}")
  except tf.errors.OpError as e:
    message = _data_error(e)
    if not message:
      raise
    sys.exit(f"asl_tf.train: {message}")
  if result.metrics:
    print(inference.format_metrics_table(result.metrics))
  run = os.path.abspath(result.output_dir)
  print(f"\nrun folder: {run} (config.json, checkpoints/, logs/ for TensorBoard, eval/)\n"
        "next:\n"
        f"  python -m asl_tf.evaluate --checkpoint={run}\n"
        f"  python -m asl_tf.visualize --checkpoint={run}\n"
        f"  python -m asl_tf.export --checkpoint={run} --export_dir=export/models/asl\n"
        f"  tensorboard --logdir={run}/logs")


if __name__ == "__main__":
  app.run(main, flags_parser=asl_flags.cli_parser("asl_tf.train", HELP_GROUPS))
