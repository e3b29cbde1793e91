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
from .render import is_empty, prompt_texts, rendered_response
from .tools import MASK_ROLES, response_masks
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
    identical_responses: int = 0  # chosen == rejected, as written or once truncated: kept
    boundary_merges: int = 0  # encoding prompt + response as one text would merge a token
    joint_pairs: int = 0  # kept pairs whose two sides have different prompts (DOVE)
    images: int = 0  # images shown by the kept records' prompts
    dropped_image_cut: int = 0  # the prompt limit would cut into an image's tokens: dropped
    masked_tokens: int = 0  # response tokens of masked roles (tool results): not scored
    # per count above of left-out (or identical) records: where the first few were read
    origins: dict = field(default_factory=dict)

    def count(self, key: str, origin: str) -> None:
        """One more record counted under ``key``; the first few are named by origin."""
        setattr(self, key, getattr(self, key) + 1)
        named = self.origins.setdefault(key, [])
        if len(named) < 3 and origin:
            named.append(origin)

    def as_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "origins" or v}

    def e_g(self, key: str) -> str:
        """`` (e.g. f.jsonl:3, f.jsonl:9)``: where the first records counted under key are."""
        named = self.origins.get(key)
        return f" (e.g. {', '.join(named)})" if named else ""

    def dropped(self) -> str:
        """How many records were dropped for each reason, with what to change, and where."""
        return "; ".join(f"{getattr(self, key)} {why}{self.e_g(key)}" for key, why in (
            ("dropped_too_long", "left no room for a response token within data.max_length "
                                 "(raise it, or lower data.max_prompt_length)"),
            ("dropped_image_cut", "would have an image's tokens cut by data.max_prompt_length "
                                  "(raise it: image tokens count toward it)"),
            ("empty_responses", "have an empty response"),
            ("empty_prompts", "have a prompt that renders to no tokens")) if getattr(self, key))


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
        if any(is_empty(response) for response in record.responses):
            report.count("empty_responses", getattr(record, "origin", ""))
            if not keep_empty:
                continue
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
    texts = prompt_texts(record, tokenizer)
    if getattr(record, "images", ()):
        images = image_inputs(tokenizer, record)
        texts = [text if record.is_conversational else images.prompt_text(text)
                 for text in texts]
    # a chat template writes its own BOS, if any, into the text
    prefix = [] if record.is_conversational else string_prefix
    cut = getattr(record, "unfinished", ())
    rendered = [
        rendered_response(response, prompt, text, tokenizer, record, ends, mask_roles, k in cut)
        for k, (response, prompt, text) in enumerate(zip(record.responses, record.prompts,
                                                         texts))
    ]
    spans = [found for _, found in rendered]
    return _Rendered(index, record, texts, prefix, [text for text, _ in rendered],
                     spans if any(spans) else [])


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
    joints = iter(_encode(tokenizer, [prompt + response for item in items
                                      for prompt, response in zip(item.prompt_texts,
                                                                  item.response_texts)], False))
    examples = []
    for item, texts in zip(items, distinct):
        origin = getattr(item.record, "origin", "")
        encoded = {text: next(prompts) for text in texts}
        side_prompts = [encoded[text] for text in item.prompt_texts]
        # the prompt and response as one text: where its ids start with the prompt's, the rest
        # are the response's own (a tokenizer that marks a word's start, as SentencePiece's
        # "▁", writes the first word otherwise alone); else a token would span the boundary,
        # and the response is encoded alone (a list, not a generator: each slot is consumed)
        whole = [next(joints) for _ in item.response_texts]
        skips = [len(prompt) if ids[: len(prompt)] == prompt else None
                 for ids, prompt in zip(whole, side_prompts)]
        report.boundary_merges += None in skips
        response_ids = [ids[skip:] if skip is not None else _encode(tokenizer, [text], False)[0]
                        for ids, skip, text in zip(whole, skips, item.response_texts)]
        check_no_response_images(response_ids, item.record, tokenizer)
        side_prompts = [item.prompt_prefix + ids for ids in side_prompts]
        images = getattr(item.record, "images", ())
        counts: list = []
        if images:
            side_prompts, counts = with_image_tokens(side_prompts[0], item.record, tokenizer)
            side_prompts = [side_prompts] * len(response_ids)
        else:
            check_no_image_tokens(side_prompts, item.record, tokenizer)
        if not all(side_prompts):
            report.count("empty_prompts", origin)
            continue
        shared, own = split_shared_prefix(side_prompts, origin)
        end = ends.of_record(item.record)  # (not after a response a length limit cut off)
        cut = getattr(item.record, "unfinished", ())
        response_ids = [ids if ids[-1:] == [end] or k in cut else ids + [end]
                        for k, ids in enumerate(response_ids)]
        masks = response_masks(tokenizer, item, response_ids, skips) if item.masked_spans \
            else []
        example = _truncate(item, shared, own, response_ids, settings, masks)
        if example is None:
            report.count("dropped_too_long", origin)
            continue
        if images:
            image_tokens = tokenizer.image_inputs.image_token_id
            if sum(t == image_tokens for t in example.prompt_ids) != sum(counts):
                report.count("dropped_image_cut", origin)
                continue
            example.images, example.image_token_counts = tuple(images), tuple(counts)
            example.negative_images = tuple(getattr(item.record, "negative_images", ()))
            report.images += len(images)
        if len({tuple(ids) for ids in example.response_ids}) < len(example.response_ids):
            # (as written, or once truncation cut what told them apart)
            report.count("identical_responses", origin)
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
