"""`stbench plan` on synthetic records: the estimate's parts, layouts, sparsity handling, bad input."""
from __future__ import annotations

import json

import pytest

from stbench import planner
from stbench.cli import main
from stbench.errors import UserError
from stbench.results import new_record

TINY_TOKENS = 128  # tiny DiT, 8 frames at 64 px: (8, 4, 4) tokens


def _record(arch="dit-dsv", step_ms=100.0, world=1, cp=None, dsv=None, comm=None, **extra):
    rec = new_record({"arch": arch, "preset": "tiny", "overrides": {"block_size": "16"}, "mode": "full",
                      "batch": 1, "frames": 8, "resolution": 64, "dtype": "fp32", "device": "cuda",
                      "compile": False, "context_parallel": cp})
    rec.update(status="ok", step_ms_median=step_ms, world_size=world, grad_bytes=4_000_000, dsv=dsv,
               comm_bytes=comm, **extra)
    return rec


def _write(tmp_path, records):
    path = tmp_path / "results.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_single_gpu_layout_reproduces_the_measurement():
    plans = planner.plan([_record(arch="dit-full")], gpus=1, link_gbps=100)
    (only,) = plans[0]["estimates"]
    assert only.layout == "single GPU" and only.step_ms == pytest.approx(100.0) and only.comm_bytes == 0


def test_layouts_cover_every_factorisation_within_the_head_count():
    assert planner.layouts(8, heads=16) == [(1, 8), (2, 4), (4, 2), (8, 1)]
    assert planner.layouts(8, heads=2) == [(1, 8), (2, 4)]  # ulysses cannot split 2 heads 4 ways


def test_infinite_bandwidth_scales_compute_by_gpu_count():
    plans = planner.plan([_record(arch="dit-full")], gpus=2, link_gbps=1e12)
    for est in plans[0]["estimates"]:
        assert est.step_ms == pytest.approx(50.0, rel=1e-6)


def test_comm_bytes_are_the_analytic_counts():
    """Ulysses x2 on dit-full tiny (2 layers, 2 heads of 32, hidden 64, fp32): all-to-alls + tokens + grads."""
    from stbench.parallel.context_parallel import analytic_bytes

    plans = planner.plan([_record(arch="dit-full")], gpus=2, link_gbps=100)
    by_layout = {(e.ulysses, e.ring): e for e in plans[0]["estimates"]}
    tokens = (2 - 1) * (TINY_TOKENS // 2) * 64 * 4
    grads = 4_000_000  # 2 (W-1)/W x grad_bytes at W = 2
    for mode, key in (("ulysses", (2, 1)), ("ring", (1, 2))):
        attention = 2 * analytic_bytes(mode, batch=1, heads=2, tokens=TINY_TOKENS, head_dim=32, world=2,
                                       element_size=4, grad_element_size=4)
        assert by_layout[key].comm_bytes == attention + tokens + grads, mode


def test_slow_link_prefers_fewer_bytes_and_reports_time_in_comm():
    fast = planner.plan([_record(arch="dit-full")], gpus=2, link_gbps=1e6)[0]
    slow = planner.plan([_record(arch="dit-full")], gpus=2, link_gbps=0.01)[0]
    assert slow["best"].step_ms > fast["best"].step_ms
    assert slow["best"].comm_bytes == min(e.comm_bytes for e in slow["estimates"])


def test_uneven_sparsity_makes_head_wise_imbalanced_and_sparse_ring_cheaper():
    """Layer sparsity planted on one head of two: head-wise puts the dense head on one rank (imbalance),
    the sparse ring exchange sends fewer bytes than dense ring."""
    profile = {"head_sparsity": [[0.9, 0.0], [0.9, 0.0]]}
    dsv = planner.plan([_record(dsv=profile)], gpus=2, link_gbps=100)[0]
    dense = planner.plan([_record(dsv=None)], gpus=2, link_gbps=100)[0]
    ulysses = {(e.ulysses, e.ring): e for e in dsv["estimates"]}[(2, 1)]
    ring = {(e.ulysses, e.ring): e for e in dsv["estimates"]}[(1, 2)]
    assert ulysses.attention_imbalance == pytest.approx(1.0 / ((1.0 + 0.1) / 2))  # busiest rank 1.0 vs mean 0.55
    assert ring.attention_imbalance == pytest.approx(1.0)
    dense_ring = {(e.ulysses, e.ring): e for e in dense["estimates"]}[(1, 2)]
    assert ring.comm_bytes < dense_ring.comm_bytes
    assert dsv["best"].layout.startswith("sequence-wise")  # balanced work beats the idle head-wise rank


def test_layer_sparsity_without_heads_is_rebuilt_from_the_sparse_fraction():
    shape = planner._dims(_record(), 1)
    rows = planner.head_sparsity(_record(dsv={"layer_sparsity": [0.3, 0.0], "sparse_head_fraction": 0.5}), shape)
    assert rows == [[pytest.approx(0.6), 0.0], [0.0, 0.0]]  # one sparse head carries the layer's mean


def test_longer_sequence_scales_attention_quadratically():
    base = planner.plan([_record(arch="dit-full")], gpus=1, link_gbps=100)[0]["estimates"][0]
    longer = planner.plan([_record(arch="dit-full")], gpus=1, link_gbps=100, tokens=2 * TINY_TOKENS)[0]
    attn, other = planner.flop_split(planner._dims(_record(arch="dit-full"), 1), [[0.0, 0.0]] * 2, TINY_TOKENS)
    share = attn / (attn + other)
    assert longer["estimates"][0].step_ms == pytest.approx(base.step_ms * (4 * share + 2 * (1 - share)))


def test_measured_runs_are_compared_with_their_estimates():
    records = [_record(arch="dit-full"), _record(arch="dit-full", step_ms=70.0, world=2, cp="ring", comm=123)]
    (p,) = planner.plan(records, gpus=4, link_gbps=100)
    (m,) = p["measured"]
    assert m["layout"] == "sequence-wise (ring x2)" and m["measured_step_ms"] == 70.0
    assert m["measured_comm_bytes"] == 123 and m["estimated_comm_bytes"] > 0
    assert "measured sequence-wise (ring x2) on 2: 70.00 ms" in planner.render([p], 4, 100)


def test_command_line_prints_the_best_layout(tmp_path, capsys):
    path = _write(tmp_path, [_record(dsv={"head_sparsity": [[0.9, 0.0], [0.9, 0.0]]})])
    assert main(["plan", "--results", str(path), "--gpus", "2", "--link-gbps", "200", "--arch", "dit-dsv"]) == 0
    out = capsys.readouterr().out
    assert "best: sequence-wise (ring x2)" in out and "head-wise (ulysses x2)" in out


@pytest.mark.parametrize("argv, message", [
    (["--gpus", "0", "--link-gbps", "10"], "gpus: must be >= 1"),
    (["--gpus", "2", "--link-gbps", "-1"], "link-gbps: must be a positive number"),
    (["--gpus", "2", "--link-gbps", "10", "--arch", "dit-window"], "no single-GPU record"),
    (["--gpus", "2", "--link-gbps", "10", "--tokens", "0"], "tokens: must be >= 1"),
])
def test_bad_input_is_a_user_error(tmp_path, capsys, argv, message):
    path = _write(tmp_path, [_record()])
    assert main(["plan", "--results", str(path), *argv]) == 2
    assert message in capsys.readouterr().err


def test_bad_files_and_profiles_are_user_errors(tmp_path, capsys):
    assert main(["plan", "--results", str(tmp_path / "missing.jsonl"), "--gpus", "2", "--link-gbps", "1"]) == 2
    assert "cannot read results file" in capsys.readouterr().err
    with pytest.raises(UserError, match="dsv.head_sparsity must be 2 layers x 2 heads"):
        planner.plan([_record(dsv={"head_sparsity": [[0.5]]})], gpus=2, link_gbps=1)
    with pytest.raises(UserError, match=r"expected a number in \[0, 1\)"):
        planner.plan([_record(dsv={"layer_sparsity": [1.5, 0.0], "sparse_head_fraction": 0.5})], gpus=2, link_gbps=1)


def test_cpu_figures_are_labelled_extrapolated_and_hybrids_not_runnable(tmp_path, capsys):
    path = _write(tmp_path, [_record(device="cpu")])
    assert main(["plan", "--results", str(path), "--gpus", "4", "--link-gbps", "200"]) == 0
    out = capsys.readouterr().out
    assert "extrapolated from a CPU run, not a GPU figure" in out and "1 GPU" not in out
    hybrid = next(line for line in out.splitlines() if line[2:].startswith("hybrid"))
    assert planner.NOT_RUNNABLE in hybrid and hybrid.startswith("x")
    assert not any(line.startswith("*") and "hybrid" in line for line in out.splitlines())


def test_only_runnable_layouts_are_recommended():
    """stbench runs ulysses or ring, not both: hybrids are marked, never starred, even when estimated fastest."""
    plans = planner.plan([_record(arch="dit-full")], gpus=4, link_gbps=1e12)
    (p,) = plans
    assert set(p["unrunnable"]) == {"hybrid (ulysses x2 * ring x2)"}
    assert p["best"].ulysses == 1 or p["best"].ring == 1
    out = planner.render(plans, 4, 1e12)
    assert "x hybrid (ulysses x2 * ring x2)" in out and "not runnable: stbench runs ulysses or ring" in out
    # ring with an attention kind it does not support: marked with the run's own reason
    (w,) = planner.plan([_record(arch="dit-window")], gpus=2, link_gbps=100)
    assert "ring context parallelism supports dit-full and dit-dsv" in w["unrunnable"]["sequence-wise (ring x2)"]
