"""`python -m stbench predict`: peak memory and step time of training steps on named GPUs, without a GPU."""
from __future__ import annotations

import argparse
import itertools
import shlex
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import architectures

from .. import results, runfolder
from ..config import DTYPES, Case, frame_fields, json_settings, parse_set_options
from ..errors import UserError
from ..measure import env
from ..overrides import comma_list, resolution_list
from ..regimes import add_regime_arguments, regime_flags, regime_settings
from ..runner import add_parallel_arguments, fsdp_settings
from ..units import format_bytes
from . import hardware as hw
from .efficiency import HOST_BOUND, is_host_bound
from .estimate import predict_case

MAX_FRAMES = 4096  # the frontier searches stop here
MAX_RESOLUTION = 8192
MAX_GPUS = 4096
FRONTIER_FILE = "frontier.txt"


@dataclass(frozen=True)
class PredictSweep:
    """The grid `predict` covers: cases x hardware (recorded in run.json like `run`'s sweep)."""

    archs: tuple[str, ...]
    hardware: tuple[str, ...]
    resolutions: tuple[int | tuple[int, int], ...] = (256,)  # square sizes or (height, width)
    frames: tuple[int, ...] = (16,)
    batches: tuple[int, ...] = (1,)
    preset: str = "tiny"
    mode: str = "temporal"
    dtype: str | None = None  # None: bf16 on GPUs, fp32 on the CPU
    overrides: tuple[tuple[str, str], ...] = ()
    frontier: str | None = None  # None: the grid; "shapes", "gpus" or "all" (see --frontier)
    world_sizes: tuple[int, ...] = (1,)  # GPUs of the layout; > 1 (or fsdp set): one FSDP rank is predicted
    fsdp: int | None = None  # None with a world > 1: FSDP over every rank (no context parallelism)
    context_parallel: str | None = None
    activation_checkpointing: str | None = None
    fsdp_reshard_after_forward: bool | None = None
    fsdp_mixed_precision: bool | None = None
    lora: int | None = None  # the training regime (stbench.regimes), as Case's fields
    lora_targets: tuple[str, ...] | None = None
    param_dtype: str = "fp32"
    optimizer: str = "adamw"
    encoders: str = "precomputed"
    exact: bool = False  # trace every block instead of tracing repeated blocks once (stbench.predict.blocks)

    def __post_init__(self):
        for name in ("archs", "hardware", "resolutions", "frames", "batches", "world_sizes"):
            if not getattr(self, name):
                raise UserError(f"{name}: needs at least one value")
        unknown = [h for h in self.hardware if h not in hw.NAMES]
        if unknown:
            raise UserError(f"hardware: unknown {', '.join(map(repr, unknown))}; legal: {', '.join(hw.NAMES)}")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise UserError(f"dtype: {self.dtype!r} is not legal; legal: {', '.join(DTYPES)}")
        if self.context_parallel is not None and self.fsdp is None:
            raise UserError("context-parallel: predict models FSDP layouts; pass --fsdp F as well (F x the "
                            "context-parallel degree = --world-size)")

    def dtype_for(self, name: str) -> str:
        return self.dtype or ("fp32" if name == "cpu" else "bf16")

    @property
    def cp_degree(self) -> int:
        """Ranks per sequence: world / fsdp of the first world size (kept when the frontier scales the world)."""
        if self.context_parallel is None or self.fsdp is None:
            return 1
        return max(1, self.world_sizes[0] // self.fsdp)

    def grid(self) -> list[tuple]:
        """Every (arch, hardware, resolution, frames, batch, world) of the grid, in the order predict writes them
        (per arch and hardware: resolutions, then batches, then frames, then world sizes)."""
        return [(a, h, r, f, b, w) for a, h, r, b, f, w in itertools.product(
            self.archs, self.hardware, self.resolutions, self.batches, self.frames, self.world_sizes)]

    def case(self, arch: str, hardware: str, resolution: int | tuple[int, int], frames: int, batch: int,
             world: int = 1) -> Case:
        """A validated case on `world` GPUs (UserError on bad input); predicted cases are traced on the CPU."""
        if world < 1:
            raise UserError(f"world-size: must be >= 1, got {world}")
        fsdp = self.fsdp if world == self.world_sizes[0] or self.fsdp is None else world // self.cp_degree
        # (activation checkpointing alone runs on one process too)
        fsdp_asked = any(v is not None for v in (self.fsdp_reshard_after_forward, self.fsdp_mixed_precision))
        if fsdp is None and (world > 1 or fsdp_asked):
            fsdp = world
        settings = dict(fsdp=fsdp, activation_checkpointing=self.activation_checkpointing,
                        fsdp_reshard_after_forward=self.fsdp_reshard_after_forward,
                        fsdp_mixed_precision=self.fsdp_mixed_precision)
        if fsdp is not None:
            settings = fsdp_settings(argparse.Namespace(**settings))
        case = Case(arch=arch, preset=self.preset, mode=self.mode, batch=batch, frames=frames,
                    **frame_fields(resolution), dtype=self.dtype_for(hardware), device="cpu", overrides=self.overrides,
                    context_parallel=self.context_parallel, lora=self.lora, lora_targets=self.lora_targets,
                    param_dtype=self.param_dtype, optimizer=self.optimizer, encoders=self.encoders, **settings)
        if fsdp is not None:
            from ..distributed import check_layout  # noqa: local - torch.distributed only for sharded layouts

            try:
                check_layout(case, world)
            except ValueError as e:
                raise UserError(f"world-size {world}: {e}") from None
        return case


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--arch", required=True, help="comma-separated architectures (see `stbench inspect`)")
    parser.add_argument("--preset", default="tiny", help="size preset: tiny (default), small, or the full-size preset")
    parser.add_argument("--resolution", default="256", help="comma-separated frame sizes in pixels: one number is "
                        "square, HxW is height x width, e.g. 480x832 (default 256)")
    parser.add_argument("--frames", default="16", help="comma-separated frame counts (default 16)")
    parser.add_argument("--batch", default="1", help="comma-separated batch sizes (default 1)")
    parser.add_argument("--mode", default="temporal", choices=architectures.TRAINING_MODES,
                        help="temporal: spatial layers frozen (video fine-tuning); full: everything trains")
    parser.add_argument("--dtype", choices=DTYPES, default=None, help="autocast dtype (default: bf16 on GPUs, "
                        "fp32 for --hardware cpu)")
    parser.add_argument("--hardware", default="h100-sxm", help=f"comma-separated targets: {', '.join(hw.NAMES)}")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a model config field (repeatable); recorded in the results")
    parser.add_argument("--world-size", default="1", help="comma-separated GPU counts: with more than one (or "
                        "--fsdp), one rank of an FSDP2 (x --context-parallel) layout is predicted (default 1)")
    add_parallel_arguments(parser, launched="on --world-size GPUs")
    add_regime_arguments(parser)
    parser.add_argument("--frontier", nargs="?", const="all", choices=("shapes", "gpus", "all"), default=None,
                        help="instead of the grid (also written to OUT/frontier.txt): 'shapes': the largest frame "
                        "count predicted to fit at each resolution and the largest resolution at each frame count "
                        "(bisection over fake runs); 'gpus': the fewest GPUs predicted to fit each case (FSDP over "
                        "powers of two, --context-parallel degree kept); 'all' (the default): both")
    add_exact_argument(parser)
    parser.add_argument("--resume", action="store_true", help="skip cases already in OUT/results.jsonl")
    parser.add_argument("--out", default=None, help="run folder (default: runs/predict-<UTC time>)")


def add_exact_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--exact", action="store_true", help="trace every block of the model (the reference; "
                        "slower): by default a list of identical blocks is traced at its first, three inner and "
                        "last blocks and the others spliced in, which gives the same bytes, FLOPs and collectives")


def sweep_from_args(args: argparse.Namespace) -> PredictSweep:
    names = comma_list(args.hardware, "hardware", str)
    sweep = PredictSweep(archs=comma_list(args.arch, "arch", str), hardware=names,
                         resolutions=resolution_list(args.resolution), frames=comma_list(args.frames, "frames"),
                         batches=comma_list(args.batch, "batch"), preset=args.preset, mode=args.mode, dtype=args.dtype,
                         overrides=parse_set_options(args.set), frontier=args.frontier,
                         world_sizes=comma_list(args.world_size, "world-size"), fsdp=args.fsdp,
                         context_parallel=args.context_parallel,
                         activation_checkpointing=args.activation_checkpointing,
                         fsdp_reshard_after_forward=args.fsdp_reshard_after_forward,
                         fsdp_mixed_precision=args.fsdp_mixed_precision or None, exact=args.exact,
                         **regime_settings(args))
    for point in sweep.grid():  # every case is checked before anything is written
        sweep.case(*point)
    return sweep


class Predictor:
    """Predicts cases into a run folder: appends a record per new (case, hardware), reuses recorded ones."""

    def __init__(self, out: Path, done: dict[str, dict], echo=print, exact: bool = False):
        self.out, self.done, self.echo, self.exact = out, done, echo, exact

    def __call__(self, case: Case, target: hw.Hardware, world: int = 1) -> dict:
        key = results.case_key({**case.identity(world), "device": target.name, "predicted": True})
        if key in self.done:
            return self.done[key]
        record = predict_case(case, target, world, self.exact)
        results.append_record(self.out / runfolder.RESULTS_FILE, record)
        self.done[key] = record
        self.echo(describe(record))
        return record


def describe(record: dict) -> str:
    p = record.get("predicted") or {}
    what = (f"{record['arch']} {results.resolution_label(record)}px x{record['frames']} b{record['batch']} "
            f"{record['dtype']} on {record['device']}")
    if results.regime_label(record):
        what += f", {results.regime_label(record)}"
    if record.get("mesh"):
        what += f", {results.layout_label(record)} (per rank)"
    if record["status"] == "error" or "peak_bytes" not in p:
        return f"error {what}: {(record.get('error') or '').splitlines()[-1:]}"
    text = f"{record['status']:5s} {what}: predicted peak {format_bytes(p['peak_bytes'])}"
    if p.get("step_ms") is not None:
        bound = f", bound {p['step_ms_bound']:.1f}" if p.get("step_ms_bound") is not None else ""
        text += (f", step {p['step_ms']:.1f} ms expected{bound} (compute {p['compute_ms']:.1f}, "
                 f"memory {p['memory_ms']:.1f}")
        text += f", communication {p['comm_ms']:.1f})" if p.get("comm_ms") is not None else ")"
    if is_host_bound(record):
        text += f"; {HOST_BOUND}: {p.get('kernels')} kernels, the CPU may not launch them as fast (record warnings)"
    return text


def frontier(predict, make_case, target: hw.Hardware, limit: int = MAX_FRAMES) -> tuple[int | None, int | None]:
    """(largest value predicted to fit, smallest that does not; None if it is an illegal shape or past `limit`),
    by doubling then bisection; `make_case(value)` raises UserError for a shape the architecture refuses."""
    verdicts: dict[int, bool | None] = {}

    def fits(value: int) -> bool:
        try:
            case = make_case(value)
        except UserError:
            verdicts[value] = None  # not a legal shape: the search ends below it
            return False
        verdicts[value] = predict(case, target)["status"] == "ok"
        return verdicts[value]

    if not fits(1):
        return None, (1 if verdicts[1] is not None else None)
    good, bad = 1, None
    while bad is None and good < limit:
        probe = min(good * 2, limit)
        if fits(probe):
            good = probe
        else:
            bad = probe
    while bad is not None and bad - good > 1:
        middle = (good + bad) // 2
        if fits(middle):
            good = middle
        else:
            bad = middle
    return good, (bad if bad is not None and verdicts[bad] is not None else None)


def size_label(size: int | tuple[int, int]) -> str:  # 256 -> "256", (480, 832) -> "480x832"
    return str(size) if isinstance(size, int) else "x".join(map(str, size))


def resolution_step(make_case) -> int | None:
    """The smallest multiple of 8 pixels whose multiples are legal resolutions for the architecture."""
    for step in (8, 16, 32, 64, 128):
        try:
            for k in (1, 2, 3):
                make_case(step * k)
        except UserError:
            continue
        return step
    return None


def unshrinkable(points: list[tuple[int, int]]) -> tuple[float, float, tuple[int, int]] | None:
    """(a, b, the two degrees) of a rank's reserved bytes = a + b / GPUs through the two largest FSDP degrees (a:
    what more GPUs do not shrink: activations, gathered parameters, temporaries; b / GPUs: the shards of
    parameters, gradients and optimizer state), or None with fewer than two degrees. The two largest, as the
    frontier's search fits: the peaks flatten faster than 1/GPUs (wan 14b at 960 px, predicted: 197.8, 124.9,
    101.6, 95.1 GiB on 2-16 GPUs), so a fit over small degrees puts the floor too low and promises a fit that
    more GPUs never reach."""
    by_degree: dict[int, list[int]] = {}
    for w, v in points:
        by_degree.setdefault(w, []).append(v)
    if len(by_degree) < 2:
        return None
    (w1, v1), (w2, v2) = ((w, statistics.fmean(by_degree[w])) for w in sorted(by_degree)[-2:])
    b = (v1 - v2) / (1 / w1 - 1 / w2)
    return float(v2 - b / w2), float(b), (w1, w2)


def fewest_gpus(predict, make_case, target: hw.Hardware, start: int, limit: int = MAX_GPUS) -> tuple[int | None, str]:
    """(fewest GPUs, a power of two times `start`, predicted to fit, or None; why the search stopped).

    `make_case(world)` raises UserError for a layout that cannot run. A fake run takes a minute or more at
    full size, so the search does not try every power of two: a rank's peak is a + b / world (shards of
    parameters, gradients, AdamW state and the optimizer's temporaries shrink with FSDP; activations and
    gathered parameters do not), fitted on the last two sharded predictions (one GPU runs unsharded, without
    FSDP's gathered copies: its peak lies on no such line); the next world tried is the smallest
    power of two that this fit says fits, and every answer is confirmed by predictions at it and at half of it
    (the allocator's rounding is not linear)."""
    capacity = target.memory_bytes - target.context_bytes
    reserved: dict[int, int] = {}  # world -> predicted reserved bytes of a sharded world that does not fit
    fits: dict[int, bool] = {}

    def run(world: int) -> str | None:
        """None when predicted (into `fits`, `reserved`), else why this world cannot be predicted."""
        try:
            case = make_case(world)
        except UserError as e:
            return f"{world} GPUs: {e}"
        record = predict(case, target, world)
        if record["status"] == "error":
            return f"{world} GPUs: prediction failed ({(record.get('error') or '').splitlines()[-1:]})"
        fits[world] = record["status"] == "ok"
        if not fits[world] and case.fsdp is not None:
            reserved[world] = record["predicted"]["reserved_bytes"]
        return None

    world = start
    while True:
        if world > limit:
            return None, f"none up to {limit} GPUs"
        why = run(world)
        if why is not None:
            return None, why
        if fits[world]:
            break
        following = world * 2
        fit = unshrinkable(list(reserved.items()))
        if fit is not None:
            a, b, (w1, w2) = fit
            if a >= capacity:
                return None, (f"the part of a rank's peak that more GPUs do not shrink is about {format_bytes(a)} "
                              f"(fitted on {w1} and {w2} GPUs): more GPUs do not help (try activation "
                              f"checkpointing or context parallelism)")
            while following < b / (capacity - a) and following * 2 <= limit:
                following *= 2
        world = following
    while world // 2 >= start and world // 2 not in fits:  # confirm that half as many do not fit
        if run(world // 2) is not None or not fits[world // 2]:
            break
        world //= 2
    return world, "fits"


def _frontiers(sweep: PredictSweep, predict, arch: str, target: hw.Hardware, emit) -> None:
    """The fewest GPUs that fit each case, then the largest frames per resolution and largest resolution
    per frame count at each batch and world size (as `sweep.frontier` asks; each line to `emit`)."""
    cases = [(b, r, f) for b in sweep.batches for r in sweep.resolutions for f in sweep.frames]
    for b, r, f in cases if target.name != "cpu" and sweep.frontier != "shapes" else ():
        n, why = fewest_gpus(predict, lambda w: sweep.case(arch, target.name, r, f, b, w), target,
                             start=sweep.cp_degree)
        sharding = "one GPU, unsharded" if n == 1 else "fsdp"
        layout = (f"fsdp x {sweep.context_parallel} {sweep.cp_degree}" if sweep.context_parallel else sharding) + (
            f", activation checkpointing {sweep.activation_checkpointing}"
            if sweep.activation_checkpointing not in (None, "none") else "")
        emit(f"frontier {arch} {size_label(r)}px x{f} b{b} on {target.name}: fewest GPUs that fit "
             f"{n if n is not None else f'none ({why})'} ({layout}; predicted)")
    for w in sweep.world_sizes if sweep.frontier != "gpus" else ():
        _shape_frontiers(sweep, predict, arch, target, w, emit)


def _shape_frontiers(sweep: PredictSweep, predict, arch: str, target: hw.Hardware, w: int, emit) -> None:
    """Largest frames per resolution, and largest resolution per frame count, on `w` GPUs (printed)."""
    on = f"{target.name}" + (f" x{w}" if w > 1 else "")
    for b in sweep.batches:
        for r in sweep.resolutions:
            good, bad = frontier(lambda c, t: predict(c, t, w), lambda f: sweep.case(arch, target.name, r, f, b, w),
                                 target, MAX_FRAMES)
            emit(f"frontier {arch} {size_label(r)}px b{b} on {on}: largest fitting frames "
                 f"{good if good is not None else 'none'}{'' if bad is None else f' ({bad} does not fit)'} "
                 f"(predicted)")
        for f in sweep.frames:
            step = resolution_step(lambda res: sweep.case(arch, target.name, res, f, b, w))
            if step is None:
                continue
            good, bad = frontier(lambda c, t: predict(c, t, w), lambda k: sweep.case(arch, target.name, k * step, f, b, w),
                                 target, MAX_RESOLUTION // step)
            emit(f"frontier {arch} {f} frames b{b} on {on}: largest fitting resolution "
                 f"{f'{good * step}px' if good is not None else 'none'}"
                 f"{'' if bad is None else f' ({bad * step}px does not fit)'} (predicted)")


def oom_hint(sweep: PredictSweep, oom: list[tuple], total: int) -> str:
    """One line after predictions that do not fit: the plan for the first of them (case, hardware, size, world) on
    8 GPUs or its own world if larger, as a command (every FSDP x context-parallel layout, with and without
    activation checkpointing, ranked by throughput)."""
    case, hardware, size, world = oom[0]
    gpus = max(8, world)
    plan = ["stbench", "plan", "--arch", case.arch, "--preset", case.preset, "--mode", case.mode,
            "--resolution", size_label(size), "--frames", str(case.frames), "--batch", str(case.batch),
            "--dtype", case.dtype, "--gpus", str(gpus), "--hardware", hardware,
            "--activation-checkpointing", "none,blocks",
            *(flag for key, value in sweep.overrides for flag in ("--set", f"{key}={value}")), *regime_flags(case)]
    retry = "rerun with --activation-checkpointing blocks, or see " if case.activation_checkpointing in (
        None, "none") else ""
    return (f"stbench: {len(oom)} of {total} predicted not to fit; {retry}every layout of {gpus} GPUs for "
            f"the first, ranked (FSDP, context parallelism, activation checkpointing): {shlex.join(plan)}")


def execute(args: argparse.Namespace) -> int:
    sweep = sweep_from_args(args)
    out = Path(args.out or f"runs/predict-{env.utc_now().replace(':', '').replace('+0000', 'Z')}")
    argv = getattr(args, "argv", None)
    command = shlex.join(["python", "-m", "stbench", *(argv if argv is not None else sys.argv[1:])])
    path = runfolder.open_run_folder(out, command=command, resume=args.resume, settings=json_settings(sweep))
    done = {results.case_key(r): r for r in results.read_records(path)} if path.exists() else {}
    predict = Predictor(out, done, exact=sweep.exact)
    targets = {name: hw.get(name) for name in sweep.hardware}

    def emit(line: str) -> None:
        print(line, flush=True)
        with open(out / FRONTIER_FILE, "a") as f:  # appended line by line: a killed search keeps its answers
            f.write(line + "\n")

    if sweep.frontier:
        for arch in sweep.archs:
            for target in targets.values():
                _frontiers(sweep, predict, arch, target, emit)
    else:
        oom, grid = [], sweep.grid()
        for arch, name, r, f, b, w in grid:
            case = sweep.case(arch, name, r, f, b, w)
            if predict(case, targets[name], w)["status"] == "oom":
                oom.append((case, name, r, w))
        if oom:
            print(oom_hint(sweep, oom, len(grid)), file=sys.stderr)
    print(f"stbench: predictions -> {path}", file=sys.stderr)
    return 0
