"""The real training step (forward, loss, backward, AdamW step) on fake tensors, with every allocation traced.

The model is built on the meta device and its parameters re-made as fake CPU tensors: no memory is used and
any size runs. Fake CUDA tensors cannot be made on a CPU-only torch (and their backward aborts the process),
so the step runs on fake CPU tensors under CPU autocast; scaled_dot_product_attention then dispatches to the
CPU flash kernel, which saves what the CUDA flash / memory-efficient kernels save (q, k, v, out, logsumexp).

Two steps run: the first creates the optimizer state, the second is the steady state that `run` measures.
"""
from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass, field

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.autograd.graph import saved_tensors_hooks
from torch.utils._python_dispatch import TorchDispatchMode

from ..config import TORCH_DTYPES, Case
from . import sparse
from .roofline import OpCost, launches_kernel, op_cost

PARAMS, GRADS, OPTIMIZER, ACTIVATIONS = "params", "grads", "optimizer", "activations"


@dataclass
class StepTrace:
    """Allocations (in order) and kernels of a fake training step, with the exact byte counts of `run`."""

    events: list = field(default_factory=list)  # (+1 | -1, storage key, bytes)
    measure_from: int = 0  # first event of the steady-state step
    ops: list[OpCost] = field(default_factory=list)  # kernels of the steady-state step
    sizes: dict = field(default_factory=dict)  # storage key -> bytes
    categories: dict = field(default_factory=dict)  # storage key -> params | grads | optimizer | activations
    params_total: int = 0
    params_trainable: int = 0
    param_bytes: int = 0
    grad_bytes: int = 0
    optimizer_bytes: int = 0
    saved_activations: int = 0
    warnings: list = field(default_factory=list)

    def live_at(self, index: int) -> dict:
        """Storage key -> bytes of the storages alive just after event `index`."""
        live = {}
        for sign, key, nbytes in self.events[: index + 1]:
            if sign > 0:
                live[key] = nbytes
            else:
                live.pop(key, None)
        return live


class _Tracker(TorchDispatchMode):
    """Sees every op: new output storages are allocations, a storage's garbage collection is its free."""

    def __init__(self, trace: StepTrace):
        super().__init__()
        self.trace = trace
        self.keys: dict[int, int] = {}  # id(storage) -> key, while the storage lives
        self.next_key = 0
        self.record_ops = False

    def track(self, tensor: torch.Tensor) -> int:
        storage = tensor.untyped_storage()
        key = self.keys.get(id(storage))
        if key is None:
            key = self.next_key
            self.next_key += 1
            self.keys[id(storage)] = key
            nbytes = storage.nbytes()
            self.trace.sizes[key] = nbytes
            self.trace.events.append((1, key, nbytes))
            weakref.finalize(storage, self._freed, id(storage), key)
        return key

    def _freed(self, storage_id: int, key: int) -> None:
        if self.keys.get(storage_id) == key:
            del self.keys[storage_id]
        self.trace.events.append((-1, key, self.trace.sizes[key]))

    def key_of(self, tensor: torch.Tensor) -> int | None:
        return self.keys.get(id(tensor.untyped_storage()))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.track(t)
        if self.record_ops and launches_kernel(func):
            self.trace.ops.append(op_cost(func, args, kwargs, out))
        return out


def _fake_parameters(model: torch.nn.Module) -> None:
    """Re-make meta parameters and buffers as fake CPU tensors (call inside FakeTensorMode); ties are kept."""
    made: dict[int, torch.Tensor] = {}
    for module in model.modules():
        for table, is_param in ((module._parameters, True), (module._buffers, False)):
            for name, t in list(table.items()):
                if t is None:
                    continue
                if id(t) not in made:
                    fresh = torch.empty(t.shape, dtype=t.dtype, device="cpu")
                    made[id(t)] = torch.nn.Parameter(fresh, requires_grad=t.requires_grad) if is_param else fresh
                table[name] = made[id(t)]


def _storage_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        storage = t.untyped_storage()
        if id(storage) not in seen:
            seen.add(id(storage))
            total += storage.nbytes()
    return total


def trace_step(case: Case, *, foreach: bool = True, steps: int = 2) -> StepTrace:
    """Run `steps` fake training steps of `case`; the last one is traced as the steady state.

    foreach: AdamW's implementation (must be explicit under fake tensors): True as on CUDA, False as on CPU.
    """
    trace = StepTrace()
    model = case.build_model("meta")
    model.set_training_mode(case.mode)
    model.train()
    autocast_dtype = None if case.dtype == "fp32" else TORCH_DTYPES[case.dtype]
    autocast = (lambda: torch.autocast("cpu", dtype=autocast_dtype)) if autocast_dtype else contextlib.nullcontext
    with FakeTensorMode(allow_non_fake_inputs=True), _Tracker(trace) as tracker, \
            sparse.fake_friendly(model, trace) as adapters:
        _fake_parameters(model)
        for t in (*model.parameters(), *model.buffers()):
            trace.categories[tracker.track(t)] = PARAMS
        trainable = model.trainable_parameters()
        if not trainable:
            raise ValueError(f"{case.arch} has no trainable parameters in mode {case.mode!r}")
        optimizer = torch.optim.AdamW(trainable, lr=1e-4, foreach=foreach)
        batch = model.make_batch(case.batch, case.frames, case.resolution, case.resolution, device="cpu")
        for t in (batch.latents, batch.noise, batch.timesteps, batch.text):
            trace.categories[tracker.track(t)] = ACTIVATIONS
        param_keys = {tracker.key_of(p) for p in model.parameters()}
        for step in range(steps):
            last = step == steps - 1
            adapters.begin_step(last)
            saved: dict[int, int] = {}

            def pack(t):
                key = tracker.track(t)
                if key not in param_keys:
                    saved[key] = t.untyped_storage().nbytes()
                return t

            if last:
                trace.measure_from = len(trace.events)
                tracker.record_ops = True
            with saved_tensors_hooks(pack, lambda t: t):
                with autocast():
                    loss = model.loss(batch)
            loss.backward()
            del loss
            if last:
                trace.saved_activations = sum(saved.values())
                for key in saved:
                    trace.categories.setdefault(key, ACTIVATIONS)
                for p in trainable:
                    trace.categories[tracker.track(p.grad)] = GRADS
            optimizer.step()
            if last:
                state = [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
                for t in state:
                    trace.categories[tracker.track(t)] = OPTIMIZER
                trace.optimizer_bytes = _storage_bytes(state)
            optimizer.zero_grad(set_to_none=True)
        tracker.record_ops = False
        trace.params_total = sum(p.numel() for p in model.parameters())
        trace.params_trainable = sum(p.numel() for p in trainable)
        trace.param_bytes = _storage_bytes(model.parameters())
        trace.grad_bytes = sum(p.numel() * p.element_size() for p in trainable)
        trace.warnings.extend(adapters.warnings)
        del optimizer, batch, model
    return trace
