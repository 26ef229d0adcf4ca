"""DSV at the model level, shared by every model with DSV layers (the home-made DiT, diffusers' transformers).

* `DSVSettings`: the DSV fields of a model config (a config dataclass inherits them), validated in one place.
* `make_dsv_attention`: a DSV layer built from those settings.
* `DSVStages`: the two training stages over a model's DSV layers: stage 1 dense with profiling while the
  estimators learn on their own loss and optimizer; stage 2 once the estimator loss is low (or at the
  `dense_steps` cap), with low-frequency re-profiling; the record's `dsv` block and warnings.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .dsv import KEY_SELECTIONS, QUERY_GROUPS, CostTable, DSVAttention
from .flex import FLEX_BLOCK, flex_supports

SPARSE_BACKENDS = ("auto", "flex", "gather")


@dataclass(frozen=True)
class DSVSettings:
    """DSV's settings (arXiv 2502.07590), as fields of a model config (every one settable with --set)."""

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

    def check_dsv(self) -> None:
        """ValueError naming the field when a DSV setting is not legal (call from the config's __post_init__)."""
        if self.sparse_backend not in SPARSE_BACKENDS:
            raise ValueError(f"sparse_backend: {self.sparse_backend!r}; legal: {', '.join(SPARSE_BACKENDS)}")
        for name in ("estimator_rank", "block_size", "topk_min", "estimator_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
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


def make_dsv_attention(dim: int, heads: int, head_dim: int, cfg: DSVSettings) -> DSVAttention:
    """A DSV self-attention layer with the settings of `cfg`."""
    return DSVAttention(
        dim, heads, head_dim, rank=cfg.estimator_rank, block_size=cfg.block_size,
        sparsity_threshold=cfg.sparsity_threshold, sparsity=cfg.sparsity, topk_min=cfg.topk_min,
        profile_momentum=cfg.profile_momentum, mass_coverage=cfg.mass_coverage,
        estimator_samples=cfg.estimator_samples, backend=cfg.sparse_backend, recompute=cfg.sparse_recompute,
        query_groups=cfg.query_groups, key_selection=cfg.key_selection, estimator_lr=cfg.estimator_lr,
        norm_weight=cfg.estimator_norm_weight,
        cost_table=_cost_table(cfg.cost_table) if cfg.cost_table else None)


def _cost_table(path: str) -> CostTable:
    """The table of a results.jsonl (or the folder holding one), read once per model, not once per layer."""
    file = Path(path)
    file = (file / "results.jsonl" if file.is_dir() else file).resolve()
    stat = file.stat()
    return _read_cost_table(str(file), stat.st_mtime_ns, stat.st_size)  # a rewritten file is read again


@functools.lru_cache(maxsize=8)
def _read_cost_table(file: str, mtime_ns: int, size: int) -> CostTable:  # read-only: shared by the layers
    return CostTable.from_file(file)


class DSVStages:
    """Mixin for a VideoModel with DSV layers: stage switching, the estimators' own steps, the `dsv` record."""

    # The model calls `init_dsv()` at the end of __init__ and `_begin_forward(...)` first in forward (when it has
    # DSV layers); `loss` steps the estimators after the model's loss. `self.config` holds DSVSettings fields.

    @staticmethod
    def is_estimator(parameter_name: str) -> bool:  # DSV's low-rank projections: a group of their own
        return parameter_name.endswith(("q_estimator", "k_estimator"))

    def init_dsv(self) -> None:
        self._dsv = [m for m in self.modules() if isinstance(m, DSVAttention)]  # a plain list: not registered
        self.steps_done = 0  # training steps taken (loss() calls with grad); the stage follows it
        self.switch_step: int | None = None  # the step stage 2 began (None: still stage 1)
        self.switch_reason: str | None = None  # 'estimator loss' (below switch_loss) or 'dense_steps' (the cap)
        self.work_log: list[tuple[int, float]] = []  # (step, fraction of score tiles computed) per training step
        self.measured_from = 0  # steps before this are warm-up (set by warmup_steps)
        self._last_inputs = None  # the first sample of the last forward (views); dsv_stats() re-runs it

    def dsv_layers(self) -> list[DSVAttention]:
        return list(self._dsv)

    # Step bookkeeping runs outside torch.compile: a traced int counter would be guarded on and recompiled
    # every step; the layers' `sparse_active` flag changes once (stage 1 -> 2), so at most one recompile.
    @torch._disable_dynamo
    def _begin_forward(self, sample, timesteps, text):
        self._last_inputs = (sample[:1].detach(), timesteps[:1], text[:1].detach())
        if self.switch_step is None and self.steps_done >= self.config.dense_steps:
            self.switch_step, self.switch_reason = self.steps_done, "dense_steps"
        stage2, every = self.switch_step is not None, self.config.reprofile_interval
        since = self.steps_done - (self.switch_step or 0)
        for layer in self._dsv:
            layer.sparse_active = stage2
            layer.profile_now = not stage2 or (every > 0 and since > 0 and since % every == 0)

    @torch._disable_dynamo
    def _after_loss(self):
        """Step the estimators on their own losses, log the step's computed work, decide the stage switch."""
        stage2 = self.switch_step is not None
        losses = [layer.estimator_loss.detach() for layer in self._dsv if layer.estimator_loss is not None]
        pending = [layer for layer in self._dsv if layer.estimator_gradients()]
        cp = getattr(self, "context_parallel", None)
        if pending and cp is not None:  # each rank holds world x its share (collective)
            cp.sync_gradients([p for m in pending for p in (m.q_estimator, m.k_estimator)])
        for layer in pending:
            layer.apply_estimator_step(self.config.finetune_lr_scale if stage2 else 1.0)
        done, total = (sum(x) for x in zip(*(layer.last_work for layer in self._dsv)))
        self.work_log.append((self.steps_done, done / total if total else 1.0))
        self.steps_done += 1
        # stage 1 only (dense, so a host read of the loss costs no sparse step anything)
        if not stage2 and losses and float(torch.stack(losses).float().mean()) < self.config.switch_loss:
            self.switch_step, self.switch_reason = self.steps_done, "estimator loss"

    def loss(self, batch):
        """The model's loss; DSV's estimators are stepped here on their own loss, which is not added."""
        loss = super().loss(batch)
        if self._dsv and self.training and torch.is_grad_enabled():
            self._after_loss()
        return loss

    def warmup_steps(self, requested: int) -> int:
        """`requested`, extended past the latest stage switch (dense_steps) and the first sparse step, which
        builds (on CUDA, compiles) the sparse kernels: every measured step then runs stage 2."""
        steps = max(requested, self.config.dense_steps + 2) if self._dsv else requested
        self.measured_from = self.steps_done + steps
        return steps

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The model optimizer's parameters: DSV's estimators train on their own optimizer instead."""
        return [p for n, p in self.named_parameters() if p.requires_grad and self.group_of(n) != "estimator"]

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
