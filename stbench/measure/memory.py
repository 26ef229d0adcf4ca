"""Exact byte accounting: parameters, gradients, optimizer state; torch allocator peaks on CUDA."""
from __future__ import annotations

import contextlib
import gc
import sys
from typing import Iterable

import torch

from architectures.attention.oom import is_out_of_memory  # noqa: F401 - stbench's OOM check


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This process's part of a DTensor (FSDP's shard, context parallelism's tokens); any other tensor as is."""
    # no DTensor exists before its module is imported (by FSDP, context parallelism): importing it here would
    # cost every process 0.7 s
    dtensor = sys.modules.get("torch.distributed.tensor")
    return t._local_tensor if dtensor is not None and isinstance(t, dtensor.DTensor) else t


def tensor_bytes(tensors: Iterable[torch.Tensor | None]) -> int:
    """Bytes held by the storages of `tensors` (None skipped); a storage shared by several tensors counts once.

    A DTensor counts its local part. FSDP2 keeps each padded shard in its own storage (a view onto it is the
    unpadded part), so the padding is counted too, also on a rank whose unpadded part is empty. Works on fake
    and meta tensors (storages are told apart by identity, not address).
    """
    return sum(storage.nbytes() for storage in storages(tensors).values())


def storages(tensors: Iterable[torch.Tensor | None]) -> dict[int, torch.UntypedStorage]:
    """id -> storage of each distinct storage behind `tensors` (None skipped; a DTensor's local part). The
    storages are held in the dict: an id is unique only while its object lives."""
    found = {}
    for t in tensors:
        if t is not None:
            storage = local_tensor(t).untyped_storage()
            found.setdefault(id(storage), storage)
    return found


def param_bytes(model: torch.nn.Module) -> int:
    """All parameters (frozen ones are held in memory too)."""
    return tensor_bytes(model.parameters())


def grad_bytes(trainable: Iterable[torch.nn.Parameter]) -> int:
    """Gradients of the trainable parameters: autograd gives each a gradient of its own shape and dtype."""
    return sum(p.numel() * p.element_size() for p in trainable)  # FSDP: stbench.fsdp counts the shards


def optimizer_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Every tensor in the optimizer state (AdamW: exp_avg, exp_avg_sq, step), counted after a step."""
    return tensor_bytes(v for state in optimizer.state.values() for v in state.values()
                        if isinstance(v, torch.Tensor))


def reset_peaks(device: str | torch.device) -> None:
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def allocator_peaks(device: str | torch.device) -> tuple[int | None, int | None]:
    """(peak allocated, peak reserved) bytes since the last reset; (None, None) off CUDA."""
    device = torch.device(device)
    if device.type != "cuda":
        return None, None
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device), torch.cuda.max_memory_reserved(device)


_frozen = False


def freeze_imports() -> None:
    """Once per process, after the imports: move the objects they made (torch and stbench alone: ~400k) to the
    garbage collector's permanent generation. They live as long as the process, and release_memory's
    gc.collect() after every case would otherwise rescan them each time (0.2 s a collection on 2 CPU cores)."""
    global _frozen
    if not _frozen:
        _frozen = True
        gc.freeze()


@contextlib.contextmanager
def collector_paused():
    """Within: no automatic garbage collection, for phases that make many objects and almost no cyclic garbage
    (imports; a fake step, whose objects mostly live until it ends). In a wan 1.3b prediction the collector's full
    passes (7, each over every object not frozen) took 0.46 s of a 5.5 s command and freed 673 objects."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def collect_and_freeze() -> None:
    """Collect, then move every object that exists now to the garbage collector's permanent generation (a frozen
    cycle is never collected): later collections scan only what is made from now on."""
    gc.collect()
    gc.freeze()


def release_memory() -> None:
    """Give cached blocks back after a case (and after an OOM) so the next case starts clean."""
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
