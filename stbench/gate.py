"""`python -m stbench gate`: compare a run against a baseline on time and memory; exit 1 on a regression.

Inputs are stbench results (a run folder or a .jsonl file) or pytest-benchmark JSON (`--benchmark-json`),
whose raw samples replace the record's timing and whose `extra_info` carries the stbench record.
A time regression must be both larger than the tolerance and significant (stbench.stats.compare_times, the
same judgement the report makes); memory figures are deterministic enough to be compared against a tolerance alone.
"""
from __future__ import annotations

import json
import re
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

from . import results, stats
from .errors import UserError
from .measure import load
from .units import format_bytes

MEMORY_METRICS = ("peak_allocated", "peak_reserved", "nvml_peak_process", "nvml_peak_device", "saved_activations")
OK, REGRESSION, IMPROVED, NOISE, UNSURE, NOTE = "ok", "REGRESSION", "improved", "noise", "unsure", "note"


def add_arguments(parser):
    parser.add_argument("--baseline", required=True, metavar="RUN",
                        help="baseline: run folder, results .jsonl, or pytest-benchmark JSON")
    parser.add_argument("--current", required=True, metavar="RUN",
                        help="current run: run folder, results .jsonl, or pytest-benchmark JSON")
    parser.add_argument("--time-tolerance", type=float, default=0.05, metavar="FRACTION",
                        help="median slowdown tolerated before a significant slowdown fails (default 0.05)")
    parser.add_argument("--memory-tolerance", type=float, default=0.02, metavar="FRACTION",
                        help="memory growth tolerated per figure (default 0.02)")
    parser.add_argument("--alpha", type=float, default=0.05,
                        help="significance level of the time test (default 0.05)")
    parser.add_argument("--markdown", metavar="FILE",
                        help="also write the table as GitHub markdown (appended; e.g. $GITHUB_STEP_SUMMARY)")


def execute(args) -> int:
    for name in ("time_tolerance", "memory_tolerance"):
        if not 0 <= getattr(args, name) < 10:
            raise UserError(f"--{name.replace('_', '-')}: expected a fraction >= 0 (0.05 = 5%), "
                            f"got {getattr(args, name)}")
    if not 0 < args.alpha < 1:
        raise UserError(f"--alpha: expected a value in (0, 1), got {args.alpha}")
    outcome = compare(load_results(args.baseline), load_results(args.current),
                      time_tolerance=args.time_tolerance, memory_tolerance=args.memory_tolerance, alpha=args.alpha)
    print(format_text(outcome))
    if args.markdown:
        try:
            with open(args.markdown, "a") as f:
                f.write(format_markdown(outcome))
        except OSError as e:
            raise UserError(f"--markdown {args.markdown}: cannot write ({e.strerror or e})") from None
    return 1 if outcome.failed else 0


def gpu_slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3': the folder name of a GPU's committed baseline."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown-gpu"


def baseline_folder(root, gpu_name: str) -> Path:
    """Where the committed baseline of a GPU lives: ROOT/<gpu-slug>/ (results.jsonl, suites-benchmark.json)."""
    return Path(root) / gpu_slug(gpu_name)


# --- reading inputs ---------------------------------------------------------------------------

def load_results(path) -> list[dict]:
    """Records of a stbench run or of a pytest-benchmark JSON file; bad input raises UserError."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"{p}: no such file or folder")
    if p.is_file() and p.suffix == ".json":
        records = _read_pytest_benchmark(p)
    else:
        records = results.frame_records(results.load_frame(p))
    if not records:
        raise UserError(f"{p}: holds no results")
    return records


def _read_pytest_benchmark(path: Path) -> list[dict]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not a readable JSON file ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("benchmarks"), list):
        raise UserError(f"{path}: not a pytest-benchmark JSON file (no 'benchmarks' list)")
    records = []
    for i, bench in enumerate(data["benchmarks"]):
        if not isinstance(bench, dict) or not isinstance(bench.get("stats"), dict):
            raise UserError(f"{path}: benchmarks[{i}] has no stats")
        extra = bench.get("extra_info") or {}
        record = extra.get("stbench") if isinstance(extra.get("stbench"), dict) else extra
        if "arch" in record and "schema" in record:
            record = {**{name: None for name in results.RECORD_FIELDS}, **record}
        else:  # a benchmark that is not a stbench case: matched by its pytest name
            record = {**{name: None for name in results.RECORD_FIELDS}, "status": "ok", "warnings": []}
        record["_name"] = bench.get("fullname") or bench.get("name") or f"benchmarks[{i}]"
        samples = bench["stats"].get("data")
        if samples:
            # pytest-benchmark's own samples (seconds per iteration) are what this file measured
            ms = [1000.0 * float(s) for s in samples]
            record.update(step_ms_samples=ms, step_ms_median=statistics.median(ms), step_ms_min=min(ms))
        elif bench["stats"].get("median") is not None:
            record.update(step_ms_samples=None, step_ms_median=1000.0 * float(bench["stats"]["median"]))
        records.append(record)
    return records


def record_key(record: dict) -> str:
    if record.get("arch") is not None and record.get("preset") is not None:
        return results.case_key(record)
    return "pytest:" + str(record.get("_name"))


def record_slug(record: dict) -> str:
    if record.get("arch") is not None and record.get("preset") is not None:
        return results.case_slug(record)
    return str(record.get("_name")).rsplit("::", 1)[-1]


# --- comparison -------------------------------------------------------------------------------

@dataclass
class Row:
    """One compared figure of one case."""

    case: str
    metric: str
    baseline: float | str | None
    current: float | str | None
    delta: float | None = None  # relative change, +0.10 = 10% more
    p_value: float | None = None
    verdict: str = OK


@dataclass
class GateOutcome:
    """Everything the gate found; `failed` decides the exit code."""

    rows: list[Row] = field(default_factory=list)
    missing_in_current: list[str] = field(default_factory=list)
    missing_in_baseline: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    compared: int = 0
    settings: dict = field(default_factory=dict)

    @property
    def regressions(self) -> list[Row]:
        return [r for r in self.rows if r.verdict == REGRESSION]

    @property
    def improvements(self) -> list[Row]:
        return [r for r in self.rows if r.verdict == IMPROVED]

    @property
    def failed(self) -> bool:
        return bool(self.regressions)


def _latest_by_key(records: list[dict], side: str, warnings: list[str]) -> dict[str, dict]:
    by_key: dict[str, dict] = {}
    for record in records:
        by_key[record_key(record)] = record  # a rerun of a case appends again: the last record wins
    if len(by_key) < len(records):
        warnings.append(f"{side}: {len(records) - len(by_key)} case(s) recorded more than once; "
                        f"the last record of each is compared")
    return by_key


def _samples(record: dict) -> list[float]:
    return [float(s) for s in record.get("step_ms_samples") or [] if s is not None]


def _median_ms(record: dict) -> float | None:
    samples = _samples(record)
    if samples:
        return statistics.median(samples)
    return record.get("step_ms_median")


def _compare_time(slug, base, cur, tol, alpha, warnings) -> Row | None:
    judged = stats.compare_times(cur, base, tolerance=tol, alpha=alpha)
    if judged is None or judged.ratio <= 0:
        return None
    b_med, c_med = _median_ms(base), _median_ms(cur)
    row = Row(slug, "step_ms", b_med, c_med, delta=judged.delta, p_value=judged.p_value)
    if judged.verdict == stats.UNSURE:
        row.verdict = UNSURE
        warnings.append(f"{slug}: step time changed {row.delta:+.1%} but {judged.n_baseline} baseline and "
                        f"{judged.n_current} current samples cannot reach p < {alpha}; not judged "
                        f"(use more --repeats or --rounds)")
    elif judged.verdict == stats.SLOWER:
        row.verdict = REGRESSION
    elif judged.verdict == stats.FASTER:
        row.verdict = IMPROVED
    elif row.delta > tol:
        row.verdict = NOISE
    loaded = [side for side, r in (("baseline", base), ("current", cur)) if load.was_loaded(r)]
    if loaded:
        which = "both cases were" if len(loaded) == 2 else f"the {loaded[0]} case was"
        warnings.append(f"{slug}: {which} measured under load from other processes (see the record's "
                        f"warnings); this step-time comparison may reflect the machine, not the code")
    return row


def _compare_memory(slug, metric, base, cur, tol) -> Row | None:
    b, c = base.get(metric), cur.get(metric)
    if b is None and c is None:
        return None
    if b is None or c is None:
        return Row(slug, metric, b, c, verdict=NOTE)  # measured on one side only (e.g. NVML missing)
    if b == 0:
        return Row(slug, metric, b, c, verdict=REGRESSION if c > 0 else OK)
    row = Row(slug, metric, b, c, delta=c / b - 1)
    if row.delta > tol:
        row.verdict = REGRESSION
    elif row.delta < -tol:
        row.verdict = IMPROVED
    return row


def compare(baseline: list[dict], current: list[dict], *, time_tolerance: float = 0.05,
            memory_tolerance: float = 0.02, alpha: float = 0.05) -> GateOutcome:
    """Match cases by identity and judge each one's status, step time and memory figures."""
    outcome = GateOutcome(settings=dict(time_tolerance=time_tolerance, memory_tolerance=memory_tolerance,
                                        alpha=alpha))
    base_by_key = _latest_by_key(baseline, "baseline", outcome.warnings)
    cur_by_key = _latest_by_key(current, "current", outcome.warnings)
    outcome.missing_in_current = sorted(record_slug(base_by_key[k]) for k in base_by_key if k not in cur_by_key)
    outcome.missing_in_baseline = sorted(record_slug(cur_by_key[k]) for k in cur_by_key if k not in base_by_key)
    _warn_on_environment(base_by_key, cur_by_key, outcome.warnings)
    for key in sorted(set(base_by_key) & set(cur_by_key), key=lambda k: record_slug(cur_by_key[k])):
        base, cur = base_by_key[key], cur_by_key[key]
        slug = record_slug(cur)
        outcome.compared += 1
        b_status, c_status = base.get("status") or "ok", cur.get("status") or "ok"
        if b_status != c_status or b_status != "ok":
            verdict = (REGRESSION if b_status == "ok" else IMPROVED if c_status == "ok" else NOTE)
            outcome.rows.append(Row(slug, "status", b_status, c_status, verdict=verdict))
            if verdict == REGRESSION and cur.get("error"):
                outcome.warnings.append(f"{slug}: {c_status}: {str(cur['error']).splitlines()[0][:200]}")
            continue
        row = _compare_time(slug, base, cur, time_tolerance, alpha, outcome.warnings)
        if row is not None:
            outcome.rows.append(row)
        for metric in MEMORY_METRICS:
            row = _compare_memory(slug, metric, base, cur, memory_tolerance)
            if row is not None:
                outcome.rows.append(row)
    return outcome


def _warn_on_environment(base_by_key, cur_by_key, warnings):
    def seen(records, name):
        return sorted({str((r.get("env") or {}).get(name)) for r in records.values()
                       if (r.get("env") or {}).get(name)})

    for name, why in (("gpu", "time and memory are not comparable across devices"),
                      ("torch", "a torch upgrade can move time and memory")):
        b, c = seen(base_by_key, name), seen(cur_by_key, name)
        if b and c and b != c:
            warnings.append(f"baseline {name} {', '.join(b)} differs from current {', '.join(c)}: {why}")


# --- output -----------------------------------------------------------------------------------

def _format_value(metric: str, value) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    if metric == "step_ms":
        return f"{value:.2f} ms" if value < 1000 else f"{value / 1000:.3f} s"
    return format_bytes(value)


def _cells(row: Row) -> list[str]:
    delta = "-" if row.delta is None else f"{row.delta:+.1%}"
    p = "-" if row.p_value is None else (f"{row.p_value:.3g}" if row.p_value >= 1e-4 else "<1e-4")
    return [row.case, row.metric, _format_value(row.metric, row.baseline), _format_value(row.metric, row.current),
            delta, p, row.verdict]


HEADER = ["case", "metric", "baseline", "current", "delta", "p", "verdict"]


def _summary(outcome: GateOutcome) -> str:
    s = outcome.settings
    verdict = "FAIL" if outcome.failed else "PASS"
    return (f"gate: {verdict}: {len(outcome.regressions)} regression(s), {len(outcome.improvements)} "
            f"improvement(s) over {outcome.compared} compared case(s); {len(outcome.missing_in_current)} missing "
            f"in current, {len(outcome.missing_in_baseline)} without baseline (time tolerance "
            f"{s['time_tolerance']:.0%} at alpha {s['alpha']}, memory tolerance {s['memory_tolerance']:.0%})")


def format_text(outcome: GateOutcome) -> str:
    table = [HEADER] + [_cells(r) for r in outcome.rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(HEADER))]
    right = {2, 3, 4, 5}
    lines = ["  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths)))
             .rstrip() for line in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    for title, cases in (("missing in current", outcome.missing_in_current),
                         ("no baseline (new)", outcome.missing_in_baseline)):
        if cases:
            lines.append(f"\n{title}: {len(cases)}")
            lines += [f"  {c}" for c in cases]
    if outcome.warnings:
        lines.append("\nwarnings:")
        lines += [f"  {w}" for w in outcome.warnings]
    lines.append("\n" + _summary(outcome))
    return "\n".join(lines)


def format_markdown(outcome: GateOutcome) -> str:
    icon = {REGRESSION: ":x: regression", IMPROVED: ":white_check_mark: improved"}
    def table(rows):
        out = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
        for row in rows:
            cells = _cells(row)
            cells[0] = f"`{cells[0]}`"
            cells[-1] = icon.get(row.verdict, row.verdict)
            out.append("| " + " | ".join(cells) + " |")
        return out

    lines = [f"### stbench gate: {'FAIL' if outcome.failed else 'PASS'}", "", _summary(outcome), ""]
    changed = [r for r in outcome.rows if r.verdict != OK]
    if changed:  # what needs a look first; every figure below, folded
        lines += table(changed) + [""]
    lines += [f"<details><summary>all {len(outcome.rows)} compared figures</summary>", ""] + table(outcome.rows)
    lines += ["", "</details>"]
    for title, cases in (("Missing in current", outcome.missing_in_current),
                         ("No baseline (new)", outcome.missing_in_baseline)):
        if cases:
            lines += ["", f"**{title}** ({len(cases)}): " + ", ".join(f"`{c}`" for c in cases)]
    if outcome.warnings:
        lines += ["", "**Warnings**", ""] + [f"- {w}" for w in outcome.warnings]
    return "\n".join(lines) + "\n\n"


if __name__ == "__main__":  # `python -m stbench.gate ...` works as well as `python -m stbench gate ...`
    from .cli import main

    sys.exit(main(["gate", *sys.argv[1:]]))
