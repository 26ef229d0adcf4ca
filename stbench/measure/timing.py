"""Step timing: warm-up kept apart from measured steps, raw samples, robust statistics, stability warnings."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from .. import stats

MIN_STABLE_SAMPLES = 5
MAX_STABLE_SPREAD = 0.10  # (p90 - p10) / median above this is flagged
SETTLE_WINDOW = 3  # warm-up ends when this many consecutive steps agree ...
SETTLE_SPREAD = 0.10  # ... within this fraction of their median ((max - min) / median)
WARMUP_CAP = 10  # ... or after this many steps (or the requested minimum, if larger)


@dataclass
class StepTimes:
    """Raw per-step times of the measured steps (ms) and their summary statistics."""

    samples_ms: list[float]
    warnings: list[str] = field(default_factory=list)

    def __post_init__(self):
        figures = stats.summary(self.samples_ms)
        self.median_ms, self.min_ms, self.p10_ms, self.p90_ms = (figures[k] for k in ("median", "min", "p10", "p90"))
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


def warm_up(step: Callable[[], object], steps: int, device: str | torch.device = "cpu", *,
            cap: int = WARMUP_CAP, clock: Callable[[], float] | None = None) -> tuple[int, bool]:
    """Unmeasured steps until step times settle (as pyperf calibrates warm-up): allocator growth, autotuning,
    compilation and lazy init happen here.

    At least `steps`, then until the last SETTLE_WINDOW steps agree within SETTLE_SPREAD, at most
    max(steps, cap); cap=0 runs exactly `steps` (distributed ranks must agree on the count).
    Returns (steps taken, whether the last steps settled).
    """
    clock = clock or time.perf_counter
    times: list[float] = []
    limit = max(steps, cap)
    while len(times) < limit:
        synchronize(device)
        t0 = clock()
        step()
        synchronize(device)
        times.append(clock() - t0)
        if len(times) >= max(steps, SETTLE_WINDOW) and _settled(times[-SETTLE_WINDOW:]):
            return len(times), True
    return len(times), len(times) >= SETTLE_WINDOW and _settled(times[-SETTLE_WINDOW:])


def _settled(window: list[float]) -> bool:
    median = stats.summary(window)["median"]
    return median > 0 and (max(window) - min(window)) / median <= SETTLE_SPREAD


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
