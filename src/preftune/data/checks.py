"""Checkable tasks as data: a ``Task`` (instruction, chosen, rejected, and the JSON spec of
its checker), the checkers themselves, and the JSONL round trip (``write_jsonl`` /
``load_checker``) that lets ``preftune eval`` and the scorers check answers later.
``synthetic.py`` generates the tasks."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import Callable

# ----------------------------------------------------------------------------- checkers

_EDGE = " \t\r\n\"'`*.!,;:"


def _norm(text: str) -> str:
    """Strip whitespace, quotes, markdown emphasis and end punctuation; lowercase."""
    return text.strip().strip(_EDGE).strip().lower()


def _has_word(text: str, word: str) -> bool:
    pattern = r"(?<![A-Za-z])" + re.escape(word.lower()) + r"(?![A-Za-z])"
    return re.search(pattern, text.lower()) is not None


def _check_exact(text: str, answer: str) -> bool:
    """The response is the answer alone (case, surrounding quotes and a final period ignored)."""
    return _norm(text) == answer.lower()


def _check_caps(text: str, word: str) -> bool:
    """The response is ``word`` in upper case and nothing else."""
    return text.strip().strip(_EDGE) == word.upper()


def _check_keyword(text: str, word: str) -> bool:
    """The response contains ``word`` as a whole word (any case)."""
    return _has_word(text, word)


def _check_json(text: str, answer) -> bool:
    """The response is a JSON object ``{"answer": ...}`` (optionally fenced) with the answer."""
    t = text.strip()
    fenced = re.fullmatch(r"```(?:json)?\s*(.*?)\s*```", t, re.S)
    if fenced:
        t = fenced.group(1)
    try:
        obj = json.loads(t)
    except ValueError:
        return False
    if not isinstance(obj, dict) or set(obj) != {"answer"} or isinstance(obj["answer"], bool):
        return False
    return _norm(str(obj["answer"])) == _norm(str(answer))


_NUMBER_WORDS = {"one": "1", "two": "2", "three": "3", "four": "4", "five": "5"}


def first_word(text: str) -> str:
    """The first word of ``text``, lowercased, number words as digits ("" when none)."""
    words = re.findall(r"[a-z0-9]+", text.lower())
    return _NUMBER_WORDS.get(words[0], words[0]) if words else ""


def _check_first_word(text: str, answer: str) -> bool:
    """The response's first word is the answer ("Red." passes for red, "two" for 2)."""
    return first_word(text) == first_word(answer) != ""


_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.S)


def _check_tool_call(text: str, name: str, arguments: dict) -> bool:
    """The response is one call, ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``
    (examples/chat_templates/chatml_tools.jinja's syntax) and nothing else, to ``name`` with
    ``arguments`` (strings compared like exact answers, numbers by value)."""
    calls = _CALL.findall(text)
    if len(calls) != 1 or _CALL.sub("", text).strip():
        return False
    try:
        call = json.loads(calls[0])
    except ValueError:
        return False
    if not isinstance(call, dict) or call.get("name") != name:
        return False
    given = call.get("arguments")
    return isinstance(given, dict) and set(given) == set(arguments) and all(
        _norm(str(given[k])) == _norm(str(v)) if isinstance(v, str)
        else isinstance(given[k], (int, float)) and given[k] == v for k, v in arguments.items())


_CHECKS: dict[str, Callable[..., bool]] = {
    "exact": _check_exact,
    "first_word": _check_first_word,
    "all_caps": _check_caps,
    "keyword": _check_keyword,
    "json_answer": _check_json,
    "tool_call": _check_tool_call,
}


def check_spec(spec: dict, text: str) -> bool:
    """Evaluate a checker spec (``{"type": ..., **params}``) on a response text."""
    params = dict(spec)
    kind = params.pop("type", None)
    if kind not in _CHECKS:
        raise ValueError(f"unknown check type {kind!r}; known: {sorted(_CHECKS)}")
    return bool(_CHECKS[kind](text, **params))


@dataclass(frozen=True)
class Checker:
    """A picklable callable wrapping a checker spec."""

    spec: dict

    def __call__(self, text: str) -> bool:
        return check_spec(self.spec, text)


@dataclass
class Task:
    """One checkable instruction with a passing ``chosen`` and a failing ``rejected`` reply.

    ``key`` names the underlying item (a country, a word pair, ``7+9``); splits keep eval items
    out of train entirely, not just their wording.
    """

    prompt: list
    chosen: str | dict  # a dict: a call {"name", "arguments"} to one of ``tools``
    rejected: str | dict
    family: str
    check: Callable[[str], bool]
    key: str = field(default="", compare=False)
    bare_wrong: str | dict = field(default="", compare=False)  # short, and fails the check
    negative: str = ""  # "bare" or "chatty" when the data mixes both kinds of rejected answers
    tools: list = field(default_factory=list)  # the functions the prompt offers

    @property
    def prompt_text(self) -> str:
        return self.prompt[-1]["content"]


def check_response(task: Task, text: str) -> bool:
    """Whether ``text`` satisfies the task's checker."""
    return bool(task.check(text))


def load_checker(record: dict) -> Checker:
    """Rebuild the checker of a record written by ``write_jsonl`` (validated eagerly)."""
    spec = record["check"]
    if not isinstance(spec, dict) or spec.get("type") not in _CHECKS:
        raise ValueError(f"bad check spec {spec!r}")
    return Checker(dict(spec))


def to_record(task: Task) -> dict:
    """A task in preftune's conversational preference format, plus family and check spec."""
    if not isinstance(task.check, Checker):
        raise TypeError("only tasks whose check is a Checker can be serialized")
    return {
        "prompt": [dict(m) for m in task.prompt],
        "chosen": [_reply(task.chosen)],
        "rejected": [_reply(task.rejected)],
        "family": task.family,
        "check": dict(task.check.spec),
        **({"negative": task.negative} if task.negative else {}),
        **({"tools": task.tools} if task.tools else {}),
    }


def answer_text(answer: str | dict) -> str:
    """An answer as the model writes it: the text, or a call in
    examples/chat_templates/chatml_tools.jinja's syntax (what ``tool_call`` checks)."""
    if isinstance(answer, dict):
        call = {"name": answer["name"], "arguments": answer["arguments"]}
        return f"<tool_call>{json.dumps(call, ensure_ascii=False)}</tool_call>"
    return answer


def _reply(answer: str | dict) -> dict:
    """An assistant message: the text, or a call to one of the task's tools."""
    if isinstance(answer, dict):
        return {"role": "assistant", "tool_calls": [{"type": "function", "function": answer}]}
    return {"role": "assistant", "content": answer}


def write_jsonl(tasks: list[Task], path) -> str:
    """Write one record per line; returns the path."""
    path = os.fspath(path)
    with open(path, "w", encoding="utf-8") as f:
        for task in tasks:
            f.write(json.dumps(to_record(task), ensure_ascii=False) + "\n")
    return path


def write_task_files(files: dict, overwrite: bool = False) -> None:
    """Write ``{path: tasks}``, no tasks meaning no file; a file already there with other
    contents is replaced (or, for no tasks, removed: an earlier run's split would pass for
    this one's) only with ``overwrite`` (a user's own data is never lost to a rerun)."""
    from pathlib import Path

    from ..config import ConfigError

    texts = {Path(path): "".join(json.dumps(to_record(task), ensure_ascii=False) + "\n"
                                 for task in tasks) or None for path, tasks in files.items()}
    for path, text in texts.items():
        if path.is_dir():
            raise ConfigError(f"{path} is a folder where this file goes; move it, or choose "
                              "another --output-dir (a folder is never replaced).")
        if path.exists() and not overwrite and (
                text is None or path.read_text(encoding="utf-8") != text):
            action = "remove it (this run writes none)" if text is None else "replace it"
            raise ConfigError(f"{path} exists with other contents; choose another --output-dir "
                              f"or pass --overwrite to {action}.")
    for path, text in texts.items():
        if text is None:
            path.unlink(missing_ok=True)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
