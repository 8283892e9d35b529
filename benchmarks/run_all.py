"""Runs every benchmark script, collects their JSON and writes results.json + results.md.

  python benchmarks/run_all.py --quick                    # smoke run of all (< 5 min)
  python benchmarks/run_all.py                            # full sizes (tens of minutes)
  python benchmarks/run_all.py --only=evaluation,inference --output_dir=/tmp/bench

Each script runs in its own subprocess (fresh memory, its own TensorFlow threads) and prints one
JSON document; a failing script is recorded with its error (a missing one as skipped) and the
others still run.
`results.json` holds the machine, the versions, the load average before and after each script
and every script's JSON; `results.md` is the summary table the README includes (benchmark,
setting, median, min / max, target, reference) under a line naming the machine and its CPU
flags, then the training-step and inference medians with one column per precision (the full run
times both in float32 and in mixed_bfloat16).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # pylint: disable=g-import-not-at-top,wrong-import-position

_HERE = os.path.dirname(os.path.abspath(__file__))
_REPO_ROOT = os.path.dirname(_HERE)
# name: (script, extra arguments of the full run). Inference runs twice (two configurations).
BENCHMARKS: Dict[str, tuple] = {
    "data_pipeline": ("data_pipeline.py", ()),
    "train_step": ("train_step.py", ()),
    "train_step_bench": ("train_step.py", ("--config=bench", "--modes=graph")),
    "inference": ("inference.py", ()),
    "inference_bench": ("inference.py", ("--config=bench",)),
    # The same settings in bfloat16 (the per-dtype table of results.md sets them side by side).
    "train_step_bf16": ("train_step.py", ("--modes=graph", "--precision=mixed_bfloat16")),
    "train_step_bench_bf16": ("train_step.py", ("--config=bench", "--modes=graph",
                                                "--precision=mixed_bfloat16")),
    "inference_bf16": ("inference.py", ("--precision=mixed_bfloat16",)),
    "inference_bench_bf16": ("inference.py", ("--config=bench", "--precision=mixed_bfloat16")),
    "evaluation": ("evaluation.py", ()),
    "serving": ("serving.py", ()),
    "model_memory": ("model_memory.py", ()),
}
_FULL_ONLY = ("inference_bench", "train_step_bench", "train_step_bf16", "train_step_bench_bf16",
              "inference_bf16", "inference_bench_bf16")


def _parse_json(stdout: str) -> dict:
  """The last JSON object printed on stdout (scripts may log lines before it)."""
  start = stdout.find("{")
  while start != -1:
    try:
      return json.loads(stdout[start:])
    except ValueError:
      start = stdout.find("\n{", start + 1)
      start = start + 1 if start != -1 else -1
  raise ValueError("no JSON document on stdout")


def run_benchmark(name: str, quick: bool, timeout: float) -> dict:
  """Runs one benchmark script in a subprocess; its record has `result`, `error` or `skipped`."""
  script, full_args = BENCHMARKS[name]
  path = os.path.join(_HERE, script)
  record = {"name": name, "script": f"benchmarks/{script}"}
  if not os.path.exists(path):
    record["skipped"] = "script not present"
    return record
  if quick and name in _FULL_ONLY:
    record["skipped"] = "full runs only (the same script as a --quick benchmark)"
    return record
  args = ["--quick"] if quick else list(full_args)
  cmd = [sys.executable, path, *args]
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
  env["PYTHONPATH"] = os.pathsep.join(p for p in (_REPO_ROOT, env.get("PYTHONPATH")) if p)
  record.update(command=" ".join(["python", record["script"], *args]),
                load_avg_before=os.getloadavg())
  start = time.perf_counter()
  try:
    proc = subprocess.run(cmd, cwd=_REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)
  except subprocess.TimeoutExpired:
    record.update(error=f"timed out after {timeout:.0f} s", wall_sec=timeout)
    return record
  record.update(wall_sec=round(time.perf_counter() - start, 1), load_avg_after=os.getloadavg())
  if proc.returncode != 0:
    record["error"] = f"exit {proc.returncode}: {proc.stderr[-1500:]}"
    return record
  try:
    record["result"] = _parse_json(proc.stdout)
  except ValueError as e:
    record["error"] = f"{e}: {proc.stdout[-500:]}"
  return record


def _fmt(sec: Optional[float]) -> str:
  if sec is None:
    return "-"
  return f"{sec * 1e3:.1f} ms" if sec < 1.0 else f"{sec:.2f} s"


def _row(benchmark, setting, median, lo=None, hi=None, target="", reference="") -> List[str]:
  spread = f"{_fmt(lo)} / {_fmt(hi)}" if lo is not None else "-"
  return [benchmark, setting, median if isinstance(median, str) else _fmt(median), spread,
          target, reference]


def _inference_setting(r: dict, entry: dict, precision: str = "") -> str:
  """An inference record's setting at one length: config, precision (if given), sizes."""
  m = r["model"]
  return (f"{r['config']}{precision}: C {m['input_dim']}, dims {m['embd_dim']}, window "
          f"{m['mha_win_size'][0]}, T {entry['num_frames']}")


def _train_step_setting(row: dict, mode: str) -> str:
  """A training-step row's setting: config, variant, mode (with precision if given), sizes."""
  return (f"{row['config']} {row.get('variant', 'asl')} ({mode}): T {row['seq_len']}, C "
          f"{row['input_dim']}, dims {row['embd_dim']}, batch {row['batch_size']}")


def _rows_inference(r: dict) -> List[List[str]]:
  rows = []
  for i, entry in enumerate(r["lengths"]):
    t = entry["forward_plus_postprocess"]
    target = f"<= {_fmt(r['target_sec'])}" if r.get("target_sec") and i == 0 else ""
    ref = f"{_fmt(r['reference_sec'])} (PyTorch)" if r.get("reference_sec") and i == 0 else ""
    precision = "" if r.get("precision", "float32") == "float32" else f" {r['precision']}"
    setting = (_inference_setting(r, entry, precision) + ", per video (postproc "
               f"{100 * entry['postprocess_share']:.0f}%, p95 {_fmt(t['p95_sec'])}"
               + (f", CPU {_fmt(entry['cpu_sec_per_video'])}" if "cpu_sec_per_video" in entry
                  else "") + ")")
    rows.append(_row("inference", setting, t["median_sec"], t["min_sec"], t["max_sec"], target,
                     ref))
  return rows


def _rows_evaluation(r: dict) -> List[List[str]]:
  e = r["evaluate_detections"]
  rows = [_row("evaluation", f"mAP: {e['videos']} videos, {e['detections']} detections, "
               f"{e['tiou_thresholds']} tIoUs", e["median_sec"], e["min_sec"], e["max_sec"])]
  for name, p in r.get("postprocess_per_video", {}).items():
    rows.append(_row("evaluation", f"post-processing per video: {name} ({p['num_points']} "
                     "points)", p["median_sec"], p["min_sec"], p["max_sec"]))
  return rows


def _rows_model_memory(r: dict) -> List[List[str]]:
  rows = []
  for entry in r["results"]:
    rows.append(_row("model_memory", f"{r['config']} forward T {entry['seq_len']}, "
                     f"peak +{entry['peak_delta_mb']} MiB", entry["seconds"]))
  fit = r.get("linear_fit")
  if fit:
    rows.append(["model_memory", f"{r['config']} peak memory vs T: least-squares slope "
                 f"{fit['slope_mb_per_1k_frames']} MiB per 1000 frames, largest residual "
                 f"{fit['max_abs_residual_mb']} MiB", "-", "-", "", ""])
  return rows


def _rows_serving(r: dict) -> List[List[str]]:
  rows = []
  for key in ("direct", "grpc_concurrency_1", "grpc_concurrency_4"):
    s = r.get(key)
    if s:
      rows.append(_row("serving", f"{key}, T {r['num_frames']}, p95 {s['p95_ms']:.1f} ms, "
                       f"{s['throughput_rps']} req/s", s["p50_ms"] / 1e3))
  return rows


def _rows_data_pipeline(r: dict) -> List[List[str]]:
  v = r["videos_per_sec"]
  return [["data_pipeline", f"training tf.data: T <= {r['max_seq_len']}, C {r['channels']}, "
           f"batch {r['batch_size']}, videos / s", f"{v['median']:.1f} /s",
           f"{v['min']:.1f} / {v['max']:.1f} /s", "", ""]]


def _rows_train_step(r: dict) -> List[List[str]]:
  rows = []
  for row in r["results"]:
    target = f"<= {_fmt(row['target_sec'])}" if row.get("target_sec") else ""
    ref = f"{_fmt(row['reference_sec'])} (PyTorch)" if row.get("reference_sec") else ""
    precision = row.get("precision", "float32")
    mode = row["mode"] if precision == "float32" else f"{row['mode']}, {precision}"
    rows.append(_row("train_step", _train_step_setting(row, mode) + ", per step",
                     row["median_sec"], row.get("min_sec"), row.get("max_sec"), target, ref))
  return rows


def _rows_generic(name: str, r: dict) -> List[List[str]]:
  """Any `median_sec` (or videos/s) statistics found one or two levels deep."""
  rows = []
  items = [(name, r)] + [(k, v) for k, v in r.items() if isinstance(v, dict)]
  for key, stats in items:
    if "median_sec" in stats:
      rows.append(_row(name, key, stats["median_sec"], stats.get("min_sec"),
                       stats.get("max_sec")))
    for rate in ("videos_per_sec", "steps_per_sec"):
      if isinstance(stats.get(rate), dict) and "median" in stats[rate]:
        s = stats[rate]
        rows.append([name, f"{key} {rate}", f"{s['median']:.2f}",
                     f"{s.get('min', 0):.2f} / {s.get('max', 0):.2f}", "", ""])
  return rows


def _dtype_cells(name: str, r: dict) -> List[tuple]:
  """(what, setting without the precision, precision, median sec) of a training-step or
  inference record's timings."""
  cells = []
  if name.startswith("train_step"):
    for row in r["results"]:
      cells.append(("train_step", _train_step_setting(row, row["mode"]),
                    row.get("precision", "float32"), row["median_sec"]))
  elif name.startswith("inference"):
    for entry in r["lengths"]:
      cells.append(("inference", _inference_setting(r, entry) + ", forward + post-processing",
                    r.get("precision", "float32"),
                    entry["forward_plus_postprocess"]["median_sec"]))
  return cells


def dtype_table(records: Sequence[dict]) -> List[str]:
  """The training-step and inference medians with one column per precision (float32,
  mixed_bfloat16) and their ratio; no lines unless a record ran in bfloat16."""
  medians: Dict[tuple, Dict[str, float]] = {}
  for rec in records:
    try:
      cells = _dtype_cells(rec["name"], rec["result"]) if "result" in rec else []
    except (KeyError, TypeError, IndexError):
      cells = []  # the main table names it "unrecognized JSON"
    for what, setting, precision, sec in cells:
      medians.setdefault((what, setting), {})[precision] = sec
  if not any("mixed_bfloat16" in v for v in medians.values()):
    return []
  lines = ["", "Per precision (medians; each row ran in its own process, one after the other,"
           " so the ratio carries the machine's drift between them: `benchmarks/ab_step.py "
           "--compare=dtype` alternates them in one process):", "",
           "| benchmark | setting | float32 | mixed_bfloat16 | bfloat16 / float32 |",
           "|---|---|---|---|---|"]
  for (what, setting), by in medians.items():
    f32, bf16 = by.get("float32"), by.get("mixed_bfloat16")
    ratio = f"{bf16 / f32:.2f}x" if f32 and bf16 else "-"
    lines.append(f"| {what} | {setting} | {_fmt(f32)} | {_fmt(bf16)} | {ratio} |")
  return lines


_FORMATTERS: Dict[str, Callable[[dict], List[List[str]]]] = {
    "inference": _rows_inference, "inference_bench": _rows_inference,
    "inference_bf16": _rows_inference, "inference_bench_bf16": _rows_inference,
    "train_step_bench": _rows_train_step, "train_step_bf16": _rows_train_step,
    "train_step_bench_bf16": _rows_train_step,
    "evaluation": _rows_evaluation, "model_memory": _rows_model_memory,
    "serving": _rows_serving, "data_pipeline": _rows_data_pipeline,
    "train_step": _rows_train_step,
}


def markdown(records: Sequence[dict], machine: dict, quick: bool) -> str:
  """The summary table (one row per measured setting) under the machine line, then the
  per-precision table (`dtype_table`)."""
  flags = machine.get("cpu_flags")
  if flags is None:
    cpu = ""  # an older results.json: the flags were not recorded
  else:
    cpu = f" ({', '.join(flags) or 'none of AVX2 / AVX-512 / AMX'})"
  family = machine.get("cpu_family_model")
  model = f"{machine.get('cpu_model')}" + (f", family.model {family}" if family else "")
  lines = [f"Machine: {model}{cpu}, {machine.get('cpu_affinity')} "
           f"usable cores, TensorFlow {machine.get('tensorflow')}, Keras {machine.get('keras')}"
           f"{' (--quick sizes: smoke numbers, not results)' if quick else ''}.", "",
           "| benchmark | setting | median | min / max | target | reference |",
           "|---|---|---|---|---|---|"]
  for rec in records:
    load = rec.get("load_avg_before")
    if "skipped" in rec:
      continue
    if "error" in rec:
      lines.append(f"| {rec['name']} | failed: {rec['error'].splitlines()[0][:80]} | - | - | | |")
      continue
    formatter = _FORMATTERS.get(rec["name"], lambda r, n=rec["name"]: _rows_generic(n, r))
    try:
      rows = formatter(rec["result"])
    except (KeyError, TypeError, IndexError) as e:
      rows = [[rec["name"], f"unrecognized JSON ({e!r}); see results.json", "-", "-", "", ""]]
    for row in rows:
      if load:
        row[1] += f" [load {load[0]:.1f}]"
      lines.append("| " + " | ".join(row) + " |")
  return "\n".join(lines + dtype_table(records)) + "\n"


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="pass --quick to every benchmark")
  parser.add_argument("--only", default="", help=f"comma-separated subset of {list(BENCHMARKS)}")
  parser.add_argument("--output_dir", default=os.path.join(_HERE, "results"))
  parser.add_argument("--markdown_only", action="store_true",
                      help="only re-render results.md from the results.json in --output_dir")
  parser.add_argument("--timeout", type=float, default=0.0,
                      help="seconds per benchmark (default 300 with --quick, 3600 otherwise)")
  args = parser.parse_args()
  names = [n for n in args.only.split(",") if n] or list(BENCHMARKS)
  unknown = sorted(set(names) - set(BENCHMARKS))
  if unknown:
    parser.error(f"unknown benchmarks {unknown}; choose from {list(BENCHMARKS)}")
  if args.markdown_only:
    with open(os.path.join(args.output_dir, "results.json")) as f:
      saved = json.load(f)
    with open(os.path.join(args.output_dir, "results.md"), "w") as f:
      f.write(markdown(saved["benchmarks"], saved["machine"], saved["quick"]))
    return
  timeout = args.timeout or (300.0 if args.quick else 3600.0)
  machine = common.machine_info()
  records = []
  started = time.strftime("%Y-%m-%d %H:%M")
  start = time.perf_counter()
  for name in names:
    rec = run_benchmark(name, args.quick, timeout)
    status = (rec.get("error") or rec.get("skipped") or "ok").splitlines()[0][:100]
    print(f"{name}: {rec.get('wall_sec', 0):.0f} s, {status}", file=sys.stderr, flush=True)
    records.append(rec)
  result = {"quick": args.quick, "machine": machine, "started": started,
            "total_wall_sec": round(time.perf_counter() - start, 1), "benchmarks": records}
  os.makedirs(args.output_dir, exist_ok=True)
  common.emit(result, os.path.join(args.output_dir, "results.json"))
  with open(os.path.join(args.output_dir, "results.md"), "w") as f:
    f.write(markdown(records, machine, args.quick))


if __name__ == "__main__":
  main()
