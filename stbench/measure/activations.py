"""Exact, device-independent bytes saved for backward, counted with saved_tensors_hooks."""
from __future__ import annotations

import contextlib

import torch
from torch.autograd.graph import saved_tensors_hooks

from .memory import local_tensor


def _storage_key(t: torch.Tensor):
    t = local_tensor(t)  # a DTensor parameter (FSDP): its local shard
    storage = t.untyped_storage()
    return (t.device.type, t.device.index, storage.data_ptr() if t.device.type != "meta" else id(storage))


class SavedTensorCounter(contextlib.AbstractContextManager):
    """Counts tensors autograd saves for backward inside the block, by storage (a shared storage counts once)."""

    # `region_bytes` splits the total by the innermost `region(name)` open at save time, so a model can be
    # asked how much its spatial or temporal layers saved. Parameters are excluded (`exclude_parameters`):
    # they are held anyway, so saving them costs no activation memory.

    def __init__(self):
        self.total_bytes = 0
        self.count = 0
        self.region_bytes: dict[str, int] = {}
        self._seen: set = set()
        self._param_keys: set = set()
        self._regions: list[str] = []
        self._hooks = None

    def exclude_parameters(self, module: torch.nn.Module) -> "SavedTensorCounter":
        self._param_keys |= {_storage_key(p) for p in module.parameters()}
        return self

    @contextlib.contextmanager
    def region(self, name: str):
        self._regions.append(name)
        try:
            yield
        finally:
            self._regions.pop()

    def _pack(self, t: torch.Tensor):
        key = _storage_key(t)
        if key not in self._seen and key not in self._param_keys:
            self._seen.add(key)
            nbytes = t.untyped_storage().nbytes()
            self.total_bytes += nbytes
            self.count += 1
            region = self._regions[-1] if self._regions else "other"
            self.region_bytes[region] = self.region_bytes.get(region, 0) + nbytes
        return t

    def __enter__(self):
        self._hooks = saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)
        return False


def saved_activation_bytes(model: torch.nn.Module, compute_loss) -> int:
    """Bytes saved for backward by one forward pass `compute_loss()`; the graph is freed afterwards."""
    with SavedTensorCounter().exclude_parameters(model) as counter:
        loss = compute_loss()
    del loss
    return counter.total_bytes
