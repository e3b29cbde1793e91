"""Run logging: one JSON line per logged step, and a progress bar on the terminal."""

from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

from tqdm.auto import tqdm

from ..data.records import DataError


class MetricsLog:
    """Appends metric records to ``metrics.jsonl`` and hands each to the experiment trackers
    (``tracking.Trackers``, when ``train.report_to`` names any); ``close`` ends them.

    On resume, lines past the checkpoint's step are dropped first, so the file always describes
    one consistent run rather than a run plus the replay of its lost tail.
    """

    def __init__(self, path: Path, keep_through_step: int = 0, trackers=None):
        self.path, self.trackers = path, trackers
        if keep_through_step:
            keep_through(path, keep_through_step)
        else:
            path.write_text("")

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
    """The records of one of a run's JSONL logs (``metrics.jsonl``, ``alarms.jsonl``,
    ``eval_generations.jsonl``), less a last line whose write was cut off (a run killed
    mid-write, or one still writing); a damaged line elsewhere is an error naming it."""
    records = []
    for number, line in enumerate(complete_lines(Path(path).read_text(encoding="utf-8")), 1):
        if not line:
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise DataError(f"{path}:{number}: not valid JSON ({error.msg}); the run writes one "
                            "record per line: fix or delete that line, then run again.") from None
    return records


def keep_through(path: Path, step: int) -> list[dict]:
    """A run log resumed from step ``step``'s checkpoint: without the records of later steps
    (the resumed run writes them again), replaced whole so that a kill leaves the old file or
    the new one, never half of either. Returns the records kept."""
    from ..data.rows import write_rows

    if not path.exists():  # (none was written: none is made)
        return []
    kept = [record for record in read_metrics(path) if record.get("step", 0) <= step]
    write_rows(path, kept)
    return kept


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


BARS_SHOWN = ContextVar("BARS_SHOWN", default=True)  # False inside ``bars_shown(False)``


@contextmanager
def bars_shown(shown: bool):
    """Progress bars drawn (True) or not while the block runs: ``show_progress=False`` of
    the API's trainers, for the reference pass and the others before the step bar too."""
    token = BARS_SHOWN.set(shown)
    try:
        yield
    finally:
        BARS_SHOWN.reset(token)


def progress_bar(total: int, description: str, initial: int = 0, disable: bool = False,
                 unit: str = "it", leave: bool = True):
    """A bar on stderr showing done/total, elapsed < time left and the rate in ``unit``/s
    (drawn by the process that ``speaks`` only, and not inside ``bars_shown(False)``)."""
    return tqdm(total=total, initial=initial, desc=description,
                disable=disable or not speaks() or not BARS_SHOWN.get(), unit=unit,
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
