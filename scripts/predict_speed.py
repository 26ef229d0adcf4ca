"""How long `predict` takes as a model deepens and its sequence grows, with repeated blocks traced once and
with every block traced (--exact): one process, imports done first, each case timed once after a warm-up case.

    python scripts/predict_speed.py [--out reports/predict/speed]

Writes OUT/table.md and OUT/timings.jsonl (one line per case and method, with the predicted bytes and step time
both give, which must agree). CPU wall seconds on the machine that ran it (its cores and load are recorded):
not a GPU figure, and only comparable within one run.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stbench.predict import estimate, hardware  # noqa: E402
from stbench.predict.command import PredictSweep  # noqa: E402

DEPTHS = (10, 20, 40)  # wan 1.3b's width at 480x832 x 81 frames, --set num_layers=N
SIZES = ("240x416", "480x832", "720x1280")  # wan 1.3b (30 blocks) at 81 frames: 8,190 / 32,760 / 75,600 tokens


def case(resolution: str, layers: int):
    h, w = (int(v) for v in resolution.split("x"))
    sweep = PredictSweep(archs=("wan",), hardware=("h100-sxm",), resolutions=((h, w),), frames=(81,),
                         preset="1.3b", mode="full", overrides=(("num_layers", str(layers)),))
    return sweep.case("wan", "h100-sxm", (h, w), 81, 1)


def timed(c, exact: bool) -> tuple[float, dict]:
    estimate.cached_trace.cache_clear()
    start = time.perf_counter()
    record = estimate.predict_case(c, hardware.get("h100-sxm"), 1, exact)
    return time.perf_counter() - start, record["predicted"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="reports/predict/speed")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    timed(case("240x416", 6), False)  # imports and one-off set-up, not counted
    rows = []
    grid = [("blocks", "480x832", n) for n in DEPTHS] + [("tokens", r, 30) for r in SIZES]
    with open(out / "timings.jsonl", "w") as f:
        for axis, resolution, layers in grid:
            c = case(resolution, layers)
            fast_s, fast = timed(c, False)
            exact_s, exact = timed(c, True)
            same = all(fast[k] == exact[k] for k in ("peak_bytes", "peak_allocated_bytes", "flops", "breakdown"))
            row = {"axis": axis, "resolution": resolution, "frames": 81, "num_layers": layers,
                   "tokens": 21 * (c.frame_hw[0] // 16) * (c.frame_hw[1] // 16), "fast_s": round(fast_s, 2),
                   "exact_s": round(exact_s, 2), "same_bytes_and_flops": same,
                   "step_ms_rel_diff": abs(fast["step_ms"] - exact["step_ms"]) / exact["step_ms"],
                   "peak_bytes": exact["peak_bytes"], "trace": fast["trace"]}
            rows.append(row)
            f.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)
    load = os.getloadavg()
    lines = [f"# predict's time: repeated blocks traced once vs every block (--exact)", "",
             f"`python scripts/predict_speed.py` on {platform.processor() or platform.machine()}, "
             f"{os.cpu_count()} CPUs, load average {load[0]:.2f} at the end; wall seconds of "
             "`estimate.predict_case` (one case, h100-sxm, wan 1.3b's width, bf16, full training, 81 frames), "
             "imports excluded. CPU time of the prediction, not a GPU figure.", "",
             "| axis | blocks | frames x size | tokens | traced once (s) | every block (s) | speed-up "
             "| same bytes & FLOPs | step time diff |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        same = "yes" if r["same_bytes_and_flops"] else "NO"
        lines.append(f"| {r['axis']} | {r['num_layers']} | 81 x {r['resolution']} | {r['tokens']:,} "
                     f"| {r['fast_s']:.2f} | {r['exact_s']:.2f} | {r['exact_s'] / r['fast_s']:.1f}x | {same} "
                     f"| {r['step_ms_rel_diff']:.1e} |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if all(r["same_bytes_and_flops"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
