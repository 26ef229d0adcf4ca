"""`python -m stbench attention`: forward+backward time of block-sparse attention backends against SDPA.

One record per (backend, tokens, sparsity), appended and fsync'd as run's are (results.jsonl in --out), with
`step_ms_*` the forward+backward milliseconds and an `attention` field: the speed-up over SDPA at the same
tokens, the ideal speed-up 1/(1-s) and their ratio (sparse efficiency), and the fraction of score tiles the
kernel computed. Blocks are chosen by DSV's pipeline (low-rank estimates -> block scores -> top-k), so the
sparse time includes block selection as a training step's does. Backends are timed interleaved, round by
round, so load from other processes falls on all of them alike; samples of every round are kept.
"""
from __future__ import annotations

import argparse
import json
import math
import shlex
import statistics
import sys
from pathlib import Path

import torch

from . import results, runfolder
from .config import DTYPES, TORCH_DTYPES
from .errors import UserError
from .overrides import comma_list
from .measure import env, memory, timing

SPARSE_BACKENDS = ("gather", "flex")
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokens", default="4096", help="comma-separated sequence lengths (default 4096)")
    parser.add_argument("--sparsity", default="0.5,0.75,0.9", help="comma-separated block sparsities in [0, 1)")
    parser.add_argument("--backends", default=None,
                        help="comma-separated sparse backends: gather, flex (default: flex and gather on CUDA, "
                             "gather elsewhere)")
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--block-size", type=int, default=64, help="DSV block = kernel tile (default 64)")
    parser.add_argument("--rank", type=int, default=16, help="low-rank estimator dims (block selection)")
    parser.add_argument("--dtype", choices=DTYPES, default=None, help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per backend per round (default 5)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per backend first (default 2)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    parser.add_argument("--out", default=None, help="run folder (default: runs/attention-<UTC time>)")


def _inputs(B, H, N, D, rank, device, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, N, D, generator=g).to(device, dtype).requires_grad_() for _ in range(3))
    w_est = (torch.randn(H, D, rank, generator=g) / math.sqrt(rank)).to(device, dtype)
    return (q, k, v), w_est


def _sparse_fn(backend: str, w_est, block_size: int, topk: int, warnings: list):
    from architectures.attention import block_sparse_attention, estimate_block_scores, select_blocks

    def run(q, k, v):
        scale = q.shape[-1] ** -0.5
        with torch.no_grad():  # the estimator sees detached q, k, as in training
            q_est, k_est = (torch.einsum("bhnd,hdr->bhnr", t, w_est) for t in (q, k))
            mask = select_blocks(estimate_block_scores(q_est, k_est, block_size, scale), topk, kmax=topk)
        return block_sparse_attention(q, k, v, mask, block_size, scale, backend, kmax=topk, uniform=True,
                                      on_fallback=warnings.append)
    return run


def _fwd_bwd(fn, inputs):
    def step():
        for t in inputs:
            t.grad = None
        out = fn(*inputs)
        out.backward(torch.ones_like(out))
    return step


def _record(backend, args, device, dtype, N, sparsity, env_info):
    overrides = {"tokens": str(N), "heads": str(args.heads), "head_dim": str(args.head_dim),
                 "block_size": str(args.block_size)}
    if sparsity is not None:
        overrides["sparsity"] = str(sparsity)
    record = results.new_record(dict(arch=f"attention-{backend}", preset=results.ATTENTION_PRESET, overrides=overrides,
                                     mode="fwd+bwd", batch=args.batch, frames=None, resolution=None,
                                     dtype=dtype, device=device, compile=False))
    record["env"], record["warmup"] = env_info, args.warmup
    return record


def measure(args, out: Path) -> list[dict]:
    """Time every backend at every token count and sparsity, interleaved; append one record per case."""
    from architectures.attention import dense_attention
    from architectures.attention.dsv import kept_blocks
    from architectures.attention.sparse import computed_tiles, n_blocks, tile_flops
    from torch.utils import flop_counter

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("bf16" if device.startswith("cuda") else "fp32")
    backends = comma_list(args.backends, "backends", str) if args.backends else \
        (("flex", "gather") if device.startswith("cuda") else ("gather",))
    for b in backends:
        if b not in SPARSE_BACKENDS:
            raise UserError(f"backends: {b!r} is not legal; legal: {', '.join(SPARSE_BACKENDS)}")
    tokens, sparsities = comma_list(args.tokens, "tokens"), comma_list(args.sparsity, "sparsity", float)
    if min(tokens) < 1 or any(not 0 <= s < 1 for s in sparsities) or min(args.heads, args.head_dim, args.batch,
                                                                          args.block_size, args.repeats,
                                                                          args.rounds) < 1:
        raise UserError("tokens, heads, head-dim, batch, block-size, repeats, rounds: >= 1; sparsity: in [0, 1)")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device: {device!r} is not available on this machine (no CUDA device); legal: cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    env_info = env.collect_env(device)
    B, H, D, bs = args.batch, args.heads, args.head_dim, args.block_size
    written = []
    for N in tokens:
        inputs, w_est = _inputs(B, H, N, D, args.rank, device, TORCH_DTYPES[dtype])
        nk = n_blocks(N, bs)
        cases = {("sdpa", None): (_record("sdpa", args, device, dtype, N, None, env_info), _fwd_bwd(dense_attention, inputs))}
        for backend in backends:
            for s in sparsities:
                topk = kept_blocks(s, nk)
                record = _record(backend, args, device, dtype, N, s, env_info)
                record["attention"] = {"backend": backend, "tokens": N, "sparsity": s, "kept_blocks": topk,
                                       "blocks": nk, "heads": H, "head_dim": D, "block_size": bs,
                                       "computed_fraction": computed_tiles(backend, [topk] * H, nk, B) / (B * H * nk * nk)}
                cases[(backend, s)] = (record, _fwd_bwd(_sparse_fn(backend, w_est, bs, topk, record["warnings"]), inputs))
        samples = {key: [] for key in cases}
        failed = {}
        for round_ in range(args.rounds):  # interleaved: every backend once per round
            for key, (record, step) in cases.items():
                if key in failed:
                    continue
                try:
                    if round_ == 0:
                        timing.warm_up(step, args.warmup, device)
                    samples[key] += timing.time_steps(step, args.repeats, device).samples_ms
                except Exception as error:  # noqa: BLE001 - a failed backend is a result
                    failed[key] = error
                    memory.release_memory()
        sdpa = statistics.median(samples[("sdpa", None)]) if ("sdpa", None) not in failed else None
        for key, (record, _) in cases.items():
            if key in failed:
                error = failed[key]
                record["status"] = "oom" if memory.is_out_of_memory(error) else "error"
                record["error"] = f"{type(error).__name__}: {str(error)[:600]}"
            else:
                times = timing.StepTimes(samples[key])
                record.update(times.as_record_fields())
                record["warnings"].extend(times.warnings)
                record["status"] = "ok"
                if key[0] == "sdpa":
                    f, b = flop_counter.sdpa_flop_count((B, H, N, D), (B, H, N, D), (B, H, N, D)), \
                        flop_counter.sdpa_backward_flop_count((B, H, N, D), (B, H, N, D), (B, H, N, D), (B, H, N, D))
                    record["flops_per_step"] = f + b
                else:
                    info = record["attention"]
                    tiles = computed_tiles(key[0], [info["kept_blocks"]] * H, nk, B)
                    # score tiles only; the gather kernel (no recompute) skips the score matmul in backward
                    record["flops_per_step"] = sum(tile_flops(tiles, bs, bs, D, scores_recomputed=key[0] != "gather"))
                    speedup = sdpa / times.median_ms if sdpa else None
                    info.update(sdpa_ms_median=sdpa, speedup=speedup, ideal_speedup=1 / (1 - key[1]),
                                efficiency=speedup * (1 - key[1]) if speedup else None)
            record["warnings"] = list(dict.fromkeys(record["warnings"]))
            results.append_record(out / runfolder.RESULTS_FILE, record)
            written.append(record)
    return written


def execute(args: argparse.Namespace) -> int:
    out = Path(args.out or f"runs/attention-{env.utc_now().replace(':', '').replace('+0000', 'Z')}")
    argv = getattr(args, "argv", None)
    command = shlex.join(["python", "-m", "stbench", *(argv if argv is not None else sys.argv[1:])])
    settings = {k: v for k, v in vars(args).items() if k not in ("argv", "command") and not callable(v)}
    runfolder.open_run_folder(out, command=command, resume=False, settings=settings)
    written = measure(args, out)
    for r in written:
        a = r.get("attention") or {}
        figure = f"{r['step_ms_median']:.2f} ms" if r["status"] == "ok" else r["status"]
        if a.get("speedup"):
            figure += (f", {a['speedup']:.2f}x vs sdpa (ideal {a['ideal_speedup']:.2f}x, "
                       f"efficiency {a['efficiency']:.2f})")
        label = r["arch"] + (f" s={a['sparsity']}" if a else "")
        print(f"{label:24s} tokens={r['overrides']['tokens']:>6s}: {figure}")
    print(f"stbench: {len(written)} record(s) -> {out / runfolder.RESULTS_FILE}", file=sys.stderr)
    return 0

