"""The project as a newcomer meets it: the files the README names exist, the console script runs."""
from __future__ import annotations

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
