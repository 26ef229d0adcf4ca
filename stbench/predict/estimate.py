"""From a fake step's trace to a prediction on one hardware: peak memory (allocator replay) and step time."""
from __future__ import annotations

import functools
import traceback

from .. import results
from ..config import Case
from ..errors import UserError
from ..measure import env
from ..parallel.fsdp import bytes_by_kind
from . import efficiency, fake, memory, roofline, sharded
from .efficiency import HOST_BOUND, Efficiency
from .hardware import Hardware

CATEGORIES = (fake.PARAMS, fake.GRADS, fake.OPTIMIZER, fake.ACTIVATIONS)


@functools.lru_cache(maxsize=32)
def cached_trace(case: Case, foreach: bool, world: int = 1, exact: bool = False) -> fake.StepTrace:
    """A case's trace is the same for every GPU (AdamW foreach on all of them): trace once, replay per GPU
    (a plan's or frontier's repeated case too). exact: every block traced (fake.trace_step)."""
    return fake.trace_step(case, foreach=foreach, world=world, exact=exact)


def trace_method(trace: fake.StepTrace, exact: bool) -> dict:
    """How the step was traced (the record's predicted.trace): every block, or each repeated list's first, three
    inner and last blocks with the rest spliced in; `refused` says why a model was traced whole."""
    if trace.reuse and not exact:
        return {"exact": False, "repeated": {name: {"blocks": n, "traced": traced}
                                             for name, (n, traced) in trace.reuse.items()}}
    return {"exact": True, **({"refused": trace.refused} if trace.refused and not exact else {})}


def foreach_for(hardware: Hardware) -> bool:
    """AdamW's implementation `run` gets by default: foreach on CUDA, the per-parameter loop on CPU."""
    return hardware.caching_allocator


def breakdown(trace: fake.StepTrace, peak_bytes: int) -> dict:
    """What is alive at the steady-state step's peak of live bytes, by kind (params include buffers, activations
    the batch); transient is the rest of `peak_bytes` (the CUDA context excluded): temporaries, rounding, cache."""
    live, best, at = {}, -1, trace.measure_from
    total = 0
    for index, (sign, key, nbytes) in enumerate(trace.events):
        if sign > 0:
            live[key] = nbytes
            total += nbytes
        elif key in live:
            total -= live.pop(key)
        if index >= trace.measure_from and total > best:
            best, at = total, index
    parts = {name: 0 for name in CATEGORIES}
    for key, nbytes in trace.live_at(at).items():
        kind = trace.categories.get(key)
        if kind in parts:
            parts[kind] += nbytes
    parts["transient"] = peak_bytes - sum(parts.values())
    return parts


def prediction(trace: fake.StepTrace, hardware: Hardware, efficiencies: Efficiency | None = None) -> dict:
    """The record's `predicted` object for one hardware (peak_bytes includes the CUDA context on GPUs).

    step_ms is the expected time (each kernel class at its published achievable efficiency, `efficiencies`
    or the hardware's own table) and step_ms_bound the roofline lower bound (datasheet peaks);
    peak_allocated_bytes is the most bytes live in blocks (torch.cuda.max_memory_allocated, no context),
    reserved_bytes the allocator's segments at their peak, peak_bytes that plus the CUDA context."""
    capacity = hardware.memory_bytes - hardware.context_bytes
    unlimited = memory.replay(trace.events, caching=hardware.caching_allocator, measure_from=trace.measure_from,
                              at=trace.step_end or None)
    bounded = memory.replay(trace.events, caching=hardware.caching_allocator, capacity=capacity,
                            measure_from=trace.measure_from)
    peak = unlimited.peak_reserved + hardware.context_bytes
    chosen = efficiencies if efficiencies is not None else efficiency.for_hardware(hardware)
    time = roofline.step_time(trace.ops, hardware, chosen)
    bound = roofline.step_time(trace.ops, hardware)
    flops = sum(op.flops for op in trace.ops)
    predicted = {"hardware": hardware.name, "peak_bytes": peak, "fits": not bounded.out_of_memory,
                 "step_ms": None, "step_ms_bound": None, "compute_ms": None, "memory_ms": None, "flops": flops,
                 "mfu": None, "breakdown": breakdown(trace, unlimited.peak_reserved),
                 "peak_allocated_bytes": unlimited.peak_allocated, "allocated_bytes": unlimited.peak_allocated,
                 "allocated_after_step_bytes": unlimited.allocated_at,
                 "reserved_bytes": unlimited.peak_reserved, "context_bytes": hardware.context_bytes,
                 "memory_bytes": hardware.memory_bytes, "kernels": len(trace.ops)}
    if time is not None:
        predicted.update(step_ms=time.step_ms, step_ms_bound=bound.step_ms, compute_ms=time.compute_ms,
                         memory_ms=time.memory_ms, attention_backend=chosen.backend,
                         step_ms_by_kind={k: round(v, 3) for k, v in time.by_kind.items()})
        if trace.layout is not None:
            _add_communication(predicted, trace, hardware)
        peak_flops = hardware.peak(max((op for op in trace.ops if op.flops), key=lambda op: op.flops,
                                       default=roofline.OpCost("", 0, 0, "fp32")).math)
        step_ms = predicted["step_ms"]
        predicted["mfu"] = flops / (step_ms / 1e3) / peak_flops if peak_flops and step_ms else None
    return predicted


def _add_communication(predicted: dict, trace: fake.StepTrace, hardware: Hardware) -> None:
    """A rank's step with communication: the kernels' expected time (`kernels_ms`; `kernels_ms_bound` their
    roofline bound, which step_ms_bound uses the same way), then FSDP's gathers and
    reduce-scatters and ring hops hidden behind it where they fit (FSDP2 prefetches on its own stream) and
    Ulysses all-to-alls and all-reduces added (the step waits for them): step = max(kernels, overlapped) +
    blocking. `step_ms_serial` adds everything: the bound when nothing overlaps."""
    comm = sharded.comm_time(trace.comm, hardware)
    if comm is None:
        return
    kernels = predicted["step_ms"]
    bound = predicted["step_ms_bound"]
    predicted.update(kernels_ms=kernels, kernels_ms_bound=bound, comm_ms=comm.overlapped_ms + comm.blocking_ms,
                     step_ms_bound=max(bound, comm.overlapped_ms) + comm.blocking_ms,
                     comm_ms_by_collective=comm.by_kind_ms, comm_overlapped_ms=comm.overlapped_ms,
                     comm_blocking_ms=comm.blocking_ms, links=comm.links,
                     step_ms=max(kernels, comm.overlapped_ms) + comm.blocking_ms,
                     step_ms_serial=kernels + comm.overlapped_ms + comm.blocking_ms)


def predict_case(case: Case, hardware: Hardware, world: int = 1, exact: bool = False) -> dict:
    """A complete result record for `case` on `hardware` (one rank of `world` with `case.fsdp`): status ok,
    oom (predicted not to fit) or error; exact: trace every block (the reference for the spliced trace)."""
    record = results.new_record({**case.identity(world), "device": hardware.name})
    record["env"] = env.collect_env("cpu")  # the machine that predicted, not the target
    try:
        trace = cached_trace(case, foreach_for(hardware), world, exact)
    except UserError:
        raise
    except Exception:  # noqa: BLE001 - a model that cannot run on fake tensors is a result, not a crash
        record["status"] = "error"
        record["predicted"] = {"hardware": hardware.name}  # marks the record as a prediction (its own case key)
        record["error"] = "\n".join(traceback.format_exc().rstrip().splitlines()[-25:])[-4000:]
        return record
    predicted = prediction(trace, hardware)
    predicted["trace"] = trace_method(trace, exact)
    record["predicted"] = predicted
    record["status"] = "ok" if predicted["fits"] else "oom"
    if not predicted["fits"]:
        record["error"] = (f"predicted not to fit: needs more than the {hardware.memory_bytes} bytes of "
                           f"{hardware.label}")
    for name in ("param_bytes", "grad_bytes", "optimizer_bytes", "saved_activations", "params_total",
                 "params_trainable"):
        record[name] = getattr(trace, name)
    record["warnings"] = list(trace.warnings) + [f"predicted, not measured: stbench predict for {hardware.label}"]
    if trace.layout is not None:
        _sharded_fields(record, trace, world)
    host = host_bound(predicted)
    if host:
        record["warnings"].append(host)
    if hardware.name == "cpu":
        record["warnings"].append("cpu: memory only (fp32 host allocator, no caching); step time not predicted")
    return record


def host_bound(predicted: dict) -> str | None:
    """A warning where the CPU's launch work may outlast the GPU's kernels: step_ms assumes the GPU never waits,
    and an eager op costs the CPU about 5-25 us (efficiency's EAGER_HOST source) whatever its kernel's size."""
    gpu_ms, kernels = predicted.get("kernels_ms", predicted.get("step_ms")), predicted.get("kernels") or 0
    low, high = (kernels * us / 1e3 for us in efficiency.EAGER_HOST_US)
    if not gpu_ms or high < gpu_ms:
        return None
    return (f"{HOST_BOUND}: {kernels} kernels of {gpu_ms * 1e3 / kernels:.1f} us GPU time each on "
            f"average; eager PyTorch spends about {efficiency.EAGER_HOST_US[0]:g}-{efficiency.EAGER_HOST_US[1]:g} "
            f"us of CPU time launching each, {low:.0f}-{high:.0f} ms a step beside {gpu_ms:.0f} ms of kernels, "
            f"so the step may wait on the CPU and take longer than step_ms, which assumes it never does "
            f"(torch.compile or CUDA graphs remove most of it; on the lent H200 eager serial-unet at 256 px x 16 "
            f"frames took 235 ms for 83 ms of kernels)")


def _sharded_fields(record: dict, trace: fake.StepTrace, world: int) -> None:
    """The fields a torchrun FSDP record has, for the predicted rank (every rank holds the same shapes)."""
    layout = trace.layout
    by_collective = bytes_by_kind(trace.comm)
    record["mesh"] = layout.mesh_record()
    record["comm_bytes"] = sum(by_collective.values())
    record["comm_bytes_by_collective"] = by_collective
    for name in ("param_bytes", "grad_bytes", "optimizer_bytes"):
        record[f"rank_{name}"] = [record[name]] * world
    record["predicted"]["rank_peak_bytes"] = [record["predicted"]["peak_bytes"]] * world
    record["warnings"].append(
        f"fsdp (predicted): rank 0 of {world} traced in a fake process group (mesh fsdp {layout.fsdp} x cp "
        f"{layout.cp}); every rank holds the same shapes (FSDP2 pads shards to equal size, context parallelism "
        f"splits tokens evenly), so each rank's prediction is rank 0's; param/grad/optimizer_bytes, peak and "
        f"FLOPs are per rank; communication time from the bytes each collective sends over the hardware's links")
