"""The report's answer, per model family: which architecture to train at the run's shapes, and what it costs.

Never recommended: an architecture whose training results miss the target held-out loss (training.outcomes: 90%
of the reference's improvement), from `stbench train` records in the run or, where the run holds none for its
family, from the project's committed training runs under reports/train/ (which the report then quotes). Cheapest
means the lowest cost to that target where the run trained (steps to the target x the measured step time), else
the lowest step time among the architectures not shown failing, equal quality assumed and said so. Step times
are judged with stbench.stats, as the gate judges them: a difference it cannot tell
from noise is reported as a tie. Costs are the measured step time and memory on the run's device, plus each
`predict` record's predicted figures per hardware, with GPU-hours per 1,000 steps (labelled predicted).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .. import results, stats
from ..errors import UserError
from ..measure import load
from ..predict.efficiency import is_host_bound
from ..runfolder import RESULTS_FILE
from . import training
from .verdict import config_label, family_of, forced_sparsity, match_key

TRAIN_REPORTS = Path(__file__).resolve().parents[2] / "reports" / "train"  # the project's committed training

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
    reached: training.TimeToTarget | None = None  # this architecture's training result (None: not trained)
    missed: bool = False  # its training results missed the target: never recommended
    trained_here: bool = False  # the training results are this run's (else the committed ones)

    @property
    def arch(self) -> str:
        return self.record["arch"]

    @property
    def label(self) -> str:
        return training.label(self.record)

    @property
    def steps_to_target(self) -> float | None:
        return None if self.reached is None else self.reached.steps

    @property
    def cost_to_target_s(self) -> float | None:
        """Steps to the target (this run's training) x the measured step time at the recommendation's shapes."""
        steps, ms = self.steps_to_target, self.record.get("step_ms_median")
        return None if steps is None or not ms or not self.trained_here else steps * ms / 1e3

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
    quality_source: str = ""  # "this run", or the committed runs quoted


def _predicted(records: list[dict], record: dict) -> list[dict]:
    """`predict` figures of this architecture per hardware: at the same preset and shapes where the run has
    them, else at whatever preset and shapes it predicted (the quick start measures tiny and predicts sd15)."""
    mine = [r for r in records if r["arch"] == record["arch"] and isinstance(r.get("predicted"), dict)
            and r["predicted"].get("peak_bytes") is not None]
    same = [r for r in mine if match_key(r)[1:5] == match_key(record)[1:5]]
    rows = []
    for r in same or mine:
        p = r["predicted"]
        world = r.get("world_size") or 1
        rows.append({"hardware": p.get("hardware"), "peak_bytes": p.get("peak_bytes"), "fits": p.get("fits"),
                     "step_ms": p.get("step_ms"), "step_ms_bound": p.get("step_ms_bound"),
                     "gpu_hours": hours_per_steps(p.get("step_ms"), world), "gpus": world,
                     "host_bound": is_host_bound(r),
                     "case": "" if same else f"{r['preset']}, {config_label(r, short=True)}"})
    return rows


def _trained_outcomes(records: list[dict], family: str) -> list[training.Outcome]:
    return [o for o in training.outcomes([r for r in records if family_of(r["arch"]) == family])
            if len(o.rows) > 1]


def committed_outcomes(family: str, root: Path | None = None) -> list[tuple[str, training.Outcome]]:
    """(run folder, outcome) of the project's committed training runs of `family` that compared architectures."""
    root = root or TRAIN_REPORTS
    found = []
    for path in sorted(root.glob("*/" + RESULTS_FILE)) if root.is_dir() else []:
        try:
            records = results.read_records(path)
        except (UserError, OSError):
            continue
        found.extend((str(path.parent.relative_to(root.parent.parent)) if root.parent.parent in path.parents
                      else str(path.parent), o) for o in _trained_outcomes(records, family))
    return found


def _found(source: str, o: training.Outcome) -> str:
    steps = max(len(r["train"].get("losses") or []) for r in o.records)
    parts = []
    for row in o.rows:
        if row.steps is None:
            parts.append(f"{row.label} did not reach it (final {row.final_loss:.4f})")
        else:
            parts.append(f"{row.label} reached it in {row.steps:.0f} steps"
                         + (" (the reference)" if row is o.rows[0] else ""))
    return (f"{source} ({o.title}, {steps} steps; target held-out loss {o.target:.4f}): " + "; ".join(parts))


def _pick_configuration(records: list[dict]) -> list[dict] | None:
    """The largest configuration at which at least two architectures measured a step time: with `stbench run`'s
    measurements where the run has them (a `train` record's step times come with its evaluations), else `train`'s."""
    usable = []
    for measured in (lambda r: not isinstance(r.get("train"), dict), lambda r: True):
        by_config: dict[tuple, dict[str, dict]] = {}
        for r in records:
            if (r["status"] == "ok" and r.get("step_ms_median") and not isinstance(r.get("predicted"), dict)
                    and measured(r)):
                by_config.setdefault(match_key(r), {})[r["arch"]] = r
        usable = [rs for rs in by_config.values() if len(rs) >= 2]
        if usable:
            break
    if not usable:
        return None
    best = max(usable, key=lambda rs: (len(rs), max(r["batch"] * r["frames"] * r["resolution"] ** 2
                                                    for r in rs.values())))
    return list(best.values())


def recommend(records: list[dict], committed_root: Path | None = None) -> list[Recommendation]:
    """One Recommendation per family that measured at least two architectures on one configuration."""
    out = []
    for family in sorted({family_of(r["arch"]) for r in records}):
        mine = [r for r in records if family_of(r["arch"]) == family]
        chosen = _pick_configuration(mine)
        if chosen is None:
            continue
        bound = overhead_bound([r for r in mine if match_key(r)[0] == match_key(chosen[0])[0]
                                and not isinstance(r.get("train"), dict)])  # run's measured grid only
        options = [Option(r, final_loss(r), forced=forced_sparsity(r), loaded=load.was_loaded(r),
                          overhead_exponent=bound.get(r["arch"]), predicted=_predicted(records, r)) for r in chosen]
        in_run = _trained_outcomes(records, family)
        sources = [("this run", o) for o in in_run] or committed_outcomes(family, committed_root)
        for o in options:
            rows = [row for _, outcome in sources for row in outcome.rows if row.label == o.label]
            o.missed = any(row.steps is None for row in rows)
            o.trained_here = bool(in_run)
            if rows:
                o.reached = next((row for row in rows if row.steps is not None), rows[0])
        losses = [o.loss for o in options if o.loss is not None]
        if losses:
            for o in options:
                o.same_quality = o.loss is not None and o.loss <= min(losses) * (1 + QUALITY_TOLERANCE)
        for o in options:
            o.same_quality = o.same_quality and not o.missed
        by_cost = bool(in_run) and any(o.cost_to_target_s is not None for o in options)
        cost = (lambda o: (o.cost_to_target_s is None, o.cost_to_target_s or 0.0)) if by_cost else \
            (lambda o: (False, 0.0))
        options.sort(key=lambda o: (o.missed, not o.same_quality, cost(o), o.record["step_ms_median"]))
        best = options[0]
        for o in options[1:]:
            o.versus_best = stats.compare_times(o.record, best.record, same_run=True)
        out.append(Recommendation(family, config_label(best.record), best.record["device"], options,
                                  _sentences(family, options, bool(losses), bound, sources, bool(in_run), by_cost),
                                  "this run" if in_run else "; ".join(sorted({s for s, _ in sources}))))
    return out


def _sentences(family: str, options: list[Option], trained: bool, bound: dict[str, float],
               sources: list, in_run: bool, by_cost: bool) -> list[str]:
    best = options[0]
    device = "CPU (measured on CPU, not a GPU figure)" if best.record["device"] == "cpu" else best.record["device"]
    failing = [o for o in options if o.missed]
    if best.missed:
        text = [f"{family.upper()}: no architecture to recommend: every one measured here missed the target "
                f"held-out loss in {'this run' if in_run else 'the committed'} training "
                f"({', '.join(o.arch for o in failing)})."]
        return text + [_found(source, o) + "." for source, o in sources]
    if by_cost:
        quality = ("at equal quality: the lowest cost to the target held-out loss (steps to it in this run's "
                   "`stbench train` x the measured step time)")
    elif trained or in_run:
        quality = "at equal quality (final loss from `stbench train` within 5% of the best)"
    elif sources:
        quality = ("among the architectures the project's committed training does not show missing the target "
                   "(this run holds no `stbench train` results)")
    else:
        quality = "assuming equal quality (this run holds no `stbench train` results)"
    text = [f"{family.upper()}: train {best.arch}: the cheapest {quality}, "
            f"{best.record['step_ms_median']:.1f} ms per step on {device}"
            + (f", about {best.cost_to_target_s:.1f} s to the target ({best.steps_to_target:.0f} steps)"
               if by_cost and best.cost_to_target_s is not None else "") + "."]
    contenders = [o for o in options[1:] if not o.missed]
    ties = [o.arch for o in contenders if o.same_quality and o.versus_best and o.versus_best.verdict != stats.SLOWER]
    if ties:
        text.append("Cannot be told apart from it in step time at this run's noise (stbench.stats, as the gate "
                    "judges): " + ", ".join(f"{o.arch} (median ratio {o.versus_best.ratio:.2f}x, "
                                            f"{o.versus_best.verdict})" for o in contenders if o.arch in ties)
                    + "; treat them as equally cheap, or measure with more --rounds.")
    slower = [o for o in contenders if o.versus_best and o.versus_best.verdict == stats.SLOWER]
    if slower:
        text.append("Measurably slower: " + ", ".join(f"{o.arch} {o.versus_best.ratio:.2f}x" for o in slower) + ".")
    for o in failing:
        per_step = (f" although it is {1 / o.versus_best.ratio:.2f}x as fast per step" if o.versus_best
                    and o.versus_best.ratio < 1 else "")
        where = "this run's training" if in_run else "the project's committed training"
        text.append(f"Not recommended: {o.arch} did not reach the target held-out loss in {where}{per_step}: "
                    f"it is not cheaper at equal quality.")
    if sources and not in_run:
        text.append("This run holds no `stbench train` results for the family; the committed ones found: "
                    + " | ".join(_found(source, o) for source, o in sources) + ".")
    if bound:
        text.append(f"{', '.join(sorted(bound))}: {OVERHEAD_LABEL} (step time grows as FLOPs^"
                    f"{min(bound.values()):.2f} across the grid); use larger shapes for a decision.")
    if any(o.forced for o in options):
        text.append("DSV sparsity was forced (--set sparsity): its figures are not what training would learn.")
    if any(o.loaded for o in options):
        text.append("Some of these cases were measured while other processes competed for the machine (load): "
                    "rerun on a quiet machine or with --rounds before relying on the order.")
    return text
