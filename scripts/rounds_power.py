"""How many --rounds make a 10% step-time difference detectable, from the project's own quiet-machine noise.

Model of one case's log step time: case + round effect + step noise. The paired difference of two cases' round
effects is drawn from the A/A rounds of reports/trust/overhead-quiet-perf_counter.txt (the same step timed twice
per round, 20 rounds: log ratio of the two round medians); the step noise from the within-round residuals (log
sample minus its round's median) of reports/trust/quickstart-quiet/*.results.jsonl. Each simulated pair of
records goes through stbench.stats.compare_times, the test the gate and the report use, with the run's defaults.
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np

from stbench import stats

REPO = Path(__file__).resolve().parents[1]


def aa_round_log_ratios() -> np.ndarray:
    rounds: dict[int, dict[str, float]] = {}
    for line in (REPO / "reports/trust/overhead-quiet-perf_counter.txt").read_text().splitlines():
        m = re.match(r"round (\d+) (\w+)\s+median\s+([\d.]+) ms", line)
        if m:
            rounds.setdefault(int(m[1]), {})[m[2]] = float(m[3])
    return np.array([np.log(r["stbench"] / r["bare"]) for r in rounds.values()])


def step_residuals() -> np.ndarray:
    out = []
    for path in sorted((REPO / "reports/trust/quickstart-quiet").glob("*.results.jsonl")):
        for line in path.read_text().splitlines():
            r = json.loads(line)
            if r.get("step_ms_samples") and r.get("sample_rounds"):
                s, rd = np.log(r["step_ms_samples"]), np.array(r["sample_rounds"])
                out += [v for k in set(rd) for v in s[rd == k] - np.median(s[rd == k])]
    return np.array(out)


def simulate(rounds: int, repeats: int, change: float, trials: int, rng, d, e) -> dict:
    verdicts: dict[str, int] = {}
    for _ in range(trials):
        diff = rng.choice(d, rounds)
        # load that both cases of a round share cancels in their ratio: only the A/A differences enter
        a = np.log(1 + change) + diff[:, None] + rng.choice(e, (rounds, repeats))
        b = rng.choice(e, (rounds, repeats))
        rec = lambda x: {"step_ms_samples": [float(v) for v in 100 * np.exp(x.ravel())],  # noqa: E731
                         "sample_rounds": [r for r in range(rounds) for _ in range(repeats)]}
        v = stats.compare_times(rec(a), rec(b), same_run=True).verdict
        verdicts[v] = verdicts.get(v, 0) + 1
    return {k: n / trials for k, n in sorted(verdicts.items())}


def main() -> None:
    # the verdict reads the test's p-value and the ratio of medians, never the bootstrap interval: skipped here,
    # it would be most of the time
    stats.ratio_interval = lambda *args, **kwargs: None
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", default="1,2,3,4,5,6,8")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--trials", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    d, e = aa_round_log_ratios(), step_residuals()
    print(f"A/A round log ratios: {d.size} rounds, sd {d.std(ddof=1):.3f}; within-round step residuals: {e.size} "
          f"samples, sd {e.std(ddof=1):.3f}")
    print(f"--repeats {args.repeats}; {args.trials} simulated pairs per row; verdict of stbench.stats.compare_times")
    rng = np.random.default_rng(args.seed)
    for rounds in map(int, args.rounds.split(",")):
        hit = simulate(rounds, args.repeats, 0.10, args.trials, rng, d, e)
        same = simulate(rounds, args.repeats, 0.0, args.trials, rng, d, e)
        print(f"rounds {rounds}: +10% called slower {hit.get(stats.SLOWER, 0):.1%} "
              f"(faster {hit.get(stats.FASTER, 0):.1%}); equal called different "
              f"{same.get(stats.SLOWER, 0) + same.get(stats.FASTER, 0):.1%}")


if __name__ == "__main__":
    main()
