"""Achievable fractions of a GPU's datasheet peaks, per kernel class, from published kernel benchmarks.

The roofline (roofline.py) divides FLOPs by the datasheet peak and bytes by the datasheet bandwidth: a lower
bound no real kernel reaches. The expected time divides them by what published kernel benchmarks measured
instead: GEMMs at the maximum achievable matmul FLOP/s, less the tiles and waves a GEMM's shape leaves idle;
fused attention at its backend's measured TFLOP/s, forward and backward apart; memory-bound kernels at a
measured fraction of HBM bandwidth; and a launch floor per kernel. No constant here is fitted to end-to-end
training times (the published training runs in reports/predict/published/ are what the expected time is judged
against, never an input).

Sources (every figure below cites one of them):
* MAMF: S. Bekman, ml-engineering, compute/accelerator/README.md, "Maximum Achievable Matmul FLOPS comparison
  table" (mamf-finder.py, BF16, mean of 100 iterations after 50 warm-up, best shape of a brute-force search):
  A100 SXM 271.2 of 312 TFLOP/s (86.9%), A100 PCIe 252.9 (81.1%), H100 SXM 794.5 of 989 (80.3%), GH200 828.6
  (83.6%).
* TILES: NVIDIA Deep Learning Performance documentation, "Matrix Multiplication Background User's Guide": cuBLAS
  computes a GEMM's output in thread-block tiles (256x128, 128x256, 128x128 among the largest and most efficient),
  one tile per SM at a time; a dimension that is not a multiple of the tile wastes the padded part (tile
  quantization) and a tile count that is not a multiple of the SM count leaves SMs idle in the last wave (wave
  quantization).
* SMS: SM counts from NVIDIA's architecture whitepapers / datasheets: A100 108, H100 SXM5 132, H100 PCIe 114,
  H200 132 (GH100 as H100 SXM5), L40S 142, L4 58, RTX 4090 128.
* FA2: T. Dao, FlashAttention-2 (arXiv 2307.08691), Sec. 4.1: on A100 the forward pass reaches up to 73% and the
  backward pass up to 63% of the theoretical maximum FLOP/s.
* FA3: J. Shah et al., FlashAttention-3 (arXiv 2407.08608), Fig. 5 and 6 (H100 80GB SXM5, BF16, head dim 128,
  no causal mask, sequence length 16k): forward FlashAttention-2 370, cuDNN 595, FlashAttention-3 648 TFLOP/s;
  backward FlashAttention-2 322, cuDNN 516, FlashAttention-3 561 TFLOP/s (of 989).
* HBM: NVIDIA developer forum, "Trouble to reach peak bandwidth of A100" (2025): a streaming read kernel reaches
  1.80 of the A100 80GB SXM's 2.04 TB/s, 88% by Nsight Compute, and the best kernel in the GTC talk it cites about
  90%; 88% is used for every GPU's HBM (no equally direct published figure for the others).
* CUDNN_SDPA: PyTorch pull request #162073 ("[cuDNN][SDPA] Enable cuDNN SDPA by default for SM 9.0, SM 10.0",
  for 2.9); `check_prefer_cudnn_attention()` in aten/src/ATen/native/transformers/cuda/sdp_utils.cpp puts cuDNN
  first on sm90/sm100 when the bundled cuDNN is newer than 9.15.0, which the wheels' cuDNN is from torch 2.11
  (huggingface/transformers pull request #48163, closing comment). Seen on the lent H200 with torch
  2.11.0+cu130: every SDPA kernel of wan, the UNets and the DiTs was `cudnn_generated_fort_native_sdpa_sm90_*`
  (reports/baselines/nvidia-h200/raw/traces/).
* EAGER_HOST: J. Lin, "From PyTorch op to kernel launch" (GPU kernel serving course, lesson 18): an eager op
  costs the CPU about 5-25 us before its kernel runs (Python, pybind11, autograd, the ATen dispatcher, the
  backend's set-up, cudaLaunchKernel). On the lent H200, eager serial-unet at 256 px x 16 frames took 235 ms a
  step for 83 ms of kernels (6,811 kernels: 34 us of wall time each; reports/baselines/nvidia-h200/).
* HBM_KERNELS: measured on the lent H200 (torch 2.11.0+cu130) by `python scripts/hbm_bandwidth.py`, a kernel
  microbenchmark apart from any training step (reports/baselines/nvidia-h200/raw/hbm_bandwidth.txt), at 256M
  elements (1-3 GB a kernel): a bf16 copy, an fp32->bf16 cast, a bf16 add and an fp32 mul_ reached 0.85-0.89 of
  the datasheet's 4.8 TB/s (HBM's 88% holds), but a bf16->fp32 cast only 0.434 and an fp32 `_foreach_add_` over a
  DiT-like parameter list 0.716. Each kernel was timed between its own CUDA events, so a launch latency (at most
  the 36 us of the 1M-element rows) is inside each figure: the two are low by at most 5% (0.456, 0.746). Applied
  to H100 as the same GH100 die; no such figure for the other GPUs.
* LAUNCH: NVIDIA technical blog, "Getting Started with CUDA Graphs" (A. Gray, 2019): back-to-back launches of a
  short kernel take about 3.8 us each without graphs; the hardware table's 4 us floor.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

HOST_BOUND = "host-bound risk (predicted)"  # the start of estimate.host_bound's warning (the report finds it)


def is_host_bound(record: dict) -> bool:
    """predict warned that the CPU may not launch this record's kernels as fast as the GPU runs them."""
    return any(str(w).startswith(HOST_BOUND) for w in record.get("warnings") or ())


EAGER_HOST_US = (5.0, 25.0)  # CPU time an eager op costs before its kernel runs, low and high (EAGER_HOST above)
HBM_KERNELS = ("measured on the lent H200 by scripts/hbm_bandwidth.py at 256M elements "
               "(reports/baselines/nvidia-h200/raw/hbm_bandwidth.txt): bf16->fp32 cast 0.434, fp32 _foreach_add_ "
               "0.716 of 4.8 TB/s (each low by at most 5%: one launch latency inside each timing)")
UPCAST, FOREACH = "upcast", "foreach"  # memory-bound kernels with a bandwidth of their own (roofline._memory_class)
HOPPER_MEMORY = {UPCAST: 0.434, FOREACH: 0.716}  # HBM_KERNELS
MAMF = "ml-engineering compute/accelerator/README.md, Maximum Achievable Matmul FLOPS table (BF16, mamf-finder.py)"
TILES = "NVIDIA Matrix Multiplication Background User's Guide: tile and wave quantization (cuBLAS thread-block tiles)"
FA2 = "FlashAttention-2 (arXiv 2307.08691) Sec. 4.1: A100 forward up to 73%, backward up to 63% of peak"
FA3 = ("FlashAttention-3 (arXiv 2407.08608) Fig. 5/6: H100 SXM5 BF16 hdim 128 non-causal seqlen 16k, forward "
       "FA2 370 / cuDNN 595 / FA3 648, backward FA2 322 / cuDNN 516 / FA3 561 TFLOP/s")
HBM = ("NVIDIA developer forum 'Trouble to reach peak bandwidth of A100': 1.80 of 2.04 TB/s (88%, Nsight "
       "Compute) on A100 80GB SXM; ~90% the best kernel in the cited GTC talk")
SM_SOURCE = "NVIDIA architecture whitepapers / datasheets: streaming multiprocessor count"
# cuBLAS' largest thread-block tiles (TILES): the heuristics pick the tile that wastes least; larger is faster
GEMM_TILES = ((256, 128), (128, 256), (128, 128))
BACKENDS = ("flash2", "flash3", "cudnn", "efficient")

# Attention backends' achievable fraction of the dense BF16 peak, (forward, backward).
HOPPER_ATTENTION = {"flash2": (370 / 989.4, 322 / 989.4), "flash3": (648 / 989.4, 561 / 989.4),
                    "cudnn": (595 / 989.4, 516 / 989.4)}
AMPERE_ATTENTION = {"flash2": (0.73, 0.63)}
# PyTorch's SDPA runs FlashAttention-2 for bf16/fp16 on sm80+ (SDPBackend.FLASH_ATTENTION first in its priority
# order), except on Hopper, where torch >= 2.11 puts cuDNN first (CUDNN_SDPA; `Efficiency.backend` of the Hopper
# entries). The memory-efficient (xformers/cutlass) kernel has no figure on these GPUs in the sources above, so
# it takes FlashAttention-2's (said so in the sources of each table).
DEFAULT_BACKEND = "flash2"
CUDNN_SDPA = ("PyTorch #162073 / sdp_utils.cpp check_prefer_cudnn_attention(): cuDNN first on sm90 with the "
              "bundled cuDNN > 9.15.0 (torch >= 2.11); seen on the lent H200, torch 2.11.0+cu130 "
              "(reports/baselines/nvidia-h200/raw/traces/)")


@dataclass(frozen=True)
class Efficiency:
    """Achievable fractions of the peaks per kernel class on one GPU, with a source for each (1.0: the bound)."""

    gemm: float = 1.0  # large GEMM: fraction of the dense peak (MAMF)
    attention: dict = field(default_factory=dict)  # backend -> (forward, backward) fraction of the dense peak
    backend: str = DEFAULT_BACKEND
    memory: float = 1.0  # fraction of HBM bandwidth a memory-bound kernel reaches
    memory_by_class: dict = field(default_factory=dict)  # roofline.UPCAST / FOREACH -> their own fraction
    sms: int | None = None  # None: no tile or wave quantization (the bound)
    sources: dict = field(default_factory=dict)

    def __post_init__(self):
        unknown = set(self.memory_by_class) - {UPCAST, FOREACH}
        if unknown:
            raise ValueError(f"memory class {sorted(unknown)}: legal {UPCAST}, {FOREACH}")
        for name, value in (("gemm", self.gemm), ("memory", self.memory),
                            *((f"memory {k}", v) for k, v in self.memory_by_class.items()),
                            *((f"attention {k}", v) for k, pair in self.attention.items() for v in pair)):
            if not 0 < value <= 1:
                raise ValueError(f"efficiency {name} must be in (0, 1], got {value}")

    def attention_fraction(self, backward: bool, backend: str = "") -> float:
        """(forward or backward) fraction of the dense peak of `backend`'s kernels ("": this hardware's default)."""
        pair = self.attention.get(backend or self.backend) or self.attention.get(DEFAULT_BACKEND) or (1.0, 1.0)
        return pair[1] if backward else pair[0]

    def memory_fraction(self, memory_class: str = "") -> float:
        """The fraction of HBM bandwidth a memory-bound kernel of this class reaches ("": the common one)."""
        return self.memory_by_class.get(memory_class, self.memory)

    def gemm_fraction(self, batch: int, m: int, n: int) -> float:
        """Achievable fraction of the peak for a GEMM with a (batch x) m x n output: MAMF times the share of
        SM-tile slots doing useful work with the best of cuBLAS' large tiles (tile and wave quantization)."""
        if self.sms is None or m <= 0 or n <= 0:
            return self.gemm
        best = 0.0
        for tm, tn in GEMM_TILES:
            rows, cols = math.ceil(m / tm), math.ceil(n / tn)
            tiles = max(1, batch) * rows * cols
            waves = math.ceil(tiles / self.sms)
            useful = max(1, batch) * m * n / (waves * self.sms * tm * tn)
            best = max(best, useful)
        return self.gemm * min(1.0, best)


IDEAL = Efficiency(sources={"all": "1.0: the roofline bound (datasheet peaks, no quantization)"})


def for_hardware(hardware, backend: str | None = None) -> Efficiency:
    """The published efficiencies of a GPU in the hardware table (IDEAL for the CPU, which has no time model)."""
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"attention backend {backend!r}: legal {', '.join(BACKENDS)}")
    known = EFFICIENCIES.get(hardware.name)
    if known is None:
        return IDEAL
    return known if backend is None else replace(known, backend=backend)


def _gpu(gemm, gemm_source, attention, attention_source, sms, backend=DEFAULT_BACKEND, backend_source=None,
         memory_by_class=None):
    return Efficiency(gemm=gemm, attention=attention, backend=backend, memory=0.88, sms=sms,
                      memory_by_class=memory_by_class or {},
                      sources={"gemm": gemm_source, "tiles": TILES, "attention": attention_source, "memory": HBM,
                               **({"memory_by_class": HBM_KERNELS} if memory_by_class else {}),
                               "sms": SM_SOURCE, "backend": backend_source or "SDPBackend priority: flash2 first",
                               "efficient": "no published figure: the memory-efficient backend takes flash2's"})


# Ada (L40S, L4, RTX 4090): no MAMF or FlashAttention figure in the sources; they take Ampere's (same
# FlashAttention-2 kernels, sm80-class tensor-core instructions) and say so in their sources.
_ADA = "no published MAMF figure for Ada: A100 SXM's 271.2/312 (86.9%, " + MAMF + ")"
EFFICIENCIES: dict[str, Efficiency] = {
    "h100-sxm": _gpu(794.5 / 989, MAMF + ": H100 SXM 794.5/989", HOPPER_ATTENTION, FA3, 132, "cudnn", CUDNN_SDPA,
                     HOPPER_MEMORY),
    "h100-pcie": _gpu(794.5 / 989, MAMF + ": H100 SXM's 80.3% (no PCIe figure)", HOPPER_ATTENTION,
                      FA3 + " (SXM5 figures)", 114, "cudnn", CUDNN_SDPA, HOPPER_MEMORY),
    "h200": _gpu(828.6 / 989, MAMF + ": GH200 828.6/989 (same GH100 die, HBM3e)", HOPPER_ATTENTION, FA3, 132,
                 "cudnn", CUDNN_SDPA, HOPPER_MEMORY),
    "a100-80g": _gpu(271.2 / 312, MAMF + ": A100 SXM 271.2/312", AMPERE_ATTENTION, FA2, 108),
    "a100-40g": _gpu(271.2 / 312, MAMF + ": A100 SXM 271.2/312", AMPERE_ATTENTION, FA2, 108),
    "l40s": _gpu(271.2 / 312, _ADA, AMPERE_ATTENTION, FA2 + " (A100 figures)", 142),
    "l4": _gpu(271.2 / 312, _ADA, AMPERE_ATTENTION, FA2 + " (A100 figures)", 58),
    "rtx4090": _gpu(271.2 / 312, _ADA, AMPERE_ATTENTION, FA2 + " (A100 figures)", 128),
}
