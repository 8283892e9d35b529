"""Shared helpers for the benchmark scripts in `benchmarks/`, which all print one JSON document.

Timing (`time_repeated`; `forward_function`, the traced inference forward), the machine the
numbers came from (`machine_info`), memory (`peak_rss_mb`, `status_mb`, `malloc_trim`,
`run_in_subprocess` for a fresh process per measurement), a least-squares line for scaling
curves (`linear_fit`), output (`emit`) and the common command line (`benchmark_parser`).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

# oneDNN's CPU kernels as the command-line tools set them, before any TensorFlow import.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_RESULT_MARKER = "__BENCHMARK_RESULT__"
_CHILD_CODE = """
import importlib, json, sys
sys.path.insert(0, {benchmarks_dir!r})
import common
module_name, function_name = {target!r}.split(":")
fn = getattr(importlib.import_module(module_name), function_name)
before = common.peak_rss_mb()
start = common.time.perf_counter()
result = fn(**json.loads({kwargs!r}))
wall = common.time.perf_counter() - start
print({marker!r} + json.dumps({{"result": result, "peak_rss_mb": common.peak_rss_mb(),
    "peak_rss_before_mb": before, "wall_sec": wall}}, default=common.json_default), flush=True)
"""


def forward_function(model, input_dim: int, mask_dtype: str = "float32"):
  """The inference forward `model(x, padding_mask, training=False)` as a tf.function with a
  dynamic batch and length: (x [B, T, input_dim] float32, padding_mask [B, T]) -> every output.

  Every output leaves the function: with one alone (say the class logits), TensorFlow prunes
  the head behind the others from what is timed.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  spec = [tf.TensorSpec([None, None, input_dim], tf.float32),
          tf.TensorSpec([None, None], mask_dtype)]
  return tf.function(lambda x, m: model(x, m, training=False), input_signature=spec)


def time_repeated(fn: Callable[[], Any], repeats: int = 10, warmup: int = 1) -> Dict[str, Any]:
  """Times `fn()` with `time.perf_counter` after some untimed warm-up calls.

  Args:
    fn: the workload; its return value is ignored (block on async results inside it).
    repeats: timed calls, at least 1.
    warmup: untimed calls first (tracing, caches), at least 0.

  Returns:
    `median_sec`, `mean_sec`, `min_sec`, `max_sec`, `p95_sec` (linear interpolation), `repeats`,
    `warmup`.
  """
  if repeats < 1 or warmup < 0:
    raise ValueError(f"need repeats >= 1 and warmup >= 0, got {repeats} and {warmup}")
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  t = np.asarray(times)
  return {
      "median_sec": float(np.median(t)),
      "mean_sec": float(t.mean()),
      "min_sec": float(t.min()),
      "max_sec": float(t.max()),
      "p95_sec": float(np.percentile(t, 95)),
      "repeats": repeats,
      "warmup": warmup,
  }


def _read_fields(path: str) -> Dict[str, str]:
  """`name: value` lines of a /proc file in one read; a repeated name keeps its first value
  (/proc/cpuinfo repeats every field per core). {} when the file cannot be read."""
  fields: Dict[str, str] = {}
  try:
    with open(path, encoding="utf-8") as f:
      for line in f:
        name, _, value = line.partition(":")
        fields.setdefault(name.strip(), value.strip())
  except OSError:
    pass
  return fields


def _version(package: str) -> Optional[str]:
  try:
    return importlib.metadata.version(package)
  except importlib.metadata.PackageNotFoundError:
    return None


def _cgroup_cpu_limit() -> Optional[float]:
  """CPUs allowed by a cgroup v2 quota (`cpu.max`), or None when unlimited or unknown."""
  try:
    with open("/sys/fs/cgroup/cpu.max", encoding="utf-8") as f:
      quota, period = f.read().split()
  except (OSError, ValueError):
    return None
  return None if quota == "max" else int(quota) / int(period)


def machine_info() -> Dict[str, Any]:
  """Describes the machine and software a benchmark ran on (no TensorFlow import needed).

  Returns:
    `cpu_count`, `cpu_affinity` (cores this process may use), `cgroup_cpu_limit`, `cpu_model`,
    `cpu_family_model` (/proc/cpuinfo's "family.model", which tells generations apart when the
    model name does not: "AMD EPYC" is family 25 on Zen 3 / Zen 4, 26 on Zen 5), `cpu_flags`
    (those that decide the fast paths: AVX2, FMA, AVX-512 and its bf16 extension, AMX),
    `memory_total_mb`, `platform`, `python`, the `tensorflow` / `keras` / `numpy` versions
    `malloc_env` (the environment's glibc allocator settings, `MALLOC_*`),
    `tf_enable_onednn_opts` (the TensorFlow CPU kernels: "1" oneDNN, "0" Eigen) and
    `onednn_env` (oneDNN's settings of the environment: every variable whose name holds
    ONEDNN, DNNL or MKL, e.g. `ONEDNN_PRIMITIVE_CACHE_CAPACITY`, `TF_SET_ONEDNN_FPMATH_MODE`).
  """
  affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
  mem_kb = _read_fields("/proc/meminfo").get("MemTotal")
  cpuinfo = _read_fields("/proc/cpuinfo")
  return {
      "cpu_count": os.cpu_count(),
      "cpu_affinity": affinity,
      "cgroup_cpu_limit": _cgroup_cpu_limit(),
      "cpu_model": cpuinfo.get("model name") or platform.processor() or None,
      "cpu_family_model": (f"{cpuinfo['cpu family']}.{cpuinfo['model']}"
                           if "cpu family" in cpuinfo and "model" in cpuinfo else None),
      "cpu_flags": sorted(f for f in cpuinfo.get("flags", "").split()
                          if f.startswith(("avx512", "amx", "avx2", "fma"))),
      "memory_total_mb": int(mem_kb.split()[0]) / 1024 if mem_kb else None,
      "platform": platform.platform(),
      "python": platform.python_version(),
      "tensorflow": _version("tensorflow"),
      "keras": _version("keras"),
      "numpy": _version("numpy"),
      # glibc allocator settings of the environment (they change resident memory).
      "malloc_env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("MALLOC_")},
      "tf_enable_onednn_opts": os.environ.get("TF_ENABLE_ONEDNN_OPTS"),
      "onednn_env": {k: v for k, v in sorted(os.environ.items())
                     if any(part in k for part in ("ONEDNN", "DNNL", "MKL"))},
  }


def git_state(path: str = _REPO_ROOT) -> Dict[str, Any]:
  """`{"head": commit, "modified_tracked_files": n}` of the git checkout at `path` (None each
  where git or the checkout is missing)."""
  def git(*args):
    try:
      done = subprocess.run(["git", *args], cwd=path, capture_output=True, text=True,
                            check=False)
    except OSError:
      return None
    return done.stdout if done.returncode == 0 else None
  head, status = git("rev-parse", "HEAD"), git("status", "--porcelain", "--untracked-files=no")
  return {"head": head.strip() if head else None,
          "modified_tracked_files": len(status.splitlines()) if status is not None else None}


@contextlib.contextmanager
def swapped(patches: Mapping[Tuple[Any, str], Any]):
  """Sets `patches` {(module, attribute): value} for the `with` body and restores what the
  attributes held before, so a `tf.function` first called inside traces the swapped-in forms."""
  saved = {target: getattr(*target) for target in patches}
  try:
    for (module, attribute), value in patches.items():
      setattr(module, attribute, value)
    yield
  finally:
    for (module, attribute), value in saved.items():
      setattr(module, attribute, value)


def run_start() -> Dict[str, Any]:
  """Where a benchmark run starts: `started` (local time, ISO 8601), `load_1min` (1-minute load
  average; on 2 cores above ~0.5 means other work ran) and the repository's `git_state`."""
  return {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "load_1min": os.getloadavg()[0],
          "code": git_state()}


def malloc_trim() -> Optional[bool]:
  """Returns the C heap's free pages to the system (glibc `malloc_trim(0)`): whether any were
  returned, None where there is no glibc. Resident memory this releases was freed, not held."""
  try:
    return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
  except (OSError, AttributeError):
    return None


def status_mb(*keys: str) -> Dict[str, float]:
  """Memory fields of this process's /proc/self/status (e.g. VmHWM, VmRSS, RssAnon), in MiB."""
  fields = _read_fields("/proc/self/status")  # one read: one moment
  missing = [k for k in keys if k not in fields]
  if missing:
    raise OSError(f"{', '.join(missing)} not in /proc/self/status (needs Linux)")
  return {k: int(fields[k].split()[0]) / 1024 for k in keys}


def peak_rss_mb() -> float:
  """Peak resident memory of this process so far (VmHWM), in MiB."""
  return status_mb("VmHWM")["VmHWM"]


def json_default(obj: Any) -> Any:
  """`json.dumps` fallback for numpy scalars and arrays."""
  if isinstance(obj, np.generic):
    return obj.item()
  if isinstance(obj, np.ndarray):
    return obj.tolist()
  raise TypeError(f"{type(obj).__name__} is not JSON serializable")


def run_in_subprocess(target: str, kwargs: Optional[Mapping[str, Any]] = None,
                      timeout: Optional[float] = None) -> Dict[str, Any]:
  """Runs `module:function(**kwargs)` in a fresh Python and measures its memory.

  The repository root is put on the child's `PYTHONPATH`, so `benchmarks.x:f` and `asl_tf...`
  targets import; the environment is inherited otherwise.

  Args:
    target: `"package.module:function"`; the function's return value must be JSON-serializable.
    kwargs: JSON-serializable keyword arguments.
    timeout: seconds before the child is killed.

  Returns:
    `result` (the return value), `peak_rss_mb` (VmHWM at the end), `peak_rss_before_mb` (VmHWM
    after importing the target, before calling it) and `wall_sec` of the call.

  Raises:
    RuntimeError: the child failed; the message holds the end of its stderr.
  """
  if target.count(":") != 1:
    raise ValueError(f"target must look like 'package.module:function', got {target!r}")
  code = _CHILD_CODE.format(benchmarks_dir=os.path.join(_REPO_ROOT, "benchmarks"), target=target,
                            kwargs=json.dumps(dict(kwargs or {})), marker=_RESULT_MARKER)
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(p for p in (_REPO_ROOT, env.get("PYTHONPATH")) if p)
  env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                        timeout=timeout, check=False)
  lines = [l for l in proc.stdout.splitlines() if l.startswith(_RESULT_MARKER)]
  if proc.returncode != 0 or not lines:
    raise RuntimeError(f"{target} failed in a subprocess (exit {proc.returncode}):\n"
                       f"{proc.stderr[-3000:]}")
  return json.loads(lines[-1][len(_RESULT_MARKER):])


def linear_fit(xs: Sequence[float], ys: Sequence[float]) -> Tuple[float, float, float]:
  """Least-squares line through `(xs, ys)`.

  Args:
    xs: at least two distinct x values.
    ys: as many y values.

  Returns:
    `(slope, intercept, r2)`; `r2` is 1.0 when the ys are constant.
  """
  x = np.asarray(xs, np.float64)
  y = np.asarray(ys, np.float64)
  if x.shape != y.shape or x.ndim != 1 or len(x) < 2 or np.all(x == x[0]):
    raise ValueError("linear_fit needs two equally long 1-D sequences with distinct xs")
  slope, intercept = np.polyfit(x, y, 1)
  ss_res = float(np.sum((y - (slope * x + intercept)) ** 2))
  ss_tot = float(np.sum((y - y.mean()) ** 2))
  r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0
  return float(slope), float(intercept), r2


def alternating_rounds(calls: Mapping[str, Callable[[], Any]], rounds: int,
                       untimed: int = 1) -> Tuple[Dict[str, List[float]], List[str]]:
  """Times the variants of an in-process A/B in alternating order.

  Each round calls every variant once (each call must block until its work is done), in the
  given order and reversed every other round; the first `untimed` rounds are not recorded.

  Returns:
    `(times, first_in_round)`: seconds per variant over the `rounds` timed rounds, and the
    variant that ran first in each of them.
  """
  times: Dict[str, List[float]] = {name: [] for name in calls}
  first_in_round: List[str] = []
  order = list(calls.items())
  for round_index in range(untimed + rounds):
    this_round = order[::-1] if round_index % 2 else order
    for name, call in this_round:
      start = time.perf_counter()
      call()
      if round_index >= untimed:
        times[name].append(time.perf_counter() - start)
    if round_index >= untimed:
      first_in_round.append(this_round[0][0])
  return times, first_in_round


def ab_results(times: Mapping[str, Sequence[float]], baseline: str, median_key: str,
               times_key: str, digits: int = 4) -> Dict[str, Dict[str, Any]]:
  """Per variant of an in-process A/B: `{median_key: median, "ratio_to_<baseline>": median /
  baseline's median, times_key: the times}`, seconds rounded to `digits` decimals, ratios to
  0.001."""
  first = float(np.median(times[baseline]))
  return {variant: {median_key: round(float(np.median(v)), digits),
                    f"ratio_to_{baseline}": round(float(np.median(v)) / first, 3),
                    times_key: [round(float(t), digits) for t in v]}
          for variant, v in times.items()}


def emit(result: Mapping[str, Any], path: Optional[str] = None) -> None:
  """Prints `result` as indented JSON on stdout and, with `path`, also writes it there.

  Args:
    result: JSON-serializable mapping (numpy scalars and arrays are converted).
    path: optional output file; missing parent folders are created.
  """
  text = json.dumps(result, indent=2, default=json_default)
  print(text, flush=True)
  if path:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
      f.write(text + "\n")


def benchmark_parser(description: str, default_repeats: int = 10) -> argparse.ArgumentParser:
  """The command line every benchmark shares; scripts may add their own arguments.

  Args:
    description: what the benchmark measures (shown by `--help`).
    default_repeats: timed repetitions when `--repeats` is not given.

  Returns:
    A parser with `--quick` (small sizes for a smoke run), `--repeats` and `--output` (JSON path).
  """
  parser = argparse.ArgumentParser(description=description)
  parser.add_argument("--quick", action="store_true",
                      help="small sizes and few repeats, to check the script runs")
  parser.add_argument("--repeats", type=int, default=default_repeats,
                      help="timed repetitions per measurement")
  parser.add_argument("--output", default=None, help="also write the JSON result to this file")
  return parser
