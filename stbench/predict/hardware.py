"""The GPUs `stbench predict` knows: memory, bandwidth and dense peaks, every value with its source."""
from __future__ import annotations

import os
from dataclasses import dataclass, field

GB = 10**9
GIB = 2**30

# Datasheet peaks are dense (without 2:4 structured sparsity, which halves the marketing figure).
H100_DATASHEET = "NVIDIA H100 Tensor Core GPU datasheet (nvidia.com/en-us/data-center/h100), dense figures"
H200_DATASHEET = "NVIDIA H200 Tensor Core GPU datasheet (nvidia.com/en-us/data-center/h200), dense figures"
A100_DATASHEET = "NVIDIA A100 Tensor Core GPU datasheet (nvidia.com/en-us/data-center/a100), dense figures"
L40S_DATASHEET = "NVIDIA L40S datasheet (nvidia.com/en-us/data-center/l40s), dense figures"
L4_DATASHEET = "NVIDIA L4 Tensor Core GPU datasheet (nvidia.com/en-us/data-center/l4), dense figures"
ADA_WHITEPAPER = "NVIDIA Ada Lovelace GPU architecture whitepaper v2.1, GeForce RTX 4090 (fp32 accumulate)"
# Not a datasheet value: the CUDA context plus cuBLAS/cuDNN handles that PyTorch creates before the first
# kernel; stbench's own run records it as env.cuda_context_bytes (NVML, process memory before the model).
CONTEXT_SOURCE = "assumption: typical CUDA 12 context + cuBLAS/cuDNN workspace of a PyTorch process, 512 MiB"
LAUNCH_SOURCE = ("NVIDIA technical blog 'Getting Started with CUDA Graphs' (2019): back-to-back launches of a short "
                 "kernel take ~3.8 us each without graphs; rounded to a 4 us floor per kernel")
DGX_H100 = "NVIDIA DGX H100 user guide / datasheet: 8 GPUs on NVSwitch, 8x ConnectX-7 400 Gb/s (one per GPU)"
DGX_A100 = "NVIDIA DGX A100 datasheet: 8 GPUs on NVSwitch, 8x ConnectX-6 200 Gb/s HDR InfiniBand (one per GPU)"
PCIE_SPEC = "PCI-SIG: x16 Gen4 16 GT/s = ~32 GB/s, Gen5 32 GT/s = ~64 GB/s per direction (128b/130b coding)"
LATENCY_SOURCE = ("assumption: ~10 us per collective inside a node, ~20 us across nodes (NCCL small-message "
                  "latency order of magnitude); matters only for many small collectives")


@dataclass(frozen=True)
class Link:
    """One interconnect as a GPU sees it: bandwidth per direction per GPU, and a per-collective latency."""

    name: str
    bytes_s: float  # per direction, per GPU
    latency_us: float
    source: str


NVLINK4 = Link("NVLink 4 (NVSwitch)", 450e9, 10.0, H100_DATASHEET + ": NVLink 900 GB/s (both directions)")
NVLINK3 = Link("NVLink 3 (NVSwitch)", 300e9, 10.0, A100_DATASHEET + ": NVLink 600 GB/s (both directions)")
PCIE5 = Link("PCIe Gen5 x16", 64e9, 10.0, PCIE_SPEC)
PCIE4 = Link("PCIe Gen4 x16", 32e9, 10.0, PCIE_SPEC)
IB_NDR = Link("InfiniBand NDR 400 Gb/s per GPU", 50e9, 20.0, DGX_H100)
IB_HDR = Link("InfiniBand HDR 200 Gb/s per GPU", 25e9, 20.0, DGX_A100)
# PCIe servers have no reference design: the same NIC per GPU is assumed, and said to be assumed
IB_NDR_ASSUMED = Link(IB_NDR.name, IB_NDR.bytes_s, IB_NDR.latency_us, "assumption: one 400 Gb/s NIC per GPU as in "
                      + DGX_H100)
IB_HDR_ASSUMED = Link(IB_HDR.name, IB_HDR.bytes_s, IB_HDR.latency_us, "assumption: one 200 Gb/s NIC per GPU as in "
                      + DGX_A100)


@dataclass(frozen=True)
class Hardware:
    """One target device: memory, bandwidth, dense TFLOP/s per math mode, and where each number comes from."""

    name: str
    label: str
    memory_bytes: int
    bandwidth_bytes_s: float | None
    peak_tflops: dict = field(default_factory=dict)  # bf16, fp16, tf32, fp32 -> dense TFLOP/s
    context_bytes: int = 512 * 2**20
    caching_allocator: bool = True  # CUDA's caching allocator rounds and caches blocks; the CPU's does not
    launch_floor_us: float = 4.0
    sources: dict = field(default_factory=dict)
    gpu_pattern: str | None = None  # matches torch.cuda.get_device_name() of this GPU (measured records' env.gpu)
    # multi-GPU layouts: GPUs per node on `intra_link`, nodes joined by `inter_link` (None: one process only)
    gpus_per_node: int = 8
    intra_link: Link | None = None
    inter_link: Link | None = None

    def __post_init__(self):
        if self.memory_bytes <= 0:
            raise ValueError(f"{self.name}: memory_bytes must be > 0")
        for key, value in self.peak_tflops.items():
            if key not in ("bf16", "fp16", "tf32", "fp32") or value <= 0:
                raise ValueError(f"{self.name}: bad peak {key}={value}")

    def peak(self, math: str) -> float | None:
        """Dense FLOP/s of a math mode ('bf16', 'fp16', 'tf32', 'fp32'), None where unknown."""
        value = self.peak_tflops.get(math)
        return value * 1e12 if value else None

    def link(self, ranks: int) -> Link | None:
        """The slowest link a collective over `ranks` consecutive GPUs crosses (None: no multi-GPU model)."""
        if ranks <= 1:
            return None
        return self.intra_link if ranks <= self.gpus_per_node else self.inter_link


def _gpu(name, label, pattern, memory, bandwidth, bf16, tf32, fp32, datasheet, intra, inter):
    return Hardware(name=name, label=label, gpu_pattern=pattern, memory_bytes=memory, bandwidth_bytes_s=bandwidth,
                    peak_tflops={"bf16": bf16, "fp16": bf16, "tf32": tf32, "fp32": fp32},
                    intra_link=intra, inter_link=inter,
                    sources={"memory": datasheet, "bandwidth": datasheet, "peaks": datasheet,
                             "context_bytes": CONTEXT_SOURCE, "launch_floor_us": LAUNCH_SOURCE,
                             "intra_link": intra.source, "inter_link": inter.source,
                             "link_latency": LATENCY_SOURCE,
                             "gpus_per_node": "assumption: 8 GPUs per node (HGX/DGX or an 8-slot PCIe server)"})


def _cpu() -> Hardware:
    """This machine, fp32, for validation against `run`'s host_peak_bytes: memory only, no time model."""
    pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return Hardware(name="cpu", label="this machine (CPU)", memory_bytes=pages, bandwidth_bytes_s=None,
                    peak_tflops={}, context_bytes=0, caching_allocator=False, launch_floor_us=0.0,
                    sources={"memory": "os.sysconf(SC_PHYS_PAGES) * SC_PAGE_SIZE on this machine",
                             "peaks": "none: step time is not predicted for the CPU"})


# Memory sizes are the marketed GB (10^9 bytes); a GPU exposes slightly less to processes (ECC, reserved).
HARDWARE: dict[str, Hardware] = {h.name: h for h in (
    _gpu("h100-sxm", "H100 SXM5 80GB", r"H100(?!.*(PCIe|NVL))", 80 * GB, 3.35e12, 989.4, 494.7, 66.9, H100_DATASHEET,
         NVLINK4, IB_NDR),
    _gpu("h100-pcie", "H100 PCIe 80GB", r"H100.*PCIe", 80 * GB, 2.0e12, 756.5, 378.0, 51.2, H100_DATASHEET,
         PCIE5, IB_NDR_ASSUMED),
    _gpu("h200", "H200 SXM 141GB", r"(?<!G)H200(?!.*NVL)", 141 * GB, 4.8e12, 989.4, 494.7, 66.9, H200_DATASHEET,
         NVLINK4, IB_NDR),
    _gpu("a100-80g", "A100 SXM4 80GB", r"A100.*80GB", 80 * GB, 2.039e12, 312.0, 156.0, 19.5, A100_DATASHEET,
         NVLINK3, IB_HDR),
    _gpu("a100-40g", "A100 SXM4 40GB", r"A100.*40GB", 40 * GB, 1.555e12, 312.0, 156.0, 19.5, A100_DATASHEET,
         NVLINK3, IB_HDR),
    _gpu("l40s", "L40S 48GB", r"L40S", 48 * GB, 864e9, 362.05, 183.0, 91.6, L40S_DATASHEET,
         PCIE4, IB_NDR_ASSUMED),
    _gpu("l4", "L4 24GB", r"\bL4\b", 24 * GB, 300e9, 121.0, 60.0, 30.3, L4_DATASHEET,
         PCIE4, IB_HDR_ASSUMED),
    _gpu("rtx4090", "GeForce RTX 4090 24GB", r"RTX 4090", 24 * GB, 1008e9, 165.2, 82.6, 82.6, ADA_WHITEPAPER,
         PCIE4, IB_HDR_ASSUMED),
)}
NAMES = (*HARDWARE, "cpu")


def get(name: str) -> Hardware:
    if name == "cpu":
        return _cpu()
    if name not in HARDWARE:
        raise KeyError(name)
    return HARDWARE[name]
