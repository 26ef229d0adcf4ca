"""One rank of an FSDP2 (x context-parallel) layout on fake tensors, in one process, and its communication time.

As torchtitan estimates memory: a fake process group of N ranks (torch's "fake" backend: collectives return
at once and move nothing) stands in for the world, the model is built on the meta device, sharded with the
same `fully_shard` calls and context parallelism that `torchrun ... stbench run --fsdp` uses, and its shards
made fake CPU tensors. The step then runs PyTorch's own FSDP2 code: the all-gathers, reduce-scatters and
their buffers are the real ones. Rank 0 is traced; every rank holds the same shapes (FSDP2 pads every shard
to ceil(dim0 / N) rows, context parallelism needs the token count to divide by its degree), so rank 0's
prediction is every rank's.

FSDP2 frees and re-allocates gathered parameters by resizing their storages (`UntypedStorage.resize_`),
which no dispatch mode sees; `storage_resizes` reports those to the allocation trace.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..config import Case
from ..errors import UserError
from ..parallel import fsdp as fsdp_lib

# collectives FSDP2 issues on its own stream and prefetches, and ring hops that overlap attention compute:
# they can hide behind compute; the others (Ulysses all-to-alls, all-reduce, broadcast) block the step
OVERLAPPED = ("all_gather", "reduce_scatter", "point_to_point")


@contextlib.contextmanager
def fake_world(world: int, rank: int = 0):
    """A default process group of `world` fake ranks, this process being `rank`; torn down on exit."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise UserError("predict: a process group already exists in this process (do not launch predict with "
                        "torchrun)")
    dist.init_process_group("fake", rank=rank, world_size=world, store=FakeStore())
    try:
        yield
    finally:
        dist.destroy_process_group()


@contextlib.contextmanager
def storage_resizes(on_resize):
    """Call `on_resize(storage, old_bytes, new_bytes)` before every `UntypedStorage.resize_` while active."""
    original = torch.UntypedStorage.resize_

    def resize_(storage, size):
        on_resize(storage, storage.nbytes(), int(size))
        return original(storage, size)

    torch.UntypedStorage.resize_ = resize_
    try:
        yield
    finally:
        torch.UntypedStorage.resize_ = original


def shard(model, case: Case, world: int) -> fsdp_lib.FSDPLayout:
    """Shard a meta-device `model` as `run --fsdp` does on `world` ranks (call inside `fake_world`)."""
    from ..fsdp import layout_of  # noqa: local - the torchrun side, imported only when a layout is predicted

    try:
        layout = layout_of(case, world)
    except ValueError as e:
        raise UserError(f"world-size: {e}") from None
    mesh = fsdp_lib.build_mesh(layout, "cpu")
    cp = None
    if layout.cp > 1:
        from ..parallel import make_context_parallel

        cp = make_context_parallel(case.context_parallel, mesh.get_group("cp"))
    try:
        fsdp_lib.apply_fsdp(model, mesh, layout, cp)
    except ValueError as e:
        raise UserError(f"activation-checkpointing: {e}") from None
    return layout


@dataclass(frozen=True)
class CommTime:
    """Predicted communication of one rank's step: time per collective kind, and how it adds to compute."""

    by_kind_ms: dict
    overlapped_ms: float  # FSDP's gathers / reduce-scatters and ring hops: can run during compute
    blocking_ms: float  # Ulysses all-to-alls, all-reduce, broadcast: the step waits for them
    links: dict  # kind -> link name


def comm_time(comm: dict, hardware) -> CommTime | None:
    """Time of what a rank sends, `comm[(kind, group ranks)] = [bytes, calls]`; None without a link model.

    A group of g ranks is taken as g consecutive GPUs (the mesh is (fsdp, cp) with cp innermost, as
    torchtitan places it: a cp group stays inside a node when cp <= GPUs per node; parameters are sharded over
    all ranks). Time of a collective = bytes this rank sends / the per-direction bandwidth of the slowest link
    the group crosses + one latency per call (what a ring algorithm costs each rank).
    """
    by_kind, links = {}, {}
    for (kind, ranks), (nbytes, calls) in sorted(comm.items()):
        link = hardware.link(ranks)
        if link is None:
            if ranks > 1:
                return None
            continue
        by_kind[kind] = by_kind.get(kind, 0.0) + (nbytes / link.bytes_s + calls * link.latency_us * 1e-6) * 1e3
        links[kind] = link.name if kind not in links or links[kind] == link.name else f"{links[kind]}, {link.name}"
    overlapped = sum(ms for kind, ms in by_kind.items() if kind in OVERLAPPED)
    blocking = sum(ms for kind, ms in by_kind.items() if kind not in OVERLAPPED)
    return CommTime(by_kind, overlapped, blocking, links)
