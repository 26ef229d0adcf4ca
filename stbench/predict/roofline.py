"""Per-op roofline: time = max(FLOPs / peak, bytes moved / bandwidth), at least one kernel launch."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils import flop_counter

from ..measure import flops as _flops  # noqa: F401 - registers the CPU flash-attention FLOP formulas
from .hardware import Hardware

aten = torch.ops.aten
# Ops that launch no kernel: allocation without initialisation, and metadata (views are detected per op).
NO_KERNEL = {aten.empty.memory_format, aten.empty_like.default, aten.empty_strided.default,
             aten.detach.default, aten.lift_fresh.default, aten.set_.source_Storage_storage_offset}
CONVOLUTIONS = {aten.convolution.default, aten.convolution_backward.default}
HALF = {torch.bfloat16: "bf16", torch.float16: "fp16"}


@dataclass(frozen=True)
class OpCost:
    """What one kernel costs: its FLOPs, the bytes it reads and writes, and the math mode of its FLOPs."""

    name: str
    flops: int
    bytes: int
    math: str  # bf16 | fp16 | tf32 | fp32


def _tensors(tree):
    return [t for t in torch.utils._pytree.tree_leaves(tree) if isinstance(t, torch.Tensor)]


def launches_kernel(func) -> bool:
    return not (func in NO_KERNEL or getattr(func, "is_view", False) or func.namespace == "prim")


def op_cost(func, args, kwargs, out) -> OpCost:
    """FLOPs (torch.utils.flop_counter's formulas, as `run` counts them) and bytes of one executed op."""
    formula = flop_counter.flop_registry.get(func._overloadpacket)
    count = int(formula(*args, **kwargs, out_val=out)) if formula is not None else 0
    inputs, outputs = _tensors((args, kwargs)), _tensors(out)
    moved = sum(t.numel() * t.element_size() for t in inputs + outputs)
    dtype = inputs[0].dtype if inputs else torch.float32
    math = HALF.get(dtype) or ("tf32" if func in CONVOLUTIONS else "fp32")
    return OpCost(str(func), count, moved, math)


@dataclass(frozen=True)
class StepTime:
    """A step's predicted time (ms): the roofline sum, and its pure-compute and pure-memory bounds."""

    step_ms: float
    compute_ms: float
    memory_ms: float
    kernels: int


def step_time(ops: list[OpCost], hardware: Hardware) -> StepTime | None:
    """Sum over kernels of max(compute, memory, launch floor); None where the hardware has no time model."""
    if hardware.bandwidth_bytes_s is None or not hardware.peak_tflops:
        return None
    floor = hardware.launch_floor_us * 1e-6
    total = compute = memory = 0.0
    for op in ops:
        c = op.flops / hardware.peak(op.math) if op.flops else 0.0
        m = op.bytes / hardware.bandwidth_bytes_s
        compute += c
        memory += m
        total += max(c, m, floor)
    return StepTime(total * 1e3, compute * 1e3, memory * 1e3, len(ops))
