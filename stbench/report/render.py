"""Read a run folder and render its one-file HTML report (jinja2, autoescaped, no external assets)."""
from __future__ import annotations

import datetime
import json
import os
import shlex
from collections import Counter
from pathlib import Path

import jinja2

from .. import results
from ..errors import UserError
from ..runfolder import REPORT_FILE, TRACES_DIR, find_traces, read_run_info, run_folder
from ..predict.command import FRONTIER_FILE
from ..trace import SUMMARY_FILE
from ..units import format_bytes
from . import answer, attention, figures, predicted, recommend, training, validation, verdict

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


def settings_rows(settings) -> list[tuple[str, str]]:
    """A command's settings as (name, value) rows, unset ones left out."""
    return [(k, ", ".join(map(str, v)) if isinstance(v, list) else str(v))
            for k, v in sorted((settings or {}).items()) if v not in (None, [], {}, "")]


def command_flags(command: str) -> list[tuple[str, str]]:
    """The flags of a recorded command line as (name, value) rows (for invocations recorded without their
    settings): `--x v` and `--x=v` give (x, v), a bare `--x` gives (x, 'yes')."""
    try:
        words = shlex.split(command)
    except ValueError:
        return []
    rows = []
    for i, word in enumerate(words):
        if not word.startswith("--"):
            continue
        name, eq, value = word[2:].partition("=")
        if not eq:
            following = words[i + 1] if i + 1 < len(words) else None
            value = following if following is not None and not following.startswith("--") else "yes"
        rows.append((name, value))
    return rows


def invocations(info: dict, records: list[dict]) -> list[dict]:
    """Every command that wrote into the run, oldest first, each with its own settings and the number of
    records it wrote (records are stamped with the time they were written, invocations with their start)."""
    out = []
    calls = [i for i in info.get("invocations") or [] if isinstance(i, dict) and i.get("command")]
    for n, call in enumerate(calls):
        start = call.get("time") or ""
        end = calls[n + 1].get("time") if n + 1 < len(calls) else None
        written = sum(1 for r in records if start <= ((r.get("env") or {}).get("time") or "")
                      and (end is None or (r.get("env") or {}).get("time", "") < end))
        settings = settings_rows(call["settings"]) if isinstance(call.get("settings"), dict) else \
            command_flags(call["command"])
        out.append({"command": call["command"], "time": start, "settings": settings, "records": written})
    return out


def frontier_lines(folder: Path) -> list[str]:
    """The lines `stbench predict --frontier` wrote into the run's frontier.txt ([] without one)."""
    try:
        return [line for line in (folder / FRONTIER_FILE).read_text().splitlines() if line.strip()]
    except OSError:
        return []


def warning_rows(records: list[dict]) -> list[tuple[str, list[dict]]]:
    """Each distinct warning once, with the cases that carry it (in the order first seen)."""
    by_text: dict[str, list[dict]] = {}
    for r in records:
        for w in r.get("warnings") or []:
            by_text.setdefault(w, []).append(r)
    return list(by_text.items())


# --- formatting filters -------------------------------------------------------------------------------

def fmt_ms(value) -> str:
    if value is None:
        return "—"
    return f"{value:.1f}" if value >= 10 else f"{value:.2f}" if value >= 0.1 else f"{value:.3f}"


def fmt_duration(ms) -> str:
    """Milliseconds as '10.8 s' from a second up, else '2.25 ms'."""
    if ms is None:
        return "—"
    return f"{ms / 1e3:.3g} s" if ms >= 1000 else f"{fmt_ms(ms)} ms"


def fmt_sig(value) -> str:
    """Three significant digits, without exponents: 1,480 / 120 / 0.739 / 0.00125."""
    if value is None:
        return "—"
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.3g}" if abs(value) >= 1e-3 or value == 0 \
        else f"{value:.1e}"


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
    env.filters.update(ms=fmt_ms, duration=fmt_duration, sig=fmt_sig, bytes=fmt_bytes, pct=fmt_pct, ratio=fmt_ratio,
                       count=fmt_count,
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
    shown = [r for r in records if not predicted.is_predicted(r) or r["status"] == "error"]
    return {
        "title": title or f"stbench report: {folder.resolve().name}",
        "generated": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "run_path": str(run),
        "info": info,
        "sweep": settings_rows(info.get("sweep")),
        "invocations": invocations(info, records),
        "environment": environment(records),
        "records": sorted(measured, key=lambda r: (r["arch"], r["preset"], r["mode"], r["resolution"], r["frames"],
                                                   r["batch"], r["dtype"], r["device"])),
        "all_records": len(records),
        "validation": validation.sentence(),
        "superseded": len(frame) - frame["case_key"].nunique(),
        "statuses": {s: statuses.get(s, 0) for s in results.STATUSES},
        "answer": answer.section(records, predicted.group_figures, predicted.frontier_figure,
                                 frontier_lines(folder)),
        "recommendations": recommend.recommend(records),
        "comparisons": [c for c in (verdict.compare(measured, comp) for comp in verdict.COMPARISONS) if c],
        "figures": [f for f in figure_list if f is not None],
        "frontiers": frontiers,
        "predicted": predicted.section(records),
        "warnings": warning_rows(shown),
        "failures": [r for r in shown if r["status"] != "ok"],
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
