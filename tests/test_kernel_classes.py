"""scripts/kernel_classes.py: a profiler trace's kernels and a fake step's ops grouped by the same classes."""
from __future__ import annotations

import gzip
import importlib.util
import json

import pytest

from conftest import REPO

SPEC = importlib.util.spec_from_file_location("kernel_classes", REPO / "scripts" / "kernel_classes.py")
kc = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(kc)


def test_profiler_and_fake_op_names_fall_in_the_same_class():
    pairs = [("aten::mm", "aten.mm.default"), ("aten::addmm", "aten.addmm.default"),
             ("aten::copy_", "aten.copy_.default"), ("aten::_to_copy", "aten._to_copy.default"),
             ("aten::_foreach_add_", "aten._foreach_add_.List"),
             ("aten::native_layer_norm", "aten.native_layer_norm.default"),
             ("aten::sum", "aten.sum.dim_IntList"), ("aten::mul", "aten.mul.Tensor"),
             ("aten::_scaled_dot_product_cudnn_attention_backward",
              "aten._scaled_dot_product_cudnn_attention_backward.default")]
    for profiled, fake in pairs:
        assert kc.op_class(profiled) == kc.op_class(fake), (profiled, fake)
    assert [kc.op_class(n) for n, _ in pairs] == [
        "gemm and convolution", "gemm and convolution", "copy and cast", "copy and cast",
        "optimizer (foreach/fused)", "norm", "reduction", kc.OTHER, "attention backward"]
    assert kc.op_class("aten::_scaled_dot_product_cudnn_attention") == "attention forward"
    assert kc.op_class("dsv.block_sparse_attention_backward") == "attention backward"


def test_measured_kernel_time_goes_to_the_op_that_launched_it_per_profiled_step(tmp_path):
    def op(name, ext):
        return {"cat": "cpu_op", "name": name, "ts": 0, "dur": 1, "args": {"External id": ext}}

    def kernel(ext, us, cat="kernel"):
        return {"cat": cat, "name": "k", "ts": 0, "dur": us, "args": {"External id": ext}}

    events = [{"cat": "user_annotation", "name": "ProfilerStep#3", "ts": 0, "dur": 4000},
              {"cat": "user_annotation", "name": "ProfilerStep#4", "ts": 5000, "dur": 6000},
              op("aten::mm", 1), op("aten::copy_", 2), op("aten::_foreach_mul_", 3),
              kernel(1, 1000), kernel(1, 3000), kernel(2, 500), kernel(3, 250), kernel(3, 250),
              kernel(9, 100, "gpu_memset")]
    path = tmp_path / "trace.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events}, f)
    ms, count, step_ms, steps = kc.measured(path)
    assert steps == 2 and step_ms == pytest.approx(5.0)  # (4 + 6) ms / 2 steps
    assert ms == pytest.approx({"gemm and convolution": 2.0, "copy and cast": 0.25,
                                "optimizer (foreach/fused)": 0.25, "fill and zero": 0.05})
    assert count == {"gemm and convolution": 1.0, "copy and cast": 0.5, "optimizer (foreach/fused)": 1.0,
                     "fill and zero": 0.5}
