"""Context parallelism for DiT self-attention: head-wise (Ulysses) and sequence-wise (ring), DSV-aware.

Tokens are sharded along the sequence: rank r holds tokens [r*n, (r+1)*n) of N = world*n, in the DiT's
(frame, row, col) order. The DiT calls, on an object `cp` of this module:

  x = cp.shard_tokens(x)           after patchify + position embedding   (B, N, C) -> (B, n, C)
  o = cp.attention(q, k, v, attn)  in self-attention, q/k/v local        (B, H, n, D) -> (B, H, n, D)
  x = cp.gather_tokens(x)          before the final layer                (B, n, C) -> (B, N, C)

Gradient semantics: the batch and parameters are replicated and the loss after `gather_tokens` is computed
identically on every rank, so `gather_tokens` backward keeps the local slice times world (what a
reduce-scatter of identical gradients gives, without sending them); each rank's parameter gradients are
then `world` x its share and `sync_gradients` averages them (all-reduce / world), which gives exactly the
single-process gradients.

Every byte a rank sends through this module is counted in `cp.counter` (by kind): all-to-all and
point-to-point sends exactly (bytes leaving this rank for other ranks), all-reduce at the ring algorithm's
per-rank volume 2 (W-1)/W x size.
"""
from __future__ import annotations

import heapq
from typing import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .dsv import blocks_to_cover, estimate_block_scores, select_blocks

CONTEXT_PARALLEL_MODES = ("ulysses", "ring")


# --- byte accounting ---------------------------------------------------------------------------------------
class CommCounter:
    """Bytes this rank sent to other ranks, by kind (e.g. 'attention', 'tokens', 'grad_sync')."""

    def __init__(self):
        self.bytes_by_kind: dict[str, int] = {}

    def add(self, kind: str, nbytes: int) -> None:
        self.bytes_by_kind[kind] = self.bytes_by_kind.get(kind, 0) + int(nbytes)

    @property
    def total(self) -> int:
        return sum(self.bytes_by_kind.values())

    def reset(self) -> None:
        self.bytes_by_kind = {}


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


# --- collectives that count what they send -----------------------------------------------------------------
def all_to_all_rows(x: torch.Tensor, in_splits: Sequence[int], out_splits: Sequence[int], group, counter,
                    kind: str) -> torch.Tensor:
    """all_to_all_single along dim 0: rows in_splits[j] go to rank j; out_splits[i] rows arrive from rank i."""
    x = x.contiguous()
    rank = dist.get_rank(group)
    row_bytes = _nbytes(x) // max(x.shape[0], 1)
    counter.add(kind, row_bytes * (sum(in_splits) - in_splits[rank]))
    out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
    dist.all_to_all_single(out, x, list(out_splits), list(in_splits), group=group)
    return out


class _AllToAllRows(torch.autograd.Function):
    """Differentiable all_to_all_rows: backward sends gradients back along the same splits, reversed."""

    @staticmethod
    def forward(ctx, x, in_splits, out_splits, group, counter, kind):
        ctx.args = (in_splits, out_splits, group, counter, kind)
        return all_to_all_rows(x, in_splits, out_splits, group, counter, kind)

    @staticmethod
    def backward(ctx, grad):
        in_splits, out_splits, group, counter, kind = ctx.args
        return all_to_all_rows(grad, out_splits, in_splits, group, counter, kind), None, None, None, None, None


def all_gather_counted(x: torch.Tensor, group, counter, kind: str, dim: int = 0) -> torch.Tensor:
    """Concatenation of every rank's `x` along `dim` (not differentiable); sends (W-1) x its bytes."""
    world = dist.get_world_size(group)
    x = x.contiguous()
    counter.add(kind, _nbytes(x) * (world - 1))
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x, group=group)
    return torch.cat(parts, dim=dim)


class _GatherTokens(torch.autograd.Function):
    """All-gather along the token dim; backward keeps the local slice x world (see module docstring)."""

    @staticmethod
    def forward(ctx, x, group, counter):
        ctx.group = group
        ctx.n = x.shape[1]
        return all_gather_counted(x, group, counter, "tokens", dim=1)

    @staticmethod
    def backward(ctx, grad):
        rank, world = dist.get_rank(ctx.group), dist.get_world_size(ctx.group)
        return grad.narrow(1, rank * ctx.n, ctx.n) * world, None, None


def _peer(group, rank: int) -> int:
    return rank if group is None else dist.get_global_rank(group, rank)


def _ring_shift(t: torch.Tensor, group, counter, kind: str):
    """Start sending `t` to the next rank and receiving the previous rank's into a new buffer."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    t = t.contiguous()
    buf = torch.empty_like(t)
    counter.add(kind, _nbytes(t))
    ops = [dist.P2POp(dist.isend, t, _peer(group, (rank + 1) % world), group=group),
           dist.P2POp(dist.irecv, buf, _peer(group, (rank - 1) % world), group=group)]
    return buf, dist.batch_isend_irecv(ops)


def _wait(pending) -> None:
    for req in pending:
        req.wait()


# --- ring attention (sequence-wise, dense) -----------------------------------------------------------------
def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def chunk_attention(q, k, v, scale: float):
    """Attention of q on one key/value chunk: (out (B,H,n,D), lse (B,H,n)) in the accumulation dtype.

    Products run in the input dtype (tensor cores for bf16), softmax statistics and sums in fp32 or better.
    """
    acc = _acc_dtype(q.dtype)
    s = torch.matmul(q, k.transpose(-1, -2)).to(acc) * scale  # (B, H, n, m)
    lse = torch.logsumexp(s, dim=-1)
    return torch.matmul(torch.exp(s - lse.unsqueeze(-1)).to(v.dtype), v).to(acc), lse


def merge_partial(out, lse, out_i, lse_i):
    """Combine two softmax-normalised partial results over disjoint keys with their log-sum-exps."""
    if out is None:
        return out_i, lse_i
    new = torch.logaddexp(lse, lse_i)
    return out * torch.exp(lse - new).unsqueeze(-1) + out_i * torch.exp(lse_i - new).unsqueeze(-1), new


def _chunk_grads(q, k, v, dout, lse, delta, scale):
    """dq, dk, dv (accumulation dtype) of one chunk given the global lse and delta = rowsum(dout * out)."""
    acc = lse.dtype
    p = torch.exp(torch.matmul(q, k.transpose(-1, -2)).to(acc) * scale - lse.unsqueeze(-1))  # (B, H, n, m)
    dv = torch.matmul(p.to(v.dtype).transpose(-1, -2), dout).to(acc)
    ds = (p * (torch.matmul(dout, v.transpose(-1, -2)).to(acc) - delta.unsqueeze(-1))).to(q.dtype)
    return (torch.matmul(ds, k).to(acc) * scale, torch.matmul(ds.transpose(-1, -2), q).to(acc) * scale, dv)


class _RingAttention(torch.autograd.Function):
    """Each rank keeps its queries; key/value chunks go around the ring; partials merge by log-sum-exp.

    Backward goes around the ring again: the kv chunks travel as in forward, and the dk/dv accumulated for
    a visiting chunk (fp32 or better) travel behind it and reach its owner after the last hop.
    Autocast is off inside: dtypes are chosen explicitly (chunk_attention).
    """

    @staticmethod
    def forward(ctx, q, k, v, scale, group, counter):
        world = dist.get_world_size(group)
        kv = torch.stack([k, v])  # (2, B, H, m, D), sent in the input dtype
        out = lse = None
        with torch.autocast(q.device.type, enabled=False):
            for step in range(world):
                if step < world - 1:
                    nxt, pending = _ring_shift(kv, group, counter, "attention")  # overlaps the compute below
                out, lse = merge_partial(out, lse, *chunk_attention(q, kv[0], kv[1], scale))
                if step < world - 1:
                    _wait(pending)
                    kv = nxt
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale, ctx.group, ctx.counter = scale, group, counter
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        group, counter, scale = ctx.group, ctx.counter, ctx.scale
        world = dist.get_world_size(group)
        with torch.autocast(q.device.type, enabled=False):
            dout = dout.to(q.dtype)
            delta = (dout.to(out.dtype) * out).sum(-1)  # (B, H, n)
            kv = torch.stack([k, v])
            dq, dk_own, dv_own = _chunk_grads(q, k, v, dout, lse, delta, scale)
            travelling = None  # (2, B, H, m, D): dk/dv of the chunk held now, following it to its owner
            for step in range(1, world):
                kv, pending = _ring_shift(kv, group, counter, "attention")
                _wait(pending)
                if travelling is not None:
                    travelling, pending = _ring_shift(travelling, group, counter, "attention")
                    _wait(pending)
                dq_i, dk_i, dv_i = _chunk_grads(q, kv[0], kv[1], dout, lse, delta, scale)
                dq = dq + dq_i
                contribution = torch.stack([dk_i, dv_i])
                travelling = contribution if travelling is None else travelling + contribution
            if travelling is not None:  # last hop: the chunk's accumulated gradient reaches its owner
                travelling, pending = _ring_shift(travelling, group, counter, "attention")
                _wait(pending)
                dk_own, dv_own = dk_own + travelling[0], dv_own + travelling[1]
        return dq.to(q.dtype), dk_own.to(k.dtype), dv_own.to(v.dtype), None, None, None


def ring_attention(q, k, v, *, group=None, counter: CommCounter | None = None, scale: float | None = None):
    """Dense attention of local queries over all ranks' keys/values (B, H, n, D) -> (B, H, n, D)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return _RingAttention.apply(q, k, v, scale, group, counter or CommCounter())


# --- Ulysses (head-wise) -----------------------------------------------------------------------------------
def round_robin_heads(num_heads: int, world: int) -> list[list[int]]:
    """Head h on rank h % world."""
    return [list(range(r, num_heads, world)) for r in range(world)]


def balance_heads(work: Sequence[float], world: int) -> list[list[int]]:
    """Longest-processing-time first: heads by decreasing work, each onto the least-loaded rank.

    Ties go to the rank with fewer heads, then the lower rank, so equal work reduces to an even split.
    """
    heap = [(0.0, 0, r) for r in range(world)]
    placement: list[list[int]] = [[] for _ in range(world)]
    for h in sorted(range(len(work)), key=lambda h: (-float(work[h]), h)):
        load, count, r = heapq.heappop(heap)
        placement[r].append(h)
        heapq.heappush(heap, (load + float(work[h]), count + 1, r))
    return [sorted(p) for p in placement]


def rank_work(placement: Sequence[Sequence[int]], work: Sequence[float]) -> list[float]:
    return [float(sum(work[h] for h in heads)) for heads in placement]


def heads_to_sequence_layout(x, placement, group, counter):
    """(B, H, n, D) sequence-sharded -> (B, H_r, N, D): this rank's heads (placement[rank]) over all tokens."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    order = [h for heads in placement for h in heads]
    counts = [len(heads) for heads in placement]
    B, _, n, D = x.shape
    rows = x[:, order].transpose(0, 1)  # (H, B, n, D), grouped by destination rank
    got = _AllToAllRows.apply(rows, counts, [counts[rank]] * world, group, counter, "attention")  # (W*H_r, B, n, D)
    got = got.view(world, counts[rank], B, n, D).permute(2, 1, 0, 3, 4)  # (B, H_r, W, n, D)
    return got.reshape(B, counts[rank], world * n, D)


def sequence_to_heads_layout(x, placement, group, counter):
    """Inverse of heads_to_sequence_layout: (B, H_r, N, D) -> (B, H, n, D) in the original head order."""
    world = dist.get_world_size(group)
    order = [h for heads in placement for h in heads]
    counts = [len(heads) for heads in placement]
    B, Hr, N, D = x.shape
    n = N // world
    rows = x.view(B, Hr, world, n, D).permute(2, 1, 0, 3, 4)  # (W, H_r, B, n, D), grouped by destination
    got = _AllToAllRows.apply(rows.reshape(world * Hr, B, n, D), [Hr] * world, counts, group, counter,
                              "attention")  # (H, B, n, D) in `order`
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor(order)] = torch.arange(len(order))
    return got.transpose(0, 1)[:, inverse.to(got.device)]


def ulysses_attention(q, k, v, local_attention, *, placement=None, group=None, counter=None):
    """All-to-all to head-sharded, `local_attention(q, k, v, heads)` on full sequences, all-to-all back.

    q, k and v travel in one all-to-all: one autograd node, so every rank runs the same collectives in
    backward in the same order, even a rank whose output ignores k and v (no heads placed on it).
    """
    counter = counter or CommCounter()
    placement = placement or round_robin_heads(q.shape[1], dist.get_world_size(group))
    heads = placement[dist.get_rank(group)]
    B = q.shape[0]
    qkv = heads_to_sequence_layout(torch.cat([q, k, v]), placement, group, counter)  # (3B, H_r, N, D)
    out = local_attention(qkv[:B], qkv[B:2 * B], qkv[2 * B:], heads)  # (B, H_r, N, D)
    return sequence_to_heads_layout(out, placement, group, counter)


# --- DSV sparse key/value exchange (sequence-wise) ---------------------------------------------------------
class _SparseKVExchange(torch.autograd.Function):
    """Assemble full-length K and V holding only the blocks some local query block selected.

    `need` (W, B, H, nb) bool: need[i, b, h, j] = rank i needs block j of this rank's shard. Each rank
    sends exactly those blocks (k and v stacked); missing blocks stay zero and are never read by
    block-sparse attention. Backward returns the gradients of the received blocks to their owners.
    """

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


def dense_reference_attention(q, k, v, block_mask=None, block_size: int = 1):
    """Exact attention, optionally restricted to selected (query block, kv block) pairs; for tests."""
    s = torch.matmul(q, k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if block_mask is not None:
        allowed = block_mask.repeat_interleave(block_size, 2).repeat_interleave(block_size, 3)
        s = s.masked_fill(~allowed, float("-inf"))
    return torch.matmul(torch.softmax(s, -1), v)


def analytic_bytes(mode: str, *, batch: int, heads: int, tokens: int, head_dim: int, world: int,
                   element_size: int, grad_element_size: int | None = None, backward: bool = True) -> int:
    """Bytes one rank sends for one self-attention call (forward [+ backward]) of a dense layer.

    ulysses: q, k, v out and o back (4 all-to-alls), each sending (W-1)/W of a local (B, H, n, D) tensor;
    backward mirrors them. ring: (W-1) hops of the local k+v; backward (W-1) hops of k+v plus (W-1) hops of
    the accumulated dk+dv.
    """
    grad_element_size = grad_element_size or element_size
    local = batch * heads * (tokens // world) * head_dim
    if mode == "ulysses":
        per_tensor = local * (world - 1) // world
        fwd = 4 * per_tensor * element_size
        return fwd + (4 * per_tensor * grad_element_size if backward else 0)
    if mode == "ring":
        fwd = (world - 1) * 2 * local * element_size
        bwd = (world - 1) * 2 * local * (element_size + grad_element_size)
        return fwd + (bwd if backward else 0)
    raise ValueError(f"mode must be one of {', '.join(CONTEXT_PARALLEL_MODES)}, got {mode!r}")


# --- the `cp` objects the DiT calls ------------------------------------------------------------------------
class _SumAcrossRanks(torch.autograd.Function):
    """All-reduce (sum) of per-rank partials of a replicated loss; backward x world (module docstring)."""

    @staticmethod
    def forward(ctx, x, group, counter):
        ctx.world = dist.get_world_size(group)
        out = x.clone()
        counter.add("attention", _allreduce_bytes(out, ctx.world))
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.world, None, None


def _allreduce_bytes(t: torch.Tensor, world: int) -> int:
    """Per-rank send volume of a ring all-reduce: reduce-scatter + all-gather, 2 (W-1)/W of the tensor."""
    return _nbytes(t) * 2 * (world - 1) // world


def rect_block_sparse_attention(q, k, v, block_mask, block_size: int, scale: float):
    """Exact block-sparse attention of local queries (B, H, n, D) over full-length keys/values (B, H, N, D).

    block_mask (B, H, n/bs, N/bs): each query block gathers its selected key/value blocks, then SDPA with a
    mask for rows that selected fewer blocks than the most (per-head top-k may differ).
    """
    B, H, n, D = q.shape
    nq, nk = n // block_size, k.shape[2] // block_size
    counts = block_mask.sum(-1)  # (B, H, nq)
    kmax = int(counts.max())
    chosen = torch.argsort(block_mask.to(torch.int8), dim=-1, descending=True, stable=True)[..., :kmax]
    flat = (chosen + (torch.arange(B * H, device=q.device) * nk).view(B, H, 1, 1)).reshape(-1)
    kb = k.reshape(B * H * nk, block_size, D).index_select(0, flat).view(B, H * nq, kmax * block_size, D)
    vb = v.reshape(B * H * nk, block_size, D).index_select(0, flat).view(B, H * nq, kmax * block_size, D)
    mask = None
    if not bool((counts == kmax).all()):
        slot_ok = torch.arange(kmax, device=q.device) < counts.unsqueeze(-1)  # (B, H, nq, kmax)
        mask = slot_ok.repeat_interleave(block_size, -1).view(B, H * nq, 1, kmax * block_size)
    out = F.scaled_dot_product_attention(q.reshape(B, H * nq, block_size, D), kb, vb, attn_mask=mask, scale=scale)
    return out.view(B, H, n, D)


def contiguous_heads(num_heads: int, world: int) -> list[list[int]]:
    """Heads split into `world` contiguous, near-equal runs (rank r gets the r-th run)."""
    bounds = [round(r * num_heads / world) for r in range(world + 1)]
    return [list(range(bounds[r], bounds[r + 1])) for r in range(world)]


def _runs(heads: Sequence[int]) -> list[tuple[int, int]]:
    """Sorted head indices -> contiguous (start, stop) runs."""
    runs: list[tuple[int, int]] = []
    for h in heads:
        if runs and runs[-1][1] == h:
            runs[-1] = (runs[-1][0], h + 1)
        else:
            runs.append((h, h + 1))
    return runs


def dsv_head_work(attn, tokens: int) -> list[float]:
    """Dense-equivalent work of each head of a DSV layer: topk/n_kv_blocks (= 1 - sparsity) if sparse, else 1."""
    nk = -(-tokens // attn.block_size)
    sparse = attn.sparse_heads(nk)
    frac = attn.head_topk(nk).double() / nk
    return torch.where(sparse.cpu(), frac.cpu(), torch.ones_like(frac.cpu())).tolist()


class ContextParallel:
    """Shards the DiT's tokens over a process group; subclasses decide how self-attention sees all of them."""

    mode = "base"

    def __init__(self, group=None, counter: CommCounter | None = None):
        self.group = group
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        self.counter = counter or CommCounter()
        self.layer_work: dict[int, list[float]] = {}  # id(attention module) -> expected work per rank

    # -- the protocol the DiT calls --
    def shard_tokens(self, x):  # (B, N, C) -> (B, N/world, C)
        N = x.shape[1]
        if N % self.world:
            raise ValueError(f"context parallelism over {self.world} ranks needs the token count ({N}) to be "
                             f"a multiple of {self.world}")
        n = N // self.world
        return x.narrow(1, self.rank * n, n)

    def gather_tokens(self, x):  # (B, N/world, C) -> (B, N, C)
        return _GatherTokens.apply(x, self.group, self.counter)

    def attention(self, q, k, v, attn):  # (B, H, n, D) x3 local -> (B, H, n, D)
        raise NotImplementedError

    # -- training-step plumbing --
    def attach(self, model, optimizer=None) -> "ContextParallel":
        """Install on `model` and average gradients across ranks right before each optimizer step."""
        model.context_parallel = self
        if optimizer is not None:
            params = [p for group in optimizer.param_groups for p in group["params"]]
            optimizer.register_step_pre_hook(lambda opt, args, kwargs: self.sync_gradients(params))
        return self

    @torch.no_grad()
    def broadcast_parameters(self, module) -> None:
        """Make every rank's weights and buffers rank 0's (not counted: once per run, not per step)."""
        src = _peer(self.group, 0)
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src, group=self.group)

    @torch.no_grad()
    def sync_gradients(self, params) -> None:
        """Average gradients over ranks (each holds world x its share: see the module docstring)."""
        params = [p for p in params if p.requires_grad]
        by_dtype: dict[torch.dtype, list] = {}
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            by_dtype.setdefault(p.grad.dtype, []).append(p)
        for group in by_dtype.values():
            flat = torch.cat([p.grad.reshape(-1) for p in group])
            self.counter.add("grad_sync", _allreduce_bytes(flat, self.world))
            dist.all_reduce(flat, group=self.group)
            flat /= self.world
            offset = 0
            for p in group:
                p.grad.copy_(flat[offset:offset + p.numel()].view_as(p.grad))
                offset += p.numel()

    def expected_rank_work(self) -> list[float]:
        """Dense-equivalent attention work per rank, summed over layers, of the latest forward."""
        totals = [0.0] * self.world
        for work in self.layer_work.values():
            totals = [a + b for a, b in zip(totals, work)]
        return totals

    def _is_dsv(self, attn) -> bool:
        return hasattr(attn, "sparse_heads") and hasattr(attn, "q_estimator")


class UlyssesParallel(ContextParallel):
    """Head-wise: all-to-all to (this rank's heads, all tokens), the layer's own core, all-to-all back.

    Dense layers get contiguous near-equal head runs; DSV layers get heads placed longest-processing-time
    first by their dense-equivalent work (1 - sparsity for sparse heads, 1 for dense ones).
    """

    mode = "ulysses"

    def placement(self, attn, heads: int, tokens: int) -> list[list[int]]:
        if self._is_dsv(attn):
            work = dsv_head_work(attn, tokens)
            placement = balance_heads(work, self.world)
        else:
            work = [1.0] * heads
            placement = contiguous_heads(heads, self.world)
        self.layer_work[id(attn)] = rank_work(placement, work)
        return placement

    def attention(self, q, k, v, attn):
        H, N = q.shape[1], q.shape[2] * self.world
        placement = self.placement(attn, H, N)
        if not self._is_dsv(attn):
            def local(qh, kh, vh, heads):
                return _per_run(attn, qh, kh, vh, heads)
            return ulysses_attention(q, k, v, local, placement=placement, group=self.group, counter=self.counter)
        training = attn.training and torch.is_grad_enabled()
        updates = attn.profile_updates.clone()

        def local(qh, kh, vh, heads):
            # every head run sees the RNG state and profile counter one single-process call would see
            state = _rng_state(qh.device)
            outs, losses = [], []
            for start, stop in _runs(heads):
                _set_rng_state(qh.device, state)
                attn.profile_updates.copy_(updates)
                sl = slice(heads.index(start), heads.index(start) + stop - start)
                outs.append(attn.core(qh[:, sl], kh[:, sl], vh[:, sl], head_offset=start))
                if attn.estimator_loss is not None:
                    losses.append(attn.estimator_loss * (stop - start))
            if training:
                _set_rng_state(qh.device, state)
                torch.randperm(N, device=qh.device)  # advance the RNG exactly as the single-process core did
                self._finish_dsv_ulysses(attn, placement, losses, H)
            return torch.cat(outs, 1) if outs else qh

        return ulysses_attention(q, k, v, local, placement=placement, group=self.group, counter=self.counter)

    def _finish_dsv_ulysses(self, attn, placement, losses, H):
        """Share each rank's profile of its heads; make the estimator loss the all-heads value on every rank."""
        profile = all_gather_counted(attn.profiled_sparsity.unsqueeze(0), self.group, self.counter, "attention")
        with torch.no_grad():
            for r, heads in enumerate(placement):
                attn.profiled_sparsity[heads] = profile[r, heads]
        # this rank's share of the all-heads mean (fp32 on every rank, also one without heads)
        local = (torch.stack(losses).sum() / H if losses else attn.q_estimator.sum() * 0).float()
        total = local.detach().clone()
        self.counter.add("attention", _allreduce_bytes(total, self.world))
        dist.all_reduce(total, group=self.group)
        attn.estimator_loss = total + self.world * (local - local.detach())  # value: all heads; grad: world x share


def _per_run(attn, qh, kh, vh, heads):
    """The layer's own core on each contiguous run of this rank's heads (head_offset names the run)."""
    if not heads:
        return qh
    outs = []
    for start, stop in _runs(heads):
        sl = slice(heads.index(start), heads.index(start) + stop - start)
        outs.append(attn.core(qh[:, sl], kh[:, sl], vh[:, sl], head_offset=start))
    return torch.cat(outs, 1)


def _rng_state(device):
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def _set_rng_state(device, state):
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


class RingParallel(ContextParallel):
    """Sequence-wise: queries stay; dense layers pass k/v around the ring; DSV layers fetch only the k/v
    blocks some local query block selected (low-rank key estimates all-gathered so selection is global)."""

    mode = "ring"

    def attention(self, q, k, v, attn):
        if self._is_dsv(attn):
            return self._dsv_attention(q, k, v, attn)
        if type(attn).__name__ != "FullAttention":
            raise ValueError(f"ring context parallelism supports full and DSV self-attention, not "
                             f"{type(attn).__name__}; use ulysses")
        self.layer_work[id(attn)] = [q.shape[1] / self.world] * self.world
        return ring_attention(q, k, v, group=self.group, counter=self.counter)

    def _dsv_attention(self, q, k, v, attn):
        B, H, n, D = q.shape
        N, bs, scale = n * self.world, attn.block_size, D ** -0.5
        if n % bs:
            raise ValueError(f"ring context parallelism with DSV needs the tokens per rank ({n}) to be a "
                             f"multiple of block_size ({bs}); change frames/resolution or --set block_size")
        nk = N // bs
        sparse = attn.sparse_heads(nk)
        training = attn.training and torch.is_grad_enabled()
        heads = slice(0, H)
        q_est = k_est = None
        if training or bool(sparse.any()):
            q_est, k_est = attn.estimate(q, k, heads)  # local tokens: (B, H, n, r)
        attn.estimator_loss = self._estimator_loss(attn, q, k, k_est, profile=not attn.sparse_active) \
            if training else None
        work = dsv_head_work(attn, N)
        self.layer_work[id(attn)] = [sum(work) / self.world] * self.world
        sel, rest = sparse.nonzero().squeeze(1), (~sparse).nonzero().squeeze(1)
        outs = []
        if len(sel):
            with torch.no_grad():
                k_est_all = all_gather_counted(k_est[:, sel].detach(), self.group, self.counter, "attention", dim=2)
                scores = estimate_block_scores(q_est[:, sel], k_est_all, bs, scale)
                mask = select_blocks(scores, attn.head_topk(nk)[sel])  # (B, Hs, n/bs, nk)
            k_full, v_full = sparse_kv_exchange(k[:, sel], v[:, sel], mask, bs, group=self.group,
                                                counter=self.counter)
            outs.append(rect_block_sparse_attention(q[:, sel], k_full, v_full, mask, bs, scale))
        if len(rest):
            outs.append(ring_attention(q[:, rest], k[:, rest], v[:, rest], group=self.group, counter=self.counter))
        out = torch.cat(outs, 1)
        if len(sel) and len(rest):
            out = out[:, torch.argsort(torch.cat([sel, rest]))]  # back to head order
        attn._last = {"q": q.detach()[:1], "k": k.detach()[:1], "v": v.detach()[:1], "heads": heads,
                      "sparse": sparse.detach()}  # stats() then describe this rank's token shard
        return out

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
        self.counter.add("attention", _allreduce_bytes(rows, self.world))
        dist.all_reduce(rows, group=self.group)  # (B, H, S, D): every sampled query on every rank
        q_est_rows = torch.einsum("bhnd,hdr->bhnr", rows, attn.q_estimator)
        true = (rows @ k.detach().transpose(-1, -2)).float()  # (B, H, S, n)
        est = (q_est_rows @ k_est.transpose(-1, -2)).float()  # (B, H, S, n)
        sums = torch.stack([(est * true).sum(-1), est.pow(2).sum(-1), true.pow(2).sum(-1)])  # (3, B, H, S)
        dot, ee, tt = _SumAcrossRanks.apply(sums, self.group, self.counter)
        cosine = dot / torch.sqrt(torch.clamp_min(ee * tt, 1e-8 ** 2))  # F.cosine_similarity's eps
        ratio = ee.sqrt() / tt.sqrt().clamp_min(1e-6)
        loss = (1 - cosine).mean() + (ratio - 1).pow(2).mean()
        if profile:
            self._profile(attn, true.detach() * D ** -0.5, N)
        return loss

    @torch.no_grad()
    def _profile(self, attn, logits, N):
        """Stage-1 sparsity profile: blocks holding `mass_coverage` of each sampled row's softmax mass."""
        bs = attn.block_size
        peak = logits.amax(-1)
        self.counter.add("attention", _allreduce_bytes(peak, self.world))
        dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=self.group)
        e = torch.exp(logits - peak.unsqueeze(-1))
        total = e.sum(-1)
        self.counter.add("attention", _allreduce_bytes(total, self.world))
        dist.all_reduce(total, group=self.group)
        mass = (e / total.unsqueeze(-1)).unflatten(-1, (-1, bs)).sum(-1)  # (B, H, S, n/bs)
        mass = all_gather_counted(mass, self.group, self.counter, "attention", dim=-1)  # (B, H, S, N/bs)
        needed = blocks_to_cover(mass, 1, attn.mass_coverage)
        sparsity = (1 - needed.float() / (N // bs)).mean((0, 2))  # (H,)
        m = attn.profile_momentum if int(attn.profile_updates) > 0 else 0.0
        attn.profiled_sparsity.copy_(m * attn.profiled_sparsity + (1 - m) * sparsity)
        attn.profile_updates += 1


def make_context_parallel(mode: str, group=None, counter: CommCounter | None = None) -> ContextParallel:
    """'ulysses' (head-wise) or 'ring' (sequence-wise) over `group` (default: the whole world)."""
    classes = {"ulysses": UlyssesParallel, "ring": RingParallel}
    if mode not in classes:
        raise ValueError(f"context parallel mode must be one of {', '.join(CONTEXT_PARALLEL_MODES)}, got {mode!r}")
    return classes[mode](group, counter)
