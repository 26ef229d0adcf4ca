"""Interleaved rounds: every case once per round, in a seeded shuffled order, samples pooled with their round.

Load that falls on one round then falls on every case of that round alike, and two cases of the run can be
compared round by round (stbench.stats pairs their samples).
"""
from __future__ import annotations

import random
import sys
from typing import Callable, Iterator

from .config import Case
from .measure import flops, load, timing

# `run --rounds` when one process measures two or more cases (else 1): the fewest rounds tried at which the
# comparison of two cases 10% apart in step time reads "slower" in >= 80% of simulated runs (83.7%; equal cases
# called different in 7.3%; 10 rounds: 78.0%), at --repeats 5 with the project's quiet-machine noise
# (scripts/rounds_power.py; its output in reports/trust/rounds-power.txt). One round compares cases measured at
# different times: load that falls on one of them alone reads as a difference (one round: 48.8% of equal pairs).
DEFAULT_ROUNDS = 12


def default_rounds(sweep) -> int:
    """--rounds when not given: DEFAULT_ROUNDS for a comparison (two or more cases), 1 for a single case."""
    return DEFAULT_ROUNDS if len(sweep.cases) > 1 else 1


# Warnings recomputed from the pooled samples, so the per-round ones are dropped.
TIMING_WARNINGS = ("few samples", "unstable timing")
# Figures that may differ between rounds of one case: the largest is kept.
PEAK_FIELDS = ("peak_allocated", "peak_reserved", "nvml_peak_process", "nvml_peak_device", "warmup")


def round_order(cases: list[Case], round_index: int, seed: int) -> list[Case]:
    """The order of one round: a shuffle seeded by (seed, round), so a rerun measures in the same order."""
    order = list(cases)
    random.Random(f"{seed}:{round_index}").shuffle(order)
    return order


def merge_rounds(records: list[dict]) -> dict:
    """One record from a case's per-round records: samples pooled, `sample_rounds` naming each one's round.

    A round that failed (OOM, error) makes the case fail: its record is returned, noting the round.
    """
    for index, record in enumerate(records):
        if record["status"] != "ok":
            failed = dict(record)
            failed["rounds"] = len(records)
            failed["warnings"] = list(record["warnings"]) + [f"rounds: failed in round {index + 1} of "
                                                             f"{len(records)}"]
            return failed
    merged = dict(records[-1])
    samples, rounds, warnings = [], [], []
    for index, record in enumerate(records):
        samples += record["step_ms_samples"]
        rounds += [index] * len(record["step_ms_samples"])
        for warning in record["warnings"]:
            if warning.startswith(TIMING_WARNINGS):
                continue
            if warning.startswith(f"{load.LOAD_WORD}:"):
                warning = f"{warning} (round {index + 1})"
            if warning not in warnings:
                warnings.append(warning)
    times = timing.StepTimes(samples)
    merged.update(times.as_record_fields())
    merged["sample_rounds"], merged["rounds"] = rounds, len(records)
    merged["warnings"] = warnings + times.warnings
    for name in PEAK_FIELDS:
        values = [r[name] for r in records if r.get(name) is not None]
        merged[name] = max(values) if values else None
    loads = [r["load"] for r in records if r.get("load")]
    if loads:  # the most contended round speaks for the case
        merged["load"] = max(loads, key=lambda f: (f.get("wait_cores") or 0, f.get("other_cores") or 0))
    last = records[-1]
    peak = last["tflops"] / last["mfu"] if last.get("mfu") and last.get("tflops") else None
    merged["tflops"], merged["mfu"] = flops.throughput(merged.get("flops_per_step"), times.median_ms, peak)
    return merged


def run_rounds(cases: list[Case], rounds: int, measure: Callable[[Case, bool], dict], *, seed: int = 0,
               on_measured: Callable[[Case, dict, int], None] | None = None) -> Iterator[dict]:
    """Measure `cases` in `rounds` interleaved rounds; yield each case's merged record after its last round.

    `measure(case, last_round)` returns one round's record (a fresh model each time).
    """
    per_case: dict[Case, list[dict]] = {case: [] for case in cases}
    for index in range(rounds):
        for case in round_order(cases, index, seed):
            record = measure(case, index == rounds - 1)
            per_case[case].append(record)
            if on_measured is not None:
                on_measured(case, record, index)
            if index == rounds - 1:
                yield merge_rounds(per_case.pop(case))


def run_sweep_rounds(cases: list[Case], rounds: int, seed: int, path, measure: Callable[[Case, bool], dict], *,
                     progress: bool = True, label: Callable[[dict], str] = str) -> list[dict]:
    """run_sweep's loop for --rounds: each case's pooled record is appended (fsync'd) after its last round."""
    from tqdm import tqdm

    from . import results

    measured = []
    with tqdm(total=len(cases) * rounds, disable=not progress, unit="step-set", dynamic_ncols=True,
              file=sys.stderr) as bar:
        def on_measured(case, record, index):
            bar.set_description(f"round {index + 1}/{rounds} {results.case_slug(record)}")
            bar.set_postfix_str(f"last: {label(record)}")
            bar.update(1)

        for record in run_rounds(cases, rounds, measure, seed=seed, on_measured=on_measured):
            results.append_record(path, record)
            measured.append(record)
            if not progress:
                print(f"{record['status']:5s} {results.case_slug(record)}: {label(record)} "
                      f"({rounds} rounds)", flush=True)
    return measured
