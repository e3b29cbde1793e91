"""Pairwise objectives that also pin each response's own log-ratio, not only the margin.

DPO only constrains rho(y_w) - rho(y_l), so both log-ratios may fall together. These objectives
add per-response ("absolute") terms: classify each response on its own (BCO, NCA, APO) or
regress each log-ratio onto a target (SPPO, Cal-DPO, BoNBoN).
Notation: rho(y) = log pi_theta(y|x) - log pi_ref(y|x); h = rho(y_w) - rho(y_l); r(y) = beta rho(y).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from typing import Annotated

import torch
import torch.nn.functional as F
from pydantic import Field

from .common import (NonNegative, Positive, Share, chosen_minus_rejected, log_ratios,
                     step_mean)
from .registry import ObjectiveInputs, ObjectiveOutput, objective


@dataclass
class BCOPairParams:
    beta: Positive = 0.01  # paper C (via the TRL paper index)
    reward_shift: bool = False  # True: subtract delta, the step's mean reward


@objective("bco_pair", params=BCOPairParams, needs_reference=True, paper="arXiv:2404.04656",
           whole_batch=lambda params: params.reward_shift and "gathered")
def bco_pair(inputs: ObjectiveInputs, params: BCOPairParams) -> ObjectiveOutput:
    """Binary Classifier Optimization on pairs: classify each response by its own reward.

    loss = -log sigmoid(r(y_w) - delta) - log sigmoid(-(r(y_l) - delta)), r(y) = beta rho(y),
    with delta = 0 by default: the paired form of OBJECTIVES.md and TRL 1.16's DPOTrainer
    "bco_pair". Each response's reward is pinned on its own (chosen above 0, rejected below),
    not only their gap. reward_shift=True centres the classifier with delta = the mean of this
    micro-batch's chosen and rejected rewards (in training over every process's micro-batch),
    detached; the paper's unpaired BCO uses a running mean over training instead (``bco``).
    Beware that with one pair per step that shift turns the loss into
    2 (-log sigmoid(beta h / 2)), a margin-only loss.
    """
    rewards = params.beta * log_ratios(inputs)
    shifted = rewards - step_mean(rewards, inputs) if params.reward_shift else rewards
    return ObjectiveOutput(-F.logsigmoid(shifted[:, 0]) - F.logsigmoid(-shifted[:, 1]), rewards)


@dataclass
class NCAPairParams:
    beta: Positive = 0.01  # alpha in the paper's section C (via the TRL paper index)


@objective("nca_pair", params=NCAPairParams, needs_reference=True, paper="arXiv:2402.05369")
def nca_pair(inputs: ObjectiveInputs, params: NCAPairParams) -> ObjectiveOutput:
    """Noise Contrastive Alignment (NCA) on pairs: absolute likelihood targets instead of a margin.

    loss = -log sigmoid(r(y_w)) - 1/2 log sigmoid(-r(y_w)) - 1/2 log sigmoid(-r(y_l)),
    r(y) = beta rho(y). Each response is contrasted with the reference distribution on its own,
    so the chosen likelihood is pushed up rather than only the gap, which counters DPO's decline
    of the chosen log-probability.
    """
    rewards = params.beta * log_ratios(inputs)
    chosen, rejected = rewards[:, 0], rewards[:, 1]
    losses = -F.logsigmoid(chosen) - 0.5 * F.logsigmoid(-chosen) - 0.5 * F.logsigmoid(-rejected)
    return ObjectiveOutput(losses, rewards)


@dataclass
class AnchoredPOParams:
    beta: Positive = 0.1  # paper 5.2 (via the TRL paper index)


@objective("anchored_po_zero", params=AnchoredPOParams, needs_reference=True,
           paper="arXiv:2408.06266")
def anchored_po_zero(inputs: ObjectiveInputs, params: AnchoredPOParams) -> ObjectiveOutput:
    """Anchored PO, zero variant (APO-zero): raise the chosen, lower the rejected likelihood.

    loss = (1 - sigmoid(r(y_w))) + sigmoid(r(y_l)), r(y) = beta rho(y).
    Use when the chosen responses are better than what the model already produces. Not the
    Accelerated PO of the seed papers (OBJECTIVES.md section 6).
    """
    rewards = params.beta * log_ratios(inputs)
    return ObjectiveOutput(1.0 - torch.sigmoid(rewards[:, 0]) + torch.sigmoid(rewards[:, 1]), rewards)


@objective("anchored_po_down", params=AnchoredPOParams, needs_reference=True,
           paper="arXiv:2408.06266")
def anchored_po_down(inputs: ObjectiveInputs, params: AnchoredPOParams) -> ObjectiveOutput:
    """Anchored PO, down variant (APO-down): lower both likelihoods, the rejected one more.

    loss = sigmoid(r(y_w)) + (1 - sigmoid(r(y_w) - r(y_l))), r(y) = beta rho(y).
    Use when even the chosen responses are worse than the model's own outputs.
    """
    rewards = params.beta * log_ratios(inputs)
    margin = chosen_minus_rejected(rewards)
    return ObjectiveOutput(torch.sigmoid(rewards[:, 0]) + 1.0 - torch.sigmoid(margin), rewards)


@dataclass
class SPPOHardParams:
    beta: Positive = 0.001  # 1/eta in the paper (eta = 1000)


@objective("sppo_hard", params=SPPOHardParams, needs_reference=True, paper="arXiv:2405.00675")
def sppo_hard(inputs: ObjectiveInputs, params: SPPOHardParams) -> ObjectiveOutput:
    """Self-Play PO with hard labels: regress each log-ratio onto +-1/(2 beta).

    loss = 1/2 [(rho(y_w) - 1/(2 beta))^2 + (rho(y_l) + 1/(2 beta))^2], r(y) = beta rho(y).
    SPPO's target is (1/beta)(P(y > pi_t) - 1/2); the hard-label version sets the win
    probability to 1 for the chosen and 0 for the rejected. The 1/2 (a mean over the pair's two
    responses) follows the authors' uclaml/SPPO code; TRL 1.16's "sppo_hard" omits it, so TRL's
    loss is exactly twice this one. In SPPO the reference is the previous iterate pi_t.
    """
    ratios = log_ratios(inputs)
    target = 1.0 / (2.0 * params.beta)
    losses = 0.5 * ((ratios[:, 0] - target) ** 2 + (ratios[:, 1] + target) ** 2)
    return ObjectiveOutput(losses, params.beta * ratios)


@dataclass
class CalDPOParams:
    beta: Positive = 0.001  # authors' zephyr script (run/beta001_sametokenize.sh)
    calibration_weight: NonNegative = 1.0  # authors' Pythia code: 1; their zephyr trainer: 0.5


@objective("cal_dpo", params=CalDPOParams, needs_reference=True, paper="arXiv:2412.14516")
def cal_dpo(inputs: ObjectiveInputs, params: CalDPOParams) -> ObjectiveOutput:
    """Calibrated DPO (Cal-DPO): DPO plus squared calibration of each log-ratio to +-1/(2 beta).

    loss = -log sigmoid(h) + w [(rho(y_w) - 1/(2 beta))^2 + (rho(y_l) + 1/(2 beta))^2],
    r(y) = beta rho(y). Note the contrastive term has no beta: beta only sets the calibration
    targets, which place the implied rewards beta rho at +-1/2, the scale of the true reward
    difference, so the chosen likelihood cannot sink with the rejected one.
    Formula from the authors' code (Cal-DPO/Cal-DPO Pythia trainers.py, shift = 0.5, w = 1; the
    tengxiao1/Cal-DPO zephyr trainer weighs the same squares by w = 0.5).
    """
    ratios = log_ratios(inputs)
    target = 1.0 / (2.0 * params.beta)
    calibration = (ratios[:, 0] - target) ** 2 + (ratios[:, 1] + target) ** 2
    losses = -F.logsigmoid(chosen_minus_rejected(ratios)) + params.calibration_weight * calibration
    return ObjectiveOutput(losses, params.beta * ratios)


@dataclass
class BoNBoNParams:
    # samples per prompt the best/worst pair was drawn from (paper's experiments)
    n: Annotated[int, Field(ge=2)] = 8
    alpha: Share = 0.005  # SFT weight; UNVERIFIED (the paper tunes it to balance both terms)
    normalize_sft_length: bool = False  # authors' code: summed NLL; True divides it by |y_w|


def best_of_n_log_ratio_gap(n: int) -> float:
    """E[log pi_BoN/pi_0 (best) - log pi_BoN/pi_0 (worst)] = (n - 1) * sum_{k=1}^{n-1} 1/k."""
    return (n - 1) * math.fsum(1.0 / k for k in range(1, n))


@objective("bonbon", params=BoNBoNParams, needs_reference=True, paper="arXiv:2406.00832")
def bonbon(inputs: ObjectiveInputs, params: BoNBoNParams) -> ObjectiveOutput:
    """BoNBoN: imitate the best-of-n distribution of the reference with SFT plus an IPO-style target.

    loss = alpha (-log pi_theta(y_w|x)) + (1 - alpha) (h - (n-1) sum_{k=1}^{n-1} 1/k)^2,
    r(y) = rho(y). Data: y_w and y_l are the best and worst of n samples from the reference pi_0.
    Under pi_BoN(y) ∝ n F(r(y))^(n-1) pi_0(y), log pi_BoN/pi_0 = log n + (n-1) log F(r), and the
    expected best-minus-worst gap is (n-1)(H_n - 1/n) = (n-1) H_{n-1}: that is the IPO target
    1/(2 beta_n) (derived here; OBJECTIVES.md recalls the same constant, UNVERIFIED there).
    The SFT term is summed over tokens as in the authors' gl-ybnbxb/BoNBoN trainers.py
    (OBJECTIVES.md writes it per token: normalize_sft_length=True). The default alpha is
    UNVERIFIED: the authors' config leaves it required.
    """
    ratios = log_ratios(inputs)
    nll = -inputs.policy.logps[:, 0]
    if params.normalize_sft_length:
        nll = nll / inputs.policy.token_counts[:, 0]
    ipo_term = (chosen_minus_rejected(ratios) - best_of_n_log_ratio_gap(params.n)) ** 2
    return ObjectiveOutput(params.alpha * nll + (1.0 - params.alpha) * ipo_term, ratios)
