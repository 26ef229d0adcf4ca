"""Out of memory, told from other failures: a kernel lets it through (it is a measurement, status `oom` in
stbench's records), and only other failures send a kernel to its fallback."""
from __future__ import annotations

import torch

# Messages of out-of-memory errors that do not arrive as torch.OutOfMemoryError: the CPU allocator, a CUDA
# kernel launch or sync ("CUDA error: out of memory"), cuBLAS and cuDNN workspace allocations, and errors
# re-raised by torch.compile's backends (inductor, triton) with the original message inside.
OOM_MESSAGES = ("can't allocate memory", "cuda error: out of memory", "cuda out of memory",
                "cublas_status_alloc_failed", "cudnn_status_alloc_failed", "cudnn_status_not_enough_workspace")


def is_out_of_memory(error: BaseException | None) -> bool:
    """Out of memory in any CUDA or CPU flavour, also when wrapped (torch.compile re-raises backend errors)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, torch.OutOfMemoryError):
            return True
        text = str(error).lower()
        if any(message in text for message in OOM_MESSAGES):
            return True
        error = error.__cause__ or error.__context__
    return False
