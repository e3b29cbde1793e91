"""Tool use in chat records: the functions a prompt offers (a record's ``tools``, passed to the
chat template as ``tools=``) and assistant messages that call them (``tool_calls``), in the
format of transformers' chat templates:

    {"prompt": [{"role": "user", "content": "Weather in Paris?"}],
     "chosen": [{"role": "assistant", "tool_calls": [{"type": "function", "function":
                 {"name": "get_weather", "arguments": {"city": "Paris"}}}]}],
     "rejected": [{"role": "assistant", "content": "It is sunny."}],
     "tools": [{"type": "function", "function": {"name": "get_weather", "description": "...",
                "parameters": {...}}}]}

A tool's result is a ``{"role": "tool", "content": ...}`` message, in the prompt or inside a
multi-turn response (call, result, answer). Only the chat template knows how tools and calls
are written, so preftune checks that it wrote them: a template that drops them would train on
prompts without the tools or on empty responses. Inside a response, a tool's result is context
the model did not write: its tokens are left out of the log-probs (``data.mask_roles``).
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from typing import Any

from .records import DataError, describe

MASK_ROLES = ("tool", "ipython", "function")  # roles whose messages are tool output

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


def check_results_written(messages: list, text: str, render, origin: str) -> None:
    """A template that leaves out a tool's result (the first message of a ``MASK_ROLES`` role
    with content) is refused: the answer after it would train without what it answers.
    ``render(messages)`` renders as ``text`` was rendered."""
    result = next((m for m in messages if m.get("role") in MASK_ROLES and m.get("content")),
                  None)
    if result is None:
        return
    changed = [{**m, "content": f"{m['content']} (changed)"} if m is result else m
               for m in messages]
    if render(changed) == text:
        raise DataError(f"{origin}: the chat template leaves out the {result['role']!r} "
                        "message's content (a tool's result): it writes the same text whatever "
                        f"it says. {TOOLS_HINT}")


def masked_spans(history: list, response: list, prompt_text: str, full: str, roles: tuple,
                 record, render) -> list[tuple[int, int]]:
    """(start, end) character spans, within the response's text (``full`` after
    ``prompt_text``), of the response's messages whose role is in ``roles``: each message's
    span is what rendering it adds to the dialogue before it (``render(messages)`` renders a
    dialogue as ``full`` was rendered).

    A template may write a run of such messages as one turn (Qwen2.5 puts parallel tool
    results in one user turn), so the dialogue through one of them ends differently once the
    next follows; a span then runs from where the dialogue before the message parts from
    ``full`` to where the dialogue through it does. Anywhere else, a dialogue that renders
    differently once later messages follow is refused: its spans cannot be told apart."""
    spans = []
    for k, message in enumerate(response):
        if message.get("role") not in roles:
            continue
        before = render(history + response[:k]) if k else prompt_text
        through = render(history + response[: k + 1])
        after_one = k > 0 and response[k - 1].get("role") in roles
        before_one = k + 1 < len(response) and response[k + 1].get("role") in roles
        start, end = _shared(before, full), _shared(through, full)
        content = message.get("content")
        if not ((start == len(before) or after_one) and (end == len(through) or before_one)
                and end > start and (not isinstance(content, str)
                                     or content in full[start:end])):
            raise DataError(
                f"{record.origin}: the chat template renders the dialogue before the "
                f"{message['role']!r} message of a response differently once later messages "
                "follow, so its tokens cannot be told apart to leave them out of the loss. "
                "Set data.mask_roles: [] to train on them, or use a template that renders "
                "turns one after another.")
        spans.append((max(start, len(prompt_text)) - len(prompt_text), end - len(prompt_text)))
    return spans


def _shared(text: str, full: str) -> int:
    """How many leading characters ``text`` has in common with ``full``."""
    return len(os.path.commonprefix([text, full]))


def response_masks(tokenizer, item, response_ids: list, prompt_tokens: list) -> list[list[bool]]:
    """Per response slot of ``item`` (a rendered record), True for each token of
    ``response_ids`` that is scored: a token is left out when it starts inside one of the
    slot's masked spans (its character offsets, from the fast tokenizer); tokens after the
    text's (the EOS that ends a response) are scored. ``prompt_tokens[k]``: slot k's ids are
    those of its prompt and response encoded as one text after the prompt's first
    ``prompt_tokens[k]``, or None for ids of the response encoded alone."""
    masks = []
    for prompt, text, spans, ids, skip in zip(item.prompt_texts, item.response_texts,
                                              item.masked_spans, response_ids, prompt_tokens):
        if not spans:
            masks.append([True] * len(ids))
            continue
        shift = 0 if skip is None else len(prompt)
        try:
            encoded = tokenizer(prompt[:shift] + text, add_special_tokens=False,
                                return_offsets_mapping=True)
        except NotImplementedError:  # slow tokenizers have no offsets
            raise DataError(f"{item.record.origin}: leaving tool results out of the loss needs "
                            "a fast tokenizer (character offsets); set data.mask_roles: [] to "
                            "train on them.") from None
        own, offsets = (encoded[key][skip or 0:] for key in ("input_ids", "offset_mapping"))
        if own != ids[: len(own)]:
            raise DataError(f"{item.record.origin}: the tokenizer encodes the response to other "
                            "ids when asked for character offsets; set data.mask_roles: [] to "
                            "train on its tool results.")
        masks.append([not any(start <= first - shift < end for start, end in spans)
                      for first, _ in offsets] + [True] * (len(ids) - len(own)))
    return masks
