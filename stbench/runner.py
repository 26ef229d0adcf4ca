"""`python -m stbench run`: measure a sweep case by case, appending one result record per case."""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import importlib.util
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

import torch

import architectures

from . import results, runfolder
from .config import CONTEXT_PARALLEL, DTYPES, Case, Sweep, parse_set_options
from .errors import UserError
from .overrides import comma_list, resolution_list
from .regimes import add_regime_arguments, regime_settings
from .rounds import DEFAULT_ROUNDS, default_rounds
from .measure import env, memory, sequence, timing
from .units import format_bytes

COMPILE_WARMUP = 3  # compilation (and recompilation on the second call) must finish before timing
ERROR_TAIL_LINES = 25
ERROR_TAIL_CHARS = 4000
INTERRUPTED = 130  # exit code of a child stopped by Ctrl-C


# --- one case -------------------------------------------------------------------------------------

def _tail(text: str, lines: int = ERROR_TAIL_LINES, chars: int = ERROR_TAIL_CHARS) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])[-chars:]


def run_case(case: Case, *, repeats: int = 5, warmup: int = 2, trace_dir: Path | None = None,
             time_steps=timing.time_steps) -> dict:
    """Measure one case with a fresh model; a complete record, never an exception for OOM or a model error.

    `time_steps(step, repeats, device) -> StepTimes` runs the measured steps (the suites pass pytest-benchmark's).
    """
    record = case_record(case)
    if case.compile or (case.device.startswith("cuda") and torch.backends.cudnn.benchmark):
        warmup = max(warmup, COMPILE_WARMUP)
    record["warmup"] = warmup
    if warmup < 2:
        record["warnings"].append(f"warm-up of {warmup} step(s): first steps pay allocation and autotuning")
    return run_guarded(case, record, lambda: sequence.measure_case(
        case, record, repeats=repeats, warmup=warmup, time_steps=time_steps, trace_dir=trace_dir))


def case_record(case: Case) -> dict:
    """A fresh record of the case's identity and environment (the case's device, else the host's)."""
    record = results.new_record(case.identity())
    try:
        record["env"] = env.collect_env(case.device)
    except Exception:  # noqa: BLE001 - e.g. no such CUDA device: the case itself reports the error
        record["env"] = env.collect_env("cpu")
    return record


def run_guarded(case: Case, record: dict, measure) -> dict:
    """`measure()` on the case's device; OOM becomes status 'oom', any other exception status 'error'."""
    try:
        # CUDA events and streams belong to the current device: make it the case's device
        with torch.cuda.device(case.device) if case.device.startswith("cuda") else contextlib.nullcontext():
            measure()
    except Exception as e:  # noqa: BLE001 - a failed case is a result; KeyboardInterrupt still stops the sweep
        if memory.is_out_of_memory(e):
            record["status"] = "oom"
            record["error"] = _tail(str(e), lines=3, chars=600)
        else:
            record["status"] = "error"
            record["error"] = _tail(traceback.format_exc())
    finally:
        memory.release_memory()  # the exception (and its frames holding the model) is gone by now
    return record


# --- one case in a child process --------------------------------------------------------------------

def _plugin_modules(case: Case) -> list[tuple[str, str]]:
    """Modules outside `architectures` that registered the case's architecture (re-imported in the child)."""
    module = architectures.get(case.arch).build.__module__
    if module.split(".")[0] == "architectures":
        return []
    file = getattr(sys.modules.get(module), "__file__", None)
    return [(module, file)] if file else []


def _load_plugins(plugins: list) -> None:
    for module, file in plugins:
        if module == "__main__":  # a user's script: load it under another name so its main block stays idle
            module = "__stbench_plugin_main__"
        else:
            try:
                importlib.import_module(module)
                continue
            except ImportError:
                pass
        if module not in sys.modules:
            spec = importlib.util.spec_from_file_location(module, file)
            mod = importlib.util.module_from_spec(spec)
            sys.modules[module] = mod
            spec.loader.exec_module(mod)


def _case_to_json(case: Case) -> dict:
    fields = dataclasses.asdict(case)
    fields["overrides"] = [list(pair) for pair in case.overrides]
    return fields


def _case_from_json(fields: dict) -> Case:
    return Case(**{**fields, "overrides": tuple(tuple(pair) for pair in fields["overrides"])})


def _signal_name(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def run_case_isolated(case: Case, *, repeats: int = 5, warmup: int = 2, trace_dir: Path | None = None,
                      target: str | None = None, options: dict | None = None) -> dict:
    """`run_case` in a child process: a crash (segfault, os._exit, killed for memory) becomes status 'error'.

    `target` ("module:function", called as function(case, **options) with JSON-able options) replaces run_case.
    """
    with tempfile.TemporaryDirectory(prefix="stbench-case-") as tmp:
        job, result, log = Path(tmp, "job.json"), Path(tmp, "result.json"), Path(tmp, "child.log")
        job.write_text(json.dumps({"case": _case_to_json(case), "repeats": repeats, "warmup": warmup,
                                   "trace_dir": str(trace_dir) if trace_dir else None, "result": str(result),
                                   "plugins": _plugin_modules(case), "target": target, "options": options}))
        with open(log, "wb") as out:
            child = subprocess.Popen([sys.executable, "-X", "faulthandler", "-m", "stbench.runner", "--child",
                                      str(job)], stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            try:
                code = child.wait()
            except BaseException:  # Ctrl-C: take the child down with us
                child.kill()
                child.wait()
                raise
        if code in (INTERRUPTED, -signal.SIGINT):  # Ctrl-C reached the child first: not a result
            raise KeyboardInterrupt
        if code == 0 and result.exists():
            return json.loads(result.read_text())
        record = results.new_record(case.identity())
        record["env"] = env.collect_env("cpu")  # not case.device: a CUDA context here would cost every child
        record["warmup"] = warmup
        record["status"] = "error"
        output = log.read_text(errors="replace")
        hint = " (the system may have run out of memory)" if code == -signal.SIGKILL else ""
        # the header first and whole: a long child log must not push it out of the kept tail
        record["error"] = f"child process died ({_signal_name(code)}){hint}\n" + _tail(
            output, lines=ERROR_TAIL_LINES - 1, chars=ERROR_TAIL_CHARS)
        return record


def _child_main(job_path: str) -> int:
    job = json.loads(Path(job_path).read_text())
    _load_plugins(job["plugins"])
    memory.freeze_imports()
    case = _case_from_json(job["case"])
    trace_dir = Path(job["trace_dir"]) if job["trace_dir"] else None
    try:
        if job.get("target"):
            module, _, name = job["target"].partition(":")
            record = getattr(importlib.import_module(module), name)(case, **(job["options"] or {}))
        else:
            record = run_case(case, repeats=job["repeats"], warmup=job["warmup"], trace_dir=trace_dir)
    except KeyboardInterrupt:  # the terminal's Ctrl-C reaches the whole process group
        return INTERRUPTED
    tmp = Path(job["result"] + ".tmp")
    tmp.write_text(json.dumps(record, default=str))
    os.replace(tmp, job["result"])
    return 0


# --- a sweep ----------------------------------------------------------------------------------------

def _figures(record: dict) -> str:
    if record["status"] != "ok":
        return record["status"]
    text = f"{record['step_ms_median']:.1f} ms"
    if record["peak_allocated"] is not None:
        text += f", peak {format_bytes(record['peak_allocated'])}"
    if record["saved_activations"] is not None:
        text += f", activations {format_bytes(record['saved_activations'])}"
    return text


def run_sweep(sweep: Sweep, out: Path, *, resume: bool = False, isolate: bool = False, trace: bool = False,
              progress: bool = True, command: str | None = None, rounds: int = 1, seed: int = 0, case_fn=None,
              case_options: dict | None = None) -> list[dict]:
    """Run every case of `sweep` not yet in `out/results.jsonl`; each record is appended as it finishes.

    `case_fn(case, **case_options) -> record` (a module-level function) replaces run_case, e.g. stbench.train.
    Returns the records measured by this call (not those skipped on resume).
    """
    from tqdm import tqdm

    out = Path(out)
    if command is None:
        command = shlex.join(["python", "-m", "stbench", *sys.argv[1:]])
    path = runfolder.open_run_folder(out, command=command, resume=resume, settings=sweep.settings())
    done = results.recorded_keys(path)
    todo = [c for c in sweep.cases if c.key not in done]
    measure = run_case_isolated if isolate else run_case
    if case_fn is not None:
        target = f"{case_fn.__module__}:{case_fn.__name__}"
        measure = (lambda case, **_: run_case_isolated(case, target=target, options=case_options)) if isolate \
            else (lambda case, **_: case_fn(case, **(case_options or {})))
    trace_dir = out / runfolder.TRACES_DIR if trace else None
    measured = []
    if rounds > 1:
        from .rounds import run_sweep_rounds

        return run_sweep_rounds(todo, rounds, seed, path, lambda case, last: measure(
            case, repeats=sweep.repeats, warmup=sweep.warmup, trace_dir=trace_dir if last else None),
            progress=progress, label=_figures)
    with tqdm(total=len(sweep.cases), initial=len(sweep.cases) - len(todo), disable=not progress,
              unit="case", dynamic_ncols=True, file=sys.stderr) as bar:
        for case in todo:
            slug = case.slug
            bar.set_description(slug)
            record = measure(case, repeats=sweep.repeats, warmup=sweep.warmup, trace_dir=trace_dir)
            results.append_record(path, record)
            measured.append(record)
            bar.set_postfix_str(f"last: {_figures(record)}")
            bar.update(1)
            if not progress:
                print(f"{record['status']:5s} {slug}: {_figures(record)}", flush=True)
    return measured


# --- command line -----------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--arch", required=True,
                        help="comma-separated architectures (`stbench list` names them with their presets)")
    parser.add_argument("--preset", default="tiny",
                        help="size preset: tiny (default), small, or a full-size one: sd15 (UNets), 0.8b or 2.7b "
                             "(DiTs); `stbench list` shows every architecture's")
    parser.add_argument("--resolution", default="64",
                        help="comma-separated frame sizes in pixels, multiples of 8: one number is square, HxW "
                             "is height x width, e.g. 480x832 (default 64)")
    parser.add_argument("--frames", default="8", help="comma-separated frame counts (default 8)")
    parser.add_argument("--batch", default="1", help="comma-separated batch sizes (default 1)")
    parser.add_argument("--mode", default="temporal", choices=architectures.TRAINING_MODES,
                        help="temporal: spatial layers frozen (video fine-tuning); full: everything trains")
    parser.add_argument("--dtype", choices=DTYPES, default=None,
                        help="autocast dtype (default: bf16 on CUDA, fp32 on CPU)")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the forward + loss")
    parser.add_argument("--repeats", type=int, default=5, help="measured steps per case (default 5)")
    parser.add_argument("--warmup", type=int, default=2, help="unmeasured steps first (>= 2; more with --compile)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a model config field (repeatable); recorded in the results")
    parser.add_argument("--trace", action="store_true", help="also write a torch.profiler trace per case")
    parser.add_argument("--trace-memory", action="store_true",
                        help="with --trace: also record memory events and tensor shapes (traces grow several times)")
    parser.add_argument("--isolate", action="store_true", help="run each case in a child process")
    parser.add_argument("--resume", action="store_true", help="skip cases already in OUT/results.jsonl")
    parser.add_argument("--out", default=None, help="run folder (default: runs/run-<UTC time>)")
    add_parallel_arguments(parser)
    add_regime_arguments(parser)
    parser.add_argument("--no-progress", action="store_true", help="one line per case instead of a progress bar")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds: every case --repeats steps per "
                        f"round, in a shuffled order, samples pooled (default {DEFAULT_ROUNDS} when one process "
                        "measures two or more cases, so that their comparison pairs by round; else 1)")
    parser.add_argument("--shuffle-seed", type=int, default=0, help="seed of the --rounds order (default 0)")
    parser.add_argument("--weights", default=None, metavar="trained|PATH",
                        help="start from the committed checkpoint of the family and preset, or a state dict file "
                             "(default: random weights)")


def add_parallel_arguments(parser: argparse.ArgumentParser, launched: str = "under torchrun") -> None:
    """--context-parallel, --fsdp and FSDP's settings (shared by `run` and `predict`; --activation-checkpointing
    is a regime flag, stbench.regimes.add_regime_arguments)."""
    parser.add_argument("--context-parallel", choices=CONTEXT_PARALLEL, default=None,
                        help=f"sequence parallelism across ranks ({launched})")
    parser.add_argument("--fsdp", type=int, default=None, metavar="N",
                        help=f"{launched}: FSDP2 (fully_shard per block) with N data-parallel ranks; with "
                             "--context-parallel, N x CP = world size on one 2D device mesh")
    parser.add_argument("--fsdp-reshard-after-forward", action=argparse.BooleanOptionalAction, default=None,
                        help="with --fsdp: free gathered parameters after forward, gather again in backward "
                             "(FSDP2's default: on)")
    parser.add_argument("--fsdp-mixed-precision", action="store_true",
                        help="with --fsdp: bf16 parameters, fp32 gradient reduction (FSDP's MixedPrecisionPolicy)")


def sweep_from_args(args: argparse.Namespace) -> Sweep:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device: {device!r} is not available on this machine (no CUDA device); legal: cpu")
    if device.startswith("cuda:") and device[5:].isdigit() and int(device[5:]) >= torch.cuda.device_count():
        raise UserError(f"device: {device!r} does not exist; legal: cuda:0..cuda:{torch.cuda.device_count() - 1}")
    dtype = args.dtype or ("bf16" if device.startswith("cuda") else "fp32")
    archs = comma_list(args.arch, "arch", str)
    return Sweep(archs=archs, resolutions=resolution_list(args.resolution),
                 frames=comma_list(args.frames, "frames"), batches=comma_list(args.batch, "batch"),
                 preset=args.preset, mode=args.mode, dtype=dtype, device=device, compile=args.compile,
                 overrides=parse_set_options(args.set), context_parallel=args.context_parallel,
                 repeats=args.repeats, warmup=args.warmup, weights=getattr(args, "weights", None), **fsdp_settings(args),
                 **regime_settings(args))


def fsdp_settings(args: argparse.Namespace) -> dict:
    """FSDP's settings with their defaults when --fsdp is given; as typed (None unless given) otherwise, so
    that a setting without --fsdp is reported."""
    fsdp = getattr(args, "fsdp", None)
    ac = getattr(args, "activation_checkpointing", None)
    reshard = getattr(args, "fsdp_reshard_after_forward", None)
    mixed = getattr(args, "fsdp_mixed_precision", False) or None
    if fsdp is not None:
        ac, reshard, mixed = ac or "none", True if reshard is None else reshard, bool(mixed)
    return dict(fsdp=fsdp, activation_checkpointing=ac, fsdp_reshard_after_forward=reshard,
                fsdp_mixed_precision=mixed)


def execute(args: argparse.Namespace) -> int:
    sweep = sweep_from_args(args)
    rounds = default_rounds(sweep) if args.rounds is None else args.rounds
    if rounds < 1:
        raise UserError(f"--rounds: must be >= 1, got {rounds}")
    out = Path(args.out or f"runs/run-{env.utc_now().replace(':', '').replace('+0000', 'Z')}")
    world = os.environ.get("WORLD_SIZE", "1")
    if not world.isdigit():
        raise UserError(f"WORLD_SIZE: expected an integer, got {world!r}")
    # torchrun --nproc-per-node 1 ... --fsdp 1 (MASTER_ADDR set): FSDP on a one-rank mesh, through the same path
    if int(world) > 1 or (sweep.fsdp is not None and "MASTER_ADDR" in os.environ):
        from .distributed import run_sweep_distributed

        if args.rounds is not None and args.rounds > 1:
            raise UserError("--rounds: not supported with torchrun (context-parallel) runs; use --repeats")
        return run_sweep_distributed(sweep, out, args)
    if sweep.fsdp is not None:
        raise UserError("--fsdp: needs several processes; launch with torchrun --nproc-per-node N -m stbench "
                        "run --fsdp N ...")
    if sweep.context_parallel is not None:  # one process would measure a plain step under a parallel name
        raise UserError("--context-parallel: needs several processes; launch with "
                        "torchrun --nproc-per-node N -m stbench run ...")
    if getattr(args, "trace_memory", False):
        if not args.trace:
            raise UserError("--trace-memory: only with --trace")
        os.environ[sequence.TRACE_MEMORY_ENV] = "1"
    argv = getattr(args, "argv", None)
    command = shlex.join(["python", "-m", "stbench", *(argv if argv is not None else sys.argv[1:])])
    records = run_sweep(sweep, out, resume=args.resume, isolate=args.isolate, trace=args.trace,
                        progress=not args.no_progress, command=command, rounds=rounds, seed=args.shuffle_seed)
    from .closing import closing_lines

    for line in closing_lines(records, len(sweep.cases) - len(records), out, trace=args.trace):
        print(line, file=sys.stderr)
    return 0


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--child":
    sys.exit(_child_main(sys.argv[2]))
