"""The ``Scorer`` interface: (prompt, response) -> a number, in batches.

A prompt is what a record holds (a string or a list of chat messages); a response is text. A
prompt that shows images or offers tools comes with them: ``prompt.images`` (``ImageRef``s,
``.load()`` gives a PIL image) and ``prompt.tools`` (the function schemas), while it still
reads as the string or message list it is (``scorer_prompt``).
Scorers that judge two responses against each other (a GPM reward model, a pairwise judge)
set ``pairwise`` and implement ``prefer``; every scorer may implement it, and win rates use it
when the scorer is pairwise.
"""

from __future__ import annotations

import json
import math
from typing import Protocol, Sequence

from ..config import ConfigError


class Scorer(Protocol):
    name: str
    pairwise: bool  # True: only ``prefer`` is meaningful

    def score(self, prompts: Sequence, responses: Sequence[str]) -> list[float]:
        """One finite number per (prompt, response); higher is better."""
        ...

    def prefer(self, prompts: Sequence, first: Sequence[str],
               second: Sequence[str]) -> list[float]:
        """P(first is better than second) per prompt."""
        ...


IMAGE_SCORERS = ("score image prompts with rm:DIR (a vision-language reward model) or a "
                 "module:function scorer that reads prompt.images.")


def refuse_images(prompts: Sequence, scorer: str) -> None:
    """A scorer that reads prompts as text only refuses a prompt that shows images, which it
    would rate without seeing (``text_only_parts`` says so before an online run starts)."""
    if any(getattr(prompt, "images", ()) for prompt in prompts):
        raise ConfigError(f"scorer {scorer} reads prompts as text, and these show images it "
                          f"would rate without seeing; {IMAGE_SCORERS}")


class PromptText(str):
    """A plain-string prompt that also carries the images it shows and the tools it offers:
    text-only scorers read it as the string it is, others look at ``.images`` / ``.tools``."""

    images: tuple = ()
    tools: tuple = ()


class PromptMessages(list):
    """A message-list prompt that also carries its images and tools."""

    images: tuple = ()
    tools: tuple = ()


def scorer_prompt(prompt, images: tuple = (), tools: tuple = ()):
    """``prompt`` as handed to scorers: unchanged without images or tools, else a copy with
    ``.images`` and ``.tools``."""
    if not images and not tools:
        return prompt
    carrier = PromptText(prompt) if isinstance(prompt, str) else PromptMessages(prompt)
    carrier.images, carrier.tools = tuple(images), tuple(tools)
    return carrier


def prompt_key(prompt) -> str:
    """A hashable identity of a prompt (a string, or a message list as canonical JSON, plus the
    content keys of the images it shows, if any)."""
    key = str(prompt) if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True)
    return key + "".join(f"\x00image:{image.key}" for image in getattr(prompt, "images", ()))


def checked(values, name: str, count: int) -> list[float]:
    """``values`` as floats, or an error naming the scorer and the first bad item. NumPy and
    torch scalars count as the Python numbers they hold (a bool is no score)."""
    values = [value.item() if callable(getattr(value, "item", None)) and
              getattr(value, "shape", None) == () else value for value in values]
    if len(values) != count:
        raise ConfigError(f"scorer {name}: returned {len(values)} scores for {count} responses.")
    for position, value in enumerate(values):
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not math.isfinite(value):
            raise ConfigError(f"scorer {name}: returned {value!r} for response {position}; a "
                              "scorer must return a finite number.")
    return [float(v) for v in values]


def prefer_by_scores(scorer, prompts, first, second) -> list[float]:
    """P(first > second) of a scalar scorer: 1, 0, or 1/2 for a tie."""
    a, b = paired_scores(scorer, prompts, first, second)
    return [1.0 if x > y else 0.0 if x < y else 0.5 for x, y in zip(a, b)]


def paired_scores(scorer, prompts, first, second) -> tuple[list[float], list[float]]:
    """A scalar scorer's scores of two answers to each prompt; one that ranks a set as a
    whole (``whole_set``: a maxmin combination) scores both sides in one call, so the same
    term judges them."""
    if getattr(scorer, "whole_set", False):
        both = scorer.score([*prompts, *prompts], [*first, *second])
        return both[:len(first)], both[len(first):]
    return scorer.score(prompts, first), scorer.score(prompts, second)


def scored_in_chunks(method, description: str, *columns, chunk: int = 64) -> list[float]:
    """``method(*columns)`` (a scorer's ``score`` or ``prefer``) on ``chunk`` items at a time,
    with a progress bar named ``description`` (judges and reward models take a while); a
    scorer that ranks a set as a whole (``whole_set``: a maxmin combination) gets it at once."""
    from ..train.logging import progress

    total, values = len(columns[0]), []
    if getattr(getattr(method, "__self__", None), "whole_set", False):
        chunk = max(total, 1)
    with progress(description, total, "response") as update:
        for start in range(0, total, chunk):
            values += method(*(column[start : start + chunk] for column in columns))
            update(min(chunk, total - start))
    return values


def score_samples(scorer, questions: list, samples: list[list[str]]) -> list[list[float]]:
    """``scorer``'s scores of each question's samples (one call for them all), grouped as the
    samples are."""
    flat = scorer.score([q for q, group in zip(questions, samples) for _ in group],
                        [text for group in samples for text in group])
    grouped, at = [], 0
    for group in samples:
        grouped.append(list(flat[at : at + len(group)]))
        at += len(group)
    return grouped


def preference_matrix(scorer, question, responses: list[str]) -> list[list[float]]:
    """P(response i beats response j) for every ordered pair of one question's responses, by
    a pairwise scorer (one call)."""
    k = len(responses)
    upper = [(i, j) for i in range(k) for j in range(i + 1, k)]
    probs = scorer.prefer([question] * len(upper), [responses[i] for i, _ in upper],
                          [responses[j] for _, j in upper])
    matrix = [[0.5] * k for _ in range(k)]
    for (i, j), p in zip(upper, probs):
        matrix[i][j], matrix[j][i] = p, 1.0 - p
    return matrix
