"""Tests for the benchmark helpers in `benchmarks/common.py`."""

import ctypes
import importlib.util
import json
import os
import platform
import subprocess

import numpy as np
import pytest

_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks",
                     "common.py")
_SPEC = importlib.util.spec_from_file_location("benchmarks_common", _PATH)
common = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(common)


def test_time_repeated_statistics_from_a_fake_clock(monkeypatch):
  durations = [0.5, 0.1, 0.2, 0.3, 0.4, 1.0]
  ticks = iter(np.cumsum([0.0] + [x for d in durations for x in (d, 0.0)]))
  monkeypatch.setattr(common.time, "perf_counter", lambda: next(ticks))
  calls = []
  stats = common.time_repeated(lambda: calls.append(1), repeats=6, warmup=2)
  assert len(calls) == 8
  assert stats["repeats"] == 6 and stats["warmup"] == 2
  assert stats["median_sec"] == pytest.approx(0.35)
  assert stats["min_sec"] == pytest.approx(0.1)
  assert stats["max_sec"] == pytest.approx(1.0)
  assert stats["p95_sec"] == pytest.approx(0.875)
  assert stats["mean_sec"] == pytest.approx(2.5 / 6)
  with pytest.raises(ValueError):
    common.time_repeated(lambda: None, repeats=0)


def test_linear_fit():
  xs = [1, 2, 3, 4]
  slope, intercept, r2 = common.linear_fit(xs, [2 * x + 1 for x in xs])
  assert (slope, intercept, r2) == pytest.approx((2.0, 1.0, 1.0))
  slope, intercept, r2 = common.linear_fit([0, 1, 2, 3], [0, 2, 1, 3])
  assert (slope, intercept, r2) == pytest.approx((0.8, 0.3, 0.64))
  assert common.linear_fit([0, 1], [5, 5]) == pytest.approx((0.0, 5.0, 1.0))
  with pytest.raises(ValueError):
    common.linear_fit([1, 1], [1, 2])


def test_ab_results_are_medians_and_ratios_to_the_baseline():
  results = common.ab_results({"a": [2.0, 4.0, 3.0], "b": [1.5, 1.0, 10.0]}, "a", "step_sec",
                              "rounds_sec")
  assert results == {"a": {"step_sec": 3.0, "ratio_to_a": 1.0, "rounds_sec": [2.0, 4.0, 3.0]},
                     "b": {"step_sec": 1.5, "ratio_to_a": 0.5, "rounds_sec": [1.5, 1.0, 10.0]}}
  assert common.ab_results({"a": [0.123456, 0.2]}, "a", "m", "t")["a"] == {
      "m": 0.1617, "ratio_to_a": 1.0, "t": [0.1235, 0.2]}
  assert common.ab_results({"a": [0.123456, 0.2]}, "a", "m", "t", digits=6)["a"] == {
      "m": 0.161728, "ratio_to_a": 1.0, "t": [0.123456, 0.2]}


def test_alternating_rounds_reverse_the_order_every_other_round_after_the_untimed_ones():
  calls = []
  times, first = common.alternating_rounds(
      {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, 3, untimed=2)
  assert calls == ["a", "b", "b", "a", "a", "b", "b", "a", "a", "b"]
  assert first == ["a", "b", "a"]
  assert [len(t) for t in times.values()] == [3, 3] and min(times["a"] + times["b"]) >= 0


def test_git_state_names_the_commit_and_counts_modified_tracked_files(tmp_path):
  assert common.git_state(str(tmp_path)) == {"head": None, "modified_tracked_files": None}
  def git(*args):
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args],
                          cwd=tmp_path, capture_output=True, text=True, check=True).stdout
  git("init", "-q")
  for name in ("a.txt", "b.txt"):
    (tmp_path / name).write_text("1")
  git("add", "a.txt", "b.txt")
  git("commit", "-q", "-m", "x")
  (tmp_path / "a.txt").write_text("2")
  (tmp_path / "untracked.txt").write_text("3")  # untracked files are not counted
  assert common.git_state(str(tmp_path)) == {"head": git("rev-parse", "HEAD").strip(),
                                             "modified_tracked_files": 1}


def test_machine_info_reports_this_machine(monkeypatch):
  onednn = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "DNNL_VERBOSE", "TF_ONEDNN_USE_SYSTEM_ALLOCATOR",
            "TF_MKL_OPTIMIZE_PRIMITIVE_MEMUSE", "TF_SET_ONEDNN_FPMATH_MODE")
  for name in onednn + ("MALLOC_ARENA_MAX", "OMP_NUM_THREADS"):
    monkeypatch.setenv(name, "0")
  info = common.machine_info()
  assert set(onednn) <= set(info["onednn_env"])
  assert not {"MALLOC_ARENA_MAX", "OMP_NUM_THREADS"} & set(info["onednn_env"])
  assert info["malloc_env"].get("MALLOC_ARENA_MAX") == "0"
  assert info["cpu_count"] == os.cpu_count()
  assert info["cpu_affinity"] == len(os.sched_getaffinity(0))
  assert info["numpy"] == np.__version__
  assert info["tensorflow"].startswith("2.")
  assert info["memory_total_mb"] > 100
  with open("/proc/cpuinfo", encoding="utf-8") as f:
    flags = next((l for l in f if l.startswith("flags")), "flags:").split(":", 1)[1].split()
  assert info["cpu_flags"] == sorted(f for f in flags if f.startswith(("avx512", "amx", "avx2",
                                                                      "fma")))
  assert ("avx2" in flags) == ("avx2" in info["cpu_flags"]) and "sse2" not in info["cpu_flags"]
  with open("/proc/cpuinfo", encoding="utf-8") as f:
    fields = dict((k.strip(), v.strip()) for k, _, v in (l.partition(":") for l in f.read()
                                                         .split("\n\n")[0].splitlines()))
  expected = (f"{fields['cpu family']}.{fields['model']}"
              if "cpu family" in fields and "model" in fields else None)  # e.g. None on ARM
  assert info["cpu_family_model"] == expected
  json.dumps(info)


def _rss_mb():
  with open("/proc/self/status", encoding="utf-8") as f:
    line = next(l for l in f if l.startswith("VmRSS:"))
  return int(line.split()[1]) / 1024


def test_peak_rss_covers_a_fresh_allocation():
  rss_before = _rss_mb()
  block = np.ones(96 * 2**20 // 8)
  rss_after = _rss_mb()
  assert rss_after - rss_before > 80
  assert common.peak_rss_mb() >= rss_after
  status = common.status_mb("VmRSS", "VmHWM")
  assert abs(status["VmRSS"] - rss_after) < 16 and status["VmHWM"] >= rss_after
  with pytest.raises(OSError, match="NoSuchField"):
    common.status_mb("NoSuchField")
  assert block[-1] == 1.0


def test_read_fields_keeps_the_first_of_repeated_names(tmp_path):
  """/proc/cpuinfo repeats every field per core: the first core's value is kept."""
  path = tmp_path / "cpuinfo"
  path.write_text("model name\t: A\nflags\t\t: avx2 fma\n\nmodel name\t: B\nflags : x\n")
  assert common._read_fields(str(path)) == {"model name": "A", "flags": "avx2 fma", "": ""}
  assert common._read_fields(str(tmp_path / "missing")) == {}


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc" or not os.path.exists("/proc/self/status"),
                    reason="needs Linux with glibc")
def test_malloc_trim_returns_freed_heap_pages():
  """80 MB of small blocks freed below a live one stay resident until `malloc_trim`."""
  libc = ctypes.CDLL("libc.so.6")
  libc.malloc.restype = ctypes.c_void_p
  libc.free.argtypes = [ctypes.c_void_p]
  blocks = [libc.malloc(1000) for _ in range(80_000)]
  keep = libc.malloc(1000)  # holds the heap's top, so free() alone cannot shrink it
  try:
    for block in blocks:
      libc.free(block)
    before = _rss_mb()
    assert common.malloc_trim()
    assert before - _rss_mb() > 40
  finally:
    libc.free(keep)


def test_run_in_subprocess_measures_the_workload(tmp_path, monkeypatch):
  (tmp_path / "alloc_workload.py").write_text(
      "import numpy as np\n"
      "def alloc(mb):\n"
      "  return {'sum': np.ones(mb * 2**20 // 8).sum(), 'mb': mb}\n"
      "def fail():\n"
      "  raise ZeroDivisionError('workload broke')\n")
  monkeypatch.setenv("PYTHONPATH", str(tmp_path))
  small = common.run_in_subprocess("alloc_workload:alloc", {"mb": 8})
  large = common.run_in_subprocess("alloc_workload:alloc", {"mb": 160})
  assert small["result"] == {"sum": 8 * 2**17, "mb": 8}
  assert large["peak_rss_mb"] - small["peak_rss_mb"] > 120
  assert large["peak_rss_mb"] - large["peak_rss_before_mb"] > 150
  assert large["wall_sec"] >= 0
  with pytest.raises(RuntimeError, match="ZeroDivisionError: workload broke"):
    common.run_in_subprocess("alloc_workload:fail")


def test_emit_prints_and_writes_json(tmp_path, capsys):
  out = tmp_path / "sub" / "result.json"
  common.emit({"n": np.int64(3), "x": np.float32(0.5), "v": np.arange(2)}, str(out))
  want = {"n": 3, "x": 0.5, "v": [0, 1]}
  assert json.loads(capsys.readouterr().out) == want
  assert json.loads(out.read_text()) == want


def test_benchmark_parser_defaults_and_flags():
  parser = common.benchmark_parser("demo", default_repeats=7)
  assert vars(parser.parse_args([])) == {"quick": False, "repeats": 7, "output": None}
  args = parser.parse_args(["--quick", "--repeats", "3", "--output", "r.json"])
  assert (args.quick, args.repeats, args.output) == (True, 3, "r.json")


def test_swapped_sets_attributes_inside_and_restores_them_even_on_error():
  class Holder:  # hashable, like the modules the benchmarks swap attributes of
    pass
  a, b = Holder(), Holder()
  a.f, b.g = 1, "x"
  with common.swapped({(a, "f"): 2, (b, "g"): "y"}):
    assert (a.f, b.g) == (2, "y")
  assert (a.f, b.g) == (1, "x")
  with pytest.raises(RuntimeError):
    with common.swapped({(a, "f"): 3}):
      raise RuntimeError("inside")
  assert a.f == 1
