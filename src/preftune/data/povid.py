"""POVID-style rejected answers (arXiv:2405.17220): the chosen answer with hallucinations
injected by word substitution.

Up to ``MAX_EDITS`` words of the chosen answer that belong to a built-in vocabulary (colours,
number words and digits, shapes, objects, left/right, yes/no) are replaced, seeded per record,
by a different word of the same kind: "a red car on the left" -> "a blue car on the right".

What POVID does that this does not: its hallucinations are written by GPT-4V, which also
changes object co-occurrences and logical relations, not just single words; and its second
kind of rejected answer is the policy's own response to a noised image, which needs generation
during training (an online loop; ``images:corrupt:noise`` makes the noised image).
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Sequence

from .image_transforms import record_name, record_rng
from .records import carried_unfinished

MAX_EDITS = 3
VOCABULARIES = {
    "colour": ("red", "green", "blue", "yellow", "black", "white", "orange", "purple", "pink",
               "brown", "gray"),
    "number": ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"),
    "shape": ("circle", "square", "triangle", "rectangle", "star", "oval"),
    "object": ("dog", "cat", "horse", "bird", "car", "bus", "bicycle", "man", "woman", "child",
               "table", "chair", "tree", "cup", "book", "phone"),
    "side": ("left", "right"),
    "answer": ("yes", "no"),
}
_KIND = {word: kind for kind, words in VOCABULARIES.items() for word in words}
_TOKEN = re.compile(r"(?<!\w)(?<!\d\.)\d+(?!\w)(?!\.\d)|\b[A-Za-z]+\b")  # not 2.5, 3rd


def hallucinate(text: str, rng) -> str | None:
    """``text`` with up to ``MAX_EDITS`` vocabulary words (or whole numbers) replaced by others of
    their kind, case kept; None when nothing in it can be substituted."""
    spots = [m for m in _TOKEN.finditer(text) if m.group().isdigit() or m.group().lower() in _KIND]
    if not spots:
        return None
    chosen = sorted(rng.sample(spots, min(MAX_EDITS, len(spots))), key=lambda m: m.start())
    pieces, at = [], 0
    for match in chosen:
        pieces += [text[at:match.start()], _substitute(match.group(), rng)]
        at = match.end()
    return "".join(pieces) + text[at:]


def _substitute(word: str, rng) -> str:
    if word.isdigit():
        value = int(word)
        return str(rng.choice([n for n in (value - 2, value - 1, value + 1, value + 2) if n >= 0]))
    lower = word.lower()
    new = rng.choice([w for w in VOCABULARIES[_KIND[lower]] if w != lower])
    if word.isupper() and len(word) > 1:
        return new.upper()
    return new.capitalize() if word[0].isupper() else new


def _hallucinate_text(value, rng):
    """A response (string, or messages whose string or text-part contents are edited) with
    hallucinations, or None when nothing was substituted."""
    if isinstance(value, str):
        return hallucinate(value, rng)
    changed, messages = False, []
    for message in value:
        content = message.get("content")
        if isinstance(content, str):
            new = hallucinate(content, rng)
            changed |= new is not None
            content = content if new is None else new
        elif isinstance(content, list):
            parts = []
            for part in content:
                new = hallucinate(part["text"], rng) \
                    if isinstance(part, dict) and part.get("type") == "text" else None
                changed |= new is not None
                parts.append(part if new is None else {**part, "text": new})
            content = parts
        messages.append({**message, "content": content})
    return messages if changed else None


def povid_pairs(records: Sequence, seed: int = 0, unchanged: list | None = None) -> list:
    """Pairs whose rejected answer is the chosen one with injected hallucinations (POVID,
    arXiv:2405.17220). A record whose chosen answer has no substitutable word keeps its
    rejected answer; its origin is appended to ``unchanged`` when a list is given."""
    out = []
    for position, record in enumerate(records):
        rng = record_rng(record, position, seed, "povid")
        rejected = _hallucinate_text(record.chosen, rng)
        if rejected is None:
            rejected = record.rejected
            if unchanged is not None:
                unchanged.append(record_name(record, position))
        else:  # the rejected answer is the chosen one changed: cut off where chosen was
            slots = (0, 0, 2)[:len(record.responses)]
            record = replace(record, unfinished=carried_unfinished(record, slots))
        out.append(replace(record, rejected=rejected, origin=f"{record.origin} [povid]"))
    return out
