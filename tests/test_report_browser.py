"""The report in a real browser (headless Chromium): it loads offline, runs no failing script, shows its figures."""
from __future__ import annotations

import html as html_lib
import importlib.util
import os
import re
import subprocess
from pathlib import Path

import pytest

from stbench.report import browser
from stbench.report.__main__ import main

REPO = Path(__file__).resolve().parents[1]


def _chromium() -> str:
    path = browser.chromium()
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


def _browse(report: Path, tmp_path: Path, *args: str, height: int = 1000) -> subprocess.CompletedProcess:
    return browser.browse(report, tmp_path / "profile", *args, height=height, binary=_chromium())


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
    done = _browse(report, tmp_path, f"--screenshot={shot}", height=3000)
    assert done.returncode == 0 and shot.exists(), done.stderr[-2000:]
    image = Image.open(shot).convert("RGB")
    assert image.size == (1400, 3000)
    colors = image.getcolors(maxcolors=1 << 20)
    assert colors is None or len(colors) > 200  # text, tables and figures, not an empty or error page


@pytest.mark.parametrize("run", ["fixture", "reports/predict/fsdp-wan-14b", "reports/predict/frontier-sd15"])
def test_tables_fit_a_1400_px_page_without_horizontal_scrolling(run, report, tmp_path):
    path = report if run == "fixture" else tmp_path / "report.html"
    if run != "fixture":
        assert main([str(REPO / run), "-o", str(path)]) == 0
    metrics = browser.page_metrics(path, tmp_path / "profile", width=1400, binary=_chromium())
    assert metrics.get("data-loaded") == "1"
    assert int(metrics["data-scroll-width"]) <= int(metrics["data-client-width"]) <= 1400
    assert metrics["data-wide-tables"] == "0"


def test_a_table_wider_than_the_page_is_caught(report, tmp_path):
    wide = tmp_path / "wide.html"
    wide.write_text(report.read_text().replace("<main>", '<main><table><tr><td style="min-width: 3000px">x</td></tr>'
                                               "</table>", 1))
    metrics = browser.page_metrics(wide, tmp_path / "profile", width=1400, binary=_chromium())
    assert int(metrics["data-scroll-width"]) > 1400 and metrics["data-wide-tables"] == "1"
