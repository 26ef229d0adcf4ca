"""DSV attention: a low-rank estimator picks key/value blocks; sparse-enough heads attend only to those.

The three pieces are plain functions so context parallelism can reuse them on sharded tokens:
`estimate_block_scores` -> `select_blocks` -> `block_sparse_attention` (exact on the selected blocks).
"""
from __future__ import annotations

import math

import torch
from torch import nn
import torch.nn.functional as F

from .flex import flex_attention_with_fallback, flex_available, flex_supports, mark_flex_broken
from .full import SelfAttention, dense_attention


def n_blocks(tokens: int, block_size: int) -> int:
    return -(-tokens // block_size)


def _pad_tokens(x, block_size: int):  # (B, H, N, D) -> (B, H, Np, D), Np a multiple of block_size
    pad = n_blocks(x.shape[-2], block_size) * block_size - x.shape[-2]
    return F.pad(x, (0, 0, 0, pad)) if pad else x


def block_sums(x, block_size: int):  # (..., N) -> (..., ceil(N / block_size)): the sum over each key block
    nk = n_blocks(x.shape[-1], block_size)
    return F.pad(x, (0, nk * block_size - x.shape[-1])).unflatten(-1, (nk, block_size)).sum(-1)


def estimate_block_scores(q_est, k_est, block_size: int, scale: float):  # -> (B, H, nQ, nK)
    """Estimated attention mass of each key block for each query block, from low-rank q_est, k_est (B, H, N, r).

    Queries of a block are mean-pooled (logits are linear in q, so this is the block's mean logit);
    the softmax over all keys is then summed within each key block. Rows sum to 1.
    """
    B, H, N, _ = q_est.shape
    nq = n_blocks(N, block_size)
    counts = torch.full((nq,), block_size, dtype=q_est.dtype, device=q_est.device)
    counts[-1] = N - (nq - 1) * block_size
    pooled = _pad_tokens(q_est, block_size).view(B, H, nq, block_size, -1).sum(3) / counts[:, None]  # (B,H,nQ,r)
    probs = torch.softmax((pooled @ k_est.transpose(-1, -2)).float() * scale, dim=-1)  # (B, H, nQ, Nk)
    return block_sums(probs, block_size)  # (B, H, nQ, nK)


def select_blocks(scores, topk) -> torch.Tensor:  # (B, H, nQ, nK) -> bool (B, H, nQ, nK)
    """Each query block keeps its `topk` highest-scoring key blocks; topk is an int or an (H,) tensor per head."""
    nk = scores.shape[-1]
    per_head = torch.as_tensor(topk, device=scores.device).clamp(1, nk).view(-1)
    kmax = int(per_head.max())
    idx = scores.topk(kmax, dim=-1).indices  # (B, H, nQ, kmax)
    keep = torch.arange(kmax, device=scores.device) < per_head.view(1, -1, 1, 1)  # (1, H or 1, 1, kmax)
    mask = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    return mask.scatter_(-1, idx, keep.expand_as(idx).contiguous())


def block_mask_to_token_mask(block_mask, block_size: int, n_q: int, n_kv: int):  # -> bool (B, H, n_q, n_kv)
    """The token-level mask a block mask stands for (the dense reference of `block_sparse_attention`)."""
    m = block_mask.repeat_interleave(block_size, -2).repeat_interleave(block_size, -1)
    return m[..., :n_q, :n_kv]


CPU_CHUNK_ELEMENTS = 1 << 22  # gathered K (or V) elements per piece on CPU (16 MB fp32): below glibc's
# largest mmap threshold (32 MB), so pieces are reused from the heap instead of page-faulted in every step


@torch.compiler.disable  # data-dependent sizes and a hand-written backward: run eagerly inside torch.compile
def gather_block_sparse_attention(q, k, v, block_mask, block_size: int, seq_len: int, scale: float,
                                  recompute: bool = False):
    """Exact block-sparse attention by gathering each query block's key/value blocks (any device).

    q (B, H, nQ*bs, D), k and v (B, H, nK*bs, D), block_mask (B, H, nQ, nK); keys from `seq_len` on are
    padding. Queries may be a shard of the keys' sequence (ring context parallelism).
    On CPU the query blocks go in chunks: one large gathered buffer is a fresh mmap (page faults) every
    step, small ones come from the allocator's heap, which makes the gather several times faster.
    recompute: keep only q, k, v for backward (not the gathered copies), at the cost of a second forward.
    """
    B, H, Nq, D = q.shape
    nq, nk = Nq // block_size, k.shape[-2] // block_size
    rows = B * H * nq
    counts = block_mask.sum(-1).view(rows)  # key blocks per query block
    kmax = int(counts.max())
    order = torch.argsort(block_mask.to(torch.int8), dim=-1, descending=True, stable=True)[..., :kmax]
    order = order.reshape(rows, kmax)
    flat = order + (torch.arange(B * H, device=q.device) * nk).repeat_interleave(nq)[:, None]  # (rows, kmax)
    mask = None
    if k.shape[-2] != seq_len or not bool((counts == kmax).all()):  # ragged rows or padded keys need a mask
        slot_ok = torch.arange(kmax, device=q.device) < counts[:, None]  # (rows, kmax)
        token = order[..., None] * block_size + torch.arange(block_size, device=q.device)  # (rows, kmax, bs)
        mask = (slot_ok[..., None] & (token < seq_len)).view(rows, 1, kmax * block_size)
    step = max(1, CPU_CHUNK_ELEMENTS // (kmax * block_size * D)) if q.device.type == "cpu" else rows
    out = _ChunkedGatherAttention.apply(q.reshape(rows, block_size, D), k.reshape(B * H * nk, block_size, D),
                                        v.reshape(B * H * nk, block_size, D), flat, mask, scale, step, recompute)
    return out.view(B, H, Nq, D)


class _ChunkedGatherAttention(torch.autograd.Function):
    """SDPA of query-block chunks on their gathered key/value blocks, accumulating one dk/dv in backward."""

    # Per-chunk autograd would allocate a full-size zero gradient per chunk, hence the hand-written backward.
    # With `recompute`, the gathered blocks are not kept for backward but gathered and attended again.

    @staticmethod
    def _chunk(q, k, v, flat, mask, scale, r, step):  # -> leaves (qb, kb, vb), out (1, rows', bs, D)
        idx = flat[r:r + step].reshape(-1)
        qb = q[r:r + step].detach().unsqueeze(0).requires_grad_()  # (1, rows', bs, D)
        kb = k.detach().index_select(0, idx).view(1, qb.shape[1], -1, q.shape[-1]).requires_grad_()
        vb = v.detach().index_select(0, idx).view(1, qb.shape[1], -1, q.shape[-1]).requires_grad_()
        m = None if mask is None else mask[r:r + step].unsqueeze(0)
        return idx, (qb, kb, vb), F.scaled_dot_product_attention(qb, kb, vb, attn_mask=m, scale=scale)

    @staticmethod
    def forward(ctx, q, k, v, flat, mask, scale, step, recompute):  # (rows, bs, D), (blocks, bs, D) x2
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
        return torch.cat(outs, 1).squeeze(0)  # (rows, bs, D)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):  # (rows, bs, D)
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


def block_sparse_attention(q, k, v, block_mask, block_size: int, scale: float | None = None,
                           backend: str = "auto", recompute: bool = False):  # -> (B, H, N, D)
    """Attention of each query block to its selected key/value blocks only; equals dense attention with
    `block_mask_to_token_mask` as the mask. Every row must select at least one block.
    q, k, v (B, H, N, D); block_mask bool (B, H, nQ, nK) with nQ = nK = ceil(N / block_size).

    backend: 'auto' (FlexAttention on CUDA, gather elsewhere), 'flex' or 'gather'. recompute (gather only):
    save memory by gathering again in backward instead of keeping the gathered key/value blocks.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    use_flex = flex_supports(block_size) and (backend == "flex" or (backend == "auto" and flex_available(q.device)))
    if use_flex:
        try:
            return flex_attention_with_fallback(q, k, v, block_mask, block_size, scale, _gather_unpadded)
        except torch.OutOfMemoryError:
            raise  # a measurement (status oom), not a broken kernel
        except Exception as error:  # an unsupported shape or kernel on this GPU: never crash, fall back
            if backend == "flex":
                raise
            mark_flex_broken(error)
    return _gather_unpadded(q, k, v, block_mask, block_size, scale, recompute)


def _gather_unpadded(q, k, v, block_mask, block_size: int, scale: float, recompute: bool = False):
    N = q.shape[-2]
    q, k, v = (_pad_tokens(t, block_size) for t in (q, k, v))  # (B, H, Np, D)
    return gather_block_sparse_attention(q, k, v, block_mask, block_size, N, scale, recompute)[..., :N, :]


def blocks_to_cover(probs, block_size: int, coverage: float):  # (..., N) -> (...,) int blocks needed
    """How many of the largest key blocks hold `coverage` of each row's attention mass."""
    cum = block_sums(probs, block_size).sort(dim=-1, descending=True).values.cumsum(-1)
    return (cum < coverage).sum(-1) + 1


class DSVAttention(SelfAttention):
    """Self-attention with DSV's learned sparsity: dense + profiling in stage 1, block-sparse heads in stage 2."""

    def __init__(self, dim, heads, head_dim, *, rank=16, block_size=64, sparsity_threshold=0.5,
                 sparsity: float | None = None, topk_min=1, profile_momentum=0.9, mass_coverage=0.9,
                 estimator_samples=64, backend="auto", recompute=False, zero_out=False):
        super().__init__(dim, heads, head_dim, zero_out)
        self.block_size, self.sparsity_threshold, self.sparsity = block_size, sparsity_threshold, sparsity
        self.topk_min, self.profile_momentum, self.mass_coverage = topk_min, profile_momentum, mass_coverage
        self.estimator_samples, self.backend, self.recompute = estimator_samples, backend, recompute
        # Both start as the same random projection: q_est . k_est is then a Johnson-Lindenstrauss sketch of q . k.
        init = torch.randn(heads, head_dim, rank) / math.sqrt(rank)
        self.q_estimator = nn.Parameter(init.clone())  # (H, D, r)
        self.k_estimator = nn.Parameter(init.clone())  # (H, D, r)
        self.register_buffer("profiled_sparsity", torch.zeros(heads))
        self.register_buffer("profile_updates", torch.zeros((), dtype=torch.long))
        self.sparse_active = False  # stage 2; the model sets it from its step counter
        self.estimator_loss: torch.Tensor | None = None
        self.last_sparse_heads: torch.Tensor | None = None  # (H,) bool of the last forward
        self.capture_stats = False  # set by the model's dsv_stats(): keep this forward's q, k, v in _last
        self._last: dict | None = None  # detached tensors of a captured forward (never kept in training)

    def head_topk(self, nk: int) -> torch.Tensor:  # -> (H,) key blocks each head would keep
        s = self.profiled_sparsity if self.sparsity is None else torch.full_like(self.profiled_sparsity, self.sparsity)
        return torch.ceil((1 - s) * nk - 1e-6).long().clamp(min(self.topk_min, nk), nk)

    def sparse_heads(self, nk: int) -> torch.Tensor:  # -> (H,) bool: heads attending block-sparsely now
        if not self.sparse_active:
            return torch.zeros(self.heads, dtype=torch.bool, device=self.profiled_sparsity.device)
        passes = torch.ones_like(self.profiled_sparsity, dtype=torch.bool) if self.sparsity is not None else \
            (self.profiled_sparsity > self.sparsity_threshold) & (self.profile_updates > 0)
        return passes & (self.head_topk(nk) < nk)

    def estimate(self, q, k, heads: slice):  # (B, H, N, D) -> low-rank (B, H, N, r), from detached q, k
        q_est = torch.einsum("bhnd,hdr->bhnr", q.detach(), self.q_estimator[heads].to(q.dtype))
        return q_est, torch.einsum("bhnd,hdr->bhnr", k.detach(), self.k_estimator[heads].to(k.dtype))

    def core(self, q, k, v, head_offset: int = 0):
        B, H, N, D = q.shape
        heads = slice(head_offset, head_offset + H)
        scale, nk = D ** -0.5, n_blocks(N, self.block_size)
        sparse = self.sparse_heads(nk)[heads]
        any_sparse = bool(sparse.any())
        training = self.training and torch.is_grad_enabled()
        q_est = k_est = None
        if training or any_sparse:
            q_est, k_est = self.estimate(q, k, heads)
        self.estimator_loss = self.train_estimator(q, k, q_est, k_est, heads, profile=not self.sparse_active) \
            if training else None
        if not any_sparse:
            out = dense_attention(q, k, v)
        else:
            sel = sparse.nonzero().squeeze(1)
            with torch.no_grad():
                scores = estimate_block_scores(q_est[:, sel], k_est[:, sel], self.block_size, scale)
                mask = select_blocks(scores, self.head_topk(nk)[heads][sel])
            if len(sel) == H:  # every head sparse: no head selection (an indexed copy and its backward)
                out = block_sparse_attention(q, k, v, mask, self.block_size, scale, self.backend, self.recompute)
            else:
                out = block_sparse_attention(q[:, sel], k[:, sel], v[:, sel], mask, self.block_size, scale,
                                             self.backend, self.recompute)
                rest = (~sparse).nonzero().squeeze(1)
                out = torch.cat([out, dense_attention(q[:, rest], k[:, rest], v[:, rest])], 1)
                out = out[:, torch.argsort(torch.cat([sel, rest]))]  # back to head order
        self.last_sparse_heads = sparse
        if self.capture_stats:
            self._last = {"q": q.detach()[:1], "k": k.detach()[:1], "v": v.detach()[:1], "heads": heads,
                          "sparse": sparse.detach()}
        return out

    def train_estimator(self, q, k, q_est, k_est, heads: slice, profile: bool):
        """Cosine + norm loss of estimated vs true logits on sampled queries (reaches only the estimator);
        in stage 1 also profiles each head's sparsity with momentum."""
        B, H, N, D = q.shape
        idx = torch.randperm(N, device=q.device)[: self.estimator_samples]
        true = q.detach()[:, :, idx] @ k.detach().transpose(-1, -2)  # (B, H, S, N)
        est = q_est[:, :, idx] @ k_est.transpose(-1, -2)  # (B, H, S, N)
        true32, est32 = true.float(), est.float()
        cosine = F.cosine_similarity(est32, true32, dim=-1)  # (B, H, S)
        ratio = est32.norm(dim=-1) / true32.norm(dim=-1).clamp_min(1e-6)
        loss = (1 - cosine).mean() + (ratio - 1).pow(2).mean()
        if profile:
            with torch.no_grad():
                needed = blocks_to_cover(torch.softmax(true32 * D ** -0.5, -1), self.block_size, self.mass_coverage)
                self.update_profile((1 - needed.float() / n_blocks(N, self.block_size)).mean((0, 2)), heads)
        return loss

    @torch.no_grad()
    def update_profile(self, sparsity, heads: slice = slice(None)) -> None:
        """Fold one stage-1 measurement of the heads' sparsity (H,) into the profile (momentum after the first)."""
        m = self.profile_momentum if int(self.profile_updates) > 0 else 0.0
        self.profiled_sparsity[heads] = m * self.profiled_sparsity[heads] + (1 - m) * sparsity
        self.profile_updates += 1

    @torch.no_grad()
    def stats(self, query_blocks: int = 8) -> dict | None:
        """Chosen sparsity, estimator recall and relative output error of the captured forward, on a sample."""
        if self._last is None:
            return None
        q, k, v, heads, sparse = (self._last[n] for n in ("q", "k", "v", "heads", "sparse"))
        q, k, v = q.float(), k.float(), v.float()
        _, H, N, D = q.shape
        bs, nk, scale = self.block_size, n_blocks(N, self.block_size), D ** -0.5
        topk = self.head_topk(nk)[heads]
        chosen = torch.where(sparse, 1 - topk.float() / nk, torch.zeros_like(topk, dtype=torch.float))
        q_est, k_est = self.estimate(q, k, heads)
        est_mask = select_blocks(estimate_block_scores(q_est, k_est, bs, scale), topk)  # (1, H, nQ, nK)
        sampler = torch.Generator(device=q.device).manual_seed(0)  # fixed: measuring leaves the training RNG alone
        picked = torch.randperm(nk, generator=sampler, device=q.device)[:query_blocks].sort().values
        rows = (picked[:, None] * bs + torch.arange(bs, device=q.device)).reshape(-1)
        rows = rows[rows < N]
        logits = (q[:, :, rows] @ k.transpose(-1, -2)).float() * scale  # (1, H, R, N)
        probs = torch.softmax(logits, -1)
        block_of_row = torch.searchsorted(picked, rows // bs)
        mass = block_sums(probs, bs)  # (1, H, R, nK)
        row_mask = est_mask[:, :, picked][:, :, block_of_row]  # (1, H, R, nK)
        oracle = select_blocks(mass, topk)
        recall = ((mass * row_mask).sum(-1) / (mass * oracle).sum(-1).clamp_min(1e-12)).mean()
        dense = probs @ v  # (1, H, R, D)
        token_mask = row_mask.repeat_interleave(bs, -1)[..., :N]
        restricted = torch.softmax(logits.masked_fill(~token_mask, float("-inf")), -1) @ v
        actual = torch.where(sparse.view(1, H, 1, 1), restricted, dense)
        rel_error = (actual - dense).norm() / dense.norm().clamp_min(1e-12)
        return {"sparsity": float(chosen.mean()), "recall": float(recall), "sparse_heads": int(sparse.sum()),
                "heads": H, "rel_error": float(rel_error)}
