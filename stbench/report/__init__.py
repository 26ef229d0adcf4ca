"""`python -m stbench.report RUN`: one self-contained HTML report of a run (works offline, no external assets)."""
from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The report's options; shared by `python -m stbench.report` and a `stbench report` subcommand."""
    parser.add_argument("run", help="run folder (holding results.jsonl) or a results .jsonl file")
    parser.add_argument("-o", "--output", help="where to write the report (default: RUN/report.html)")
    parser.add_argument("--baseline", help="another run (folder or .jsonl) to show deltas against")
    parser.add_argument("--title", help="title of the report (default: from the run folder's name)")


def execute(args: argparse.Namespace) -> int:
    out = render_report(args.run, args.output, baseline=args.baseline, title=args.title)
    print(f"report written to {out}")
    return 0


def render_report(run, output=None, *, baseline=None, title=None):
    """Render the report of `run` into `output` (default RUN/report.html); returns the path written."""
    from .render import render_report as _render  # noqa: local so `--help` and usage errors stay fast

    return _render(run, output, baseline=baseline, title=title)
