"""FLOPs of one training step (torch.utils.flop_counter) and MFU against a per-device dense peak table."""
from __future__ import annotations

import re
from typing import Callable

import torch
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode


def _count_cpu_flash_attention() -> None:
    """torch counts the CUDA SDPA kernels but not the CPU flash kernel that CPU SDPA dispatches to; without this
    `flops_per_step` on CPU would leave attention out. Same arguments as the CUDA flash op, same formulas."""
    aten = torch.ops.aten
    for op, formula in (("_scaled_dot_product_flash_attention_for_cpu", flop_counter.sdpa_flop),
                        ("_scaled_dot_product_flash_attention_for_cpu_backward", flop_counter.sdpa_backward_flop)):
        packet = getattr(aten, op, None)
        if packet is not None and packet not in flop_counter.flop_registry:
            flop_counter.register_flop_formula(packet, get_raw=True)(formula)  # formula is already shape-wrapped


_count_cpu_flash_attention()

# Dense (no 2:4 sparsity) peak TFLOP/s from the vendors' datasheets: (name pattern, bf16/fp16 tensor core,
# fp32 without TF32). First match wins, so specific names come before general ones. fp16 uses the bf16 column.
PEAK_TFLOPS: tuple[tuple[str, float, float], ...] = (
    (r"GH200", 989.4, 66.9),  # before H200, which its name contains
    (r"H200 NVL", 835.5, 60.0),
    (r"H200", 989.4, 66.9),
    (r"H100 NVL", 835.5, 60.0),
    (r"H100.*PCIe", 756.5, 51.2),
    (r"H100", 989.4, 66.9),  # SXM5 (get_device_name: "NVIDIA H100 80GB HBM3")
    (r"A100", 312.0, 19.5),
    (r"L40S", 362.05, 91.6),
    (r"L40\b", 181.05, 90.5),
    (r"\bL4\b", 121.0, 30.3),
    (r"\bA10\b", 125.0, 31.2),
    (r"RTX 6000 Ada", 364.2, 91.1),
    (r"RTX 4090", 165.2, 82.6),  # fp32 accumulate
    (r"RTX 3090", 71.0, 35.6),
)


def peak_tflops(device_name: str | None, dtype: str) -> float | None:
    """Dense peak TFLOP/s of a device for a case dtype ('bf16', 'fp16', 'fp32'); None if unknown."""
    if not device_name:
        return None
    for pattern, half, single in PEAK_TFLOPS:
        if re.search(pattern, device_name):
            return single if dtype == "fp32" else half
    return None


def device_peak_tflops(device: str | torch.device, dtype: str) -> float | None:
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return peak_tflops(torch.cuda.get_device_name(device), dtype)


def tf32_enabled() -> bool:
    """Whether fp32 convolutions or matmuls may run on TF32 tensor cores (cuDNN allows it by default)."""
    return bool(torch.backends.cudnn.allow_tf32 or torch.backends.cuda.matmul.allow_tf32)


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of the matmul/conv/attention ops that `fn()` runs (forward and backward alike).

    Block-sparse attention is not traced (FlexAttention cannot run under a dispatch mode): it runs as it
    would anyway and reports the FLOPs of the score tiles its kernel computes (architectures' sparse hook).
    """
    from architectures.attention.sparse import count_sparse_flops

    counter = FlopCounterMode(display=False)
    with count_sparse_flops() as sparse, counter:
        fn()
    return int(counter.get_total_flops()) + sparse[0]


def throughput(flops: int | None, median_ms: float | None, peak: float | None) -> tuple[float | None, float | None]:
    """(achieved TFLOP/s, model FLOPs utilisation) from the FLOPs of a step and its median time."""
    if not flops or not median_ms:
        return None, None
    tflops = flops / (median_ms / 1e3) / 1e12
    return tflops, (tflops / peak if peak else None)
