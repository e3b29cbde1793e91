"""Scorers from Python: a user's function (a verifier, unit tests, a rule) and the demo's
program checkers."""

from __future__ import annotations

import contextlib
from pathlib import Path

from ..config import ConfigError
from ..data.records import DataError
from ..data.hub import locate
from ..data.rows import csv_text_columns, source_rows
from ..data.checks import load_checker
from ..data.images import row_images
from ..entry_points import call_problem, import_attribute, load_entry_point
from .base import checked, prefer_by_scores, prompt_key, scorer_prompt


ENTRY_POINT_GROUP = "preftune.scorers"
SCORERS: dict = {}


def register_scorer(name: str | None = None):
    """Register ``function(prompt, response) -> float`` (or a batched one, see
    ``FunctionScorer``) as a scorer that configs and flags can name; ``name`` defaults to the
    function's name."""

    def register(function):
        SCORERS[name or function.__name__] = function
        return function

    return register


class FunctionScorer:
    """``function(prompt, response) -> float`` called per response; a function with an
    attribute ``batched = True`` is called once as ``function(prompts, responses) -> list``,
    one with ``pass_fail = True`` scores 1 (passes) or 0 (fails), so evaluations give its
    pass rate."""

    pairwise = False

    def __init__(self, function, name: str):
        self.function, self.name = function, name
        self.pass_fail = bool(getattr(function, "pass_fail", False))

    @classmethod
    def from_spec(cls, spec: str) -> "FunctionScorer":
        """``module:function`` (the module importable from the working directory or path)."""
        try:
            function = import_attribute(spec)
        except (ImportError, AttributeError, ValueError) as error:
            raise ConfigError(f"scorer {spec!r}: expected 'module:function' with an importable "
                              f"module and function ({error}).") from None
        if not callable(function):
            raise ConfigError(f"scorer {spec!r}: {spec.partition(':')[2]} is not callable.")
        _check_signature(function, spec)
        return cls(function, spec)

    @classmethod
    def registered(cls, name: str) -> "FunctionScorer | None":
        """The scorer registered as ``name`` with ``register_scorer`` or declared by an
        installed package (entry point group ``preftune.scorers``); None when there is none."""
        try:
            function = SCORERS.get(name) or load_entry_point(ENTRY_POINT_GROUP, name)
        except ValueError as error:
            raise ConfigError(f"scorer {name!r}: {error}") from None
        if function is None:
            return None
        if not callable(function):
            raise ConfigError(f"scorer {name!r}: the entry point does not name a function.")
        _check_signature(function, name)
        return cls(function, name)

    def score(self, prompts, responses) -> list[float]:
        if getattr(self.function, "batched", False):
            with named_errors(self.name, "a batch of", prompts[0] if len(prompts) else ""):
                values = self.function(list(prompts), list(responses))
            return checked(values, self.name, len(responses))
        values = []
        for prompt, response in zip(prompts, responses, strict=True):
            with named_errors(self.name, "a response to", prompt):
                values.append(self.function(prompt, response))
        return checked(values, self.name, len(responses))

    def prefer(self, prompts, first, second) -> list[float]:
        return prefer_by_scores(self, prompts, first, second)


def _check_signature(function, name: str) -> None:
    """``function`` takes (prompt, response) (batched: (prompts, responses)), or a
    ``ConfigError`` before any work, not a TypeError once samples are scored."""
    problem = call_problem(function, ("prompt", "response"), "function(prompt, response)", name)
    if problem:
        raise ConfigError(f"scorer {name!r}: {problem}.")


@contextlib.contextmanager
def named_errors(scorer: str, what: str, prompt):
    """An error raised by the user's scoring function keeps its traceback, and says which
    scorer raised it on what."""
    try:
        yield
    except Exception as error:
        if hasattr(error, "add_note"):  # Python 3.11+
            error.add_note(f"(raised by scorer {scorer!r} while scoring {what} prompt "
                           f"{str(prompt)[:120]!r})")
        raise


class SyntheticScorer:
    """The demo's checkers: 1.0 when a response passes the checker stored with its prompt's
    record (``preftune data synthetic`` / ``preftune demo`` data), else 0.0."""

    pairwise = False
    pass_fail = True
    name = "synthetic"

    def __init__(self, checkers: dict):
        self.checkers = checkers

    @classmethod
    def from_data(cls, paths: str | list[str]) -> "SyntheticScorer":
        """The checkers written with the data (``check`` fields), keyed by prompt and, for
        image tasks, by the images the prompt shows."""
        checkers = {}
        for path in [paths] if isinstance(paths, str) else paths:
            # (image paths start at each data file's folder)
            for folder, origin, row in source_rows(locate(path), csv_text_columns(None)):
                try:
                    prompt = scorer_prompt(row["prompt"],
                                           row_images(row, {}, "images", origin, folder))
                    checkers[prompt_key(prompt)] = load_checker(row)
                except (KeyError, TypeError, ValueError):
                    raise DataError(f"{origin}: field 'check' is missing or not a checker spec; "
                                    "the synthetic scorer needs data written by preftune's "
                                    "synthetic tasks (preftune demo, preftune data "
                                    "synthetic).") from None
        return cls(checkers)

    def score(self, prompts, responses) -> list[float]:
        values = []
        for prompt, response in zip(prompts, responses, strict=True):
            checker = self.checkers.get(prompt_key(prompt))
            if checker is None:
                raise DataError(f"the synthetic scorer has no checker for the prompt {prompt!r}: "
                                "score prompts of the data it was built from.")
            values.append(float(bool(checker(response))))
        return values

    def prefer(self, prompts, first, second) -> list[float]:
        return prefer_by_scores(self, prompts, first, second)


def is_function_spec(spec: str) -> bool:
    """``module:function`` rather than a path (a path exists or has a separator)."""
    module, colon, attribute = spec.partition(":")
    return bool(colon) and attribute.isidentifier() and not Path(spec).exists() \
        and "/" not in module and "\\" not in module
