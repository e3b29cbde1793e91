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

from dataclasses import dataclass, field

import torch

from .tokenize import TokenizedExample

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
    position_ids: torch.Tensor | None = None  # [rows, T]
    unit_ids: torch.Tensor | None = None  # [rows, T], -1 on padding
    segment_ids: torch.Tensor | None = None  # [rows, T], -1 on prompt tokens
    last_token_positions: torch.Tensor | None = None  # [num_responses] flat index of each end
    token_type_ids: torch.Tensor | None = None  # [rows, T] encoders: 1 on response tokens

    @property
    def num_examples(self) -> int:
        return self.example_indices.shape[0]

    @property
    def num_responses(self) -> int:
        return self.num_examples * self.responses_per_example

    @property
    def real_tokens(self) -> int:
        return int(self.attention_mask.sum())

    @property
    def padding_fraction(self) -> float:
        return 1.0 - self.real_tokens / self.attention_mask.numel()

    def to(self, device) -> "Batch":
        moved = {
            name: value.to(device) if isinstance(value, torch.Tensor) else value
            for name, value in self.__dict__.items()
        }
        moved["scores"] = {k: v.to(device) for k, v in self.scores.items()}
        return Batch(**moved)

    def _may_attend(self, row, query, key):
        """The layouts' visibility rule, elementwise: causal, inside one unit, and to prompt
        tokens or the query's own response segment; padding attends to itself only."""
        unit, segment = self.unit_ids, self.segment_ids
        same_unit = (unit[row, query] == unit[row, key]) & (unit[row, query] >= 0)
        visible = (segment[row, key] == -1) | (segment[row, query] == segment[row, key])
        return ((key <= query) & same_unit & visible) | (key == query)

    def attention_bias(self, dtype: torch.dtype) -> torch.Tensor:
        """Additive [rows, 1, T, T] mask for layouts with units/segments (0 = may attend)."""
        rows, width = self.input_ids.shape
        device = self.input_ids.device
        allowed = self._may_attend(torch.arange(rows, device=device)[:, None, None],
                                   torch.arange(width, device=device)[None, :, None],
                                   torch.arange(width, device=device)[None, None, :])
        bias = torch.zeros(rows, 1, width, width, dtype=dtype, device=device)
        return bias.masked_fill_(~allowed[:, None], torch.finfo(dtype).min)

    def block_mask(self):
        """The same rule as a FlexAttention BlockMask: block-sparse, never a dense [T, T] mask,
        so fully masked blocks (other units, other responses) cost no compute."""
        from torch.nn.attention.flex_attention import create_block_mask

        rows, width = self.input_ids.shape
        return create_block_mask(lambda b, h, q, k: self._may_attend(b, q, k), rows, None,
                                 width, width, device=self.input_ids.device)


def collate(examples: list[TokenizedExample], pad_token_id: int, layout: str = "padded",
            max_row_tokens: int | None = None) -> Batch:
    """Lay ``examples`` out as a Batch. ``max_row_tokens`` caps packed rows (never splits a unit)."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
    per_example = len(examples[0].response_ids)
    shared, packed = "prefix_shared" in layout, layout.startswith("packed")
    if shared:  # a unit is (example, the response slots it holds)
        units = [(e, list(range(per_example))) for e in range(len(examples))]
    else:
        units = [(e, [r]) for e in range(len(examples)) for r in range(per_example)]
    sizes = [len(examples[e].prompt_ids) + sum(len(examples[e].response_ids[r]) for r in slots)
             for e, slots in units]
    rows = _pack(sizes, max_row_tokens) if packed else [[u] for u in range(len(units))]
    width = max(sum(sizes[u] for u in row) for row in rows)

    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    unit_ids = torch.full((len(rows), width), -1, dtype=torch.long)
    segment_ids = torch.full((len(rows), width), -1, dtype=torch.long)
    positions, targets, owners, offsets = [], [], [], []
    ends = torch.zeros(len(examples) * per_example, dtype=torch.long)
    for row_number, row in enumerate(rows):
        cursor = 0
        for unit_in_row, unit in enumerate(row):
            e, slots = units[unit]
            prompt = examples[e].prompt_ids
            span = slice(cursor, cursor + len(prompt))
            input_ids[row_number, span] = torch.tensor(prompt)
            position_ids[row_number, span] = torch.arange(len(prompt))
            unit_ids[row_number, span] = unit_in_row
            last_prompt_position = cursor + len(prompt) - 1
            cursor += len(prompt)
            for r in slots:
                response = examples[e].response_ids[r]
                span = slice(cursor, cursor + len(response))
                input_ids[row_number, span] = torch.tensor(response)
                position_ids[row_number, span] = torch.arange(len(prompt), len(prompt) + len(response))
                unit_ids[row_number, span] = unit_in_row
                segment_ids[row_number, span] = r
                # the first response token is predicted by the last prompt token, each later
                # one by the response token before it
                predictors = [last_prompt_position] + list(range(cursor, cursor + len(response) - 1))
                positions.append(torch.tensor(predictors) + row_number * width)
                targets.append(torch.tensor(response))
                owners.append(torch.full((len(response),), e * per_example + r))
                offsets.append(torch.arange(len(response)))
                cursor += len(response)
                ends[e * per_example + r] = row_number * width + cursor - 1
        attention_mask[row_number, :cursor] = 1
    custom_mask = shared or packed
    return Batch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        logit_positions=torch.cat(positions),
        target_tokens=torch.cat(targets),
        target_response=torch.cat(owners),
        target_offset=torch.cat(offsets),
        example_indices=torch.tensor([ex.index for ex in examples]),
        responses_per_example=per_example,
        scores=_collate_scores(examples),
        position_ids=position_ids if custom_mask else None,
        unit_ids=unit_ids if custom_mask else None,
        segment_ids=segment_ids if custom_mask else None,
        last_token_positions=ends,
    )


def choose_layout(examples: list[TokenizedExample]) -> str:
    """Prefix sharing when there are several responses per prompt and the prompt is longer than
    a response on average (it then saves more tokens than its mask costs); else plain padding.
    """
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
