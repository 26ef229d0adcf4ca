"""Step timing: warm-up kept apart from measured steps, raw samples, robust statistics, stability warnings."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

MIN_STABLE_SAMPLES = 5
MAX_STABLE_SPREAD = 0.10  # (p90 - p10) / median above this is flagged


def percentile(sorted_values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), q in [0, 100]."""
    if not sorted_values:
        raise ValueError("percentile of no values")
    pos = (len(sorted_values) - 1) * q / 100.0
    low = int(pos)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (pos - low)


@dataclass
class StepTimes:
    """Raw per-step times of the measured steps (ms) and their summary statistics."""

    samples_ms: list[float]
    warnings: list[str] = field(default_factory=list)

    def __post_init__(self):
        ordered = sorted(self.samples_ms)
        self.median_ms = percentile(ordered, 50)
        self.min_ms = ordered[0]
        self.p10_ms = percentile(ordered, 10)
        self.p90_ms = percentile(ordered, 90)
        self.warnings = self.warnings + stability_warnings(self)

    @property
    def spread(self) -> float:
        """(p90 - p10) / median: the relative width of the middle 80% of samples."""
        return (self.p90_ms - self.p10_ms) / self.median_ms if self.median_ms > 0 else 0.0

    def as_record_fields(self) -> dict:
        return {"step_ms_median": self.median_ms, "step_ms_min": self.min_ms, "step_ms_p10": self.p10_ms,
                "step_ms_p90": self.p90_ms, "step_ms_samples": list(self.samples_ms)}


def stability_warnings(times: StepTimes) -> list[str]:
    notes = []
    if len(times.samples_ms) < MIN_STABLE_SAMPLES:
        notes.append(f"few samples: {len(times.samples_ms)} measured steps (< {MIN_STABLE_SAMPLES}); "
                     f"statistics are rough, use --repeats {MIN_STABLE_SAMPLES} or more")
    if times.spread > MAX_STABLE_SPREAD:
        notes.append(f"unstable timing: (p90-p10)/median = {times.spread:.1%} (> {MAX_STABLE_SPREAD:.0%}); "
                     f"the machine may be busy or throttling")
    return notes


def synchronize(device: str | torch.device) -> None:
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def warm_up(step: Callable[[], object], steps: int, device: str | torch.device = "cpu") -> None:
    """Unmeasured steps: allocator growth, autotuning, compilation and lazy init happen here."""
    for _ in range(steps):
        step()
    synchronize(device)


def time_steps(step: Callable[[], object], repeats: int, device: str | torch.device = "cpu", *,
               clock: Callable[[], float] | None = None) -> StepTimes:
    """Time `repeats` calls of `step`, one sample per call.

    CUDA (and no clock given): CUDA events around each step, synchronised once before and after the loop.
    Otherwise `clock()` (seconds; `time.perf_counter` by default) read before and after each step.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    device = torch.device(device)
    if device.type == "cuda" and clock is None:
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(repeats)]
        torch.cuda.synchronize(device)
        for start, end in events:
            start.record()
            step()
            end.record()
        torch.cuda.synchronize(device)
        return StepTimes([start.elapsed_time(end) for start, end in events])
    clock = clock or time.perf_counter
    samples = []
    synchronize(device)
    for _ in range(repeats):
        t0 = clock()
        step()
        samples.append((clock() - t0) * 1e3)
    return StepTimes(samples)
