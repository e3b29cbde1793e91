"""Render a run's report.html in headless Chromium, offline, and save a screenshot.

    python scripts/check_report.py RUN_DIR [--screenshot FILE] [--size 1400x3000]

Writes the report first if RUN_DIR has none. Chromium runs with every host name unresolvable,
so the screenshot shows what a reader without network access sees: if the page depended on
anything outside the file, it would be missing from the picture. Needs a Chromium binary
(Debian: ``apt-get install chromium``; or set CHROMIUM to its path). Prints the screenshot's
path and how many distinct colours it has (a blank page has one or two).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
    """The Chromium to use: $CHROMIUM if set, else the first known name on PATH."""
    if os.environ.get("CHROMIUM"):
        return os.environ["CHROMIUM"]
    return next((path for path in map(shutil.which, BROWSERS) if path), None)


def screenshot(html: Path, output: Path, size: str = "1400x3000", timeout: float = 60) -> Path:
    """Take a screenshot of ``html`` (a local file) at ``size`` (WIDTHxHEIGHT pixels)."""
    browser = find_chromium()
    if browser is None:
        raise RuntimeError("no Chromium found: apt-get install chromium, or set CHROMIUM")
    width, height = size.lower().split("x")
    with tempfile.TemporaryDirectory() as profile:
        command = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                   "--no-first-run", f"--user-data-dir={profile}",
                   "--host-resolver-rules=MAP * ~NOTFOUND",  # offline: no name resolves
                   f"--window-size={width},{height}", f"--screenshot={output.resolve()}",
                   html.resolve().as_uri()]
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0 or not output.is_file():
        raise RuntimeError(f"Chromium failed (exit {done.returncode}): {done.stderr[-2000:]}")
    return output


def distinct_colours(png: Path) -> int:
    """How many different RGB colours the image has: a rendered report has thousands."""
    from PIL import Image

    with Image.open(png) as image:
        return len(image.convert("RGB").getcolors(maxcolors=1 << 24))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--screenshot", type=Path,
                        help="where to save the PNG (default: RUN_DIR/report_screenshot.png)")
    parser.add_argument("--size", default="1400x3000", help="window WIDTHxHEIGHT in pixels")
    args = parser.parse_args(argv)

    html = args.run_dir / "report.html"
    if not html.is_file():
        from preftune.report import write_report

        write_report(args.run_dir)
    output = args.screenshot or args.run_dir / "report_screenshot.png"
    try:
        screenshot(html, output, args.size)
    except (RuntimeError, subprocess.TimeoutExpired) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"screenshot: {output} ({distinct_colours(output)} distinct colours)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
