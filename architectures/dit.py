"""Video DiT (patchify 1x2x2, adaLN-zero blocks, text cross-attention) with pluggable self-attention:
full, 3D window, factorised serial / parallel spatial-temporal, and DSV learned sparse attention."""
from __future__ import annotations

import contextlib
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.profiler import record_function

from .attention import ATTENTION_KINDS, CrossAttention, DSVAttention, TemporalAttention, make_self_attention
from .attention.dsv import KEY_SELECTIONS, QUERY_GROUPS
from .attention.flex import FLEX_BLOCK, flex_supports
from .base import LATENT_SCALE, VideoModel
from .registry import Architecture, register

SPARSE_BACKENDS = ("auto", "flex", "gather")


@dataclass(frozen=True)
class DiTConfig:
    """Size, attention kind and DSV settings of a video DiT (every field settable with --set)."""

    hidden_size: int = 64
    depth: int = 2
    heads: int = 2
    head_dim: int = 32
    mlp_ratio: float = 4.0
    text_dim: int = 64
    in_channels: int = 4
    patch_size: tuple[int, ...] = (1, 2, 2)  # (frames, rows, cols) per token
    attention: str = "full"  # full | window | serial | parallel | dsv
    window_size: tuple[int, ...] = (4, 8, 8)  # tokens per 3D window (frames, rows, cols), shrunk to fit the grid
    # DSV
    estimator_rank: int = 16  # low-rank dims per head
    block_size: int = 64  # tokens per query group and per key block = the sparse kernel's tile (flex too)
    dense_steps: int = 2  # stage 1 (dense, profiling) ends when the estimator loss is low, at the latest here
    switch_loss: float = 0.01  # stage 2 begins once the mean estimator loss falls below this (the paper's 0.01)
    sparsity_threshold: float = 0.5  # heads with profiled sparsity above it go sparse in stage 2
    sparsity: float | None = None  # None: k from profiling; a float forces it for every head (recorded as forced)
    topk_min: int = 1  # at least this many key blocks per query block
    profile_momentum: float = 0.9
    mass_coverage: float = 0.9  # profiled sparsity = 1 - (blocks holding this much attention mass) / blocks
    estimator_samples: int = 64  # sampled queries per layer for the estimator loss and profiling
    estimator_lr: float = 1e-2  # the estimator's own Adam (it is not part of the model's loss)
    estimator_norm_weight: float = 1.0  # loss = (1 - cosine) + weight * (norm ratio - 1)^2
    reprofile_interval: int = 100  # stage 2: re-profile and fine-tune the estimator every this many steps (0: never)
    finetune_lr_scale: float = 0.1  # stage 2 estimator fine-tuning at estimator_lr times this
    query_groups: str = "cube"  # cube: a query/key block is a 3D cube of tokens (frame x row x col) | raster
    key_selection: str = "block"  # block: top-k key blocks | token: top-(k * block_size) key tokens (gather)
    cost_table: str | None = None  # results of `stbench attention`: a layer goes sparse only where it is faster
    sparse_backend: str = "auto"  # auto (FlexAttention on CUDA, gather on CPU) | flex | gather
    sparse_recompute: bool = False  # gather path: re-gather in backward instead of saving gathered K/V blocks

    def __post_init__(self):
        if self.attention not in ATTENTION_KINDS:
            raise ValueError(f"attention: {self.attention!r} is not legal; legal: {', '.join(ATTENTION_KINDS)}")
        if self.sparse_backend not in SPARSE_BACKENDS:
            raise ValueError(f"sparse_backend: {self.sparse_backend!r}; legal: {', '.join(SPARSE_BACKENDS)}")
        for name in ("hidden_size", "depth", "heads", "head_dim", "text_dim", "estimator_rank", "block_size",
                     "topk_min", "estimator_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if len(self.patch_size) != 3 or len(self.window_size) != 3 or min(self.patch_size + self.window_size) < 1:
            raise ValueError("patch_size and window_size: three positive ints (frames, rows, cols)")
        if self.sparsity is not None and not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"sparsity: must be in [0, 1) or None, got {self.sparsity}")
        if not 0.0 <= self.profile_momentum < 1.0 or not 0.0 < self.mass_coverage <= 1.0:
            raise ValueError("profile_momentum must be in [0, 1) and mass_coverage in (0, 1]")
        if self.dense_steps < 0 or self.reprofile_interval < 0:
            raise ValueError("dense_steps and reprofile_interval: must be >= 0")
        if self.switch_loss < 0 or self.estimator_lr <= 0 or self.estimator_norm_weight < 0 \
                or not 0 < self.finetune_lr_scale <= 1:
            raise ValueError("switch_loss and estimator_norm_weight must be >= 0, estimator_lr > 0, "
                             "finetune_lr_scale in (0, 1]")
        if self.query_groups not in QUERY_GROUPS or self.key_selection not in KEY_SELECTIONS:
            raise ValueError(f"query_groups: one of {', '.join(QUERY_GROUPS)}; key_selection: one of "
                             f"{', '.join(KEY_SELECTIONS)}")
        if self.sparse_backend == "flex" and not flex_supports(self.block_size):
            raise ValueError(f"block_size: {self.block_size} cannot be a FlexAttention tile; use a power of two "
                             f"from 16 to {FLEX_BLOCK} or a multiple of {FLEX_BLOCK}, or sparse_backend=gather")
        if self.sparse_backend == "flex" and self.key_selection == "token":
            raise ValueError("key_selection=token runs on the gather path only; use sparse_backend=auto or gather")
        if self.cost_table is not None and not Path(self.cost_table).exists():
            raise ValueError(f"cost_table: {self.cost_table} does not exist (a results.jsonl of stbench attention)")


def modulate(x, shift, scale):  # (B, N, C), (B, 1, C) x2 -> (B, N, C)
    return x * (1 + scale) + shift


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:  # (P,) -> (P, dim)
    freqs = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim // 2))
    angles = positions.double()[:, None] * freqs[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_3d(dim: int, grid) -> torch.Tensor:  # -> (F*h*w, dim), tokens in (frame, row, col) order
    """Fixed 3D sin-cos position embedding: a third of the (even) channels per axis, zeros in the rest."""
    f, h, w = grid
    axis_dim = (dim // 6) * 2
    t, r, c = torch.meshgrid(torch.arange(f), torch.arange(h), torch.arange(w), indexing="ij")
    parts = [sincos_1d(axis_dim, p.reshape(-1)) for p in (t, r, c)]
    emb = torch.cat(parts + [torch.zeros(f * h * w, dim - 3 * axis_dim, dtype=torch.float64)], dim=1)
    return emb.float()


class TimestepEmbedder(nn.Module):
    """Sinusoidal timestep features -> MLP -> hidden size."""

    def __init__(self, dim: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t):  # (B,) -> (B, C)
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = t.float()[:, None] * freqs[None]
        emb = torch.cat([args.cos(), args.sin()], dim=-1).to(self.mlp[0].weight.dtype)  # (B, freq_dim)
        return self.mlp(emb)


class DiTBlock(nn.Module):
    """adaLN-zero block: self-attention, text cross-attention, MLP (serial-st adds a temporal sublayer)."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        C = cfg.hidden_size
        self.norm1 = nn.LayerNorm(C, elementwise_affine=False, eps=1e-6)
        self.attn = make_self_attention(cfg.attention, C, cfg.heads, cfg.head_dim, cfg)
        self.temporal_attn = None
        if cfg.attention == "serial":  # a motion module after the image model's attention, starting at zero
            self.temporal_norm = nn.LayerNorm(C, eps=1e-6)
            self.temporal_attn = TemporalAttention(C, cfg.heads, cfg.head_dim, zero_out=True)
        self.norm2 = nn.LayerNorm(C, eps=1e-6)
        self.cross_attn = CrossAttention(C, cfg.heads, cfg.head_dim)
        self.norm3 = nn.LayerNorm(C, elementwise_affine=False, eps=1e-6)
        hidden = int(C * cfg.mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(C, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, C))
        self.adaLN = nn.Sequential(nn.SiLU(), nn.Linear(C, 6 * C))
        nn.init.zeros_(self.adaLN[1].weight)
        nn.init.zeros_(self.adaLN[1].bias)

    def forward(self, x, c, text, grid, cp=None):  # (B, N, C), (B, C), (B, L, C) -> (B, N, C)
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN(c)[:, None].chunk(6, dim=-1)  # 6 x (B, 1, C)
        with record_function("spatial") if self.temporal_attn is not None else contextlib.nullcontext():
            x = x + gate1 * self.attn(modulate(self.norm1(x), shift1, scale1), grid, cp)  # (B, N, C)
        if self.temporal_attn is not None:
            with record_function("temporal"):
                x = x + self.temporal_attn(self.temporal_norm(x), grid, cp)  # (B, N, C)
        x = x + self.cross_attn(self.norm2(x), text)  # (B, N, C)
        return x + gate2 * self.mlp(modulate(self.norm3(x), shift2, scale2))  # (B, N, C)


class FinalLayer(nn.Module):
    """adaLN modulation and a zero-initialised projection back to patch pixels."""

    def __init__(self, dim: int, patch_volume: int, out_channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.adaLN = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.proj = nn.Linear(dim, patch_volume * out_channels)
        for layer in (self.adaLN[1], self.proj):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x, c):  # (B, N, C), (B, C) -> (B, N, p*Cout)
        shift, scale = self.adaLN(c)[:, None].chunk(2, dim=-1)
        return self.proj(modulate(self.norm(x), shift, scale))


class VideoDiT(VideoModel):
    """Text-to-video DiT on latents (B, 4, F, h, w); self-attention kind chosen by config.attention."""

    def __init__(self, config: DiTConfig):
        super().__init__(config)
        C, (pt, ph, pw) = config.hidden_size, config.patch_size
        self.patch_embed = nn.Linear(config.in_channels * pt * ph * pw, C)
        self.time_embed = TimestepEmbedder(C)
        self.text_embed = nn.Sequential(nn.Linear(config.text_dim, C), nn.GELU(approximate="tanh"), nn.Linear(C, C))
        self.blocks = nn.ModuleList(DiTBlock(config) for _ in range(config.depth))
        self.final = FinalLayer(C, pt * ph * pw, config.in_channels)
        self.context_parallel = None  # set to a context-parallel helper (shard_tokens/gather_tokens/attention)
        self.steps_done = 0  # DSV: training steps taken (loss() calls with grad); the stage follows it
        self.switch_step: int | None = None  # DSV: the step stage 2 began (None: still stage 1)
        self.switch_reason: str | None = None  # 'estimator loss' (below switch_loss) or 'dense_steps' (the cap)
        self.work_log: list[tuple[int, float]] = []  # DSV: (step, fraction of score tiles computed) per training step
        self.measured_from = 0  # DSV: steps before this are warm-up (set by warmup_steps)
        self._last_inputs = None  # DSV: the first sample of the last forward (views); dsv_stats() re-runs it
        self._pos_cache: dict = {}
        self._dsv = [m for m in self.modules() if isinstance(m, DSVAttention)]  # a plain list: not registered

    @property
    def text_dim(self) -> int:
        return self.config.text_dim

    def dsv_layers(self) -> list[DSVAttention]:
        return list(self._dsv)

    # Step bookkeeping runs outside torch.compile: a traced int counter would be guarded on and recompiled
    # every step; the layers' `sparse_active` flag changes once (stage 1 -> 2), so at most one recompile.
    @torch.compiler.disable
    def _begin_forward(self, sample, timesteps, text):
        self._last_inputs = (sample[:1].detach(), timesteps[:1], text[:1].detach())
        if self.switch_step is None and self.steps_done >= self.config.dense_steps:
            self.switch_step, self.switch_reason = self.steps_done, "dense_steps"
        stage2, every = self.switch_step is not None, self.config.reprofile_interval
        since = self.steps_done - (self.switch_step or 0)
        for layer in self._dsv:
            layer.sparse_active = stage2
            layer.profile_now = not stage2 or (every > 0 and since > 0 and since % every == 0)

    @torch.compiler.disable
    def _after_loss(self):
        """Step the estimators on their own losses, log the step's computed work, decide the stage switch."""
        stage2 = self.switch_step is not None
        losses = [layer.estimator_loss.detach() for layer in self._dsv if layer.estimator_loss is not None]
        pending = [layer for layer in self._dsv if layer.estimator_gradients()]
        if pending and self.context_parallel is not None:  # each rank holds world x its share (collective)
            self.context_parallel.sync_gradients([p for m in pending for p in (m.q_estimator, m.k_estimator)])
        for layer in pending:
            layer.apply_estimator_step(self.config.finetune_lr_scale if stage2 else 1.0)
        done, total = (sum(x) for x in zip(*(layer.last_work for layer in self._dsv)))
        self.work_log.append((self.steps_done, done / total if total else 1.0))
        self.steps_done += 1
        # stage 1 only (dense, so a host read of the loss costs no sparse step anything)
        if not stage2 and losses and float(torch.stack(losses).float().mean()) < self.config.switch_loss:
            self.switch_step, self.switch_reason = self.steps_done, "estimator loss"

    def warmup_steps(self, requested: int) -> int:
        """`requested`, extended past the latest stage switch (dense_steps) and the first sparse step, which
        builds (on CUDA, compiles) the sparse kernels: every measured step then runs stage 2."""
        steps = max(requested, self.config.dense_steps + 2) if self._dsv else requested
        self.measured_from = self.steps_done + steps
        return steps

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The model optimizer's parameters: DSV's estimators train on their own optimizer instead."""
        return [p for n, p in self.named_parameters() if p.requires_grad and self.group_of(n) != "estimator"]

    def group_of(self, parameter_name: str) -> str:
        if parameter_name.endswith(("q_estimator", "k_estimator")):
            return "estimator"
        if ".temporal" in parameter_name:  # temporal_attn / temporal_norm (serial), attn.temporal (parallel)
            return "temporal"
        # full / window / dsv have no separate temporal layers; their self-attention mixes frames, so its
        # projections are what a video fine-tune adapts ('temporal'); everything else is the image DiT's.
        if self.config.attention in ("full", "window", "dsv") and re.match(r"blocks\.\d+\.attn\.(qkv|out)\.",
                                                                           parameter_name):
            return "temporal"
        return "spatial"

    def position_embedding(self, grid, device, dtype):  # -> (N, C), cached per grid
        key = (tuple(grid), str(device), dtype)
        if key not in self._pos_cache:
            self._pos_cache[key] = sincos_3d(self.config.hidden_size, grid).to(device=device, dtype=dtype)
        return self._pos_cache[key]

    def patchify(self, sample):  # (B, Cin, F, h, w) -> (B, N, Cin*pt*ph*pw), grid
        B, Cin, Fr, h, w = sample.shape
        pt, ph, pw = self.config.patch_size
        grid = (Fr // pt, h // ph, w // pw)
        x = sample.view(B, Cin, grid[0], pt, grid[1], ph, grid[2], pw).permute(0, 2, 4, 6, 1, 3, 5, 7)
        return x.reshape(B, grid[0] * grid[1] * grid[2], Cin * pt * ph * pw), grid

    def unpatchify(self, x, grid):  # (B, N, Cout*pt*ph*pw) -> (B, Cout, F, h, w)
        B = x.shape[0]
        (pt, ph, pw), Cout = self.config.patch_size, self.config.in_channels
        x = x.view(B, *grid, Cout, pt, ph, pw).permute(0, 4, 1, 5, 2, 6, 3, 7)
        return x.reshape(B, Cout, grid[0] * pt, grid[1] * ph, grid[2] * pw)

    def forward(self, sample, timesteps, text):  # (B,4,F,h,w), (B,), (B,L,Dt) -> (B,4,F,h,w)
        if self._dsv:
            self._begin_forward(sample, timesteps, text)
        tokens, grid = self.patchify(sample)
        x = self.patch_embed(tokens) + self.position_embedding(grid, sample.device, sample.dtype)  # (B, N, C)
        c = self.time_embed(timesteps)  # (B, C)
        text = self.text_embed(text)  # (B, L, C)
        cp = self.context_parallel
        if cp is not None:
            x = cp.shard_tokens(x)  # (B, N/world, C)
        for block in self.blocks:
            x = block(x, c, text, grid, cp)  # (B, N, C)
        if cp is not None:
            x = cp.gather_tokens(x)  # (B, N, C)
        return self.unpatchify(self.final(x, c), grid)  # (B, 4, F, h, w)

    def loss(self, batch):
        """Noise-prediction MSE; DSV's estimators are stepped here on their own loss, which is not added."""
        loss = super().loss(batch)
        if self._dsv and self.training and torch.is_grad_enabled():
            self._after_loss()
        return loss

    @torch.no_grad()
    def dsv_stats(self) -> dict | None:
        """Sparsity, estimator recall and output error, measured now on the first sample of the last forward.

        Re-runs that sample without grad (same stage and head decisions, no profiling), so training steps
        keep nothing extra alive. Under context parallelism every rank must call it (the forward is collective).
        """
        layers = self.dsv_layers()
        if not layers or self._last_inputs is None:
            return None
        for layer in layers:
            layer.capture_stats = True
        try:
            self(*self._last_inputs)
            per_layer = [m.stats() for m in layers]
        finally:
            for layer in layers:
                layer.capture_stats, layer._last = False, None
        if any(s is None for s in per_layer):
            return None
        heads = sum(s["heads"] for s in per_layer)
        measured = [f for step, f in self.work_log if step >= self.measured_from]
        losses = [float(m.last_estimator_loss) for m in layers if m.last_estimator_loss is not None]
        ran = {m.backend_ran for m in layers if m.backend_ran is not None}
        return {"layer_sparsity": [s["sparsity"] for s in per_layer],
                "head_sparsity": [s["head_sparsity"] for s in per_layer],
                "profiled_sparsity": [s["profiled_sparsity"] for s in per_layer],
                "estimator_recall": sum(s["recall"] for s in per_layer) / len(per_layer),
                "head_recall": [s["head_recall"] for s in per_layer],
                "sparse_head_fraction": sum(s["sparse_heads"] for s in per_layer) / heads,
                "rel_error": sum(s["rel_error"] for s in per_layer) / len(per_layer),
                "steps_done": self.steps_done,
                "forced": self.config.sparsity is not None,
                "backend": "/".join(sorted(ran)) if ran else None,
                "computed_fraction": sum(measured) / len(measured) if measured else None,
                "switch_step": self.switch_step, "switch_reason": self.switch_reason,
                "estimator_loss": sum(losses) / len(losses) if losses else None,
                "query_groups": self.config.query_groups, "key_selection": self.config.key_selection,
                "vetoed_layers": [i for i, m in enumerate(layers) if m.vetoed]}

    def extra_stats(self) -> dict:
        """Record fields after the measured steps: {'dsv': ..., 'warnings': [...]} for a DSV model."""
        if not self._dsv:
            return {}
        notes = list(dict.fromkeys(w for layer in self._dsv for w in layer.warnings))
        if self.config.sparsity is not None:
            notes.append(f"dsv: sparsity forced to {self.config.sparsity} in every head (--set sparsity), "
                         f"not learned")
        return {"dsv": self.dsv_stats(), "warnings": notes}


def check_shape(config: DiTConfig, frames: int, height: int, width: int) -> None:
    pt, ph, pw = config.patch_size
    if frames % pt:
        raise ValueError(f"frames must be a multiple of {pt} (temporal patch), got {frames}")
    for name, size, p in (("height", height, ph), ("width", width, pw)):
        if size % (LATENT_SCALE * p):
            raise ValueError(f"{name} must be a multiple of {LATENT_SCALE * p} (latent /{LATENT_SCALE}, "
                             f"patch {p}), got {size}")


PRESETS = {  # sizes; the attention kind is filled in per architecture
    "tiny": dict(hidden_size=64, depth=2, heads=2, head_dim=32, text_dim=64),
    "small": dict(hidden_size=384, depth=12, heads=6, head_dim=64, text_dim=768),
    # DSV's 0.8B and 2.7B; GPU-sized, so 128-token DSV blocks: FlexAttention's native block size
    "0.8b": dict(hidden_size=1152, depth=28, heads=12, head_dim=96, text_dim=4096, block_size=128),
    "2.7b": dict(hidden_size=2048, depth=32, heads=16, head_dim=128, text_dim=4096, block_size=128),
}

ARCHS = {
    "dit-full": ("full", "video DiT, full 3D self-attention (SDPA)"),
    "dit-window": ("window", "video DiT, 3D local window attention (DSV's baseline)"),
    "dit-serial-st": ("serial", "video DiT, spatial then temporal attention (image DiT + motion modules)"),
    "dit-parallel-st": ("parallel", "video DiT, spatial and temporal attention side by side (Mobius in a DiT)"),
    "dit-dsv": ("dsv", "video DiT, DSV learned block-sparse attention (estimator + profiled sparsity)"),
}


def _preset(kind: str, sizes: dict):
    return lambda: DiTConfig(attention=kind, **sizes)


for _name, (_kind, _description) in ARCHS.items():
    register(Architecture(name=_name, family="dit", config_cls=DiTConfig,
                          presets={p: _preset(_kind, s) for p, s in PRESETS.items()}, build=VideoDiT,
                          description=_description, check_shape=check_shape))
