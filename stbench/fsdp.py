"""`torchrun ... -m stbench run --fsdp N [--context-parallel ulysses|ring]`: one FSDP (x CP) case on every rank.

The case goes through the one measurement sequence (`measure.sequence.measure_case`); `prepare` shards the
freshly built model (stbench.parallel.fsdp) and gives each data-parallel rank its own batch; one extra step
between warm-up and timing runs under a counter of every c10d op (not timed: the counter costs Python time).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from . import results
from .config import Case
from .measure import env, memory, sequence
from .parallel import fsdp as fsdp_lib
from .ranks import gather_records, merge_ranks
from .regimes import input_dtype, make_optimizer


def layout_of(case: Case, world: int) -> fsdp_lib.FSDPLayout:
    """The case's layout on `world` ranks; ValueError if the degrees do not multiply to the world."""
    if world % case.fsdp:
        raise ValueError(f"--fsdp {case.fsdp} does not divide the world of {world} ranks")
    cp = world // case.fsdp
    if cp > 1 and case.context_parallel is None:
        raise ValueError(f"--fsdp {case.fsdp} on {world} ranks leaves {cp} ranks per data-parallel group: pass "
                         f"--context-parallel ulysses|ring, or --fsdp {world}")
    if cp == 1 and case.context_parallel is not None:
        raise ValueError(f"--context-parallel {case.context_parallel} with --fsdp {case.fsdp} on {world} ranks "
                         f"leaves 1 rank per sequence; pass --fsdp {world // 2} or fewer")
    return fsdp_lib.FSDPLayout(fsdp=case.fsdp, cp=cp, reshard_after_forward=bool(case.fsdp_reshard_after_forward),
                               activation_checkpointing=case.activation_checkpointing or "none",
                               mixed_precision=bool(case.fsdp_mixed_precision))


@torch.no_grad()
def _broadcast_from_rank0(module: torch.nn.Module) -> None:
    for t in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(t.data, 0)


def shard_step(step, layout: fsdp_lib.FSDPLayout, mesh, context_parallel: str | None):
    """Shard a TrainingStep's model in place, rebuild its optimizer over the shards and give this rank its
    data-parallel batch; returns the context-parallel object (None without CP)."""
    model, case = step.model, step.case
    _broadcast_from_rank0(model)  # once per case, before sharding: not counted
    cp = None
    if layout.cp > 1:
        from .parallel import make_context_parallel

        cp = make_context_parallel(context_parallel, mesh.get_group("cp"))
    fsdp_lib.apply_fsdp(model, mesh, layout, cp)
    lr = step.optimizer.defaults["lr"]
    step.trainable = model.trainable_parameters()
    step.optimizer = make_optimizer(case, step.trainable, lr=lr)
    step.batch = model.make_batch(case.batch, case.frames, *case.frame_hw, device=step.device,
                                  dtype=input_dtype(case), seed=mesh.get_local_rank("fsdp"))
    return cp


def measure_rank_fsdp(case: Case, *, repeats: int, warmup: int, world: int) -> dict:
    """One FSDP (x CP) case on every rank; returns the case's record (rank 0's is the one written)."""
    layout = layout_of(case, world)
    device = torch.device(case.device if not case.device.startswith("cuda") else "cuda")
    mesh = fsdp_lib.build_mesh(layout, device.type)
    record = results.new_record(case.identity(world))
    record["env"] = env.collect_env(device)
    state: dict = {}

    def prepare(step):
        state["step"] = step
        state["cp"] = shard_step(step, layout, mesh, case.context_parallel)
        return step

    def after_warmup():
        cp = state["cp"]
        if cp is not None:
            cp.counter.reset()
        with fsdp_lib.CollectiveCounter() as counter:
            state["step"]()
        state["by_collective"] = dict(counter.bytes_by_kind)
        state["by_kind"] = dict(cp.counter.bytes_by_kind) if cp is not None else {}

    # host_peak_bytes: this rank's resident-memory peak during the timed steps over its RSS before the model
    step = sequence.measure_case(case, record, repeats=repeats, warmup=warmup, prepare=prepare,
                                 after_warmup=after_warmup, settle=False)  # ranks must run the same steps
    # this rank's shards (padding included), not the global sizes the DTensors report
    record["param_bytes"] = memory.tensor_bytes(step.model.parameters()) + (  # + resident encoders, unsharded
        memory.tensor_bytes(step.encoders.parameters()) if step.encoders is not None else 0)
    record["grad_bytes"] = memory.tensor_bytes(step.trainable)
    record["optimizer_bytes"] = memory.tensor_bytes(
        v for s in step.optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor))
    record["comm_bytes"] = sum(state["by_collective"].values())
    record["comm_bytes_by_collective"] = state["by_collective"]
    record["comm_bytes_by_kind"] = state["by_kind"]
    record["rank_attention_work"] = state["cp"].expected_rank_work() if state["cp"] is not None else None
    record["mesh"] = layout.mesh_record()
    everyone = gather_records(record)
    merged = merge_ranks(record, everyone, world)
    for name in ("param_bytes", "grad_bytes", "optimizer_bytes", "host_peak_bytes"):
        merged[f"rank_{name}"] = [r[name] for r in everyone]
        values = [r[name] for r in everyone if r[name] is not None]
        merged[name] = max(values) if values else None
    merged["comm_bytes_by_collective"] = everyone[0]["comm_bytes_by_collective"]
    merged["warnings"].append(
        f"fsdp: mesh fsdp {layout.fsdp} x cp {layout.cp}; parameters, gradients and AdamW state sharded over all "
        f"{world} ranks; each fsdp rank trains its own batch of {case.batch} (global batch {case.batch * layout.fsdp}"
        f"); param/grad/optimizer_bytes are the largest rank's shard bytes (padding included), host_peak_bytes the "
        f"largest rank's resident-memory growth over the timed steps, rank_* per rank; "
        f"comm_bytes counted on the c10d ops of one extra untimed step; saved_activations leaves out the gathered "
        f"weights layers save for backward (FSDP frees and gathers them again: they are parameters)")
    memory.release_memory()
    return merged
