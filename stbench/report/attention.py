"""The report's attention section: records of `python -m stbench attention` (sparse backends vs SDPA)."""
from __future__ import annotations

from collections import defaultdict

import matplotlib.pyplot as plt

from ..results import ATTENTION_PRESET
from .figures import Figure, _styled, arch_colors, log_scale, to_data_uri

PRESET = ATTENTION_PRESET  # the preset of every `stbench attention` record


def split(records: list[dict]) -> tuple[list[dict], list[dict]]:
    """(training-step records, attention-benchmark records): the two kinds a run folder may hold."""
    steps = [r for r in records if r.get("preset") != PRESET]
    return steps, [r for r in records if r.get("preset") == PRESET]


def _label(record: dict) -> str:
    env = record.get("env") or {}
    device = env.get("gpu") or f"{env.get('cpu') or 'CPU'}, {env.get('cpu_threads')} thread(s)"
    return f"{record['device']} ({device}), {record['dtype']}"


@_styled
def speedup_figure(rows: list[dict]) -> Figure | None:
    """Speed-up over SDPA against sparsity, one panel per token count, the ideal 1/(1-s) dashed."""
    rows = [r for r in rows if r["speedup"] is not None]
    if not rows:
        return None
    tokens = sorted({r["tokens"] for r in rows})
    colors = arch_colors(r["backend"] for r in rows)
    fig, axes = plt.subplots(1, len(tokens), figsize=(3.8 * len(tokens) + 0.6, 3.2), squeeze=False)
    for ax, n in zip(axes[0], tokens):
        here = [r for r in rows if r["tokens"] == n]
        xs = sorted({r["sparsity"] for r in here})
        ax.plot(xs, [1 / (1 - s) for s in xs], "--", color="#999999", label="ideal 1/(1-s)")
        for backend in sorted({r["backend"] for r in here}):
            points = sorted((r["sparsity"], r["speedup"]) for r in here if r["backend"] == backend)
            ax.plot(*zip(*points), "o-", color=colors[backend], label=backend)
        ax.axhline(1.0, color="#444444", linewidth=0.8)
        log_scale(ax)
        ax.set_title(f"{n} tokens")
        ax.set_xlabel("block sparsity s")
    axes[0][0].set_ylabel("speed-up over SDPA (fwd+bwd)")
    axes[0][0].legend(frameon=False)
    fig.tight_layout()
    return Figure("Sparse attention vs SDPA", "Forward+backward speed-up of each block-sparse backend over SDPA at "
                  "the same tokens, medians of interleaved rounds; dashed: the ideal 1/(1-s). Below 1: slower "
                  "than dense.", to_data_uri(fig), "line charts of speed-up against sparsity")


def section(records: list[dict]) -> dict | None:
    """Table rows and a figure per device/dtype of the attention records; None without any."""
    if not records:
        return None
    groups = defaultdict(list)
    for r in records:
        a = r.get("attention") or {}
        groups[_label(r)].append({
            "backend": a.get("backend", r["arch"].removeprefix("attention-")), "tokens": int(r["overrides"]["tokens"]),
            "sparsity": a.get("sparsity"), "status": r["status"], "ms": r.get("step_ms_median"),
            "sdpa_ms": a.get("sdpa_ms_median"), "speedup": a.get("speedup"), "ideal": a.get("ideal_speedup"),
            "efficiency": a.get("efficiency"), "computed_fraction": a.get("computed_fraction"),
            "shape": f"{r['batch']}x{r['overrides']['heads']}x{r['overrides']['head_dim']}, "
                     f"block {r['overrides']['block_size']}"})
    return {"groups": [{"label": label, "rows": sorted(rows, key=lambda x: (x["tokens"], x["backend"],
                                                                              x["sparsity"] or 0)),
                        "figure": speedup_figure([x for x in rows if x["sparsity"] is not None])}
                       for label, rows in groups.items()]}
