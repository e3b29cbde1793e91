"""``preftune report RUN_DIR``: a training run's curves, alarms and evaluation as one HTML page.

``write_report`` reads a run directory written by ``preftune train`` and writes a self-contained
``report.html`` (figures embedded, opens offline) plus each figure as a PNG under ``report/``.
"""

from .render import write_report
from .rundir import ReportError

__all__ = ["ReportError", "write_report"]
