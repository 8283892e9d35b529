"""What importing asl_tf and starting a tool do to the process before TensorFlow loads."""

import os
import subprocess
import sys

import pytest

_TOOL = ("import os, sys; from absl import app; from asl_tf import flags; "
         "flags.cli_parser('asl_tf.x', {})(['prog']); "
         "print(os.environ['TF_ENABLE_ONEDNN_OPTS'], os.environ['TF_CPP_MIN_LOG_LEVEL'])")


def _env(**preset):
  env = {k: v for k, v in os.environ.items()
         if k not in ("TF_ENABLE_ONEDNN_OPTS", "TF_CPP_MIN_LOG_LEVEL")}
  env.update({k: v for k, v in preset.items() if v is not None})
  return env


@pytest.mark.parametrize("preset,expected", [(None, "1"), ("0", "0"), ("1", "1")])
def test_tools_turn_onednn_on_unless_the_user_chose(preset, expected):
  out = subprocess.run([sys.executable, "-c", _TOOL], env=_env(TF_ENABLE_ONEDNN_OPTS=preset),
                       capture_output=True, text=True, check=True)
  assert out.stdout.split() == [expected, "3"]
  assert "port.cc" not in out.stderr and "cudart_stub" not in out.stderr  # TF loaded quietly


@pytest.mark.parametrize("tool,args", [
    ("asl_tf.serving.client", ["--server=127.0.0.1:1", "--features_path=/nonexistent/v.npy"]),
    ("asl_tf.serving.testing_server", ["--model_base_path=/nonexistent/models/asl"]),
])
def test_the_serving_tools_print_one_line_and_no_tensorflow_lines(tool, args):
  """They imported TensorFlow before the tools' quiet start: ~9 C++ lines (among them "failed
  call to cuInit" at error level) came before every message, even a missing file's."""
  out = subprocess.run([sys.executable, "-m", tool] + args, env=_env(), capture_output=True,
                       text=True, timeout=120, check=False)
  assert out.returncode != 0 and "Traceback" not in out.stderr
  assert len(out.stderr.strip().splitlines()) == 1, out.stderr
  assert "/nonexistent/" in out.stderr


def test_argv_verbosity_reads_absl_spellings():
  from asl_tf import tool_process  # pylint: disable=g-import-not-at-top
  assert tool_process.argv_verbosity(["prog", "--server=x"]) == 0
  for argv in (["prog", "--verbosity=1"], ["prog", "-v", "1"], ["prog", "-v=1"],
               ["prog", "--verbosity", "1"], ["prog", "--v=1"], ["prog", "-v=0", "--v=1"]):
    assert tool_process.argv_verbosity(argv) == 1, argv


def test_package_import_changes_nothing_and_loads_no_tensorflow():
  code = ("import os, sys, asl_tf; print('tensorflow' in sys.modules, "
          "'TF_ENABLE_ONEDNN_OPTS' in os.environ)")
  out = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True,
                       check=True)
  assert out.stdout.split() == ["False", "False"]


def _asl_imports(path):
  """The asl_tf modules a source file imports (parsed, not executed)."""
  import ast  # pylint: disable=g-import-not-at-top
  with open(path) as f:
    tree = ast.parse(f.read())
  names = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("asl_tf"):
      names |= {f"{node.module}.{a.name}" for a in node.names}
    elif isinstance(node, ast.Import):
      names |= {a.name for a in node.names if a.name.startswith("asl_tf")}
  return names


def test_imports_run_one_way():
  """Layers and losses sit below the model and the task above it: nothing under modeling/ (the
  detector included) reaches the losses, targets or training code, losses import no asl_tf
  module, and the kernel seam imports only config."""
  root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "asl_tf")
  assert _asl_imports(os.path.join(root, "losses.py")) == set()
  assert _asl_imports(os.path.join(root, "modeling", "kernels.py")) == {
      "asl_tf.config", "asl_tf.modeling.winograd"}
  for name in os.listdir(os.path.join(root, "modeling")):
    if name.endswith(".py"):
      imports = _asl_imports(os.path.join(root, "modeling", name))
      assert not {i for i in imports if i.startswith(("asl_tf.losses", "asl_tf.training",
                                                      "asl_tf.targets"))}, name
