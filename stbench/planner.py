"""`python -m stbench plan`: estimate context-parallel layouts of a DiT from single-GPU measurements.

The model (stated, so it can be argued with):

* A measured single-GPU step `t1` splits into self-attention and the rest by analytic FLOP share (both run
  at the same achieved throughput). Self-attention FLOPs use each head's dense-equivalent work
  (1 - sparsity for DSV's sparse heads, 1 otherwise). At another sequence length (--tokens) attention
  scales with T^2 and the rest with T; sparsity is assumed unchanged.
* Layout u x r (u-way head-wise Ulysses inside r-way sequence-wise ring, u * r = N GPUs): the rest scales
  with 1/N. Attention per rank: per layer, heads are placed on the u head groups longest-processing-time
  first, a rank's time follows its group's work (the most loaded group sets the pace) divided by r
  (queries split evenly; sparse work assumed uniform along the sequence).
* Bytes a rank sends per step, per layer (e = activation bytes, fp32 dk/dv in ring backward):
  Ulysses 4 all-to-alls forward + 4 backward of (u-1)/u of a (B, H, T/N, D) tensor; dense ring
  (r-1) hops of k+v forward and (r-1) of k+v plus dk+dv backward on H/u heads of T/r tokens; DSV sparse
  heads in the ring move only needed blocks: a rank's queries (q = T/(r*bs) blocks) need a remote block
  with probability 1 - s^q (selections independent per query block: an upper estimate when selections are
  shared), plus the all-gathered low-rank key estimates. Per step: the token all-gather before the final
  layer (N-1)/N of (B, T, C) and the gradient all-reduce 2 (N-1)/N of grad_bytes.
* Time of bytes = bytes / link bandwidth. Ring forward overlaps its k/v hops with attention compute
  (max of the two); its backward, the all-to-alls, the token gather and the gradient all-reduce do not.
"""
from __future__ import annotations

import argparse
import heapq
import math
from dataclasses import dataclass, field

from .config import TORCH_DTYPES, Case
from .errors import UserError
from .results import frame_records, load_frame

FLOPS_PER_MAC = 2
BACKWARD_FACTOR = 3.0  # forward + backward = 3x forward FLOPs
FORWARD_SHARE = 1.0 / BACKWARD_FACTOR
TEXT_TOKENS = 77
ESTIMATOR_SAMPLES = 64


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs from a record: sizes of the DiT and of the measured step."""

    arch: str
    batch: int
    tokens: int
    depth: int
    heads: int
    head_dim: int
    hidden: int
    mlp_ratio: float
    block_size: int
    estimator_rank: int
    element_size: int
    grad_bytes: int
    dsv: bool


@dataclass
class Estimate:
    """One layout's estimated step time and bytes per rank per step."""

    layout: str
    ulysses: int
    ring: int
    step_ms: float
    comm_bytes: int
    attention_imbalance: float  # most loaded rank / mean
    parts_ms: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _dims(record: dict, index: int) -> ModelShape:
    try:
        case = Case(arch=record["arch"], preset=record["preset"], mode=record["mode"] or "full",
                    batch=record["batch"], frames=record["frames"], resolution=record["resolution"],
                    dtype=record["dtype"] or "fp32", device=(record["device"] or "cpu"),
                    overrides=tuple(sorted((record.get("overrides") or {}).items())))
        config = case.model_config()
    except (UserError, TypeError, KeyError) as e:
        raise UserError(f"record {index}: cannot rebuild its model config ({e})") from None
    if not hasattr(config, "heads") or not hasattr(config, "patch_size"):
        raise UserError(f"record {index}: {record['arch']} is not a DiT; plan covers dit-* architectures")
    tokens = config.tokens(case.frames, case.resolution, case.resolution)
    return ModelShape(arch=case.arch, batch=case.batch, tokens=tokens, depth=config.depth, heads=config.heads,
                      head_dim=config.head_dim, hidden=config.hidden_size, mlp_ratio=config.mlp_ratio,
                      block_size=config.block_size, estimator_rank=config.estimator_rank,
                      element_size=TORCH_DTYPES[case.dtype].itemsize,
                      grad_bytes=int(record.get("grad_bytes") or 0), dsv=config.attention == "dsv")


def head_sparsity(record: dict, shape: ModelShape) -> list[list[float]]:
    """Per layer, per head sparsity (0 for dense heads) from the record's dsv profile.

    Uses dsv.head_sparsity (layers x heads) when present; otherwise rebuilds heads from the per-layer mean
    (dsv.layer_sparsity, dense heads counted as 0) and dsv.sparse_head_fraction: that many heads per layer
    are sparse, sharing the layer's sparsity, the rest dense.
    """
    dense = [[0.0] * shape.heads for _ in range(shape.depth)]
    profile = record.get("dsv") if shape.dsv else None
    if not profile:
        return dense
    if not isinstance(profile, dict):
        raise UserError(f"{shape.arch}: record's dsv field is not an object")
    per_head = profile.get("head_sparsity")
    if per_head is not None:
        if len(per_head) != shape.depth or any(len(row) != shape.heads for row in per_head):
            raise UserError(f"{shape.arch}: dsv.head_sparsity must be {shape.depth} layers x {shape.heads} heads")
        return [[_fraction(s, "dsv.head_sparsity") for s in row] for row in per_head]
    layers = profile.get("layer_sparsity")
    if layers is None:
        return dense
    if len(layers) != shape.depth:
        raise UserError(f"{shape.arch}: dsv.layer_sparsity has {len(layers)} layers, the model {shape.depth}")
    fraction = _fraction(profile.get("sparse_head_fraction") or 0.0, "dsv.sparse_head_fraction")
    out = []
    for mean in layers:
        mean = _fraction(mean, "dsv.layer_sparsity")
        sparse = max(1, round(fraction * shape.heads)) if mean > 0 else 0
        each = min(0.99, mean * shape.heads / sparse) if sparse else 0.0
        out.append([each] * sparse + [0.0] * (shape.heads - sparse))
    return out


def _fraction(value, name: str) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise UserError(f"{name}: expected a number in [0, 1), got {value!r}") from None
    if not 0.0 <= value < 1.0:
        raise UserError(f"{name}: expected a number in [0, 1), got {value}")
    return value


def lpt_max_load(work: list[float], groups: int) -> float:
    """Most loaded group after longest-processing-time-first placement."""
    loads = [0.0] * groups
    heapq.heapify(loads)
    for w in sorted(work, reverse=True):
        heapq.heappush(loads, heapq.heappop(loads) + w)
    return max(loads)


def flop_split(shape: ModelShape, sparsity: list[list[float]], tokens: int) -> tuple[float, float]:
    """(self-attention FLOPs, other FLOPs) of one training step at `tokens` tokens."""
    B, C, HD = shape.batch, shape.hidden, shape.heads * shape.head_dim
    work = sum(1.0 - s for row in sparsity for s in row)  # dense-equivalent heads over all layers
    attention = FLOPS_PER_MAC * 2 * B * tokens * tokens * shape.head_dim * work
    per_token_macs = 4 * C * HD + 2 * C * HD + 2 * shape.mlp_ratio * C * C + 6 * C * C  # attn, cross, mlp, adaLN
    cross = 2 * B * tokens * TEXT_TOKENS * HD
    other = shape.depth * (FLOPS_PER_MAC * (B * tokens * per_token_macs + cross))
    return BACKWARD_FACTOR * attention, BACKWARD_FACTOR * other


def layouts(gpus: int, heads: int) -> list[tuple[int, int]]:
    """Every (ulysses, ring) with ulysses * ring = gpus and ulysses <= heads."""
    return [(u, gpus // u) for u in range(1, gpus + 1) if gpus % u == 0 and u <= heads]


def layout_name(u: int, r: int) -> str:
    if r == 1:
        return f"head-wise (ulysses x{u})" if u > 1 else "single GPU"
    if u == 1:
        return f"sequence-wise (ring x{r})"
    return f"hybrid (ulysses x{u} * ring x{r})"


def estimate(shape: ModelShape, sparsity: list[list[float]], step_ms: float, u: int, r: int, link_gbps: float,
             tokens: int | None = None) -> Estimate:
    """Estimated step time and bytes per rank of layout u x r, from a single-GPU step of `step_ms`."""
    T0, T = shape.tokens, tokens or shape.tokens
    N = u * r
    B, H, D, e = shape.batch, shape.heads, shape.head_dim, shape.element_size
    attn0, other0 = flop_split(shape, sparsity, T0)
    t_attn1 = step_ms * attn0 / (attn0 + other0) * (T / T0) ** 2
    t_other1 = step_ms * other0 / (attn0 + other0) * (T / T0)
    notes = []
    if T % N:
        notes.append(f"{T} tokens do not split evenly over {N} ranks")
    works = [[1.0 - s for s in row] for row in sparsity]
    total_work = sum(map(sum, works))
    rank_work = sum(lpt_max_load(w, u) for w in works) / r
    imbalance = rank_work / (total_work / N) if total_work else 1.0
    t_attn = t_attn1 * rank_work / total_work if total_work else 0.0

    local = B * (T / N) * D  # one head's (B, T/N, D) elements
    ulysses_bytes = 2 * 4 * (u - 1) / u * H * local * e * shape.depth if u > 1 else 0.0
    ring_fwd = ring_bwd = 0.0
    if r > 1:
        share = 1 / u  # this rank's part of a layer's heads
        shard = B * (T / r) * D  # one head's k (or v) shard in the ring
        q_blocks = max(1, (T // r) // shape.block_size)
        for row in sparsity:
            dense = sum(1 for s in row if s == 0.0) * share
            ring_fwd += (r - 1) * 2 * shard * e * dense
            ring_bwd += (r - 1) * 2 * shard * (e + 4) * dense
            for s in (s for s in row if s > 0.0):
                needed = min(1.0, 1.0 - s ** q_blocks)
                ring_fwd += share * ((r - 1) * needed * 2 * shard * e  # the needed k/v blocks
                                        + (r - 1) * B * (T / r) * shape.estimator_rank * e  # key estimates
                                        + (r - 1) * B * (T // shape.block_size))  # need bitmaps
                ring_bwd += share * (r - 1) * needed * 2 * shard * e
        if shape.dsv:  # estimator loss: sampled query rows all-reduced
            ring_fwd += 2 * (r - 1) / r * B * (H / u) * ESTIMATOR_SAMPLES * D * e * shape.depth
    token_bytes = (N - 1) / N * B * T * shape.hidden * e
    grad_bytes = 2 * (N - 1) / N * shape.grad_bytes if N > 1 else 0.0
    bw = link_gbps * 1e9 / 8 / 1e3  # bytes per ms
    t_fwd_attn, t_bwd_attn = t_attn * FORWARD_SHARE, t_attn * (1 - FORWARD_SHARE)
    parts = {"other": t_other1 / N, "attention_fwd+ring": max(t_fwd_attn, ring_fwd / bw),
             "attention_bwd": t_bwd_attn, "ring_bwd": ring_bwd / bw, "all_to_all": ulysses_bytes / bw,
             "token_gather": token_bytes / bw if N > 1 else 0.0, "grad_allreduce": grad_bytes / bw}
    if shape.dsv and r > 1 and (T // r) % shape.block_size:
        notes.append(f"ring with DSV needs T/ring ({T // r}) to be a multiple of block_size {shape.block_size}")
    if u > 1 and r > 1:
        notes.append("hybrid: estimate only (stbench runs pure ulysses or ring)")
    comm = ulysses_bytes + ring_fwd + ring_bwd + (token_bytes if N > 1 else 0.0) + grad_bytes
    return Estimate(layout_name(u, r), u, r, sum(parts.values()), int(round(comm)), imbalance,
                    {k: round(v, 3) for k, v in parts.items()}, notes)


def _matches(base: dict, other: dict) -> bool:
    keys = ("arch", "preset", "mode", "batch", "frames", "resolution", "dtype")
    return all(base.get(k) == other.get(k) for k in keys) and (base.get("overrides") or {}) == (
        other.get("overrides") or {})


def plan(records: list[dict], *, gpus: int, link_gbps: float, arch: str | None = None,
         tokens: int | None = None) -> list[dict]:
    """For each usable single-GPU record: every layout's estimate, the best, and measured runs to compare."""
    if gpus < 1:
        raise UserError(f"gpus: must be >= 1, got {gpus}")
    if not link_gbps or link_gbps <= 0 or not math.isfinite(link_gbps):
        raise UserError(f"link-gbps: must be a positive number, got {link_gbps}")
    if tokens is not None and tokens < 1:
        raise UserError(f"tokens: must be >= 1, got {tokens}")
    singles = [(i, r) for i, r in enumerate(records, 1) if (r.get("world_size") or 1) == 1
               and r.get("status") == "ok" and r.get("step_ms_median") and str(r.get("arch", "")).startswith("dit-")
               and (arch is None or r["arch"] == arch)]
    if not singles:
        what = f"arch {arch}" if arch else "a dit-* architecture"
        raise UserError(f"results: no single-GPU record with status ok and step_ms_median for {what}")
    plans = []
    for index, record in singles:
        shape = _dims(record, index)
        sparsity = head_sparsity(record, shape)
        step_ms = float(record["step_ms_median"])
        estimates = [estimate(shape, sparsity, step_ms, u, r, link_gbps, tokens) for u, r in layouts(gpus, shape.heads)]
        blocked = {est.layout: reason for est in estimates
                   if (reason := unrunnable(record, est.ulysses, est.ring)) is not None}
        best = min((est for est in estimates if est.layout not in blocked),
                   key=lambda est: (est.step_ms, est.comm_bytes))
        single = estimate(shape, sparsity, step_ms, 1, 1, link_gbps, tokens)
        measured = []
        for other in records:
            world = other.get("world_size") or 1
            if world > 1 and other.get("status") == "ok" and _matches(record, other) and \
                    other.get("context_parallel") in ("ulysses", "ring") and other.get("step_ms_median"):
                u, r = (world, 1) if other["context_parallel"] == "ulysses" else (1, world)
                est = estimate(shape, sparsity, step_ms, u, r, link_gbps)
                measured.append({"layout": est.layout, "world_size": world,
                                 "estimated_step_ms": est.step_ms, "measured_step_ms": other["step_ms_median"],
                                 "estimated_comm_bytes": est.comm_bytes,
                                 "measured_comm_bytes": other.get("comm_bytes")})
        plans.append({"record": record, "shape": shape, "tokens": tokens or shape.tokens, "estimates": estimates,
                      "single_gpu_ms": single.step_ms, "best": best, "measured": measured,
                      "unrunnable": blocked})
    return plans


NOT_RUNNABLE = "estimate only: stbench cannot run this layout"


def unrunnable(record: dict, u: int, r: int) -> str | None:
    """Why `stbench run` cannot run layout u x r of the record's case (None if it can): the planner recommends
    only layouts that can be measured. The checks are the ones a torchrun run makes (distributed.check_case)."""
    from .distributed import check_case

    if u > 1 and r > 1:
        return "not runnable: stbench runs ulysses or ring, not both at once"
    if u * r == 1:
        return None
    try:
        case = Case(arch=record["arch"], preset=record["preset"], mode=record["mode"], batch=record["batch"],
                    frames=record["frames"], resolution=record["resolution"], dtype=record["dtype"], device="cpu",
                    overrides=tuple(sorted((record.get("overrides") or {}).items())),
                    context_parallel="ulysses" if r == 1 else "ring")
        check_case(case, u * r)
    except (UserError, ValueError) as e:
        return f"not runnable: {e}"
    return None


def _mb(n) -> str:
    return "-" if n is None else f"{n / 1e6:.2f} MB"


def render(plans: list[dict], gpus: int, link_gbps: float) -> str:
    lines = [f"context-parallel plan: {gpus} GPU(s), {link_gbps:g} Gbit/s per link (model: stbench/planner.py)"]
    for p in plans:
        rec = p["record"]
        lines.append("")
        measured_at = f" at {p['shape'].tokens} tokens" if p["tokens"] != p["shape"].tokens else ""
        on_cpu = not str(rec.get("device") or "").startswith("cuda")
        source = "measured on CPU (every figure below is extrapolated from a CPU run, not a GPU figure)" \
            if on_cpu else "measured on 1 GPU"
        lines.append(f"{rec['arch']} {rec['preset']} r{rec['resolution']} f{rec['frames']} b{rec['batch']} "
                     f"{rec['dtype']} {rec['mode']}: {p['tokens']} tokens, {source}: "
                     f"{rec['step_ms_median']:.1f} ms/step{measured_at}")
        lines.append(f"  {'layout':34s} {'step ms':>10s} {'speedup':>8s} {'comm/rank/step':>15s} "
                     f"{'attn imbalance':>15s}")
        single = p["single_gpu_ms"]
        for est in sorted(p["estimates"], key=lambda e: e.step_ms):
            blocked = p.get("unrunnable", {}).get(est.layout)
            mark = "*" if est is p["best"] else "x" if blocked else " "
            notes = list(est.notes) + ([NOT_RUNNABLE, blocked] if blocked else [])
            layout = est.layout.replace("single GPU", "single CPU process") if on_cpu else est.layout
            lines.append(f"{mark} {layout:34s} {est.step_ms:10.2f} {single / est.step_ms:7.2f}x "
                         f"{_mb(est.comm_bytes):>15s} {est.attention_imbalance:14.2f}x"
                         + (f"  ({'; '.join(notes)})" if notes else ""))
        one = "one CPU process, extrapolated" if on_cpu else "1 GPU"
        lines.append(f"  best: {p['best'].layout} (*: the fastest layout stbench can run; {one} at this length: "
                     f"{single:.1f} ms/step; x: layouts stbench cannot run, estimates only)")
        for m in p["measured"]:
            ratio = m["estimated_step_ms"] / m["measured_step_ms"]
            lines.append(f"  measured {m['layout']} on {m['world_size']}: {m['measured_step_ms']:.2f} ms vs estimated "
                         f"{m['estimated_step_ms']:.2f} ms (x{ratio:.2f}); comm {_mb(m['measured_comm_bytes'])} vs "
                         f"estimated {_mb(m['estimated_comm_bytes'])}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--results", required=True, help="results.jsonl (or its run folder) with single-GPU runs")
    parser.add_argument("--gpus", type=int, required=True, help="GPU count to plan for")
    parser.add_argument("--link-gbps", type=float, required=True, help="per-GPU link bandwidth, Gbit/s")
    parser.add_argument("--arch", default=None, help="only this architecture (default: every dit-* in the file)")
    parser.add_argument("--tokens", type=int, default=None, help="plan at this sequence length (default: measured)")


def execute(args: argparse.Namespace) -> int:
    records = frame_records(load_frame(args.results))
    if not records:
        raise UserError(f"results: {args.results} holds no records")
    plans = plan(records, gpus=args.gpus, link_gbps=args.link_gbps, arch=args.arch, tokens=args.tokens)
    print(render(plans, args.gpus, args.link_gbps))
    return 0
