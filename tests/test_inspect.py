"""`python -m stbench inspect`: the table, one-line errors, and exact saved-activation bytes on the meta device."""
import pytest
import torch

import architectures
from stbench.cli import main
from stbench.inspect import count_parameters, saved_bytes_by_group


def test_inspect_prints_a_row_per_arch(capsys):
    code = main(["inspect", "--arch", "serial-unet,mobius-ladder-unet", "--preset", "tiny", "--resolution", "64",
                 "--frames", "4", "--batch", "1", "--mode", "temporal"])
    out = capsys.readouterr().out
    assert code == 0
    header, serial, ladder = out.strip().splitlines()[1:]
    assert "saved temporal" in header and "vs first" in header
    assert serial.startswith("serial-unet") and serial.endswith("1.000x")
    assert ladder.startswith("mobius-ladder-unet")


def test_inspect_params_only_on_meta(capsys):
    assert main(["inspect", "--arch", "serial-unet", "--preset", "sd15", "--device", "meta", "--params-only"]) == 0
    row = capsys.readouterr().out.strip().splitlines()[-1].split()
    assert row[:4] == ["serial-unet", "1312.73M", "859.52M", "453.21M"]


@pytest.mark.parametrize("argv, message", [
    (["--arch", "no-such-arch"], "unknown architecture 'no-such-arch'"),
    (["--arch", "serial-unet", "--resolution", "72"], "multiple of 16"),
    (["--arch", "serial-unet", "--mode", "sideways"], "mode"),
    (["--arch", "serial-unet", "--device", "tpu"], "--device"),
    (["--arch", "serial-unet", "--set", "no_such_field=1"], "no_such_field"),
])
def test_bad_input_is_one_line_exit_2(capsys, argv, message):
    assert main(["inspect", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("stbench: error: ") and message in err and err.count("\n") == 1


@pytest.mark.parametrize("name", ["serial-unet", "mobius-ladder-unet"])
def test_meta_device_counts_the_same_bytes_as_cpu(name):
    """Shapes are all the counter needs: meta (no memory) must give exactly the CPU bytes, per group too."""
    counts = {}
    for device in ("cpu", "meta"):
        torch.manual_seed(0)
        model = architectures.build(name, "tiny", device=device).set_training_mode("temporal")
        batch = model.make_batch(1, 4, 64, 64, device=device)
        counts[device] = saved_bytes_by_group(model, lambda: model.loss(batch))
    assert counts["cpu"] == counts["meta"] and counts["cpu"]["total"] > 0


def test_count_parameters_follows_training_mode():
    model = architectures.build("serial-unet", "tiny").set_training_mode("temporal")
    counts = count_parameters(model)
    assert counts["total"] == counts["spatial"] + counts["temporal"] == sum(p.numel() for p in model.parameters())
    assert counts["trainable"] == counts["temporal"]
    assert count_parameters(model.set_training_mode("full"))["trainable"] == counts["total"]
