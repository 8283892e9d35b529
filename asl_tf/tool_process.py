"""Process settings of the command-line tools, made before TensorFlow is imported.

Library code changes no process state; the tools (`asl_tf.train`, ..., the serving client and
test server) call `prepare_tensorflow` once, before TensorFlow loads.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings
from typing import Sequence

from absl import logging as absl_logging


def argv_verbosity(argv: Sequence[str]) -> int:
  """absl's `--verbosity` (`-v`, `--v`) as given on the command line, the last one winning (0
  without it; a flagfile's is not read), for tools that must make the process settings before
  their flags are parsed."""
  verbosity = 0
  for i, arg in enumerate(argv):
    name, eq, value = arg.partition("=")
    if name in ("--verbosity", "-verbosity", "-v", "--v"):
      value = value if eq else (argv[i + 1] if i + 1 < len(argv) else "0")
      try:
        verbosity = int(value)
      except ValueError:
        verbosity = 0
  return verbosity


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
