"""Sequence-wise (ring) context parallelism: dense ring attention and DSV's sparse key/value exchange.

Each rank keeps its queries. Dense heads pass key/value chunks around the ring and merge partial softmax
results by log-sum-exp; DSV's sparse heads fetch only the key/value blocks some local query block selected.
The `cp` protocol and byte counting are in `context_parallel`.
"""
from __future__ import annotations

import contextlib
import contextvars
import math

import torch
import torch.distributed as dist

from architectures.attention.dsv import (DSVAttention, block_sparsity, block_sums, cube_order, cube_shape,
                                        estimate_block_scores, select_blocks)
from architectures.attention.full import FullAttention
from architectures.attention.processors import SwappedAttnProcessor
from architectures.attention.sparse import block_sparse_attention

from .context_parallel import (CommCounter, ContextParallel, all_gather_counted, all_to_all_rows, allreduce_bytes,
                               dsv_head_work, global_rank, nbytes)


def _ring_shift(t: torch.Tensor, group, counter, kind: str):
    """Start sending `t` to the next rank and receiving the previous rank's into a new buffer."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    t = t.contiguous()
    buf = torch.empty_like(t)
    counter.add(kind, nbytes(t))
    ops = [dist.P2POp(dist.isend, t, global_rank(group, (rank + 1) % world), group=group),
           dist.P2POp(dist.irecv, buf, global_rank(group, (rank - 1) % world), group=group)]
    return buf, dist.batch_isend_irecv(ops)


def _wait(pending) -> None:
    for req in pending:
        req.wait()


def _shift_now(t: torch.Tensor, group, counter) -> torch.Tensor:
    buf, pending = _ring_shift(t, group, counter, "attention")
    _wait(pending)
    return buf


# --- ring attention (dense) ---------------------------------------------------------------------------------
def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


# the device a step stands for where its tensors live elsewhere: predict runs a GPU's step on fake CPU tensors, and
# its ring chunks must take CUDA's kernels (and their memory and names), not the CPU's
_STANDS_FOR: contextvars.ContextVar[str | None] = contextvars.ContextVar("ring_stands_for", default=None)


@contextlib.contextmanager
def chunks_as_on(device_type: str):
    """Within: ring chunks choose their kernel as on `device_type` ("cuda" or "cpu"), whatever their tensors' device
    (a CUDA kernel then runs on fake tensors by its meta function)."""
    token = _STANDS_FOR.set(device_type)
    try:
        yield
    finally:
        _STANDS_FOR.reset(token)


def _flash_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
    """The flash kernel that returns the log-sum-exp the merge needs: "cpu" (any float dtype), "cuda"
    (FlashAttention-2, where torch's own SDPA checks allow it: fp16/bf16, head dims, the GPU's architecture), or
    None (scores formed). A CUDA step on fake CPU tensors (predict) stands for an sm80/sm90 GPU: fp16/bf16 with a
    head dim a multiple of 8 up to 256."""
    device = _STANDS_FOR.get() or q.device.type
    if device == "cpu":
        return "cpu"
    if q.device.type == "cuda":
        params = torch.backends.cuda.SDPAParams(q, k, v, None, 0.0, False, False)
        return "cuda" if torch.backends.cuda.can_use_flash_attention(params) else None
    if device == "cuda" and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] % 8 == 0 \
            and q.shape[-1] <= 256:
        return "cuda"
    return None


def chunk_attention(q, k, v, scale: float, kernel: str | None):
    """Attention of q on one key/value chunk: (out (B,H,n,D) in the accumulation dtype, lse (B,H,n), rng).

    kernel (`_flash_kernel`): a fused flash kernel, as fused ring attention runs: no (n, m) score matrix is
    materialised, so a chunk costs O(n) memory. None (fp32 on CUDA): the scores are formed, products in the input
    dtype, softmax statistics and sums in fp32 or better. rng: CUDA flash's philox (seed, offset), which its
    backward takes (unused without dropout), or None.
    """
    aten = torch.ops.aten
    acc = _acc_dtype(q.dtype)
    if kernel == "cpu":
        out, lse = aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, scale=scale)
        return out.to(acc), lse, None
    if kernel == "cuda":
        out, lse, _, _, _, _, seed, offset, _ = aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False,
                                                                                     scale=scale)
        return out.to(acc), lse, (seed, offset)
    s = torch.matmul(q, k.transpose(-1, -2)).to(acc) * scale  # (B, H, n, m)
    lse = torch.logsumexp(s, dim=-1)
    return torch.matmul(torch.exp(s - lse.unsqueeze(-1)).to(v.dtype), v).to(acc), lse, None


def merge_partial(out, lse, out_i, lse_i):
    """Combine two softmax-normalised partial results over disjoint keys with their log-sum-exps."""
    if out is None:
        return out_i, lse_i
    new = torch.logaddexp(lse, lse_i)
    return out * torch.exp(lse - new).unsqueeze(-1) + out_i * torch.exp(lse_i - new).unsqueeze(-1), new


def _chunk_grads(q, k, v, dout, out, lse, scale, kernel, rng):
    """dq, dk, dv (accumulation dtype) of one chunk, given the merged output (the input dtype for a flash kernel,
    the accumulation dtype without) and log-sum-exp over all chunks.

    With the global out and lse a flash backward computes exactly this chunk's share (its softmax rows are
    exp(s - lse), its delta rowsum(dout * out)); without flash (`chunk_attention`'s fallback) they are formed."""
    aten = torch.ops.aten
    acc = lse.dtype
    if kernel == "cpu":
        grads = aten._scaled_dot_product_flash_attention_for_cpu_backward(dout, q, k, v, out, lse, 0.0, False,
                                                                          scale=scale)
        return tuple(g.to(acc) for g in grads)
    if kernel == "cuda":
        grads = aten._scaled_dot_product_flash_attention_backward(
            dout, q, k, v, out, lse, None, None, q.shape[2], k.shape[2], 0.0, False, *rng, scale=scale)
        return tuple(g.to(acc) for g in grads)
    delta = (dout.to(acc) * out).sum(-1)  # (B, H, n)
    p = torch.exp(torch.matmul(q, k.transpose(-1, -2)).to(acc) * scale - lse.unsqueeze(-1))  # (B, H, n, m)
    dv = torch.matmul(p.to(v.dtype).transpose(-1, -2), dout).to(acc)
    ds = (p * (torch.matmul(dout, v.transpose(-1, -2)).to(acc) - delta.unsqueeze(-1))).to(q.dtype)
    return (torch.matmul(ds, k).to(acc) * scale, torch.matmul(ds.transpose(-1, -2), q).to(acc) * scale, dv)


class _RingAttention(torch.autograd.Function):
    """Queries stay; key/value chunks go around the ring; partial results merge by log-sum-exp."""

    # Backward goes around the ring again: the kv chunks travel as in forward, and the dk/dv accumulated for
    # a visiting chunk (fp32 or better) travel behind it and reach its owner after the last hop.
    # Autocast is off inside: dtypes are chosen explicitly (chunk_attention).

    @staticmethod
    def forward(ctx, q, k, v, scale, group, counter):
        world = dist.get_world_size(group)
        kv = torch.stack([k, v])  # (2, B, H, m, D), sent in the input dtype
        out = lse = rng = None
        kernel = _flash_kernel(q, k, v)
        with torch.autocast(q.device.type, enabled=False):
            for step in range(world):
                if step < world - 1:
                    nxt, pending = _ring_shift(kv, group, counter, "attention")  # overlaps the compute below
                out_i, lse_i, rng_i = chunk_attention(q, kv[0], kv[1], scale, kernel)
                rng = rng or rng_i
                out, lse = merge_partial(out, lse, out_i, lse_i)
                if step < world - 1:
                    _wait(pending)
                    kv = nxt
        ctx.save_for_backward(q, k, v, out, lse, *(rng or ()))  # saved: freed with the rest after backward
        ctx.scale, ctx.group, ctx.counter, ctx.kernel = scale, group, counter, kernel
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, *rng = ctx.saved_tensors
        group, counter, scale, kernel = ctx.group, ctx.counter, ctx.scale, ctx.kernel
        out = out if kernel is None else out.to(q.dtype)  # a flash backward takes the output in the input dtype
        world = dist.get_world_size(group)
        with torch.autocast(q.device.type, enabled=False):
            dout = dout.to(q.dtype).contiguous()
            kv = torch.stack([k, v])
            dq, dk_own, dv_own = _chunk_grads(q, k, v, dout, out, lse, scale, kernel, rng)
            travelling = None  # (2, B, H, m, D): dk/dv of the chunk held now, following it to its owner
            for _ in range(1, world):
                kv = _shift_now(kv, group, counter)
                if travelling is not None:
                    travelling = _shift_now(travelling, group, counter)
                dq_i, dk_i, dv_i = _chunk_grads(q, kv[0], kv[1], dout, out, lse, scale, kernel, rng)
                dq = dq + dq_i
                contribution = torch.stack([dk_i, dv_i])
                travelling = contribution if travelling is None else travelling + contribution
            if travelling is not None:  # last hop: the chunk's accumulated gradient reaches its owner
                travelling = _shift_now(travelling, group, counter)
                dk_own, dv_own = dk_own + travelling[0], dv_own + travelling[1]
        return dq.to(q.dtype), dk_own.to(k.dtype), dv_own.to(v.dtype), None, None, None


def ring_attention(q, k, v, *, group=None, counter: CommCounter | None = None, scale: float | None = None):
    """Dense attention of local queries over all ranks' keys/values (B, H, n, D) -> (B, H, n, D)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return _RingAttention.apply(q, k, v, scale, group, counter or CommCounter())


# --- DSV sparse key/value exchange --------------------------------------------------------------------------
class _SparseKVExchange(torch.autograd.Function):
    """Full-length K and V holding only the blocks some local query block selected (zeros elsewhere)."""

    # `need` (W, B, H, nb) bool: need[i, b, h, j] = rank i needs block j of this rank's shard. Each rank
    # sends exactly those blocks (k and v stacked); missing blocks stay zero and are never read by
    # block-sparse attention. Backward returns the gradients of the received blocks to their owners.

    @staticmethod
    def forward(ctx, k, v, need, mine, group, counter, block_size):
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        B, H, m, D = k.shape
        nb = m // block_size
        blocks = torch.stack([k, v], 2).view(B, H, 2, nb, block_size, D).transpose(2, 3)  # (B, H, nb, 2, bs, D)
        sends = [blocks[need[i]] for i in range(world) if i != rank]  # per requester, rows in (b, h, j) order
        in_splits = [0 if i == rank else int(need[i].sum()) for i in range(world)]
        payload = torch.cat(sends) if sends else blocks.new_zeros(0, 2, block_size, D)
        remote = mine.permute(2, 0, 1, 3).clone()  # (W, B, H, nb): owner-major, the order rows arrive in
        remote[rank] = False
        out_splits = [int(remote[o].sum()) for o in range(world)]
        got = all_to_all_rows(payload, in_splits, out_splits, group, counter, "attention")
        full = blocks.new_zeros(world, B, H, nb, 2, block_size, D)
        full[rank] = blocks
        full[remote] = got
        full = full.permute(1, 2, 4, 0, 3, 5, 6).reshape(B, H, 2, world * m, D)
        ctx.save_for_backward(need, remote)
        ctx.args = (group, counter, block_size, in_splits, out_splits, (B, H, m, D))
        return full[:, :, 0], full[:, :, 1]

    @staticmethod
    def backward(ctx, dk_full, dv_full):
        need, remote = ctx.saved_tensors
        group, counter, block_size, in_splits, out_splits, (B, H, m, D) = ctx.args
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        nb = m // block_size
        grads = torch.stack([dk_full, dv_full], 2).view(B, H, 2, world, nb, block_size, D)
        grads = grads.permute(3, 0, 1, 4, 2, 5, 6)  # (W, B, H, nb, 2, bs, D)
        back = all_to_all_rows(grads[remote], out_splits, in_splits, group, counter, "attention")
        local = grads[rank].clone()  # (B, H, nb, 2, bs, D)
        start = 0
        for i in range(world):
            if in_splits[i]:
                local[need[i]] += back[start:start + in_splits[i]]
                start += in_splits[i]
        local = local.transpose(2, 3).reshape(B, H, 2, m, D)
        return local[:, :, 0], local[:, :, 1], None, None, None, None, None


def needed_kv_blocks(block_mask: torch.Tensor, world: int) -> torch.Tensor:
    """(B, H, nq_local, n_kv) selection of this rank's query blocks -> (B, H, W, nb) blocks it needs per owner."""
    B, H, _, nkv = block_mask.shape
    return block_mask.any(dim=2).view(B, H, world, nkv // world)


def sparse_kv_exchange(k, v, block_mask, block_size: int, *, group=None, counter=None):
    """(B, H, m, D) local k/v + this rank's block mask (B, H, nq_local, W*m/bs) -> full-length k, v.

    The need masks (one bit per block, sent as bool bytes) are all-gathered first so each owner knows
    what to send to whom; then only the selected blocks move.
    """
    counter = counter or CommCounter()
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    mine = needed_kv_blocks(block_mask, world)  # (B, H, W, nb)
    everyone = all_gather_counted(mine.unsqueeze(0), group, counter, "attention")  # (W, B, H, W, nb)
    need = everyone[:, :, :, rank].contiguous()  # (W, B, H, nb): what each rank needs from me
    return _SparseKVExchange.apply(k, v, need, mine, group, counter, block_size)


class _SumAcrossRanks(torch.autograd.Function):
    """All-reduce (sum) of per-rank partials of a replicated loss; backward x world (see context_parallel)."""

    @staticmethod
    def forward(ctx, x, group, counter):
        ctx.world = dist.get_world_size(group)
        out = x.clone()
        counter.add("attention", allreduce_bytes(out, ctx.world))
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.world, None, None


# --- the `cp` object ----------------------------------------------------------------------------------------
class RingParallel(ContextParallel):
    """Sequence-wise: queries stay; dense layers pass k/v around the ring; DSV layers fetch only selected blocks."""

    mode = "ring"

    def attention(self, q, k, v, attn):  # (B, H, n, D) x3 local -> (B, H, n, D)
        if isinstance(attn, DSVAttention):
            return self._dsv_attention(q, k, v, attn)
        # full attention: the DiT's, or a diffusers layer's wrapped processor; window / factorised masks do not
        # follow the ring's chunks
        if not (type(attn) is FullAttention or (isinstance(attn, SwappedAttnProcessor) and attn.kind == "full")):
            raise ValueError(f"ring context parallelism supports full and DSV self-attention, not "
                             f"{type(attn).__name__}{f' {attn.kind}' if hasattr(attn, 'kind') else ''}; use ulysses")
        self.layer_work[id(attn)] = [q.shape[1] / self.world] * self.world
        return ring_attention(q, k, v, group=self.group, counter=self.counter)

    def _dsv_attention(self, q, k, v, attn):
        """Low-rank key estimates are all-gathered so each rank selects blocks over all keys, as one process."""
        B, H, n, D = q.shape
        N, bs, scale = n * self.world, attn.block_size, D ** -0.5
        if n % bs:
            raise ValueError(f"ring context parallelism with DSV needs the tokens per rank ({n}) to be a "
                             f"multiple of block_size ({bs}); change frames/resolution or --set block_size")
        nk = N // bs
        order = self._query_group_order(attn, n, q.device)
        if order is not None:  # each rank's tokens regrouped into its own cubes: blocks are cubes, as one process
            q, k, v = (t.index_select(2, order[0]) for t in (q, k, v))
        planned, topk = attn.plan(nk, N) if attn.sparse_active else ((), ())  # host-side: no synchronisation
        sparse = torch.zeros(H, dtype=torch.bool)
        sparse[list(planned)] = True
        training = attn.training and torch.is_grad_enabled()
        learn = training and attn.profile_now
        heads = slice(0, H)
        q_est = k_est = None
        if learn or planned:
            q_est, k_est = attn.estimate(q, k, heads)  # local tokens: (B, H, n, r)
        attn.estimator_loss = self._estimator_loss(attn, q, k, k_est, profile=True) if learn else None
        work = dsv_head_work(attn, N)
        self.layer_work[id(attn)] = [sum(work) / self.world] * self.world
        sel = torch.tensor(planned, dtype=torch.long, device=q.device)
        rest = torch.tensor([h for h in range(H) if h not in planned], dtype=torch.long, device=q.device)
        outs = []
        if planned:
            with torch.no_grad():
                k_est_all = all_gather_counted(k_est[:, sel].detach(), self.group, self.counter, "attention", dim=2)
                scores = estimate_block_scores(q_est[:, sel], k_est_all, bs, scale)
                mask = select_blocks(scores, torch.tensor(topk, device=q.device), kmax=max(topk))  # (B, Hs, n/bs, nk)
            k_full, v_full = sparse_kv_exchange(k[:, sel], v[:, sel], mask, bs, group=self.group,
                                                counter=self.counter)
            # the layer's own kernel (FlexAttention on CUDA), as one GPU runs it
            outs.append(block_sparse_attention(q[:, sel], k_full, v_full, mask, bs, scale, attn._backend(q.device),
                                               attn.recompute, kmax=max(topk), uniform=len(set(topk)) == 1,
                                               on_fallback=attn._fallback))
        if len(rest):
            outs.append(ring_attention(q[:, rest], k[:, rest], v[:, rest], group=self.group, counter=self.counter))
        out = torch.cat(outs, 1)  # (B, H, n, D), sparse heads first
        if planned and len(rest):
            out = out[:, torch.argsort(torch.cat([sel, rest]))]  # back to head order
        attn.last_sparse_heads = sparse
        if attn.capture_stats:  # stats() then describe this rank's token shard
            attn._last = {"q": q.detach()[:1], "k": k.detach()[:1], "v": v.detach()[:1], "heads": heads,
                          "sparse": sparse.detach()}
        return out if order is None else out.index_select(2, order[1])

    def _query_group_order(self, attn, n: int, device):
        """(perm, inverse) of this rank's n tokens into 3D-cube query/key groups, or None (raster order).

        The tokens are sharded in raster order. Where one process's cube order keeps every cube on one rank (the
        cube's frames divide each rank's frames), each rank reorders its own tokens and the concatenation over
        ranks is exactly one process's order: the same blocks, selections and estimator samples. Otherwise the
        cubes are chosen inside each rank's frames, or raster order runs; either is noted in the record.
        """
        if attn.query_groups != "cube" or attn.grid is None or math.prod(attn.grid) != n * self.world:
            return None
        key = ("ring", tuple(attn.grid), self.rank, self.world, str(device))
        if key not in attn._orders:
            attn._orders[key] = self._choose_order(attn, tuple(attn.grid), n, device)
        return attn._orders[key]

    def _choose_order(self, attn, grid, n: int, device):
        full = attn._order(n * self.world, device)  # one process's cube order (it notes when none tiles the grid)
        if full is None:
            return None
        owner = torch.div(full[0], n, rounding_mode="floor").view(self.world, n)  # rank holding each position's token
        if bool((owner == torch.arange(self.world, device=device)[:, None]).all()):
            local = full[0][self.rank * n:(self.rank + 1) * n] - self.rank * n
            return local, torch.argsort(local)
        f, h, w = grid
        bs = attn.block_size
        shape = cube_shape((n // (h * w), h, w), bs) if n % (h * w) == 0 else None
        if shape is None:
            note = (f"ring context parallelism: no 3D cube of {bs} tokens fits inside each rank's {n} tokens of the "
                    f"grid {grid}; raster query groups run (--context-parallel ulysses keeps one process's cubes)")
            local = None
        else:
            note = (f"ring context parallelism: query groups are {'x'.join(map(str, shape))} cubes inside each "
                    f"rank's {n // (h * w)} frames; one process's {'x'.join(map(str, cube_shape(grid, bs)))} cubes "
                    f"span ranks (--context-parallel ulysses keeps them)")
            perm = cube_order((n // (h * w), h, w), shape).to(device)
            local = perm, torch.argsort(perm)
        if note not in attn.warnings:
            attn.warnings.append(note)
        return local

    def _estimator_loss(self, attn, q, k, k_est, profile: bool):
        """DSV's estimator loss (and stage-1 profile) on sampled queries, from per-rank partial sums over keys.

        The sampled query rows (small) are shared; each rank scores them against its own keys; the row sums
        the loss needs (dot, |est|^2, |true|^2) and the softmax statistics are all-reduced, so no keys move.
        """
        B, H, n, D = q.shape
        N = n * self.world
        idx = torch.randperm(N, device=q.device)[: attn.estimator_samples]  # the same draw as one process
        owned = (idx >= self.rank * n) & (idx < (self.rank + 1) * n)
        rows = q.new_zeros(B, H, idx.numel(), D)
        rows[:, :, owned] = q.detach()[:, :, idx[owned] - self.rank * n]
        self.counter.add("attention", allreduce_bytes(rows, self.world))
        dist.all_reduce(rows, group=self.group)  # (B, H, S, D): every sampled query on every rank
        q_est_rows = torch.einsum("bhnd,hdr->bhnr", rows, attn.q_estimator.to(rows.dtype))
        true = (rows @ k.detach().transpose(-1, -2)).float()  # (B, H, S, n)
        est = (q_est_rows @ k_est.transpose(-1, -2)).float()  # (B, H, S, n)
        sums = torch.stack([(est * true).sum(-1), est.pow(2).sum(-1), true.pow(2).sum(-1)])  # (3, B, H, S)
        dot, ee, tt = _SumAcrossRanks.apply(sums, self.group, self.counter)
        cosine = dot / torch.sqrt(torch.clamp_min(ee * tt, 1e-8 ** 2))  # F.cosine_similarity's eps
        # clamped before sqrt: an all-zero estimate row gets gradient 0 (as torch.norm gives), not NaN
        ratio = ee.clamp_min(1e-24).sqrt() / tt.sqrt().clamp_min(1e-6)
        loss = (1 - cosine).mean() + (ratio - 1).pow(2).mean()
        if profile:
            self._profile(attn, true.detach() * D ** -0.5)
        return loss

    @torch.no_grad()
    def _profile(self, attn, logits):
        """Stage-1 sparsity profile: blocks holding `mass_coverage` of each sampled row's softmax mass."""
        bs = attn.block_size
        peak = logits.amax(-1)
        self.counter.add("attention", allreduce_bytes(peak, self.world))
        dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=self.group)
        e = torch.exp(logits - peak.unsqueeze(-1))
        total = e.sum(-1)
        self.counter.add("attention", allreduce_bytes(total, self.world))
        dist.all_reduce(total, group=self.group)
        mass = block_sums(e / total.unsqueeze(-1), bs)  # (B, H, S, n/bs)
        mass = all_gather_counted(mass, self.group, self.counter, "attention", dim=-1)  # (B, H, S, N/bs)
        attn.update_profile(block_sparsity(mass, 1, attn.mass_coverage).mean((0, 2)))  # (H,); mass is per block
