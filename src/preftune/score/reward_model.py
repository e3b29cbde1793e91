"""A trained reward model as a scorer."""

from __future__ import annotations

import torch

from ..data.records import Pair, Rated
from ..reward.scoring import RewardScoring
from .base import checked


class RewardModelScorer:
    """Rewards from a ``preftune rm train`` model (the head's reward: BT score, weighted
    attributes, quantile mean or CVaR). A GPM model has no reward of one response: it is
    ``pairwise`` and answers ``prefer`` with P(first > second) = sigmoid(s / tau). A prompt is
    scored as the model was trained on it: with the tools it offers (``prompt.tools``)."""

    def __init__(self, scoring: RewardScoring, name: str):
        self.scoring, self.name = scoring, name
        self.pairwise = not scoring.head.has_reward

    @classmethod
    def from_pretrained(cls, path: str, batch_size: int = 16,
                        dtype: str = "float32") -> "RewardModelScorer":
        return cls(RewardScoring.load(path, batch_size, dtype=dtype), f"rm:{path}")

    def _images(self, prompt) -> tuple:
        """The images a prompt shows, for a vision-language reward model (a text-only one
        scores the text, as it was trained)."""
        seen = getattr(self.scoring.tokenizer, "image_inputs", None) is not None
        return tuple(getattr(prompt, "images", ())) if seen else ()

    def score(self, prompts, responses) -> list[float]:
        records = [Rated(p, r, origin=f"{self.name} input {i}", images=self._images(p),
                         tools=tuple(getattr(p, "tools", ())))
                   for i, (p, r) in enumerate(zip(prompts, responses, strict=True))]
        outputs = self.scoring.outputs(records)
        head = self.scoring.head
        return checked([head.reward(o[0]).item() for o in outputs], self.name, len(records))

    def prefer(self, prompts, first, second) -> list[float]:
        records = [Pair(p, a, b, origin=f"{self.name} input {i}", images=self._images(p),
                        tools=tuple(getattr(p, "tools", ())))
                   for i, (p, a, b) in enumerate(zip(prompts, first, second, strict=True))]
        head = self.scoring.head
        return [torch.sigmoid(head.preference_logit(o[0], o[1])).item()
                for o in self.scoring.outputs(records)]
