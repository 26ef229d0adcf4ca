"""Case and Sweep validation, --set parsing by field type, case identity."""
from __future__ import annotations

from dataclasses import dataclass

import pytest

from conftest import TOY_ARCH, ToyConfig
from stbench import results
from stbench.config import Case, Sweep, parse_override_value, parse_set_options
from stbench.errors import UserError


@dataclass(frozen=True)
class Typed:
    """Every field type a model config may use."""

    depth: int = 1
    ratio: float = 1.0
    flag: bool = False
    name: str = "a"
    widths: tuple[int, ...] = (1,)
    window: int | None = None


@pytest.mark.parametrize("key, text, value", [
    ("depth", "3", 3), ("ratio", "0.25", 0.25), ("flag", "true", True), ("flag", "0", False),
    ("name", "dsv", "dsv"), ("widths", "32,64, 128", (32, 64, 128)), ("window", "none", None), ("window", "7", 7),
])
def test_override_values_are_typed_by_field(key, text, value):
    assert parse_override_value(Typed, key, text) == value


@pytest.mark.parametrize("key, text, message", [
    ("depth", "two", "--set depth=two: expected int"), ("flag", "maybe", "--set flag=maybe: expected bool"),
    ("widths", "1,x", "--set widths=1,x: expected comma-separated int values"), ("nope", "1", "--set nope: unknown field of Typed"),
])
def test_bad_override_values_name_the_field(key, text, message):
    with pytest.raises(UserError, match="^" + message.replace(".", r"\.")):
        parse_override_value(Typed, key, text)


def test_parse_set_options_sorts_and_last_wins():
    assert parse_set_options(["b=2", "a=1,2", "b=3"]) == (("a", "1,2"), ("b", "3"))
    for bad in ("novalue=", "=1", "plain"):
        with pytest.raises(UserError, match="expected KEY=VALUE"):
            parse_set_options([bad])


def test_case_applies_overrides_and_names_itself():
    case = Case(TOY_ARCH, frames=2, resolution=16, overrides=(("hidden", "12"),))
    assert case.model_config() == ToyConfig(hidden=12)
    identity = case.identity()
    assert identity["overrides"] == {"hidden": "12"} and identity["arch"] == TOY_ARCH
    record = results.new_record(identity)
    assert set(results.RECORD_FIELDS) <= set(record) and record["world_size"] == 1
    other = results.new_record(Case(TOY_ARCH, frames=2, resolution=16).identity())
    assert results.case_key(record) != results.case_key(other)
    assert results.case_slug(record) == "toy-mlp-tiny-temporal-r16-f2-b1-fp32-cpu-hidden=12"


@pytest.mark.parametrize("fields, message", [
    ({"arch": "nope"}, "arch: unknown architecture 'nope'"),
    ({"preset": "huge"}, "preset: unknown preset 'huge'"),
    ({"mode": "spatial"}, "mode: 'spatial' is not legal; legal: temporal, full"),
    ({"batch": 0}, "batch: must be an integer >= 1"),
    ({"frames": -1}, "frames: must be an integer >= 1"),
    ({"resolution": 20}, "resolution: must be a multiple of 8"),
    ({"dtype": "fp8"}, "dtype: 'fp8' is not legal"),
    ({"device": "tpu"}, "device: 'tpu' is not legal"),
    ({"device": "cuda:x"}, "device: 'cuda:x' is not legal; legal: cpu, cuda, cuda:N"),
    ({"context_parallel": "ring"}, "context_parallel: 'ring' is not legal for toy-mlp"),
    ({"frames": 65}, "resolution/frames for toy-mlp: toy model takes at most 64 frames"),
])
def test_case_validation_names_field_and_legal_values(fields, message):
    with pytest.raises(UserError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        Case(**{"arch": TOY_ARCH, **fields})


def test_sweep_is_the_grid_in_order():
    sweep = Sweep(archs=(TOY_ARCH,), resolutions=(16, 32), frames=(2, 4), batches=(1, 2), repeats=3)
    assert len(sweep.cases) == 8
    assert [(c.resolution, c.frames, c.batch) for c in sweep.cases[:3]] == [(16, 2, 1), (16, 2, 2), (16, 4, 1)]
    assert all(c.arch == TOY_ARCH for c in sweep.cases)
    with pytest.raises(UserError, match="^warmup: must be >= 2"):
        Sweep(archs=(TOY_ARCH,), warmup=1)
    with pytest.raises(UserError, match="^repeats: must be >= 1"):
        Sweep(archs=(TOY_ARCH,), repeats=0)
    with pytest.raises(UserError, match="^batches: needs at least one value"):
        Sweep(archs=(TOY_ARCH,), batches=())
