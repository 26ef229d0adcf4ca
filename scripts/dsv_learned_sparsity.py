"""Learned DSV sparsity on a tiny DiT whose attention is made structured (planted local attention), against
the same model with random weights: per-layer and per-head sparsity, estimator recall against the exact
top-mass oracle, the stage switch and the computed fraction, as `dit-dsv`'s record reports them.

    PYTHONPATH=. python scripts/dsv_learned_sparsity.py [--sharpness 8] [--dense-steps 20] > out.json

The planting (tests/test_dsv_paper.py: `plant_local_attention`) sets q = k = sharpness x (3D position
embedding): attention concentrates on nearby tokens, as in trained video DiTs, so DSV should find it.
Sparsity here is learned by DSV's profiling, never forced.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import architectures  # noqa: E402
from test_dsv_paper import plant_local_attention  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sharpness", type=float, default=8.0)
    p.add_argument("--dense-steps", type=int, default=20, help="the cap of stage 1 (the switch is by loss)")
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--resolution", type=int, default=128)
    args = p.parse_args()
    out = {}
    for name, planted in (("planted-local", True), ("random-weights", False)):
        torch.manual_seed(0)
        model = architectures.build("dit-dsv", "tiny", dense_steps=args.dense_steps)
        if planted:
            plant_local_attention(model, args.sharpness)
        batch = model.make_batch(1, args.frames, args.resolution, args.resolution)
        for _ in range(model.warmup_steps(2) + 1):
            model.loss(batch).backward()
        out[name] = model.extra_stats()
    out["settings"] = vars(args) | {"tokens": args.frames * (args.resolution // 16) ** 2, "preset": "tiny"}
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
