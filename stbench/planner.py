"""`python -m stbench plan`: every layout of N GPUs that stbench can run for one training case, each predicted
by `stbench predict` (one rank of FSDP2 x context parallelism in a fake process group), ranked by throughput.

Layouts: FSDP over all N GPUs, and FSDP (N / c) x Ulysses or ring (c) for every divisor c > 1 of N, each with
the activation checkpointing asked for. A layout is *runnable* when `torchrun --nproc-per-node N -m stbench run
--fsdp ...` accepts it (the architecture supports the context-parallel mode, tokens and heads divide, the
checkpointing has modules to recompute) and its prediction ran; only runnable layouts that are predicted to fit
are ranked. Throughput is the global batch (batch x FSDP degree) per predicted step; the step is the kernels'
roofline time with FSDP's and the ring's traffic overlapped and Ulysses' all-to-alls added (`predict.estimate`).
Every figure is a prediction, and is printed as one.
"""
from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import architectures

from . import results, runfolder
from .config import (ACTIVATION_CHECKPOINTING, CONTEXT_PARALLEL, DTYPES, Case, frame_fields, json_settings,
                     parse_set_options)
from .errors import UserError
from .overrides import comma_list, one_resolution
from .predict import hardware as hw
from .predict.command import Predictor, add_exact_argument
from .regimes import add_regime_arguments, regime_flags, regime_settings
from .runner import fsdp_settings
from .units import format_bytes

PLAN_FILE = "plan.txt"


@dataclass(frozen=True)
class Layout:
    """One way to spread a case over GPUs: FSDP degree x context-parallel degree, and checkpointing."""

    fsdp: int
    cp: int = 1
    context_parallel: str | None = None
    activation_checkpointing: str = "none"

    @property
    def name(self) -> str:
        cp = f" x {self.context_parallel} {self.cp}" if self.context_parallel else ""
        ac = f", checkpointing {self.activation_checkpointing}" if self.activation_checkpointing != "none" else ""
        return f"fsdp {self.fsdp}{cp}{ac}"

    def case(self, base: Case) -> Case:
        """`base` laid out so (UserError where stbench cannot run it)."""
        settings = fsdp_settings(argparse.Namespace(fsdp=self.fsdp,
                                                    activation_checkpointing=self.activation_checkpointing))
        return dataclasses.replace(base, context_parallel=self.context_parallel, **settings)


def layouts(gpus: int, checkpointing: tuple[str, ...]) -> list[Layout]:
    """FSDP over all GPUs, then every FSDP x CP factorisation, for each checkpointing choice."""
    found = []
    for ac in checkpointing:
        found.append(Layout(gpus, 1, None, ac))
        for cp in range(2, gpus + 1):
            if gpus % cp == 0:
                found.extend(Layout(gpus // cp, cp, mode, ac) for mode in CONTEXT_PARALLEL)
    return found


@dataclass
class Row:
    """A layout with its prediction, or why stbench cannot run it."""

    layout: Layout
    record: dict | None = None
    unrunnable: str | None = None

    @property
    def fits(self) -> bool:
        return self.record is not None and self.record["status"] == "ok"

    @property
    def samples_per_s(self) -> float | None:
        p = (self.record or {}).get("predicted") or {}
        if not self.fits or not p.get("step_ms"):
            return None
        return self.layout.fsdp * self.record["batch"] / (p["step_ms"] / 1e3)


def plan(base: Case, gpus: int, target: hw.Hardware, predict, checkpointing: tuple[str, ...]) -> list[Row]:
    """Every layout predicted (or refused), fastest first among those that fit."""
    from .distributed import check_layout  # noqa: local - torch.distributed only when planning

    rows = []
    for layout in layouts(gpus, checkpointing):
        try:
            case = layout.case(base)
            check_layout(case, gpus)
        except (UserError, ValueError) as e:
            rows.append(Row(layout, unrunnable=str(e)))
            continue
        try:
            record = predict(case, target, gpus)
        except UserError as e:  # refused while sharding (e.g. no modules to checkpoint)
            rows.append(Row(layout, unrunnable=str(e)))
            continue
        if record["status"] == "error":
            rows.append(Row(layout, record, unrunnable="prediction failed: " + _last_line(record.get("error"))))
            continue
        rows.append(Row(layout, record))
    return sorted(rows, key=lambda r: (r.samples_per_s is None, -(r.samples_per_s or 0.0)))


def _last_line(text) -> str:
    lines = (text or "").strip().splitlines()
    return lines[-1] if lines else "no message"


def render(rows: list[Row], base: Case, gpus: int, target: hw.Hardware) -> str:
    lines = [f"plan (PREDICTED, not measured): {base.arch} {base.preset} {base.mode} {base.resolution_label}px x"
             f"{base.frames} b{base.batch} per FSDP rank, {base.dtype}"
             + "".join(f" {f}" for f in regime_flags(base)) + f", on {gpus} x {target.label}",
             f"  {'layout':44s} {'peak/rank':>10s} {'step ms':>9s} {'no-overlap':>10s} {'samples/s':>9s} "
             f"{'sent/rank/step':>14s}"]
    best = next((r for r in rows if r.samples_per_s is not None), None)
    for row in rows:
        mark = "*" if row is best else " "
        if row.unrunnable:
            lines.append(f"x {row.layout.name:44s} not runnable: {row.unrunnable}")
            continue
        p = row.record["predicted"]
        if not row.fits:
            lines.append(f"  {row.layout.name:44s} {format_bytes(p['peak_bytes']):>10s} does not fit "
                         f"({format_bytes(p['memory_bytes'])} per GPU)")
            continue
        step = "n/a" if p.get("step_ms") is None else f"{p['step_ms']:.1f}"
        serial = "n/a" if p.get("step_ms_serial") is None else f"{p['step_ms_serial']:.1f}"
        rate = "n/a" if row.samples_per_s is None else f"{row.samples_per_s:.2f}"
        lines.append(f"{mark} {row.layout.name:44s} {format_bytes(p['peak_bytes']):>10s} {step:>9s} {serial:>10s} "
                     f"{rate:>9s} {format_bytes(row.record.get('comm_bytes') or 0):>14s}")
    if best is not None:
        lines.append(f"recommended (predicted): {best.layout.name}: {best.samples_per_s:.2f} samples/s, "
                     f"{format_bytes(best.record['predicted']['peak_bytes'])} per GPU; run it with "
                     f"`torchrun --nproc-per-node {gpus} -m stbench run "
                     f"{' '.join([_run_flags(best.layout), *regime_flags(base)])} ...`")
    else:
        lines.append("recommended: none: no runnable layout is predicted to fit (or the hardware has no time model)")
    lines.append("  *: fastest runnable layout that fits; x: stbench cannot run it; step: kernels' roofline with "
                 "FSDP and ring traffic overlapped, Ulysses all-to-alls added; no-overlap: every byte on the "
                 "critical path")
    return "\n".join(lines)


def _run_flags(layout: Layout) -> str:
    flags = [f"--fsdp {layout.fsdp}"]
    if layout.context_parallel:
        flags.append(f"--context-parallel {layout.context_parallel}")
    if layout.activation_checkpointing != "none":
        flags.append(f"--activation-checkpointing {layout.activation_checkpointing}")
    return " ".join(flags)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--arch", required=True, help="one architecture (see `stbench list`)")
    parser.add_argument("--preset", default="tiny", help="size preset (default tiny)")
    parser.add_argument("--mode", default="temporal", choices=architectures.TRAINING_MODES)
    parser.add_argument("--resolution", default="256", help="frame size in pixels: one number is square, HxW "
                        "is height x width, e.g. 480x832 (default 256)")
    parser.add_argument("--frames", type=int, default=16, help="frames (default 16)")
    parser.add_argument("--batch", type=int, default=1, help="batch per FSDP rank (default 1)")
    parser.add_argument("--dtype", choices=DTYPES, default="bf16", help="autocast dtype (default bf16)")
    parser.add_argument("--gpus", type=int, required=True, help="GPU count to plan for (each layout is one fake "
                        "training step of one rank, its repeated blocks traced once: seconds for a 14B model)")
    parser.add_argument("--hardware", default="h100-sxm", help=f"one of {', '.join(hw.HARDWARE)}")
    parser.add_argument("--activation-checkpointing", default="none,blocks",
                        help="comma-separated choices to consider (default none,blocks)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a model config field (repeatable)")
    add_regime_arguments(parser, checkpointing=False)  # plan's --activation-checkpointing lists choices
    add_exact_argument(parser)
    parser.add_argument("--resume", action="store_true", help="reuse the predictions already in OUT")
    parser.add_argument("--out", default=None, help="run folder for the predictions and plan.txt "
                        "(default: runs/plan-<arch>-<gpus>)")


def execute(args: argparse.Namespace) -> int:
    if args.gpus < 1:
        raise UserError(f"gpus: must be >= 1, got {args.gpus}")
    if args.hardware not in hw.HARDWARE:
        raise UserError(f"hardware: unknown {args.hardware!r}; legal: {', '.join(hw.HARDWARE)}")
    checkpointing = comma_list(args.activation_checkpointing, "activation-checkpointing", str)
    bad = [c for c in checkpointing if c not in ACTIVATION_CHECKPOINTING]
    if bad:
        raise UserError(f"activation-checkpointing: {bad[0]!r} is not legal; legal: "
                        f"{', '.join(ACTIVATION_CHECKPOINTING)}")
    base = Case(arch=args.arch, preset=args.preset, mode=args.mode, batch=args.batch, frames=args.frames,
                **frame_fields(one_resolution(args.resolution)), dtype=args.dtype, device="cpu",
                overrides=parse_set_options(args.set),
                **regime_settings(args))
    target = hw.get(args.hardware)
    out = Path(args.out or f"runs/plan-{args.arch}-{args.gpus}")
    command = shlex.join(["python", "-m", "stbench", *(getattr(args, "argv", None) or sys.argv[1:])])
    settings = {**json_settings(base), "gpus": args.gpus, "hardware": args.hardware,
                "activation_checkpointing": list(checkpointing), "exact": args.exact}
    path = runfolder.open_run_folder(out, command=command, resume=args.resume, settings=settings)
    done = {results.case_key(r): r for r in results.read_records(path)} if path.exists() else {}
    predict = Predictor(out, done, echo=lambda line: print(line, file=sys.stderr), exact=args.exact)
    rows = plan(base, args.gpus, target, predict, checkpointing)
    text = render(rows, base, args.gpus, target)
    (out / PLAN_FILE).write_text(text + "\n")
    print(text)
    return 0
