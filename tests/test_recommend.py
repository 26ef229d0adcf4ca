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


def test_without_train_results_quality_is_assumed_and_said(tmp_path):
    [rec] = recommend.recommend([_case("serial-unet", 100, seed=1), _case("mobius-unet", 130, seed=2)],
                                committed_root=tmp_path)  # nothing committed either
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


def _trained(arch, evals, **fields):
    """A `stbench train` record (64px, batch 2: another case than the measured ones) with its evaluations."""
    record = _case(arch, 300, frames=8, seed=len(arch), batch=2, **fields)
    record["train"] = {"eval": evals, "losses": [0.2] * evals[-1][0], "wall_ms": [300.0 * (i + 1) for i in
                                                                                 range(evals[-1][0])]}
    return record


SERIAL_EVALS = [[0, 0.1291], [25, 0.1244], [50, 0.1235]]  # reports/train/unet-tiny-finetune's first 50 steps
LADDER_EVALS = [[0, 0.1291], [25, 0.1282], [50, 0.1278]]


def test_never_recommends_an_architecture_that_missed_the_target_in_the_run(tmp_path):
    measured = [_case("serial-unet", 100, seed=1), _case("mobius-ladder-unet", 60, seed=2)]  # ladder: faster
    trained = [_trained("serial-unet", SERIAL_EVALS), _trained("mobius-ladder-unet", LADDER_EVALS)]
    [rec] = recommend.recommend(measured + trained, committed_root=tmp_path)
    best, ladder = rec.options
    assert best.arch == "serial-unet" and ladder.missed and not best.missed
    assert rec.text[0].startswith("UNET: train serial-unet: the cheapest at equal quality: the lowest cost to the "
                                  "target held-out loss")
    # 0.1291 - 0.9 x (0.1291 - 0.1235) = 0.12406, crossed between 25 (0.1244) and 50 (0.1235) steps
    assert best.steps_to_target == pytest.approx(25 + 25 * (0.1244 - 0.12406) / (0.1244 - 0.1235))
    assert best.cost_to_target_s == pytest.approx(best.steps_to_target * best.record["step_ms_median"] / 1e3)
    assert any(t.startswith("Not recommended: mobius-ladder-unet did not reach the target held-out loss in this "
                            "run's training") for t in rec.text)
    assert rec.quality_source == "this run"


def test_ranks_by_cost_to_the_target_not_by_step_time(tmp_path):
    measured = [_case("serial-unet", 100, seed=1), _case("mobius-unet", 90, seed=2)]
    slow_learner = [[0, 0.1291], [25, 0.1270], [50, 0.1235]]  # mobius reaches the target only at ~48 steps
    trained = [_trained("serial-unet", SERIAL_EVALS), _trained("mobius-unet", slow_learner)]
    [rec] = recommend.recommend(measured + trained, committed_root=tmp_path)
    assert [o.arch for o in rec.options] == ["serial-unet", "mobius-unet"]  # cheaper per step, dearer to target
    assert rec.options[0].cost_to_target_s < rec.options[1].cost_to_target_s


def test_committed_training_results_veto_and_are_quoted(tmp_path):
    committed = tmp_path / "train" / "unet-finetune"
    for r in (_trained("serial-unet", SERIAL_EVALS), _trained("mobius-ladder-unet", LADDER_EVALS)):
        results.append_record(committed / "results.jsonl", r)
    measured = [_case("serial-unet", 100, seed=1), _case("mobius-ladder-unet", 60, seed=2)]
    [rec] = recommend.recommend(measured, committed_root=tmp_path / "train")
    assert rec.options[0].arch == "serial-unet" and rec.options[1].missed
    assert "committed training does not show missing the target" in rec.text[0]
    quoted = next(t for t in rec.text if t.startswith("This run holds no `stbench train` results"))
    assert "mobius-ladder-unet did not reach it (final 0.1278)" in quoted and "target held-out loss 0.1241" in quoted
    assert "Not recommended: mobius-ladder-unet" in " ".join(rec.text)
    # the project's own committed runs: the side-stream UNet never reached serial's target
    [real] = recommend.recommend(measured)
    assert real.options[0].arch == "serial-unet" and real.options[1].missed
    assert "reports/train/unet-tiny-finetune" in " ".join(real.text)


def test_nothing_recommended_when_every_architecture_missed(tmp_path):
    measured = [_case("mobius-ladder-unet", 60, seed=2), _case("mobius-unet", 70, seed=3)]
    trained = [_trained("serial-unet", SERIAL_EVALS), _trained("mobius-ladder-unet", LADDER_EVALS),
               _trained("mobius-unet", LADDER_EVALS)]
    [rec] = recommend.recommend(measured + trained, committed_root=tmp_path)
    assert all(o.missed for o in rec.options)
    assert rec.text[0].startswith("UNET: no architecture to recommend")
    assert not any("train mobius" in t for t in rec.text)
