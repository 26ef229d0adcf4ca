"""Attention-only forward+backward benchmark: dense SDPA vs DSV block-sparse attention at a given sparsity.

    python scripts/attention_bench.py --tokens 4096 --heads 6 --head-dim 64 --sparsity 0.9 --device cpu
    python scripts/attention_bench.py --tokens 16384 --heads 16 --head-dim 128 --dtype bf16 --device cuda
    python scripts/attention_bench.py --model tiny --frames 16 --resolution 256 --sparsity 0.9   # whole steps

Blocks are chosen by the DSV pipeline (random low-rank estimates -> estimate_block_scores -> select_blocks),
so the sparse timing includes block selection, like a training step does. Prints one JSON line per backend.
--model PRESET instead times whole training steps (AdamW) of dit-full and dit-dsv (dense_steps=0, forced
sparsity), interleaved step by step so that load from other processes falls on both alike.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import torch

from architectures.attention import block_sparse_attention, dense_attention, estimate_block_scores, select_blocks

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fwd_bwd(fn, inputs, device, warmup: int, repeats: int) -> list[float]:
    """Milliseconds per forward+backward of fn(*inputs), warm-up steps excluded."""
    samples = []
    for i in range(warmup + repeats):
        for t in inputs:
            t.grad = None
        sync(device)
        start = time.perf_counter()
        out = fn(*inputs)
        out.backward(torch.ones_like(out))
        sync(device)
        if i >= warmup:
            samples.append((time.perf_counter() - start) * 1e3)
    return samples


def time_model_steps(args, device) -> int:
    """Interleaved training steps of dit-full and dit-dsv; one JSON line per architecture."""
    import architectures

    overrides = {"dit-full": {}, "dit-dsv": {"dense_steps": 0, "sparsity": args.sparsity,
                                             "block_size": args.block_size}}
    steps = {}
    for name, extra in overrides.items():
        torch.manual_seed(0)
        model = architectures.build(name, args.model, device=device, **extra).set_training_mode(args.mode)
        opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-4)
        batch = model.make_batch(args.batch, args.frames, args.resolution, args.resolution, device=device,
                                 dtype=DTYPES[args.dtype])

        def step(model=model, opt=opt, batch=batch):
            model.loss(batch).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        steps[name] = (model, step)
    samples = {name: [] for name in steps}
    for i in range(args.warmup + args.repeats):
        for name, (_, step) in steps.items():
            sync(device)
            start = time.perf_counter()
            step()
            sync(device)
            if i >= args.warmup:
                samples[name].append((time.perf_counter() - start) * 1e3)
    _, h, w = args.frames, args.resolution // 16, args.resolution // 16
    for name, (model, _) in steps.items():
        stats = model.dsv_stats() if hasattr(model, "dsv_stats") else None
        print(json.dumps({"arch": name, "preset": args.model, "mode": args.mode, "batch": args.batch,
                          "frames": args.frames, "resolution": args.resolution, "tokens": args.frames * h * w,
                          "step_ms_median": round(statistics.median(samples[name]), 1),
                          "step_ms_samples": [round(x, 1) for x in samples[name]],
                          "threads": torch.get_num_threads(), "dsv": stats}))
    ratio = statistics.median(samples["dit-full"]) / statistics.median(samples["dit-dsv"])
    print(f"speed-up dit-dsv vs dit-full (training step): {ratio:.2f}x")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--dtype", choices=DTYPES, default="fp32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backends", default="sdpa,dsv", help="comma list of sdpa, dsv (auto), dsv-gather, dsv-flex")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    p.add_argument("--model", metavar="PRESET", help="time dit-full vs dit-dsv training steps of this preset")
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--mode", choices=("full", "temporal"), default="full")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if args.model:
        return time_model_steps(args, device)
    g = torch.Generator().manual_seed(0)
    B, H, N, D = args.batch, args.heads, args.tokens, args.head_dim
    q, k, v = (torch.randn(B, H, N, D, generator=g).to(device, dtype).requires_grad_() for _ in range(3))
    w_est = (torch.randn(H, D, args.rank, generator=g) / math.sqrt(args.rank)).to(device, dtype)
    nk = -(-N // args.block_size)
    topk = max(1, math.ceil((1 - args.sparsity) * nk - 1e-6))
    scale = D ** -0.5

    def dsv(backend):
        def run(q, k, v):
            with torch.no_grad():  # the estimator sees detached q, k (as in training)
                q_est, k_est = (torch.einsum("bhnd,hdr->bhnr", t, w_est) for t in (q, k))
                mask = select_blocks(estimate_block_scores(q_est, k_est, args.block_size, scale), topk)
            return block_sparse_attention(q, k, v, mask, args.block_size, scale, backend)
        return run

    fns = {"sdpa": dense_attention, "dsv": dsv("auto"), "dsv-gather": dsv("gather"), "dsv-flex": dsv("flex")}
    results = {}
    for name in args.backends.split(","):
        samples = time_fwd_bwd(fns[name], (q, k, v), device, args.warmup, args.repeats)
        results[name] = statistics.median(samples)
        print(json.dumps({"backend": name, "device": str(device), "dtype": args.dtype, "batch": B, "heads": H,
                          "tokens": N, "head_dim": D, "block_size": args.block_size, "sparsity": args.sparsity,
                          "kv_blocks_kept": f"{topk}/{nk}", "fwd_bwd_ms_median": round(results[name], 3),
                          "fwd_bwd_ms_samples": [round(s, 3) for s in samples],
                          "threads": torch.get_num_threads()}))
    for name in results:
        if name != "sdpa" and "sdpa" in results:
            print(f"speed-up {name} vs sdpa: {results['sdpa'] / results[name]:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
