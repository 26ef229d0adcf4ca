"""The run folder: where a run's results, invocations, traces and report live, and how they are found.

    RUN/results.jsonl        one record per case, appended and fsync'd as each case finishes
    RUN/run.json             every command line that wrote into RUN with its settings, and the settings of the last one
    RUN/traces/<case slug>/  torch.profiler traces and their summary.json (--trace)
    RUN/report.html          the report (python -m stbench.report RUN)
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from .errors import UserError
from .units import utc_now

RESULTS_FILE = "results.jsonl"
RUN_FILE = "run.json"
TRACES_DIR = "traces"
REPORT_FILE = "report.html"


def results_path(run: str | os.PathLike) -> Path:
    """A run is a folder holding results.jsonl, or the .jsonl file itself."""
    path = Path(run)
    return path / RESULTS_FILE if path.is_dir() or not path.suffix else path


def run_folder(run: str | os.PathLike) -> Path:
    """The folder of a run given as a folder or as its results .jsonl file; a missing run is a UserError."""
    path = Path(run)
    if not path.exists():
        raise UserError(f"no such run: {path}")
    if path.is_dir():
        if not (path / RESULTS_FILE).is_file():
            raise UserError(f"{path} holds no {RESULTS_FILE} (not a stbench run folder)")
        return path
    return path.parent


def open_run_folder(out: str | os.PathLike, *, command: str, resume: bool, settings: dict) -> Path:
    """Check and create the run folder and record this invocation in run.json; returns the results file.

    Results already there are never overwritten: without `resume` a non-empty results file is an error
    (with it, `results.recorded_keys` names the cases to skip).
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"out: {out} exists and is not a folder")
    path = out / RESULTS_FILE
    if path.exists() and path.stat().st_size and not resume:
        raise UserError(f"out: {out} already holds results; pass --resume to continue that run, "
                        f"or choose another --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
        _write_run_file(out, command, resume, settings)
    except OSError as e:
        raise UserError(f"out: cannot write into {out} ({e.strerror or e})") from None
    return path


def _write_run_file(out: Path, command: str, resume: bool, settings: dict) -> None:
    path = out / RUN_FILE
    info = {}
    if resume and path.exists():
        try:
            info = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            info = {}
    info.setdefault("command", command)
    info["invocations"] = info.get("invocations", []) + [{"command": command, "time": utc_now(), "settings": settings}]
    info["sweep"] = settings
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(info, indent=2) + "\n")
    os.replace(tmp, path)


def read_run_info(folder: str | os.PathLike) -> dict:
    """run.json written by the runner; {} when absent (a bare results file); a malformed one is an error."""
    path = Path(folder) / RUN_FILE
    if not path.exists():
        return {}
    try:
        info = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(info, dict):
        raise UserError(f"{path}: expected a JSON object")
    return info


def find_traces(folder: str | os.PathLike, cases: list[tuple[str, dict]]) -> list[dict]:
    """Trace folders of the run: one per (slug, record) that has RUN/traces/<slug>/, then folders of no record."""
    from .trace import load_summary

    folder = Path(folder)

    def entry(trace_dir: Path, record: dict | None) -> dict:
        return {"slug": trace_dir.name, "record": record, "summary": load_summary(trace_dir),
                "files": sorted(p.name for p in trace_dir.glob("*.pt.trace.json*")) if trace_dir.is_dir() else [],
                "folder": f"{TRACES_DIR}/{trace_dir.name}"}

    traces, seen = [], set()
    for slug, record in cases:
        found = entry(folder / TRACES_DIR / slug, record)
        if found["summary"] is None and not found["files"]:
            continue
        seen.add(slug)
        traces.append(found)
    if (folder / TRACES_DIR).is_dir():
        traces += [entry(extra, None) for extra in sorted((folder / TRACES_DIR).iterdir())
                   if extra.is_dir() and extra.name not in seen]
    return traces
