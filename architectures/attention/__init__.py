"""Attention implementations for the video DiT, behind a small registry of self-attention kinds.

Every kind is a `SelfAttention` module: forward(x (B, N, C), grid (F, h, w), cp=None) -> (B, N, C), with its
core a function of q, k, v of shape (B, H, N, D) (tokens in (frame, row, col) order) that context
parallelism can call on gathered tokens.

What must run eagerly inside torch.compile is decorated with torch._disable_dynamo (torch's own lazy form of
torch.compiler.disable): it imports torch._dynamo (about 1 s) at the first call instead of at import.
"""
from __future__ import annotations

from typing import Callable

from .dsv import (CostTable, DSVAttention, block_mask_to_token_mask, block_sparse_attention, estimate_block_scores,
                  gather_block_sparse_attention, select_blocks, select_key_tokens)
from .dsv_stages import make_dsv_attention
from .factorised import ParallelSpatialTemporal, SpatialAttention, TemporalAttention
from .full import CrossAttention, FullAttention, SelfAttention, dense_attention
from .window import WindowAttention

# kind -> builder(dim, heads, head_dim, config) for the DiT's self-attention sublayer
ATTENTION_KINDS: dict[str, Callable] = {
    "full": lambda dim, heads, head_dim, cfg: FullAttention(dim, heads, head_dim),
    "window": lambda dim, heads, head_dim, cfg: WindowAttention(dim, heads, head_dim, cfg.window_size),
    "serial": lambda dim, heads, head_dim, cfg: SpatialAttention(dim, heads, head_dim),  # + a temporal sublayer
    "parallel": lambda dim, heads, head_dim, cfg: ParallelSpatialTemporal(dim, heads, head_dim),
    "dsv": lambda dim, heads, head_dim, cfg: make_dsv_attention(dim, heads, head_dim, cfg),
}


def make_self_attention(kind: str, dim: int, heads: int, head_dim: int, config):
    if kind not in ATTENTION_KINDS:
        raise ValueError(f"unknown attention kind {kind!r}; legal: {', '.join(ATTENTION_KINDS)}")
    return ATTENTION_KINDS[kind](dim, heads, head_dim, config)


__all__ = ["ATTENTION_KINDS", "make_self_attention", "SelfAttention", "FullAttention", "WindowAttention",
           "SpatialAttention", "TemporalAttention", "ParallelSpatialTemporal", "DSVAttention", "CrossAttention",
           "dense_attention", "estimate_block_scores", "select_blocks", "block_sparse_attention",
           "gather_block_sparse_attention", "block_mask_to_token_mask", "select_key_tokens", "CostTable"]
