"""`python -m stbench train`: train each case on the synthetic moving-shapes video data, one record per case.

Every case of a command sees the same batches, noise and timesteps in the same order and starts from the
same weights where architectures share parameter names (the committed checkpoint with `--weights trained`,
otherwise the family's reference architecture built from `--seed`). Step times count forward, backward and
the optimizer step only: batch generation and held-out evaluation are outside the clock.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

import torch

import architectures
from architectures.base import VideoModel

from . import regimes, results, runfolder, runner
from .config import Case
from .data import DatasetConfig, MovingShapes
from .errors import UserError
from .measure import env, memory, sequence
from .measure.timing import StepTimes
from .weights import save_checkpoint, share_initial_weights

TIMED_AFTER = 2  # step_ms_* summarise steps after the first two (allocation, lazy init), as run's warm-up
# run's flags that train does not take, with their defaults
RUN_ONLY = {"repeats": 5, "warmup": 2, "trace": False, "context_parallel": None, "rounds": None, "shuffle_seed": 0,
            "fsdp": None, "fsdp_reshard_after_forward": None,
            "fsdp_mixed_precision": False, "trace_memory": False}


def heldout_loss(model: VideoModel, batches, autocast) -> float:
    """Mean noise-prediction MSE over the held-out split (no estimator or auxiliary terms), without grad."""
    total, count = 0.0, 0
    with torch.no_grad(), autocast():
        for batch in batches:
            total += float(VideoModel.loss(model, batch)) * batch.latents.shape[0]
            count += batch.latents.shape[0]
    return total / count


def _train(case: Case, record: dict, *, steps: int, eval_every: int, seed: int, lr: float, heldout: int,
           save: str | None, command: str | None) -> None:
    from .step import TrainingStep  # noqa: local so `--help` stays fast

    device = torch.device(case.device)
    # loads case.weights; otherwise the family's shared initial weights, set before any LoRA adapter is added
    step = TrainingStep(case, seed=seed, lr=lr,
                        init=None if case.weights is not None else lambda m: share_initial_weights(m, case, seed))
    model = step.model
    dataset = DatasetConfig(seed=seed, frames=case.frames, resolution=case.resolution, heldout=heldout,
                            width=case.width)
    data = MovingShapes(dataset, model)
    dtype = regimes.input_dtype(case)  # bf16 weights read bf16 latents and text
    held = [b.to(device=device, dtype=dtype) for b in data.heldout_batches(case.batch)]
    sequence.model_sizes(record, step)
    record["warmup"] = 0

    evals = [[0, heldout_loss(model, held, step.autocast)]]
    losses, wall_ms, step_ms, elapsed = [], [], [], 0.0
    memory.reset_peaks(device)
    for i in range(steps):
        step.batch = data.train_batch(i, case.batch).to(device=device, dtype=dtype)
        start = time.perf_counter()
        loss = step()  # forward, backward, optimizer step; synchronised
        took = time.perf_counter() - start
        elapsed += took
        losses.append(float(loss))
        wall_ms.append(elapsed * 1e3)
        step_ms.append(took * 1e3)
        if (i + 1) % eval_every == 0 or i + 1 == steps:
            evals.append([i + 1, heldout_loss(model, held, step.autocast)])
    record["peak_allocated"], record["peak_reserved"] = memory.allocator_peaks(device)
    record["optimizer_bytes"] = memory.optimizer_bytes(step.optimizer)
    if len(step_ms) > TIMED_AFTER:
        times = StepTimes(step_ms[TIMED_AFTER:])
        record.update(times.as_record_fields())
        record["warnings"].extend(times.warnings)
    record["train"] = {"steps": steps, "losses": losses, "wall_ms": wall_ms, "eval": evals, "seed": seed, "lr": lr,
                       "batch": case.batch, "dataset": dataset.describe(), "weights": case.weights}
    if save:
        save_checkpoint(model, save, {
            "family": architectures.get(case.arch).family, "preset": case.preset, "arch": case.arch,
            "mode": case.mode, "overrides": case.override_dict, "steps": steps, "seed": seed, "lr": lr,
            "frames": case.frames, "resolution": case.resolution, "width": case.width, "batch": case.batch,
            "heldout_loss": evals[-1][1], "command": command})
        record["train"]["saved"] = str(save)
    # the model's own figures on the trained weights (DSV: the sparsity its profiler found, per layer and head)
    sequence.model_stats(record, model)
    sequence.count_passes(record, step)  # after saving: the FLOP count runs one more (eager) training step
    record["status"] = "ok"


def train_case(case: Case, *, steps: int, eval_every: int, seed: int = 0, lr: float = 1e-3, heldout: int = 16,
               save: str | None = None, command: str | None = None) -> dict:
    """Train one case; a complete record, never an exception for OOM or a model error."""
    record = runner.case_record(case)
    return runner.run_guarded(case, record, lambda: _train(
        case, record, steps=steps, eval_every=eval_every, seed=seed, lr=lr, heldout=heldout, save=save,
        command=command))


def _check_resumed_settings(out: Path, args: argparse.Namespace) -> None:
    """--resume skips recorded cases: refuse when they were trained otherwise (their losses would be compared with
    this call's as if trained alike)."""
    path = out / runfolder.RESULTS_FILE
    if not path.exists():
        return
    asked = {"steps": args.steps, "seed": args.seed, "lr": args.lr, "heldout": args.heldout}
    for record in results.read_records(path):
        train = record.get("train") or {}
        if not train:
            continue
        had = {"steps": train.get("steps"), "seed": train.get("seed"), "lr": train.get("lr"),
               "heldout": (train.get("dataset") or {}).get("heldout")}
        differ = [f"--{k} {had[k]} there, {asked[k]} now" for k in asked if had[k] is not None and had[k] != asked[k]]
        if differ:
            raise UserError(f"--resume: {out} holds {record['arch']} trained with other settings ({'; '.join(differ)}"
                            f"); pass the same settings or another --out")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    runner.add_arguments(parser)
    for action in parser._actions:  # run's flags that train refuses stay out of --help
        if action.dest in RUN_ONLY:
            action.help = argparse.SUPPRESS
        elif action.dest == "out":
            action.help = "run folder (default: runs/train-<UTC time>)"
    parser.add_argument("--steps", type=int, default=200, help="training steps per case (default 200)")
    parser.add_argument("--eval-every", type=int, default=50,
                        help="held-out loss every K steps, and at step 0 and the last step (default 50)")
    parser.add_argument("--seed", type=int, default=0, help="data, noise and initial weights (default 0)")
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default 1e-3)")
    parser.add_argument("--heldout", type=int, default=16, help="held-out clips (default 16)")
    parser.add_argument("--save", default=None, metavar="PATH",
                        help="write the trained state dict and its metadata (one case only)")


def execute(args: argparse.Namespace) -> int:
    for name, default in RUN_ONLY.items():
        if getattr(args, name) != default:
            raise UserError(f"--{name.replace('_', '-')}: not used by train (run takes it)")
    for name in ("steps", "eval_every", "heldout"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')}: must be >= 1, got {getattr(args, name)}")
    if not args.lr > 0:
        raise UserError(f"--lr: must be > 0, got {args.lr}")
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        raise UserError("train: runs in one process; launch it without torchrun")
    sweep = runner.sweep_from_args(args)
    if args.save and len(sweep.cases) != 1:
        raise UserError(f"--save: needs exactly one case, got {len(sweep.cases)}")
    if args.save and sweep.lora is not None:  # the state dict would hold peft's adapter names, not the model's
        raise UserError("--save: not with --lora (a checkpoint holds the model's own weights)")
    out = Path(args.out or f"runs/train-{env.utc_now().replace(':', '').replace('+0000', 'Z')}")
    argv = getattr(args, "argv", None)
    command = shlex.join(["python", "-m", "stbench", *(argv if argv is not None else sys.argv[1:])])
    options = {"steps": args.steps, "eval_every": args.eval_every, "seed": args.seed, "lr": args.lr,
               "heldout": args.heldout, "save": args.save, "command": command}
    if args.resume:
        _check_resumed_settings(out, args)
    records = runner.run_sweep(sweep, out, resume=args.resume, isolate=args.isolate, progress=not args.no_progress,
                               command=command, case_fn=train_case, case_options=options)
    for r in records:
        if r["status"] == "ok":
            print(f"{r['arch']}: held-out loss {r['train']['eval'][0][1]:.4f} -> {r['train']['eval'][-1][1]:.4f} "
                  f"in {args.steps} steps, {r['train']['wall_ms'][-1] / 1e3:.1f} s", file=sys.stderr)
    failed = sum(r["status"] != "ok" for r in records)
    print(f"stbench: {len(records)} case(s) trained ({failed} not ok) -> {out / runfolder.RESULTS_FILE}",
          file=sys.stderr)
    return 0
