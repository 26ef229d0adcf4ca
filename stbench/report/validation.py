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
import math
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
    """'against N cases measured on GPU: median allocated-memory error X%, median step-time error Y% (K of N
    predicted short, the worst -Z%)' from each baseline's CSV table, or None; never an error."""
    parts = []
    for table in sorted((folder or GPU_TABLES).glob(f"*/{GPU_TABLE}")):
        try:
            parts.append(_table_clause(table))
        except (OSError, ValueError, KeyError, ArithmeticError, csv.Error):
            continue  # an unreadable table says nothing
    parts = [p for p in parts if p]
    return "; and ".join(parts) or None


def _table_clause(table: Path) -> str | None:
    """One baseline's clause: the rows measured on a GPU that have both errors (one case count for both)."""
    def ratio(row, name):
        value = float(row[f"{name}_predicted"]) / float(row[f"{name}_measured"]) - 1
        if not math.isfinite(value):
            raise ValueError(f"{name}: not a number")
        return value

    with open(table, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("measured_on") and r.get("hardware") not in (None, "", "cpu")
                and all(r.get(k) for k in ("allocated_predicted", "allocated_measured", "step_ms_predicted",
                                           "step_ms_measured"))]
    if not rows:
        return None
    memory = [abs(ratio(r, "allocated")) for r in rows]
    steps = [ratio(r, "step_ms") for r in rows]
    gpus = sorted({r["measured_on"] for r in rows})
    short = sum(e < 0 for e in steps)
    worst = max(steps, key=abs)
    try:
        where = table.relative_to(REPORTS.parent).as_posix()
    except ValueError:
        where = table.name
    cases = f"{len(rows)} case{'s' if len(rows) != 1 else ''}"
    return (f"against {cases} measured on {' and '.join(gpus)}: median allocated-memory error "
            f"{statistics.median(memory):.0%}, median step-time error {statistics.median(abs(e) for e in steps):.0%} "
            f"({short} of {len(steps)} predicted short, the worst {worst:+.0%}; table: {where})")


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
                     + (f" ({data['memory_rows']} figures)" if data.get("memory_rows") else ""))
    if data.get("time_rows") and data.get("median_abs_time_error") is not None:
        parts.append(f"time error {data['median_abs_time_error']:.0%} ({data['time_rows']} figures)")
    if parts:
        text += ": " + ", ".join(parts)
    if data.get("table"):
        text += f" (table: {data['table']})"
    return text + (f"; and {gpu}" if gpu else "")
