"""FSDP2 (`torch.distributed.fsdp.fully_shard`) with context parallelism on one 2D DeviceMesh, and an exact
count of the bytes every c10d collective sends.

Layout (as torchtitan's `dp_shard_cp`): the mesh is (fsdp, cp) with fsdp x cp = world. Parameters, gradients
and AdamW state are sharded over *all* world ranks (the flattened mesh); the sequence is sharded over the `cp`
dimension; each `fsdp` coordinate trains its own batch, so the global batch is batch x fsdp. FSDP's reduce-scatter
averages over all world ranks; a cp rank's gradients are cp x its share (see context_parallel's docstring),
so the average is exactly the gradient of the mean loss over the global batch.

Units: one `fully_shard` per unit of `model.fsdp_units()` (the model's repeated blocks), then the root.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ..config import ACTIVATION_CHECKPOINTING


@dataclass(frozen=True)
class FSDPLayout:
    """An FSDP x context-parallel layout: degrees, resharding, activation checkpointing, mixed precision."""

    fsdp: int
    cp: int = 1
    reshard_after_forward: bool = True
    activation_checkpointing: str = "none"
    mixed_precision: bool = False

    def __post_init__(self):
        if self.fsdp < 1 or self.cp < 1:
            raise ValueError(f"fsdp and cp degrees must be >= 1, got fsdp={self.fsdp} cp={self.cp}")
        if self.activation_checkpointing not in ACTIVATION_CHECKPOINTING:
            raise ValueError(f"activation_checkpointing must be one of {', '.join(ACTIVATION_CHECKPOINTING)}, "
                             f"got {self.activation_checkpointing!r}")

    @property
    def world(self) -> int:
        return self.fsdp * self.cp

    def mesh_record(self) -> dict:
        return {"fsdp": self.fsdp, "cp": self.cp, "shard_over": "fsdp x cp"}


def build_mesh(layout: FSDPLayout, device_type: str):
    """The (fsdp, cp) DeviceMesh over the default process group; ValueError if its size is not the world's."""
    from torch.distributed.device_mesh import init_device_mesh

    world = dist.get_world_size()
    if layout.world != world:
        raise ValueError(f"fsdp {layout.fsdp} x context-parallel {layout.cp} = {layout.world} ranks, but the "
                         f"world has {world} (torchrun --nproc-per-node)")
    return init_device_mesh(device_type, (layout.fsdp, layout.cp), mesh_dim_names=("fsdp", "cp"))


def shard_mesh(mesh):
    """The 1D mesh parameters are sharded over: all ranks (fsdp x cp flattened)."""
    return mesh if mesh.ndim == 1 else mesh["fsdp", "cp"]._flatten("fsdp_cp")


def checkpoint_modules(model: nn.Module, units: list[nn.Module], mode: str) -> list[nn.Module]:
    """The modules whose activations are recomputed in backward: the units (`blocks`), or in each unit the
    direct children holding only spatial (text-to-image) parameters (`spatial`)."""
    if mode == "none":
        return []
    if mode == "blocks":
        return list(units)
    names = {id(p): n for n, p in model.named_parameters()}
    chosen = []
    for unit in units:
        # a ModuleList or ModuleDict is never called (its members are): checkpoint the members (a UNet block's
        # `resnets` and `attentions`)
        children = [m for child in unit.children()
                    for m in (child.children() if isinstance(child, (nn.ModuleList, nn.ModuleDict)) else (child,))]
        for child in children:
            params = list(child.parameters())
            if params and all(model.group_of(names[id(p)]) == "spatial" for p in params):
                chosen.append(child)
    return chosen


def apply_checkpointing(model: nn.Module, units: list[nn.Module], mode: str) -> list[nn.Module]:
    """Recompute in backward the activations of `checkpoint_modules` (composable checkpointing, which keeps the
    modules' own hooks); ValueError when `mode` names modules the model lacks. Returns the modules."""
    from torch.distributed._composable import checkpoint

    recomputed = checkpoint_modules(model, units, mode)
    if mode != "none" and not recomputed:
        raise ValueError(f"activation checkpointing {mode!r}: {type(model).__name__} has no such modules")
    for module in recomputed:
        checkpoint(module)
    return recomputed


def apply_fsdp(model: nn.Module, mesh, layout: FSDPLayout, cp=None) -> list[nn.Module]:
    """Checkpoint, attach context parallelism `cp` (if any), then shard `model` in place (units first, then
    the root); returns the units.

    The order matters: a diffusers model shards its tokens in a forward pre-hook on its first block. Composable
    checkpointing saves a block's inputs in its own pre-hook and, in backward, calls the block again with them
    (every other hook active): registered after it, the token hook sees the whole sequence both times and shards
    it once; registered before, the recomputation would shard already-sharded tokens."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    units = model.fsdp_units()
    apply_checkpointing(model, units, layout.activation_checkpointing)
    if cp is not None:
        cp.attach(model)  # no optimizer hook: FSDP's reduce-scatter averages the gradients
    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if layout.mixed_precision else MixedPrecisionPolicy())
    flat = shard_mesh(mesh)
    for unit in units:
        fully_shard(unit, mesh=flat, reshard_after_forward=layout.reshard_after_forward, mp_policy=policy)
    # the root: None (FSDP2's "auto") keeps its parameters after forward, as backward starts with them
    fully_shard(model, mesh=flat, reshard_after_forward=None if layout.reshard_after_forward else False,
                mp_policy=policy)
    return units


def padded_shard_numel(shape: torch.Size, world: int) -> int:
    """Elements of one rank's padded shard of a parameter of `shape` (dim 0 split in ceil(dim0 / world) rows)."""
    if len(shape) == 0:
        return 1
    rows = -(-shape[0] // world)
    return rows * (shape.numel() // shape[0] if shape[0] else 0)


def analytic_fsdp_bytes(units: list[list[torch.Size]], trainable: list[list[bool]], world: int, *,
                        element_size: int = 4, param_element_size: int | None = None,
                        reshard_after_forward: bool = True, in_backward: list[bool] | None = None) -> dict[str, int]:
    """Bytes one rank sends in one FSDP2 training step, per collective kind.

    `units[i]`: the parameter shapes of FSDP unit i (the root last); `trainable[i]`: which of them train.
    All-gather: each unit once in forward and, when resharded after forward, again in backward (the root is
    never resharded after forward: backward starts with it); a rank sends its padded shard to W-1 ranks.
    Reduce-scatter: each unit's trainable gradients once, a rank sending (W-1) padded shards. `in_backward[i]`
    False: unit i ran without autograd (e.g. a frozen image UNet under no_grad), so backward never gathers it.
    """
    param_element_size = param_element_size or element_size
    in_backward = in_backward or [True] * len(units)
    gather = scatter = 0
    for i, (shapes, trains) in enumerate(zip(units, trainable)):
        shard = sum(padded_shard_numel(s, world) for s in shapes)
        grad_shard = sum(padded_shard_numel(s, world) for s, t in zip(shapes, trains) if t)
        times = 2 if reshard_after_forward and i < len(units) - 1 and in_backward[i] else 1
        if shard:
            gather += times * shard * param_element_size * (world - 1)
        scatter += grad_shard * element_size * (world - 1)
    return {"all_gather": gather, "reduce_scatter": scatter}


# --- exact count of what every c10d collective sends -------------------------------------------------------
def _tensors(value) -> list[torch.Tensor]:
    return [t for t in tree_leaves(value) if isinstance(t, torch.Tensor)]


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _group(args):
    """The op's process group: dispatched c10d ops carry it boxed as a ScriptObject."""
    for a in args:
        if isinstance(a, dist.ProcessGroup):
            return a
        if isinstance(a, torch.ScriptObject):
            try:
                return dist.ProcessGroup.unbox(a)
            except RuntimeError:  # another boxed argument (e.g. a ReduceOp)
                continue
    return None


def sent_bytes(name: str, args) -> tuple[str, int, int] | None:
    """(kind, bytes this rank sends to other ranks, ranks of the op's group) of one c10d op, None for an op
    that sends nothing."""
    op = name.split(".")[1] if "." in name else name
    group = _group(args)
    size = group.size() if group is not None else 1
    if op.startswith(("_allgather_base", "allgather")):  # (output tensor or lists, inputs)
        kind, nbytes = "all_gather", _nbytes(_tensors(args[1])) * (size - 1)
    elif op.startswith(("_reduce_scatter_base", "reduce_scatter")):  # (output(s), input tensor or lists)
        kind, nbytes = "reduce_scatter", _nbytes(_tensors(args[1])) * (size - 1) // size
    elif op.startswith("alltoall_base"):  # (output, input, group, output_splits, input_splits, ...)
        x, splits = args[1], list(args[4])
        rows = x.shape[0] if x.dim() else 1
        own = splits[group.rank()] if splits else rows // size
        kind, nbytes = "all_to_all", _nbytes([x]) * (rows - own) // max(rows, 1)
    elif op.startswith("alltoall"):  # (outputs, inputs)
        inputs = _tensors(args[1])
        kind, nbytes = "all_to_all", _nbytes(inputs) - _nbytes([inputs[group.rank()]])
    elif op.startswith("send"):
        kind, nbytes = "point_to_point", _nbytes(_tensors(args[0]))
    elif op.startswith("allreduce"):  # the ring algorithm's per-rank volume
        kind, nbytes = "all_reduce", _nbytes(_tensors(args[0])) * 2 * (size - 1) // size
    elif op.startswith("broadcast"):
        kind, nbytes = "broadcast", _nbytes(_tensors(args[0])) * (size - 1)
    else:
        return None
    return kind, nbytes, size


def bytes_by_kind(by_group: dict) -> dict[str, int]:
    """{(kind, ranks): [bytes, calls]} -> {kind: bytes}."""
    total: dict[str, int] = {}
    for (kind, _ranks), (nbytes, _calls) in by_group.items():
        total[kind] = total.get(kind, 0) + nbytes
    return total


def add_sent(by_group: dict, group: tuple[str, int], nbytes: int, calls: int = 1) -> None:
    """by_group[(kind, group ranks)] += [bytes sent, calls]: the count CollectiveCounter keeps (and predict's)."""
    entry = by_group.setdefault(group, [0, 0])
    entry[0] += nbytes
    entry[1] += calls


class CollectiveCounter(TorchDispatchMode):
    """Counts the bytes this rank sends through every c10d op dispatched while active, by kind and group size.

    A dispatch mode sees each op PyTorch's own code (FSDP2) and ours (context parallelism) issues, forward and
    backward (CPU autograd runs on the calling thread); it costs Python time per op, so a counted step is not
    a timed one.
    """

    def __init__(self):
        super().__init__()
        self.by_group: dict[tuple[str, int], list[int]] = {}  # (kind, group ranks) -> [bytes, calls]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if name.startswith("c10d."):
            sent = sent_bytes(name, args)
            if sent is not None:
                kind, nbytes, ranks = sent
                add_sent(self.by_group, (kind, ranks), int(nbytes))
        return func(*args, **(kwargs or {}))

    @property
    def bytes_by_kind(self) -> dict[str, int]:
        return bytes_by_kind(self.by_group)
