"""Machine load around a case: CPU time other processes used while it ran, load average, other GPU processes.

/proc/stat counts every process's CPU time; subtracting this process's own (os.times) leaves what others took.
Competition itself is read from the scheduler (/proc/self/task/*/schedstat): the time this process's threads
were runnable but waited for a core. When that exceeds a few percent of their running time, or (without
schedstat) the cores were saturated with others' work, the case is warned.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch

from . import nvml

LOAD_WORD = "load"  # every load warning contains it; gate and report look for it
SLACK_CORES = 0.25  # without schedstat: others' share of saturated cores that counts as competing
MAX_WAIT_FRACTION = 0.05  # run-queue wait / own CPU time above this: the case shared its cores


@dataclass(frozen=True)
class LoadSnapshot:
    """CPU counters and load average at one moment."""

    wall_s: float
    busy_s: float | None  # all processes, all cores (None without /proc/stat)
    own_s: float  # this process and its waited-for children
    wait_s: float | None  # this process's threads' time runnable but not running (None without schedstat)
    cores: int
    loadavg_1m: float | None
    gpu_others: tuple[int, ...] | None  # pids of other processes on the case's GPU (None: not known)


def _busy_seconds() -> tuple[float | None, int]:
    try:
        with open("/proc/stat") as f:
            lines = f.read().splitlines()
    except OSError:
        return None, os.cpu_count() or 1
    fields = [int(v) for v in lines[0].split()[1:]]
    # user nice system idle iowait irq softirq steal (guest time is already inside user)
    busy = sum(fields[:3]) + sum(fields[5:8])
    cores = sum(1 for line in lines if line.startswith("cpu") and line[3:4].isdigit())
    return busy / os.sysconf("SC_CLK_TCK"), cores or 1


def _wait_seconds() -> float | None:
    total, seen = 0, False
    for task in os.scandir("/proc/self/task") if os.path.isdir("/proc/self/task") else ():
        try:
            with open(os.path.join(task.path, "schedstat")) as f:
                total += int(f.read().split()[1])
            seen = True
        except (OSError, IndexError, ValueError):
            continue  # the thread ended meanwhile
    return total / 1e9 if seen else None


def _gpu_others(device) -> tuple[int, ...] | None:
    handle = nvml.device_handle(device)
    if handle is None:
        return None
    try:
        processes = nvml.pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
    except Exception:  # noqa: BLE001 - NVML without per-process data: unknown, not "none"
        return None
    return tuple(sorted(p.pid for p in processes if p.pid != os.getpid()))


def snapshot(device: str | torch.device = "cpu") -> LoadSnapshot:
    busy, cores = _busy_seconds()
    t = os.times()
    try:
        loadavg = os.getloadavg()[0]
    except OSError:
        loadavg = None
    gpu = _gpu_others(device) if torch.device(device).type == "cuda" else None
    return LoadSnapshot(time.monotonic(), busy, t.user + t.system + t.children_user + t.children_system,
                        _wait_seconds(), cores, loadavg, gpu)


def load_fields(before: LoadSnapshot, after: LoadSnapshot) -> dict:
    """The record's `load` block: cores used by this process and by others (averaged over the case)."""
    wall = max(after.wall_s - before.wall_s, 1e-9)
    own = (after.own_s - before.own_s) / wall
    others = None
    if before.busy_s is not None and after.busy_s is not None:
        # /proc/stat ticks at 100 Hz: a case shorter than a few ticks gives a rough figure, never below 0
        others = max(0.0, (after.busy_s - before.busy_s) / wall - own)
    wait = None
    if before.wait_s is not None and after.wait_s is not None:
        wait = max(0.0, after.wait_s - before.wait_s) / wall
    gpu = None
    if before.gpu_others is not None or after.gpu_others is not None:
        gpu = sorted(set(before.gpu_others or ()) | set(after.gpu_others or ()))
    return {"cores": after.cores, "own_cores": round(own, 3), "wait_cores": None if wait is None
            else round(wait, 3), "other_cores": None if others is None
            else round(others, 3), "loadavg_1m_before": before.loadavg_1m, "loadavg_1m_after": after.loadavg_1m,
            "gpu_other_pids": gpu, "seconds": round(wall, 3)}


def load_warnings(fields: dict) -> list[str]:
    """A warning containing "load" when other processes competed for the CPU cores or shared the GPU."""
    notes = []
    others, own, cores = fields.get("other_cores"), fields.get("own_cores") or 0.0, fields.get("cores") or 1
    wait = fields.get("wait_cores")
    if wait is not None:
        competed = wait > MAX_WAIT_FRACTION * max(own, 1e-3)
    else:
        competed = others is not None and others > SLACK_CORES and others + own > cores - SLACK_CORES
    if competed:
        waited = f", and its threads waited {wait / max(own, 1e-3):.0%} of their CPU time for a core" if wait else ""
        notes.append(f"load: other processes used {others or 0:.2f} of {cores} CPU cores while this case used "
                     f"{own:.2f}{waited}; they competed with it, so its step times may be inflated")
    if fields.get("gpu_other_pids"):
        notes.append(f"load: {len(fields['gpu_other_pids'])} other process(es) ran on the GPU during this case "
                     f"(pids {', '.join(map(str, fields['gpu_other_pids']))})")
    return notes


def was_loaded(record: dict) -> bool:
    return any(str(w).startswith(f"{LOAD_WORD}:") for w in record.get("warnings") or [])
