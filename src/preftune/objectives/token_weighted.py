"""Pairwise DPO-style objectives that weigh tokens or pairs using per-token log-probabilities.

They are registered with per_token=True, so the stats carry token_logps [E, R, L] (zeros past each
response's end) and token_mask. Notation: rho(y) = log pi_theta(y|x) - log pi_ref(y|x);
h = rho(y_w) - rho(y_l).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from ..model.forward import SequenceStats
from .common import Positive, Share, chosen_minus_rejected, log_ratios, required_token_logps
from .registry import ObjectiveInputs, ObjectiveOutput, objective


def masked_token_sum(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum over the token axis of ``values`` where ``mask`` is set, [E, R]."""
    return torch.where(mask, values, torch.zeros_like(values)).sum(-1)


@dataclass
class WPOParams:
    beta: Positive = 0.1
    alignment: Literal["sampled", "none"] = "sampled"  # the paper's and TRL's; see the docstring


def wpo_pair_weights(stats: SequenceStats, alignment: str) -> torch.Tensor:
    """w(x, y_w) w(x, y_l) with w = exp(mean_t log pi(y_t) [- log sum_v pi(v)^2]), detached, <= 1."""
    token_logps = stats.token_logps.detach()
    if alignment == "sampled":
        log_sum_sq = getattr(stats, "token_log_sum_sq_probs", None)
        if log_sum_sq is None:
            raise ValueError(
                "wpo alignment='sampled' needs, per response token, log sum_v pi(v|x, y_<t)^2 "
                "over the vocabulary as stats.token_log_sum_sq_probs [E, R, L] (the training "
                "loop's forward adds it, as wpo declares; called directly, pass "
                "sequence_stats(..., token_collisions=...)), or alignment='none'."
            )
        token_logps = token_logps - log_sum_sq.detach()
    counts = stats.token_mask.sum(-1).clamp(min=1)
    mean_logps = masked_token_sum(token_logps, stats.token_mask) / counts
    return torch.exp(mean_logps.sum(-1).clamp(max=0.0))


def _aligned(params: WPOParams) -> bool:
    return params.alignment == "sampled"


@objective("wpo", params=WPOParams, needs_reference=True, paper="arXiv:2406.11827",
           per_token=True, policy_collisions=_aligned)
def wpo(inputs: ObjectiveInputs, params: WPOParams) -> ObjectiveOutput:
    """Weighted Preference Optimization (WPO): DPO with pairs weighted by their on-policy probability.

    loss = w(x, y_w) w(x, y_l) (-log sigmoid(beta h)), r(y) = beta rho(y), with
    w(x, y) = exp((1/|y|) sum_t log pi_theta(y_t|x, y_<t)) computed from the policy itself and
    detached (no gradient flows through the weight). Off-policy pairs the current model would
    rarely generate count less, which simulates on-policy training with off-policy data.
    alignment="sampled" (the default, as in the paper and TRL 1.16's use_weighting) is the
    paper's weight alignment: each token's probability is divided by sum_v pi_theta(v|x, y_<t)^2,
    the probability that the policy's own sample there agrees with another, so on-policy pairs
    get weight ~1; the forward computes that vocabulary sum chunk by chunk with the token
    log-probs (stats.token_log_sum_sq_probs). alignment="none" leaves it out (the weights of
    releases before the alignment was computed). The product is clamped at 1 as in the authors'
    code (TRL 1.16's use_weighting does not clamp; with alignment="none" the weight is <= 1
    anyway).
    """
    policy = required_token_logps(inputs.policy, "policy", "wpo")
    rewards = params.beta * log_ratios(inputs)
    weights = wpo_pair_weights(policy, params.alignment)
    return ObjectiveOutput(weights * -F.logsigmoid(chosen_minus_rejected(rewards)), rewards)


@dataclass
class LDDPOParams:
    beta: Positive = 0.1
    alpha: Share = 0.5  # weight of tokens past the shorter response; UNVERIFIED default


def length_desensitized_logps(stats: SequenceStats, shared_lengths: torch.Tensor,
                              alpha: float) -> torch.Tensor:
    """sum_{t <= l_p} log pi(y_t) + alpha sum_{t > l_p} log pi(y_t) per response, [E, R]."""
    position = stats.token_mask.cumsum(-1)  # 1-based index among the response's real tokens
    shared = stats.token_mask & (position <= shared_lengths.view(-1, 1, 1))
    tail = stats.token_mask & ~shared
    logps = stats.token_logps
    return masked_token_sum(logps, shared) + alpha * masked_token_sum(logps, tail)


@objective("ld_dpo", params=LDDPOParams, needs_reference=True, paper="arXiv:2409.06411",
           per_token=True)
def ld_dpo(inputs: ObjectiveInputs, params: LDDPOParams) -> ObjectiveOutput:
    """Length-desensitized DPO (LD-DPO): down-weight the tokens past the shorter response's length.

    l_p = min(|y_w|, |y_l|); log pi^(y) = sum_{t <= l_p} log pi(y_t) + alpha sum_{t > l_p} log pi(y_t)
    for the policy and the reference alike; loss = -log sigmoid(beta [rho^(y_w) - rho^(y_l)]),
    r(y) = beta rho^(y). The excess tokens of the longer response carry mostly a length
    preference; shrinking them (alpha < 1) decouples it from the other preferences and curbs
    DPO's verbosity. alpha = 1 is DPO. Matches TRL 1.16's ld_alpha. The paper tunes alpha per
    model; the 0.5 default is UNVERIFIED.
    """
    policy = required_token_logps(inputs.policy, "policy", "ld_dpo")
    reference = required_token_logps(inputs.reference, "reference", "ld_dpo")
    shared_lengths = policy.token_mask.sum(-1).min(dim=1).values
    ratios = (length_desensitized_logps(policy, shared_lengths, params.alpha)
              - length_desensitized_logps(reference, shared_lengths, params.alpha))
    rewards = params.beta * ratios
    return ObjectiveOutput(-F.logsigmoid(chosen_minus_rejected(rewards)), rewards)
