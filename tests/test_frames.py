"""Non-square frames (`--resolution HEIGHTxWIDTH`): every family trains a step on them, square cases keep their
keys, and a bad size is one line `stbench: error: ...` with exit code 2."""
from __future__ import annotations

import json

import pytest

import architectures
from stbench.cli import main
from stbench.config import Case
from stbench.errors import UserError
from stbench.overrides import resolution_list
from stbench.step import TrainingStep

# one tiny architecture per family, at a legal (frames, height, width) with height != width
NON_SQUARE = {"serial-unet": (4, 32, 64), "mobius-unet": (4, 32, 64), "modelscope-unet": (4, 32, 64),
              "dit-full": (4, 32, 64), "wan": (5, 32, 64), "cogvideox": (5, 32, 64), "hunyuan-video": (5, 32, 64),
              "ltx-video": (9, 64, 128), "latte": (8, 32, 64), "mochi": (7, 32, 64)}


@pytest.mark.parametrize("arch", sorted(NON_SQUARE))
def test_non_square_frames_train_a_step_in_every_family(arch):
    frames, height, width = NON_SQUARE[arch]
    case = Case(arch=arch, mode="full", frames=frames, resolution=height, width=width)
    step = TrainingStep(case)
    model = step.model
    assert step.batch.latents.shape[-2:] == (height // model.spatial_compression, width // model.spatial_compression)
    before = [p.detach().clone() for p in step.trainable]
    loss = step()
    assert loss == loss  # finite and not NaN
    assert any(not (p == b).all() for p, b in zip(step.trainable, before))


def test_every_family_is_covered():
    assert {architectures.get(a).family for a in NON_SQUARE} == {architectures.get(a).family
                                                                for a in architectures.names()}


def test_square_cases_keep_their_keys_and_non_square_ones_are_new():
    square = Case(arch="wan", mode="full", frames=5, resolution=64)
    assert Case(arch="wan", mode="full", frames=5, resolution=64, width=64) == square
    assert '"height"' not in square.key and '"width"' not in square.key  # the key records had before HxW
    old_record = {**square.identity(), "height": None, "width": None}  # a record written before height/width
    from stbench.results import case_key, resolution_label

    assert case_key(old_record) == square.key
    wide = Case(arch="wan", mode="full", frames=5, resolution=32, width=64)
    assert wide.key != Case(arch="wan", mode="full", frames=5, resolution=32).key
    assert (wide.identity()["height"], wide.identity()["width"], wide.resolution_label) == (32, 64, "32x64")
    assert resolution_label(wide.identity()) == "32x64" and resolution_label(square.identity()) == "64"
    assert "r32x64" in wide.slug


def test_records_written_before_height_and_width_read_as_square(tmp_path):
    from stbench.results import case_key, read_records, SCHEMA_VERSION

    case = Case(arch="wan", mode="full", frames=5, resolution=64)
    old = {k: v for k, v in case.identity().items() if k not in ("height", "width")}
    (tmp_path / "results.jsonl").write_text(json.dumps({**old, "schema": SCHEMA_VERSION, "status": "ok"}) + "\n")
    (read,) = read_records(tmp_path / "results.jsonl")
    assert (read["height"], read["width"]) == (64, 64)  # as a square record written today
    assert case_key(read) == case_key(old) == case.key


def test_resolution_lists_parse_squares_and_height_by_width():
    assert resolution_list("64, 480x832,96X96") == (64, (480, 832), 96)


@pytest.mark.parametrize("text, message", [
    ("480x", "resolution: '480x' is not a size in pixels or HEIGHTxWIDTH (e.g. 64 or 480x832)"),
    ("axb", "resolution: 'axb' is not a size in pixels or HEIGHTxWIDTH"),
    ("32x48x2", "resolution: '32x48x2' is not a size"),
    ("32x72", "resolution/frames for wan: width must be a multiple of 16 (VAE /8, patch 2), got 72"),
    ("36x64", "resolution: must be a multiple of 8, got 36x64"),
])
def test_bad_resolutions_are_one_line_and_exit_2(capsys, tmp_path, text, message):
    for command in (["run", "--out", str(tmp_path / "r")],
                    ["predict", "--hardware", "cpu", "--out", str(tmp_path / "p")],
                    ["plan", "--gpus", "2", "--out", str(tmp_path / "l")]):
        argv = [command[0], "--arch", "wan", "--mode", "full", "--frames", "5", "--resolution", text, *command[1:]]
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and err.startswith("stbench: error: ") and message in err, (argv, err)


def test_run_records_height_and_width(tmp_path):
    out = tmp_path / "run"
    assert main(["run", "--arch", "wan", "--mode", "full", "--frames", "5", "--resolution", "32x64",
                 "--repeats", "1", "--warmup", "2", "--out", str(out)]) == 0
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [(r["resolution"], r["height"], r["width"], r["status"]) for r in records] == [(32, 32, 64, "ok")]


def test_a_width_alone_is_checked_like_a_resolution():
    with pytest.raises(UserError, match="width: must be an integer >= 1, got 0"):
        Case(arch="wan", mode="full", frames=5, resolution=32, width=0)
