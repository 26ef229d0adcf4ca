"""Command line of the report: `python -m stbench.report RUN [-o FILE] [--baseline RUN] [--title T]`."""
from __future__ import annotations

import sys

from ..cli import OneLineParser
from ..errors import UserError
from . import add_arguments, execute

PROG = "stbench.report"


def build_parser() -> OneLineParser:
    parser = OneLineParser(prog=PROG, description="Render the HTML report of a stbench run (one offline file).")
    add_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        return execute(build_parser().parse_args(argv))
    except UserError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
