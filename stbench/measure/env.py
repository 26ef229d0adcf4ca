"""The environment a record was measured in: software versions, hardware, checkout, time."""
from __future__ import annotations

import functools
import platform
import socket
import subprocess
from pathlib import Path

import torch

import stbench

from ..units import utc_now

from . import nvml


@functools.lru_cache(maxsize=1)
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@functools.lru_cache(maxsize=1)
def _git(*args: str) -> str | None:
    root = Path(stbench.__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


@functools.lru_cache(maxsize=1)
def git_sha() -> str | None:
    """HEAD of the stbench checkout; None outside a git repository."""
    return _git("rev-parse", "HEAD") or None


@functools.lru_cache(maxsize=1)
def git_dirty() -> bool | None:
    """Whether tracked files of the checkout differ from HEAD (the sha alone would not name the code)."""
    status = _git("status", "--porcelain", "--untracked-files=no")
    return None if status is None else bool(status)


def collect_env(device: str | torch.device = "cpu") -> dict:
    device = torch.device(device)
    gpu = None
    if device.type == "cuda" and torch.cuda.is_available():
        gpu = torch.cuda.get_device_name(device)
    return {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gpu": gpu,
        "driver": nvml.driver_version() if gpu else None,
        "cpu": cpu_model(),
        "cpu_threads": torch.get_num_threads(),
        "host": socket.gethostname(),
        "git_sha": git_sha(),
        "git_dirty": git_dirty(),
        "stbench": stbench.__version__,
        "time": utc_now(),
    }
