"""Harness overhead: the median step time `run_case` reports vs a bare perf_counter loop over the same step.

Both build the same TrainingStep (same seed: same weights and batch), warm up the same number of steps and
time the same number of steps, in this one process, in interleaved rounds (a seeded shuffled order each round,
as `stbench run --rounds`), so drift in a busy machine hits both alike. Prints the pooled medians, their ratio
judged by stbench.stats (paired by round), and the machine's load over the whole measurement.

    python scripts/overhead.py --arch serial-unet --resolution 32 --frames 4 --repeats 10 --rounds 10 --threads 1
    ... --clock thread_time   # CPU time of the one compute thread: steadier on a shared machine
"""
from __future__ import annotations

import argparse
import functools
import time

import torch

from stbench import stats
from stbench.config import Case
from stbench.measure import load, timing
from stbench.rounds import round_order
from stbench.runner import run_case
from stbench.step import TrainingStep


CLOCKS = {"perf_counter": time.perf_counter, "thread_time": time.thread_time}
clock = time.perf_counter


def bare_times_ms(case: Case, repeats: int, warmup: int) -> list[float]:
    step = TrainingStep(case)
    timing.warm_up(step, warmup, case.device, clock=clock)  # the same settling warm-up as the harness
    samples = []
    for _ in range(repeats):
        t0 = clock()
        step()
        samples.append((clock() - t0) * 1e3)
    return samples


def stbench_times_ms(case: Case, repeats: int, warmup: int) -> list[float]:
    record = run_case(case, repeats=repeats, warmup=warmup,
                      time_steps=functools.partial(timing.time_steps, clock=clock))
    if record["status"] != "ok":
        raise SystemExit(f"run_case failed: {record['status']}: {record['error']}")
    return record["step_ms_samples"]


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
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0, help="seed of each round's shuffled order")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--clock", choices=CLOCKS, default="perf_counter",
                        help="thread_time (CPU time of this thread; with --threads 1 it holds all the compute) "
                             "is far less disturbed by other processes on a busy machine than wall time")
    args = parser.parse_args()
    global clock
    clock = CLOCKS[args.clock]
    if args.threads:
        torch.set_num_threads(args.threads)
    case = Case(arch=args.arch, preset=args.preset, resolution=args.resolution, frames=args.frames,
                batch=args.batch, mode=args.mode, device=args.device, dtype=args.dtype)
    measures = {"bare": bare_times_ms, "stbench": stbench_times_ms}
    pooled = {name: {"step_ms_samples": [], "sample_rounds": []} for name in measures}
    before = load.snapshot(args.device)
    for index in range(args.rounds):
        for name in round_order(list(measures), index, args.seed):  # interleaved, as `run --rounds` does
            samples = measures[name](case, args.repeats, args.warmup)
            pooled[name]["step_ms_samples"] += samples
            pooled[name]["sample_rounds"] += [index] * len(samples)
            print(f"round {index + 1} {name:8s} median {stats.summary(samples)['median']:9.2f} ms", flush=True)
    machine = load.load_fields(before, load.snapshot(args.device))
    print(f"case: {case.arch} {case.preset} {case.mode} r{case.resolution} f{case.frames} b{case.batch} "
          f"{case.dtype} {case.device}, threads {torch.get_num_threads()}, {args.rounds} rounds x "
          f"{args.repeats} steps, clock {args.clock}")
    print(f"machine: {machine['cores']} cores; other processes used {machine['other_cores']} cores on average, "
          f"this one {machine['own_cores']} (waited {machine['wait_cores']} for a core); load average "
          f"{machine['loadavg_1m_before']:.2f} -> {machine['loadavg_1m_after']:.2f}")
    bare, harness = pooled["bare"], pooled["stbench"]
    b_med, h_med = (stats.summary(p["step_ms_samples"])["median"] for p in (bare, harness))
    print(f"pooled medians: bare {b_med:.3f} ms, stbench {h_med:.3f} ms, (stbench - bare) / bare = "
          f"{h_med / b_med - 1:+.2%}")
    judged = stats.compare_times(harness, bare, same_run=True)
    print(f"paired by round and step ({judged.test}): ratio {judged.ratio - 1:+.2%}, bootstrap 95% "
          f"{judged.low - 1:+.2%} to {judged.high - 1:+.2%}, p = {judged.p_value}, verdict: {judged.verdict}")
    # The harness's own cost per step, free of the machine's noise: its timing loop around a step that does nothing.
    empty = timing.time_steps(lambda: None, 10000, args.device).median_ms
    print(f"timing loop around an empty step: {empty * 1e3:.2f} us per step ({empty / b_med:.5%} of the bare median)")


if __name__ == "__main__":
    main()
