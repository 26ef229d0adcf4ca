"""A report in headless Chromium: its page metrics and a screenshot at a given width.

`python -m stbench.report.browser REPORT.html [-o SHOT.png] [--width 1400] [--height H]` writes the screenshot
(default: the page's full height, up to MAX_HEIGHT) and prints the page's scroll width against the window's.
Chromium is found on PATH (apt-get install -y chromium); none found is a one-line error.
"""
from __future__ import annotations

import argparse
import html as html_lib
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from ..errors import UserError

CANDIDATES = ("/usr/bin/chromium", "chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars")
WIDTH = 1400
MAX_HEIGHT = 16000  # a taller page is cut here: PNGs of a whole long report get large


def chromium() -> str | None:
    for name in CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    return None


def browse(report: Path, profile: Path, *args: str, width: int = WIDTH, height: int = 1000,
           binary: str | None = None) -> subprocess.CompletedProcess:
    binary = binary or chromium()
    if binary is None:
        raise UserError("no chromium binary found (apt-get install -y chromium)")
    command = [binary, *FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=10000",
               f"--window-size={width},{height}", *args, Path(report).resolve().as_uri()]
    return subprocess.run(command, capture_output=True, text=True, timeout=180)


def page_metrics(report: Path, profile: Path, width: int = WIDTH, binary: str | None = None) -> dict[str, str]:
    """The attributes the report's load handler sets on <body> (data-scroll-width, data-page-height, ...)."""
    done = browse(report, profile, "--dump-dom", width=width, binary=binary)
    if done.returncode != 0:
        raise UserError(f"chromium failed on {report}: {done.stderr.strip().splitlines()[-1:]}")
    body = re.search(r"<body(\s[^>]*)?>", done.stdout.split("</head>", 1)[-1])
    attrs = body.group(1) or "" if body else ""
    return {k: html_lib.unescape(v) for k, v in re.findall(r'([\w-]+)="([^"]*)"', attrs)}


def screenshot(report: Path, out: Path, width: int = WIDTH, height: int | None = None) -> dict[str, str]:
    """Write a PNG of `report` at `width` px (the whole page up to MAX_HEIGHT unless `height`); its metrics."""
    with tempfile.TemporaryDirectory() as tmp:
        metrics = page_metrics(report, Path(tmp) / "a", width)
        tall = height or min(int(metrics.get("data-page-height") or 3000), MAX_HEIGHT)
        done = browse(report, Path(tmp) / "b", f"--screenshot={Path(out).resolve()}", width=width, height=tall)
    if done.returncode != 0 or not Path(out).exists():
        raise UserError(f"chromium wrote no screenshot of {report}: {done.stderr.strip().splitlines()[-1:]}")
    from PIL import Image  # noqa: local - matplotlib's own dependency, needed only here

    with Image.open(out) as shot:  # 256 colours: text, tables and flat-coloured figures, a third of the bytes
        small = shot.convert("RGB").quantize(colors=256)
    small.save(out, optimize=True)
    return {**metrics, "height": str(tall)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="stbench.report.browser", description=__doc__.splitlines()[0])
    parser.add_argument("report", type=Path)
    parser.add_argument("-o", "--output", type=Path, help="PNG to write (default: REPORT with .png)")
    parser.add_argument("--width", type=int, default=WIDTH)
    parser.add_argument("--height", type=int, default=None, help="window height (default: the page's height)")
    args = parser.parse_args(argv)
    try:
        out = args.output or args.report.with_suffix(".png")
        metrics = screenshot(args.report, out, args.width, args.height)
    except UserError as e:
        print(f"stbench.report.browser: error: {e}", file=sys.stderr)
        return 2
    print(f"{out}: {args.width}x{metrics['height']} px; page scroll width {metrics.get('data-scroll-width')} px "
          f"(window {metrics.get('data-client-width')} px), tables wider than their box: "
          f"{metrics.get('data-wide-tables')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
