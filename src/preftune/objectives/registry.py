"""The objective registry: each objective is a pure function plus a declaration of its needs.

The declaration drives the machinery (reference pass or not, per-token log-probs or not, which
data shape to collate), so the training loop never branches on an objective's name.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..model.forward import SequenceStats

DATA_SHAPES = ("pairs", "unpaired", "ranked")


@dataclass
class ObjectiveInputs:
    """What an objective sees: per-response stats shaped [examples, responses] and side data."""

    policy: SequenceStats
    reference: SequenceStats | None = None
    scores: dict = field(default_factory=dict)
    step: int = 0
    extra_references: list[SequenceStats] = field(default_factory=list)  # reference.extra_models


@dataclass
class ObjectiveOutput:
    """Per-example losses [E] and the objective's implied reward per response [E, R].

    The framework turns ``rewards`` into the logged rewards/margins/accuracies, so no objective
    repeats that bookkeeping.
    """

    losses: torch.Tensor
    rewards: torch.Tensor


@dataclass(frozen=True)
class ObjectiveSpec:
    name: str
    fn: Callable[[ObjectiveInputs, object], ObjectiveOutput]
    params: type
    needs_reference: bool
    data: str
    per_token: bool
    paper: str
    kl_completions: bool = False  # wants a mismatched completion as the last response slot
    reference_distributions: bool = False  # wants per-token KL(pi_ref || pi_theta) in the stats
    extra_references: bool = False  # wants stats from reference.extra_models as well

    @property
    def summary(self) -> str:
        return (self.fn.__doc__ or "").strip().splitlines()[0]

    def defaults(self) -> dict:
        return dataclasses.asdict(self.params())

    def __call__(self, inputs: ObjectiveInputs, params) -> ObjectiveOutput:
        if self.needs_reference and inputs.reference is None:
            raise ValueError(f"objective {self.name!r} needs reference log-probs")
        return self.fn(inputs, params)


REGISTRY: dict[str, ObjectiveSpec] = {}


def objective(name, *, params, needs_reference, paper, data="pairs", per_token=False,
              kl_completions=False, reference_distributions=False, extra_references=False):
    """Register ``fn`` as objective ``name`` with its params dataclass and declared needs.

    ``kl_completions``: each example also carries the completion of another example under its
    own prompt, as its last response slot (KTO's KL estimate; see data.prepare).
    ``reference_distributions``: the policy stats carry the per-token forward KL from the
    reference's full next-token distribution (``kl``, and ``token_kl`` when per_token).
    ``extra_references``: ``inputs.extra_references`` holds the stats of each model of
    ``reference.extra_models`` (MRPO).
    """
    if data not in DATA_SHAPES:
        raise ValueError(f"unknown data shape {data!r}; expected one of {DATA_SHAPES}")

    def register(fn):
        if name in REGISTRY:
            raise ValueError(f"objective {name!r} is registered twice")
        REGISTRY[name] = ObjectiveSpec(name, fn, params, needs_reference, data, per_token, paper,
                                       kl_completions, reference_distributions, extra_references)
        return fn

    return register


def get_objective(name: str) -> ObjectiveSpec:
    if name not in REGISTRY:
        import difflib

        close = difflib.get_close_matches(name, REGISTRY, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise KeyError(
            f"unknown objective {name!r}.{hint} Run `preftune objectives` to list them."
        )
    return REGISTRY[name]
