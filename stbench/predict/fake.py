"""The real training step (forward, loss, backward, AdamW step) on fake tensors, with every allocation traced.

The model is built on the meta device and its parameters re-made as fake CPU tensors: no memory is used and
any size runs. Fake CUDA tensors cannot be made on a CPU-only torch (and their backward aborts the process),
so the step runs on fake CPU tensors under CPU autocast; scaled_dot_product_attention then dispatches to the
CPU flash kernel, which saves what the CUDA flash / memory-efficient kernels save (q, k, v, out, logsumexp).

Two steps run: the first creates the optimizer state, the second is the steady state that `run` measures.
With `world` > 1 the case's FSDP (x context-parallel) layout is traced as one rank of a fake world (`sharded`).
"""
from __future__ import annotations

import contextlib
import warnings
import weakref
from dataclasses import dataclass, field

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from ..config import TORCH_DTYPES, Case
from ..errors import UserError
from ..measure import activations, memory
from ..measure.memory import local_tensor
from ..parallel import fsdp as fsdp_lib
from ..parallel import ring
from .. import regimes
from . import blocks, sharded, sparse
from .roofline import OpCost, launches_kernel, op_cost

PARAMS, GRADS, OPTIMIZER, ACTIVATIONS = "params", "grads", "optimizer", "activations"


@dataclass
class StepTrace:
    """Allocations (in order) and kernels of a fake training step, with the exact byte counts of `run`."""

    events: list = field(default_factory=list)  # (+1 | -1, storage key, bytes)
    measure_from: int = 0  # first event of the steady-state step
    step_end: int = 0  # events up to the end of the steady-state step (after zero_grad): what stays allocated
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
    world: int = 1
    layout: object = None  # the FSDPLayout traced (one of its ranks), None for one process
    comm: dict = field(default_factory=dict)  # (kind, group ranks) -> [bytes this rank sends, calls], last step
    # (as CollectiveCounter.by_group counts them in `run`)
    reuse: dict = field(default_factory=dict)  # list name -> [blocks, blocks traced] (blocks.splice); {}: whole
    refused: str | None = None  # why repeated blocks were not traced once (the model was traced whole)

    def live_at(self, index: int) -> dict:
        """Storage key -> bytes of the storages alive just after event `index`."""
        live = {}
        for sign, key, nbytes in self.events[: index + 1]:
            if sign > 0:
                live[key] = nbytes
            else:
                live.pop(key, None)
        return live


_CONTEXT = object()  # an event's block: the one whose context is open (blocks.Owners.current)


class _Tracker(TorchDispatchMode):
    """Sees every op: new output storages are allocations, a storage's garbage collection is its free; with
    `owners` (blocks.Owners), each event, kernel and collective is tagged with its block."""

    def __init__(self, trace: StepTrace, owners: blocks.Owners | None = None):
        super().__init__()
        self.trace = trace
        self.owners = owners
        self.keys: dict[int, int] = {}  # id(storage) -> key, while the storage lives
        self.next_key = 0
        self.record_ops = False
        self.comm: dict = {}  # block (None outside blocks) -> {(kind, group ranks): [bytes sent, calls]}
        self.stopped = False
        self.watched: set[int] = set()  # ids of storages with a finalizer

    def _allocate(self, storage, nbytes: int, owner=_CONTEXT) -> int:
        key = self.next_key
        self.next_key += 1
        self.keys[id(storage)] = key
        self.trace.sizes[key] = nbytes
        self.trace.events.append((1, key, nbytes))
        if self.owners is not None:
            self.owners.allocated(key, self.owners.current(self.key_of) if owner is _CONTEXT else owner)
        if id(storage) not in self.watched:
            self.watched.add(id(storage))
            weakref.finalize(storage, self._collected, id(storage))
        return key

    def track(self, tensor: torch.Tensor, owner=_CONTEXT) -> int:
        storage = local_tensor(tensor).untyped_storage()
        key = self.keys.get(id(storage))
        return self._allocate(storage, storage.nbytes(), owner) if key is None else key

    def _freed(self, storage_id: int) -> None:
        key = self.keys.pop(storage_id, None)
        if key is not None:
            self.trace.events.append((-1, key, self.trace.sizes[key]))
            if self.owners is not None:
                self.owners.freed(key, self.key_of)

    def resized(self, storage, old: int, new: int) -> None:
        """A storage resized in place (FSDP2 frees and re-allocates gathered parameters so): a free of the
        old bytes, then an allocation of the new ones under a new key."""
        if old == new or self.stopped:
            return
        self._freed(id(storage))
        if new:
            self._allocate(storage, new)

    def _collected(self, storage_id: int) -> None:
        self.watched.discard(storage_id)
        self._freed(storage_id)

    def key_of(self, tensor: torch.Tensor) -> int | None:
        return self.keys.get(id(local_tensor(tensor).untyped_storage()))

    def stop(self) -> None:
        """Record nothing more: the trace ends with the steady-state step (later frees change no figure)."""
        self.stopped = True
        self.keys.clear()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.stopped:
            return out
        owners = self.owners
        shares = None
        if owners is not None and owners.sweep:  # a tensor of the optimizer step belongs to its parameter's block
            shares = self._sweep_outputs(func, args, kwargs, out)
        else:
            self._track_all(out)
        if self.record_ops and func.namespace == "c10d":  # what each collective sends, as `run` counts it
            sent = fsdp_lib.sent_bytes(str(func), args)
            if sent is not None:
                kind, nbytes, ranks = sent
                block = owners.current(self.key_of) if owners is not None else None
                fsdp_lib.add_sent(self.comm.setdefault(block, {}), (kind, ranks), int(nbytes))
        # communication (c10d) is timed on the links from those bytes, not as a kernel
        if self.record_ops and launches_kernel(func) and func.namespace != "c10d":
            # a rank computes on its shards: costs from the local tensors (DTensor sizes are global)
            local_args, local_kwargs, local_out = torch.utils._pytree.tree_map(local_tensor, (args, kwargs, out))
            if shares is not None:
                owners.op_shares[len(self.trace.ops)] = blocks.foreach_shares(
                    shares, local_args, local_kwargs, local_out)
            self.trace.ops.append(op_cost(func, local_args, local_kwargs, local_out))
        return out

    def _sweep_outputs(self, func, args, kwargs, out):
        """Track an optimizer-step op's outputs, each with the block of its input; for a foreach op, returns
        the block of each list position (its kernel's bytes are shared among them)."""
        owners = self.owners
        lists = [a for a in (*args, *kwargs.values()) if isinstance(a, (list, tuple)) and a
                 and all(isinstance(t, torch.Tensor) for t in a)]
        if lists and func.__name__.startswith("_foreach_"):
            per_index = [owners.key_owner.get(self.key_of(t)) for t in lists[0]]
            owners.hint = None  # the kernel spans blocks: its bytes are split by `shares`
            outs = out if isinstance(out, (list, tuple)) and len(out) == len(per_index) else ()
            for t, owner in zip(outs, per_index):
                if isinstance(t, torch.Tensor):
                    self.track(t, owner)
            return per_index
        owners.sweep_input([self.key_of(t) for t in torch.utils._pytree.tree_leaves((args, kwargs))
                            if isinstance(t, torch.Tensor)])
        self._track_all(out)
        return None

    def _track_all(self, out) -> None:
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.track(t)


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


class _SavedCounter(activations.SavedTensorCounter):
    """The saved-activation counter of `run`, whose saved storages the tracker also sees when they are saved
    (with blocks: each storage's block at its first save)."""

    def __init__(self, tracker: _Tracker):
        super().__init__(keep=True)
        self.tracker = tracker
        self.first_owner: dict[int, object] = {}  # id(storage) -> block (ids stay unique: `kept` holds them)

    def _pack(self, t):
        self.tracker.track(t)
        if self.tracker.owners is not None:
            self.first_owner.setdefault(id(local_tensor(t).untyped_storage()),
                                        self.tracker.owners.current(self.tracker.key_of))
        return super()._pack(t)

    def saved_by_block(self) -> dict:
        """Block -> bytes of the counted storages (after the counter closed)."""
        by_block: dict = {}
        for storage in self.kept:
            owner = self.first_owner.get(id(storage))
            by_block[owner] = by_block.get(owner, 0) + storage.nbytes()
        return by_block


def trace_step(case: Case, *, foreach: bool = True, steps: int = 2, world: int = 1,
               exact: bool = False) -> StepTrace:
    """Run `steps` fake training steps of `case`; the last one is traced as the steady state.

    foreach: True as on CUDA (AdamW foreach, ring chunks on CUDA's kernels), False as on CPU (AdamW's per-parameter
    loop); AdamW's implementation must be explicit under fake tensors.
    world: with `case.fsdp`, the ranks of the layout, of which rank 0 is traced (see `sharded`).
    exact: trace every block; otherwise repeated blocks are traced once and spliced in (`blocks`), falling
    back to the whole model where they do not repeat (`reuse` says which happened).
    """
    with memory.collector_paused(), warnings.catch_warnings():  # frees are refcounts': a collection only scans
        # rms_norm under autocast (bf16 input, fp32 weight) takes torch's unfused composite path on CUDA as on
        # the CPU, warning once that it does; the trace already counts that path's kernels one by one
        warnings.filterwarnings("ignore", message="Mismatch dtype between input and weight")
        with ring.chunks_as_on("cuda" if foreach else "cpu"):  # ring chunks take the target's kernels
            return _traced(case, foreach, steps, world, exact)


def _traced(case: Case, foreach: bool, steps: int, world: int, exact: bool) -> StepTrace:
    if exact:
        return _in_world(case, foreach, steps, world, reuse=False)
    if ":" in case.arch:  # a user's model may treat its blocks by position, which no trace of five would show
        trace = _in_world(case, foreach, steps, world, reuse=False)
        trace.refused = "a user model is traced whole"
        return trace
    try:
        return _in_world(case, foreach, steps, world, reuse=True)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - blocks that do not repeat, or a model that fails once cut
        trace = _in_world(case, foreach, steps, world, reuse=False)
        reason = str(e) if isinstance(e, blocks.Unrepeated) else f"the cut model failed ({type(e).__name__}: {e})"
        trace.refused = reason.splitlines()[0][:300] if reason else type(e).__name__
        return trace


def _in_world(case: Case, foreach: bool, steps: int, world: int, reuse: bool) -> StepTrace:
    if case.fsdp is None:
        return _trace(case, foreach, steps, StepTrace(), reuse)
    with sharded.fake_world(world):
        return _trace(case, foreach, steps, StepTrace(world=world), reuse)


def _trace(case: Case, foreach: bool, steps: int, trace: StepTrace, reuse: bool) -> StepTrace:
    model = case.build_model("meta")
    cut = blocks.cut(model) if reuse else None  # before anything attaches to the blocks
    owners = blocks.Owners(cut) if cut is not None else None
    model.set_training_mode(case.mode)
    model.train()
    regimes.apply_regimes(model, case)  # LoRA, bf16 parameters, checkpointing on one process: as `run` does
    encoders = None
    if case.encoders == "resident":
        with torch.device("meta"):
            encoders = regimes.resident_encoders(model)
    if case.fsdp is not None:
        trace.layout = sharded.shard(model, case, trace.world)
    tracker = _Tracker(trace, owners)
    if owners is not None:
        owners.comm = tracker.comm
    sweep = owners.sweeping if owners is not None else None
    backward = owners.backward if owners is not None else contextlib.nullcontext
    if owners is not None:
        trace.ops = blocks.OwnedOps(owners, tracker.key_of)  # DSV's adapters append kernels too
        owners.watch()  # after FSDP's and checkpointing's hooks, so that the block's context holds theirs
    with FakeTensorMode(allow_non_fake_inputs=True), tracker, \
            sparse.fake_friendly(model, trace, sweep) as adapters, \
            sharded.storage_resizes(tracker.resized):
        if trace.layout is None:
            _fake_parameters(model)
        else:  # FSDP's shards (DTensors) are made by FSDP's own init path; ties do not survive sharding anyway
            model.to_empty(device="cpu")
        if encoders is not None:
            _fake_parameters(encoders)
        held = [*model.parameters(), *model.buffers()]
        if encoders is not None:
            held += [*encoders.parameters(), *encoders.buffers()]
        for t in held:
            trace.categories[tracker.track(t)] = PARAMS
        if owners is not None:
            owners.claim_parameters(tracker.key_of)
        trainable = model.trainable_parameters()
        if not trainable:
            raise ValueError(f"{case.arch} has no trainable parameters in mode {case.mode!r}")
        # DTensor shards: AdamW steps the local shards, the same elementwise work and memory as stepping the
        # DTensors, without DTensor's sharding propagation over every foreach op (minutes for a 14B model)
        stepped = trainable if trace.layout is None else [torch.nn.Parameter(local_tensor(p)) for p in trainable]
        if case.optimizer == "adamw8bit":  # bitsandbytes' kernels do not run on fake tensors: its state, exactly
            optimizer = regimes.AdamW8bitState(stepped)
            trace.warnings.append("adamw8bit: bitsandbytes' state allocated at its exact layout (stbench.regimes); "
                                  "its update kernels are not traced, so the optimizer's time is left out")
        else:
            optimizer = regimes.make_optimizer(case, stepped, lr=1e-4, foreach=foreach)
        batch = model.make_batch(case.batch, case.frames, *case.frame_hw, device="cpu", dtype=regimes.input_dtype(case))
        for t in (batch.latents, batch.noise, batch.timesteps, batch.text):
            trace.categories[tracker.track(t)] = ACTIVATIONS
        for step in range(steps):
            last = step == steps - 1
            adapters.begin_step(last)
            if last:
                trace.measure_from = len(trace.events)
                tracker.record_ops = True
            if encoders is not None:  # as run's step: the batch encoded on the fly, without gradients
                regimes.encode_on_the_fly(encoders, model, batch)
            # run's own count of saved activations (parameters, FSDP's gathered ones too, left out)
            # (their exits free storages of every block: the counter's hold, autocast's cast weights)
            with _exiting(_SavedCounter(tracker).exclude_parameters(model), sweep) as saved, \
                    _exiting(_autocast_for(case), sweep):
                loss = model.loss(batch)
            saved_keys = [tracker.keys[id(storage)] for storage in saved.kept]
            if last and owners is not None:
                owners.saved = saved.saved_by_block()
            with _within(sweep):  # storages only the counter held (saved by ops off the loss's graph) die here
                saved.kept.clear()  # before backward: a held storage would outlive its graph and raise the peak
            with backward():
                loss.backward()
                del loss
            if last:
                trace.saved_activations = saved.total_bytes
                for key in saved_keys:
                    trace.categories.setdefault(key, ACTIVATIONS)
                for p in trainable:
                    trace.categories[tracker.track(p.grad)] = GRADS
            if stepped is not trainable:
                for shard, p in zip(stepped, trainable):
                    shard.grad = local_tensor(p.grad) if p.grad is not None else None
            with _within(sweep):
                optimizer.step()
            if last:
                trace.comm = _summed(tracker.comm.values())
                state = [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
                for t in state:
                    trace.categories[tracker.track(t)] = OPTIMIZER
                trace.optimizer_bytes = memory.tensor_bytes(state)
            with _within(sweep):
                optimizer.zero_grad(set_to_none=True)
                for p in trainable:
                    p.grad = None
        trace.step_end = len(trace.events)
        tracker.record_ops = False
        totals = None
        if owners is not None:
            totals = owners.totals(trainable, optimizer.state, dict(zip(map(id, trainable), stepped)),
                                   lambda ps: _grad_bytes(ps, trace.layout is not None))
            owners.unwatch()
        tracker.stop()
        trace.params_total = sum(p.numel() for p in model.parameters())
        trace.params_trainable = sum(p.numel() for p in trainable)
        trace.param_bytes = memory.tensor_bytes(model.parameters()) + (
            memory.tensor_bytes(encoders.parameters()) if encoders is not None else 0)
        # a gradient has its parameter's layout: FSDP's gradient shards are padded like the parameter shards
        trace.grad_bytes = _grad_bytes(trainable, trace.layout is not None)
        trace.warnings.extend(adapters.warnings)
        del optimizer, batch, model, encoders
    if owners is not None:
        trace.reuse = blocks.splice(trace, owners, totals)
    return trace


def _summed(by_group: list) -> dict:
    """{(kind, ranks): [bytes, calls]} dicts added up."""
    total: dict = {}
    for counts in by_group:
        for group, (nbytes, calls) in counts.items():
            fsdp_lib.add_sent(total, group, nbytes, calls)
    return total


def _within(sweep):
    """`sweep()` (blocks.Owners.sweeping) when repeated blocks are tagged, else nothing."""
    return sweep() if sweep is not None else contextlib.nullcontext()


@contextlib.contextmanager
def _exiting(manager, sweep):
    """`manager`, whose exit runs inside `sweep()` (frees there belong to the freed storages' blocks)."""
    value = manager.__enter__()
    try:
        yield value
    except BaseException as e:
        with _within(sweep):
            if not manager.__exit__(type(e), e, e.__traceback__):
                raise
    else:
        with _within(sweep):
            manager.__exit__(None, None, None)


def _autocast_for(case: Case):
    """CPU autocast at the case's dtype (none for fp32)."""
    if case.dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast("cpu", dtype=TORCH_DTYPES[case.dtype])


def _grad_bytes(trainable: list, sharded_layout: bool) -> int:
    return (sum(p.numel() * p.element_size() for p in trainable) if not sharded_layout
            else memory.tensor_bytes(trainable))
