"""3D local window attention (DSV's baseline): tokens attend within non-overlapping (t, h, w) windows."""
from __future__ import annotations

import torch

from .full import SelfAttention, dense_attention


def fit_window(grid, window) -> tuple[int, int, int]:
    """Per axis, the largest divisor of the grid size that is <= the requested window size.

    Windows must tile the grid exactly; shrinking them (instead of padding) keeps every window full.
    """
    out = []
    for size, want in zip(grid, window):
        w = max(1, min(size, want))
        while size % w:
            w -= 1
        out.append(w)
    return tuple(out)


def window_partition(x, grid, window):  # (B, H, N, D) -> (B, H * n_windows, window_tokens, D)
    B, H, _, D = x.shape
    (f, h, w), (wf, wh, ww) = grid, window
    x = x.view(B, H, f // wf, wf, h // wh, wh, w // ww, ww, D)
    x = x.permute(0, 1, 2, 4, 6, 3, 5, 7, 8)  # (B, H, nf, nh, nw, wf, wh, ww, D)
    return x.reshape(B, H * (f // wf) * (h // wh) * (w // ww), wf * wh * ww, D)


def window_merge(x, heads, grid, window):  # (B, H * n_windows, window_tokens, D) -> (B, H, N, D)
    B, D = x.shape[0], x.shape[-1]
    (f, h, w), (wf, wh, ww) = grid, window
    x = x.view(B, heads, f // wf, h // wh, w // ww, wf, wh, ww, D)
    x = x.permute(0, 1, 2, 5, 3, 6, 4, 7, 8)  # (B, H, nf, wf, nh, wh, nw, ww, D)
    return x.reshape(B, heads, f * h * w, D)


def window_ids(grid, window, device=None):  # -> (N,) id of the window each token is in
    (f, h, w), (wf, wh, ww) = grid, window
    t = torch.arange(f, device=device) // wf
    r = torch.arange(h, device=device) // wh
    c = torch.arange(w, device=device) // ww
    ids = (t[:, None, None] * (h // wh) + r[None, :, None]) * (w // ww) + c[None, None, :]
    return ids.reshape(-1)


def window_attention(q, k, v, grid, window, shared_kv=None):  # (B, H, N, D) x3 -> (B, H, N, D)
    """Dense attention within each 3D window of the (frames, rows, cols) token grid, shrunk to tile it;
    shared_kv: optional (k, v) (B, H, L, D) that every window also attends to (e.g. text tokens)."""
    B, H, _, D = q.shape
    win = fit_window(grid, window)
    qw, kw, vw = (window_partition(t, grid, win) for t in (q, k, v))  # (B, H*nW, Lw, D)
    if shared_kv is not None:
        n_windows, L = qw.shape[1] // H, shared_kv[0].shape[2]
        ks, vs = (t.unsqueeze(2).expand(B, H, n_windows, L, D).reshape(B, H * n_windows, L, D) for t in shared_kv)
        kw, vw = torch.cat([kw, ks], 2), torch.cat([vw, vs], 2)  # (B, H*nW, Lw + L, D)
    return window_merge(dense_attention(qw, kw, vw), H, grid, win)


class WindowAttention(SelfAttention):
    """Self-attention restricted to 3D windows of `window` = (frames, rows, cols) tokens."""

    def __init__(self, dim, heads, head_dim, window=(4, 8, 8), zero_out=False):
        super().__init__(dim, heads, head_dim, zero_out)
        self.window = tuple(window)

    def core(self, q, k, v, head_offset: int = 0):
        return window_attention(q, k, v, self.grid, self.window)

    def reference_mask(self, grid, device=None):
        ids = window_ids(grid, fit_window(grid, self.window), device)
        return ids[:, None] == ids[None, :]
