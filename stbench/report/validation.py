"""How far `stbench predict` was from GPU measurements, as one sentence beside predicted figures.

Read from the summary that `scripts/published_runs.py` writes (reports/predict/published/summary.json: rows,
time_rows, median_abs_memory_error, median_abs_time_error as fractions), and from the CSV tables of predict's
current model against a GPU baseline's sweep (reports/baselines/<gpu>/predict-vs-measured-after.csv, written by
`python -m stbench.predicted_vs_measured ... --csv`). No file (an installed package, or a checkout before those
tables existed) or an unreadable one: no sentence, never an error.
"""
from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

REPORTS = Path(__file__).resolve().parents[2] / "reports"
SUMMARY = REPORTS / "predict" / "published" / "summary.json"
GPU_TABLES = REPORTS / "baselines"  # */predict-vs-measured-after.csv
GPU_TABLE = "predict-vs-measured-after.csv"


def summary(path: Path | None = None) -> dict | None:
    try:
        data = json.loads((path or SUMMARY).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("rows") else None


def gpu_sentence(folder: Path | None = None) -> str | None:
    """'against N cases measured on GPU: median allocated-memory error X%, step-time error Y% (K of N predicted
    short)' from each baseline's CSV table, or None."""
    parts = []
    for table in sorted((folder or GPU_TABLES).glob(f"*/{GPU_TABLE}")):
        try:
            with open(table, newline="") as f:
                rows = [r for r in csv.DictReader(f) if r.get("measured_on") and r.get("step_ms_measured")]
            memory = [abs(float(r["allocated_predicted"]) / float(r["allocated_measured"]) - 1) for r in rows
                      if r.get("allocated_predicted") and r.get("allocated_measured")]
            steps = [float(r["step_ms_predicted"]) / float(r["step_ms_measured"]) - 1 for r in rows
                     if r.get("step_ms_predicted")]
        except (OSError, ValueError, KeyError):
            continue
        if not memory or not steps:
            continue
        gpu = rows[0]["measured_on"]
        short = sum(e < 0 for e in steps)
        parts.append(f"against {len(rows)} cases measured on an {gpu}: median allocated-memory error "
                     f"{statistics.median(memory):.0%}, step-time error {statistics.median(abs(e) for e in steps):.0%}"
                     f" ({short} of {len(steps)} step times predicted short; table: "
                     f"{table.relative_to(table.parents[3]).as_posix()})")
    return "; ".join(parts) or None


def sentence(path: Path | None = None, gpu_folder: Path | None = None) -> str | None:
    """'checked against N published runs: median memory error X%, time error Y%' (time part only where the
    summary has time rows), then what `gpu_sentence` says, or None."""
    data = summary(path)
    gpu = gpu_sentence(gpu_folder)
    if data is None:
        return f"checked {gpu}" if gpu else None
    text = f"checked against {data['rows']} published GPU training runs"
    if data.get("runs"):  # rows are a run's measurements (memory, time) at one configuration each
        text = f"checked against {data['rows']} measurements of {data['runs']} published GPU training runs"
    parts = []
    if data.get("median_abs_memory_error") is not None:
        parts.append(f"median memory error {data['median_abs_memory_error']:.0%}"
                     + (f" ({data['memory_rows']} runs)" if data.get("memory_rows") else ""))
    if data.get("time_rows") and data.get("median_abs_time_error") is not None:
        parts.append(f"time error {data['median_abs_time_error']:.0%} ({data['time_rows']} runs)")
    if parts:
        text += ": " + ", ".join(parts)
    if data.get("table"):
        text += f" (table: {data['table']})"
    return text + (f"; and {gpu}" if gpu else "")
