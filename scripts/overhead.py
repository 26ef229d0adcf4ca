"""Harness overhead: the median step time `run_case` reports vs a bare perf_counter loop over the same step.

Both build the same TrainingStep (same seed: same weights and batch), warm up the same number of steps and
time the same number of steps, in this one process; rounds alternate which goes first, so drift in a busy
machine hits both alike. Prints both medians (of the per-round medians) and their relative difference.

    python scripts/overhead.py --arch serial-unet --resolution 32 --frames 4 --repeats 10 --rounds 20 --threads 1
    ... --clock thread_time   # CPU time of the one compute thread: steadier on a shared machine
"""
from __future__ import annotations

import argparse
import functools
import statistics
import time

import torch

from stbench.config import Case
from stbench.measure import timing
from stbench.runner import run_case
from stbench.step import TrainingStep


CLOCKS = {"perf_counter": time.perf_counter, "thread_time": time.thread_time}
clock = time.perf_counter


def bare_times_ms(case: Case, repeats: int, warmup: int) -> tuple[float, float]:
    step = TrainingStep(case)
    for _ in range(warmup):
        step()
    samples = []
    for _ in range(repeats):
        t0 = clock()
        step()
        samples.append((clock() - t0) * 1e3)
    return statistics.median(samples), min(samples)


def stbench_times_ms(case: Case, repeats: int, warmup: int) -> tuple[float, float]:
    record = run_case(case, repeats=repeats, warmup=warmup)
    if record["status"] != "ok":
        raise SystemExit(f"run_case failed: {record['status']}: {record['error']}")
    return record["step_ms_median"], record["step_ms_min"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="serial-unet")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--frames", type=int, default=4)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--mode", default="temporal")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--clock", choices=CLOCKS, default="perf_counter",
                        help="thread_time (CPU time of this thread; with --threads 1 it holds all the compute) "
                             "is far less disturbed by other processes on a busy machine than wall time")
    args = parser.parse_args()
    global clock
    clock = CLOCKS[args.clock]
    # stbench's own timing loop takes an injectable clock: give it the same one
    timing.time_steps = functools.partial(timing.time_steps, clock=clock)
    if args.threads:
        torch.set_num_threads(args.threads)
    case = Case(arch=args.arch, preset=args.preset, resolution=args.resolution, frames=args.frames,
                batch=args.batch, mode=args.mode, device=args.device, dtype=args.dtype)
    bare, harness = [], []  # (median, min) per round
    for round_ in range(args.rounds):
        order = [("bare", bare_times_ms, bare), ("stbench", stbench_times_ms, harness)]
        for name, measure, into in order if round_ % 2 == 0 else order[::-1]:
            into.append(measure(case, args.repeats, args.warmup))
            print(f"round {round_ + 1} {name:8s} median {into[-1][0]:9.2f} ms  min {into[-1][1]:9.2f} ms", flush=True)
    print(f"case: {case.arch} {case.preset} {case.mode} r{case.resolution} f{case.frames} b{case.batch} "
          f"{case.dtype} {case.device}, threads {torch.get_num_threads()}, {args.rounds} rounds x "
          f"{args.repeats} steps, clock {args.clock}")
    for label, pick, combine in (("median of round medians", 0, statistics.median), ("min of round minima", 1, min)):
        bare_ms, harness_ms = combine(r[pick] for r in bare), combine(r[pick] for r in harness)
        print(f"{label}: bare {bare_ms:.2f} ms, stbench {harness_ms:.2f} ms, "
              f"(stbench - bare) / bare = {(harness_ms - bare_ms) / bare_ms:+.2%}")
    # The harness's own cost per step, free of the machine's noise: its timing loop around a step that does nothing.
    empty = timing.time_steps(lambda: None, 10000, args.device).median_ms
    print(f"timing loop around an empty step: {empty * 1e3:.2f} us per step "
          f"({empty / statistics.median(b[0] for b in bare):.5%} of the bare median)")
    # Paired: each round's two medians were taken back to back, so their ratio cancels slow drift in load.
    ratios = [h[0] / b[0] for b, h in zip(bare, harness)]
    print(f"median of paired per-round ratios - 1: {statistics.median(ratios) - 1:+.2%} "
          f"(rounds: {', '.join(f'{r - 1:+.1%}' for r in ratios)})")

if __name__ == "__main__":
    main()
