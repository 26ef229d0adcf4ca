"""DSV attention (arXiv 2502.07590): a low-rank estimator picks key/value blocks; sparse-enough heads attend
only to those.

The pieces are plain functions so context parallelism can reuse them on sharded tokens:
`estimate_block_scores` -> `select_blocks` (or `select_key_tokens`) -> `block_sparse_attention` (exact on
the selected keys). The layer follows the paper's two stages: stage 1 attends densely, trains the estimator
by its own loss and optimizer and profiles each head's sparsity; stage 2 attends sparsely, re-profiling and
fine-tuning the estimator (at a reduced learning rate) every `reprofile_interval` steps.
"""
from __future__ import annotations

import bisect
import json
import math
from pathlib import Path

import torch
from torch import nn
import torch.nn.functional as F

from .full import SelfAttention, dense_attention
from .sparse import (block_mask_to_token_mask, block_sparse_attention, choose_backend, computed_tiles,  # noqa: F401
                     gather_block_sparse_attention, gather_token_attention, n_blocks, pad_tokens)

QUERY_GROUPS = ("cube", "raster")
KEY_SELECTIONS = ("block", "token")


def block_sums(x, block_size: int):  # (..., N) -> (..., ceil(N / block_size)): the sum over each key block
    nk = n_blocks(x.shape[-1], block_size)
    return F.pad(x, (0, nk * block_size - x.shape[-1])).unflatten(-1, (nk, block_size)).sum(-1)


def pooled_key_probs(q_est, k_est, block_size: int, scale: float):  # -> (B, H, nQ, N)
    """Estimated attention of each query block (its mean low-rank query: logits are linear in q) to every key."""
    B, H, N, _ = q_est.shape
    nq = n_blocks(N, block_size)
    pooled = pad_tokens(q_est, block_size).view(B, H, nq, block_size, -1).sum(3)  # (B, H, nQ, r)
    last = N - (nq - 1) * block_size  # tokens in the last (possibly partial) block
    counts = torch.cat([torch.full((nq - 1,), float(block_size)), torch.tensor([float(last)])]).to(q_est)
    return torch.softmax(((pooled / counts[:, None]) @ k_est.transpose(-1, -2)).float() * scale, dim=-1)


def estimate_block_scores(q_est, k_est, block_size: int, scale: float):  # -> (B, H, nQ, nK)
    """Estimated attention mass of each key block for each query block, from low-rank q_est, k_est (B, H, N, r).
    Rows sum to 1."""
    return block_sums(pooled_key_probs(q_est, k_est, block_size, scale), block_size)


def kept_blocks(sparsity: float, blocks: int, at_least: int = 1) -> int:
    """Key blocks a query block keeps at `sparsity`: ceil((1 - s) x blocks), at least min(at_least, blocks) (the
    layer's `head_topk` for one number, on the host)."""
    return min(blocks, max(min(at_least, blocks), math.ceil((1 - sparsity) * blocks - 1e-6)))


def select_blocks(scores, topk, kmax: int | None = None) -> torch.Tensor:  # (B, H, nQ, nK) -> bool (B, H, nQ, nK)
    """Each query block keeps its `topk` highest-scoring key blocks; topk is an int or an (H,) tensor per head.
    kmax: the largest topk when the caller knows it (else read from topk: a host synchronisation)."""
    nk = scores.shape[-1]
    per_head = torch.as_tensor(topk, device=scores.device).clamp(1, nk).view(-1)
    kmax = min(nk, kmax) if kmax is not None else int(per_head.max())
    idx = scores.topk(kmax, dim=-1).indices  # (B, H, nQ, kmax)
    keep = torch.arange(kmax, device=scores.device) < per_head.view(1, -1, 1, 1)  # (1, H or 1, 1, kmax)
    mask = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    return mask.scatter_(-1, idx, keep.expand_as(idx).contiguous())


def select_key_tokens(probs, count: int):  # (B, H, nQ, N) -> long (B, H, nQ, count)
    """Token-level key selection: each query block keeps the `count` keys of highest estimated attention."""
    return probs.topk(min(count, probs.shape[-1]), dim=-1).indices


def block_sparsity(probs, block_size: int, coverage: float):  # (..., N) -> (...,) float
    """DSV's profiled sparsity of each row: the fraction of its key blocks left over once its largest blocks
    hold `coverage` of its attention mass."""
    sums = block_sums(probs, block_size)  # (..., blocks)
    needed = (sums.sort(dim=-1, descending=True).values.cumsum(-1) < coverage).sum(-1) + 1
    return 1 - needed.float() / sums.shape[-1]


def cube_shape(grid, volume: int) -> tuple[int, int, int] | None:
    """The most cube-like (frames, rows, cols) group of `volume` tokens that tiles `grid`; None if none does."""
    shapes = [(a, b, volume // (a * b)) for a in range(1, volume + 1) for b in range(1, volume // a + 1)
              if volume % (a * b) == 0]
    fits = [s for s in shapes if all(g % d == 0 for g, d in zip(grid, s))]
    return min(fits, key=lambda s: (max(s) / min(s), -s[1] * s[2]), default=None)


def cube_order(grid, shape) -> torch.Tensor:  # -> (N,) long: raster token index of each position in cube order
    """Tokens reordered so that each run of prod(shape) consecutive tokens is one 3D cube of the grid."""
    f, h, w = grid
    a, b, c = shape
    idx = torch.arange(f * h * w).view(f // a, a, h // b, b, w // c, c)
    return idx.permute(0, 2, 4, 1, 3, 5).reshape(-1)


class CostTable:
    """Measured speed-up of a sparse backend over dense attention, by backend, token count and sparsity."""

    def __init__(self, points):  # iterable of (backend, tokens, sparsity, speedup)
        self.curves: dict[tuple[str, int], list[tuple[float, float]]] = {}
        for backend, tokens, sparsity, speedup in points:
            self.curves.setdefault((backend, int(tokens)), []).append((float(sparsity), float(speedup)))
        for curve in self.curves.values():
            curve.sort()

    @classmethod
    def from_file(cls, path) -> "CostTable":
        """Records of `python -m stbench attention` (a results.jsonl or the folder holding one)."""
        path = Path(path)
        path = path / "results.jsonl" if path.is_dir() else path
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        rows = [r.get("attention") or {} for r in rows if r.get("status") == "ok"]
        return cls((r["backend"], r["tokens"], r["sparsity"], r["speedup"]) for r in rows if r.get("speedup"))

    def speedup(self, backend: str, tokens: int, sparsity: float) -> float | None:
        """Speed-up at the nearest measured token count, linear in sparsity (clamped); None if unmeasured."""
        counts = [t for b, t in self.curves if b == backend]
        if not counts:
            return None
        nearest = min(counts, key=lambda t: abs(math.log(t / tokens)))
        xs, ys = zip(*self.curves[(backend, nearest)])
        i = bisect.bisect_left(xs, sparsity)
        if i == 0 or i == len(xs):
            return ys[min(i, len(xs) - 1)]
        t = (sparsity - xs[i - 1]) / (xs[i] - xs[i - 1])
        return ys[i - 1] + t * (ys[i] - ys[i - 1])


class DSVAttention(SelfAttention):
    """Self-attention with DSV's learned sparsity: dense + profiling in stage 1, sparse heads in stage 2."""

    def __init__(self, dim, heads, head_dim, *, rank=16, block_size=64, sparsity_threshold=0.5,
                 sparsity: float | None = None, topk_min=1, profile_momentum=0.9, mass_coverage=0.9,
                 estimator_samples=64, backend="auto", recompute=False, zero_out=False, query_groups="raster",
                 key_selection="block", estimator_lr=1e-2, norm_weight=1.0, cost_table: CostTable | None = None):
        super().__init__(dim, heads, head_dim, zero_out)
        self.block_size, self.sparsity_threshold, self.sparsity = block_size, sparsity_threshold, sparsity
        self.topk_min, self.profile_momentum, self.mass_coverage = topk_min, profile_momentum, mass_coverage
        self.estimator_samples, self.backend, self.recompute = estimator_samples, backend, recompute
        self.query_groups, self.key_selection, self.cost_table = query_groups, key_selection, cost_table
        self.estimator_lr, self.norm_weight = estimator_lr, norm_weight
        # Both start as the same random projection: q_est . k_est is then a Johnson-Lindenstrauss sketch of q . k.
        init = torch.randn(heads, head_dim, rank) / math.sqrt(rank)
        self.q_estimator = nn.Parameter(init.clone())  # (H, D, r)
        self.k_estimator = nn.Parameter(init.clone())  # (H, D, r)
        self.register_buffer("profiled_sparsity", torch.zeros(heads))
        self.register_buffer("profile_updates", torch.zeros((), dtype=torch.long))
        self.sparse_active = False  # stage 2; the model sets it from its step counter
        self.profile_now = True  # train the estimator (and profile) in this training forward; the model sets it
        self.estimator_loss: torch.Tensor | None = None  # reaches only the estimator; stepped by DSVStages
        self.last_estimator_loss: torch.Tensor | None = None  # detached value of the last stepped loss
        self.last_sparse_heads: torch.Tensor | None = None  # (H,) bool of the last forward
        self.capture_stats = False  # set by the model's dsv_stats(): keep this forward's q, k, v in _last
        self._last: dict | None = None  # detached tensors of a captured forward (never kept in training)
        self.warnings: list[str] = []  # kernel fallbacks and plan notes, for the case's record
        self.backend_ran: str | None = None  # 'flex' or 'gather': what the last sparse forward ran on
        self.last_work = (0, 0)  # (score tiles computed, score tiles of dense attention) of the last forward
        self.vetoed = False  # the cost table said sparse is not faster at this layer's k
        self._plans: dict = {}  # (nk, plan version) -> (sparse head indices, their topk), built on the host
        self._plan_version = 0
        self._flex_failed = False
        self._optimizer = None
        self._orders: dict = {}

    # --- the plan: which heads go sparse with which k (host-side, rebuilt only when the profile changes) ---
    def head_topk(self, nk: int) -> torch.Tensor:  # -> (H,) key blocks each head would keep
        s = self.profiled_sparsity if self.sparsity is None else torch.full_like(self.profiled_sparsity, self.sparsity)
        return torch.ceil((1 - s) * nk - 1e-6).long().clamp(min(self.topk_min, nk), nk)

    def sparse_heads(self, nk: int) -> torch.Tensor:  # -> (H,) bool: heads attending sparsely now
        if not self.sparse_active:
            return torch.zeros(self.heads, dtype=torch.bool, device=self.profiled_sparsity.device)
        passes = torch.ones_like(self.profiled_sparsity, dtype=torch.bool) if self.sparsity is not None else \
            (self.profiled_sparsity > self.sparsity_threshold) & (self.profile_updates > 0)
        return passes & (self.head_topk(nk) < nk)

    def plan(self, nk: int, tokens: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(sparse head indices, their topk) for stage 2; one host read per profile version, none per step."""
        key = (nk, tokens, self._plan_version)
        if key not in self._plans:
            sparse = self.sparse_heads(nk).tolist()
            topk = self.head_topk(nk).tolist()
            heads = tuple(h for h in range(self.heads) if sparse[h])
            self.vetoed = False
            if heads and self.cost_table is not None:
                backend = self._backend(self.profiled_sparsity.device)
                s = 1 - sum(topk[h] for h in heads) / (len(heads) * nk)
                gain = self.cost_table.speedup(backend, tokens, s)
                if gain is not None and gain <= 1.0:
                    heads, self.vetoed = (), True
            self._plans = {key: (heads, tuple(topk[h] for h in heads))}
        return self._plans[key]

    def invalidate_plan(self) -> None:
        """Call after writing `profiled_sparsity` directly: the next sparse forward re-reads it."""
        self._plan_version += 1

    def _backend(self, device) -> str:
        if self.key_selection == "token" or self._flex_failed:
            return "gather"
        return choose_backend(self.backend, device, self.block_size)

    def _fallback(self, message: str) -> None:
        self._flex_failed = True  # this layer of this model only: the next case starts on its own kernel again
        if message not in self.warnings:
            self.warnings.append(message)

    def _order(self, N: int, device):  # -> (perm, inverse) long tensors, or None for raster order
        grid = self.grid
        if self.query_groups != "cube" or grid is None or math.prod(grid) != N:
            return None
        key = (tuple(grid), str(device))
        if key not in self._orders:
            shape = cube_shape(grid, self.block_size)
            if shape is None:
                note = f"query groups: no 3D cube of {self.block_size} tokens tiles the grid {tuple(grid)}; raster runs"
                if note not in self.warnings:
                    self.warnings.append(note)
                self._orders[key] = None
            else:
                perm = cube_order(grid, shape).to(device)
                self._orders[key] = (perm, torch.argsort(perm))
        return self._orders[key]

    # --- the estimator ---
    def estimate(self, q, k, heads: slice):  # (B, H, N, D) -> low-rank (B, H, N, r), from detached q, k
        q_est = torch.einsum("bhnd,hdr->bhnr", q.detach(), self.q_estimator[heads].to(q.dtype))
        return q_est, torch.einsum("bhnd,hdr->bhnr", k.detach(), self.k_estimator[heads].to(k.dtype))

    def estimator_optimizer(self) -> torch.optim.Optimizer:
        """The estimator's own Adam (the model's optimizer never sees its parameters)."""
        if self._optimizer is None:
            self._optimizer = torch.optim.Adam([self.q_estimator, self.k_estimator], lr=self.estimator_lr)
        return self._optimizer

    def estimator_gradients(self) -> bool:
        """Set the estimator's .grad from its pending loss (and clear the loss); False if none is pending."""
        loss, self.estimator_loss = self.estimator_loss, None
        if loss is None or not loss.requires_grad:
            return False
        params = [self.q_estimator, self.k_estimator]
        with torch.enable_grad():
            grads = torch.autograd.grad(loss, params, allow_unused=True)
        for p, g in zip(params, grads):
            p.grad = torch.zeros_like(p) if g is None else g.contiguous()  # an expanded grad cannot be reduced in place
        self.last_estimator_loss = loss.detach()
        return True

    @torch.no_grad()
    def apply_estimator_step(self, lr_scale: float = 1.0) -> None:
        """One step of the estimator's own optimizer on its .grad (stage 2 passes the reduced lr scale)."""
        opt = self.estimator_optimizer()
        for group in opt.param_groups:
            group["lr"] = self.estimator_lr * lr_scale
        opt.step()
        self.q_estimator.grad = self.k_estimator.grad = None

    # --- attention ---
    def core(self, q, k, v, head_offset: int = 0):
        B, H, N, D = q.shape
        order = self._order(N, q.device)
        if order is not None:  # query/key groups are 3D cubes: contiguous runs of the reordered tokens
            q, k, v = (t.index_select(2, order[0]) for t in (q, k, v))
        heads = slice(head_offset, head_offset + H)
        scale, nk = D ** -0.5, n_blocks(N, self.block_size)
        planned, topk = self.plan(nk, N) if self.sparse_active else ((), ())
        local = [(h - head_offset, t) for h, t in zip(planned, topk) if head_offset <= h < head_offset + H]
        training = self.training and torch.is_grad_enabled()
        learn = training and self.profile_now
        q_est = k_est = None
        if learn or local:
            q_est, k_est = self.estimate(q, k, heads)
        self.estimator_loss = self.train_estimator(q, k, q_est, k_est, heads, profile=True) if learn else None
        if not local:
            out = dense_attention(q, k, v)
            self.last_work = (H * nk * nk, H * nk * nk)
        else:
            out = self._sparse(q, k, v, q_est, k_est, local, nk, scale)
        self.last_sparse_heads = torch.zeros(H, dtype=torch.bool)
        self.last_sparse_heads[[h for h, _ in local]] = True
        if self.capture_stats:
            self._last = {"q": q.detach()[:1], "k": k.detach()[:1], "v": v.detach()[:1], "heads": heads,
                          "sparse": self.last_sparse_heads.to(q.device)}
        return out if order is None else out.index_select(2, order[1])

    def _sparse(self, q, k, v, q_est, k_est, local, nk, scale):
        B, H, N, D = q.shape
        sel, topk = [h for h, _ in local], [t for _, t in local]
        every = len(sel) == H
        if not every:  # an index tensor per head set, cached: building one from a list would copy every step
            key = ("sel", tuple(sel), str(q.device))
            if key not in self._orders:
                idx = torch.tensor(sel, device=q.device)
                rest = torch.tensor([h for h in range(H) if h not in sel], device=q.device)
                self._orders[key] = (idx, rest, torch.argsort(torch.cat([idx, rest])))
            idx, rest, back = self._orders[key]
            qs, ks, vs, q_est, k_est = (t.index_select(1, idx) for t in (q, k, v, q_est, k_est))
        else:
            qs, ks, vs = q, k, v
        key = ("topk", tuple(topk), str(q.device))
        if key not in self._orders:
            self._orders[key] = torch.tensor(topk, device=q.device)
        topk_t, bs = self._orders[key], self.block_size
        requested = "gather" if self._flex_failed else self.backend  # a failed kernel stays off in this layer
        backend = self._backend(q.device)
        with torch.no_grad():
            if self.key_selection == "token":
                probs = pooled_key_probs(q_est, k_est, bs, scale)  # (B, Hs, nQ, N)
                kt = min(N, max(topk) * bs)
                keys = select_key_tokens(probs, kt)
        if self.key_selection == "token":
            # heads with fewer keys than kt still attend to kt (the per-head k differs by at most rounding)
            out_s = gather_token_attention(qs, ks, vs, keys, bs, scale, self.recompute)
            computed = len(sel) * nk * kt / bs
        else:
            with torch.no_grad():
                mask = select_blocks(estimate_block_scores(q_est, k_est, bs, scale), topk_t, kmax=max(topk))
            out_s = block_sparse_attention(qs, ks, vs, mask, bs, scale, requested, self.recompute, kmax=max(topk),
                                           uniform=len(set(topk)) == 1, on_fallback=self._fallback)
            backend = "gather" if self._flex_failed else backend
            computed = computed_tiles(backend, topk, nk, 1)
        self.backend_ran = backend
        self.last_work = (computed + (H - len(sel)) * nk * nk, H * nk * nk)
        if every:
            return out_s
        out = torch.cat([out_s, dense_attention(q.index_select(1, rest), k.index_select(1, rest),
                                                v.index_select(1, rest))], 1)
        return out.index_select(1, back)  # back to head order

    @torch._disable_dynamo  # eager, so its graph stays apart from a compiled model's (stepped on its own)
    def train_estimator(self, q, k, q_est, k_est, heads: slice, profile: bool):
        """The estimator's loss on sampled queries: (1 - cosine) + norm_weight * (norm ratio - 1)^2 of the
        estimated vs true logit rows; with `profile`, also fold this step's per-head sparsity into the profile."""
        B, H, N, D = q.shape
        idx = torch.randperm(N, device=q.device)[: self.estimator_samples]
        true = q.detach()[:, :, idx] @ k.detach().transpose(-1, -2)  # (B, H, S, N)
        est = q_est[:, :, idx] @ k_est.transpose(-1, -2)  # (B, H, S, N)
        true32, est32 = true.float(), est.float()
        cosine = F.cosine_similarity(est32, true32, dim=-1)  # (B, H, S)
        ratio = est32.norm(dim=-1) / true32.norm(dim=-1).clamp_min(1e-6)
        loss = (1 - cosine).mean() + self.norm_weight * (ratio - 1).pow(2).mean()
        if profile:
            with torch.no_grad():
                probs = torch.softmax(true32 * D ** -0.5, -1)  # (B, H, S, N)
                self.update_profile(block_sparsity(probs, self.block_size, self.mass_coverage).mean((0, 2)), heads)
        return loss

    @torch.no_grad()
    def update_profile(self, sparsity, heads: slice = slice(None)) -> None:
        """Fold one measurement of the heads' sparsity (H,) into the profile (momentum after the first)."""
        m = torch.where(self.profile_updates > 0, self.profile_momentum, 0.0)  # no host read
        self.profiled_sparsity[heads] = m * self.profiled_sparsity[heads] + (1 - m) * sparsity
        self.profile_updates += 1
        self.invalidate_plan()

    @torch.no_grad()
    def stats(self, query_blocks: int = 8) -> dict | None:
        """Chosen sparsity per head, estimator recall against the exact top-mass oracle and the relative
        output error of the captured forward, on a sample of query blocks."""
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
        head_recall = ((mass * row_mask).sum(-1) / (mass * oracle).sum(-1).clamp_min(1e-12)).mean((0, 2))  # (H,)
        dense = probs @ v  # (1, H, R, D)
        token_mask = row_mask.repeat_interleave(bs, -1)[..., :N]
        restricted = torch.softmax(logits.masked_fill(~token_mask, float("-inf")), -1) @ v
        actual = torch.where(sparse.view(1, H, 1, 1), restricted, dense)
        rel_error = (actual - dense).norm() / dense.norm().clamp_min(1e-12)
        return {"sparsity": float(chosen.mean()), "recall": float(head_recall.mean()), "sparse_heads": int(sparse.sum()),
                "heads": H, "rel_error": float(rel_error), "head_sparsity": chosen.tolist(),
                "head_recall": head_recall.tolist(), "profiled_sparsity": self.profiled_sparsity[heads].tolist()}


__all__ = ["DSVAttention", "CostTable", "kept_blocks", "estimate_block_scores", "select_blocks", "select_key_tokens",
           "block_sparsity", "cube_shape", "cube_order", "block_sums", "n_blocks", "block_sparse_attention", "gather_block_sparse_attention",
           "block_mask_to_token_mask"]
