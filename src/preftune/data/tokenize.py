"""Records -> token ids with an exact prompt/response boundary.

The prompt is rendered and encoded once; each response is encoded on its own and appended, so
no token ever spans the boundary and the prompt ids are a prefix of every sequence.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

from .records import DataError

ENCODE_CHUNK = 1024  # texts per batched tokenizer call: fast tokenizers parallelize a batch


@dataclass(frozen=True)
class TokenizeSettings:
    """Everything about tokenization that changes the ids (part of the reference-cache key)."""

    max_length: int = 1024  # prompt + one response, in tokens
    max_prompt_length: int | None = 512  # prompt alone; None = only max_length applies


@dataclass
class TokenizedExample:
    """One record in ids. ``response_ids[0]`` is chosen and ``[1]`` rejected for pairs
    (``[2]`` gold when present); one slot for unpaired, K in list order for ranked.
    ``scores`` is the record's ``side_data()`` (e.g. ``label``, ``response_scores``).

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


@dataclass
class TokenizeReport:
    """What tokenization did to a dataset; every dropped or altered record is counted."""

    records: int = 0
    kept: int = 0
    dropped_too_long: int = 0  # no room for even one response token
    empty_responses: int = 0  # a response was empty or whitespace: dropped
    empty_prompts: int = 0  # prompt rendered to zero tokens: nothing to condition on, dropped
    prompt_truncated: int = 0
    response_truncated: int = 0
    identical_responses: int = 0  # chosen text == rejected text: kept
    boundary_merges: int = 0  # joint tokenization would have merged across the boundary

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class _Rendered:
    """One record as text, before encoding."""

    index: int
    record: Any
    prompt_text: str
    prompt_prefix: list  # special ids put before a plain-string prompt (BOS)
    response_texts: list


def tokenize_records(
    records: Sequence, tokenizer, settings: TokenizeSettings
) -> tuple[list[TokenizedExample], TokenizeReport]:
    """Tokenize records (``Pair`` or anything with ``prompt``, ``responses``, ``origin``,
    ``scores``) into examples; returns them with a report of drops, truncations and merges."""
    if settings.max_length < 1:
        raise ValueError(f"max_length must be at least 1, got {settings.max_length}")
    if settings.max_prompt_length is not None and settings.max_prompt_length < 1:
        raise ValueError(f"max_prompt_length must be at least 1 or None, got "
                         f"{settings.max_prompt_length}")
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise DataError(
            "the tokenizer has no eos token, so responses cannot be closed. Set one, e.g. "
            "tokenizer.eos_token = '<|im_end|>' (the token that ends an assistant turn)."
        )
    report = TokenizeReport(records=len(records))
    string_prefix = _leading_special_ids(tokenizer)
    examples: list[TokenizedExample] = []
    rendered: list[_Rendered] = []
    for index, record in enumerate(records):
        item = _render(index, record, tokenizer, string_prefix)
        if any(not text.strip() for text in item.response_texts):
            report.empty_responses += 1
            continue
        if len(set(item.response_texts)) < len(item.response_texts):
            report.identical_responses += 1
        rendered.append(item)
        if len(rendered) == ENCODE_CHUNK:
            examples += _encode_chunk(rendered, tokenizer, eos_id, settings, report)
            rendered = []
    examples += _encode_chunk(rendered, tokenizer, eos_id, settings, report)
    report.kept = len(examples)
    return examples, report


def _leading_special_ids(tokenizer) -> list[int]:
    """The ids the tokenizer puts before the text when asked for special tokens (usually BOS).

    Only the leading ones: some tokenizers also append EOS, which must not end a prompt.
    """
    plain = _encode(tokenizer, ["a"], add_special_tokens=False)[0]
    full = _encode(tokenizer, ["a"], add_special_tokens=True)[0]
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return full[:start]
    return []


def _render(index: int, record, tokenizer, string_prefix: list) -> _Rendered:
    prompt = record.prompt
    if isinstance(prompt, list):
        prompt_text = _chat(tokenizer, prompt, record, add_generation_prompt=True)
        prefix: list = []  # a chat template writes its own BOS, if any, into the text
    else:
        prompt_text, prefix = prompt, string_prefix
    response_texts = [
        _response_text(response, prompt, prompt_text, tokenizer, record)
        for response in record.responses
    ]
    return _Rendered(index, record, prompt_text, prefix, response_texts)


def _response_text(response, prompt, prompt_text: str, tokenizer, record) -> str:
    if isinstance(response, str):
        return response
    if len(response) == 1 and response[0].get("role") == "assistant":
        return response[0]["content"]
    # a multi-turn continuation: render the whole dialogue and keep what follows the prompt
    history = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
    if not isinstance(prompt, list):
        prompt_text = _chat(tokenizer, history, record, add_generation_prompt=True)
    full = _chat(tokenizer, history + response, record, add_generation_prompt=False)
    if not full.startswith(prompt_text):
        raise DataError(
            f"{record.origin}: the chat template renders the prompt differently when a "
            f"multi-turn response follows it, so the response cannot be cut off exactly. "
            f"Give the response as a single assistant message or a string."
        )
    continuation = full[len(prompt_text) :]
    # the template's separator after the final end-of-turn token is not part of the response
    eos_text = tokenizer.eos_token
    if eos_text and eos_text in continuation:
        continuation = continuation[: continuation.rindex(eos_text) + len(eos_text)]
    return continuation


def _chat(tokenizer, messages: list, record, add_generation_prompt: bool) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(
            f"{record.origin}: conversational record, but the tokenizer has no chat template. "
            f"Use a tokenizer with one (an instruct model) or set tokenizer.chat_template."
        )
    try:
        return tokenizer.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, tokenize=False
        )
    except Exception as error:  # template errors come as jinja or ValueError types
        raise DataError(
            f"{record.origin}: the chat template rejected these messages ({error}). Check the "
            f"roles and their order."
        ) from None


def _encode(tokenizer, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
    if not texts:
        return []
    return tokenizer(list(texts), add_special_tokens=add_special_tokens)["input_ids"]


def _encode_chunk(
    items: list[_Rendered], tokenizer, eos_id: int, settings: TokenizeSettings,
    report: TokenizeReport,
) -> list[TokenizedExample]:
    if not items:
        return []
    prompts = _encode(tokenizer, [item.prompt_text for item in items], False)
    flat_responses = [text for item in items for text in item.response_texts]
    responses = _encode(tokenizer, flat_responses, False)
    joints = _encode(
        tokenizer, [item.prompt_text + text for item in items for text in item.response_texts],
        False,
    )
    examples = []
    cursor = 0
    for item, prompt_ids in zip(items, prompts):
        count = len(item.response_texts)
        response_ids = responses[cursor : cursor + count]
        merged = any(
            joint != prompt_ids + ids
            for joint, ids in zip(joints[cursor : cursor + count], response_ids)
        )
        cursor += count
        report.boundary_merges += merged
        prompt_ids = item.prompt_prefix + prompt_ids
        if not prompt_ids:
            report.empty_prompts += 1
            continue
        response_ids = [ids if ids[-1:] == [eos_id] else ids + [eos_id] for ids in response_ids]
        example = _truncate(item, prompt_ids, response_ids, settings)
        if example is None:
            report.dropped_too_long += 1
            continue
        report.prompt_truncated += example.prompt_truncated
        report.response_truncated += example.response_truncated
        examples.append(example)
    return examples


def _truncate(
    item: _Rendered, prompt_ids: list, response_ids: list, settings: TokenizeSettings
) -> TokenizedExample | None:
    """Keep the prompt's end and each response's start; None when no response token fits."""
    prompt_truncated = response_truncated = False
    limit = settings.max_prompt_length
    if limit is not None and len(prompt_ids) > limit:
        prompt_ids, prompt_truncated = prompt_ids[-limit:], True
    room = settings.max_length - len(prompt_ids)
    if room < 1:
        # a response needs at least one token; cut more of the prompt's start, keeping one
        if settings.max_length < 2:
            return None
        prompt_ids, prompt_truncated = prompt_ids[-(settings.max_length - 1) :], True
        room = 1
    if any(len(ids) > room for ids in response_ids):
        response_ids, response_truncated = [ids[:room] for ids in response_ids], True
    record = item.record
    return TokenizedExample(
        prompt_ids=prompt_ids,
        response_ids=response_ids,
        index=item.index,
        origin=getattr(record, "origin", ""),
        scores=_side_data(record),
        prompt_truncated=prompt_truncated,
        response_truncated=response_truncated,
    )


def _side_data(record) -> dict:
    """The numbers that go with the record into the batch (``side_data()`` on record types)."""
    if hasattr(record, "side_data"):
        return record.side_data()
    return dict(getattr(record, "scores", {}) or {})
