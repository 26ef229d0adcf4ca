"""Read a run folder and render its one-file HTML report (jinja2, autoescaped, no external assets)."""
from __future__ import annotations

import datetime
import json
import os
from collections import Counter
from pathlib import Path

import jinja2

from .. import results
from ..errors import UserError
from ..runfolder import REPORT_FILE, TRACES_DIR, find_traces, read_run_info, run_folder
from ..trace import SUMMARY_FILE
from ..units import format_bytes
from . import attention, figures, predicted, recommend, training, verdict

TEMPLATES = Path(__file__).parent / "templates"
ENV_FIELDS = ("torch", "cuda", "gpu", "driver", "cpu", "cpu_threads", "host", "git_sha", "git_dirty", "stbench")
RECORD_COLUMNS = ("arch", "preset", "mode", "resolution", "frames", "batch", "dtype", "device", "status")  # table


def environment(records: list[dict]) -> list[tuple[str, str]]:
    """Each env field with its distinct values across records (several values: the run mixed machines)."""
    rows = []
    for name in ENV_FIELDS:
        values = Counter(str((r.get("env") or {}).get(name)) for r in records if (r.get("env") or {}).get(name)
                         is not None)
        if values:
            rows.append((name, ", ".join(v if len(values) == 1 else f"{v} ({n} records)"
                                         for v, n in values.most_common())))
    times = sorted((r.get("env") or {}).get("time") for r in records if (r.get("env") or {}).get("time"))
    if times:
        rows.append(("measured", times[0] if len(times) == 1 else f"{times[0]} to {times[-1]}"))
    return rows


# --- formatting filters -------------------------------------------------------------------------------

def fmt_ms(value) -> str:
    if value is None:
        return "—"
    return f"{value:.1f}" if value >= 10 else f"{value:.2f}" if value >= 0.1 else f"{value:.3f}"


def fmt_bytes(value) -> str:
    return "—" if value is None else format_bytes(value)


def fmt_pct(value, signed: bool = False) -> str:
    if value is None:
        return "—"
    return f"{value:+.1f}%" if signed else f"{value:.1f}%"


def fmt_ratio(ratio) -> str:
    if ratio is None:
        return "—"
    text = f"{ratio.value:.2f}x"
    if ratio.low is not None:
        text += f" ({ratio.low:.2f}–{ratio.high:.2f})"
    return text


def fmt_count(value) -> str:
    if value is None:
        return "—"
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= size:
            return f"{value / size:.2f}{unit}"
    return str(value)


def make_environment() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)), autoescape=True,
                             trim_blocks=True, lstrip_blocks=True)
    env.filters.update(ms=fmt_ms, bytes=fmt_bytes, pct=fmt_pct, ratio=fmt_ratio, count=fmt_count,
                       slug=results.case_slug, config=verdict.config_label,
                       settings=verdict.settings_label)
    return env


# --- the report ---------------------------------------------------------------------------------------

def build_context(run: str | os.PathLike, *, baseline: str | os.PathLike | None = None,
                  title: str | None = None) -> dict:
    folder = run_folder(run)
    frame = results.load_frame(run)
    records, attention_records = attention.split(results.frame_records(frame.drop_duplicates("case_key",
                                                                                             keep="last")))
    info = read_run_info(folder)
    traces = find_traces(folder, [(results.case_slug(r), r) for r in records])
    traced = [(t["record"], t["summary"]) for t in traces if t["record"] is not None and t["summary"]]

    measured = [r for r in records if not predicted.is_predicted(r)]  # predictions only in their own section
    figure_list, frontiers = [], []
    for label, group in figures.groups(measured):
        for x_field, panel in (("frames", "resolution"), ("resolution", "frames")):
            figure_list.append(figures.scaling_figure(group, label, x_field, panel))
        figure_list.append(figures.breakdown_figure(group, label))
        frontier_figure, table = figures.oom_frontier(group, label)
        figure_list.append(frontier_figure)
        if table:
            frontiers.append({"label": label, "rows": table})
    figure_list.append(figures.region_figure(traced))

    base = None
    if baseline is not None:
        run_folder(baseline)
        baseline_records = results.frame_records(results.load_frame(baseline))
        rows, only_current, only_baseline = verdict.baseline_deltas(records, baseline_records)
        base = {"path": str(baseline), "rows": rows, "only_current": only_current, "only_baseline": only_baseline}

    statuses = Counter(r["status"] for r in records)
    return {
        "title": title or f"stbench report: {folder.resolve().name}",
        "generated": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "run_path": str(run),
        "info": info,
        "sweep": [(k, ", ".join(map(str, v)) if isinstance(v, list) else v)
                  for k, v in sorted((info.get("sweep") or {}).items())],
        "environment": environment(records),
        "records": sorted(records, key=lambda r: (r["arch"], r["preset"], r["mode"], r["resolution"], r["frames"],
                                                  r["batch"], r["dtype"], r["device"])),
        "superseded": len(frame) - frame["case_key"].nunique(),
        "statuses": {s: statuses.get(s, 0) for s in results.STATUSES},
        "recommendations": recommend.recommend(records),
        "comparisons": [c for c in (verdict.compare(measured, comp) for comp in verdict.COMPARISONS) if c],
        "figures": [f for f in figure_list if f is not None],
        "frontiers": frontiers,
        "predicted": predicted.section(records),
        "warnings": [(r, w) for r in records for w in (r.get("warnings") or [])],
        "failures": [r for r in records if r["status"] != "ok"],
        "baseline": base,
        "traces": traces,
        "traces_dir": str(folder / TRACES_DIR),
        "summary_file": SUMMARY_FILE,
        "columns": RECORD_COLUMNS,
        "attention": attention.section(attention_records),
        "training": training.training_section(records),
    }


def render_report(run: str | os.PathLike, output: str | os.PathLike | None = None, *,
                  baseline: str | os.PathLike | None = None, title: str | None = None) -> Path:
    """Render the report of `run` into `output` (default RUN/report.html); returns the path written."""
    context = build_context(run, baseline=baseline, title=title)
    html = make_environment().get_template("report.html").render(**context)
    out = Path(output) if output is not None else run_folder(run) / REPORT_FILE
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(html, encoding="utf-8")
        tmp.replace(out)
    except OSError as e:
        raise UserError(f"cannot write {out}: {e.strerror or e}") from None
    return out
