"""Records -> token ids with an exact prompt/response boundary.

(Interface fixed; implementation in progress.)
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class TokenizeSettings:
    """Everything about tokenization that changes the ids (part of the reference-cache key)."""

    max_length: int = 1024  # prompt + one response, in tokens
    max_prompt_length: int | None = 512  # prompt alone; None = only max_length applies


@dataclass
class TokenizedExample:
    """One record in ids. ``response_ids[0]`` is chosen and ``[1]`` rejected for pairs.

    ``index`` is the record's stable position in its dataset (used to look up cached reference
    stats); ``origin`` names the source record for error messages.
    """

    prompt_ids: list[int]
    response_ids: list[list[int]]
    index: int
    origin: str = ""
    scores: dict = field(default_factory=dict)
    prompt_truncated: bool = False
    response_truncated: bool = False
