"""Context parallelism for DiT self-attention: the `cp` protocol, byte counting and head-wise (Ulysses) mode.

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

Every byte a rank sends through this module and `ring` is counted in `cp.counter` (by kind): all-to-all
and point-to-point sends exactly (bytes leaving this rank for other ranks), all-reduce at the ring
algorithm's per-rank volume 2 (W-1)/W x size. Sequence-wise (ring) mode is in `ring`; `stbench.parallel.make_context_parallel` builds either.
"""
from __future__ import annotations

import heapq
from typing import Sequence

import torch
import torch.distributed as dist

from architectures.attention.dsv import DSVAttention, n_blocks
from architectures.spec import CONTEXT_PARALLEL_MODES



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


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def allreduce_bytes(t: torch.Tensor, world: int) -> int:
    """Per-rank send volume of a ring all-reduce: reduce-scatter + all-gather, 2 (W-1)/W of the tensor."""
    return nbytes(t) * 2 * (world - 1) // world


def global_rank(group, rank: int) -> int:
    """The global rank of `rank` in `group` (point-to-point and broadcast take global ranks)."""
    return rank if group is None else dist.get_global_rank(group, rank)


# --- collectives that count what they send -----------------------------------------------------------------
def all_to_all_rows(x: torch.Tensor, in_splits: Sequence[int], out_splits: Sequence[int], group, counter,
                    kind: str) -> torch.Tensor:
    """all_to_all_single along dim 0: rows in_splits[j] go to rank j; out_splits[i] rows arrive from rank i."""
    x = x.contiguous()
    rank = dist.get_rank(group)
    row_bytes = nbytes(x) // max(x.shape[0], 1)
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
    counter.add(kind, nbytes(x) * (world - 1))
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


def contiguous_heads(num_heads: int, world: int) -> list[list[int]]:
    """Heads split into `world` contiguous, near-equal runs (rank r gets the r-th run)."""
    bounds = [round(r * num_heads / world) for r in range(world + 1)]
    return [list(range(bounds[r], bounds[r + 1])) for r in range(world)]


def head_runs(heads: Sequence[int]) -> list[tuple[int, slice]]:
    """A rank's head indices -> (first head, slice of the rank's local head dim) per run of consecutive heads."""
    runs: list[tuple[int, slice]] = []
    for i, h in enumerate(heads):
        if runs and heads[i - 1] == h - 1:
            start, local = runs[-1]
            runs[-1] = (start, slice(local.start, i + 1))
        else:
            runs.append((h, slice(i, i + 1)))
    return runs


def core_per_run(attn, qh, kh, vh, heads, before_each=None):
    """The layer's own core on each run of this rank's heads (B, H_r, N, D) -> (B, H_r, N, D), and the
    runs' estimator losses (DSV) weighted by their head counts; `before_each()` runs before every run."""
    outs, losses = [], []
    for start, local in head_runs(heads):
        if before_each is not None:
            before_each()
        outs.append(attn.core(qh[:, local], kh[:, local], vh[:, local], head_offset=start))
        loss = getattr(attn, "estimator_loss", None)
        if loss is not None:
            losses.append(loss * (local.stop - local.start))
    return (torch.cat(outs, 1) if outs else qh), losses


def dsv_head_work(attn, tokens: int) -> list[float]:
    """Dense-equivalent work of each head of a DSV layer: topk/n_kv_blocks (= 1 - sparsity) if sparse, else 1.
    From the layer's host-side plan: no device read per step."""
    nk = n_blocks(tokens, attn.block_size)
    work = [1.0] * attn.heads
    if attn.sparse_active:
        for head, topk in zip(*attn.plan(nk, tokens)):
            work[head] = topk / nk
    return work


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
        src = global_rank(self.group, 0)
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
            self.counter.add("grad_sync", allreduce_bytes(flat, self.world))
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


class UlyssesParallel(ContextParallel):
    """Head-wise: all-to-all to (this rank's heads, all tokens), the layer's own core, all-to-all back."""

    mode = "ulysses"

    def placement(self, attn, heads: int, tokens: int) -> list[list[int]]:
        """Dense layers: contiguous near-equal head runs. DSV layers: heads placed longest-processing-time
        first by their dense-equivalent work (1 - sparsity for sparse heads, 1 for dense ones)."""
        if isinstance(attn, DSVAttention):
            work = dsv_head_work(attn, tokens)
            placement = balance_heads(work, self.world)
        else:
            work = [1.0] * heads
            placement = contiguous_heads(heads, self.world)
        self.layer_work[id(attn)] = rank_work(placement, work)
        return placement

    def attention(self, q, k, v, attn):  # (B, H, n, D) x3 local -> (B, H, n, D)
        H, N = q.shape[1], q.shape[2] * self.world
        placement = self.placement(attn, H, N)
        if not isinstance(attn, DSVAttention):
            def local(qh, kh, vh, heads):
                return core_per_run(attn, qh, kh, vh, heads)[0]
            return ulysses_attention(q, k, v, local, placement=placement, group=self.group, counter=self.counter)
        training = attn.training and torch.is_grad_enabled() and attn.profile_now  # estimator trains this step
        updates = attn.profile_updates.clone()
        attn.estimator_loss = None  # a rank without heads runs no core to reset it

        def local(qh, kh, vh, heads):
            state = _rng_state(qh.device)

            def replay():  # every run sees the RNG state and profile counter one single-process call would see
                _set_rng_state(qh.device, state)
                attn.profile_updates.copy_(updates)

            out, losses = core_per_run(attn, qh, kh, vh, heads, replay)
            attn.last_sparse_heads = attn.sparse_heads(n_blocks(N, attn.block_size))  # all heads, not the last run's
            if training:
                _set_rng_state(qh.device, state)
                torch.randperm(N, device=qh.device)  # advance the RNG exactly as the single-process core did
                self._finish_dsv_ulysses(attn, placement, losses, H)
            return out

        return ulysses_attention(q, k, v, local, placement=placement, group=self.group, counter=self.counter)

    def _finish_dsv_ulysses(self, attn, placement, losses, H):
        """Share each rank's profile of its heads; make the estimator loss the all-heads value on every rank."""
        profile = all_gather_counted(attn.profiled_sparsity.unsqueeze(0), self.group, self.counter, "attention")
        with torch.no_grad():
            for r, heads in enumerate(placement):
                attn.profiled_sparsity[heads] = profile[r, heads]
        attn.invalidate_plan()
        # this rank's share of the all-heads mean (fp32 on every rank, also one without heads)
        local = (torch.stack(losses).sum() / H if losses else attn.q_estimator.sum() * 0).float()
        total = local.detach().clone()
        self.counter.add("attention", allreduce_bytes(total, self.world))
        dist.all_reduce(total, group=self.group)
        attn.estimator_loss = total + self.world * (local - local.detach())  # value: all heads; grad: world x share


def _rng_state(device):
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def _set_rng_state(device, state):
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)
