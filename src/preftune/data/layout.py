"""Tokenized examples -> a Batch the model can run, in one of three layouts.

- ``padded``: one row per (prompt + response), right-padded. The plain path.
- ``prefix_shared``: one row per example, ``[prompt | response 0 | response 1 | ...]``; each
  response sees the prompt and its own tokens only, and its positions restart at the prompt end,
  so the prompt is computed once for all responses.
- ``packed``: several units laid end to end in a row (padding-free); attention never crosses a
  unit's boundary. Combines with prefix sharing (``packed_prefix_shared``).

Every layout describes the same thing: for each response token, where its predicting hidden
state sits (``logit_positions``), which token it is (``target_tokens``) and which response it
belongs to (``target_response``). The forward pass reads only those, so a layout changes how
tokens are arranged, never the numbers that come out.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass, field

import torch

from .tokenize import TokenizedExample
from .vision import ImageInputs
from .vision_qwen import mrope_positions

LAYOUTS = ("padded", "prefix_shared", "packed", "packed_prefix_shared")


@dataclass
class Batch:
    """A model-ready batch of ``num_examples`` records with ``responses_per_example`` each.

    Responses are numbered example-major: response ``e * R + r`` is slot ``r`` of example ``e``.
    ``unit_ids``/``segment_ids`` are set only by layouts that need a custom attention mask: a
    token attends to earlier tokens of its own unit that are prompt (segment -1) or its own
    response segment.
    """

    input_ids: torch.Tensor  # [rows, T]
    attention_mask: torch.Tensor  # [rows, T], 1 = real token
    logit_positions: torch.Tensor  # [n_targets] flat index into rows * T
    target_tokens: torch.Tensor  # [n_targets]
    target_response: torch.Tensor  # [n_targets] response number
    target_offset: torch.Tensor  # [n_targets] position of the token inside its response
    example_indices: torch.Tensor  # [num_examples] dataset index of each example
    responses_per_example: int
    scores: dict = field(default_factory=dict)  # name -> [num_examples] float tensor
    position_ids: torch.Tensor | None = None  # [rows, T]; M-RoPE models: [3, rows, T]
    unit_ids: torch.Tensor | None = None  # [rows, T], -1 on padding
    segment_ids: torch.Tensor | None = None  # [rows, T], -1 on prompt tokens
    last_token_positions: torch.Tensor | None = None  # [num_responses] flat index of each end
    token_type_ids: torch.Tensor | None = None  # [rows, T] encoders: 1 on response tokens
    response_lengths: torch.Tensor | None = None  # [num_responses] tokens of each response
    # padded and packed rows: the length of each sequence in the flattened rows (a row's or
    # unit's tokens, the padding after them), for varlen attention (model/varlen.py)
    sequence_lengths: tuple = ()
    # known on the host when the batch is built, so a step never reads them back from a device
    example_ids: tuple = ()  # example_indices as Python ints
    real_tokens: int = 0  # tokens that are not padding
    longest_response: int = 0
    longest_sequence: int = 0  # prompt + response, as if written out alone
    # vision-language batches: the pixel inputs of the batch's distinct images (processor
    # output, stacked), each image-token position (flat index into rows * T) and which row of
    # the concatenated image features goes there
    image_inputs: dict = field(default_factory=dict)
    image_positions: torch.Tensor | None = None
    image_features_index: torch.Tensor | None = None
    image_feature_rows: int = 0
    _masks: dict = field(default_factory=dict, repr=False, compare=False)  # built once per batch

    @property
    def num_examples(self) -> int:
        return self.example_indices.shape[0]

    @property
    def num_responses(self) -> int:
        return self.num_examples * self.responses_per_example

    @property
    def padding_fraction(self) -> float:
        return 1.0 - self.real_tokens / self.attention_mask.numel()

    def to(self, device, non_blocking: bool = False) -> "Batch":
        """The batch on ``device`` (non-blocking copies from pinned memory when asked)."""
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "Batch":
        """The batch in page-locked host memory, so copies to a GPU can overlap compute."""
        return self._map(torch.Tensor.pin_memory)

    def _map(self, move) -> "Batch":
        """A new batch with ``move`` applied to every tensor (scores included); the masks
        built for this one are not carried over."""
        fields = {name: move(value) if isinstance(value, torch.Tensor) else value
                  for name, value in self.__dict__.items() if name != "_masks"}
        fields["scores"] = {k: move(v) for k, v in self.scores.items()}
        fields["image_inputs"] = {k: move(v) for k, v in self.image_inputs.items()}
        return Batch(**fields)

    @property
    def max_seqlen(self) -> int:
        return max(self.sequence_lengths, default=0)

    def cu_seqlens(self) -> torch.Tensor | None:
        """Where each sequence starts in the flattened rows, [sequences + 1] int32 on the
        batch's device, built once per batch (None for prefix-shared rows)."""
        if not self.sequence_lengths:
            return None
        if "cu_seqlens" not in self._masks:
            self._masks["cu_seqlens"] = torch.tensor(
                [0, *itertools.accumulate(self.sequence_lengths)], dtype=torch.int32,
                device=self.input_ids.device)
        return self._masks["cu_seqlens"]

    def attention_bias(self, dtype: torch.dtype, window: int | None = None,
                       image_token: int | None = None) -> torch.Tensor:
        """Additive [rows, 1, T, T] mask (0 = may attend), built once per batch: the layouts'
        visibility rule, or for padded rows causal attention to the row's real tokens. With
        ``image_token``, also both ways within each run of that token (one image's tokens,
        as Gemma 3 attends). With a sliding ``window``, then only to keys fewer than
        ``window`` positions back in the query's own sequence (positions restart after a
        shared prompt, so a response's distance to its prompt is the one it has when written
        out alone)."""
        cache_key = ("bias", dtype, window, image_token)
        if cache_key not in self._masks:
            rows, width = self.input_ids.shape
            device = self.input_ids.device
            row = torch.arange(rows, device=device)[:, None, None]
            query = torch.arange(width, device=device)[None, :, None]
            key = torch.arange(width, device=device)[None, None, :]
            if self.unit_ids is None:
                allowed = (key <= query) & (self.attention_mask[row, key] > 0)
                distance = query - key
            else:
                allowed = _visibility(self.unit_ids, self.segment_ids)(row, None, query, key)
                if window is not None:
                    if self.position_ids is None or self.position_ids.dim() != 2:
                        raise ValueError("a sliding window over shared or packed rows needs "
                                         "their 1-D positions (M-RoPE rows have none)")
                    distance = self.position_ids[row, query] - self.position_ids[row, key]
            if image_token is not None:
                block = image_blocks(self.input_ids, image_token)
                allowed |= (block[row, query] == block[row, key]) & (block[row, query] >= 0)
            if window is not None:
                allowed &= (distance < window) | (key == query)
            bias = torch.zeros(rows, 1, width, width, dtype=dtype, device=device)
            self._masks[cache_key] = bias.masked_fill_(~allowed[:, None], torch.finfo(dtype).min)
        return self._masks[cache_key]

    def column_positions(self) -> torch.Tensor:
        """[rows, T] positions 0, 1, ... of right-padded rows, built once per batch."""
        if "positions" not in self._masks:
            rows, width = self.input_ids.shape
            self._masks["positions"] = torch.arange(
                width, device=self.input_ids.device).expand(rows, width)
        return self._masks["positions"]

    def block_mask(self):
        """The same rule as a FlexAttention BlockMask, built once per batch from one fixed mask
        function: block-sparse, never a dense [T, T] mask, so fully masked blocks (other units,
        other responses) cost no compute."""
        if "block" not in self._masks:
            from torch.nn.attention.flex_attention import create_block_mask

            rows, width = self.input_ids.shape
            self._masks["block"] = create_block_mask(
                _visibility(self.unit_ids, self.segment_ids), rows, None, width, width,
                device=self.input_ids.device)
        return self._masks["block"]


def image_blocks(input_ids: torch.Tensor, image_token: int) -> torch.Tensor:
    """[rows, T]: for each position holding ``image_token``, the number of its run of them in
    the row (0, 1, ...: one image each), -1 elsewhere."""
    is_image = input_ids == image_token
    starts = is_image & ~torch.nn.functional.pad(is_image, (1, 0))[:, :-1]
    return torch.where(is_image, starts.long().cumsum(1) - 1, -1)


def _visibility(unit: torch.Tensor, segment: torch.Tensor):
    """The layouts' visibility rule as a FlexAttention mask function (elementwise): causal,
    inside one unit, and to prompt tokens (segment -1) or the query's own response segment;
    padding attends to itself only. The same code for every batch, so compiled FlexAttention
    kernels are reused across steps of the same shape."""

    def may_attend(row, head, query, key):
        same_unit = (unit[row, query] == unit[row, key]) & (unit[row, query] >= 0)
        visible = (segment[row, key] == -1) | (segment[row, query] == segment[row, key])
        return ((key <= query) & same_unit & visible) | (key == query)

    return may_attend


def collate(examples: list[TokenizedExample], pad_token_id: int, layout: str = "padded",
            max_row_tokens: int | None = None, pad_to_multiple_of: int = 1,
            images: ImageInputs | None = None) -> Batch:
    """Lay ``examples`` out as a Batch. ``max_row_tokens`` caps packed rows (never splits a unit);
    ``pad_to_multiple_of`` rounds the row width up (shape buckets for compiled code, FlexAttention
    blocks). Everything is built as Python lists and turned into tensors once per field; the
    counts the step needs on the host are kept as plain numbers. Examples with images need the
    model's ``images`` (``tokenizer.image_inputs``): each distinct image of the batch is
    processed once and its features feed every row that shows it."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
    per_example = len(examples[0].response_ids)
    shared, packed = "prefix_shared" in layout, layout.startswith("packed")
    if shared:  # a unit is (example, the response slots that share its prompt and images)
        units = [(e, slots) for e in range(len(examples))
                 for slots in _same_images(examples[e], per_example)]
    else:
        units = [(e, (r,)) for e in range(len(examples)) for r in range(per_example)]
    sizes = [len(examples[e].prompt_ids) + sum(len(examples[e].response_ids[r]) for r in slots)
             for e, slots in units]
    rows = _pack(sizes, max_row_tokens) if packed else [[u] for u in range(len(units))]
    used = [sum(sizes[u] for u in row) for row in rows]
    width = -(-max(used) // pad_to_multiple_of) * pad_to_multiple_of

    ids, position, unit_of, segment = [], [], [], []  # per row, each `width` long
    sequences = [length for row, total in zip(rows, used) for length in
                 [*(sizes[u] for u in row), width - total] if length] if not shared else []
    predictors, targets, owners, offsets = [], [], [], []
    lengths = [0] * (len(examples) * per_example)
    ends = [0] * len(lengths)
    pictures = _ImageTable(images) if any(ex.images for ex in examples) else None
    mrope = images is not None and images.mrope  # 3-D positions (data/vision_qwen.py)
    position3: list = [[], [], []]
    for row_number, row in enumerate(rows):
        base, row_ids, row_pos, row_unit, row_seg = row_number * width, [], [], [], []
        row_pos3: list = [[], [], []]
        for unit_in_row, unit in enumerate(row):
            e, slots = units[unit]
            prompt = examples[e].prompt_ids
            if pictures is not None:
                pictures.add(examples[e], slots[0], base + len(row_ids))
            row_ids += prompt
            row_pos += range(len(prompt))
            if mrope:  # the prompt's grid positions; responses continue from `after`
                prompt3, after = mrope_positions(
                    prompt, images.image_token_id,
                    [images.grid(image) for image in examples[e].images_of_slot(slots[0])])
                for axis in range(3):
                    row_pos3[axis] += prompt3[axis]
            row_unit += [unit_in_row] * len(prompt)
            row_seg += [-1] * len(prompt)
            last_prompt_position = base + len(row_ids) - 1
            for r in slots:
                response, k = examples[e].response_ids[r], e * per_example + r
                start = base + len(row_ids)
                # the first response token is predicted by the last prompt token, each later
                # one by the response token before it
                predicted_by = [last_prompt_position, *range(start, start + len(response) - 1)]
                scored = response
                if examples[e].response_masks:  # tool results: in the row, not scored
                    mask = examples[e].response_masks[r]
                    predicted_by = [p for p, keep in zip(predicted_by, mask) if keep]
                    scored = [token for token, keep in zip(response, mask) if keep]
                if response:
                    predictors += predicted_by
                targets += scored
                owners += [k] * len(scored)
                offsets += range(len(scored))
                lengths[k], ends[k] = len(scored), start + len(response) - 1
                row_ids += response
                row_pos += range(len(prompt), len(prompt) + len(response))
                if mrope:
                    for axis in range(3):
                        row_pos3[axis] += range(after, after + len(response))
                row_unit += [unit_in_row] * len(response)
                row_seg += [r] * len(response)
        pad = width - len(row_ids)
        ids.append(row_ids + [pad_token_id] * pad)
        position.append(row_pos + [0] * pad)
        if mrope:
            for axis in range(3):
                position3[axis].append(row_pos3[axis] + [0] * pad)
        unit_of.append(row_unit + [-1] * pad)
        segment.append(row_seg + [-1] * pad)
    custom_mask = shared or packed
    long = functools.partial(torch.tensor, dtype=torch.long)
    units_tensor = long(unit_of)
    positions = long(position3) if mrope else long(position) if custom_mask else None
    return Batch(
        input_ids=long(ids),
        attention_mask=(units_tensor >= 0).long(),
        logit_positions=long(predictors),
        target_tokens=long(targets),
        target_response=long(owners),
        target_offset=long(offsets),
        example_indices=long([ex.index for ex in examples]),
        responses_per_example=per_example,
        scores=_collate_scores(examples),
        position_ids=positions,
        unit_ids=units_tensor if custom_mask else None,
        segment_ids=long(segment) if custom_mask else None,
        last_token_positions=long(ends),
        response_lengths=long(lengths),
        sequence_lengths=tuple(sequences),
        example_ids=tuple(ex.index for ex in examples),
        real_tokens=sum(used),
        longest_response=max(lengths),
        longest_sequence=max(len(ex.prompt_ids) + len(response) for ex in examples
                             for response in ex.response_ids),
        **(pictures.fields() if pictures is not None else {}),
    )


def _same_images(example: TokenizedExample, per_example: int) -> list:
    """The example's response slots grouped by the images they are conditioned on (one group
    unless a slot has its own images, like mDPO's corrupted-image slot), in slot order."""
    if not example.slot_images:
        return [range(per_example)]
    groups: dict = {}
    for slot in range(per_example):
        groups.setdefault(id(example.images_of_slot(slot)), []).append(slot)
    return list(groups.values())


class _ImageTable:
    """The distinct images of a batch in feature order, and for each image-token position the
    feature row that fills it."""

    def __init__(self, images: ImageInputs | None):
        if images is None:
            raise ValueError("examples with images need the model's image inputs "
                             "(collate(..., images=tokenizer.image_inputs))")
        self.images, self.offsets, self.order, self.total = images, {}, [], 0
        self.positions: list[int] = []
        self.rows: list[int] = []

    def add(self, example: TokenizedExample, slot: int, prompt_start: int) -> None:
        token = self.images.image_token_id
        for image, count in zip(example.images_of_slot(slot), example.image_token_counts):
            if image.key not in self.offsets:
                self.offsets[image.key] = self.total
                self.order.append(image)
                self.total += count
            self.rows += range(self.offsets[image.key], self.offsets[image.key] + count)
        self.positions += [prompt_start + i for i, t in enumerate(example.prompt_ids)
                           if t == token]

    def fields(self) -> dict:
        return {"image_inputs": self.images.pixels(self.order),
                "image_positions": torch.tensor(self.positions, dtype=torch.long),
                "image_features_index": torch.tensor(self.rows, dtype=torch.long),
                "image_feature_rows": self.total}


def choose_layout(examples: list[TokenizedExample], configured: str = "auto",
                  attn_implementation: str | None = None) -> str:
    """The ``configured`` layout (``train.layout``), or for ``auto``: prefix sharing when there
    are several responses per prompt and the prompt is longer than a response on average (it
    then saves more tokens than its mask costs), else plain padding; under varlen attention
    packing, which then needs no mask (varlen cannot share prompts).
    """
    if configured != "auto":
        return configured
    if attn_implementation == "varlen":
        return "packed"
    per_example = len(examples[0].response_ids)
    prompt_tokens = sum(len(ex.prompt_ids) for ex in examples) / len(examples)
    response_tokens = sum(len(r) for ex in examples for r in ex.response_ids) / (
        len(examples) * per_example)
    return "prefix_shared" if per_example > 1 and prompt_tokens > response_tokens else "padded"


def collate_padded(examples: list[TokenizedExample], pad_token_id: int) -> Batch:
    """The plain layout: one right-padded row per (prompt + response)."""
    return collate(examples, pad_token_id, "padded")


def _pack(sizes: list[int], max_row_tokens: int | None) -> list[list[int]]:
    """First-fit decreasing: unit numbers grouped into rows of at most ``max_row_tokens``."""
    capacity = max(max_row_tokens or 0, max(sizes))
    rows: list[list[int]] = []
    room: list[int] = []
    for unit in sorted(range(len(sizes)), key=lambda u: -sizes[u]):
        fit = next((i for i, free in enumerate(room) if free >= sizes[unit]), None)
        if fit is None:
            rows.append([unit])
            room.append(capacity - sizes[unit])
        else:
            rows[fit].append(unit)
            room[fit] -= sizes[unit]
    return rows


def _collate_scores(examples: list[TokenizedExample]) -> dict:
    """Numeric side data per name: [E] for numbers, [E, K] for per-response lists."""
    names = set.intersection(*(set(ex.scores) for ex in examples)) if examples else set()
    return {
        name: torch.tensor([ex.scores[name] for ex in examples], dtype=torch.float32)
        for name in sorted(names)
    }
