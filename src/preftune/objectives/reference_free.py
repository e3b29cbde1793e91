"""Objectives that need no reference model: the policy's own log-probs carry the reward.

Notation: log pi(y) is the summed response log-prob, bar log pi(y) = log pi(y)/|y| the per-token
mean, P(y) = exp(bar log pi(y)) and odds(y) = P(y) / (1 - P(y)) (ORPO's length-normalised odds).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F

from .common import NonNegative, Positive, chosen_minus_rejected, chosen_nll, log1mexp, log_odds
from .registry import ObjectiveInputs, ObjectiveOutput, objective


@dataclass
class SFTParams:
    """SFT has no parameters; weight it against other objectives with ``weight``."""


@objective("sft", params=SFTParams, needs_reference=False, paper="(supervised fine-tuning)")
def sft(inputs: ObjectiveInputs, params: SFTParams) -> ObjectiveOutput:
    """Supervised fine-tuning on the chosen response: its per-token negative log-likelihood.

    loss = -log pi(y_w|x) / |y_w|, implied reward r(y) = log pi(y|x) / |y|.
    Mostly useful as a term of a weighted sum, e.g. DPO + 0.2 x SFT (RPO-style anchoring).
    """
    return ObjectiveOutput(chosen_nll(inputs.policy), inputs.policy.mean_logps)


@dataclass
class SimPOParams:
    beta: Positive = 2.0  # reward scale
    gamma_beta_ratio: NonNegative = 0.5  # target margin gamma, expressed as gamma / beta


@objective("simpo", params=SimPOParams, needs_reference=False, paper="arXiv:2405.14734")
def simpo(inputs: ObjectiveInputs, params: SimPOParams) -> ObjectiveOutput:
    """SimPO: length-normalised log-likelihood as the reward, with a target margin.

    loss = -log sigmoid(beta/|y_w| log pi(y_w|x) - beta/|y_l| log pi(y_l|x) - gamma),
    gamma = gamma_beta_ratio * beta; implied reward r(y) = beta/|y| log pi(y|x).
    Averaging over tokens removes the pull towards long responses, and the margin asks the
    chosen reward to win by at least gamma.
    """
    rewards = params.beta * inputs.policy.mean_logps
    gamma = params.gamma_beta_ratio * params.beta
    return ObjectiveOutput(-F.logsigmoid(rewards[:, 0] - rewards[:, 1] - gamma), rewards)


@dataclass
class CPOParams:
    beta: Positive = 0.1
    alpha: NonNegative = 1.0  # weight of the behaviour-cloning (NLL) term on the chosen response


@objective("cpo", params=CPOParams, needs_reference=False, paper="arXiv:2401.08417")
def cpo(inputs: ObjectiveInputs, params: CPOParams) -> ObjectiveOutput:
    """Contrastive Preference Optimization (CPO): reference-free DPO plus an NLL term on the chosen.

    loss = -log sigmoid(beta [log pi(y_w|x) - log pi(y_l|x)]) + alpha (-log pi(y_w|x) / |y_w|),
    r(y) = beta log pi(y|x) (summed log-probs, as in TRL's CPO "sigmoid" loss).
    The reference is replaced by a uniform one, and the behaviour-cloning term keeps the policy
    on the preferred data that the dropped KL term no longer anchors it to. The NLL is a
    per-example token mean; TRL's CPOTrainer takes one token mean over the whole batch, which
    equals it when all chosen responses have the same length.
    """
    rewards = params.beta * inputs.policy.logps
    losses = -F.logsigmoid(chosen_minus_rejected(rewards)) + params.alpha * chosen_nll(inputs.policy)
    return ObjectiveOutput(losses, rewards)


@dataclass
class ORPOParams:
    odds_ratio_weight: NonNegative = 0.1  # lambda in the paper (TRL's ORPOConfig.beta)


@objective("orpo", params=ORPOParams, needs_reference=False, paper="arXiv:2403.07691")
def orpo(inputs: ObjectiveInputs, params: ORPOParams) -> ObjectiveOutput:
    """Odds Ratio Preference Optimization (ORPO): SFT on the chosen plus a log odds-ratio penalty.

    loss = -bar log pi(y_w) - lambda log sigmoid(log odds(y_w) - log odds(y_l)), lambda =
    odds_ratio_weight,
    log odds(y) = bar log pi(y) - log(1 - exp(bar log pi(y))); implied reward r(y) = log odds(y).
    One stage, no reference: the NLL teaches the chosen style while the odds ratio penalises the
    rejected one. log(1 - e^x) is evaluated in two branches and clamped just below x = 0, so a
    response with per-token probability ~1 gives a finite loss. The NLL is the chosen response's
    token mean; TRL's ORPOTrainer also counts the prompt tokens in it.
    """
    odds = log_odds(inputs.policy.mean_logps)
    odds_ratio_term = -F.logsigmoid(chosen_minus_rejected(odds))
    losses = chosen_nll(inputs.policy) + params.odds_ratio_weight * odds_ratio_term
    return ObjectiveOutput(losses, odds)


@dataclass
class ASFTParams:
    alignment_weight: NonNegative = 0.1  # lambda in the paper; UNVERIFIED (0.1-1 reported to work)


@objective("asft", params=ASFTParams, needs_reference=False, paper="arXiv:2409.10571")
def asft(inputs: ObjectiveInputs, params: ASFTParams) -> ObjectiveOutput:
    """Aligned SFT (ASFT): SFT plus absolute-likelihood classification of each response.

    loss = -bar log pi(y_w) - lambda [log sigmoid(log odds(y_w)) + log sigmoid(-log odds(y_l))]
         = -(1 + lambda) log P(y_w) - lambda log(1 - P(y_l)),   r(y) = log odds(y),
    lambda = alignment_weight.
    Each response is pushed on its own (chosen up, rejected down) instead of through a
    Bradley-Terry margin, which the paper argues stops the rejected likelihood from falling
    faster than the chosen one rises. Formula as restated by a third-party comparison paper
    (OBJECTIVES.md: VERIFIED (doc), no official code); the per-token normalisation of both terms
    follows that restatement.
    """
    mean_logps = inputs.policy.mean_logps
    weight = params.alignment_weight
    losses = -(1.0 + weight) * mean_logps[:, 0] - weight * log1mexp(mean_logps[:, 1])
    return ObjectiveOutput(losses, log_odds(mean_logps))
