"""The closing lines of `stbench run`: where the results are, how to see them, what to look at."""
from __future__ import annotations

import shlex
from pathlib import Path

from . import results, runfolder
from .measure import load


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
    lines.append(f"stbench: report: python -m stbench report {shlex.quote(str(out))}")
    return lines
