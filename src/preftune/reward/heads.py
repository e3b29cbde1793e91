"""Reward-model heads: what the K numbers a reward model outputs for one response mean.

Every head is one linear layer on the backbone's pooled hidden state (the last token of the
response for a decoder, the pooled [CLS] state for an encoder), so any head is stored as a plain
``AutoModelForSequenceClassification`` with ``num_labels = K``. This module turns those K raw
outputs into a reward, a preference between two responses, or a distribution:

- ``scalar`` (K = 1): r(x, y), the Bradley-Terry reward.
- ``attributes`` (K = number of attributes): one rating per attribute (HelpSteer2,
  arXiv:2406.08673); the reward is the weighted sum sum_a w_a r_a(x, y).
- ``quantile`` (K = number of levels): the reward distribution's quantiles q_tau(x, y) at levels
  tau (QRM, arXiv:2409.10164); the reward is their mean, or a lower-tail CVaR for risk-averse use.
- ``gpm`` (K = 2k): a preference embedding v(x, y) = normalize(W h) (GPM, arXiv:2410.02197); the
  preference score of y_i over y_j is s = <R v_i, v_j> with R block-diagonal [[0, -1], [1, 0]],
  and P(y_i > y_j) = sigmoid(s / tau). It has no scalar reward of a single response.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

KINDS = ("scalar", "attributes", "quantile", "gpm")
HEAD_FILE = "preftune_reward.json"  # written next to config.json in a saved reward model


class HeadError(ValueError):
    """A head setting that cannot work; the message names the key."""


@dataclass(frozen=True)
class Head:
    """A head kind and its settings (see the module docstring for what each kind means)."""

    kind: str = "scalar"
    attributes: tuple = ()  # attributes: the names of the K ratings, e.g. (helpfulness, ...)
    weights: tuple = ()  # attributes: w_a of the reward sum (default: 1/K each, their mean)
    quantiles: tuple = (0.05, 0.15, 0.25, 0.35, 0.45, 0.55, 0.65, 0.75, 0.85, 0.95)
    risk: str = "mean"  # quantile: the reward is "mean" or "cvar:ALPHA" (mean of levels <= ALPHA)
    dims: int = 4  # gpm: 2k, the embedding size (even)
    tau: float = 0.1  # gpm: temperature of P(y_i > y_j) = sigmoid(s / tau)
    target: str = "score"  # quantile: the rating the distribution is fit to

    def __post_init__(self):
        object.__setattr__(self, "attributes", tuple(self.attributes))
        object.__setattr__(self, "weights", tuple(float(w) for w in self.weights))
        object.__setattr__(self, "quantiles", tuple(float(q) for q in self.quantiles))
        if self.kind not in KINDS:
            raise HeadError(f"model.head.kind: unknown head {self.kind!r}; expected one of {KINDS}")
        if self.kind == "attributes":
            if not self.attributes:
                raise HeadError("model.head.attributes: an attributes head needs the names of its "
                                "ratings, e.g. [helpfulness, correctness, coherence].")
            if self.weights and len(self.weights) != len(self.attributes):
                raise HeadError(f"model.head.weights: {len(self.weights)} weights for "
                                f"{len(self.attributes)} attributes; give one per attribute.")
        if self.kind == "quantile":
            levels = self.quantiles
            if not levels or any(not 0 < q < 1 for q in levels) or list(levels) != sorted(levels):
                raise HeadError("model.head.quantiles: expected increasing levels strictly between "
                                f"0 and 1, got {list(levels)}.")
            self.risk_alpha()  # validates the spelling
        if self.kind == "gpm" and (self.dims < 2 or self.dims % 2):
            raise HeadError(f"model.head.dims: a GPM embedding has an even size of at least 2 "
                            f"(2k), got {self.dims}.")
        if self.kind == "gpm" and self.tau <= 0:
            raise HeadError(f"model.head.tau must be positive, got {self.tau}.")

    # -- shape ------------------------------------------------------------------------------

    @property
    def num_outputs(self) -> int:
        return {"scalar": 1, "attributes": len(self.attributes), "quantile": len(self.quantiles),
                "gpm": self.dims}[self.kind]

    @property
    def labels(self) -> list[str]:
        """One name per output (``config.id2label`` of the saved model)."""
        if self.kind == "attributes":
            return list(self.attributes)
        if self.kind == "quantile":
            return [f"q{q:g}" for q in self.quantiles]
        if self.kind == "gpm":
            return [f"v{i}" for i in range(self.dims)]
        return ["reward"]

    @property
    def has_reward(self) -> bool:
        """Whether one response alone gets a scalar reward (all heads but GPM)."""
        return self.kind != "gpm"

    # -- meaning ----------------------------------------------------------------------------

    def risk_alpha(self) -> float | None:
        if self.risk == "mean":
            return None
        name, _, value = self.risk.partition(":")
        try:
            alpha = float(value)
        except ValueError:
            alpha = -1.0
        if name != "cvar" or not 0 < alpha <= 1:
            raise HeadError(f"model.head.risk: expected 'mean' or 'cvar:ALPHA' with 0 < ALPHA <= "
                            f"1 (e.g. cvar:0.25), got {self.risk!r}.")
        return alpha

    def reward(self, outputs: torch.Tensor) -> torch.Tensor:
        """Scalar reward from raw outputs [..., K] -> [...]."""
        if self.kind == "scalar":
            return outputs[..., 0]
        if self.kind == "attributes":
            weights = self.weights or (1.0 / self.num_outputs,) * self.num_outputs
            return outputs @ outputs.new_tensor(weights)
        if self.kind == "quantile":
            alpha = self.risk_alpha()
            return quantile_mean(outputs) if alpha is None else lower_cvar(
                outputs, self.quantiles, alpha)
        raise HeadError("a GPM head gives preferences between responses, not a reward of one "
                        "response: compare responses (pairs or lists) instead.")

    def preference_logit(self, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        """logit P(first > second) from raw outputs [..., K] of two responses -> [...].

        Reward heads: r(first) - r(second) (Bradley-Terry). GPM: <R v_1, v_2> / tau.
        """
        if self.kind == "gpm":
            return gpm_score(gpm_embedding(first), gpm_embedding(second)) / self.tau
        return self.reward(first) - self.reward(second)

    # -- storage ----------------------------------------------------------------------------

    def to_dict(self) -> dict:
        return asdict(self)

    def save(self, directory: Path, extra: dict | None = None) -> None:
        record = {"head": self.to_dict(), **(extra or {})}
        (Path(directory) / HEAD_FILE).write_text(json.dumps(record, indent=2) + "\n")

    @classmethod
    def load(cls, directory: Path) -> tuple["Head", dict]:
        """The head of a saved reward model and the rest of its record (pooling, loss ...)."""
        path = Path(directory) / HEAD_FILE
        record = json.loads(path.read_text())
        return cls(**record.pop("head")), record


def quantile_mean(quantiles: torch.Tensor) -> torch.Tensor:
    """Mean of a distribution from evenly spread quantiles: their average."""
    return quantiles.mean(-1)


def lower_cvar(quantiles: torch.Tensor, levels: tuple, alpha: float) -> torch.Tensor:
    """CVaR_alpha = (1 / alpha) int_0^alpha q(u) du, the mean of the worst alpha share of
    outcomes, with the quantile function a step: the sorted value at each level holds from
    the midpoint with the level below to the midpoint with the level above (0 and 1 at the
    ends), and each step counts by how much of [0, alpha] it covers."""
    bounds = [0.0, *((a + b) / 2 for a, b in zip(levels, levels[1:])), 1.0]
    alpha = max(alpha, 1e-12)
    shares = [max(0.0, min(high, alpha) - low) / alpha for low, high in zip(bounds, bounds[1:])]
    weights = quantiles.new_tensor(shares)
    return (quantiles.sort(dim=-1).values * weights).sum(-1)


def gpm_embedding(outputs: torch.Tensor) -> torch.Tensor:
    """GPM's preference embedding: the head output scaled to unit L2 norm."""
    return F.normalize(outputs, p=2, dim=-1)


def gpm_score(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """s(y_1 > y_2) = <R v_1, v_2>, R block-diagonal with blocks [[0, -1], [1, 0]]:
    per block, v_1[0] v_2[1] - v_1[1] v_2[0]. Skew-symmetric: s(1, 2) = -s(2, 1)."""
    a, b = first.unflatten(-1, (-1, 2)), second.unflatten(-1, (-1, 2))
    return (a[..., 0] * b[..., 1] - a[..., 1] * b[..., 0]).sum(-1)

