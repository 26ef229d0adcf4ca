"""How far `stbench predict` was from published GPU training runs, as one sentence beside predicted figures.

Read from the summary that `scripts/published_runs.py` writes (reports/predict/published/summary.json: rows,
time_rows, median_abs_memory_error, median_abs_time_error as fractions). No file (an installed package, or a
checkout before that table existed) or an unreadable one: no sentence, never an error.
"""
from __future__ import annotations

import json
from pathlib import Path

SUMMARY = Path(__file__).resolve().parents[2] / "reports" / "predict" / "published" / "summary.json"


def summary(path: Path | None = None) -> dict | None:
    try:
        data = json.loads((path or SUMMARY).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("rows") else None


def sentence(path: Path | None = None) -> str | None:
    """'checked against N published runs: median memory error X%, time error Y%' (time part only where the
    summary has time rows), or None."""
    data = summary(path)
    if data is None:
        return None
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
    return text
