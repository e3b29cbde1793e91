"""Tool use in chat records: the functions a prompt offers (a record's ``tools``, passed to the
chat template as ``tools=``) and assistant messages that call them (``tool_calls``), in the
format of transformers' chat templates:

    {"prompt": [{"role": "user", "content": "Weather in Paris?"}],
     "chosen": [{"role": "assistant", "tool_calls": [{"type": "function", "function":
                 {"name": "get_weather", "arguments": {"city": "Paris"}}}]}],
     "rejected": [{"role": "assistant", "content": "It is sunny."}],
     "tools": [{"type": "function", "function": {"name": "get_weather", "description": "...",
                "parameters": {...}}}]}

A tool's result is a ``{"role": "tool", "content": ...}`` message in the prompt. Only the chat
template knows how tools and calls are written, so preftune checks that it wrote them: a
template that drops them would train on prompts without the tools or on empty responses.
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

from .records import DataError, describe

TOOLS_HINT = ("Set model.chat_template to a template that renders tools and tool calls (the "
              "tool-use template of the model's family), or leave them out.")


def read_tools(value: Any, column: str, origin: str) -> tuple[dict, ...]:
    """A record's ``tools``: a list of function schemas ({"type": "function", "function":
    {"name", "description", "parameters"}}, or the function object alone), or that list as a
    JSON string (as columnar files store it)."""
    where = f"{origin}: field {column!r} (tools)"
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise DataError(f"{where}: a string that is not JSON ({error.msg} at character "
                            f"{error.pos}); give a list of function schemas.") from None
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: expected a non-empty list of function schemas, got "
                        f"{describe(value)}.")
    for k, tool in enumerate(value):
        function = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(function, dict) or not _is_name(function.get("name")):
            raise DataError(f"{where}, item {k}: expected {{\"type\": \"function\", "
                            f"\"function\": {{\"name\": ..., \"parameters\": ...}}}} (or the "
                            f"function object alone), got {describe(tool)}.")
    return tuple(value)


def tools_of(row: dict, column: str, origin: str, conversational: bool) -> tuple[dict, ...]:
    """The row's tools under ``column`` (none when it has none); only a message-list prompt
    (``conversational``) can take them."""
    if row.get(column) is None:
        return ()
    tools = read_tools(row[column], column, origin)
    if not conversational:
        raise DataError(f"{origin}: field {column!r} (tools): tools are written into the prompt "
                        "by the chat template, which needs a message-list prompt ([{\"role\": "
                        "\"user\", \"content\": ...}]); this record's prompt is a string.")
    return tools


def attach_tools(record, row: dict, columns: dict, origin: str):
    """``record`` with the row's ``tools`` (unchanged when the row has none)."""
    tools = tools_of(row, columns["tools"], origin, record.is_conversational)
    return replace(record, tools=tools) if tools else record


def check_tool_calls(calls: Any, where: str) -> None:
    """An assistant message's ``tool_calls``: a non-empty list of {"type": "function",
    "function": {"name": ..., "arguments": {...} or JSON text}}."""
    if not isinstance(calls, list) or not calls:
        raise DataError(f"{where}: 'tool_calls' must be a non-empty list of calls, got "
                        f"{describe(calls)}.")
    for k, call in enumerate(calls):
        function = call.get("function", call) if isinstance(call, dict) else None
        if (not isinstance(function, dict) or not _is_name(function.get("name"))
                or not isinstance(function.get("arguments", {}), (dict, str))):
            raise DataError(f"{where}: tool call {k}: expected {{\"type\": \"function\", "
                            f"\"function\": {{\"name\": ..., \"arguments\": {{...}}}}}}, got "
                            f"{describe(call)}.")


def called_names(messages: list) -> list[str]:
    """The function names of every tool call in ``messages``."""
    return [call.get("function", call)["name"] for message in messages
            for call in message.get("tool_calls") or ()]


def _is_name(value) -> bool:
    return isinstance(value, str) and bool(value.strip())
