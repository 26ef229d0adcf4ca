"""Per-rank records of a torchrun case gathered into the case's one record (context parallelism and FSDP)."""
from __future__ import annotations

import torch.distributed as dist

from .measure import flops, timing


def gather_records(value):
    """Every rank's `value` (any picklable object), in rank order, on every rank (a collective)."""
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def merge_ranks(record: dict, everyone: list[dict], world: int) -> dict:
    """The case's record from every rank's: a step ends when its slowest rank ends; memory is the largest
    rank's; FLOPs are all ranks'; per-rank lists beside them."""
    repeats = len(record["step_ms_samples"])
    own = set(timing.StepTimes(record["step_ms_samples"]).warnings)  # this rank's notes: replaced below
    slowest = timing.StepTimes([max(r["step_ms_samples"][i] for r in everyone) for i in range(repeats)])
    record.update(slowest.as_record_fields())
    record["warnings"] = [w for w in record["warnings"] if w not in own] + slowest.warnings
    for name in ("peak_allocated", "peak_reserved", "nvml_peak_process", "nvml_peak_device", "saved_activations"):
        record[name] = _max_or_none(everyone, name)
    flop_counts = [r["flops_per_step"] for r in everyone]
    record["flops_per_step"] = sum(flop_counts) if None not in flop_counts else None
    peak = flops.device_peak_tflops(record["device"], record["dtype"])
    record["tflops"], record["mfu"] = flops.throughput(record["flops_per_step"], record["step_ms_median"],
                                                      peak * world if peak else None)
    record["comm_bytes"] = max(r["comm_bytes"] for r in everyone)  # median step of the busiest rank
    record.update(
        rank_step_ms_median=[r["step_ms_median"] for r in everyone],
        rank_peak_allocated=[r["peak_allocated"] for r in everyone],
        rank_nvml_peak_process=[r["nvml_peak_process"] for r in everyone],
        rank_nvml_peak_device=[r["nvml_peak_device"] for r in everyone],
        rank_saved_activations=[r["saved_activations"] for r in everyone],
        rank_comm_bytes=[r["comm_bytes"] for r in everyone],
        comm_bytes_by_kind=everyone[0]["comm_bytes_by_kind"],
        rank_attention_work=everyone[0]["rank_attention_work"],
    )
    record["warnings"].append(
        "context parallel: step_ms_* are per step the slowest rank's; peaks and saved_activations the largest "
        "rank's; flops_per_step all ranks'; comm_bytes = bytes the busiest rank sends in its median step (exact "
        "for all-to-all / send / all-gather, all-reduce at the ring volume 2(W-1)/W); rank_* lists per rank")
    if record["dsv"] is not None:
        record["warnings"].append("dsv stats describe rank 0's heads (ulysses) or token shard (ring)")
    return record


def _max_or_none(rows, key):
    values = [r[key] for r in rows if r[key] is not None]
    return max(values) if values else None
