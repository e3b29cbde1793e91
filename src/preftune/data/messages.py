"""A record's chat messages as read from a data file: checked by message and field, and
made plain for chat templates."""

from __future__ import annotations

import difflib
from typing import Any

from .records import DataError, describe
from .tools import check_tool_calls


def read_messages(value: list, column: str, origin: str) -> list:
    """A record's message list checked ({role, content} each; tool calls; content parts) and
    made plain: nulls that columnar formats add dropped, text-only parts joined into text."""
    if not value:
        raise DataError(f"{origin}: field {column!r}: empty message list; expected at least one "
                        f"{{role, content}} message.")
    messages = []
    for position, message in enumerate(value):
        where = f"{origin}: field {column!r}, message {position}"
        if not isinstance(message, dict):
            raise DataError(f"{where}: expected an object with 'role' and 'content', got "
                            f"{describe(message)}.")
        calls = message.get("tool_calls")
        if calls is not None:
            check_tool_calls(calls, where)
        for key in ("role", "content"):
            if key == "content" and calls is not None and message.get(key) is None:
                continue  # a message that only calls tools has no text
            if key not in message or message[key] is None:
                what = (f"{key!r} is null" if key in message else f"missing {key!r} (keys "
                        f"present: {', '.join(repr(k) for k in message) or 'none'})")
                raise DataError(f"{where}: {what}. Messages must look like "
                                f"{{\"role\": \"user\", \"content\": \"...\"}}.")
            if not isinstance(message[key], str) and not (key == "content"
                                                          and _content_parts(message[key], where)):
                raise DataError(f"{where}: {key!r} must be a string, got "
                                f"{describe(message[key])}.")
        _check_role(message["role"], where)
        # keep every key (some chat templates read e.g. "name"); drop nulls that columnar
        # formats add for keys other rows have
        kept = {k: v for k, v in message.items() if v is not None}
        if isinstance(kept.get("content"), list) and all(
                part["type"] == "text" for part in kept["content"]):  # text parts: text
            kept["content"] = "".join(part["text"] for part in kept["content"])
        messages.append(kept)
    return messages


ROLES = ("system", "user", "assistant", "tool", "developer", "ipython", "function",
         "observation")  # what chat templates read


def misspelt_role(role: str) -> str | None:
    """The role chat templates read that ``role`` is a typo of (``usr``, ``User``, ``tools``),
    else None. Roles far from these are not typos: a model's own template may read them."""
    if role in ROLES:
        return None
    near = difflib.get_close_matches(role.lower(), ROLES, n=1, cutoff=0.6)
    return near[0] if near else None


def _check_role(role: str, where: str) -> None:
    """A misspelt role is refused: a template would render it as some other turn or not at
    all."""
    near = misspelt_role(role)
    if near:
        raise DataError(f"{where}: role {role!r} is not one chat templates read; did you mean "
                        f"{near!r}? (roles: {', '.join(ROLES[:4])}, ...)")


def _content_parts(content: Any, where: str) -> bool:
    """True for a list of content parts (``{"type": "text", "text": ...}`` or
    ``{"type": "image", ...}``, the multimodal message format); an error names a bad part."""
    if not isinstance(content, list) or not content:
        return False
    for p, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "image" or (kind == "text" and isinstance(part.get("text"), str)):
            continue
        raise DataError(f"{where}: 'content' part {p}: expected {{\"type\": \"text\", "
                        f"\"text\": ...}} or {{\"type\": \"image\"}}, got {describe(part)}.")
    return True
