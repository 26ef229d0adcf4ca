"""NVML sampling thread: this process's and the whole device's used GPU memory, as the driver sees it.

The torch allocator only knows its own blocks; NVML also sees the CUDA context, cuBLAS/cuDNN workspaces
and other libraries. Everything here degrades to None when NVML (or a CUDA device) is unavailable.
"""
from __future__ import annotations

import functools
import os
import threading

import torch

# NVML's "not available" marker (0xFFFFFFFFFFFFFFFF) where a driver cannot attribute memory to a process
NVML_VALUE_NOT_AVAILABLE = 2**64 - 1

try:
    import pynvml
except ImportError:  # nvidia-ml-py not installed
    pynvml = None


@functools.lru_cache(maxsize=1)
def _init() -> bool:
    if pynvml is None:
        return False
    try:
        pynvml.nvmlInit()
        return True
    except Exception:
        return False


def device_handle(device: str | torch.device):
    """The NVML handle of a torch CUDA device, matched by UUID.

    CUDA's device numbers are not NVML's: CUDA_VISIBLE_DEVICES renumbers, and CUDA orders fastest first
    where NVML orders by PCI bus. So the index is a fallback only where neither applies.
    """
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available() or not _init():
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    uuid = str(getattr(torch.cuda.get_device_properties(index), "uuid", "") or "")
    if uuid:  # torch prints the bare UUID; NVML wants it prefixed (GPU-... or, for a MIG slice, MIG-...)
        for candidate in (uuid, f"GPU-{uuid}", f"MIG-{uuid}"):
            try:
                return pynvml.nvmlDeviceGetHandleByUUID(candidate)
            except Exception:
                pass
    renumbered = bool(os.environ.get("CUDA_VISIBLE_DEVICES"))
    same_order = torch.cuda.device_count() == 1 or os.environ.get("CUDA_DEVICE_ORDER") == "PCI_BUS_ID"
    if renumbered or not same_order:
        return None  # an index could name another GPU: better no NVML figures than wrong ones
    try:
        return pynvml.nvmlDeviceGetHandleByIndex(index)
    except Exception:
        return None


def driver_version() -> str | None:
    if not _init():
        return None
    try:
        version = pynvml.nvmlSystemGetDriverVersion()
        return version.decode() if isinstance(version, bytes) else str(version)
    except Exception:
        return None


def process_used_bytes(handle, pid: int | None = None) -> int | None:
    """GPU memory NVML attributes to `pid` (this process by default) on the device; None if not reported.

    Inside containers NVML may report host pids, or no per-process figure at all: then None. Some report the
    process with a usedGpuMemory of 0 (or NVML's "not available" value): unknown, not 0 bytes.
    """
    pid = os.getpid() if pid is None else pid
    try:
        processes = pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
    except Exception:
        return None
    for proc in processes:
        used = proc.usedGpuMemory
        if proc.pid == pid and used and used < NVML_VALUE_NOT_AVAILABLE:
            return int(used)
    return None


def device_used_bytes(handle) -> int | None:
    try:
        return int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)
    except Exception:
        return None


class NvmlSampler:
    """Context manager: a daemon thread samples process and device used memory every `period_s` seconds."""

    # After the block: `peak_process`, `peak_device` (bytes or None), `baseline_process`/`baseline_device`
    # (read on entry: for a fresh process the CUDA context and loaded kernels) and `samples` (count).

    def __init__(self, device: str | torch.device, period_s: float = 0.005):
        self.period_s = period_s
        self.handle = device_handle(device)
        self.available = self.handle is not None
        self.peak_process: int | None = None
        self.peak_device: int | None = None
        self.baseline_process: int | None = None
        self.baseline_device: int | None = None
        self.samples = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        process, device = process_used_bytes(self.handle), device_used_bytes(self.handle)
        if process is not None:
            self.peak_process = max(self.peak_process or 0, process)
        if device is not None:
            self.peak_device = max(self.peak_device or 0, device)
        self.samples += 1

    def _loop(self) -> None:
        while not self._stop.wait(self.period_s):
            self._sample()

    def __enter__(self) -> "NvmlSampler":
        if self.available:
            self.baseline_process = process_used_bytes(self.handle)
            self.baseline_device = device_used_bytes(self.handle)
            self._sample()
            self._thread = threading.Thread(target=self._loop, name="stbench-nvml", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> bool:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._sample()  # one last reading at the end of the block
        return False


def context_baseline_bytes(device: str | torch.device) -> int | None:
    """This process's NVML-used memory now: before any model is built, the CUDA context itself."""
    handle = device_handle(device)
    return None if handle is None else process_used_bytes(handle)
