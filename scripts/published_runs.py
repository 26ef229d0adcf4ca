"""Predict every published GPU training run in reports/predict/published/runs.toml and write the comparison.

    python scripts/published_runs.py                  # predict every run (sequentially; minutes per full-size
                                                      # model), then write records.jsonl, table.md, summary.json
    python scripts/published_runs.py --only ID[,ID]   # re-predict these runs, keep the other records
    python scripts/published_runs.py --from-records   # rebuild table.md and summary.json from records.jsonl
    python scripts/published_runs.py --from-records --check   # exit 1 if the committed files differ

Each run is `stbench predict` in its own process (its printed command is the row's command); the published
figure is compared with the prediction of the same quantity (runs.toml's header lists the metrics).
"""
from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDER = ROOT / "reports" / "predict" / "published"
RUNS, RECORDS, TABLE, SUMMARY = (FOLDER / n for n in ("runs.toml", "records.jsonl", "table.md", "summary.json"))
GIB = 2**30
MEMORY_TARGET, TIME_TARGET = 0.10, 0.25  # the bar: memory within 10%, step time within 25%
# metric -> (field of `predicted`, scale to the published unit, what the source reports)
METRICS = {
    "allocated_after_step": ("allocated_after_step_bytes", 1 / GIB, "memory_allocated between steps"),
    "max_allocated": ("peak_allocated_bytes", 1 / GIB, "max_memory_allocated"),
    "max_reserved": ("reserved_bytes", 1 / GIB, "max_memory_reserved"),
    "nvidia_smi": ("peak_bytes", 1 / GIB, "nvidia-smi (reserved + CUDA context)"),
    "seconds_per_step": ("step_ms", 1e-3, "seconds per step (expected time)"),
}


KINDS = {"gemm": "GEMMs", "attention": "attention forward", "attention_backward": "attention backward",
         "other": "memory-bound and other kernels"}


def load_runs(path: Path = RUNS) -> dict:
    with open(path, "rb") as f:
        return tomllib.load(f)


def command(run: dict) -> list[str]:
    return ["stbench", "predict", *run["args"], "--hardware", run["hardware"]]


def predict(run: dict) -> dict:
    """One `stbench predict` process for `run`; its record (or the error it printed)."""
    with tempfile.TemporaryDirectory() as tmp:
        argv = [sys.executable, "-m", "stbench", "predict", *run["args"], "--hardware", run["hardware"],
                "--out", tmp]
        done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
        results = Path(tmp) / "results.jsonl"
        if done.returncode != 0 or not results.exists():
            return {"status": "error", "error": (done.stderr or done.stdout).strip()[-2000:]}
        return json.loads(results.read_text().splitlines()[-1])


def read_records(path: Path = RECORDS) -> dict:
    if not path.exists():
        return {}
    return {(entry := json.loads(line))["id"]: entry for line in path.read_text().splitlines() if line.strip()}


def write_records(records: dict, runs: list[dict], path: Path = RECORDS) -> None:
    order = [r["id"] for r in runs]
    lines = [json.dumps(records[i], sort_keys=True) for i in order if i in records]
    path.write_text("\n".join(lines) + "\n")


def rows(runs: list[dict], records: dict) -> list[dict]:
    """One row per published figure: the figure, the prediction of the same quantity, the signed error."""
    out = []
    for run in runs:
        record = (records.get(run["id"]) or {}).get("record") or {}
        predicted = record.get("predicted") or {}
        for figure in run["figures"]:
            name, scale, _ = METRICS[figure["metric"]]
            value = predicted.get(name)
            value = None if value is None else value * scale
            error = None if value is None else (value - figure["published"]) / figure["published"]
            out.append({"id": run["id"], "model": run["model"], "metric": figure["metric"],
                        "unit": figure["unit"], "published": figure["published"], "predicted": value,
                        "error": error, "status": record.get("status", "not predicted"),
                        "why": figure.get("why"), "time": figure["metric"] == "seconds_per_step"})
    return out


def summary(table: list[dict]) -> dict:
    memory = [abs(r["error"]) for r in table if r["error"] is not None and not r["time"]]
    time = [abs(r["error"]) for r in table if r["error"] is not None and r["time"]]
    return {"rows": len(memory) + len(time), "memory_rows": len(memory), "time_rows": len(time),
            "median_abs_memory_error": round(statistics.median(memory), 4) if memory else None,
            "median_abs_time_error": round(statistics.median(time), 4) if time else None,
            "within_10pct_memory": sum(e <= MEMORY_TARGET for e in memory),
            "within_25pct_time": sum(e <= TIME_TARGET for e in time),
            "runs": len({r["id"] for r in table if r["error"] is not None}),
            "table": str(TABLE.relative_to(ROOT))}


def _number(value, unit) -> str:
    return "-" if value is None else (f"{value:.2f} s" if unit == "s" else f"{value:.2f} GiB")


def render(data: dict, records: dict) -> str:
    runs = data["run"]
    table = rows(runs, records)
    s = summary(table)
    lines = ["# Published GPU training runs of video models, against `stbench predict`", "",
             "Each row: a figure a training library or model repository PUBLISHED from its own GPU run, and what",
             "`stbench predict` PREDICTS for the same quantity without a GPU. Memory figures are compared like with",
             "like: memory_allocated with the allocation replay's bytes allocated after the step, max_memory_reserved",
             "with its reserved peak, nvidia-smi with the reserved peak plus the CUDA context (512 MiB, an",
             "assumption); step times with the expected step time (`predicted.step_ms`: every kernel class at its",
             "published achievable efficiency, stbench/predict/efficiency.py), never with the roofline bound.",
             "Errors are (predicted - published) / published. Regenerate: `python scripts/published_runs.py`",
             "(predicts every run); `python scripts/published_runs.py --from-records` rebuilds this file from",
             "records.jsonl. The runs, their sources and configurations are in runs.toml.", "",
             f"Checked against {s['rows']} published figures from {s['runs']} runs: median |memory error| "
             + (f"{s['median_abs_memory_error']:.1%}" if s["median_abs_memory_error"] is not None else "-")
             + f" ({s['within_10pct_memory']} of {s['memory_rows']} within 10%), median |step-time error| "
             + (f"{s['median_abs_time_error']:.1%}" if s["median_abs_time_error"] is not None else "-")
             + f" ({s['within_25pct_time']} of {s['time_rows']} within 25%).", "",
             "| # | run | model | metric (as published) | published | predicted | error | target |",
             "|---|---|---|---|---|---|---|---|"]
    for n, r in enumerate(table, 1):
        target = TIME_TARGET if r["time"] else MEMORY_TARGET
        verdict = "-" if r["error"] is None else ("within" if abs(r["error"]) <= target else "MISSES")
        error = "-" if r["error"] is None else f"{r['error']:+.1%}"
        predicted = _number(r["predicted"], r["unit"]) if r["status"] in ("ok", "oom") else r["status"]
        lines.append(f"| {n} | {r['id']} | {r['model']} | {METRICS[r['metric']][2]} | "
                     f"{_number(r['published'], r['unit'])} | {predicted} | {error} | "
                     f"{'-' if r['error'] is None else verdict + ' ±' + format(target, '.0%')} |")
    lines += ["", "## The runs", ""]
    for run in runs:
        entry = records.get(run["id"]) or {}
        record = entry.get("record") or {}
        p = record.get("predicted") or {}
        lines += [f"### {run['id']}", "", f"* source: [{run['source']}]({run['url']})",
                  f"* configuration (as the source states it): {run['config']}",
                  f"* command: `{shlex.join(command(run))}`"]
        if record.get("status") in ("ok", "oom"):
            text = (f"* predicted ({run['hardware']}, status {record['status']}): allocated after the step "
                    f"{_gib(p.get('allocated_after_step_bytes'))}, peak allocated "
                    f"{_gib(p.get('peak_allocated_bytes'))}, "
                    f"peak reserved {_gib(p.get('reserved_bytes'))}, + context {_gib(p.get('peak_bytes'))}")
            if p.get("step_ms") is not None:
                text += (f"; step {p['step_ms'] / 1e3:.3f} s expected (roofline bound "
                         f"{p['step_ms_bound'] / 1e3:.3f} s, attention backend {p.get('attention_backend')})")
                kinds = p.get("step_ms_by_kind") or {}
                if kinds:
                    text += " = " + ", ".join(f"{KINDS.get(k, k)} {v / 1e3:.3f} s" for k, v in sorted(kinds.items()))
            lines.append(text)
        else:
            error = (record.get("error") or "not predicted").strip().splitlines()
            lines.append(f"* prediction failed: `{error[-1] if error else 'not predicted'}`")
        for figure in run["figures"]:
            if figure.get("why"):
                lines.append(f"* {figure['metric']}: {figure['why']}")
        lines.append("")
    lines += ["## Found, not expressible", ""]
    for item in data.get("unexpressible", []):
        lines.append(f"* {item['source']}: {item['why']}")
    return "\n".join(lines) + "\n"


def _gib(value) -> str:
    return "-" if value is None else f"{value / GIB:.2f} GiB"


def outputs(data: dict, records: dict) -> dict[Path, str]:
    text = render(data, records)
    return {TABLE: text, SUMMARY: json.dumps(summary(rows(data["run"], records)), indent=2) + "\n"}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=None, help="comma-separated run ids to re-predict")
    parser.add_argument("--from-records", action="store_true", help="no prediction: render records.jsonl")
    parser.add_argument("--check", action="store_true", help="with --from-records: exit 1 if table.md or "
                        "summary.json differ from what the records give")
    args = parser.parse_args(argv)
    data = load_runs()
    records = read_records()
    if not args.from_records:
        wanted = set(args.only.split(",")) if args.only else {r["id"] for r in data["run"]}
        unknown = wanted - {r["id"] for r in data["run"]}
        if unknown:
            parser.error(f"--only: unknown run ids {sorted(unknown)}")
        for run in data["run"]:
            if run["id"] not in wanted:
                continue
            print(f"predicting {run['id']}: {shlex.join(command(run))}", flush=True)
            records[run["id"]] = {"id": run["id"], "command": shlex.join(command(run)), "record": predict(run)}
            write_records(records, data["run"])  # after each run: a killed sweep keeps what it predicted
    written = outputs(data, records)
    if args.check:
        stale = [str(path.relative_to(ROOT)) for path, text in written.items()
                 if not path.exists() or path.read_text() != text]
        if stale:
            print(f"published_runs: out of date: {', '.join(stale)}", file=sys.stderr)
            return 1
        return 0
    for path, text in written.items():
        path.write_text(text)
    print(f"published_runs: wrote {', '.join(str(p.relative_to(ROOT)) for p in written)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
