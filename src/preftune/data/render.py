"""A record's prompts and responses as text, written by the chat template as the model reads
them.

A chat answer is what the template writes after the prompt: the dialogue is rendered with the
answer and the prompt (rendered with the generation prompt) is cut off its front. So an answer
trains as a chat shows it: trimmed where the template trims (Llama 3, Gemma), after the empty
reasoning block a reasoning template puts before a final answer (Qwen3). A response given as a
string is text the model wrote after the generation prompt (an online sample), used as it is.
"""

from __future__ import annotations

from .records import DataError, response_text
from .tools import TOOLS_HINT, called_names, check_results_written, masked_spans
from .turn_end import ResponseEnds


def prompt_texts(record, tokenizer) -> list[str]:
    """Each response slot's prompt as text (chat template with the generation prompt for message
    lists); a prompt that several slots share is rendered once."""
    rendered: dict[int, str] = {}
    for prompt in record.prompts:
        if id(prompt) not in rendered:
            rendered[id(prompt)] = (chat(tokenizer, prompt, record, add_generation_prompt=True)
                                    if isinstance(prompt, list) else prompt)
    return [rendered[id(prompt)] for prompt in record.prompts]


def rendered_response(response, prompt, prompt_text: str, tokenizer, record,
                      ends: ResponseEnds, mask_roles: tuple = (),
                      unfinished: bool = False) -> tuple[str, list]:
    """The response as text, and the (start, end) character spans of its messages whose role
    is in ``mask_roles`` (tool results: not scored). An ``unfinished`` response (cut off at a
    length limit) ends without the end of a turn."""
    if isinstance(response, str):
        return response, []
    single = _single_answer(response)
    if single:
        content = _answer(response, record)
        if unfinished or not isinstance(prompt, list):
            # a cut-off answer as written (a template would close it, or read a reasoning
            # block it never finished as the answer); after a plain prompt there is no chat
            return content, []
    history = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
    if not isinstance(prompt, list):
        prompt_text = chat(tokenizer, history, record, add_generation_prompt=True)
    # a dialogue whose last answer was cut off: the turns before it as the template writes
    # them, then that answer as written after the generation prompt
    cut_answer = unfinished and not single and _single_answer(response[-1:])
    if cut_answer:
        full = chat(tokenizer, history + response[:-1], record, add_generation_prompt=True) \
            + _answer(response[-1:], record)
    else:
        full = chat(tokenizer, history + response, record, add_generation_prompt=False)
    if not full.startswith(prompt_text):
        if single:  # the generation prompt opens the answer itself (DeepSeek-R1's "<think>")
            return content, []
        raise DataError(
            f"{record.origin}: the chat template renders the prompt differently when a "
            f"multi-turn response follows it, so the response cannot be cut off exactly. "
            f"Give the response as a single assistant message or a string."
        )
    continuation = full[len(prompt_text) :]
    if not cut_answer:
        continuation = _closed(continuation, ends, unfinished)
    if single:
        return continuation, []
    spans = masked_spans(history, response, prompt_text, full, mask_roles, record,
                         lambda messages: chat(tokenizer, messages, record, False))
    return continuation, [(start, min(end, len(continuation))) for start, end in spans
                          if start < len(continuation)]


def _closed(continuation: str, ends: ResponseEnds, unfinished: bool) -> str:
    """A rendered response up to its final end of turn (left out when ``unfinished``): the
    template's separator after it is not part of the response, nor is the plain text a
    template without one writes after an answer (EOS ends it)."""
    if ends.turn_text and ends.turn_text in continuation:
        return continuation[: continuation.rindex(ends.turn_text)
                            + (0 if unfinished else len(ends.turn_text))]
    if ends.separator and continuation.endswith(ends.separator):
        return continuation[: -len(ends.separator)]
    return continuation


def is_empty(response) -> bool:
    """A response with no text: an empty or blank string or single answer."""
    return ((isinstance(response, str) or _single_answer(response))
            and not response_text(response).strip())


def _single_answer(response: list) -> bool:
    """One assistant message that calls no tool (tool calls: the template writes them)."""
    return (len(response) == 1 and response[0].get("role") == "assistant"
            and not response[0].get("tool_calls"))


def _answer(response: list, record) -> str:
    """A single assistant message's text; an image part in it is refused."""
    content = response[0]["content"]
    if not isinstance(content, str) and any(p.get("type") == "image" for p in content):
        raise DataError(f"{record.origin}: a response holds an image part; images go in the "
                        "prompt only (a response cannot show one). Move it into the prompt.")
    return response_text(response)


def chat(tokenizer, messages: list, record, add_generation_prompt: bool) -> str:
    """``messages`` rendered by the chat template (with the record's ``tools``), checked to
    show the tools (in a prompt) and every tool call: a template that leaves them out is
    refused rather than trained on."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(
            f"{record.origin}: conversational record, but the tokenizer has no chat template. "
            f"Set model.chat_template (a .jinja file or the Jinja text; --chat-template for "
            f"`preftune eval` and `preftune data inspect`), or use a model whose tokenizer has "
            f"one (an instruct model)."
        )
    tools = list(getattr(record, "tools", ()))
    text = _apply_template(tokenizer, messages, tools, add_generation_prompt, record)
    if tools and add_generation_prompt and text == _apply_template(tokenizer, messages, [],
                                                                   True, record):
        raise DataError(f"{record.origin}: field 'tools': the chat template writes the same "
                        f"prompt with and without them, so the model would never see the "
                        f"tools. {TOOLS_HINT}")
    names = called_names(messages)
    if names and text == _apply_template(tokenizer, [_without_calls(m) for m in messages],
                                         tools, add_generation_prompt, record):
        raise DataError(f"{record.origin}: the chat template leaves out the tool call to "
                        f"{names[0]!r} (a message's 'tool_calls'): it writes the same text "
                        f"without it. {TOOLS_HINT}")
    check_results_written(messages, text, lambda changed: _apply_template(
        tokenizer, changed, tools, add_generation_prompt, record), record.origin)
    return text


def _apply_template(tokenizer, messages: list, tools: list, add_generation_prompt: bool,
                    record) -> str:
    try:
        return tokenizer.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, tokenize=False,
            **({"tools": tools} if tools else {}))
    except Exception as error:  # template errors come as jinja or ValueError types
        raise DataError(
            f"{record.origin}: the chat template rejected these messages ({error}). Check the "
            f"roles and their order, and that the template is one for this kind of content "
            f"(images need a vision model's template)."
        ) from None


def _without_calls(message: dict) -> dict:
    if "tool_calls" not in message:
        return message
    bare = {k: v for k, v in message.items() if k != "tool_calls"}
    return {**bare, "content": bare.get("content", "")}
