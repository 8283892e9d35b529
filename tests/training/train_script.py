"""`python -m asl_tf.train` with test hooks, run as a subprocess by the training tests.

Environment:
  ASL_TEST_KILL_AT_STEP=N   SIGKILL this process just before optimizer step N (1-based).
  ASL_TEST_RESULT=PATH      after training, write the final weights to PATH.npz and
                            {"scratch_dir", "chief", "replicas"} to PATH.json.
"""

import json
import os
import signal
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # pylint: disable=g-import-not-at-top

from asl_tf import train  # pylint: disable=g-import-not-at-top
from asl_tf import flags as asl_flags  # pylint: disable=g-import-not-at-top


def _install_hooks():
  import numpy as np  # pylint: disable=g-import-not-at-top
  from asl_tf.training import loop  # pylint: disable=g-import-not-at-top

  kill_at = int(os.environ.get("ASL_TEST_KILL_AT_STEP", "0"))
  result_path = os.environ.get("ASL_TEST_RESULT", "")
  original_step = loop.Trainer._global_step
  original_train = loop.Trainer.train

  def global_step(self):
    step = original_step(self)
    if kill_at and step + 1 == kill_at:
      os.kill(os.getpid(), signal.SIGKILL)
    return step

  def train_and_report(self):
    result = original_train(self)
    if result_path:
      np.savez(result_path + ".npz", *[v.numpy() for v in self.model.variables])
      with open(result_path + ".json", "w") as f:
        json.dump({"scratch_dir": self._scratch_dir, "chief": self.chief,
                   "replicas": self.replicas}, f)
    return result

  loop.Trainer._global_step = global_step
  loop.Trainer.train = train_and_report


def main(argv):
  _install_hooks()
  train.main(argv)


if __name__ == "__main__":
  app.run(main, argv=sys.argv, flags_parser=asl_flags.cli_parser("asl_tf.train", train.HELP_GROUPS))
