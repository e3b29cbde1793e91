"""Run logging: one JSON line per logged step, and a progress bar on the terminal."""

from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path

from tqdm.auto import tqdm


class MetricsLog:
    """Appends metric records to ``metrics.jsonl`` and hands each to the experiment trackers
    (``tracking.Trackers``, when ``train.report_to`` names any); ``close`` ends them.

    On resume, lines past the checkpoint's step are dropped first, so the file always describes
    one consistent run rather than a run plus the replay of its lost tail.
    """

    def __init__(self, path: Path, keep_through_step: int = 0, trackers=None):
        self.path, self.trackers = path, trackers
        kept = []
        if keep_through_step and path.exists():
            kept = [json.dumps(record) for record in read_metrics(path)
                    if record.get("step", 0) <= keep_through_step]
        path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.trackers is not None:
            self.trackers.log(record)

    def close(self, status: str = "FINISHED") -> None:
        """End the trackers' runs (``status``: FINISHED, FAILED, KILLED; see ``Trackers``)."""
        if self.trackers is not None:
            self.trackers.finish(status)


def read_metrics(path: Path) -> list[dict]:
    """The records of ``metrics.jsonl``, less a last line whose write was cut off (a run
    killed mid-write, or one still writing)."""
    return [json.loads(line) for line in complete_lines(Path(path).read_text()) if line]


def complete_lines(text: str) -> list[str]:
    """The lines of a JSONL file that an appending writer finished: without an unterminated
    last line that does not parse."""
    lines = text.splitlines()
    if lines and not text.endswith("\n"):
        try:
            json.loads(lines[-1])
        except json.JSONDecodeError:
            lines.pop()
    return lines


def speaks() -> bool:
    """Whether this process prints: the only one, or the first of a launch (``RANK`` 0)."""
    return int(os.environ.get("RANK", "0")) == 0


def progress_bar(total: int, description: str, initial: int = 0, disable: bool = False,
                 unit: str = "it", leave: bool = True):
    """A bar on stderr showing done/total, elapsed < time left and the rate in ``unit``/s
    (drawn by the process that ``speaks`` only)."""
    return tqdm(total=total, initial=initial, desc=description, disable=disable or not speaks(),
                unit=unit,
                dynamic_ncols=True, file=sys.stderr, leave=leave)


@contextmanager
def progress(description: str | None, total: int, unit: str = "it", leave: bool = True):
    """``update(n)`` of a progress bar shown while the block runs; with no ``description``,
    an ``update`` that shows nothing (for callers that run inside another bar's work)."""
    if description is None:
        yield lambda n=1: None
        return
    bar = progress_bar(total, description, unit=unit, leave=leave)
    try:
        yield bar.update
    finally:
        bar.close()


def quiet_deepspeed_on_cpu() -> None:
    """DeepSpeed, where installed, says "Setting accelerator to CPU" when it is imported on a
    machine without a GPU, and transformers and accelerate import it at every model save only to
    look for its engine, so every CPU run would end with that warning."""
    import logging

    logging.getLogger("DeepSpeed").addFilter(_not_the_cpu_notice)  # once: the same function


def _not_the_cpu_notice(record) -> bool:
    return not record.getMessage().startswith("Setting accelerator to CPU")
