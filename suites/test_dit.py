"""The DiT attention family: full, 3D window, serial and parallel factorised, and DSV sparse attention."""


def test_dit(benchmark, stbench_case, run_stbench_case):
    record = run_stbench_case(stbench_case)
    assert record["saved_activations"] and record["param_bytes"]
