"""The report's answer, per model family: which architecture to train at the run's shapes, and what it costs.

Cheapest means the lowest step time among the architectures of equal quality: equal final loss from `train`
results (within QUALITY_TOLERANCE) when the run holds them, else every architecture is assumed equal and the
report says so. Step times are judged with stbench.stats, as the gate judges them: a difference it cannot tell
from noise is reported as a tie. Costs are the measured step time and memory on the run's device, plus each
`predict` record's predicted figures per hardware, with GPU-hours per 1,000 steps (labelled predicted).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .. import stats
from ..measure import load
from .verdict import config_label, family_of, forced_sparsity, match_key

QUALITY_TOLERANCE = 0.05  # final losses within 5% of the best count as equal quality
OVERHEAD_EXPONENT = 0.25  # time grows slower than FLOPs**0.25 across the grid: overhead dominates
OVERHEAD_LABEL = "overhead bound: architecture differences are not visible at this size"
STEPS = 1000


def final_loss(record: dict) -> float | None:
    """The last evaluation loss of a `train` block (else the last training loss)."""
    train = record.get("train")
    if not isinstance(train, dict):
        return None
    evals = [e for e in train.get("eval") or [] if isinstance(e, (list, tuple)) and len(e) == 2]
    if evals:
        return float(evals[-1][1])
    losses = train.get("losses") or []
    return float(losses[-1]) if losses else None


def overhead_bound(records: list[dict]) -> dict[str, float]:
    """Architectures whose step time hardly grows with FLOPs across the grid: arch -> fitted exponent."""
    bound = {}
    for arch in sorted({r["arch"] for r in records}):
        mine = [r for r in records if r["arch"] == arch and r["status"] == "ok"]
        exponent = stats.scaling_exponent([r.get("flops_per_step") or 0 for r in mine],
                                          [r.get("step_ms_median") or 0 for r in mine])
        if exponent is not None and exponent < OVERHEAD_EXPONENT:
            bound[arch] = exponent
    return bound


def hours_per_steps(step_ms: float | None, devices: int = 1) -> float | None:
    return None if step_ms is None else step_ms * STEPS * devices / 3.6e6


@dataclass
class Option:
    """One architecture at the recommendation's shapes."""

    record: dict
    loss: float | None = None
    same_quality: bool = True
    versus_best: stats.TimeComparison | None = None  # this one's time against the cheapest
    forced: bool = False
    loaded: bool = False
    overhead_exponent: float | None = None
    predicted: list[dict] = field(default_factory=list)

    @property
    def arch(self) -> str:
        return self.record["arch"]

    @property
    def device_hours(self) -> float | None:
        return hours_per_steps(self.record.get("step_ms_median"), self.record.get("world_size") or 1)


@dataclass
class Recommendation:
    """A family's answer: the options at one configuration, best first, and the sentences that say it."""

    family: str
    shapes: str
    device: str
    options: list[Option]
    text: list[str]


def _predicted(records: list[dict], record: dict) -> list[dict]:
    rows = []
    for r in records:
        p = r.get("predicted")
        if r["arch"] != record["arch"] or not isinstance(p, dict) or match_key(r)[1:5] != match_key(record)[1:5]:
            continue
        rows.append({"hardware": p.get("hardware"), "peak_bytes": p.get("peak_bytes"), "fits": p.get("fits"),
                     "step_ms": p.get("step_ms"), "gpu_hours": hours_per_steps(p.get("step_ms"))})
    return rows


def _pick_configuration(records: list[dict]) -> list[dict] | None:
    """The largest configuration at which at least two architectures measured a step time."""
    by_config: dict[tuple, dict[str, dict]] = {}
    for r in records:
        if r["status"] == "ok" and r.get("step_ms_median") and not isinstance(r.get("predicted"), dict):
            by_config.setdefault(match_key(r), {})[r["arch"]] = r
    usable = [rs for rs in by_config.values() if len(rs) >= 2]
    if not usable:
        return None
    best = max(usable, key=lambda rs: (len(rs), max(r["batch"] * r["frames"] * r["resolution"] ** 2
                                                    for r in rs.values())))
    return list(best.values())


def recommend(records: list[dict]) -> list[Recommendation]:
    """One Recommendation per family that measured at least two architectures on one configuration."""
    out = []
    for family in sorted({family_of(r["arch"]) for r in records}):
        mine = [r for r in records if family_of(r["arch"]) == family]
        chosen = _pick_configuration(mine)
        if chosen is None:
            continue
        bound = overhead_bound([r for r in mine if match_key(r)[0] == match_key(chosen[0])[0]])
        options = [Option(r, final_loss(r), forced=forced_sparsity(r), loaded=load.was_loaded(r),
                          overhead_exponent=bound.get(r["arch"]), predicted=_predicted(records, r)) for r in chosen]
        losses = [o.loss for o in options if o.loss is not None]
        if losses:
            for o in options:
                o.same_quality = o.loss is not None and o.loss <= min(losses) * (1 + QUALITY_TOLERANCE)
        options.sort(key=lambda o: (not o.same_quality, o.record["step_ms_median"]))
        best = options[0]
        for o in options[1:]:
            o.versus_best = stats.compare_times(o.record, best.record, same_run=True)
        out.append(Recommendation(family, config_label(best.record), best.record["device"], options,
                                  _sentences(family, options, bool(losses), bound)))
    return out


def _sentences(family: str, options: list[Option], trained: bool, bound: dict[str, float]) -> list[str]:
    best = options[0]
    quality = ("at equal quality (final loss from `stbench train` within 5% of the best)" if trained else
               "assuming equal quality (this run holds no `stbench train` results)")
    ties = [o.arch for o in options[1:] if o.same_quality and o.versus_best and o.versus_best.verdict != stats.SLOWER]
    device = "CPU (measured on CPU, not a GPU figure)" if best.record["device"] == "cpu" else best.record["device"]
    text = [f"{family.upper()}: train {best.arch}: the cheapest {quality}, "
            f"{best.record['step_ms_median']:.1f} ms per step on {device}."]
    if ties:
        text.append("Cannot be told apart from it in step time at this run's noise (stbench.stats, as the gate "
                    "judges): " + ", ".join(f"{o.arch} (median ratio {o.versus_best.ratio:.2f}x, "
                                            f"{o.versus_best.verdict})" for o in options[1:] if o.arch in ties)
                    + "; treat them as equally cheap, or measure with more --rounds.")
    slower = [o for o in options[1:] if o.versus_best and o.versus_best.verdict == stats.SLOWER]
    if slower:
        text.append("Measurably slower: " + ", ".join(f"{o.arch} {o.versus_best.ratio:.2f}x" for o in slower) + ".")
    if bound:
        text.append(f"{', '.join(sorted(bound))}: {OVERHEAD_LABEL} (step time grows as FLOPs^"
                    f"{min(bound.values()):.2f} across the grid); use larger shapes for a decision.")
    if any(o.forced for o in options):
        text.append("DSV sparsity was forced (--set sparsity): its figures are not what training would learn.")
    if any(o.loaded for o in options):
        text.append("Some of these cases were measured while other processes competed for the machine (load): "
                    "rerun on a quiet machine or with --rounds before relying on the order.")
    return text
