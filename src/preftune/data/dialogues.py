"""Pairs whose chosen and rejected are whole dialogues (format ``implicit``): the prompt is
split off, or, when the row also has a prompt column, checked against the dialogues' opening
and stripped (UltraFeedback-binarized repeats its string prompt as the first user message)."""

from __future__ import annotations

import json
import os
from typing import Any

from .records import DataError

ASSISTANT_MARKER = "\n\nAssistant:"


def map_field(key: str) -> str:
    """How to read field ``key`` from another column, from a config or a command line."""
    return (f"data.fields.{key} (--set data.fields.{key}=COLUMN with a training command, "
            f"--column {key}=COLUMN with eval, data inspect and the rm commands)")


FIELDS_HINT = f"map column names with {map_field('KEY')}, or fields={{...}} in Python"


def split_dialogues(chosen: Any, rejected: Any, prompt: Any, columns: dict, origin: str,
                    messages) -> tuple:
    """(prompt, chosen response, rejected response) of two whole dialogues. ``prompt`` is the
    row's prompt column (None when absent); ``messages(value, column, origin)`` validates a
    message list."""
    for canonical, value in (("chosen", chosen), ("rejected", rejected)):
        if not isinstance(value, (str, list)):
            raise DataError(
                f"{origin}: field {columns[canonical]!r} ({canonical}): expected a whole "
                f"dialogue as a string or a list of messages, got {type(value).__name__}."
            )
    if isinstance(chosen, str) != isinstance(rejected, str):
        raise DataError(
            f"{origin}: fields {columns['chosen']!r} and {columns['rejected']!r}: one is a "
            f"string and the other a message list; both must have the same type."
        )
    if isinstance(chosen, str):
        if prompt is None:
            return _split_text(chosen, rejected, origin)
        return _strip_text(prompt, chosen, rejected, columns, origin)
    chosen = messages(chosen, columns["chosen"], origin)
    rejected = messages(rejected, columns["rejected"], origin)
    if prompt is None:
        return _split_messages(chosen, rejected, origin)
    if isinstance(prompt, list):
        prompt = messages(prompt, columns["prompt"], origin)
        return (prompt, *(_after(prompt, side, columns[name], columns["prompt"], origin)
                          for name, side in (("chosen", chosen), ("rejected", rejected))))
    return _strip_named(prompt, chosen, rejected, columns, origin)


def _split_text(chosen: str, rejected: str, origin: str) -> tuple[str, str, str]:
    shared = os.path.commonprefix([chosen, rejected])
    cut = shared.rfind(ASSISTANT_MARKER)
    if cut < 0:
        raise DataError(
            f"{origin}: fields 'chosen' and 'rejected' share no turn boundary: no "
            f"{ASSISTANT_MARKER!r} lies in their common prefix, so the prompt cannot be found. "
            f"Implicit-prompt text must follow the '\\n\\nHuman: ...\\n\\nAssistant: ...' layout; "
            f"otherwise add a prompt field or, if it has another name, {FIELDS_HINT}."
        )
    end = cut + len(ASSISTANT_MARKER)
    return chosen[:end], chosen[end:], rejected[end:]


def _split_messages(chosen: list, rejected: list, origin: str,
                    prompt_column: str | None = None) -> tuple:
    """(shared opening, chosen response, rejected response) of two message lists; with a
    ``prompt_column`` the row has a prompt that both dialogues should open with."""
    shared = 0
    # each side keeps at least one message as its response
    limit = min(len(chosen), len(rejected)) - 1
    while shared < limit and chosen[shared] == rejected[shared]:
        shared += 1
    # the responses start at an assistant turn; back off to the last one inside the shared part
    while shared > 0 and not (chosen[shared]["role"] == rejected[shared]["role"] == "assistant"):
        shared -= 1
    if shared == 0 and prompt_column is not None:
        raise DataError(
            f"{origin}: fields 'chosen' and 'rejected' should both open with the prompt of "
            f"field {prompt_column!r}, but they open differently (chosen: "
            f"{_short(chosen[0])}; rejected: {_short(rejected[0])}). Fix the record so both "
            "dialogues start with the same prompt messages.")
    if shared == 0:
        raise DataError(
            f"{origin}: fields 'chosen' and 'rejected' share no turn boundary: they need a "
            f"common opening (at least one message) followed by an assistant turn where they "
            f"differ. Add a prompt field or, if it has another name, {FIELDS_HINT}."
        )
    return chosen[:shared], chosen[shared:], rejected[shared:]


def _strip_text(prompt: Any, chosen: str, rejected: str, columns: dict, origin: str) -> tuple:
    if not isinstance(prompt, str):
        raise DataError(f"{origin}: field {columns['prompt']!r} (prompt) is a message list but "
                        f"chosen/rejected are strings; a repeated prompt must have their type.")
    for name, side in (("chosen", chosen), ("rejected", rejected)):
        if not side.startswith(prompt):
            raise DataError(
                f"{origin}: field {columns[name]!r} ({name}) does not start with the text of "
                f"{columns['prompt']!r} (prompt); with format 'implicit' and a prompt column, "
                f"each dialogue must begin with the prompt, which is then stripped from it. Use "
                f"format 'standard' if the responses do not repeat the prompt."
            )
    return prompt, chosen[len(prompt):], rejected[len(prompt):]


def _after(prompt: list, side: list, column: str, prompt_column: str, origin: str) -> list:
    """``side`` without its opening, which must be the message-list prompt."""
    for position, message in enumerate(prompt):
        theirs = side[position] if position < len(side) else None
        if theirs is None or _said(theirs) != _said(message):
            found = "ends" if theirs is None else f"has {theirs['role']}: {_short(theirs)}"
            raise DataError(
                f"{origin}: field {column!r} should repeat the prompt (a whole dialogue), but its "
                f"message {position} {found} where {prompt_column!r} has {message['role']}: "
                f"{_short(message)}. "
                f"A dialogue must start with the whole prompt; fix the record, or drop the "
                f"repeated messages so {column!r} holds only the response."
            )
    if len(side) == len(prompt):
        raise DataError(f"{origin}: field {column!r} is the prompt repeated with no response "
                        f"after it; add the assistant's reply.")
    return side[len(prompt):]


def _strip_named(prompt: str, chosen: list, rejected: list, columns: dict, origin: str) -> tuple:
    """A string prompt that the dialogues repeat as a user message: their shared opening up to
    the responses becomes the prompt."""
    opening, chosen, rejected = _split_messages(chosen, rejected, origin, columns["prompt"])
    users = [m["content"] for m in opening if m["role"] == "user"]
    if prompt.strip() not in (text.strip() for text in users):
        shown = _short({"content": users[-1]}) if users else "no user message"
        raise DataError(
            f"{origin}: field {columns['prompt']!r} (prompt) does not match the dialogue that "
            f"{columns['chosen']!r} and {columns['rejected']!r} start with: their opening has "
            f"{shown}, the prompt is {_short({'content': prompt})}. Fix the record, or map the "
            f"right column with {map_field('prompt')}."
        )
    return opening, chosen, rejected


def strip_gold(gold: Any, prompt: Any, column: str, origin: str, messages) -> Any:
    """An implicit-prompt gold dialogue minus the prompt found from chosen and rejected."""
    if isinstance(gold, str) and isinstance(prompt, str) and gold.startswith(prompt):
        return gold[len(prompt):]
    if isinstance(gold, list) and isinstance(prompt, list):
        gold = messages(gold, column, origin)
        if gold[: len(prompt)] == prompt and len(gold) > len(prompt):
            return gold[len(prompt):]
    raise DataError(
        f"{origin}: field {column!r} (gold): with an implicit prompt the gold response must be "
        f"the whole dialogue, starting with the prompt that 'chosen' and 'rejected' share; it "
        f"does not. Fix the record or add a prompt field."
    )


def _said(message: dict) -> tuple:
    """What a message says: its role, text and tool calls (a call may stand without text)."""
    return message["role"], message.get("content"), message.get("tool_calls")


def _short(message: dict) -> str:
    content = message.get("content")
    if content is None and message.get("tool_calls"):  # a call: its function and arguments
        return "; ".join(f"calls {call['function'].get('name')}"
                         f"({json.dumps(call['function'].get('arguments'))})"
                         for call in message["tool_calls"])
    text = repr(content)
    return text if len(text) <= 50 else text[:47] + "...'"
