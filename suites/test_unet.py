"""3D-UNet paradigms: serial (AnimateDiff), Mobius layer-parallel and ladder, ModelScope; temporal and full."""


def test_unet(benchmark, stbench_case, run_stbench_case):
    record = run_stbench_case(stbench_case)
    assert record["saved_activations"] and record["param_bytes"]
