"""The project as a newcomer meets it: the files the README names exist, the console script runs."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

# paths in backticks, e.g. `docs/design.md`, `reports/cpu/`, `scripts/setup.sh` (not commands, not RUN/...)
PATH_IN_BACKTICKS = re.compile(r"`((?:[a-z_.]+/)+[A-Za-z0-9_.-]*|[A-Za-z_]+\.(?:md|py|sh|toml))`")


def test_every_file_the_readme_names_exists():
    named = sorted(set(PATH_IN_BACKTICKS.findall((REPO / "README.md").read_text())))
    assert named, "the pattern found no path in README.md"
    missing = [p for p in named if not (REPO / p).exists()]
    assert not missing, f"README.md names files that do not exist: {missing}"


def test_console_script_is_python_dash_m_stbench():
    script = Path(sys.executable).parent / "stbench"
    if not script.exists():
        script = shutil.which("stbench")
        if script is None:
            pytest.skip("stbench is not installed as a package here (no console script)")
    # both at once: each spends most of its time importing, on a core of its own
    out, bad = [subprocess.Popen([str(script), "run", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True)
                for args in (["--help"], ["--arch", "no-such-net", "--out", "/nonexistent/x"])]
    (out_stdout, out_stderr), (_, bad_stderr) = out.communicate(timeout=120), bad.communicate(timeout=120)
    assert out.returncode == 0, out_stderr
    assert out_stdout.startswith("usage: stbench run")
    assert bad.returncode == 2 and bad_stderr.startswith("stbench: error: arch: unknown architecture")


def test_architectures_know_nothing_of_measuring():
    """DESIGN.md's layering: models never import stbench (not even lazily inside a function)."""
    import ast

    root = REPO / "architectures"
    offenders = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            offenders += [f"{path.relative_to(root.parent)}:{node.lineno}" for n in names if n.split(".")[0] == "stbench"]
    assert not offenders, offenders


def test_a_predict_exits_without_teardown_and_loses_nothing(tmp_path):
    """`python -m stbench predict` ends with os._exit (stbench.cli.console): what it printed into a pipe and the
    files it wrote are whole; bad input is still one line and exit code 2."""
    argv = [sys.executable, "-m", "stbench", "predict", "--arch", "dit-full", "--preset", "tiny", "--resolution", "32",
            "--frames", "2", "--hardware", "h100-sxm,cpu"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # a pipe's buffer, flushed or lost
    good, bad = [subprocess.Popen(argv + extra, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True)
                 for extra in (["--out", str(tmp_path / "p")], ["--batch", "0", "--out", str(tmp_path / "q")])]
    (stdout, stderr), (_, bad_stderr) = good.communicate(timeout=120), bad.communicate(timeout=120)
    assert good.returncode == 0, stderr
    assert [line.split()[0] for line in stdout.splitlines()] == ["ok", "ok"]
    assert stderr.rstrip().endswith(f"stbench: predictions -> {tmp_path / 'p' / 'results.jsonl'}")
    records = [json.loads(line) for line in (tmp_path / "p" / "results.jsonl").read_text().splitlines()]
    assert sorted(r["predicted"]["hardware"] for r in records) == ["cpu", "h100-sxm"]
    assert json.loads((tmp_path / "p" / "run.json").read_text())["command"].startswith("python -m stbench predict")
    assert bad.returncode == 2 and bad_stderr.count("\n") == 1 and bad_stderr.startswith("stbench: error: ")
