"""diffusers' production video transformers (Wan2.1, CogVideoX, HunyuanVideo, LTX-Video, Latte), each at its own shape."""


def test_video_transformer(benchmark, stbench_case, run_stbench_case):
    record = run_stbench_case(stbench_case)
    assert record["saved_activations"] and record["param_bytes"]
