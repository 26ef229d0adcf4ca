"""Where the gather kernel's forward+backward time goes at one sparsity (4096 tokens, 6 heads, head dim 64, fp32,
one thread, DSV's block selection included as `stbench attention` times it): mean wall time, user and system
CPU time and minor page faults per call, then torch.profiler's operators by self CPU time.

    OMP_NUM_THREADS=1 python scripts/profile_gather_kernel.py 0.9 > reports/dsv/profile-gather-s0.9.txt
"""
import resource
import sys
import time

import torch
from torch.profiler import profile

from architectures.attention.dsv import kept_blocks
from stbench.attention_bench import _fwd_bwd, _inputs, _sparse_fn

TOKENS, HEADS, HEAD_DIM, RANK, BLOCK, CALLS = 4096, 6, 64, 16, 64, 5


def main(sparsity: float) -> None:
    torch.set_num_threads(1)
    inputs, w_est = _inputs(1, HEADS, TOKENS, HEAD_DIM, RANK, "cpu", torch.float32)
    kept = kept_blocks(sparsity, TOKENS // BLOCK)
    step = _fwd_bwd(_sparse_fn("gather", w_est, BLOCK, kept, []), inputs)
    for _ in range(2):
        step()
    before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(CALLS):
        step()
    wall, after = (time.perf_counter() - start) / CALLS, resource.getrusage(resource.RUSAGE_SELF)
    print(f"s={sparsity}: {kept} of {TOKENS // BLOCK} key blocks; per call: wall {wall * 1e3:.1f} ms, user "
          f"{(after.ru_utime - before.ru_utime) / CALLS * 1e3:.1f} ms, system "
          f"{(after.ru_stime - before.ru_stime) / CALLS * 1e3:.1f} ms, minor page faults "
          f"{(after.ru_minflt - before.ru_minflt) // CALLS}")
    with profile() as prof:
        step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))


if __name__ == "__main__":
    main(float(sys.argv[1]))
