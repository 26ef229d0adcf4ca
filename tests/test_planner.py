"""`stbench plan`: runnable FSDP x context-parallel layouts, each predicted (fake process group), ranked."""
from __future__ import annotations

import dataclasses

import pytest

from stbench import planner, results
from stbench.cli import main
from stbench.config import Case
from stbench.predict import hardware
from stbench.predict.command import Predictor
from stbench.predict.hardware import Hardware

SHAPE = ["--mode", "full", "--resolution", "64", "--frames", "8"]


def test_layouts_cover_every_factorisation():
    names = [layout.name for layout in planner.layouts(4, ("none", "blocks"))]
    assert names[:5] == ["fsdp 4", "fsdp 2 x ulysses 2", "fsdp 2 x ring 2", "fsdp 1 x ulysses 4", "fsdp 1 x ring 4"]
    assert names[5:] == [n.replace("4", "4, checkpointing blocks", 1) if n == "fsdp 4" else n + ", checkpointing blocks"
                         for n in names[:5]]
    assert [layout.name for layout in planner.layouts(1, ("none",))] == ["fsdp 1"]


def test_plan_ranks_runnable_layouts_by_predicted_throughput(tmp_path):
    base = Case(arch="dit-full", preset="tiny", mode="full", frames=8, resolution=64, dtype="bf16")
    target = hardware.get("h100-sxm")
    rows = planner.plan(base, 3, target, Predictor(tmp_path, {}, echo=lambda line: None), ("none", "blocks"))
    by_name = {row.layout.name: row for row in rows}
    # 128 tokens do not split over 3 context-parallel ranks: refused with `run`'s own reason, never ranked
    for name in ("fsdp 1 x ulysses 3", "fsdp 1 x ring 3", "fsdp 1 x ring 3, checkpointing blocks"):
        assert "128 video tokens do not split over 3" in by_name[name].unrunnable and by_name[name].record is None
    ranked = [row for row in rows if row.samples_per_s is not None]
    assert [r.samples_per_s for r in ranked] == sorted((r.samples_per_s for r in ranked), reverse=True)
    assert rows[0] is ranked[0] and not rows[0].unrunnable
    for row in ranked:  # throughput = global batch (FSDP degree x batch) per predicted step
        p = row.record["predicted"]
        assert row.samples_per_s == pytest.approx(row.layout.fsdp * 1 / (p["step_ms"] / 1e3))
        assert row.record["world_size"] == 3 and row.record["fsdp"] == row.layout.fsdp
    assert [r.layout.name for r in ranked] == ["fsdp 3", "fsdp 3, checkpointing blocks"]  # recomputation costs time
    text = planner.render(rows, base, 3, target)
    assert text.startswith("plan (PREDICTED, not measured)") and "* fsdp 3 " in text
    assert "x fsdp 1 x ring 3 " in text and "recommended (predicted): fsdp 3:" in text


def test_architectures_without_context_parallelism_get_fsdp_only(tmp_path):
    base = Case(arch="hunyuan-video", preset="tiny", mode="full", frames=5, resolution=64, dtype="bf16")
    rows = planner.plan(base, 2, hardware.get("h100-sxm"), Predictor(tmp_path, {}, echo=lambda line: None),
                        ("none",))
    assert [r.layout.name for r in rows if not r.unrunnable] == ["fsdp 2"]
    for row in rows[1:]:
        assert "is not legal for hunyuan-video" in row.unrunnable


def test_nothing_is_recommended_when_nothing_fits(tmp_path):
    base = Case(arch="dit-full", preset="tiny", mode="full", frames=8, resolution=64, dtype="bf16")
    small = dataclasses.replace(hardware.get("h100-sxm"), name="small", memory_bytes=514 * 2**20)  # the CUDA context (512 MiB) and 2 MiB
    rows = planner.plan(base, 2, small, Predictor(tmp_path, {}, echo=lambda line: None), ("none",))
    assert all(not r.fits for r in rows) and all(r.samples_per_s is None for r in rows)
    assert "recommended: none" in planner.render(rows, base, 2, small)


def test_command_writes_predictions_and_plan_and_resumes(tmp_path, capsys):
    out = tmp_path / "plan"
    argv = ["plan", "--arch", "dit-full", *SHAPE, "--gpus", "2", "--activation-checkpointing", "none", "--out",
            str(out)]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert (out / "plan.txt").read_text() == text
    records = results.read_records(out)
    assert len(records) == 3 and all(r["predicted"] and r["world_size"] == 2 for r in records)
    assert main(argv) == 2 and "--resume" in capsys.readouterr().err
    assert main(argv + ["--resume"]) == 0 and len(results.read_records(out)) == 3  # nothing predicted twice
    assert capsys.readouterr().out == text


@pytest.mark.parametrize("args, message", [
    (["--gpus", "0"], "gpus: must be >= 1"),
    (["--gpus", "2", "--hardware", "cpu"], "hardware: unknown 'cpu'"),
    (["--gpus", "2", "--activation-checkpointing", "all"], "activation-checkpointing: 'all' is not legal"),
    (["--gpus", "2", "--resolution", "12"], "resolution: must be a multiple of 8"),
])
def test_bad_input_is_one_line(tmp_path, capsys, args, message):
    assert main(["plan", "--arch", "dit-full", "--mode", "full", *args, "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("stbench: error: ") and message in err and "\n" not in err
    assert not (tmp_path / "x").exists()


def test_hardware_has_a_link_model_for_layouts():
    assert isinstance(hardware.get("h100-sxm"), Hardware) and hardware.get("h100-sxm").link(8).bytes_s == 450e9
    assert hardware.get("h100-sxm").link(16).bytes_s == 50e9 and hardware.get("h100-sxm").link(1) is None
