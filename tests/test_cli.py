"""`python -m stbench run`: bad input is one line and exit 2; --set is recorded; a killed sweep resumes."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest
import torch

from conftest import REPO, TOY_ARCH, stbench_command
from stbench import results, runfolder
from stbench.cli import main

RUN = ["run", "--arch", TOY_ARCH, "--frames", "2", "--resolution", "16", "--repeats", "2", "--no-progress"]


def _set_args(argv: list[str], flag: str, value: str) -> list[str]:
    argv = list(argv)
    if flag in argv:
        argv[argv.index(flag) + 1] = value
    else:
        argv += [flag, value]
    return argv


BAD_INPUTS = {
    "unknown arch": (["--arch", "no-such-net"], "arch: unknown architecture 'no-such-net'; legal:"),
    "unknown preset": (["--preset", "huge"], "preset: unknown preset 'huge' for toy-mlp; legal: tiny, small"),
    "resolution not x8": (["--resolution", "60"], "resolution: must be a multiple of 8, got 60"),
    "resolution not int": (["--resolution", "64,x"], "resolution: 'x' is not a size in pixels or HEIGHTxWIDTH"),
    "frames < 1": (["--frames", "0"], "frames: must be an integer >= 1, got 0"),
    "batch < 1": (["--batch", "1,0"], "batch: must be an integer >= 1, got 0"),
    "frames too many": (["--frames", "65"], "resolution/frames for toy-mlp: toy model takes at most 64 frames"),
    "set without =": (["--set", "hidden"], "--set 'hidden': expected KEY=VALUE"),
    "set unknown key": (["--set", "depth=3"], "--set depth: unknown field of ToyConfig; legal:"),
    "set wrong type": (["--set", "hidden=wide"], "--set hidden=wide: expected int"),
    "bad mode": (["--mode", "spatial"], "argument --mode: invalid choice: 'spatial'"),
    "warmup < 2": (["--warmup", "1"], "warmup: must be >= 2"),
    "bad device": (["--device", "tpu"], "device: 'tpu' is not legal; legal: cpu, cuda, cuda:N"),
    "repeats not int": (["--repeats", "many"], "argument --repeats: invalid int value: 'many'"),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_is_one_line_and_exit_2(name, capsys, tmp_path):
    changes, message = BAD_INPUTS[name]
    argv = RUN + ["--out", str(tmp_path / "run")]
    for flag, value in zip(changes[::2], changes[1::2]):
        argv = _set_args(argv, flag, value) if flag != "--set" else argv + [flag, value]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("stbench: error: " + message), err
    assert not (tmp_path / "run" / runfolder.RESULTS_FILE).exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_a_device_is_bad_input(capsys, tmp_path):
    assert main(RUN + ["--out", str(tmp_path), "--device", "cuda"]) == 2
    assert capsys.readouterr().err == "stbench: error: device: 'cuda' is not available on this machine " \
                                      "(no CUDA device); legal: cpu\n"


def test_context_parallel_without_torchrun_is_bad_input(capsys, tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    argv = ["run", "--arch", "dit-full", "--device", "cpu", "--context-parallel", "ulysses", "--out",
            str(tmp_path / "run")]
    assert main(argv) == 2
    assert capsys.readouterr().err == "stbench: error: --context-parallel: needs several processes; launch with " \
                                      "torchrun --nproc-per-node N -m stbench run ...\n"
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("content", [b"{not json\n{\"also\": \"bad\"}\n", b"\xff\xfe\x00garbage\n"])
def test_unreadable_results_on_resume(content, capsys, tmp_path):
    (tmp_path / runfolder.RESULTS_FILE).write_bytes(content)
    assert main(RUN + ["--out", str(tmp_path), "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("stbench: error: ") and "results" in err


def test_bad_input_through_the_real_command_line(tmp_path):
    done = subprocess.run(stbench_command(*RUN, "--resolution", "12", "--out", str(tmp_path)), cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.splitlines() == ["stbench: error: resolution: must be a multiple of 8, got 12"]


def test_set_overrides_the_config_and_is_recorded(tmp_path, capsys):
    assert main(RUN + ["--out", str(tmp_path / "a")]) == 0
    assert main(RUN + ["--out", str(tmp_path / "b"), "--set", "hidden=16", "--set", "text_dim=4"]) == 0
    [plain] = results.read_records(tmp_path / "a")
    [wide] = results.read_records(tmp_path / "b")
    assert plain["overrides"] == {} and wide["overrides"] == {"hidden": "16", "text_dim": "4"}
    assert (plain["params_total"], wide["params_total"]) == (4 * 8 + 8 + 8 * 4 + 4, 4 * 16 + 16 + 16 * 4 + 4)
    info = json.loads((tmp_path / "b" / "run.json").read_text())
    assert info["command"].startswith("python -m stbench run --arch toy-mlp")
    assert info["command"].endswith("--set hidden=16 --set text_dim=4")
    assert info["sweep"]["overrides"] == {"hidden": "16", "text_dim": "4"}


@pytest.mark.slow
def test_sigkilled_sweep_resumes_with_every_case_exactly_once(tmp_path):
    out = tmp_path / "run"
    path = out / runfolder.RESULTS_FILE
    args = [*RUN, "--batch", "1,2,3", "--resolution", "16,24", "--set", "sleep_ms=60", "--rounds", "1", "--out", str(out)]
    child = subprocess.Popen(stbench_command(*args), cwd=REPO, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (path.exists() and path.read_bytes().count(b"\n") >= 1):
            assert child.poll() is None, "the sweep ended before it could be killed"
            assert time.monotonic() < deadline, "no case was written in time"
            time.sleep(0.01)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait()
    assert child.returncode == -signal.SIGKILL
    written = path.read_text().splitlines()
    assert 1 <= len(written) < 6
    assert main([*args, "--resume"]) == 0  # in this process: a new interpreter would spend seconds importing
    lines = path.read_text().splitlines()
    records = [json.loads(line) for line in lines]  # every line is valid JSON
    assert len(records) == 6
    assert sorted((r["resolution"], r["batch"]) for r in records) == [(r, b) for r in (16, 24) for b in (1, 2, 3)]
    assert len({results.case_key(r) for r in records}) == 6
    assert all(r["status"] == "ok" for r in records)
    assert len(json.loads((out / "run.json").read_text())["invocations"]) == 2


@pytest.mark.slow
def test_ctrl_c_stops_cleanly_and_keeps_what_was_written(tmp_path):
    path = tmp_path / runfolder.RESULTS_FILE
    args = [*RUN, "--batch", "1,2,3,4", "--set", "sleep_ms=100", "--rounds", "1", "--out", str(tmp_path), "--isolate"]
    # its own process group, like a terminal's foreground job: Ctrl-C reaches the runner and its case child.
    # SIGINT's default action restored: a test run started in the background of a shell inherits it ignored
    child = subprocess.Popen(stbench_command(*args), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True, start_new_session=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while not (path.exists() and path.stat().st_size):
        assert child.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    time.sleep(0.3)  # into the next case's child
    os.killpg(child.pid, signal.SIGINT)
    _, err = child.communicate(timeout=60)
    assert child.returncode == 130
    assert err.splitlines()[-1] == "stbench: interrupted; results written so far are kept (rerun with --resume)"
    assert "Traceback" not in err
    records = results.read_records(tmp_path, strict=True)
    assert 1 <= len(records) < 4 and all(r["status"] == "ok" for r in records)


def test_unwritable_out_is_one_line_and_exit_2(capsys, tmp_path):
    blocked = tmp_path / "blocked"
    blocked.write_text("a file, not a folder")
    assert main(RUN + ["--out", str(blocked / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"stbench: error: out: cannot write into {blocked / 'run'}"), err
