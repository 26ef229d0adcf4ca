"""Repeated blocks traced once: a model cut to a few of its identical blocks, its trace spliced to full depth.

A video transformer runs one block 30-60 times at the same shapes, so its fake step repeats that block's
allocations, frees, kernels and collectives. The model is built whole on the meta device; each ModuleList whose
inner members are alike (same module classes, parameter and buffer shapes, plain attributes; no tied tensor) keeps
its first member, three inner ones and its last (`cut`). The trace of that model tags every event, kernel,
collective and saved tensor with the block it belongs to (`Owners`): in forward, the block whose module hooks are
open; in backward, the block whose forward made the autograd node running (by node sequence numbers); in the
optimizer step and zero_grad, the block of the parameter a tensor belongs to. Where the three inner blocks are
shown to repeat (`splice` checks that the middle one relates to its successor as its predecessor relates to it, and
to its predecessor as its successor does: the same runs of events, sizes, kernels, collectives and saved bytes),
the middle block's events are copied in for the removed blocks with fresh storage keys, in the order the whole
model runs them (forward and parameter order; backward and list frees in reverse), each copy freeing its own and
its neighbours' storages as the middle block does. The first and last blocks, embeddings, heads and everything
outside the lists are traced as they run. Where the blocks do not repeat, `Unrepeated` says why and the whole model
is traced instead (as `predict --exact` always does).
"""
from __future__ import annotations

import bisect
import contextlib
from collections import defaultdict
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from ..measure.memory import storages, tensor_bytes
from ..parallel.fsdp import add_sent

HEAD, INNER, TAIL = 1, 3, 1
KEPT = HEAD + INNER + TAIL
TEMPLATE = HEAD + 1  # the inner block copied; its neighbours HEAD and HEAD + 2 are inner blocks too
ACCUMULATE_GRAD = 2**64 - 1  # the sequence number autograd gives AccumulateGrad nodes


class Unrepeated(Exception):
    """The kept inner blocks do not repeat: the model must be traced whole."""


@dataclass(frozen=True)
class Cut:
    """The ModuleLists cut to KEPT members: their names and full lengths, and each kept member's owner."""

    lists: tuple[tuple[str, int], ...]  # (qualified name, members in the whole model)
    members: tuple[tuple[nn.Module, tuple[int, int]], ...]  # (member, owner (list length, kept position))

    @property
    def copies(self) -> dict[int, int]:
        """List length (the owners' group) -> blocks to splice in for the removed members."""
        return {n: n - KEPT for _, n in self.lists}


_PLAIN = (bool, int, float, str, type(None), tuple)


def _signature(module: nn.Module) -> tuple:
    """What makes two blocks alike: their module classes, parameter and buffer shapes, and every plain
    attribute of their modules (a block told its index or that it is special differs)."""
    return (tuple((name, type(m)) for name, m in module.named_modules()),
            tuple((name, tuple(p.shape), p.dtype, p.requires_grad) for name, p in module.named_parameters()),
            tuple((name, tuple(b.shape), b.dtype) for name, b in module.named_buffers()),
            tuple((name, key, value) for name, m in module.named_modules() for key, value in sorted(vars(m).items())
                  if not key.startswith("_") and key != "training" and isinstance(value, _PLAIN)))


def _held_once(modules: list[nn.Module], model: nn.Module) -> bool:
    """No parameter or buffer of `modules` is held twice in `model` (a tied weight would be counted, and its
    storage claimed, once per copy)."""
    held = [id(t) for _, t in (*model.named_parameters(remove_duplicate=False),
                               *model.named_buffers(remove_duplicate=False))]
    twice = {i for i in held if held.count(i) > 1} if len(held) != len(set(held)) else set()
    return not any(id(t) in twice for m in modules for t in (*m.parameters(), *m.buffers()))


def repeated_lists(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """The outermost ModuleLists longer than KEPT whose inner members (all but first and last) are alike and
    hold no tensor another module holds too."""
    found = []

    def visit(module: nn.Module, prefix: str) -> None:
        for name, child in module.named_children():
            path = prefix + name
            if isinstance(child, nn.ModuleList) and len(child) > KEPT and \
                    len({_signature(m) for m in list(child)[HEAD:-TAIL]}) == 1 and _held_once(list(child), model):
                found.append((path, child))
            else:
                visit(child, path + ".")

    visit(model, "")
    return found


def cut(model: nn.Module) -> Cut | None:
    """Cut `model`'s repeated lists in place to their first, three inner and last members; None if none.

    Lists of the same length share owners by position, so lists a model runs in step (Latte's spatial and
    temporal blocks) are spliced as pairs."""
    lists = repeated_lists(model)
    if not lists:
        return None
    names, members = [], []
    for name, modules in lists:
        n = len(modules)
        del modules[HEAD + INNER:n - TAIL]
        names.append((name, n))
        members.extend((m, (n, position)) for position, m in enumerate(modules))
    return Cut(tuple(names), tuple(members))


@dataclass
class Owners:
    """Which kept block each event, kernel, collective and saved storage of a fake step belongs to."""

    cut: Cut
    event_owner: list = field(default_factory=list)  # parallel to StepTrace.events; None: no block
    op_owner: list = field(default_factory=list)  # parallel to StepTrace.ops
    op_shares: dict = field(default_factory=dict)  # op index -> {owner: bytes} of a foreach op over many blocks
    key_owner: dict = field(default_factory=dict)  # storage key -> owner of the event that allocated it
    comm: dict = field(default_factory=dict)  # owner -> {(kind, ranks): [bytes, calls]} (the tracker's count)
    saved: dict = field(default_factory=lambda: defaultdict(int))  # owner -> saved activation bytes
    alloc_event: dict = field(default_factory=dict)  # storage key -> index of its allocation event
    swept: set = field(default_factory=set)  # frees in a sweep: batches whose order no figure depends on
    sweep: bool = False  # optimizer step / zero_grad: a tensor belongs to its parameter's block
    in_backward: bool = False
    hint: object = None  # in a sweep, the block of the op's inputs
    last: object = None  # the block of the last backward node: frees between nodes belong to it
    exited: object = None  # in forward, the block that last returned, whose events continue until the next
    # block starts (the loop dropping the previous block's output, a model's head after the last block)
    _stack: list = field(default_factory=list)
    _starts: list = field(default_factory=list)  # forward intervals of node sequence numbers, sorted
    _intervals: list = field(default_factory=list)  # [start, end, owner]; the last one's end None while open
    _handles: list = field(default_factory=list)

    def watch(self) -> None:
        """Open and close each kept member's context around its forward (outside FSDP's and checkpointing's
        own hooks: registered last, the pre-hook prepended)."""
        for module, owner in self.cut.members:
            self._handles.append(module.register_forward_pre_hook(
                lambda *_, o=owner: self._enter(o), prepend=True))
            self._handles.append(module.register_forward_hook(lambda *_: self._exit(), always_call=True))

    def unwatch(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def allocated(self, key: int, owner) -> None:
        self.alloc_event[key] = len(self.event_owner)
        self.event_owner.append(owner)
        self.key_owner[key] = owner

    def claim_parameters(self, key_of) -> None:
        """Give every kept member's parameters and buffers (made fake or sharded outside any block's
        context) to their block."""
        for module, owner in self.cut.members:
            for t in (*module.parameters(), *module.buffers()):
                key = key_of(t)
                if key is not None:
                    self.key_owner[key] = owner
                    self.event_owner[self.alloc_event[key]] = owner

    @contextlib.contextmanager
    def sweeping(self):
        """The optimizer step or zero_grad: tensors belong to their parameters' blocks."""
        self._close(torch._C._autograd._get_sequence_nr())
        self.sweep, self.hint, self.exited = True, None, None
        try:
            yield
        finally:
            self.sweep = False

    @contextlib.contextmanager
    def backward(self):
        self._close(torch._C._autograd._get_sequence_nr())
        self.in_backward, self.last, self.exited = True, None, None
        try:
            yield
        finally:
            self.in_backward = False

    def sweep_input(self, keys) -> None:
        """An op of the sweep reads the storages `keys`: its outputs belong to the first one's block (an op
        reading no tracked storage, such as a new step counter, keeps the block of the op before it)."""
        for key in keys:
            if key in self.key_owner:
                self.hint = self.key_owner[key]
                return

    def totals(self, trainable: list, state: dict, stepped: dict, grad_bytes) -> dict:
        """Owner -> Totals of its members: parameters, trainable ones, their bytes, gradient bytes, and the
        bytes of its parameters' optimizer state (`state`: the optimizer's, keyed by `stepped[id(p)]`; storages
        several parameters share, such as 8-bit AdamW's quantization maps, left to no block)."""
        def tensors(p) -> list:
            return [v for v in state.get(stepped[id(p)], {}).values() if isinstance(v, torch.Tensor)]

        users = defaultdict(int)
        for p in trainable:
            for storage_id in storages(tensors(p)):
                users[storage_id] += 1
        params = defaultdict(list)
        for module, owner in self.cut.members:
            params[owner].extend(module.parameters())
        trains = {id(p) for p in trainable}
        result = {}
        for owner, ps in params.items():
            train = [p for p in ps if id(p) in trains]
            own = [v for p in train for v in tensors(p) if users[next(iter(storages([v])))] == 1]
            result[owner] = Totals(sum(p.numel() for p in ps), sum(p.numel() for p in train), tensor_bytes(ps),
                                   grad_bytes(train), tensor_bytes(own))
        return result

    # Autograd's private sequence numbers and current node (torch._C) tell a backward op's block; the equality
    # tests against --exact are what guard their meaning across torch releases.
    def _enter(self, owner) -> None:
        seq = torch._C._autograd._get_sequence_nr()
        if torch._C._current_autograd_node() is None:
            self._close(seq)
        self._stack.append((owner, seq))

    def _exit(self) -> None:
        owner, start = self._stack.pop()
        if torch._C._current_autograd_node() is None:  # not a recomputation in backward (its nodes never run)
            # the block's nodes, and those made after it until the next block starts (as `exited` in forward)
            self.exited = owner
            self._starts.append(start)
            self._intervals.append([start, None, owner])

    def _close(self, seq: int) -> None:
        if self._intervals and self._intervals[-1][1] is None:
            self._intervals[-1][1] = seq

    def node_owner(self, node, key_of):
        seq = node._sequence_nr()
        if seq == ACCUMULATE_GRAD:
            variable = getattr(node, "variable", None)
            key = key_of(variable) if variable is not None else None
            return self.key_owner.get(key, self.last)
        i = bisect.bisect_right(self._starts, seq) - 1
        if i >= 0 and seq < self._intervals[i][1]:
            return self._intervals[i][2]
        return None

    def current(self, key_of):
        """The block the next allocation or kernel belongs to (in backward, also remembered as `last`)."""
        node = torch._C._current_autograd_node()
        if node is not None:
            self.last = self.node_owner(node, key_of)
            return self.last
        if self._stack:
            return self._stack[-1][0]
        if self.in_backward:
            return self.last
        return self.hint if self.sweep else self.exited

    def freed(self, key: int, key_of) -> None:
        """Tag the free of storage `key` (its event just appended)."""
        if self.sweep and self.hint is None and torch._C._current_autograd_node() is None and not self._stack:
            # a container dropped outside any op (zero_grad, the list of a foreach op's results, autocast's
            # cache) frees each storage as its block's, in an order no figure depends on; inside a
            # per-parameter loop a free belongs where it happens (the previous temporary, dropped among the
            # next parameter's ops)
            self.swept.add(len(self.event_owner))
            self.event_owner.append(self.key_owner.get(key))
        else:
            self.event_owner.append(self.current(key_of))


class OwnedOps(list):
    """StepTrace.ops that tags each kernel appended (also by DSV's adapters) with its block."""

    def __init__(self, owners: Owners, key_of):
        super().__init__()
        self.owners, self.key_of = owners, key_of

    def append(self, op) -> None:
        self.owners.op_owner.append(self.owners.current(self.key_of))
        super().append(op)


def foreach_shares(per_index: list, args, kwargs, out) -> dict:
    """Owner -> bytes a foreach kernel reads and writes at the list positions of that owner's tensors."""
    n = len(per_index)
    seqs = [a for a in (*args, *kwargs.values(), out) if isinstance(a, (list, tuple)) and len(a) == n]
    shares: dict = {}
    for i, owner in enumerate(per_index):
        nbytes = sum(s[i].numel() * s[i].element_size() for s in seqs if isinstance(s[i], torch.Tensor))
        shares[owner] = shares.get(owner, 0) + nbytes
    return shares


def _runs(owners: list) -> list[tuple[int, int, object]]:
    """Maximal runs [start, end) of equal owners."""
    runs, start = [], 0
    for i in range(1, len(owners) + 1):
        if i == len(owners) or owners[i] != owners[start]:
            runs.append((start, i, owners[start]))
            start = i
    return runs


@dataclass(frozen=True)
class Totals:
    """What a trace sums besides its events and kernels, per block (to add for each copy)."""

    params_total: int
    params_trainable: int
    param_bytes: int
    grad_bytes: int
    optimizer_bytes: int


@dataclass(frozen=True)
class _Tagged:
    """A cut model's events by block: their runs, and each block's storages in allocation order."""

    events: list
    runs: list  # (start, end, owner) of the events
    op_runs: list  # (start, end, owner) of the kernels
    allocated: dict  # owner -> its storage keys in allocation order
    position: dict  # storage key -> its place in its owner's allocations

    @classmethod
    def of(cls, events: list, owners: Owners) -> "_Tagged":
        allocated, position = defaultdict(list), {}
        for (sign, key, _), owner in zip(events, owners.event_owner):
            if sign > 0 and owner is not None:
                position[key] = len(allocated[owner])
                allocated[owner].append(key)
        return cls(events, _runs(owners.event_owner), _runs(owners.op_owner), allocated, position)


def splice(trace, owners: Owners, totals: dict) -> dict:
    """Splice the copies of every cut list's middle block into `trace` (a StepTrace of the cut model) in place;
    `totals`: owner -> Totals. Returns {list name: [blocks in the model, blocks traced]}; raises Unrepeated."""
    if len(owners.event_owner) != len(trace.events) or len(owners.op_owner) != len(trace.ops):
        raise Unrepeated("events or kernels without a block tag")
    _in_block_order(trace.events, owners.event_owner, owners, (trace.measure_from, trace.step_end))
    tagged = _Tagged.of(trace.events, owners)
    for group in owners.cut.copies:
        _check(group, tagged, trace, owners, totals)
    _splice_events(trace, tagged, owners)
    _splice_kernels(trace, tagged, owners)
    for group, m in owners.cut.copies.items():
        template = (group, TEMPLATE)
        for collective, (nbytes, calls) in owners.comm.get(template, {}).items():
            add_sent(trace.comm, collective, m * nbytes, m * calls)
        trace.saved_activations += m * owners.saved.get(template, 0)
        t = totals[template]
        trace.params_total += m * t.params_total
        trace.params_trainable += m * t.params_trainable
        trace.param_bytes += m * t.param_bytes
        trace.grad_bytes += m * t.grad_bytes
        trace.optimizer_bytes += m * t.optimizer_bytes
    return {name: [n, KEPT] for name, n in owners.cut.lists}


def _splice_events(trace, tagged: _Tagged, owners: Owners) -> None:
    """Every template run followed (or, in a reverse sweep, preceded) by its copies under fresh keys."""
    copies, key_owner, allocated, position = owners.cut.copies, owners.key_owner, tagged.allocated, tagged.position
    next_key = max(trace.sizes, default=-1) + 1
    fresh = {}  # (group, copy 1..m, place) -> key
    for group, m in copies.items():
        for i in range(1, m + 1):
            for a, key in enumerate(allocated[(group, TEMPLATE)]):
                fresh[(group, i, a)] = next_key
                trace.sizes[next_key] = trace.sizes[key]
                if key in trace.categories:
                    trace.categories[next_key] = trace.categories[key]
                next_key += 1

    def key_at(group: int, copy: int, a: int) -> int:
        """The a-th allocation of the block `copy` places after the template (0: the template itself, -1 its
        predecessor, m + 1 its successor)."""
        if copy in (-1, 0, copies[group] + 1):
            return allocated[(group, TEMPLATE + (copy > 0) - (copy < 0))][a]
        return fresh[(group, copy, a)]

    def mapped(event, owner, copy: int):
        """`event` of the block `owner` (the template or its successor), as the block `copy` places after the
        template runs it: the template's own storages are the copy's, its neighbours' the copy's neighbours';
        the successor frees what the last copy made."""
        sign, key, nbytes = event
        group, kept = owner
        if kept == TEMPLATE:
            held = TEMPLATE if sign > 0 else key_owner[key][1]
            return sign, key_at(group, copy + held - TEMPLATE, position[key]), nbytes
        if sign < 0 and key_owner.get(key) == (group, TEMPLATE):
            return sign, key_at(group, copies[group], position[key]), nbytes
        return event

    events, runs = tagged.events, tagged.runs
    out, new_index = [], {}
    for index, (start, end, owner) in enumerate(runs):
        new_index[start] = len(out)
        group = owner[0] if isinstance(owner, tuple) else None
        if group in copies and owner[1] == TEMPLATE:
            order = range(copies[group] + 1)
            for copy in (reversed(order) if _reversed(runs, index, group) else order):
                out.extend(mapped(e, owner, copy) for e in events[start:end])
        elif group in copies and owner[1] == TEMPLATE + 1:
            out.extend(mapped(e, owner, 0) for e in events[start:end])
        else:
            out.extend(events[start:end])
    new_index[len(events)] = len(out)
    trace.measure_from = _moved(trace.measure_from, new_index, runs)
    trace.step_end = _moved(trace.step_end, new_index, runs)
    trace.events = out


def _splice_kernels(trace, tagged: _Tagged, owners: Owners) -> None:
    """The template's kernels once more per copy; a foreach kernel over every block grows by the template's
    share of its bytes per copy."""
    copies = owners.cut.copies
    ops = []
    for start, end, owner in tagged.op_runs:
        repeat = 1 + (copies.get(owner[0], 0) if isinstance(owner, tuple) and owner[1] == TEMPLATE else 0)
        ops.extend(trace.ops[start:end] * repeat)
    for index, shares in owners.op_shares.items():
        extra = sum(m * shares.get((group, TEMPLATE), 0) for group, m in copies.items())
        if extra:
            spot = _spliced_op_index(index, tagged.op_runs, copies)
            ops[spot] = replace(ops[spot], bytes=ops[spot].bytes + extra)
    trace.ops = ops


def _in_block_order(events: list, event_owner: list, owners: Owners, boundaries) -> None:
    """Put frees that follow one another in a canonical order, in place: a batch of swept frees (a container's
    teardown: autocast's cache, a list of optimizer temporaries, in hash or reverse order) in block order, and
    any other run of frees within one block's events (autocast's cache after a checkpointed block is
    recomputed) by the block that allocated each storage. Frees with no allocation between them leave the
    caching allocator (and the host heap) in the same state in any order, and no peak is reached inside
    them, so every figure is unchanged; in this order each block's events repeat exactly."""
    def rank(owner) -> tuple:
        return (-1, -1) if owner is None else owner

    def key(k: int) -> tuple:
        held = events[k][1]
        return (*rank(owners.key_owner.get(held)), owners.alloc_event.get(held, -1))

    cuts = set(boundaries)
    start = 0
    n = len(events)
    while start < n:
        if events[start][0] > 0:
            start += 1
            continue
        end = start + 1
        while end < n and events[end][0] < 0 and end not in cuts:
            end += 1
        # swept frees as one batch; others only within one block's run (the runs themselves stay in place)
        parts, s0 = [], start
        for k in range(start + 1, end + 1):
            swept = s0 in owners.swept
            if k == end or (k in owners.swept) != swept or (not swept and event_owner[k] != event_owner[s0]):
                parts.append((s0, k))
                s0 = k
        for s0, e0 in parts:
            if e0 - s0 > 1:
                order = sorted(range(s0, e0), key=key)
                events[s0:e0] = [events[k] for k in order]
                event_owner[s0:e0] = [event_owner[k] for k in order]
        start = end


def _moved(index: int, new_index: dict, runs) -> int:
    """Where old event `index` is after splicing (inside a template's run only its start is defined)."""
    if index in new_index:
        return new_index[index]
    start, _, owner = runs[bisect.bisect_right([r[0] for r in runs], index) - 1]
    if isinstance(owner, tuple) and owner[1] == TEMPLATE:
        raise Unrepeated(f"event {index} marks a step boundary inside a block's run")
    return new_index[start] + index - start


def _spliced_op_index(index: int, op_runs, copies) -> int:
    """Where kernel `index` is once the template's kernel runs are repeated."""
    shift = 0
    for start, end, owner in op_runs:
        if start > index:
            break
        if isinstance(owner, tuple) and owner[1] == TEMPLATE and owner[0] in copies and end <= index:
            shift += copies[owner[0]] * (end - start)
    return index + shift


def _reversed(runs, index: int, group: int) -> bool:
    """Whether the template's run `index` is part of a sweep over the blocks in reverse (backward, a list's
    frees): its predecessor's run before it and its successor's after, or the other way round; any other
    neighbourhood (runs of one block split among another's) is not spliced."""
    before = runs[index - 1][2] if index > 0 else None
    after = runs[index + 1][2] if index + 1 < len(runs) else None
    if (before, after) == ((group, TEMPLATE - 1), (group, TEMPLATE + 1)):
        return False
    if (before, after) == ((group, TEMPLATE + 1), (group, TEMPLATE - 1)):
        return True
    raise Unrepeated(f"a run of the {group}-block list's template lies between {before} and {after}")


def _check(group: int, tagged: _Tagged, trace, owners: Owners, totals: dict) -> None:
    """Raise Unrepeated unless the inner blocks of `group` repeat: the template relates to its successor as its
    predecessor relates to it, and its storages are touched by no block but its neighbours."""
    inner = [(group, TEMPLATE - 1), (group, TEMPLATE), (group, TEMPLATE + 1)]
    events, runs, key_owner, position = tagged.events, tagged.runs, owners.key_owner, tagged.position
    sizes = [[trace.sizes[k] for k in tagged.allocated[owner]] for owner in inner]
    if not (sizes[0] == sizes[1] == sizes[2]):
        raise Unrepeated(f"inner blocks of the {group}-block list allocate differently")
    for start, end, owner in runs:
        if owner in inner:
            continue
        for sign, key, _ in events[start:end]:
            if sign < 0 and key_owner.get(key) == inner[1]:
                raise Unrepeated(f"a storage of the {group}-block list's template is freed outside its neighbours")

    def form(owner, outer: int) -> list:
        """The owner's runs, each free written as (bytes, offset of the block that allocated the storage, its
        place in that block's allocations); frees of the `outer` neighbour's storages left out (the first and
        last blocks may free what their neighbours made in their own order)."""
        runs_of = []
        for start, end, o in runs:
            if o != owner:
                continue
            items = []
            for sign, key, nbytes in events[start:end]:
                if sign > 0:
                    items.append((1, nbytes))
                    continue
                held = key_owner.get(key)
                if held is None or held[0] != group or abs(held[1] - owner[1]) > 1:
                    items.append((-1, nbytes, "elsewhere", key))
                elif held[1] - owner[1] != outer:
                    items.append((-1, nbytes, held[1] - owner[1], position[key]))
            runs_of.append(items)
        return runs_of

    # the template relates to its successor as its predecessor relates to it, and to its predecessor as its
    # successor relates to it
    if form(inner[0], -1) != form(inner[1], -1) or form(inner[2], 1) != form(inner[1], 1):
        raise Unrepeated(f"inner blocks of the {group}-block list free differently")
    kernels = [[trace.ops[s:e] for s, e, o in tagged.op_runs if o == owner] for owner in inner]
    shares = [[s.get(owner, 0) for _, s in sorted(owners.op_shares.items())] for owner in inner]
    comm = [owners.comm.get(owner, {}) for owner in inner]
    saved = [owners.saved.get(owner, 0) for owner in inner]
    stats = [totals.get(owner) for owner in inner]
    for name, values in (("kernels", kernels), ("foreach bytes", shares), ("collectives", comm),
                         ("saved activations", saved), ("parameters", stats)):
        if not (values[0] == values[1] == values[2]):
            raise Unrepeated(f"inner blocks of the {group}-block list differ in {name}")
