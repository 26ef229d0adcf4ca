"""Per-op roofline: time = max(FLOPs / peak, bytes moved / bandwidth), at least one kernel launch.

With an Efficiency (efficiency.py) the same sum gives the expected time: each kernel's FLOPs over the peak its
class achieves (GEMMs by shape, fused attention by backend and direction), its bytes over the bandwidth
memory-bound kernels achieve; with efficiency.IDEAL (every fraction 1) it is the bound exactly.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch.utils import flop_counter

from ..measure import flops as _flops  # noqa: F401 - registers the CPU flash-attention FLOP formulas
from .efficiency import FOREACH, IDEAL, UPCAST, Efficiency
from .hardware import Hardware

aten = torch.ops.aten
# Ops that launch no kernel: allocation without initialisation, and metadata (views are detected per op).
NO_KERNEL = {aten.empty.memory_format, aten.empty_like.default, aten.empty_strided.default,
             aten.detach.default, aten.lift_fresh.default, aten.set_.source_Storage_storage_offset}
CONVOLUTIONS = {aten.convolution.default, aten.convolution_backward.default}
HALF = {torch.bfloat16: "bf16", torch.float16: "fp16"}
# GEMM-like ops and the positions of their two matrix operands (output rows x columns read from them)
GEMMS = {aten.mm.default: (0, 1), aten.addmm.default: (1, 2), aten.bmm.default: (0, 1),
         aten.baddbmm.default: (1, 2)}
GEMM, ATTENTION, ATTENTION_BACKWARD, OTHER = "gemm", "attention", "attention_backward", "other"
COPIES = {aten._to_copy.default, aten.copy_.default, aten.copy.default}


@dataclass(frozen=True)
class OpCost:
    """What one kernel costs: its FLOPs, the bytes it reads and writes, and the math mode of its FLOPs."""

    name: str
    flops: int
    bytes: int
    math: str  # bf16 | fp16 | tf32 | fp32
    kind: str = OTHER  # gemm | attention | attention_backward | other (memory-bound unless it has FLOPs)
    gemm: tuple = ()  # (batch, rows, columns) of a GEMM's output (convolutions: implicit GEMM)
    memory: str = ""  # upcast | foreach: a memory-bound kernel with its own bandwidth; "": the common one
    backend: str = ""  # attention: the backend its op names (NAMED_BACKENDS); "": the hardware's default


def _tensors(tree):
    return [t for t in torch.utils._pytree.tree_leaves(tree) if isinstance(t, torch.Tensor)]


# aten's CUDA attention ops name their backend (ring attention calls FlashAttention-2's by name); the CPU flash op
# that SDPA reaches in a fake step stands for whichever backend SDPA picks on the GPU: the hardware's default
NAMED_BACKENDS = {f"_scaled_dot_product_{op}_attention{part}": backend
                  for op, backend in (("flash", "flash2"), ("efficient", "efficient"), ("cudnn", "cudnn"))
                  for part in ("", "_backward")}


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
    name = str(func)
    return OpCost(name, count, moved, math, kind_of(name), _gemm_shape(func, args, out),
                  _memory_class(func, name, inputs, outputs), NAMED_BACKENDS.get(func._overloadpacket.__name__, ""))


def _memory_class(func, name: str, inputs: list, outputs: list) -> str:
    """A widening copy (bf16 -> fp32: gradients into fp32 weights, autocast) or a foreach kernel; else ""."""
    if name.startswith("aten._foreach_"):
        return FOREACH
    if func in COPIES and inputs and outputs:
        source = inputs[-1] if func is not aten._to_copy.default else inputs[0]  # copy_(self, src)
        if (outputs[0].element_size() > source.element_size() and outputs[0].is_floating_point()
                and source.is_floating_point()):  # the measured kernel: bf16 -> fp32 (HBM_KERNELS)
            return UPCAST
    return ""


def kind_of(name: str) -> str:
    """The kernel class of an op by name: fused attention (forward or backward), GEMM, or other."""
    if "attention" in name:
        return ATTENTION_BACKWARD if "backward" in name else ATTENTION
    if any(name.startswith(f"aten.{g}") for g in ("mm", "addmm", "bmm", "baddbmm", "convolution")):
        return GEMM
    return OTHER


def _gemm_shape(func, args, out) -> tuple:
    """(batch, rows, columns) of the output tile grid: mm/addmm/bmm/baddbmm from their operands, a convolution
    as an implicit GEMM (rows = batch x output positions, columns = output channels; backward: the input's)."""
    try:
        if func in GEMMS:
            i, j = GEMMS[func]
            a, b = args[i], args[j]
            return (a.shape[0], a.shape[1], b.shape[2]) if a.dim() == 3 else (1, a.shape[0], b.shape[1])
        if func in CONVOLUTIONS:
            x = out if func is aten.convolution.default else args[0]  # backward: grad_output
            x = x if isinstance(x, torch.Tensor) else _tensors(x)[0]
            return (1, x.shape[0] * math.prod(x.shape[2:]), x.shape[1])
    except (AttributeError, IndexError, TypeError):
        pass
    return ()


@dataclass(frozen=True)
class StepTime:
    """A step's predicted time (ms): the roofline sum, and its pure-compute and pure-memory bounds."""

    step_ms: float
    compute_ms: float
    memory_ms: float
    kernels: int
    by_kind: dict = field(default_factory=dict)  # gemm | attention | attention_backward | other -> ms of step_ms


def compute_fraction(op: OpCost, efficiency: Efficiency) -> float:
    """The fraction of the dense peak `op`'s FLOPs run at under `efficiency`."""
    if op.kind == GEMM:
        return efficiency.gemm_fraction(*op.gemm) if op.gemm else efficiency.gemm
    if op.kind in (ATTENTION, ATTENTION_BACKWARD):
        return efficiency.attention_fraction(op.kind == ATTENTION_BACKWARD, op.backend)
    return efficiency.gemm if op.flops else 1.0  # other FLOP-counted ops are matmul-like (tensor cores)


def step_time(ops: list[OpCost], hardware: Hardware, efficiency: Efficiency = IDEAL) -> StepTime | None:
    """Sum over kernels of max(compute, memory, launch floor); None where the hardware has no time model.

    efficiency: IDEAL (default) gives the roofline bound; efficiency.for_hardware(...) the expected time.
    compute_ms and memory_ms are the pure-compute and pure-memory sums under the same efficiencies."""
    if hardware.bandwidth_bytes_s is None or not hardware.peak_tflops:
        return None
    total = compute = memory = 0.0
    by_kind: dict[str, float] = {}
    for op in ops:
        c, m, t = op_seconds(op, hardware, efficiency)
        compute += c
        memory += m
        total += t
        by_kind[op.kind] = by_kind.get(op.kind, 0.0) + t * 1e3
    return StepTime(total * 1e3, compute * 1e3, memory * 1e3, len(ops), by_kind)


def op_seconds(op: OpCost, hardware: Hardware, efficiency: Efficiency = IDEAL) -> tuple[float, float, float]:
    """One kernel's (compute, memory, time) in seconds: time = max(compute, memory, launch floor)."""
    c = op.flops / (hardware.peak(op.math) * compute_fraction(op, efficiency)) if op.flops else 0.0
    m = op.bytes / (hardware.bandwidth_bytes_s * efficiency.memory_fraction(op.memory))
    return c, m, max(c, m, hardware.launch_floor_us * 1e-6)
