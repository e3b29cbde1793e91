"""Reading a training run directory into plain Python values for the report.

Only ``metrics.jsonl`` is required: a report of a run that is still training (no ``run.json``
yet), or of a run without alarms or evaluation, is still worth having. Anything that is present
but unreadable is an error naming the file (and line), never silently skipped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..config_tree import read_utf8


class ReportError(Exception):
    """A run directory that cannot be reported on; the message says which file and what to do."""


@dataclass
class RunData:
    """Everything the report shows, as read from one run directory."""

    run_dir: Path
    metrics: list[dict]
    alarms: list[dict] = field(default_factory=list)
    run_info: dict | None = None
    data_report: dict | None = None
    config_text: str | None = None
    eval_results: dict | None = None
    reward_eval: dict | None = None  # rm_eval.json of a reward model (preftune rm eval)
    online: dict | None = None  # online.json of a preftune online run
    samples: dict | None = None  # samples/samples.json: before/after image grids (diffusion)
    answers: list[dict] = field(default_factory=list)  # eval_generations.jsonl


def load_run(run_dir: str | Path) -> RunData:
    """Read ``run_dir``; raise :class:`ReportError` if it has no usable ``metrics.jsonl``."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir} is not a directory: pass the output_dir of a "
                          "`preftune train` run (the folder that holds metrics.jsonl)")
    online = _checked_online(run_dir / "online.json")
    metrics_path = run_dir / "metrics.jsonl"
    if online is None and (run_dir / "leaderboard.json").is_file():
        raise ReportError(f"{run_dir} is the output of preftune compare: its leaderboard is "
                          f"{run_dir / 'leaderboard.md'}, and each objective's run has its own "
                          f"report (preftune report {run_dir}/OBJECTIVE)")
    if online is None and (run_dir / "round-1").is_dir():
        raise ReportError(f"{run_dir} is an online run whose first round has not finished: "
                          "online.json, which the report reads, is written after each round; "
                          "run the report again then")
    if online is not None:  # the rounds' training metrics, one after another
        from .online import joined_metrics, rounds_run_info

        metrics, alarms = joined_metrics(run_dir, online, read_jsonl, _alarms)
        if not metrics:
            rounds = online["rounds"]
            trained = [r["round"] for r in rounds if "skipped" not in r.get("train", {
                "skipped": True})]
            raise ReportError(
                f"{run_dir}/online.json: no round has trained yet; run the report again after "
                "the first round's training" if not rounds else
                f"{run_dir}/online.json says round {trained[0]} trained, and "
                f"{run_dir}/round-{trained[0]} holds no metrics.jsonl: was it moved or "
                "deleted?" if trained else
                f"{run_dir}/online.json: none of its {len(rounds)} rounds trained ("
                + "; ".join(f"round {r['round']}: "
                            f"{r.get('train', {}).get('skipped', 'no training data')}"
                            for r in rounds) + "), so there is no training curve to draw")
        config_path = run_dir / "config.yaml"
        return RunData(run_dir=run_dir, metrics=metrics, alarms=alarms, online=online,
                       run_info=rounds_run_info(run_dir, online, _optional_json),
                       config_text=_text(config_path) if config_path.is_file() else None)
    if not metrics_path.is_file():
        raise ReportError(f"{metrics_path} not found: is {run_dir} the output_dir of a "
                          "`preftune train` run? Metrics appear there after the first logged step")
    metrics = read_jsonl(metrics_path)
    if not metrics:
        raise ReportError(f"{metrics_path} has no steps yet: wait for the first logged step "
                          "(train.log_every) and run the report again")
    for number, record in enumerate(metrics, start=1):
        if not isinstance(record.get("step"), int):
            raise ReportError(f"{metrics_path}:{number}: record has no integer 'step' field")
    config_path = run_dir / "config.yaml"
    return RunData(
        run_dir=run_dir,
        metrics=metrics,
        alarms=_alarms(run_dir / "alarms.jsonl", metrics),
        run_info=_optional_json(run_dir / "run.json"),
        data_report=_optional_json(run_dir / "data_report.json"),
        config_text=_text(config_path) if config_path.is_file() else None,
        eval_results=_optional_json(run_dir / "eval.json"),
        reward_eval=_optional_json(run_dir / "rm_eval.json"),
        samples=_optional_json(run_dir / "samples" / "samples.json"),
        answers=_checked_answers(run_dir / "eval_generations.jsonl"),
    )


def read_jsonl(path: Path) -> list[dict]:
    """The JSON objects in ``path``, one per non-blank line; a bad line is named by number
    (a last line still being written is left out: the report works on a running run)."""
    from ..train.logging import complete_lines

    records = []
    for number, line in enumerate(complete_lines(_text(path)), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ReportError(f"{path}:{number}: not valid JSON ({error.msg}); fix or delete "
                              "that line and run the report again") from None
        if not isinstance(record, dict):
            raise ReportError(f"{path}:{number}: expected a JSON object, got "
                              f"{type(record).__name__}")
        records.append(record)
    return records


def _checked_online(path: Path) -> dict | None:
    """``online.json``, with a list of rounds each numbered, or an error naming the field."""
    online = _optional_json(path)
    if online is None:
        return None
    rounds = online.get("rounds")
    if not isinstance(rounds, list):
        raise ReportError(f"{path}: field 'rounds' should be a list of rounds, got "
                          f"{type(rounds).__name__}; the run writes it: fix or remove the file")
    for number, info in enumerate(rounds):
        if not isinstance(info, dict) or not isinstance(info.get("round"), int):
            raise ReportError(f"{path}: rounds[{number}] should be an object with an integer "
                              "'round'; the run writes it: fix or remove the file")
    return online


def _checked_answers(path: Path) -> list[dict]:
    """``eval_generations.jsonl``'s rows, each with the fields the report reads."""
    if not path.is_file():
        return []
    rows = read_jsonl(path)
    for number, row in enumerate(rows, start=1):
        missing = [key for key in ("step", "origin", "prompt") if key not in row]
        if missing:
            raise ReportError(f"{path}:{number}: field {missing[0]!r} is missing; each row of "
                              "held-out answers has step, origin, prompt and its answers")
    return rows


def _text(path: Path) -> str:
    """A run file's text; bytes that are not UTF-8 are named by file and line."""
    return read_utf8(path, ReportError, "the run writes UTF-8: fix or remove that part and run "
                                       "the report again")


def _optional_json(path: Path) -> dict | None:
    """The JSON object in ``path``, or None when the file does not exist."""
    if not path.is_file():
        return None
    try:
        value = json.loads(_text(path))
    except json.JSONDecodeError as error:
        raise ReportError(f"{path}: not valid JSON (line {error.lineno}: {error.msg}); fix or "
                          "remove the file and run the report again") from None
    if not isinstance(value, dict):
        raise ReportError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def _alarms(path: Path, metrics: list[dict]) -> list[dict]:
    """Fired alarms, sorted by step: ``alarms.jsonl`` plus any kinds only the metrics record.

    The loop writes both, but ``alarms.jsonl`` is appended to across resumes while
    ``metrics.jsonl`` is truncated to the resumed step, so neither alone is complete.
    """
    alarms = read_jsonl(path) if path.is_file() else []
    for number, alarm in enumerate(alarms, start=1):
        if not isinstance(alarm.get("step"), int) or not isinstance(alarm.get("kind"), str):
            raise ReportError(f"{path}: alarm {number} needs an integer 'step' and a 'kind'")
    seen = {(alarm.get("step"), alarm.get("kind")) for alarm in alarms}
    for record in metrics:
        for kind in record.get("alarms", []):
            if (record["step"], kind) not in seen:
                alarms.append({"kind": kind, "step": record["step"], "message": ""})
                seen.add((record["step"], kind))
    return sorted(alarms, key=lambda alarm: (alarm["step"], alarm["kind"]))
