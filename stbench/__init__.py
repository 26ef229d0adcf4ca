"""stbench: benchmarking and profiling for training text-to-video models."""
import logging

__version__ = "0.1.0"

# diffusers imports bitsandbytes when it is installed, and bitsandbytes warns on every import on AVX512-BF16 CPUs that
# an optional 4-bit GEMM kernel package is missing: stbench uses only its 8-bit AdamW, which does not need it
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
