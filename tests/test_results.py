"""The record schema and pandas as the one reader: values come back exactly as written."""
from __future__ import annotations

from stbench import results, runfolder


def _record(**fields):
    record = results.new_record(dict(arch="toy-mlp", preset="tiny", mode="full", batch=1, frames=2, resolution=16,
                                     dtype="fp32", device="cpu"))
    record.update(status="ok", **fields)
    return record


def test_load_frame_keeps_exact_integers_and_none(tmp_path):
    path = tmp_path / runfolder.RESULTS_FILE
    results.append_record(path, _record(flops_per_step=3_648_790_528, saved_activations=18_381_248,
                                        step_ms_samples=[1.5, 2.5]))
    results.append_record(path, _record(batch=2, flops_per_step=None))
    first, second = results.frame_records(results.load_frame(tmp_path))
    assert first["flops_per_step"] == 3_648_790_528 and type(first["flops_per_step"]) is int
    assert first["saved_activations"] == 18_381_248 and first["step_ms_samples"] == [1.5, 2.5]
    assert second["flops_per_step"] is None and second["peak_allocated"] is None


def test_identity_fields_are_derived_from_the_schema():
    assert results.IDENTITY_FIELDS[:4] == ("arch", "preset", "overrides", "mode")
    assert set(results.SHAPE_FIELDS) == {"batch", "frames", "resolution", "height", "width"}
    assert "arch" not in results.MATCH_FIELDS and "overrides" not in results.MATCH_FIELDS
    assert not set(results.SHAPE_FIELDS) & set(results.GROUP_FIELDS)
    assert set(results.RECORD_FIELDS) >= {"rank_step_ms_median", "rank_comm_bytes", "train", "predicted"}
