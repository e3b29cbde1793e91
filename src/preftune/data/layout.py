"""Tokenized examples -> a Batch the model can run.

Every layout describes the same thing: rows of token ids, plus, for each response token, where
its predicting hidden state sits (``logit_positions``), which token it is (``target_tokens``) and
which response it belongs to (``target_response``). The forward pass only reads those, so a
layout changes how tokens are arranged, never the numbers that come out.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .tokenize import TokenizedExample


@dataclass
class Batch:
    """A model-ready batch of ``num_examples`` records with ``responses_per_example`` each.

    Responses are numbered example-major: response ``e * R + r`` is slot ``r`` of example ``e``.
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


def collate_padded(examples: list[TokenizedExample], pad_token_id: int) -> Batch:
    """One row per (prompt + response), right-padded to the longest row."""
    responses_per_example = len(examples[0].response_ids)
    rows = [ex.prompt_ids + resp for ex in examples for resp in ex.response_ids]
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    positions, targets, owners, offsets = [], [], [], []
    for row_index, row in enumerate(rows):
        input_ids[row_index, : len(row)] = torch.tensor(row)
        attention_mask[row_index, : len(row)] = 1
        example = examples[row_index // responses_per_example]
        prompt_length = len(example.prompt_ids)
        response = row[prompt_length:]
        # the hidden state at position t predicts the token at t + 1
        start = row_index * width + prompt_length - 1
        positions.append(torch.arange(start, start + len(response)))
        targets.append(torch.tensor(response))
        owners.append(torch.full((len(response),), row_index))
        offsets.append(torch.arange(len(response)))
    return Batch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        logit_positions=torch.cat(positions),
        target_tokens=torch.cat(targets),
        target_response=torch.cat(owners),
        target_offset=torch.cat(offsets),
        example_indices=torch.tensor([ex.index for ex in examples]),
        responses_per_example=responses_per_example,
        scores=_collate_scores(examples),
    )


def _collate_scores(examples: list[TokenizedExample]) -> dict:
    names = set.intersection(*(set(ex.scores) for ex in examples)) if examples else set()
    return {
        name: torch.tensor([float(ex.scores[name]) for ex in examples]) for name in sorted(names)
    }
