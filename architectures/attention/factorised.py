"""Factorised attention: spatial (within a frame) and temporal (across frames at one position)."""
from __future__ import annotations

import torch
from torch import nn
from torch.profiler import record_function

from .full import SelfAttention, dense_attention


class SpatialAttention(SelfAttention):
    """Each token attends to the tokens of its own frame (the text-to-image model's attention)."""

    def core(self, q, k, v, head_offset: int = 0):
        B, H, N, D = q.shape
        f = self.grid[0]
        out = dense_attention(*(t.reshape(B, H * f, N // f, D) for t in (q, k, v)))  # (B, H*F, hw, D)
        return out.view(B, H, N, D)

    def reference_mask(self, grid, device=None):
        frame = torch.arange(grid[0] * grid[1] * grid[2], device=device) // (grid[1] * grid[2])
        return frame[:, None] == frame[None, :]


class TemporalAttention(SelfAttention):
    """Each token attends to the tokens at its (row, col) in every frame (a motion module)."""

    def core(self, q, k, v, head_offset: int = 0):
        B, H, N, D = q.shape
        f = self.grid[0]
        # (B, H, F, hw, D) -> (B, H, hw, F, D): one short sequence per spatial position
        parts = [t.view(B, H, f, N // f, D).transpose(2, 3).reshape(B, H * (N // f), f, D) for t in (q, k, v)]
        out = dense_attention(*parts)  # (B, H*hw, F, D)
        return out.view(B, H, N // f, f, D).transpose(2, 3).reshape(B, H, N, D)

    def reference_mask(self, grid, device=None):
        pos = torch.arange(grid[0] * grid[1] * grid[2], device=device) % (grid[1] * grid[2])
        return pos[:, None] == pos[None, :]


class ParallelSpatialTemporal(nn.Module):
    """Spatial and temporal attention read the same input, outputs summed (Mobius's parallel idea in a DiT)."""

    def __init__(self, dim, heads, head_dim):
        super().__init__()
        self.spatial = SpatialAttention(dim, heads, head_dim)
        # the temporal output projection starts at zero, so a fresh model equals the image DiT
        self.temporal = TemporalAttention(dim, heads, head_dim, zero_out=True)

    def forward(self, x, grid, cp=None):  # (B, N, C) -> (B, N, C)
        with record_function("spatial"):
            s = self.spatial(x, grid, cp)
        with record_function("temporal"):
            t = self.temporal(x, grid, cp)
        return s + t
