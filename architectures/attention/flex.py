"""Block-sparse attention through FlexAttention (a BlockMask built from the selected DSV blocks).

The BlockMask's block is the DSV block, and the kernel's tiles are made to divide it (`kernel_options`
where the block is smaller than the default tiles), so the kernel computes exactly the selected blocks:
what the record reports as computed is what ran. No process-wide state: a failure is the caller's to report.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .oom import is_out_of_memory

FLEX_BLOCK = 128  # FlexAttention's default BlockMask block; the default kernel tiles divide it
# Compiles are static per shape, and DSV layers differ in how many heads go sparse: a sweep meets many
# (batch, heads, tokens, grad mode) combinations, more than dynamo's default limit of 8 per function.
FLEX_RECOMPILE_LIMIT = 64
_compiled_flex = None


def flex_available(device: torch.device) -> bool:
    """FlexAttention's compiled kernels run on CUDA only (there is no CPU backward)."""
    if device.type != "cuda":
        return False
    try:
        import torch.nn.attention.flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def flex_supports(block_size: int) -> bool:
    """DSV blocks the kernel can tile exactly: powers of two from 16 up to FLEX_BLOCK, or multiples of FLEX_BLOCK."""
    return block_size % FLEX_BLOCK == 0 or (block_size >= 16 and FLEX_BLOCK % block_size == 0)


def kernel_tiles(block_size: int) -> dict:
    """kernel_options making every forward/backward tile divide a `block_size` block (none needed from 128 up)."""
    if block_size % FLEX_BLOCK == 0:
        return {}
    return {name: block_size for name in ("BLOCK_M", "BLOCK_N", "BLOCK_M1", "BLOCK_N1", "BLOCK_M2", "BLOCK_N2")}


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


def flex_head_dim(head_dim: int) -> int:
    """The head dim the kernel is given: torch >= 2.6 rounds non-power-of-two dims inside the kernel (no copy);
    older versions need them padded to a power of two (the padded dims are computed, so FLOPs count them)."""
    if tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 6):
        return max(16, head_dim)
    return max(16, 1 << (head_dim - 1).bit_length())


def to_flex_block_mask(block_mask: torch.Tensor, block_size: int, kv_len: int, q_padded: int, kv_padded: int):
    """(B, H, nQ, nK) bool over DSV blocks -> a FlexAttention BlockMask with the same blocks; keys from
    `kv_len` on are padding. Queries may be a shard of the keys' sequence (ring context parallelism)."""
    from torch.nn.attention.flex_attention import BlockMask

    full = block_mask.clone()
    if kv_padded != kv_len:
        full[..., -1] = False  # the last key block holds padding: the mask_mod must run there
    partial = block_mask & ~full

    def blocks(m):  # -> counts (B, H, n) int32, selected indices first (stable sort of the 0/1 mask)
        order = torch.argsort(m.to(torch.int8), dim=-1, descending=True, stable=True)
        return m.sum(-1, dtype=torch.int32), order.to(torch.int32)

    # The kernel applies mask_mod only in partial blocks (here: the last, padded key block); FlexAttention's
    # eager reference applies it everywhere, so it states the whole selection.
    def mask_mod(b, h, q_idx, kv_idx):
        return block_mask[b, h, q_idx // block_size, kv_idx // block_size] & (kv_idx < kv_len)

    (num, idx), (full_num, full_idx) = blocks(partial), blocks(full)
    return BlockMask.from_kv_blocks(num, idx, full_num, full_idx, BLOCK_SIZE=block_size, mask_mod=mask_mod,
                                    seq_lengths=(q_padded, kv_padded))


def _flex_call(q, k, v, block_mask, block_size: int, scale: float):
    """q (B, H, Nq, D), k, v (B, H, Nk, D) -> (B, H, Nq, D) through the compiled FlexAttention kernel."""
    nq, nk, head_dim = q.shape[-2], k.shape[-2], q.shape[-1]
    pq, pk = (-(-n // block_size) * block_size for n in (nq, nk))
    dp = flex_head_dim(head_dim)
    # zero head-dim columns change no score; padded value columns and padded tokens are sliced off. Contiguous
    # either way: the compiled kernel guards on strides, one layout means one compile per shape.
    q = F.pad(q, (0, dp - head_dim, 0, pq - nq)) if (dp, pq) != (head_dim, nq) else q.contiguous()
    k, v = (F.pad(t, (0, dp - head_dim, 0, pk - nk)) if (dp, pk) != (head_dim, nk) else t.contiguous()
            for t in (k, v))
    mask = to_flex_block_mask(block_mask, block_size, nk, pq, pk)
    options = kernel_tiles(block_size) if q.device.type == "cuda" else {}
    with _recompile_room():
        out = compiled_flex_attention()(q, k, v, block_mask=mask, scale=scale,
                                        kernel_options=options or None)  # (B, H, pq, dp)
    return out[..., :nq, :head_dim]


@torch._disable_dynamo  # the kernel is compiled on its own; an outer torch.compile calls it as is
def flex_block_sparse_attention(q, k, v, block_mask, block_size: int, scale: float, *, fallback=None,
                                on_fallback=None):
    """FlexAttention forward and backward; if the backward kernel fails to build, `fallback(q, k, v)`'s
    gradients are used and `on_fallback(message)` is told. Without a fallback, the kernel runs as is."""
    if fallback is None:
        return _flex_call(q, k, v, block_mask, block_size, scale)
    return FlexWithFallback.apply(q, k, v, block_mask, block_size, scale, fallback, on_fallback)


class FlexWithFallback(torch.autograd.Function):
    """FlexAttention forward and backward, with the gather path's gradients if its backward fails to build."""

    # the backward kernel compiles at the first backward: a compile error there would otherwise end the run

    @staticmethod
    def forward(ctx, q, k, v, block_mask, block_size, scale, fallback, on_fallback):
        with torch.enable_grad():
            leaves = tuple(t.detach().requires_grad_(t.requires_grad) for t in (q, k, v))
            out = _flex_call(*leaves, block_mask, block_size, scale)
        ctx.leaves, ctx.out, ctx.rest = leaves, out, (fallback, on_fallback)
        return out.detach()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        leaves, out = ctx.leaves, ctx.out
        wanted = [t for t in leaves if t.requires_grad]
        try:
            grads = iter(torch.autograd.grad(out, wanted, grad))
        except Exception as error:  # noqa: BLE001 - any kernel build failure: recompute on the gather path
            if is_out_of_memory(error):
                raise  # a measurement (status oom), not a broken kernel
            fallback, on_fallback = ctx.rest
            if on_fallback is not None:
                on_fallback(f"FlexAttention backward failed ({type(error).__name__}: "
                            f"{str(error).splitlines()[0][:200]}); its gradients came from the gather path")
            with torch.enable_grad():
                again = tuple(t.detach().requires_grad_(t.requires_grad) for t in leaves)
                redo = fallback(*again)
                grads = iter(torch.autograd.grad(redo, [t for t in again if t.requires_grad], grad))
        ctx.leaves = ctx.out = None
        return tuple(next(grads) if t.requires_grad else None for t in leaves) + (None,) * 5
