"""Peak resident memory of this process on Linux: the kernel's high-water mark, reset on demand.

Writing "5" to /proc/self/clear_refs resets VmHWM to the current RSS, so VmHWM read later is the exact peak
over the interval. Unlike a sampling thread it cannot miss a short peak between samples and takes no CPU
from the measured steps.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import gc
from pathlib import Path

STATUS = Path("/proc/self/status")
CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_bytes(field: str) -> int | None:
    try:
        for line in STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # reported in kB
    except (OSError, ValueError, IndexError):
        return None
    return None


def _trim() -> None:
    """Hand the C heap's free memory back to the system (glibc keeps freed blocks resident otherwise)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        if libc is not None and hasattr(libc, "malloc_trim"):
            libc.malloc_trim(0)
    except OSError:
        pass


def resident_bytes() -> int | None:
    """Resident set size now, after freeing what earlier work left cached in the C heap (None without /proc).

    Without the trim, memory an earlier case freed stays resident and is reused: the next case's growth
    would be understated by up to that much.
    """
    gc.collect()
    _trim()
    return _status_bytes("VmRSS")


def reset_peak() -> bool:
    """Start a new peak interval; False where the kernel does not allow it (then no peak is reported)."""
    try:
        CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


def peak_growth(baseline: int | None, reset: bool) -> int | None:
    """Peak RSS since `reset_peak()` minus `baseline` (RSS before the model was built); None if unmeasurable."""
    peak = _status_bytes("VmHWM")
    if not reset or baseline is None or peak is None:
        return None
    return peak - baseline


def step_peak_growth(step, state_bytes: int) -> int | None:
    """Peak resident memory growth of one more training step of `step` over the memory its model state needs.

    Runs after the timed steps, in a pass of its own: trimming the C heap before the timed steps made them
    measurably slower (+3% on a tiny UNet, scripts/overhead.py), so the baseline is taken here instead. At this
    point the model's parameters and optimizer state (`state_bytes`, exact) are resident and gradients are
    freed; the result is that state plus the step's peak growth: gradients, activations, temporaries.
    """
    baseline = resident_bytes()
    reset = reset_peak()
    step()
    growth = peak_growth(baseline, reset)
    return None if growth is None else growth + state_bytes
