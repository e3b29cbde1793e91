"""Writing a run directory's report: panels as PNG files, and one HTML page embedding them."""

from __future__ import annotations

import os
from pathlib import Path

from .page import render_page
from .panels import build_panels
from .plots import render_panel
from .online import online_figures
from .reward import reward_figures
from ..train.output import replacing_problem
from .rundir import ReportError, load_run

FIGURES_DIR = "report"
REPORT_FILE = "report.html"
MARKER = "<title>preftune report"  # in the head of every page written here




def write_report(run_dir: str | Path, output: str | Path | None = None) -> Path:
    """Write ``RUN_DIR/report/<panel>.png`` and the HTML report; return the HTML's path.

    The page goes to ``output`` if given (its folder made if missing), else
    ``RUN_DIR/report.html``; the PNG files always go under the run directory, next to the
    metrics they were drawn from.
    """
    run = load_run(run_dir)
    figures_dir = run.run_dir / FIGURES_DIR
    html_path = Path(output) if output is not None else run.run_dir / REPORT_FILE
    if output is not None and str(output).endswith(("/", os.sep)):  # a folder, written so
        html_path = html_path / REPORT_FILE
    problem = replacing_problem(html_path, "--output" if output is not None else
                                "the report's path", MARKER, ("a preftune report", "the report"),
                                REPORT_FILE)
    if problem:
        raise ReportError(problem)
    try:
        html_path.parent.mkdir(parents=True, exist_ok=True)
        figures_dir.mkdir(exist_ok=True)
        figures = []
        for panel in build_panels(run.metrics):
            png = render_panel(panel, run.alarms if panel.name == "loss" else None)
            file_name = f"{panel.name}.png"
            (figures_dir / file_name).write_bytes(png)
            figures.append((file_name, panel.title, png))
        reward = reward_figures(run.reward_eval) if run.reward_eval else []
        rounds = online_figures(run.online) if run.online else []
        for file_name, _, png in reward + rounds:
            (figures_dir / file_name).write_bytes(png)
        drawn = {name for name, _, _ in figures + reward + rounds}
        for stale in figures_dir.glob("*.png"):  # an earlier report's panel this one lacks
            if stale.name not in drawn:
                stale.unlink()
        html_path.write_text(render_page(run, figures, reward, rounds), encoding="utf-8")
    except OSError as error:
        raise ReportError(f"cannot write the report: {error}. The page goes to {html_path} "
                          f"(--output chooses the file) and the figures to {figures_dir}/: "
                          "both need a folder you can write to.") from None
    return html_path
