"""Comparisons computed from records: Mobius vs serial, sparse vs full attention, a run vs a baseline run."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

import architectures

from .. import results, stats
from ..measure import load


@dataclass(frozen=True)
class Comparison:
    """Candidates measured against one reference architecture on matching configurations."""

    key: str
    title: str
    reference: str
    candidates: tuple[str, ...]
    points_of_reference: tuple[str, ...] = ()  # shown in the table, left out of the verdict
    question: str = ""


COMPARISONS = (
    Comparison("mobius", "Mobius (parallel) vs serial 3D-UNet", "serial-unet", ("mobius-unet", "mobius-ladder-unet"),
               ("modelscope-unet",), "Does running temporal layers beside the frozen spatial layers save memory "
                                     "and time when fine-tuning for video?"),
    Comparison("sparse", "Sparse vs full attention (video DiT)", "dit-full",
               ("dit-dsv", "dit-window", "dit-serial-st", "dit-parallel-st"), (),
               "How much do sparse or factorised attention patterns save over full 3D attention?"),
)


def family_of(arch: str) -> str:
    """The registry family of a record's architecture ('other' for one this install does not know)."""
    try:
        return architectures.get(arch).family
    except Exception:  # noqa: BLE001 - a record of an architecture this install does not know
        return "other"


def match_key(record: dict) -> tuple:
    return tuple(str(record.get(name)) if name != "world_size" else str(record.get(name) or 1)
                 for name in results.MATCH_FIELDS)


def config_label(record: dict, *, short: bool = False) -> str:
    text = f"{results.resolution_label(record)}px, {record['frames']} frames, batch {record['batch']}"
    return text if short else f"{text} ({settings_label(record)})"


def settings_label(record: dict) -> str:
    """The settings a sweep usually holds fixed: preset, mode, dtype, device (and compile, parallelism)."""
    text = f"{record['preset']} preset, {record['mode']} mode, {record['dtype']} on {record['device']}"
    if record.get("compile"):
        text += ", compiled"
    layout = results.layout_label(record)
    return f"{text}, {layout}" if layout else text


def _size(record: dict) -> int:
    return record["batch"] * record["frames"] * record["resolution"] ** 2


def saved_pct(reference: float | None, candidate: float | None) -> float | None:
    """Memory saved by the candidate, % of the reference (negative: it used more)."""
    if not reference or candidate is None:
        return None
    return 100.0 * (1.0 - candidate / reference)


@dataclass
class Ratio:
    """A ratio of median step times with its interval and the verdict of stbench.stats (the gate's judgement)."""

    value: float
    low: float | None = None
    high: float | None = None
    basis: str = ""
    verdict: str = stats.SAME
    test: str = ""
    p_value: float | None = None

    @property
    def significant(self) -> bool:
        return self.verdict in (stats.SLOWER, stats.FASTER)


def time_ratio(numerator: dict, denominator: dict, *, same_run: bool = True, seed: int = 0) -> Ratio | None:
    """median(numerator) / median(denominator) of step time; > 1 means the denominator's case is faster.

    Judged by stbench.stats.compare_times, as the gate judges it; `same_run` pairs samples by round.
    """
    judged = stats.compare_times(numerator, denominator, same_run=same_run, seed=seed)
    if judged is None:
        return None
    ratio = Ratio(judged.ratio, judged.low, judged.high, "bootstrap 95%" if judged.low is not None else "",
                  judged.verdict, judged.test, judged.p_value)
    if judged.low is None:
        p10a, p90a, p10b, p90b = (numerator.get("step_ms_p10"), numerator.get("step_ms_p90"),
                                  denominator.get("step_ms_p10"), denominator.get("step_ms_p90"))
        if p10a and p90a and p10b and p90b:
            ratio.low, ratio.high, ratio.basis = p10a / p90b, p90a / p10b, "p10-p90"
        else:
            ratio.basis = "one sample"
    return ratio


def load_note(*records: dict) -> str:
    """Flags a comparison whose cases were measured while other processes competed for the machine."""
    loaded = [r["arch"] for r in records if r is not None and load.was_loaded(r)]
    return f"measured under load ({', '.join(dict.fromkeys(loaded))}): may reflect the machine" if loaded else ""


@dataclass
class PairRow:
    """One candidate record against the reference record of the same configuration."""

    candidate: dict
    reference: dict | None
    is_point_of_reference: bool = False
    speedup: Ratio | None = None
    activations_saved: float | None = None
    peak_saved: float | None = None
    note: str = ""

    @property
    def both_ok(self) -> bool:
        return self.reference is not None and self.candidate["status"] == "ok" and self.reference["status"] == "ok"


@dataclass
class ComparisonResult:
    """A filled-in comparison: rows per configuration and a computed plain-language verdict."""

    comparison: Comparison
    rows: list[PairRow] = field(default_factory=list)
    verdict: list[str] = field(default_factory=list)


def compare(records: list[dict], comparison: Comparison) -> ComparisonResult | None:
    """Rows for every candidate record; None when the run holds neither side of the comparison."""
    records = results.latest_per_case(records)
    references: dict[tuple, list[dict]] = {}
    for r in records:
        if r["arch"] == comparison.reference:
            references.setdefault(match_key(r), []).append(r)
    others = comparison.candidates + comparison.points_of_reference
    candidates = [r for r in records if r["arch"] in others]
    if not candidates or not references:
        return None
    result = ComparisonResult(comparison)
    order = {name: i for i, name in enumerate(others)}
    for cand in sorted(candidates, key=lambda r: (order[r["arch"]], r["resolution"], r["frames"], r["batch"])):
        options = references.get(match_key(cand), [])
        same = [r for r in options if (r.get("overrides") or {}) == (cand.get("overrides") or {})]
        ref = (same or options or [None])[0]
        row = PairRow(cand, ref, cand["arch"] in comparison.points_of_reference)
        if ref is None:
            row.note = f"no {comparison.reference} record for this configuration"
        elif row.both_ok:
            row.speedup = time_ratio(ref, cand)
            row.activations_saved = saved_pct(ref.get("saved_activations"), cand.get("saved_activations"))
            row.peak_saved = saved_pct(ref.get("peak_allocated"), cand.get("peak_allocated"))
        elif cand["status"] == "ok":
            row.note = f"{comparison.reference}: {ref['status']}; {cand['arch']} fits"
        elif ref["status"] == "ok":
            row.note = f"{cand['arch']}: {cand['status']}; {comparison.reference} fits"
        else:
            row.note = f"both {cand['status']}/{ref['status']}"
        row.note = "; ".join(n for n in (row.note, dsv_note(cand), load_note(cand, ref)) if n)
        result.rows.append(row)
    result.verdict = [v for v in (_verdict(comparison, name, result.rows) for name in comparison.candidates) if v]
    return result


def forced_sparsity(record: dict) -> bool:
    """DSV sparsity set by hand (`--set sparsity=...`) rather than learned: never shown as a measurement."""
    dsv = record.get("dsv")
    return bool(isinstance(dsv, dict) and dsv.get("forced")) or any(
        "sparsity" in str(k) for k in (record.get("overrides") or {}))


def dsv_note(record: dict) -> str:
    """DSV's own figures when the record has them: how sparse it ran and how well the estimator did."""
    dsv = record.get("dsv")
    if not isinstance(dsv, dict):
        return "sparsity FORCED (--set), not learned" if forced_sparsity(record) else ""
    parts = []
    for key, label, scale, unit in (("sparse_head_fraction", "sparse heads", 100, "%"),
                                    ("estimator_recall", "estimator recall", 100, "%"),
                                    ("rel_error", "rel. error", 1, "")):
        if isinstance(dsv.get(key), (int, float)):
            parts.append(f"{label} {dsv[key] * scale:.{1 if unit else 3}f}{unit}")
    layers = [[h for h in layer if isinstance(h, (int, float))] for layer in dsv.get("profiled_sparsity") or []]
    layers = [layer for layer in layers if layer]
    if layers:  # what training made of each head: why DSV went sparse where it did, or nowhere
        heads = [h for layer in layers for h in layer]
        parts.append(f"learned (profiled) sparsity by layer {', '.join(f'{sum(l) / len(l):.2f}' for l in layers)}"
                     f" (heads {min(heads):.2f}-{max(heads):.2f})")
    if forced_sparsity(record):
        parts.insert(0, "sparsity FORCED (--set), not learned")
    return ", ".join(parts)


def _fmt_speed(ratio: Ratio) -> str:
    if ratio.value >= 1:
        text = f"was {ratio.value:.2f}x faster than"
    else:
        text = f"was {1 / ratio.value:.2f}x slower than"
    if ratio.low is not None:
        text_interval = f"speed-up {ratio.low:.2f}-{ratio.high:.2f}x, {ratio.basis}"
        if not ratio.significant:
            text_interval += f"; {ratio.verdict} by {ratio.test or 'the test'}, as the gate would judge it"
        return f"{text} __REF__ ({text_interval})"
    return f"{text} __REF__"


def _fmt_saved(pct: float, what: str) -> str:
    if abs(pct) < 0.05:
        return f"the same {what}"
    return f"{abs(pct):.1f}% {'less' if pct > 0 else 'more'} {what}"


def _verdict(comparison: Comparison, arch: str, rows: list[PairRow]) -> str:
    """One computed paragraph for one candidate; empty when the run does not hold it."""
    mine = [r for r in rows if r.candidate["arch"] == arch]
    if not mine:
        return ""
    ref = comparison.reference
    measured = [r for r in mine if r.both_ok and r.speedup is not None]
    parts = []
    if measured:
        head = max(measured, key=lambda r: _size(r.candidate))
        memory = []
        if head.peak_saved is not None:
            memory.append(_fmt_saved(head.peak_saved, "peak memory"))
        if head.activations_saved is not None:
            memory.append(_fmt_saved(head.activations_saved, "activation memory"))
        memory_text = f"used {' and '.join(memory)} and " if memory else ""
        parts.append(f"On this run, {arch} {memory_text}{_fmt_speed(head.speedup).replace('__REF__', ref)} "
                     f"at {config_label(head.candidate)}.")
        if len(measured) > 1:
            speedups = [r.speedup.value for r in measured]
            text = (f"Across {len(measured)} matching configurations the speed-up ranged from "
                    f"{min(speedups):.2f}x to {max(speedups):.2f}x (median {float(np.median(speedups)):.2f}x)")
            acts = [r.activations_saved for r in measured if r.activations_saved is not None]
            if acts and round(min(acts), 1) == round(max(acts), 1):
                text += f" and the activation memory saved was {min(acts):.1f}% in each"
            elif acts and max(acts) < 0:
                text += f" and activation memory grew by {-max(acts):.1f}% to {-min(acts):.1f}%"
            elif acts:
                text += f" and the activation memory saved ranged from {min(acts):.1f}% to {max(acts):.1f}%"
            parts.append(text + ".")
        warned = sum(1 for r in measured if r.candidate.get("warnings") or r.reference.get("warnings"))
        if warned:
            parts.append(f"{warned} of these {len(measured)} comparisons involve a case with warnings (see "
                         f"Failures and warnings): read their speed-ups with care.")
    else:
        parts.append(f"On this run, no configuration measured both {arch} and {ref} successfully.")
    fits = [r for r in mine if r.reference is not None and r.candidate["status"] == "ok"
            and r.reference["status"] == "oom"]
    if fits:
        parts.append(f"{arch} fit in memory where {ref} ran out at "
                     f"{'; '.join(config_label(r.candidate, short=True) for r in fits)}.")
    lost = [r for r in mine if r.reference is not None and r.candidate["status"] == "oom"
            and r.reference["status"] == "ok"]
    if lost:
        parts.append(f"{arch} ran out of memory where {ref} fit at "
                     f"{'; '.join(config_label(r.candidate, short=True) for r in lost)}.")
    failed = [r for r in mine if r.candidate["status"] == "error"]
    if failed:
        parts.append(f"{len(failed)} {arch} case(s) failed with an error (listed below).")
    return " ".join(parts)


@dataclass
class DeltaRow:
    """One case present in both the run and the baseline."""

    current: dict
    baseline: dict
    time: Ratio | None = None  # current / baseline: > 1 is slower
    peak_change: float | None = None  # % change of peak_allocated (positive: more memory)
    activations_change: float | None = None
    load_note: str = ""


def baseline_deltas(current: list[dict], baseline: list[dict]) -> tuple[list[DeltaRow], list[dict], list[dict]]:
    """Rows for cases in both runs (matched by case_key), then cases only in the run, only in the baseline."""
    cur = {results.case_key(r): r for r in results.latest_per_case(current)}
    base = {results.case_key(r): r for r in results.latest_per_case(baseline)}
    rows = []
    for key, record in cur.items():
        if key not in base:
            continue
        row = DeltaRow(record, base[key], load_note=load_note(record, base[key]))
        if record["status"] == "ok" and base[key]["status"] == "ok":
            row.time = time_ratio(record, base[key], same_run=False)
            row.peak_change = _change(base[key].get("peak_allocated"), record.get("peak_allocated"))
            row.activations_change = _change(base[key].get("saved_activations"), record.get("saved_activations"))
        rows.append(row)
    only_current = [r for k, r in cur.items() if k not in base]
    only_baseline = [r for k, r in base.items() if k not in cur]
    return rows, only_current, only_baseline


def _change(before: float | None, after: float | None) -> float | None:
    if not before or after is None:
        return None
    return 100.0 * (after / before - 1.0)
