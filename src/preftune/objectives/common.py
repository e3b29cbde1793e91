"""Small pieces shared by the objective families, so each objective reads like its paper's formula.

Slot 0 of every [E, R] tensor is the chosen response y_w, slot 1 the rejected response y_l.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Annotated

import torch
import torch.nn.functional as F
from pydantic import Field

from ..model.forward import SequenceStats
from .registry import ObjectiveInputs
from .state import summed_over_processes

# exp() arguments are clamped here: exp(80) ~ 5.5e34 still fits fp32 (max ~3.4e38) with headroom for
# the products and sums that follow, so extreme log-ratios give large finite losses, never inf/NaN.
MAX_EXPONENT = 80.0
# log(1 - e^x) is -inf at x = 0 (a response the policy produces with probability one); clamping x
# just below 0 keeps the odds-ratio objectives finite there without touching any realistic value.
LOG1MEXP_MAX = -1e-8


# Parameter ranges: a params field typed with one of these is checked when a config is read
# (both ends of a schedule too) and shows its bounds in `preftune config schema`.
# Infinity is refused too (a loss of inf * 0 is NaN).
Positive = Annotated[float, Field(gt=0, allow_inf_nan=False)]  # a temperature, inverse KL strength
NonNegative = Annotated[float, Field(ge=0, allow_inf_nan=False)]  # a weight or target margin
Share = Annotated[float, Field(ge=0, le=1)]  # a mixing weight between two terms
PositiveShare = Annotated[float, Field(gt=0, le=1)]  # a share that 0 would make meaningless
FlipRate = Annotated[float, Field(ge=0, lt=0.5)]  # a label-flip rate or label smoothing
Finite = Annotated[float, Field(allow_inf_nan=False)]  # any real number


def refuse_idle(params, names: tuple, when: str) -> None:
    """In a params ``__post_init__``: the first of ``names`` set away from its default is
    refused, as its other settings make it do nothing (``when`` says which)."""
    defaults = {f.name: f.default for f in fields(params)}
    for name in names:
        if getattr(params, name) != defaults[name]:
            raise ValueError(f"{name} does nothing {when}; remove it, or set what it needs.")


def log_ratios(inputs: ObjectiveInputs) -> torch.Tensor:
    """rho(y) = log pi_theta(y|x) - log pi_ref(y|x) per response, [E, R]."""
    return inputs.policy.logps - inputs.reference.logps


def step_mean(values: torch.Tensor, inputs: ObjectiveInputs) -> torch.Tensor:
    """The mean of ``values`` (detached) over the micro-batch, and in training over every
    process's micro-batch: a statistic of the step's examples that several processes do not
    split (as TRL gathers KTO's z_ref). Evaluation takes this process's batch alone."""
    values = values.detach()
    if not inputs.training:
        return values.mean()
    sums = summed_over_processes(torch.stack([values.float().sum(),
                                              values.new_full((), values.numel(),
                                                              dtype=torch.float32)]))
    return (sums[0] / sums[1]).to(values.dtype)


def chosen_minus_rejected(values: torch.Tensor) -> torch.Tensor:
    """values[:, 0] - values[:, 1]; applied to log-ratios this is the DPO margin h, [E]."""
    return values[:, 0] - values[:, 1]


def conservative_logistic(z: torch.Tensor, epsilon: float) -> torch.Tensor:
    """-(1 - eps) log sigmoid(z) - eps log sigmoid(-z): logistic loss, labels flipped w.p. eps."""
    return -(1.0 - epsilon) * F.logsigmoid(z) - epsilon * F.logsigmoid(-z)


def chosen_nll(stats: SequenceStats) -> torch.Tensor:
    """Per-token negative log-likelihood of the chosen response, -log pi(y_w|x) / |y_w|, [E]."""
    return -stats.logps[:, 0] / stats.token_counts[:, 0]


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - e^x) for x < 0, accurate at both ends (Maechler's two branches split at -log 2)."""
    x = x.clamp(max=LOG1MEXP_MAX)
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def log_odds(mean_logps: torch.Tensor) -> torch.Tensor:
    """ORPO's log odds log(P / (1 - P)) of P = exp(mean per-token log-prob)."""
    return mean_logps - log1mexp(mean_logps)


def required_scores(inputs: ObjectiveInputs, keys: tuple[str, ...], objective: str):
    """The named [E] score tensors from the data, or an error that names what is missing."""
    missing = [key for key in keys if key not in inputs.scores]
    if missing:
        have = ", ".join(sorted(inputs.scores)) or "none"
        raise ValueError(
            f"objective {objective!r} needs per-example scores {', '.join(missing)} in the data "
            f"(the batch has: {have}); add them as numeric fields of each record's scores"
        )
    return tuple(inputs.scores[key].to(inputs.policy.logps) for key in keys)


def required_token_logps(stats: SequenceStats | None, which: str, objective: str) -> SequenceStats:
    """``stats`` when it carries per-token log-probs (objectives declared per_token=True get them)."""
    if stats is None or stats.token_logps is None or stats.token_mask is None:
        raise ValueError(
            f"objective {objective!r} needs per-token {which} log-probs; it is registered with "
            "per_token=True, so they are missing only when the stats were built by hand without "
            "sequence_stats(..., per_token=True)"
        )
    return stats
