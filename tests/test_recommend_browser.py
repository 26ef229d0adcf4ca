"""The recommendation in headless Chromium: rendered first, per family, with its figures beside it."""
from __future__ import annotations

import re

from test_report_browser import _browse, report  # noqa: F401 - the fixture is reused


def test_recommendation_renders_first_per_family(report, tmp_path):  # noqa: F811
    done = _browse(report, tmp_path, "--dump-dom")
    assert done.returncode == 0, done.stderr[-2000:]
    dom = done.stdout
    main = dom[dom.index("<main"):]
    first = re.search(r'<section id="([\w-]+)"', main).group(1)
    assert first == "recommendation"
    assert re.findall(r'data-family="(\w+)"', dom) == ["dit", "unet"]
    assert "train " in main[:main.index('id="environment"')]
    # UNet and DiT figures are separate: every scaling figure's title names one family
    titles = re.findall(r"Step time and memory vs \w+ \(([^)]*)\)", dom)
    assert titles and all(t.startswith(("UNETs", "DITs")) for t in titles)
