"""Objectives whose data holds samples of the model itself (``preftune online`` makes it).

They read ranked lists: K responses per prompt with ``response_scores``. For D2O and PMPO the
responses with the list's highest score are its positives P (or D2O's generated anchors), those
with the lowest its negatives N; a list whose scores are all equal has neither and contributes
0. f-DPG reads the scores as rewards of a target distribution.
rho(y) = log pi_theta(y|x) - log pi_ref(y|x), summed over tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from .common import MAX_EXPONENT, NonNegative, Positive, Share, log_ratios, required_scores
from .registry import ObjectiveInputs, ObjectiveOutput, objective


def _top_and_bottom(inputs: ObjectiveInputs, name: str):
    """(top [E, K], bottom [E, K], informative [E]) masks from the list's scores."""
    (scores,) = required_scores(inputs, ("response_scores",), name)
    if scores.shape != inputs.policy.logps.shape:
        raise ValueError(f"objective {name!r}: response_scores has shape {tuple(scores.shape)} "
                         f"but there are {tuple(inputs.policy.logps.shape)} responses")
    top = scores == scores.amax(dim=1, keepdim=True)
    bottom = scores == scores.amin(dim=1, keepdim=True)
    return top, bottom, ~(top & bottom).all(dim=1)


def _mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)


@dataclass
class D2OParams:
    beta: Positive = 0.1  # UNVERIFIED: the spec gives no default
    alpha: Positive = 1.0  # weight of the negatives' log-ratio; UNVERIFIED (1 makes K = 1 DPO)


@objective("d2o", params=D2OParams, needs_reference=True, data="ranked",
           paper="arXiv:2403.03419", online_builder="d2o")
def d2o(inputs: ObjectiveInputs, params: D2OParams) -> ObjectiveOutput:
    """D2O: push the model's own samples (anchors) above human negatives, as distributions.

    loss = -log sigmoid(beta mean_{i in P} rho(y_i) - alpha beta mean_{j in N} rho(y_j)),
    P = the K self-generated samples (top score), N = the negatives (bottom score). With one
    negative this is the spec's (beta/K) sum_i rho(y_i) - alpha rho(y_l) up to where beta sits:
    the spec leaves alpha unscaled; we scale both terms by beta so alpha = 1, K = 1 is DPO.
    The samples anchor the model where it already is instead of on noisy human positives.
    One reference serves as both of the paper's pi_r^- and pi_r^+ (UNVERIFIED, no code).
    """
    top, bottom, informative = _top_and_bottom(inputs, "d2o")
    ratios = log_ratios(inputs)
    logit = params.beta * (_mean(ratios, top) - params.alpha * _mean(ratios, bottom))
    return ObjectiveOutput(-F.logsigmoid(logit) * informative, params.beta * ratios)


@dataclass
class PMPOParams:
    alpha: Share = 0.5  # weight of the positives; 1 - alpha weighs the negatives
    # weight of KL(pi_ref || pi_theta); UNVERIFIED (not in the spec for LMs)
    beta: NonNegative = 1.0

    def __post_init__(self):
        if self.alpha < 1 and self.beta == 0:
            raise ValueError("pmpo with negatives (alpha < 1) needs beta > 0: the KL term keeps "
                             "the negatives' term from diverging.")


@objective("pmpo", params=PMPOParams, needs_reference=True, data="ranked",
           paper="arXiv:2410.04166", reference_samples=True)
def pmpo(inputs: ObjectiveInputs, params: PMPOParams) -> ObjectiveOutput:
    """PMPO: maximise the likelihood of positives, minimise it on negatives, kept near pi_ref.

    loss = -alpha mean_{P} log pi_theta(y) + (1 - alpha) mean_{N} log pi_theta(y)
           + beta mean_{all} [log pi_ref(y) - log pi_theta(y)],
    the last term KL(pi_ref || pi_theta) estimated on the list's responses, which must be
    samples of the reference (an online round whose samples come from its reference: round 1,
    or online.reference: previous). Without that term the negative likelihood would diverge;
    it works with positives only (alpha = 1) or negatives only (alpha = 0). UNVERIFIED (no
    public code); the log-likelihoods are summed over tokens.
    """
    top, bottom, informative = _top_and_bottom(inputs, "pmpo")
    logps = inputs.policy.logps
    kl = -log_ratios(inputs).mean(dim=1)
    loss = (-params.alpha * _mean(logps, top) + (1.0 - params.alpha) * _mean(logps, bottom)
            + params.beta * kl)
    return ObjectiveOutput(loss * informative, log_ratios(inputs))


@dataclass
class FDPGParams:
    beta: Positive = 0.1  # temperature of the target pi_ref exp(r / beta); UNVERIFIED default
    divergence: Literal["reverse_kl", "forward_kl", "js", "tv"] = "js"  # the paper's pick


def _f_terms(log_t: torch.Tensor, divergence: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(f'(t), f(t) / t) at t = e^log_t for the f-divergence D_f(pi || p) = E_p f(pi / p)."""
    inverse = torch.exp((-log_t).clamp(max=MAX_EXPONENT))  # 1 / t
    if divergence == "reverse_kl":  # f(t) = t log t: KL(pi || p)
        return log_t + 1.0, log_t
    if divergence == "forward_kl":  # f(t) = -log t: KL(p || pi)
        return -inverse, -log_t * inverse
    if divergence == "js":  # f(t) = (t log(2t / (1 + t)) - log((1 + t) / 2)) / 2
        log_share = math.log(2.0) + F.logsigmoid(log_t)  # log(2t / (1 + t))
        return 0.5 * log_share, 0.5 * (log_share - inverse * (F.softplus(log_t) - math.log(2.0)))
    return 0.5 * torch.sign(log_t), 0.5 * (1.0 - inverse).abs()  # tv: f(t) = |t - 1| / 2


@objective("fdpg", params=FDPGParams, needs_reference=True, data="ranked",
           paper="arXiv:2302.08215", reference_samples=True)
def fdpg(inputs: ObjectiveInputs, params: FDPGParams) -> ObjectiveOutput:
    """f-DPG: move the policy toward the target p(y) ~ pi_ref(y) exp(r(y) / beta) by an f-divergence.

    The target is the RLHF optimum (a pass/fail reward with a small beta makes it pi_ref
    conditioned on passing, GDC's target). f-DPG minimises D_f(pi_theta || p), whose gradient is
    E_{y ~ pi_theta}[f'(pi_theta(y) / p(y)) grad log pi_theta(y)]. The list's K responses are
    samples of the reference (online round 1, or online.reference: previous), so with
    w = pi_theta / pi_ref = e^rho normalised over the list (w_i / mean w),
      Z   = mean_i exp(r_i / beta)               (p's normaliser),
      t_i = pi_theta(y_i) / p(y_i) = exp(rho_i - r_i / beta) Z,
      grad = mean_i w_i (f'(t_i) - b) grad log pi_theta(y_i),  b = mean_i w_i f'(t_i).
    The loss's value is the estimate mean_i w_i f(t_i) / t_i of D_f(pi_theta || p) itself.
    divergence: reverse_kl (f = t log t: KL-regularised RL), forward_kl (f = -log t: DPG), js
    (the paper's best trade-off of reward and diversity), tv (f = |t - 1| / 2).
    Z by the list's samples and the self-normalised weights are this implementation's choices
    (the paper's code, naver/gdc, is not read here); UNVERIFIED.
    """
    (rewards,) = required_scores(inputs, ("response_scores",), "fdpg")
    rho = log_ratios(inputs)
    with torch.no_grad():
        tilt = rewards.to(rho.dtype) / params.beta
        log_z = torch.logsumexp(tilt, dim=1, keepdim=True) - math.log(tilt.shape[1])
        log_t = rho - tilt + log_z
        weights = torch.softmax(rho, dim=1) * rho.shape[1]  # w_i / mean_j w_j
        slope, value = _f_terms(log_t, params.divergence)
        baseline = (weights * slope).mean(dim=1, keepdim=True)
        coefficient = weights * (slope - baseline)
        estimate = (weights * value).mean(dim=1)
    surrogate = (coefficient * inputs.policy.logps).mean(dim=1)
    return ObjectiveOutput(estimate + surrogate - surrogate.detach(), params.beta * rho)
