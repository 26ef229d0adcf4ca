"""The one statistics module: summaries of step-time samples and the test that judges two sets of them.

The gate and the report both call `compare_times`, so the same two records always get the same verdict.
Samples of two cases measured in the same interleaved rounds are paired (round r, step i of one against round r,
step i of the other) and judged with a one-sided Wilcoxon signed-rank test on their log ratios; otherwise the
samples are independent and judged with a one-sided Mann-Whitney U test. The interval of the ratio of medians is
scipy's bootstrap (percentile method, seeded).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np

TOLERANCE = 0.05  # a change below this fraction is not reported as one, however significant
ALPHA = 0.05
BOOTSTRAP_RESAMPLES = 2000
MIN_BOOTSTRAP_SAMPLES = 3
SLOWER, FASTER, SAME, UNSURE = "slower", "faster", "no difference", "unsure"


def summary(samples_ms) -> dict:
    """median, min, p10, p90 of step times (numpy's linear interpolation)."""
    values = np.asarray(samples_ms, dtype=float)
    if values.size == 0:
        raise ValueError("summary of no samples")
    median, p10, p90 = np.percentile(values, [50, 10, 90])
    return {"median": float(median), "min": float(values.min()), "p10": float(p10), "p90": float(p90)}


def clean(samples) -> list[float]:
    return [float(s) for s in samples or [] if isinstance(s, (int, float)) and not isinstance(s, bool) and s > 0]


def paired(a: dict, b: dict) -> bool:
    """Whether two records' samples pair one to one: both measured in the same rounds of one run."""
    ra, rb = a.get("sample_rounds"), b.get("sample_rounds")
    return (bool(ra) and ra == rb and len(ra) == len(clean(a.get("step_ms_samples")))
            and len(rb) == len(clean(b.get("step_ms_samples"))) and len(set(ra)) > 1)


def min_p_value(n_current: int, n_baseline: int, is_paired: bool) -> float:
    """The smallest one-sided p the test can reach with these sample counts (1 when it has no samples)."""
    if n_current == 0 or n_baseline == 0:
        return 1.0
    if is_paired:
        return 0.5 ** n_current
    return 1 / math.comb(n_current + n_baseline, n_current)


def p_greater(current, baseline, *, is_paired: bool = False) -> float:
    """One-sided p-value that `current` tends to be larger than `baseline`."""
    from scipy import stats as sps  # noqa: local: the measuring child process never needs scipy

    current, baseline = np.asarray(current, float), np.asarray(baseline, float)
    if current.size == 0 or baseline.size == 0:
        return 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-equal inputs: scipy warns, p is then nan
        if is_paired:
            diff = np.log(current) - np.log(baseline)
            if not np.any(diff):
                return 1.0
            p = sps.wilcoxon(diff, alternative="greater", zero_method="zsplit").pvalue
        else:
            if np.ptp(np.concatenate([current, baseline])) == 0:
                return 1.0
            p = sps.mannwhitneyu(current, baseline, alternative="greater").pvalue
    return 1.0 if math.isnan(p) else float(p)


def ratio_interval(current, baseline, *, is_paired: bool = False, seed: int = 0) -> tuple[float, float] | None:
    """Bootstrap 95% interval of median(current) / median(baseline); None with too few samples."""
    current, baseline = np.asarray(current, float), np.asarray(baseline, float)
    if min(current.size, baseline.size) < MIN_BOOTSTRAP_SAMPLES:
        return None
    if np.ptp(current) == 0 and np.ptp(baseline) == 0:
        value = float(current[0] / baseline[0])
        return value, value

    from scipy import stats as sps  # noqa: local, as above

    def ratio(c, b, axis=-1):
        return np.median(c, axis=axis) / np.median(b, axis=axis)

    result = sps.bootstrap((current, baseline), ratio, paired=is_paired, vectorized=True,
                           n_resamples=BOOTSTRAP_RESAMPLES, method="percentile", rng=np.random.default_rng(seed))
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


@dataclass(frozen=True)
class TimeComparison:
    """current against baseline step times: ratio of medians (> 1: current slower), its interval, test, verdict."""

    ratio: float
    low: float | None
    high: float | None
    p_value: float | None  # one-sided, in the direction of the change
    test: str
    verdict: str
    n_current: int
    n_baseline: int

    @property
    def delta(self) -> float:
        return self.ratio - 1.0


def compare_times(current: dict, baseline: dict, *, same_run: bool = False, tolerance: float = TOLERANCE,
                  alpha: float = ALPHA, seed: int = 0) -> TimeComparison | None:
    """Judge two records' step times; None when either has no step time.

    `same_run`: both records come from one run, so their rounds (if any) ran at the same times and pair up.

    slower/faster: the change exceeds `tolerance` and the test gives p < alpha; unsure: it exceeds the
    tolerance but the sample counts cannot reach p < alpha; otherwise no difference.
    """
    c, b = clean(current.get("step_ms_samples")), clean(baseline.get("step_ms_samples"))
    c_med = float(np.median(c)) if c else current.get("step_ms_median")
    b_med = float(np.median(b)) if b else baseline.get("step_ms_median")
    if not c_med or not b_med:
        return None
    is_paired = same_run and paired(current, baseline)
    test = "Wilcoxon signed-rank, paired by round" if is_paired else "Mann-Whitney U"
    ratio = c_med / b_med
    interval = ratio_interval(c, b, is_paired=is_paired, seed=seed)
    low, high = interval if interval else (None, None)
    if min_p_value(len(c), len(b), is_paired) >= alpha:
        verdict = UNSURE if abs(ratio - 1) > tolerance else SAME
        return TimeComparison(ratio, low, high, None, test, verdict, len(c), len(b))
    p = p_greater(c, b, is_paired=is_paired) if ratio >= 1 else p_greater(b, c, is_paired=is_paired)
    verdict = SAME
    if abs(ratio - 1) > tolerance and p < alpha:
        verdict = SLOWER if ratio > 1 else FASTER
    return TimeComparison(ratio, low, high, p, test, verdict, len(c), len(b))


def scaling_exponent(flops, times_ms) -> float | None:
    """Slope of log(time) against log(FLOPs): about 1 when compute-bound, near 0 when overhead dominates.

    None unless the FLOPs span at least a factor of 2 (the slope is meaningless over a narrower range).
    """
    x, y = np.asarray(flops, float), np.asarray(times_ms, float)
    keep = (x > 0) & (y > 0)
    x, y = x[keep], y[keep]
    if x.size < 2 or x.max() / x.min() < 2:
        return None
    return float(np.polyfit(np.log(x), np.log(y), 1)[0])
