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

CPU_CHUNK_ELEMENTS = 1 << 22  # gathered K (or V) elements per piece on CPU (16 MB fp32): below glibc's
# largest mmap threshold (32 MB), so pieces are reused from the heap instead of page-faulted in every step

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


def tile_flops(tiles: int, q_rows: int, kv_cols: int, head_dim: int) -> tuple[int, int]:
    """(forward, backward) FLOPs of `tiles` score tiles of q_rows x kv_cols, by torch's SDPA formulas."""
    q, kv = (tiles, 1, q_rows, head_dim), (tiles, 1, kv_cols, head_dim)
    return flop_counter.sdpa_flop_count(q, kv, kv), flop_counter.sdpa_backward_flop_count(q, q, kv, kv)


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

    def run(fn, tiles, dim=D):
        if _flop_tally is None:
            return fn(q, k, v)
        return _HiddenFromModes.apply(q, k, v, fn, tile_flops(tiles, block_size, block_size, dim))

    if chosen == "flex":
        # every row of the DSV mask keeps exactly its head's k blocks: the flex tiles are these blocks
        flex_tiles = int(block_mask.sum()) if _flop_tally is not None else 0  # counting pass: sync allowed
        try:
            return run(flex, flex_tiles, flex_head_dim(D))
        except Exception as error:  # noqa: BLE001 - classified below
            from stbench.measure.memory import is_out_of_memory  # the one shared out-of-memory check

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


@torch.compiler.disable  # data-dependent sizes and a hand-written backward: run eagerly inside torch.compile
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


@torch.compiler.disable
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
    """q (rows, bq, D) attends to the key/value pieces flat (rows, m) of k, v (pieces, bk, D) -> (rows, bq, D)."""
    rows, bq, D = q.shape
    per_row = flat.shape[1] * k.shape[1]
    step = max(1, CPU_CHUNK_ELEMENTS // (per_row * D)) if q.device.type == "cpu" else rows
    return _ChunkedGatherAttention.apply(q, k, v, flat, mask, scale, step, recompute)


class _ChunkedGatherAttention(torch.autograd.Function):
    """SDPA of query-block chunks on their gathered key/value blocks, accumulating one dk/dv in backward."""

    # Per-chunk autograd would allocate a full-size zero gradient per chunk, hence the hand-written backward.
    # With `recompute`, the gathered blocks are not kept for backward but gathered and attended again.
    # On CPU the query blocks go in chunks: one large gathered buffer is a fresh mmap (page faults) every
    # step, small ones come from the allocator's heap, which makes the gather several times faster.

    @staticmethod
    def _chunk(q, k, v, flat, mask, scale, r, step):  # -> leaves (qb, kb, vb), out (1, rows', bs, D)
        idx = flat[r:r + step].reshape(-1)
        qb = q[r:r + step].detach().unsqueeze(0).requires_grad_()  # (1, rows', bq, D)
        kb = k.detach().index_select(0, idx).view(1, qb.shape[1], -1, q.shape[-1]).requires_grad_()
        vb = v.detach().index_select(0, idx).view(1, qb.shape[1], -1, q.shape[-1]).requires_grad_()
        m = None if mask is None else mask[r:r + step].unsqueeze(0)
        return idx, (qb, kb, vb), F.scaled_dot_product_attention(qb, kb, vb, attn_mask=m, scale=scale)

    @staticmethod
    def forward(ctx, q, k, v, flat, mask, scale, step, recompute):  # (rows, bq, D), (pieces, bk, D) x2
        pieces, outs = [], []
        with torch.set_grad_enabled(not recompute):
            for r in range(0, q.shape[0], step):
                idx, leaves, out = _ChunkedGatherAttention._chunk(q, k, v, flat, mask, scale, r, step)
                pieces.append((idx, leaves, out))
                outs.append(out.detach())
        ctx.args = (mask, scale, step, recompute)
        if recompute:
            ctx.save_for_backward(q, k, v, flat)  # through autograd's hooks: saved-activation counts see them
            pieces = None
        ctx.pieces, ctx.shapes = pieces, (q.shape, k.shape)
        return torch.cat(outs, 1).squeeze(0)  # (rows, bq, D)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):  # (rows, bq, D)
        (q_shape, kv_shape), (mask, scale, step, recompute) = ctx.shapes, ctx.args
        dq = torch.empty(q_shape, dtype=grad.dtype, device=grad.device)
        # a key/value block collects one gradient per query block that selected it: sum bf16/fp16 in fp32
        acc = torch.float32 if grad.dtype in (torch.float16, torch.bfloat16) else grad.dtype
        dk = torch.zeros(kv_shape, dtype=acc, device=grad.device)
        dv = torch.zeros(kv_shape, dtype=acc, device=grad.device)
        if recompute:
            q, k, v, flat = ctx.saved_tensors
        for i, r in enumerate(range(0, q_shape[0], step)):
            if recompute:
                with torch.enable_grad():
                    idx, leaves, out = _ChunkedGatherAttention._chunk(q, k, v, flat, mask, scale, r, step)
            else:
                idx, leaves, out = ctx.pieces[i]
            n = leaves[0].shape[1]
            gq, gk, gv = torch.autograd.grad(out, leaves, grad[r:r + n].unsqueeze(0))
            dq[r:r + n] = gq[0]
            dk.index_add_(0, idx, gk.reshape(-1, *kv_shape[1:]).to(acc))
            dv.index_add_(0, idx, gv.reshape(-1, *kv_shape[1:]).to(acc))
        ctx.pieces = None
        return dq, dk.to(grad.dtype), dv.to(grad.dtype), None, None, None, None, None
