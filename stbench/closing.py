"""The closing lines of `stbench run`: where the results are, how to see them, what to look at."""
from __future__ import annotations

import shlex
from pathlib import Path

from . import results, runfolder, stats
from .measure import load
from .report.verdict import config_label, match_key


def closing_lines(records: list[dict], skipped: int, out: Path, *, trace: bool) -> list[str]:
    failed = sum(r["status"] != "ok" for r in records)
    warned = [r for r in records if r.get("warnings")]
    loaded = sum(load.was_loaded(r) for r in records)
    lines = [f"stbench: {len(records)} case(s) measured ({failed} not ok), {skipped} skipped "
             f"(already in the run{', --resume' if skipped else ''})",
             f"stbench: results: {Path(out) / runfolder.RESULTS_FILE}"]
    if trace:
        lines.append(f"stbench: traces: {Path(out) / 'traces'}")
    notes = f"stbench: {sum(len(r['warnings']) for r in warned)} warning(s) on {len(warned)} case(s)"
    if loaded:
        notes += f"; {loaded} case(s) measured while other processes competed for the machine (load)"
    lines.append(notes)
    lines += comparison_lines(records)
    lines.append(f"stbench: report: python -m stbench report {shlex.quote(str(out))}")
    return lines


def _label(record: dict) -> str:
    """The architecture and its --set overrides: what differs between the compared cases."""
    sets = ",".join(f"{k}={v}" for k, v in sorted((record.get("overrides") or {}).items()))
    return record["arch"] + (f" [{sets}]" if sets else "")


def comparison_lines(records: list[dict]) -> list[str]:
    """Per configuration measured for several architectures (or --set variants): each against the fastest, judged
    by stbench.stats.compare_times as the gate and the report's "What to train" judge it; a pair the samples cannot
    tell apart is said to be so."""
    groups: dict[tuple, list[dict]] = {}
    for record in records:
        if record["status"] == "ok" and record.get("step_ms_median"):
            groups.setdefault(match_key(record), []).append(record)
    lines = []
    for group in groups.values():
        if len(group) < 2:
            continue
        group = sorted(group, key=lambda r: r["step_ms_median"])
        fastest = group[0]
        judged = [(r, stats.compare_times(r, fastest, same_run=True)) for r in group[1:]]
        parts = [f"{_label(r)} {j.ratio:.2f}x ({j.verdict}, {j.test}, n={j.n_current}+{j.n_baseline}"
                 + (f", p={j.p_value:.2g}" if j.p_value is not None else "") + ")" for r, j in judged]
        lines.append(f"stbench: step time at {config_label(fastest, short=True)}: fastest {_label(fastest)} "
                     f"{fastest['step_ms_median']:.1f} ms; " + "; ".join(parts))
        # within the tolerance the verdict holds however small p is; beyond it, no verdict means too few samples
        close = [_label(r) for r, j in judged if j.verdict == stats.SAME and abs(j.ratio - 1) <= stats.TOLERANCE]
        tied = [_label(r) for r, j in judged
                if j.verdict not in (stats.SLOWER, stats.FASTER) and _label(r) not in close]
        if close:
            lines.append(f"stbench: {', '.join(close)} within {stats.TOLERANCE:.0%} of {_label(fastest)}'s step time "
                         f"(the gate's tolerance): treat them as equally fast")
        if tied:
            rounds = max(r.get("rounds") or 1 for r in group)
            lines.append(f"stbench: the samples cannot tell {', '.join(tied)} apart from {_label(fastest)} "
                         f"({rounds} round(s)); treat them as equally fast, or measure with more --rounds")
    return lines
