"""Attention whose work depends on data (DSV) predicted from the tiles it computes, without data-dependent flow.

Fake tensors have no values, so `bool(sparse.any())`, `int(topk.max())` and a learned per-head sparsity cannot
be evaluated. An adapter replaces such a layer's `core` for the fake run: the estimator and its loss run as
real ops (they are part of the step), and the block-sparse kernel becomes a stand-in that allocates and saves
what FlexAttention saves (q, k, v, out, logsumexp, the block mask) and is charged the FLOPs of its computed
tiles. This is the only place that knows a DSV layer's internals (`dsv_layers()`, `core`, `estimate`,
`train_estimator`, `block_size`, `topk_min`).
"""
from __future__ import annotations

import contextlib

import torch
from torch.utils import flop_counter

from architectures.attention.dsv import kept_blocks

from .roofline import ATTENTION, ATTENTION_BACKWARD, HALF, OpCost

LEARNED = ("dsv: head sparsity is learned from data and unknown before training, so attention is predicted "
           "dense (stage 1); pass --set sparsity=S to predict block-sparse attention at a forced sparsity S")

# What the sparse kernel reached on a GPU, for the forced-sparsity warning: the prediction charges its computed
# tiles at the dense backend's rate, which FlexAttention did not reach.
FLEX_MEASURED = ("its computed tiles are charged at the dense kernel's rate, an optimistic bound: on the lent H200, "
                 "FlexAttention at 16,384 tokens (12 heads of 96, 128-token blocks) ran 0.73x, 1.10x and 1.67x as "
                 "fast as cuDNN SDPA at sparsity 0.5, 0.75 and 0.9, against 2x, 4x and 10x from its tile count "
                 "(reports/baselines/nvidia-h200/raw/attention/)")


class _TileAttention(torch.autograd.Function):
    """Stand-in for block-sparse attention on fake tensors: right outputs, saved tensors and gradients."""

    @staticmethod
    def forward(ctx, q, k, v, mask):  # (B, H, N, D) x3, bool (B, H, nQ, nK) -> (B, H, N, D)
        out = torch.empty_like(q)
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)  # (B, H, N)
        ctx.save_for_backward(q, k, v, out, lse, mask)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, _, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), None


class DSVAdapter:
    """Runs one DSV layer on fake tensors: dense heads through SDPA, sparse heads through tile stand-ins."""

    def __init__(self, layer, sparsity: float | None, ops: list, recording):
        self.layer, self.sparsity, self.ops, self.recording = layer, sparsity, ops, recording

    def topk(self, nk: int) -> int:
        return kept_blocks(self.sparsity, nk, self.layer.topk_min)

    def core(self, q, k, v, head_offset: int = 0):  # (B, H, N, D) x3 -> (B, H, N, D)
        from architectures.attention.full import dense_attention

        layer = self.layer
        B, H, N, D = q.shape
        heads = slice(head_offset, head_offset + H)
        nk = -(-N // layer.block_size)
        sparse = layer.sparse_active and self.sparsity is not None and self.topk(nk) < nk
        training = layer.training and torch.is_grad_enabled()
        q_est = k_est = None
        if training or sparse:
            q_est, k_est = layer.estimate(q, k, heads)
        # stage-1 profiling updates a buffer from values (no grad, a few small kernels): left out
        layer.estimator_loss = layer.train_estimator(q, k, q_est, k_est, heads, profile=False) if training else None
        if not sparse:
            return dense_attention(q, k, v)
        from architectures.attention.dsv import estimate_block_scores

        with torch.no_grad():
            scores = estimate_block_scores(q_est, k_est, layer.block_size, D ** -0.5)  # (B, H, nQ, nK)
            idx = scores.topk(self.topk(nk), dim=-1).indices
            mask = torch.zeros(scores.shape, dtype=torch.bool).scatter_(-1, idx, True)
        self._charge(q, k, v, self.topk(nk) / nk)
        return _TileAttention.apply(q, k, v, mask)

    def _charge(self, q, k, v, fraction: float) -> None:
        """FLOPs of the computed tiles (dense attention's, times the computed fraction), bytes of q, k, v, out."""
        if not self.recording():
            return
        shapes = (tuple(q.shape), tuple(k.shape), tuple(v.shape))
        moved = 4 * q.numel() * q.element_size()
        math_mode = HALF.get(q.dtype, "fp32")
        forward = flop_counter.sdpa_flop_count(*shapes)
        backward = flop_counter.sdpa_backward_flop_count(shapes[0], *shapes)
        # fused attention's classes, so that the tiles run at the dense attention kernel's rate (not a GEMM's)
        self.ops.append(OpCost("dsv.block_sparse_attention", int(forward * fraction), moved, math_mode, ATTENTION))
        self.ops.append(OpCost("dsv.block_sparse_attention_backward", int(backward * fraction), 2 * moved,
                               math_mode, ATTENTION_BACKWARD))


class Adapters:
    """The adapters of one model; `begin_step(last)` puts the model in its steady-state stage."""

    def __init__(self, model, trace):
        self.model, self.trace = model, trace
        self.layers = list(model.dsv_layers()) if hasattr(model, "dsv_layers") else []
        self.warnings: list[str] = []
        self.recording = False
        sparsity = getattr(model.config, "sparsity", None)
        if self.layers:
            self.warnings.append(LEARNED if sparsity is None else
                                 f"dsv: block-sparse attention predicted at the forced sparsity {sparsity} "
                                 f"(every head, stage 2); {FLEX_MEASURED}")
        self.adapters = [DSVAdapter(layer, sparsity, trace.ops, lambda: self.recording) for layer in self.layers]

    def begin_step(self, last: bool) -> None:
        self.recording = last
        if self.layers and hasattr(self.model, "steps_done"):  # the measured steps of `run` are past warm-up
            self.model.steps_done = max(self.model.steps_done, getattr(self.model.config, "dense_steps", 0))


@contextlib.contextmanager
def fake_friendly(model, trace, sweep=None):
    """DSV layers adapted to fake tensors while open; `sweep` (blocks.Owners.sweeping, when repeated blocks
    are traced once): the context the estimators' own steps after the loss run in (each layer's tensors are
    its block's, as in an optimizer step)."""
    adapters = Adapters(model, trace)
    for adapter in adapters.adapters:
        adapter.layer.core = adapter.core  # an instance attribute shadows the class's method
    # DSV models step their estimators in `_after_loss`, a loop over the layers outside any block's forward;
    # shadowed by an instance attribute (as `core` is), it runs in the sweep that gives each layer's tensors to
    # its block
    after = getattr(model, "_after_loss", None) if sweep is not None and adapters.layers else None
    if after is not None:
        def after_loss():
            with sweep():
                after()

        model._after_loss = after_loss
    try:
        yield adapters
    finally:
        for adapter in adapters.adapters:
            del adapter.layer.core
        if after is not None:
            del model._after_loss
