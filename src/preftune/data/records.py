"""Canonical preference records: what every source file is read into.

A record is independent of any tokenizer. Text fields are either a plain string or a list of
chat messages (``{"role": ..., "content": ...}``); the tokenizer stage decides how to render them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

Message = dict  # {"role": str, "content": str}
Text = Union[str, list]  # a plain string or a list of messages


class DataError(ValueError):
    """Bad input data. The message names the file, the record (line or row) and the field."""


@dataclass(frozen=True)
class Pair:
    """One prompt with a preferred (``chosen``) and a dispreferred (``rejected``) response.

    ``origin`` says where the record came from (``file.jsonl:12``) so later errors can name it.
    ``scores`` holds optional numeric side information (e.g. ``chosen_score``) for objectives
    that use it.
    """

    prompt: Text
    chosen: Text
    rejected: Text
    origin: str = ""
    scores: dict = field(default_factory=dict)

    @property
    def responses(self) -> tuple:
        return (self.chosen, self.rejected)

    @property
    def is_conversational(self) -> bool:
        return isinstance(self.prompt, list)
