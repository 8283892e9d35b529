"""Tests of what `import asl_tf` does before TensorFlow loads."""

import os
import subprocess
import sys

import pytest

_CODE = "import os, asl_tf; print(os.environ['TF_ENABLE_ONEDNN_OPTS'])"


@pytest.mark.parametrize("preset,expected", [(None, "1"), ("0", "0"), ("1", "1")])
def test_import_turns_onednn_on_unless_the_user_chose(preset, expected):
  env = {k: v for k, v in os.environ.items() if k != "TF_ENABLE_ONEDNN_OPTS"}
  if preset is not None:
    env["TF_ENABLE_ONEDNN_OPTS"] = preset
  out = subprocess.run([sys.executable, "-c", _CODE], env=env, capture_output=True, text=True,
                       check=True)
  assert out.stdout.strip() == expected


def test_package_import_does_not_load_tensorflow():
  code = "import sys, asl_tf; print('tensorflow' in sys.modules)"
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "False"
