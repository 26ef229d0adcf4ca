"""Exact block-sparse attention kernels (FlexAttention, gather) and the work they compute.

`block_sparse_attention` runs one backend per call and never decides anything process-wide: a kernel that
fails (other than out of memory) falls back to the gather path for that call and reports it through
`on_fallback`, so the caller (the DSV layer) can write it into its case's warnings.

`count_sparse_flops()` is the hook FLOP counters use: while it is active the kernels run hidden from
dispatch modes (a FlopCounterMode would make dynamo skip the compiled FlexAttention) and their FLOPs are
added analytically from the score tiles the kernel computes, with torch's own SDPA formulas.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.utils import flop_counter
from torch.utils._python_dispatch import _disable_current_modes

from .flex import flex_available, flex_block_sparse_attention, flex_head_dim, flex_supports
from .oom import is_out_of_memory

CPU_CHUNK_ELEMENTS = 1 << 18  # score elements per chunk and CPU thread (1 MB fp32): see _GatherAttention
DEVICE_CHUNK_ELEMENTS = 1 << 27  # elsewhere: few, large chunks (the scores are materialised, unlike flash)

_flop_tally: list[int] | None = None  # set by count_sparse_flops(): [FLOPs] of the sparse kernels


def n_blocks(tokens: int, block_size: int) -> int:
    return -(-tokens // block_size)


def pad_tokens(x, block_size: int):  # (B, H, N, D) -> (B, H, Np, D), Np a multiple of block_size
    pad = n_blocks(x.shape[-2], block_size) * block_size - x.shape[-2]
    return F.pad(x, (0, 0, 0, pad)) if pad else x


def block_mask_to_token_mask(block_mask, block_size: int, n_q: int, n_kv: int):  # -> bool (B, H, n_q, n_kv)
    """The token-level mask a block mask stands for (the dense reference of `block_sparse_attention`)."""
    m = block_mask.repeat_interleave(block_size, -2).repeat_interleave(block_size, -1)
    return m[..., :n_q, :n_kv]


@contextlib.contextmanager
def count_sparse_flops():
    """Yield a one-element list that collects the analytic FLOPs (forward and backward) of sparse attention."""
    global _flop_tally
    outer, _flop_tally = _flop_tally, [0]
    try:
        yield _flop_tally
    finally:
        _flop_tally = outer


def tile_flops(tiles: int, q_rows: int, kv_cols: int, head_dim: int,
               scores_recomputed: bool = True) -> tuple[int, int]:
    """(forward, backward) FLOPs of `tiles` score tiles of q_rows x kv_cols, by torch's SDPA formulas.

    scores_recomputed=False: the backward reuses the forward's probabilities (the gather kernel without
    recompute) and skips the score matmul Q K^T that SDPA's backward formula counts.
    """
    q, kv = (tiles, 1, q_rows, head_dim), (tiles, 1, kv_cols, head_dim)
    backward = flop_counter.sdpa_backward_flop_count(q, q, kv, kv)
    if not scores_recomputed:
        backward -= flop_counter.bmm_flop((tiles, q_rows, head_dim), (tiles, head_dim, kv_cols))
    return flop_counter.sdpa_flop_count(q, kv, kv), backward


class _HiddenFromModes(torch.autograd.Function):
    """Runs a kernel (forward and backward) outside the active dispatch modes and tallies its FLOPs instead."""

    @staticmethod
    def forward(ctx, q, k, v, fn, flops):
        with _disable_current_modes(), torch.enable_grad():
            leaves = tuple(t.detach().requires_grad_(t.requires_grad) for t in (q, k, v))
            out = fn(*leaves)
        if _flop_tally is not None:
            _flop_tally[0] += flops[0]
        ctx.leaves, ctx.out, ctx.flops = leaves, out, flops[1]
        return out.detach()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        wanted = [t for t in ctx.leaves if t.requires_grad]
        with _disable_current_modes():
            grads = iter(torch.autograd.grad(ctx.out, wanted, grad))
        if _flop_tally is not None:
            _flop_tally[0] += ctx.flops
        leaves, ctx.leaves, ctx.out = ctx.leaves, None, None
        return tuple(next(grads) if t.requires_grad else None for t in leaves) + (None, None)


def choose_backend(backend: str, device: torch.device, block_size: int) -> str:
    """'flex' or 'gather' for a requested backend ('auto': FlexAttention where it has a backward, CUDA)."""
    if backend == "auto":
        return "flex" if flex_available(device) and flex_supports(block_size) else "gather"
    return backend


def computed_tiles(backend: str, topk: list[int], n_q_blocks: int, batch: int) -> int:
    """Score tiles (block_size x block_size) the backend computes for heads keeping `topk` key blocks each.

    FlexAttention visits exactly the selected blocks; the gather path pads every row to the longest row of
    the call (kmax blocks; the padding slots are masked, but computed).
    """
    if backend == "flex":
        return batch * n_q_blocks * sum(topk)
    return batch * n_q_blocks * max(topk) * len(topk)


def block_sparse_attention(q, k, v, block_mask, block_size: int, scale: float | None = None,
                           backend: str = "auto", recompute: bool = False, *, kmax: int | None = None,
                           uniform: bool = False, on_fallback=None):  # -> (B, H, N, D)
    """Attention of each query block to its selected key/value blocks only; equals dense attention with
    `block_mask_to_token_mask` as the mask. Every row must select at least one block.
    q (B, H, Nq, D), k, v (B, H, Nk, D); block_mask bool (B, H, ceil(Nq / bs), ceil(Nk / bs)); queries may
    be a shard of the keys' sequence (ring context parallelism).

    backend: 'auto' (FlexAttention on CUDA, gather elsewhere), 'flex' or 'gather'. kmax: the most blocks any
    row selects, when the caller knows it (no host synchronisation then); uniform: every row selects exactly
    kmax (the gather path then needs no mask where no key is padding). recompute (gather only): save
    memory by gathering again in backward. on_fallback(message): called when FlexAttention failed here and
    the gather path ran instead (with backend 'flex' the failure is raised).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    chosen = choose_backend(backend, q.device, block_size)
    B, H, N, D = q.shape
    nq = n_blocks(N, block_size)
    if kmax is None:
        kmax = int(block_mask.sum(-1).max())  # a host synchronisation: callers in the sparse stage pass kmax
    tiles = computed_tiles(chosen, [kmax] * H, nq, B) if chosen == "gather" else None

    def gather(q, k, v):
        return _gather_unpadded(q, k, v, block_mask, block_size, scale, recompute, kmax, uniform)

    def flex(q, k, v):
        return flex_block_sparse_attention(q, k, v, block_mask, block_size, scale, on_fallback=on_fallback,
                                           fallback=gather)

    def run(fn, tiles, dim=D, scores_recomputed=recompute):  # the gather kernel's backward reuses its scores
        if _flop_tally is None:
            return fn(q, k, v)
        return _HiddenFromModes.apply(q, k, v, fn, tile_flops(tiles, block_size, block_size, dim, scores_recomputed))

    if chosen == "flex":
        # every row of the DSV mask keeps exactly its head's k blocks: the flex tiles are these blocks
        flex_tiles = int(block_mask.sum()) if _flop_tally is not None else 0  # counting pass: sync allowed
        try:
            return run(flex, flex_tiles, flex_head_dim(D), scores_recomputed=True)
        except Exception as error:  # noqa: BLE001 - classified below
            if backend == "flex" or is_out_of_memory(error):
                raise
            if on_fallback is not None:
                on_fallback(f"FlexAttention failed ({type(error).__name__}: {str(error).splitlines()[0][:200]}); "
                            f"this call ran on the gather path")
            tiles = computed_tiles("gather", [kmax] * H, nq, B)
    return run(gather, tiles)


def _gather_unpadded(q, k, v, block_mask, block_size: int, scale: float, recompute: bool = False,
                     kmax: int | None = None, uniform: bool = False):
    nq, nk = q.shape[-2], k.shape[-2]
    q, k, v = (pad_tokens(t, block_size) for t in (q, k, v))  # (B, H, Np, D)
    return gather_block_sparse_attention(q, k, v, block_mask, block_size, nk, scale, recompute, kmax,
                                         uniform)[..., :nq, :]


@torch._disable_dynamo  # data-dependent sizes and a hand-written backward: run eagerly inside torch.compile
def gather_block_sparse_attention(q, k, v, block_mask, block_size: int, seq_len: int, scale: float,
                                  recompute: bool = False, kmax: int | None = None, uniform: bool = False):
    """Exact block-sparse attention by gathering each query block's key/value blocks (any device).

    q (B, H, nQ*bs, D), k and v (B, H, nK*bs, D), block_mask (B, H, nQ, nK); keys from `seq_len` on are
    padding. Queries may be a shard of the keys' sequence (ring context parallelism). kmax: the most blocks a
    row selects if known (else read from the mask: a host synchronisation). Rows that select fewer, and
    padded keys, are masked; `uniform` (every row selects kmax) with no padded key needs no mask at all.
    """
    B, H, Nq, D = q.shape
    nq, nk = Nq // block_size, k.shape[-2] // block_size
    rows = B * H * nq
    counts = block_mask.sum(-1).view(rows)  # key blocks per query block
    if kmax is None:
        kmax = int(counts.max())
    order = torch.argsort(block_mask.to(torch.int8), dim=-1, descending=True, stable=True)[..., :kmax]
    order = order.reshape(rows, kmax)
    flat = order + (torch.arange(B * H, device=q.device) * nk).repeat_interleave(nq)[:, None]  # (rows, kmax)
    mask = None
    if not uniform or k.shape[-2] != seq_len:  # SDPA without a mask takes the faster fused kernel
        slot_ok = torch.arange(kmax, device=q.device) < counts[:, None]  # (rows, kmax)
        token = order[..., None] * block_size + torch.arange(block_size, device=q.device)  # (rows, kmax, bs)
        mask = (slot_ok[..., None] & (token < seq_len)).view(rows, 1, kmax * block_size)
    return gather_attention(q.reshape(rows, block_size, D), k.reshape(B * H * nk, block_size, D),
                            v.reshape(B * H * nk, block_size, D), flat, mask, scale, recompute).view(B, H, Nq, D)


@torch._disable_dynamo
def gather_token_attention(q, k, v, key_index, block_size: int, scale: float, recompute: bool = False):
    """Exact attention of each query block to its own set of key tokens (token-level key selection).

    q, k, v (B, H, N, D); key_index (B, H, nQ, kt) long, distinct tokens < N per query block.
    """
    B, H, N, D = q.shape
    nq, kt = key_index.shape[-2], key_index.shape[-1]
    qp = pad_tokens(q, block_size)
    rows = B * H * nq
    flat = (key_index + (torch.arange(B * H, device=q.device) * N).view(B, H, 1, 1)).reshape(rows, kt)
    out = gather_attention(qp.reshape(rows, block_size, D), k.reshape(B * H * N, 1, D), v.reshape(B * H * N, 1, D),
                           flat, None, scale, recompute)
    return out.view(B, H, nq * block_size, D)[..., :N, :]


def gather_attention(q, k, v, flat, mask, scale: float, recompute: bool = False):
    """q (rows, bq, D) attends to the key/value pieces flat (rows, m) of k, v (pieces, bk, D) -> (rows, bq, D).

    mask: bool (rows, 1, m*bk), False where a gathered key is not attended (padding), or None.
    """
    rows, bq, _ = q.shape
    scores_per_row = bq * flat.shape[1] * k.shape[1]
    # on CPU each thread's share of a chunk stays in its cache; fewer, larger parallel regions with more threads
    budget = CPU_CHUNK_ELEMENTS * torch.get_num_threads() if q.device.type == "cpu" else DEVICE_CHUNK_ELEMENTS
    step = max(1, min(rows, budget // scores_per_row))
    return _GatherAttention.apply(q, k, v, flat, mask, scale, step, recompute)


class _GatherAttention(torch.autograd.Function):
    """Softmax attention of query-block chunks on their gathered key/value blocks, as batched matmuls.

    Forward keeps, per chunk, the probabilities P (one fused softmax over the scores S = scale * Q K^T on the
    gathered keys); backward then needs four matmuls (dV, dP, dQ, dK) instead of a flash kernel's five, and
    no exponential. `recompute` keeps only the inputs and the log-sum-exp and recomputes P in backward (five
    matmuls, as flash does).
    """

    # Why not SDPA per chunk: on CPU its flash kernel splits a 64-query problem into 32-row tiles (slow GEMMs),
    # and its autograd keeps the gathered keys and values or gathers them twice. A chunk's scores
    # (CPU_CHUNK_ELEMENTS per thread) are meant to stay in cache; at one thread 2^17 to 2^20 measured alike at
    # 4096 tokens, so the choice is not critical. Every per-chunk buffer is one workspace reused by all chunks
    # of a call: a fresh large buffer per chunk costs page faults. Keys and values are gathered again in
    # backward: an index_select into a workspace costs little next to the matmuls.

    @staticmethod
    def _workspace(k, v, flat, step, bq, work):  # buffers for the gathered blocks and one chunk's scores
        m = flat.shape[1]
        kbuf = torch.empty(step * m, *k.shape[1:], dtype=work, device=k.device)
        vbuf = torch.empty(step * m, *v.shape[1:], dtype=work, device=v.device)
        sbuf = torch.empty(step, bq, m * k.shape[1], dtype=work, device=k.device)
        return kbuf, vbuf, sbuf

    @staticmethod
    def _gather(k, v, flat, r, n, kbuf, vbuf):  # -> idx (n*m,), kb (n, L, Dk), vb (n, L, Dv)
        idx = flat[r:r + n].reshape(-1)
        kb = torch.index_select(k, 0, idx, out=kbuf[:idx.shape[0]]).view(n, -1, k.shape[-1])
        vb = torch.index_select(v, 0, idx, out=vbuf[:idx.shape[0]]).view(n, -1, v.shape[-1])
        return idx, kb, vb

    @staticmethod
    def forward(ctx, q, k, v, flat, mask, scale, step, recompute):  # (rows, bq, D), (pieces, bk, D) x2
        work = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
        rows, bq, _ = q.shape
        keep = not recompute and any(ctx.needs_input_grad[:3])  # P for backward (not under no_grad)
        qs, kw, vw = q.to(work) * scale, k.to(work), v.to(work)  # the scale folded into the smaller operand
        hidden = None if mask is None else mask.logical_not()  # (rows, 1, L)
        out = torch.empty(rows, bq, v.shape[-1], dtype=work, device=q.device)
        lse = torch.empty(rows, bq, 1, dtype=work, device=q.device) if recompute else None
        kbuf, vbuf, sbuf = _GatherAttention._workspace(kw, vw, flat, step, bq, work)
        probs = []
        for r in range(0, rows, step):
            n = min(step, rows - r)
            _, kb, vb = _GatherAttention._gather(kw, vw, flat, r, n, kbuf, vbuf)
            p = torch.empty_like(sbuf[:n]) if keep else sbuf[:n]  # (n, bq, L)
            torch.bmm(qs[r:r + n], kb.transpose(1, 2), out=p)  # scores
            if hidden is not None:
                p.masked_fill_(hidden[r:r + n], float("-inf"))
            peak = p.amax(-1, keepdim=True) if recompute else None  # (n, bq, 1)
            torch.ops.aten._softmax.out(p, -1, False, out=p)  # in place: one fused max, exp, sum, scale
            if recompute:  # P at the row's maximum is exp(0) / rowsum: lse = max + log(rowsum) = max - log(max P)
                torch.sub(peak, p.amax(-1, keepdim=True).log_(), out=lse[r:r + n])
            torch.bmm(p, vb, out=out[r:r + n])  # (n, bq, Dv)
            if keep:
                probs.append(p)
        out = out.to(q.dtype)
        # through autograd's hooks: saved-activation counts see every saved tensor (P included)
        ctx.save_for_backward(q, k, v, flat, out, *([lse] if recompute else probs))
        ctx.args = (mask, scale, step, recompute, work)
        return out  # (rows, bq, Dv)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):  # (rows, bq, Dv)
        mask, scale, step, recompute, work = ctx.args
        q, k, v, flat, out, *saved = ctx.saved_tensors
        rows, bq, _ = q.shape
        qs, kw, vw = q.to(work) * scale, k.to(work), v.to(work)
        hidden = None if mask is None else mask.logical_not()
        g = grad.to(work)
        delta = (g * out.to(work)).sum(-1, keepdim=True)  # (rows, bq, 1): rowsum(P * dP) = dO . O
        dq = torch.empty_like(qs)
        # a key/value block collects one gradient per query block that selected it (bf16/fp16: summed in fp32)
        dk, dv = torch.zeros_like(kw), torch.zeros_like(vw)
        kbuf, vbuf, sbuf = _GatherAttention._workspace(kw, vw, flat, step, bq, work)
        pbuf = torch.empty_like(sbuf) if recompute else None
        dkbuf, dvbuf = torch.empty_like(kbuf), torch.empty_like(vbuf)  # per-block dK, dV of a chunk
        for i, r in enumerate(range(0, rows, step)):
            n = min(step, rows - r)
            idx, kb, vb = _GatherAttention._gather(kw, vw, flat, r, n, kbuf, vbuf)
            if recompute:  # P = exp(S - lse)
                p = torch.baddbmm(saved[0][r:r + n].neg(), qs[r:r + n], kb.transpose(1, 2), out=pbuf[:n])
                if hidden is not None:
                    p.masked_fill_(hidden[r:r + n], float("-inf"))
                p.exp_()
            else:
                p = saved[i]
            gr, blocks = g[r:r + n], idx.shape[0]
            torch.bmm(p.transpose(1, 2), gr, out=dvbuf[:blocks].view(n, -1, v.shape[-1]))  # (n, L, Dv)
            dv.index_add_(0, idx, dvbuf[:blocks])
            ds = torch.bmm(gr, vb.transpose(1, 2), out=sbuf[:n]).sub_(delta[r:r + n]).mul_(p)  # (n, bq, L): dS
            torch.bmm(ds, kb, out=dq[r:r + n])  # (n, bq, Dk)
            torch.bmm(ds.transpose(1, 2), qs[r:r + n], out=dkbuf[:blocks].view(n, -1, k.shape[-1]))
            dk.index_add_(0, idx, dkbuf[:blocks])
        return dq.mul_(scale).to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None
