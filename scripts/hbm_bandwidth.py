"""Achieved memory bandwidth of PyTorch's eager memory-bound kernels, by kernel kind and tensor size.

A kernel microbenchmark (like the matmul one behind MAMF in stbench/predict/efficiency.py), not a training step:
each kind is timed alone (3 warm-up runs, then the median of --repeats runs queued back to back, each between its
own CUDA events: stbench.measure.timing.time_steps; --per-call: each run waited for before the next, a launch
latency inside each, as the committed H200 figures were timed), and its bytes are the
minimum a kernel must move (every input read once, every output written once). The fraction is of the
hardware table's datasheet bandwidth for the GPU (stbench.predicted_vs_measured.hardware_for_gpu).

    python scripts/hbm_bandwidth.py --out OUT.jsonl              # on a GPU
    python scripts/hbm_bandwidth.py --device cpu --sizes 1e5     # the same code on the CPU (no fraction)
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stbench.measure import timing  # noqa: E402

BF16, FP32 = torch.bfloat16, torch.float32


def kinds(n: int, device: str) -> dict:
    """name -> (setup() -> run callable, bytes moved per run) for tensors of n elements."""
    def t(dtype, count=n):
        return torch.randn(count, device=device).to(dtype)

    def copy(dst_dtype, src_dtype):
        dst, src = t(dst_dtype), t(src_dtype)
        return lambda: dst.copy_(src), n * (dst.element_size() + src.element_size())

    def add():
        a, b = t(BF16), t(BF16)
        return lambda: a + b, 3 * n * 2

    def mul_():
        a = t(FP32)
        return lambda: a.mul_(0.999), 2 * n * 4

    def row_sum():
        rows = max(1, n // 1024)
        a = t(BF16, rows * 1024).view(rows, 1024)
        return lambda: a.sum(-1, dtype=FP32), rows * 1024 * 2 + rows * 4

    def foreach_add_():
        sizes = _parameter_like(n)
        xs = [t(FP32, s) for s in sizes]
        ys = [t(FP32, s) for s in sizes]
        return lambda: torch._foreach_add_(xs, ys), 3 * sum(sizes) * 4

    def adamw_foreach():
        sizes = _parameter_like(n)
        params = [torch.nn.Parameter(t(FP32, s)) for s in sizes]
        for p in params:
            p.grad = torch.randn_like(p)
        opt = torch.optim.AdamW(params, lr=1e-4, foreach=True)
        opt.step()  # the moments exist from here on
        # minimum per parameter: read p, g, m, v (16 B), write p, m, v (12 B)
        return opt.step, 28 * sum(sizes)

    return {"copy bf16": lambda: copy(BF16, BF16), "cast fp32->bf16": lambda: copy(BF16, FP32),
            "cast bf16->fp32": lambda: copy(FP32, BF16), "add bf16": add, "mul_ fp32": mul_,
            "row sum bf16->fp32": row_sum, "_foreach_add_ fp32": foreach_add_, "AdamW foreach": adamw_foreach}


def _parameter_like(n: int) -> list[int]:
    """A model's parameter sizes adding up to about n: square-ish matrices and their biases, as in a DiT."""
    sizes, width = [], 1536
    while sum(sizes) < n:
        sizes += [min(width * width, max(1, n - sum(sizes))), width]
    return sizes


def seconds(run, device: str, repeats: int, per_call: bool) -> float:
    """Median seconds per run after 3 warm-up runs, timed by stbench.measure.timing.time_steps as `stbench run`
    times steps: on CUDA each run between its own events, queued without waiting, so a launch's latency hides
    behind the previous run. --per-call: each run waited for before the next is queued, a launch latency inside."""
    for _ in range(3):
        run()
    if per_call:
        return statistics.median(timing.time_steps(run, 1, device).median_ms for _ in range(repeats)) / 1e3
    return timing.time_steps(run, repeats, device).median_ms / 1e3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--sizes", default="1e6,1.6e7,6.4e7,2.56e8", help="elements per tensor, comma-separated")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--per-call", action="store_true",
                        help="time each run between its own CUDA events (reports/baselines/nvidia-h200/raw/"
                             "hbm_bandwidth.txt was measured so, before back-to-back timing was the default)")
    parser.add_argument("--out", type=Path, help="also append one JSON line per kind and size")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device (use --device cpu)")
    peak = None
    gpu = torch.cuda.get_device_name() if args.device == "cuda" else None
    if gpu:
        from stbench.predicted_vs_measured import hardware_for_gpu
        target = hardware_for_gpu(gpu)
        peak = target.bandwidth_bytes_s if target else None
    env = {"torch": torch.__version__, "device": args.device, "gpu": gpu, "datasheet_bytes_s": peak,
           "timing": "per call" if args.per_call else "back to back"}
    print(f"# {json.dumps(env)}")
    print(f"{'kind':22s} {'elements':>12s} {'bytes':>14s} {'ms':>9s} {'GB/s':>8s} {'of datasheet':>12s}")
    for n in (int(float(s)) for s in args.sizes.split(",")):
        for name, make in kinds(n, args.device).items():
            run, nbytes = make()
            s = seconds(run, args.device, args.repeats, args.per_call)
            fraction = nbytes / s / peak if peak else None
            print(f"{name:22s} {n:12d} {nbytes:14d} {s * 1e3:9.3f} {nbytes / s / 1e9:8.1f} "
                  f"{'' if fraction is None else f'{fraction:.3f}':>12s}", flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps({**env, "kind": name, "elements": n, "bytes": nbytes, "seconds": s,
                                        "fraction_of_datasheet": fraction}) + "\n")
            del run
            if args.device == "cuda":
                torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
