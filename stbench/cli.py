"""`python -m stbench COMMAND`: each command lives in its own module with `add_arguments` and `execute`."""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from .errors import UserError

COMMANDS = {
    "run": ("stbench.runner", "measure a sweep of training steps and append results"),
    "gate": ("stbench.gate", "compare a run against a baseline; exit 1 on a regression"),
    "report": ("stbench.report", "render the self-contained HTML report of a run"),
    "inspect": ("stbench.inspect", "print parameter counts and saved-activation bytes of architectures"),
    "plan": ("stbench.planner", "rank the FSDP x context-parallel layouts of N GPUs by predicted throughput"),
    "list": ("stbench.listing", "list architectures: family, presets with parameter counts, attention, modes"),
    "predict": ("stbench.predict.command", "predict peak memory and step time on named GPUs, without a GPU"),
    "attention": ("stbench.attention_bench", "time sparse attention backends against SDPA (forward+backward)"),
    "train": ("stbench.train", "train architectures on synthetic video data: loss vs steps and wall time"),
}

# Commands that leave nothing to tear down when they return: they trace on fake tensors, write their files with
# `with open` and start no thread, process or device work
QUICK_EXIT = ("predict", "plan")


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports bad input as one line `stbench: error: ...` and exit code 2."""

    def error(self, message):
        raise UserError(message)


def build_parser() -> OneLineParser:
    parser = OneLineParser(prog="stbench", description="Benchmark text-to-video training architectures.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    for name, (module, help_text) in COMMANDS.items():
        command = sub.add_parser(name, help=help_text, description=help_text)
        importlib.import_module(module).add_arguments(command)
    return parser


def main(argv: list[str] | None = None, prog: str = "stbench") -> int:
    try:
        from .measure.memory import collector_paused, freeze_imports

        argv = list(sys.argv[1:] if argv is None else argv)
        with collector_paused():  # the parser imports every command's modules: nothing there for it to free
            args = build_parser().parse_args(argv)
        freeze_imports()  # and those modules' objects live as long as the process
        args.argv = argv  # the command line as typed: run.json records it for reproduction
        return int(importlib.import_module(COMMANDS[args.command][0]).execute(args) or 0)
    except UserError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; results written so far are kept (rerun with --resume)", file=sys.stderr)
        return 130


def console() -> None:
    """The `stbench` console script and `python -m stbench`: main(), then, after a predict or plan, exit without
    Python's teardown, which frees the million-odd objects of torch, sympy and diffusers one by one (0.5 s of a
    5.5 s wan 1.3b prediction on 2 cores). In-process callers (tests) call main() and keep their interpreter."""
    rc = main()
    if sys.argv[1:2] and sys.argv[1] in QUICK_EXIT:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    sys.exit(rc)
