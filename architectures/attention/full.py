"""The self-attention module interface shared by every kind, and full (dense SDPA) attention."""
from __future__ import annotations

from torch import nn
import torch.nn.functional as F
from torch.profiler import record_function


def dense_attention(q, k, v, attn_mask=None, scale=None):  # (B, H, N, D) x3 -> (B, H, N, D)
    """Softmax attention through SDPA (flash / memory-efficient kernels where the device has them)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)


class SelfAttention(nn.Module):
    """Multi-head self-attention over video tokens (B, N, C), N = F*h*w in (frame, row, col) order."""

    # Subclasses supply `core(q, k, v)` on (B, H, N, D). Under context parallelism `cp.attention(q, k, v, self)`
    # runs instead and may call `self.core` on gathered tokens and a slice of the heads (`head_offset` says
    # which). `self.grid` holds the full (un-sharded) token grid (F, h, w) of the current forward.

    def __init__(self, dim: int, heads: int, head_dim: int, zero_out: bool = False):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.qkv = nn.Linear(dim, 3 * heads * head_dim)
        self.out = nn.Linear(heads * head_dim, dim)
        if zero_out:  # a layer added to a pretrained model starts as the identity (residual)
            nn.init.zeros_(self.out.weight)
            nn.init.zeros_(self.out.bias)
        self.grid: tuple[int, int, int] | None = None

    def forward(self, x, grid, cp=None):  # (B, N, C) -> (B, N, C)
        B, N, _ = x.shape
        self.grid = tuple(grid)
        qkv = self.qkv(x).view(B, N, 3, self.heads, self.head_dim)  # (B, N, 3, H, D)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, N, D)
        with record_function("attention"):
            out = cp.attention(q, k, v, self) if cp is not None else self.core(q, k, v)  # (B, H, N, D)
        return self.out(out.transpose(1, 2).reshape(B, N, self.heads * self.head_dim))  # (B, N, C)

    def core(self, q, k, v, head_offset: int = 0):  # (B, H, N, D) x3 -> (B, H, N, D)
        raise NotImplementedError

    def reference_mask(self, grid, device=None):
        """(N, N) bool mask (True = may attend) equivalent to `core`; None for full attention. Tests use it."""
        return None


class FullAttention(SelfAttention):
    """Every token attends to every token of the video (SDPA)."""

    def core(self, q, k, v, head_offset: int = 0):
        return dense_attention(q, k, v)


class CrossAttention(nn.Module):
    """Video tokens attend to text tokens."""

    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.q = nn.Linear(dim, heads * head_dim)
        self.kv = nn.Linear(dim, 2 * heads * head_dim)
        self.out = nn.Linear(heads * head_dim, dim)

    def forward(self, x, text):  # (B, N, C), (B, L, C) -> (B, N, C)
        B, N, _ = x.shape
        q = self.q(x).view(B, N, self.heads, self.head_dim).transpose(1, 2)  # (B, H, N, D)
        k, v = self.kv(text).view(B, -1, 2, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        with record_function("attention"):
            out = dense_attention(q, k, v)  # (B, H, N, D)
        return self.out(out.transpose(1, 2).reshape(B, N, self.heads * self.head_dim))
