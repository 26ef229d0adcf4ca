"""Window or DSV attention inside diffusers' video transformers, through their attention-processor mechanism.

`install_attention` wraps the processor of each video self-attention module (`attn.set_processor`); the model's
own processor still computes projections, q/k norms, rotary embeddings and the output projection, exactly as
published. Only its softmax-attention call (scaled_dot_product_attention, which every diffusers path ends in)
is routed to stbench's window or DSV core for the duration of that processor call. `full` installs nothing.

Joint text-video attention (CogVideoX: text first, HunyuanVideo: text last): `window` keeps every text key
visible to every video window and lets text queries attend to everything; `dsv` runs on the joint sequence
(its estimator picks key blocks by content, text blocks included). A padding mask on the text is not applied
on these paths; stbench's synthetic text has no padding.

Context parallelism: with `processor.cp` set (the model sets it each forward, as it sets `grid`), q, k and v
hold this rank's video tokens and the attention call goes to `cp.attention(q, k, v, core)` (the `cp` protocol
of the home-made DiT), which lets self-attention see the whole sequence; `core` is the DSV module, or the
processor itself (`core()`: full or window attention). Under context parallelism `full` is wrapped too
(`wrap_processors`), so that its attention call can be routed; only video-only self-attention (text 'none').
"""
from __future__ import annotations

import contextlib
import math

import torch
from torch import nn
import torch.nn.functional as F

from .dsv import DSVAttention
from .dsv_stages import make_dsv_attention
from .full import dense_attention
from .window import window_attention

ATTENTION_CHOICES = ("full", "window", "dsv")
TEXT_POSITIONS = ("none", "first", "last")


@contextlib.contextmanager
def routed_sdpa(route):
    """While open, F.scaled_dot_product_attention calls `route(q, k, v, attn_mask, scale)` (q: (B, H, N, D))."""
    original = F.scaled_dot_product_attention

    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if dropout_p or is_causal or enable_gqa:
            raise ValueError("stbench's attention swap supports non-causal attention without dropout or GQA")
        F.scaled_dot_product_attention = original  # the core's own SDPA calls go to the real kernel
        try:
            return route(query, key, value, attn_mask, scale)
        finally:
            F.scaled_dot_product_attention = sdpa

    F.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def make_dsv_core(heads: int, head_dim: int, cfg) -> DSVAttention:
    """A DSV attention core (estimator, profile, block-sparse kernel) for a layer whose projections diffusers owns."""
    core = make_dsv_attention(1, heads, head_dim, cfg)
    del core.qkv, core.out  # the diffusers module keeps its own projections; only the core is used
    return core


def window_with_text(q, k, v, grid, window, text: str, n_text: int):  # (B, H, N, D) x3 -> (B, H, N, D)
    """3D window attention over the video tokens; text keys are visible to every window, text queries see all."""
    N = q.shape[2]
    video = slice(n_text, N) if text == "first" else slice(0, N - n_text)
    texts = slice(0, n_text) if text == "first" else slice(N - n_text, N)
    shared = (k[:, :, texts], v[:, :, texts]) if n_text else None
    out = window_attention(q[:, :, video], k[:, :, video], v[:, :, video], grid, window, shared)  # (B, H, Nv, D)
    if not n_text:
        return out
    out_text = dense_attention(q[:, :, texts], k, v)  # (B, H, L, D)
    return torch.cat([out_text, out] if text == "first" else [out, out_text], 2)


class SwappedAttnProcessor(nn.Module):
    """A diffusers attention processor whose softmax attention runs through stbench's window or DSV core."""

    # An nn.Module so that DSV's estimator is a parameter of the attention module it serves (diffusers registers
    # a Module processor as a submodule). `__call__` is overridden, not `forward`: diffusers reads the processor's
    # call signature to decide which keyword arguments (e.g. image_rotary_emb) to pass on.

    def __init__(self, inner, kind: str, heads: int, head_dim: int, cfg, text: str = "none"):
        super().__init__()
        if kind not in ATTENTION_CHOICES:
            raise ValueError(f"attention: a processor for {kind!r}; legal: {', '.join(ATTENTION_CHOICES)}")
        if text not in TEXT_POSITIONS:
            raise ValueError(f"text: {text!r}; legal: {', '.join(TEXT_POSITIONS)}")
        self.inner, self.kind, self.text, self.head_dim = inner, kind, text, head_dim
        self.window = tuple(cfg.window_size)
        self.dsv = make_dsv_core(heads, head_dim, cfg) if kind == "dsv" else None
        self.grid: tuple[int, int, int] | None = None  # video tokens (F, h, w) per sequence; the model sets it
        self.cp = None  # a context-parallel helper (the `cp` protocol) or None; the model sets it
        self.calls = 0

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None,
                 **kwargs):
        self.calls = 0
        with routed_sdpa(self.attend):
            out = self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb, **kwargs)
        if self.calls != 1:  # a diffusers version whose processor attends differently: never measure silently
            raise RuntimeError(f"{type(self.inner).__name__} made {self.calls} attention calls; the swap expects one")
        return out

    def attend(self, q, k, v, attn_mask, scale):  # (B, H, N, D) x3 -> (B, H, N, D)
        self.calls += 1
        if self.grid is None:
            raise RuntimeError("SwappedAttnProcessor.grid is unset: the model must set it before the forward")
        if scale is not None and not math.isclose(scale, q.shape[-1] ** -0.5):
            raise ValueError(f"attention scale {scale} is not 1/sqrt(head_dim); the swap does not support it")
        if attn_mask is not None and self.text == "none":
            raise ValueError("the attention swap does not support masked video self-attention")
        if self.cp is not None:
            if self.text != "none":
                raise ValueError("context parallelism supports video-only self-attention, not joint text-video")
            if q.shape[2] * self.cp.world != math.prod(self.grid):
                raise RuntimeError(f"{q.shape[2]} tokens x {self.cp.world} ranks do not match the video grid "
                                   f"{self.grid}")
            if self.dsv is not None:
                self.dsv.grid = self.grid
            return self.cp.attention(q, k, v, self.dsv if self.dsv is not None else self)  # (B, H, n, D)
        n_text = q.shape[2] - math.prod(self.grid) if self.text != "none" else 0
        if n_text < 0 or (self.text == "none" and q.shape[2] != math.prod(self.grid)):
            raise RuntimeError(f"{q.shape[2]} tokens do not match the video grid {self.grid}")
        if self.kind == "dsv":
            self.dsv.grid = self.grid if not n_text else None  # 3D cube query groups need a video-only sequence
            return self.dsv.core(q, k, v)
        return self.core(q, k, v, n_text=n_text)

    def core(self, q, k, v, head_offset: int = 0, n_text: int = 0):  # (B, H, N, D) x3 -> (B, H, N, D)
        """Full or window attention on whole sequences (heads in any subset: Ulysses calls it per head run)."""
        if self.kind == "window":
            return window_with_text(q, k, v, self.grid, self.window, self.text, n_text)
        return dense_attention(q, k, v)


def install_attention(modules, kind: str, cfg, text: str = "none") -> list[SwappedAttnProcessor]:
    """Wrap the processor of each diffusers attention module in `modules`; `full` keeps diffusers' own."""
    if kind not in ATTENTION_CHOICES:
        raise ValueError(f"attention: {kind!r} is not legal; legal: {', '.join(ATTENTION_CHOICES)}")
    if kind == "full":
        return []
    return wrap_processors(modules, kind, cfg, text)


def wrap_processors(modules, kind: str, cfg, text: str = "none") -> list[SwappedAttnProcessor]:
    """Wrap the processor of each module in a SwappedAttnProcessor of `kind` (`full` too: context parallelism)."""
    wrapped = []
    for attn in modules:
        head_dim = attn.to_q.out_features // attn.heads
        processor = SwappedAttnProcessor(attn.processor, kind, attn.heads, head_dim, cfg, text)
        if hasattr(attn, "set_processor"):
            attn.set_processor(processor)
        else:  # MochiAttention: a plain module; assigning a Module registers it (DSV's estimator as a parameter)
            attn.processor = processor
        wrapped.append(processor)
    return wrapped
