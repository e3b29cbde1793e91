"""Canonical preference records: what every source file is read into.

Four shapes: ``Pair`` (chosen vs rejected, optionally a gold reference), ``Unpaired`` (one
response with a thumbs-up/down), ``Ranked`` (K responses with a score each) and ``Rated`` (one
response with numeric ratings, for reward models). ``JointPair`` is
a pairs record whose two responses answer different prompts (DOVE, arXiv:2404.00530); downstream
it is an ordinary pairs example. A record is independent of any tokenizer. Text fields are either
a plain string or a list of chat messages (``{"role": ..., "content": ...}``); the tokenizer stage
decides how to render them.

Records of vision-language data carry ``images`` (``data.images.ImageRef``) shown by the prompt;
text-only records have none. Chat records may carry ``tools``, the function schemas their
prompt offers (``data/tools.py``). Every record has ``prompts`` (the prompt of each response slot), ``responses`` (the texts to
score, in slot order), ``origin`` (``file.jsonl:12``, so later errors can name it), ``scores``
(numeric side columns) and ``side_data()``: the numbers that must reach the batch with it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Optional, Union

Message = dict  # {"role": str, "content": str}
Text = Union[str, list]  # a plain string or a list of messages


class DataError(ValueError):
    """Bad input data. The message names the file, the record (line or row) and the field."""


def plain_text(text) -> str:
    """A prompt or response as plain text: strings as they are, a message list as one
    ``role: content`` line per message (a message that only calls tools has no content)."""
    if isinstance(text, str):
        return text
    return "\n".join(f"{m['role']}: {m.get('content') or ''}" for m in text)


def response_text(response) -> str:
    """A response as the text a scorer reads: a string as it is, one message as its content
    (the text of its parts, where it has parts), an exchange of several (tool calls and
    results) as ``plain_text``."""
    if isinstance(response, list) and len(response) == 1:
        content = response[0].get("content") or ""
        return content if isinstance(content, str) else "".join(
            part.get("text", "") for part in content if part.get("type") == "text")
    return plain_text(response)


def describe(value) -> str:
    """A value's type and the start of its repr, for error messages."""
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}"


def required_prompt(origin: str, row, column: str, missing: str):
    """The row's prompt: a non-empty string or list of chat messages; else a DataError naming
    the record and the field, followed by ``missing`` (what the caller needs it for)."""
    prompt = row.get(column) if isinstance(row, dict) else None
    if (isinstance(prompt, str) and prompt.strip()) or (isinstance(prompt, list) and prompt):
        return prompt
    if prompt is not None and not isinstance(prompt, (str, list)):
        raise DataError(f"{origin}: field {column!r} is {describe(prompt)}; a prompt is a string "
                        "or a list of chat messages.")
    raise DataError(f"{origin}: field {column!r} {missing}")


class _Record:
    """What the one-prompt record shapes share: a ``prompt`` that all their responses answer."""

    prompt: Text

    @property
    def is_conversational(self) -> bool:
        return isinstance(self.prompt, list)

    @property
    def prompts(self) -> tuple:
        """The prompt each response slot answers, in slot order."""
        return (self.prompt,) * len(self.responses)


@dataclass(frozen=True)
class Pair(_Record):
    """One prompt with a preferred (``chosen``) and a dispreferred (``rejected``) response.

    ``gold`` is an optional reference response (triple-style objectives); when set it is the
    third response slot. ``scores`` holds optional numeric side information (e.g.
    ``chosen_score``, ``group``, ``weight``, ``tie``) for objectives that use it.
    """

    shape: ClassVar[str] = "pairs"

    prompt: Text
    chosen: Text
    rejected: Text
    origin: str = ""
    scores: dict = field(default_factory=dict)
    gold: Optional[Text] = None
    images: tuple = ()  # data.images.ImageRef, in the prompt's placeholder order
    negative_images: tuple = ()  # images under which chosen should be less likely (mDPO)
    tools: tuple = ()  # function schemas the prompt offers (data/tools.py)
    unfinished: tuple = ()  # response slots cut off at a length limit: no end of turn after them

    @property
    def responses(self) -> tuple:
        if self.gold is None:
            return (self.chosen, self.rejected)
        return (self.chosen, self.rejected, self.gold)

    def side_data(self) -> dict:
        """Numbers for the batch: the record's ``scores``."""
        return dict(self.scores)


def carried_unfinished(record, slots) -> tuple:
    """``unfinished`` of a record made of ``record``'s responses at ``slots`` (its slot k is
    ``record``'s slot ``slots[k]``): a cut-off response stays cut off wherever it goes."""
    cut = getattr(record, "unfinished", ())
    return tuple(k for k, slot in enumerate(slots) if slot in cut)


@dataclass(frozen=True)
class JointPair:
    """A preference between two (prompt, response) pairs: ``chosen`` answering ``chosen_prompt``
    is preferred to ``rejected`` answering ``rejected_prompt`` (DOVE, arXiv:2404.00530).

    The prompts may differ; when they are equal this is an ordinary ``Pair``. Both prompts are
    plain strings or both message lists. There is no gold slot: a gold response would need a
    prompt of its own. Tokenization makes the example's prompt the token prefix both prompts
    share, so each side's own prompt tokens are scored with its response (see ``data.joint``).
    """

    shape: ClassVar[str] = "pairs"

    chosen_prompt: Text
    rejected_prompt: Text
    chosen: Text
    rejected: Text
    origin: str = ""
    scores: dict = field(default_factory=dict)
    tools: tuple = ()

    def __post_init__(self):
        if isinstance(self.chosen_prompt, list) != isinstance(self.rejected_prompt, list):
            raise DataError(
                f"{self.origin or 'JointPair'}: chosen_prompt and rejected_prompt must both be "
                f"strings or both be message lists; one is a string and the other a list."
            )

    @property
    def is_conversational(self) -> bool:
        return isinstance(self.chosen_prompt, list)

    @property
    def prompts(self) -> tuple:
        """The prompt each response slot answers: (chosen_prompt, rejected_prompt)."""
        return (self.chosen_prompt, self.rejected_prompt)

    @property
    def responses(self) -> tuple:
        return (self.chosen, self.rejected)

    def side_data(self) -> dict:
        """Numbers for the batch: the record's ``scores``."""
        return dict(self.scores)


@dataclass(frozen=True)
class Unpaired(_Record):
    """One prompt and one ``completion`` labelled desirable (True) or not (KTO, BCO)."""

    shape: ClassVar[str] = "unpaired"

    prompt: Text
    completion: Text
    label: bool
    origin: str = ""
    scores: dict = field(default_factory=dict)
    images: tuple = ()
    tools: tuple = ()
    unfinished: tuple = ()  # (0,) when the completion was cut off at a length limit

    @property
    def responses(self) -> tuple:
        return (self.completion,)

    def side_data(self) -> dict:
        """Numbers for the batch: ``scores`` plus ``label`` as 1.0 / 0.0."""
        return {**self.scores, "label": 1.0 if self.label else 0.0}


@dataclass(frozen=True)
class Ranked(_Record):
    """One prompt with K >= 2 ``responses``; ``response_scores[k]`` scores slot k, higher is
    better (PRO, EXO-K, listwise). Responses keep their source order; nothing is sorted."""

    shape: ClassVar[str] = "ranked"

    prompt: Text
    responses: tuple
    response_scores: tuple
    origin: str = ""
    scores: dict = field(default_factory=dict)
    images: tuple = ()
    tools: tuple = ()
    unfinished: tuple = ()  # as a Pair's

    def __post_init__(self):
        object.__setattr__(self, "responses", tuple(self.responses))
        object.__setattr__(self, "response_scores", tuple(float(s) for s in self.response_scores))
        if len(self.responses) != len(self.response_scores):
            raise DataError(
                f"{self.origin or 'Ranked record'}: {len(self.responses)} responses but "
                f"{len(self.response_scores)} response_scores; give one score per response."
            )

    def side_data(self) -> dict:
        """Numbers for the batch: ``scores`` plus ``response_scores`` as a list of floats."""
        return {**self.scores, "response_scores": list(self.response_scores)}


@dataclass(frozen=True)
class Rated(_Record):
    """One prompt and one ``response`` with numeric ratings in ``scores`` (e.g. HelpSteer2's
    helpfulness, correctness, ...): what regression and quantile reward models fit."""

    shape: ClassVar[str] = "rated"

    prompt: Text
    response: Text
    origin: str = ""
    scores: dict = field(default_factory=dict)
    images: tuple = ()
    tools: tuple = ()

    @property
    def responses(self) -> tuple:
        return (self.response,)

    def side_data(self) -> dict:
        """Numbers for the batch: the ratings and any other numeric fields."""
        return dict(self.scores)


RECORD_TYPES = {cls.shape: cls for cls in (Pair, Unpaired, Ranked, Rated)}
SHAPES = tuple(RECORD_TYPES)  # "pairs", "unpaired", "ranked", "rated"
