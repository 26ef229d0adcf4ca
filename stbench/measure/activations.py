"""Exact, device-independent bytes saved for backward, counted with saved_tensors_hooks."""
from __future__ import annotations

import contextlib

import torch
from torch.autograd.graph import saved_tensors_hooks
from torch.nn.modules import module as module_hooks

from .memory import local_tensor, storages


class SavedTensorCounter(contextlib.AbstractContextManager):
    """Counts tensors autograd saves for backward inside the block, by storage (a shared storage counts once)."""

    # `region_bytes` splits the total by the innermost `region(name)` open at save time, so a model can be
    # asked how much its spatial or temporal layers saved. Parameters are excluded (`exclude_parameters`):
    # they are held anyway, so saving them costs no activation memory. That includes parameters a wrapper swaps
    # in for the forward: FSDP2 gathers each unit's weights into storages of its own, frees them after the
    # forward and gathers them again in backward, so what layers save of them holds no memory in between.
    # Those are seen by module hooks while the block runs (a module's own parameters before and after its
    # forward), which is why the totals are made when the block ends.

    def __init__(self, keep: bool = False):
        self.total_bytes = 0
        self.count = 0
        self.region_bytes: dict[str, int] = {}
        self.keep = keep  # keep the counted storages in `kept` after the block (predict labels them)
        self.kept: list = []
        self._saved: dict[int, tuple] = {}  # id(storage) -> (storage, its bytes and region at its first save)
        self._excluded: dict[int, torch.UntypedStorage] = {}  # the storages of parameters
        self._watch = False
        self._regions: list[str] = []
        self._hooks = None
        self._handles: list = []

    def exclude_parameters(self, module: torch.nn.Module) -> "SavedTensorCounter":
        self._exclude(module.parameters())
        self._watch = True
        return self

    def _exclude(self, tensors) -> None:
        self._excluded.update(storages(tensors))

    def _exclude_module(self, module, *_) -> None:
        self._exclude(module._parameters.values())

    @contextlib.contextmanager
    def region(self, name: str):
        self._regions.append(name)
        try:
            yield
        finally:
            self._regions.pop()

    def _pack(self, t: torch.Tensor):
        storage = local_tensor(t).untyped_storage()  # a DTensor (FSDP, context parallelism): its local part
        if id(storage) not in self._saved:
            self._saved[id(storage)] = (storage, storage.nbytes(), self._regions[-1] if self._regions else "other")
        # Not `t` itself: a saved output would then hold its own grad_fn, a cycle through autograd's C++ graph
        # that no collector frees, and with it every parameter's AccumulateGrad (a model per counted forward;
        # torch.autograd.graph.saved_tensors_hooks: "use lambda x: x.detach() instead of lambda x: x").
        return t.detach()

    def __enter__(self):
        if self._watch:
            self._handles = [module_hooks.register_module_forward_pre_hook(self._exclude_module),
                             module_hooks.register_module_forward_hook(self._exclude_module)]
        self._hooks = saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)
        for handle in self._handles:
            handle.remove()
        for key, (storage, nbytes, region) in self._saved.items():
            if key not in self._excluded:
                if self.keep:
                    self.kept.append(storage)
                self.total_bytes += nbytes
                self.count += 1
                self.region_bytes[region] = self.region_bytes.get(region, 0) + nbytes
        self._saved, self._excluded, self._handles = {}, {}, []  # no other storage is kept alive past the block
        return False


def saved_activation_bytes(model: torch.nn.Module, compute_loss) -> int:
    """Bytes saved for backward by one forward pass `compute_loss()`; the graph is freed afterwards."""
    with SavedTensorCounter().exclude_parameters(model) as counter:
        loss = compute_loss()
    del loss
    return counter.total_bytes
