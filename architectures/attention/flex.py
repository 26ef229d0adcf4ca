"""Block-sparse attention on CUDA through FlexAttention (a BlockMask built from the selected blocks).

FlexAttention's default backward kernels on Hopper use 128-token tiles, which must divide the BlockMask's
blocks; a DSV block of 64 tokens would leave no valid kernel. So the BlockMask is kept at 128-token blocks
(a coarse block is visited when any of its DSV blocks is selected) and a mask_mod applies the exact
DSV-block selection inside it: the result is exactly attention restricted to the selected blocks.
"""
from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F

FLEX_BLOCK = 128  # BlockMask block size: a multiple of every default kernel tile
# Compiles are static per shape, and DSV layers differ in how many heads go sparse: a sweep meets many
# (batch, heads, tokens, grad mode) combinations, more than dynamo's default limit of 8 per function.
FLEX_RECOMPILE_LIMIT = 64
_compiled_flex = None
_flex_broken: str | None = None  # set once when FlexAttention fails on this machine; callers fall back


def flex_available(device: torch.device) -> bool:
    """FlexAttention's compiled kernels run on CUDA only (there is no CPU backward)."""
    if device.type != "cuda" or _flex_broken is not None:
        return False
    try:
        import torch.nn.attention.flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def flex_supports(block_size: int) -> bool:
    """DSV blocks that tile FlexAttention's blocks exactly (16, 32, 64, 128, 256, ...)."""
    return block_size % FLEX_BLOCK == 0 or FLEX_BLOCK % block_size == 0


def compiled_flex_attention():
    """flex_attention under torch.compile, compiled once per process (new shapes recompile).

    fullgraph: a graph break or the recompile limit raises (and the caller falls back to the gather path
    with a warning) instead of silently running FlexAttention's unfused eager reference.
    """
    global _compiled_flex
    if _compiled_flex is None:
        from torch.nn.attention.flex_attention import flex_attention

        _compiled_flex = torch.compile(flex_attention, dynamic=False, fullgraph=True)
    return _compiled_flex


def _recompile_room():
    """A dynamo config patch raising the per-function recompile limit to FLEX_RECOMPILE_LIMIT (never lowering it)."""
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"  # renamed in torch 2.6
    return config.patch(**{name: max(FLEX_RECOMPILE_LIMIT, getattr(config, name))})


def padded_head_dim(head_dim: int) -> int:
    """A head dim every FlexAttention version takes: a power of two, at least 16 (96 -> 128, 8 -> 16)."""
    return max(16, 1 << math.ceil(math.log2(head_dim)))


def to_flex_block_mask(block_mask: torch.Tensor, block_size: int, seq_len: int, padded_len: int):
    """(B, H, nQ, nK) bool over DSV blocks -> a FlexAttention BlockMask over `padded_len` tokens."""
    from torch.nn.attention.flex_attention import BlockMask

    flex_block = max(block_size, FLEX_BLOCK)
    ratio = flex_block // block_size
    n = padded_len // flex_block
    fine = F.pad(block_mask, (0, n * ratio - block_mask.shape[-1], 0, n * ratio - block_mask.shape[-2]))
    sub = fine.view(*fine.shape[:2], n, ratio, n, ratio)
    full = sub.all(5).all(3)  # (B, H, n, n): every DSV block inside selected -> no mask_mod needed there
    if padded_len != seq_len:
        full[..., -1] = False  # the last key block holds padding: mask_mod must run there
    partial = sub.any(5).any(3) & ~full

    def blocks(m):  # -> counts (B, H, n) int32, selected indices first (stable sort of the 0/1 mask)
        order = torch.argsort(m.to(torch.int8), dim=-1, descending=True, stable=True)
        return m.sum(-1, dtype=torch.int32), order.to(torch.int32)

    def mask_mod(b, h, q_idx, kv_idx):  # the exact DSV-block selection, no padded keys
        return fine[b, h, q_idx // block_size, kv_idx // block_size] & (kv_idx < seq_len)

    (num, idx), (full_num, full_idx) = blocks(partial), blocks(full)
    return BlockMask.from_kv_blocks(num, idx, full_num, full_idx, BLOCK_SIZE=flex_block, mask_mod=mask_mod,
                                    seq_lengths=(padded_len, padded_len))


def flex_block_sparse_attention(q, k, v, block_mask, block_size: int, scale: float):
    """q, k, v (B, H, N, D) -> (B, H, N, D) through the compiled FlexAttention kernel."""
    N, head_dim = q.shape[-2], q.shape[-1]
    flex_block = max(block_size, FLEX_BLOCK)
    padded = -(-N // flex_block) * flex_block
    dp = padded_head_dim(head_dim)
    if dp != head_dim or padded != N:
        # zero head-dim columns change no score; padded value columns and padded tokens are sliced off
        q, k, v = (F.pad(t, (0, dp - head_dim, 0, padded - N)) for t in (q, k, v))  # (B, H, padded, dp)
    else:  # contiguous either way: the compiled kernel guards on strides, one layout means one compile per shape
        q, k, v = (t.contiguous() for t in (q, k, v))
    mask = to_flex_block_mask(block_mask, block_size, N, padded)
    with _recompile_room():
        out = compiled_flex_attention()(q, k, v, block_mask=mask, scale=scale)  # (B, H, padded, dp)
    return out[..., :N, :head_dim]


@torch.compiler.disable  # the kernel is compiled on its own; an outer torch.compile calls it as is
def flex_attention_with_fallback(q, k, v, block_mask, block_size: int, scale: float, fallback):
    return FlexWithFallback.apply(q, k, v, block_mask, block_size, scale, fallback)


class FlexWithFallback(torch.autograd.Function):
    """FlexAttention forward and backward, with the gather path's gradients if its backward fails to build."""

    # the backward kernel compiles at the first backward: a compile error there would otherwise end the run

    @staticmethod
    def forward(ctx, q, k, v, block_mask, block_size, scale, fallback):
        with torch.enable_grad():
            leaves = tuple(t.detach().requires_grad_(t.requires_grad) for t in (q, k, v))
            out = flex_block_sparse_attention(*leaves, block_mask, block_size, scale)
        ctx.leaves, ctx.out, ctx.rest = leaves, out, (block_mask, block_size, scale, fallback)
        return out.detach()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        leaves, out = ctx.leaves, ctx.out
        wanted = [t for t in leaves if t.requires_grad]
        try:
            grads = iter(torch.autograd.grad(out, wanted, grad))
        except torch.OutOfMemoryError:
            raise  # a measurement (status oom), not a broken kernel
        except Exception as error:  # noqa: BLE001 - any kernel build failure: recompute on the gather path
            mark_flex_broken(error)
            block_mask, block_size, scale, fallback = ctx.rest
            with torch.enable_grad():
                again = tuple(t.detach().requires_grad_(t.requires_grad) for t in leaves)
                redo = fallback(*again, block_mask, block_size, scale)
                grads = iter(torch.autograd.grad(redo, [t for t in again if t.requires_grad], grad))
        ctx.leaves = ctx.out = None
        return tuple(next(grads) if t.requires_grad else None for t in leaves) + (None,) * 4


def mark_flex_broken(error: Exception) -> None:
    """Remember a FlexAttention failure so later calls use the gather implementation instead of crashing."""
    global _flex_broken
    _flex_broken = f"{type(error).__name__}: {error}"
    warnings.warn(f"FlexAttention failed ({_flex_broken}); using the gather-based block-sparse attention")
