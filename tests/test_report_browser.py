"""The report in a real browser (headless Chromium): it loads offline, runs no failing script, shows its figures."""
from __future__ import annotations

import html as html_lib
import importlib.util
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from stbench.report.__main__ import main

CANDIDATES = ("/usr/bin/chromium", "chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars")


def _chromium() -> str:
    for name in CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    if os.environ.get("STBENCH_REQUIRE_BROWSER") == "1":
        pytest.fail("STBENCH_REQUIRE_BROWSER=1 but no chromium binary was found (apt-get install -y chromium)")
    pytest.skip("no chromium binary (apt-get install -y chromium); set STBENCH_REQUIRE_BROWSER=1 to require it")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    spec = importlib.util.spec_from_file_location("fake_run", Path(__file__).parent / "fixtures" / "fake_run.py")
    fake_run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fake_run)
    run = fake_run.write_fake_run(tmp_path_factory.mktemp("browser") / "run", seed=0, torn=True)
    assert main([str(run)]) == 0
    return run / "report.html"


def _browse(report: Path, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    command = [_chromium(), *FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000",
               *args, report.as_uri()]
    return subprocess.run(command, capture_output=True, text=True, timeout=180)


def test_page_loads_without_errors_and_figures_have_size(report, tmp_path):
    done = _browse(report, tmp_path, "--dump-dom")
    assert done.returncode == 0, done.stderr[-2000:]
    body = re.search(r"<body(\s[^>]*)?>", done.stdout.split("</head>", 1)[-1])
    assert body, done.stdout[:500]
    attrs = {k: html_lib.unescape(v) for k, v in re.findall(r'([\w-]+)="([^"]*)"', body.group(1) or "")}
    assert attrs.get("data-loaded") == "1", "the load handler did not run"
    assert attrs.get("data-errors") == "", f"script errors: {attrs.get('data-errors')}"
    sizes = attrs["data-figure-sizes"].split()
    assert len(sizes) == report.read_text().count("<figure>") >= 4
    for size in sizes:
        width, height = map(int, size.split("x"))
        assert width > 100 and height > 100, f"a figure did not decode: {sizes}"


def test_screenshot_is_not_blank(report, tmp_path):
    from PIL import Image

    shot = tmp_path / "report.png"
    done = _browse(report, tmp_path, f"--screenshot={shot}", "--window-size=1400,3000")
    assert done.returncode == 0 and shot.exists(), done.stderr[-2000:]
    image = Image.open(shot).convert("RGB")
    assert image.size == (1400, 3000)
    colors = image.getcolors(maxcolors=1 << 20)
    assert colors is None or len(colors) > 200  # text, tables and figures, not an empty or error page
