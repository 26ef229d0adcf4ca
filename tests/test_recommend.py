"""The report's recommendation per family: cheapest at equal quality, ties by the gate's test, labels."""
import importlib.util
from pathlib import Path

import pytest

from stbench import results
from stbench.report import recommend
from stbench.report.__main__ import main
from test_gate import make_record

_spec = importlib.util.spec_from_file_location("fake_run", Path(__file__).parent / "fixtures" / "fake_run.py")
fake_run = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fake_run)


def _case(arch, median_ms, frames=8, flops=None, seed=0, **fields):
    record = make_record(arch=arch, frames=frames, median_ms=median_ms, seed=seed, n=9, **fields)
    record["sample_rounds"] = [0, 0, 0, 1, 1, 1, 2, 2, 2]
    record["flops_per_step"] = flops if flops is not None else 10 ** 9 * frames
    return record


def test_cheapest_at_equal_quality_with_ties_and_slower_ones():
    records = [_case("serial-unet", 100, seed=1), _case("mobius-unet", 101, seed=2),
               _case("mobius-ladder-unet", 70, seed=3, train={"eval": [[10, 0.50]], "losses": [0.6]}),
               _case("modelscope-unet", 150, seed=4)]
    for r in records[:2] + records[3:]:
        r["train"] = {"eval": [[10, 0.30]], "losses": [0.4]}
    [rec] = recommend.recommend(records)
    assert rec.family == "unet" and [o.arch for o in rec.options][0] == "serial-unet"  # ladder: lower quality
    assert rec.text[0].startswith("UNET: train serial-unet: the cheapest at equal quality")
    assert rec.text[1].startswith("Cannot be told apart") and "mobius-unet (median ratio 1.0" in rec.text[1]
    assert "modelscope-unet 1.50x" in rec.text[2]
    ladder = next(o for o in rec.options if o.arch == "mobius-ladder-unet")
    assert not ladder.same_quality and ladder.loss == 0.5


def test_without_train_results_quality_is_assumed_and_said():
    [rec] = recommend.recommend([_case("serial-unet", 100, seed=1), _case("mobius-unet", 130, seed=2)])
    assert "assuming equal quality (this run holds no `stbench train` results)" in rec.text[0]
    assert rec.options[1].versus_best.verdict == "slower"


def test_overhead_bound_is_labelled():
    # 4x the FLOPs, the same time: the step is dominated by overhead
    records = [_case(a, 50 + i, frames=f, seed=i * 10 + f) for i, a in enumerate(("serial-unet", "mobius-unet"))
               for f in (4, 16)]
    [rec] = recommend.recommend(records)
    assert any(recommend.OVERHEAD_LABEL in t for t in rec.text)
    assert all(o.overhead_exponent is not None for o in rec.options)
    grows = [_case(a, 10 * f, frames=f, seed=f) for a in ("serial-unet", "mobius-unet") for f in (4, 16)]
    assert recommend.overhead_bound(grows) == {}


def test_forced_sparsity_predicted_costs_and_dits_apart():
    dsv = _case("dit-dsv", 80, seed=1, overrides={"sparsity": 0.9}, dsv={"forced": True})
    full = _case("dit-full", 100, seed=2)
    predicted = dict(full, predicted={"hardware": "h100-sxm", "peak_bytes": 2 ** 30, "fits": True, "step_ms": 36.0})
    unets = [_case("serial-unet", 1000, seed=3), _case("mobius-unet", 900, seed=4)]
    recs = {r.family: r for r in recommend.recommend([dsv, full, predicted] + unets)}
    assert set(recs) == {"dit", "unet"}
    dit = recs["dit"]
    assert dit.options[0].forced and any("forced" in t for t in dit.text)
    [p] = next(o for o in dit.options if o.arch == "dit-full").predicted
    assert p["hardware"] == "h100-sxm" and p["gpu_hours"] == pytest.approx(36.0 * 1000 / 3.6e6)


def test_report_shows_the_recommendation_first(tmp_path):
    run = fake_run.write_fake_run(tmp_path / "run", seed=0, torn=True)
    assert main([str(run)]) == 0
    html = (run / "report.html").read_text()
    assert html.index('id="recommendation"') < html.index('id="environment"')
    assert "UNET family, at" in html and "DIT family, at" in html
    recs = recommend.recommend(results.read_records(run))
    for option in (o for rec in recs for o in rec.options):
        assert f"{option.record['flops_per_step']:,}" in html  # exact FLOPs per step
    assert "UNETs, " in html and "DITs, " in html  # figures grouped by family: never one axis


def test_forced_sparsity_flagged_in_comparisons_and_profiler_overhead_disclosed(tmp_path):
    from stbench.report import verdict

    assert verdict.dsv_note({"dsv": {"forced": True, "sparse_head_fraction": 0.5}}).startswith("sparsity FORCED")
    assert verdict.dsv_note({"dsv": None, "overrides": {"sparsity": 0.9}}).startswith("sparsity FORCED")
    assert verdict.dsv_note({"dsv": {"sparse_head_fraction": 0.5}}) == "sparse heads 50.0%"
    assert verdict.dsv_note({"dsv": {"sparse_head_fraction": 0.0, "profiled_sparsity": [[0.125, 0.25], [0.5, 0.0]]}}) \
        == "sparse heads 0.0%, learned (profiled) sparsity by layer 0.19, 0.25 (heads 0.00-0.50)"
    run = fake_run.write_fake_run(tmp_path / "run", seed=0, torn=True)
    import json
    summary = next((run / "traces").glob("*/summary.json"))
    data = json.loads(summary.read_text())
    data["step_ms"] = [s * 1.5 for s in data["step_ms"]]
    summary.write_text(json.dumps(data))
    assert main([str(run)]) == 0
    assert "profiler overhead: traced steps +50%" in (run / "report.html").read_text()
