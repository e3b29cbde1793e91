"""Records -> token ids with an exact prompt/response boundary.

The prompt is rendered and encoded once; each response is encoded on its own and appended, so
no token ever spans the boundary and the prompt ids are a prefix of every sequence. A joint
pair's two prompts are each encoded the same way; the example's prompt is the token prefix they
share and each response slot starts with the rest of its own prompt (see ``joint.py``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

from .image_tokens import (check_no_image_tokens, check_no_response_images, image_inputs,
                           with_image_tokens)
from .joint import cut_prompts, split_shared_prefix
from .records import DataError
from .tools import (MASK_ROLES, TOOLS_HINT, called_names, check_results_written, masked_spans,
                    response_masks)
from .turn_end import ResponseEnds

ENCODE_CHUNK = 1024  # texts per batched tokenizer call: fast tokenizers parallelize a batch


@dataclass(frozen=True)
class TokenizeSettings:
    """Everything about tokenization that changes the ids (part of the reference-cache key)."""

    max_length: int = 1024  # prompt + one response, in tokens
    max_prompt_length: int | None = 512  # prompt alone; None = only max_length applies
    # messages of these roles inside a multi-turn response are context the model did not
    # write (tool results): their tokens stay in the sequence but are left out of log-probs
    mask_roles: tuple = MASK_ROLES


@dataclass
class TokenizedExample:
    """One record in ids. ``response_ids[0]`` is chosen and ``[1]`` rejected for pairs
    (``[2]`` gold when present); one slot for unpaired, K in list order for ranked.
    ``scores`` is the record's ``side_data()`` (e.g. ``label``, ``response_scores``).

    ``index`` is the record's stable position in its dataset (used to look up cached reference
    stats); ``origin`` names the source record for error messages. ``own_prompt_lengths``
    (joint pairs only, else empty) counts, per response slot, the leading tokens that are the
    rest of that side's own prompt.
    """

    prompt_ids: list[int]
    response_ids: list[list[int]]
    index: int
    origin: str = ""
    scores: dict = field(default_factory=dict)
    prompt_truncated: bool = False
    response_truncated: bool = False
    own_prompt_lengths: list[int] = field(default_factory=list)
    # vision-language records (data/vision.py): the prompt's images (ImageRef), the image
    # tokens of each, images under which chosen should be less likely, and per response slot
    # the images it is scored under when they are not ``images`` (mDPO's conditional slot)
    images: tuple = ()
    image_token_counts: tuple = ()
    negative_images: tuple = ()
    slot_images: tuple = ()
    # held-out examples: the record's prompt (a string or messages; a joint pair's chosen
    # side's), for scoring answers to it (data.prepare)
    prompt: Any = None
    # per response slot, True for each token that is scored (False: a masked role's message,
    # e.g. a tool result inside a multi-turn response); () when every token is scored
    response_masks: tuple = ()

    def images_of_slot(self, slot: int) -> tuple:
        """The images response slot ``slot`` is conditioned on."""
        if self.slot_images and self.slot_images[slot] is not None:
            return self.slot_images[slot]
        return self.images


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
    boundary_merges: int = 0  # encoding prompt + response as one text would merge a token
    joint_pairs: int = 0  # kept pairs whose two sides have different prompts (DOVE)
    images: int = 0  # images shown by the kept records' prompts
    dropped_image_cut: int = 0  # the prompt limit would cut into an image's tokens: dropped
    masked_tokens: int = 0  # response tokens of masked roles (tool results): not scored

    def as_dict(self) -> dict:
        return asdict(self)

    def dropped(self) -> str:
        """How many records were dropped for each reason, with what to change."""
        return "; ".join(f"{count} {why}" for count, why in (
            (self.dropped_too_long, "left no room for a response token within data.max_length "
                                    "(raise it, or lower data.max_prompt_length)"),
            (self.dropped_image_cut, "would have an image's tokens cut by "
                                     "data.max_prompt_length (raise it: image tokens count "
                                     "toward it)"),
            (self.empty_responses, "have an empty response"),
            (self.empty_prompts, "have a prompt that renders to no tokens")) if count)


@dataclass
class _Rendered:
    """One record as text, before encoding."""

    index: int
    record: Any
    prompt_texts: list  # one per response slot; they differ only for a joint pair's two sides
    prompt_prefix: list  # special ids put before a plain-string prompt (BOS)
    response_texts: list
    masked_spans: list = field(default_factory=list)  # per slot: (start, end) chars not scored


def distinct_prompts(examples: Sequence[TokenizedExample]) -> list[TokenizedExample]:
    """The first example of each distinct prompt (by token ids and images), in data order."""
    seen: dict = {}
    for example in examples:
        seen.setdefault((tuple(example.prompt_ids), tuple(i.key for i in example.images)), example)
    return list(seen.values())


def tokenize_records(
    records: Sequence, tokenizer, settings: TokenizeSettings, keep_empty: bool = False,
    skipped: list | None = None,
) -> tuple[list[TokenizedExample], TokenizeReport]:
    """Tokenize records (``Pair``, ``JointPair``, ``Unpaired``, ``Ranked``, ``Rated``) into
    examples; returns them with a report of drops, truncations and merges. Records with an empty
    response are dropped for training; ``keep_empty`` keeps them (scoring a model's empty
    answer: the response is its end token alone). With a ``skipped`` list
    (``data.on_error: skip``), a record the chat template refuses is left out and the reason
    appended there."""
    if settings.max_length < 1:
        raise ValueError(f"max_length must be at least 1, got {settings.max_length}")
    if settings.max_prompt_length is not None and settings.max_prompt_length < 1:
        raise ValueError(f"max_prompt_length must be at least 1 or None, got "
                         f"{settings.max_prompt_length}")
    ends = ResponseEnds.of(tokenizer)  # (a tokenizer without EOS is refused here)
    report = TokenizeReport(records=len(records))
    string_prefix = _leading_special_ids(tokenizer)
    examples: list[TokenizedExample] = []
    rendered: list[_Rendered] = []
    for index, record in enumerate(records):
        try:
            item = _render(index, record, tokenizer, string_prefix, ends, settings.mask_roles)
        except DataError as error:
            if skipped is None:
                raise
            skipped.append(str(error))
            continue
        if any(not text.strip() for text in item.response_texts):
            report.empty_responses += 1
            if not keep_empty:
                continue
        if len(set(item.response_texts)) < len(item.response_texts):
            report.identical_responses += 1
        rendered.append(item)
        if len(rendered) == ENCODE_CHUNK:
            examples += _encode_chunk(rendered, tokenizer, ends, settings, report)
            rendered = []
    examples += _encode_chunk(rendered, tokenizer, ends, settings, report)
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


def _render(index: int, record, tokenizer, string_prefix: list, ends: ResponseEnds,
            mask_roles: tuple = ()) -> _Rendered:
    prompt_texts = _prompt_texts(record, tokenizer)
    if getattr(record, "images", ()):
        images = image_inputs(tokenizer, record)
        prompt_texts = [text if record.is_conversational else images.prompt_text(text)
                        for text in prompt_texts]
    # a chat template writes its own BOS, if any, into the text
    prefix = [] if record.is_conversational else string_prefix
    rendered = [
        _response_text(response, prompt, prompt_text, tokenizer, record, ends, mask_roles)
        for response, prompt, prompt_text in zip(record.responses, record.prompts, prompt_texts)
    ]
    spans = [found for _, found in rendered]
    return _Rendered(index, record, prompt_texts, prefix, [text for text, _ in rendered],
                     spans if any(spans) else [])


def _prompt_texts(record, tokenizer) -> list[str]:
    """Each response slot's prompt as text (chat template with the generation prompt for message
    lists); a prompt that several slots share is rendered once."""
    rendered: dict[int, str] = {}
    for prompt in record.prompts:
        if id(prompt) not in rendered:
            rendered[id(prompt)] = (_chat(tokenizer, prompt, record, add_generation_prompt=True)
                                    if isinstance(prompt, list) else prompt)
    return [rendered[id(prompt)] for prompt in record.prompts]


def _response_text(response, prompt, prompt_text: str, tokenizer, record, ends: ResponseEnds,
                   mask_roles: tuple = ()) -> tuple[str, list]:
    """The response as text, and the (start, end) character spans of its messages whose role
    is in ``mask_roles`` (tool results: not scored)."""
    if isinstance(response, str):
        return response, []
    if (len(response) == 1 and response[0].get("role") == "assistant"
            and not response[0].get("tool_calls")):  # tool calls: the template writes them
        content = response[0]["content"]
        if not isinstance(content, str) and any(p.get("type") == "image" for p in content):
            raise DataError(f"{record.origin}: a response holds an image part; images go in the "
                            "prompt only (a response cannot show one). Move it into the prompt.")
        return (content if isinstance(content, str) else "".join(
            part["text"] for part in content if part.get("type") == "text")), []
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
    # the template's separator after the final end-of-turn token is not part of the response,
    # nor is the plain text a template without one writes after an answer (EOS ends it)
    if ends.turn_text and ends.turn_text in continuation:
        continuation = continuation[: continuation.rindex(ends.turn_text) + len(ends.turn_text)]
    elif ends.separator and continuation.endswith(ends.separator):
        continuation = continuation[: -len(ends.separator)]
    spans = masked_spans(history, response, prompt_text, full, mask_roles, record,
                         lambda messages: _chat(tokenizer, messages, record, False))
    return continuation, [(start, min(end, len(continuation))) for start, end in spans
                          if start < len(continuation)]


def _chat(tokenizer, messages: list, record, add_generation_prompt: bool) -> str:
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


def _encode(tokenizer, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
    if not texts:
        return []
    return tokenizer(list(texts), add_special_tokens=add_special_tokens)["input_ids"]


def _encode_chunk(
    items: list[_Rendered], tokenizer, ends: ResponseEnds, settings: TokenizeSettings,
    report: TokenizeReport,
) -> list[TokenizedExample]:
    if not items:
        return []
    # each distinct prompt text of a record is encoded once
    distinct = [list(dict.fromkeys(item.prompt_texts)) for item in items]
    prompts = iter(_encode(tokenizer, [text for texts in distinct for text in texts], False))
    responses = iter(_encode(tokenizer, [t for item in items for t in item.response_texts], False))
    joints = iter(_encode(tokenizer, [prompt + response for item in items
                                      for prompt, response in zip(item.prompt_texts,
                                                                  item.response_texts)], False))
    examples = []
    for item, texts in zip(items, distinct):
        encoded = {text: next(prompts) for text in texts}
        side_prompts = [encoded[text] for text in item.prompt_texts]
        response_ids = [next(responses) for _ in item.response_texts]
        check_no_response_images(response_ids, item.record, tokenizer)
        # a list, not a generator: every slot's joint encoding must be consumed
        merged = [next(joints) != prompt + ids for prompt, ids in zip(side_prompts, response_ids)]
        report.boundary_merges += any(merged)
        side_prompts = [item.prompt_prefix + ids for ids in side_prompts]
        images = getattr(item.record, "images", ())
        counts: list = []
        if images:
            side_prompts, counts = with_image_tokens(side_prompts[0], item.record, tokenizer)
            side_prompts = [side_prompts] * len(response_ids)
        else:
            check_no_image_tokens(side_prompts, item.record, tokenizer)
        if not all(side_prompts):
            report.empty_prompts += 1
            continue
        shared, own = split_shared_prefix(side_prompts, getattr(item.record, "origin", ""))
        end = ends.of_record(item.record)  # (not after a response a length limit cut off)
        cut = getattr(item.record, "unfinished", ())
        response_ids = [ids if ids[-1:] == [end] or k in cut else ids + [end]
                        for k, ids in enumerate(response_ids)]
        masks = response_masks(tokenizer, item, response_ids) if item.masked_spans else []
        example = _truncate(item, shared, own, response_ids, settings, masks)
        if example is None:
            report.dropped_too_long += 1
            continue
        if images:
            image_tokens = tokenizer.image_inputs.image_token_id
            if sum(t == image_tokens for t in example.prompt_ids) != sum(counts):
                report.dropped_image_cut += 1
                continue
            example.images, example.image_token_counts = tuple(images), tuple(counts)
            example.negative_images = tuple(getattr(item.record, "negative_images", ()))
            report.images += len(images)
        report.masked_tokens += sum(not keep for mask in example.response_masks for keep in mask)
        report.prompt_truncated += example.prompt_truncated
        report.response_truncated += example.response_truncated
        report.joint_pairs += any(own)
        examples.append(example)
    return examples


def _truncate(
    item: _Rendered, shared: list, own: list, response_ids: list, settings: TokenizeSettings,
    masks: list = (),
) -> TokenizedExample | None:
    """Keep each prompt's end (``cut_prompts``) and each response's start, so every side fits
    ``max_length`` with at least one response token; None when that is impossible."""
    if settings.max_length < 2:
        return None  # a prompt token and a response token at the least
    limit = settings.max_length - 1
    if settings.max_prompt_length is not None:
        limit = min(limit, settings.max_prompt_length)
    shared, own, prompt_truncated = cut_prompts(shared, own, limit)
    rooms = [settings.max_length - len(shared) - len(part) for part in own]
    response_truncated = any(len(ids) > room for ids, room in zip(response_ids, rooms))
    record = item.record
    return TokenizedExample(
        prompt_ids=shared,
        response_ids=[part + ids[:room] for part, ids, room in zip(own, response_ids, rooms)],
        index=item.index,
        origin=getattr(record, "origin", ""),
        scores=_side_data(record),
        prompt_truncated=prompt_truncated,
        response_truncated=response_truncated,
        own_prompt_lengths=[len(part) for part in own] if any(own) else [],
        response_masks=tuple(tuple([True] * len(part) + mask[:room])
                             for part, mask, room in zip(own, masks, rooms)) if masks else (),
    )


def _side_data(record) -> dict:
    """The numbers that go with the record into the batch (``side_data()`` on record types)."""
    if hasattr(record, "side_data"):
        return record.side_data()
    return dict(getattr(record, "scores", {}) or {})
