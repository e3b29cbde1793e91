"""Listwise objectives: K responses per prompt with a score each, higher = better.

Inputs: every [E, K] tensor holds the K responses in the data's order (nothing is sorted);
``scores["response_scores"]`` [E, K] scores them. Notation: rho(y) = log pi_theta(y|x) -
log pi_ref(y|x) (summed log-probs), psi_k the score of response k, W(k) = {j : psi_j < psi_k}
the responses scored strictly below y_k.

Ties: responses with equal scores are never ordered against each other. The Plackett-Luce
objectives (pro, listwise_pl) contrast each response only with W(k); tree_po sums only over
pairs with psi_i > psi_j; exo gives tied responses equal target probability. Every objective
is therefore unchanged by reordering tied responses, and without ties each equals its paper's
sorted-list formula.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .common import NonNegative, Positive, log_ratios, required_scores
from .registry import ObjectiveInputs, ObjectiveOutput, objective

# Scores above this make LiPO's gain 2^psi - 1 overflow float32 products (2^60 ~ 1e18).
MAX_EXP2_GAIN_SCORE = 60.0


def _response_scores(inputs: ObjectiveInputs, name: str) -> torch.Tensor:
    """psi [E, K] matching the responses, or an error naming what the data lacks."""
    (scores,) = required_scores(inputs, ("response_scores",), name)
    if scores.shape != inputs.policy.logps.shape:
        raise ValueError(f"objective {name!r}: response_scores has shape {tuple(scores.shape)} "
                         f"but there are {tuple(inputs.policy.logps.shape)} responses")
    if not torch.isfinite(scores).all():
        raise ValueError(f"objective {name!r}: response_scores must be finite")
    return scores


def strictly_better(scores: torch.Tensor) -> torch.Tensor:
    """[E, K, K] bool: entry (k, j) is True when psi_k > psi_j."""
    return scores[:, :, None] > scores[:, None, :]


def _plackett_luce_stages(logits: torch.Tensor, own: torch.Tensor, better: torch.Tensor):
    """Sum over k with W(k) non-empty of logsumexp({own_k} + {logits_kj : j in W(k)}) - own_k.

    ``logits`` [E, K, K] holds the logit of j in stage k; ``own`` [E, K] the logit of k itself.
    """
    eye = torch.eye(logits.shape[-1], dtype=torch.bool, device=logits.device)
    stage = torch.where(eye, own[:, :, None], logits).masked_fill(~(better | eye), -math.inf)
    has_worse = better.any(dim=-1)
    terms = torch.logsumexp(stage, dim=-1) - own
    return torch.where(has_worse, terms, torch.zeros_like(terms)).sum(dim=-1)


@dataclass
class PROParams:
    sft_weight: NonNegative = 0.05  # w_sft (PRO/train/train_hh.sh); scaled by (K - 1)^2
    reward_gap_temperature: bool = True  # False: the paper's ablation without temperatures


@objective("pro", params=PROParams, needs_reference=False, data="ranked", paper="arXiv:2306.17492")
def pro(inputs: ObjectiveInputs, params: PROParams) -> ObjectiveOutput:
    """Preference Ranking Optimization (PRO): Plackett-Luce over length-normalised log-probs.

    s_k = log pi_theta(y_k|x) / |y_k| (no reference). For each y_k with W(k) non-empty:
    T_kj = psi_k - psi_j (j in W(k)), T_kk = max_{j in W(k)} T_kj,
    l_k = log(exp(s_k T_kk) + sum_{j in W(k)} exp(s_j T_kj)) - s_k T_kk.
    loss = sum_k l_k + w_sft (K - 1)^2 (-log pi_theta(y_best|x)) with the SUMMED log-prob of the
    best-scored response (the mean over the responses tied for best). Implied reward r(y) = s.
    Each stage asks the response to beat everything ranked below it, with reward-gap
    temperatures: a far-worse response is pushed down harder than a near-tie.
    reward_gap_temperature=False sets every T to 1 (plain Plackett-Luce; the paper's ablation).
    Without ties this is the authors' compute_loss (DAMO-ConvAI PRO/train/utils/process_manager.py;
    their 1e-10 inside the log is dropped). With ties it drops stages and terms whose
    temperature is 0, which the sorted formula gives as tie-order-dependent constants.
    """
    scores = _response_scores(inputs, "pro")
    s = inputs.policy.mean_logps
    better = strictly_better(scores)
    if params.reward_gap_temperature:
        gaps = scores[:, :, None] - scores[:, None, :]  # T_kj
        top_gap = torch.where(better, gaps, torch.zeros_like(gaps)).amax(dim=-1)  # T_kk
        logits, own = s[:, None, :] * gaps, s * top_gap
    else:
        logits, own = s[:, None, :].expand_as(better), s
    ranking = _plackett_luce_stages(logits, own, better)
    best = scores == scores.amax(dim=1, keepdim=True)
    best_nll = -(inputs.policy.logps * best).sum(dim=1) / best.sum(dim=1)
    k = scores.shape[1]
    return ObjectiveOutput(ranking + params.sft_weight * (k - 1) ** 2 * best_nll, s)


@dataclass
class ListwisePLParams:
    beta: Positive = 0.1


@objective("listwise_pl", params=ListwisePLParams, needs_reference=True, data="ranked",
           paper="arXiv:2305.18290")
def listwise_pl(inputs: ObjectiveInputs, params: ListwisePLParams) -> ObjectiveOutput:
    """Listwise DPO: Plackett-Luce likelihood of the scored ranking under the implied rewards.

    loss = -sum_{k: W(k) non-empty} log [exp(r_k) / (exp(r_k) + sum_{j in W(k)} exp(r_j))],
    r_k = beta rho(y_k). Without ties this is -log P(ranking) of the Plackett-Luce model, the
    K-response DPO of the DPO paper's appendix A.3 (LiPO's "DPO_PL"); with K = 2 it is DPO.
    The best response must win against the whole list, the second against the rest, and so on.
    """
    scores = _response_scores(inputs, "listwise_pl")
    rewards = params.beta * log_ratios(inputs)
    better = strictly_better(scores)
    logits = rewards[:, None, :].expand_as(better)
    return ObjectiveOutput(_plackett_luce_stages(logits, rewards, better), rewards)


@dataclass
class EXOParams:
    beta_pi: Positive = 0.5  # scale of the policy's log-ratios (authors' HH and TL;DR scripts)
    beta_r: Positive = 0.5  # temperature of the score distribution


@objective("exo", params=EXOParams, needs_reference=True, data="ranked", paper="arXiv:2402.00856")
def exo(inputs: ObjectiveInputs, params: EXOParams) -> ObjectiveOutput:
    """EXO over K scored responses: reverse KL from the policy's list distribution to the scores'.

    p_theta(k) = softmax_k(beta_pi rho(y_k)), p_r(k) = softmax_k(psi_k / beta_r),
    loss = KL(p_theta || p_r) = sum_k p_theta(k) [log p_theta(k) - log p_r(k)],
    implied reward r(y) = beta_pi rho(y). Reverse KL is mode-seeking: the policy concentrates on
    the best-scored responses instead of spreading mass to cover all of them, which is the
    paper's case for EXO being exact where DPO is not. Ties get equal target probability.
    Matches the authors' exact_loss, loss_type "exo-rw" (haozheji/exact-optimization).
    """
    scores = _response_scores(inputs, "exo")
    rewards = params.beta_pi * log_ratios(inputs)
    log_p_theta = F.log_softmax(rewards, dim=1)
    log_p_target = F.log_softmax(scores / params.beta_r, dim=1)
    return ObjectiveOutput((log_p_theta.exp() * (log_p_theta - log_p_target)).sum(dim=1), rewards)


@dataclass
class TreePOParams:
    beta: Positive = 0.1


def lambda_weights(scores: torch.Tensor, rewards: torch.Tensor) -> torch.Tensor:
    """LiPO's lambda_ij = |G_i - G_j| |1/D(tau_i) - 1/D(tau_j)|, [E, K, K], no gradient.

    G = 2^psi - 1; D(tau) = log2(1 + tau), tau = 1-based rank by the implied reward (ties in
    the reward broken by higher score, then by position).
    """
    k = scores.shape[1]
    position = torch.arange(k, device=scores.device, dtype=scores.dtype)
    # lexicographic sort key: reward desc, then score desc, then position asc
    order = torch.argsort(position.expand_as(scores), dim=1, stable=True)
    for key in (-scores, -rewards):
        order = order.gather(1, torch.argsort(key.gather(1, order), dim=1, stable=True))
    ranks = torch.empty_like(scores).scatter_(1, order, (position + 1).expand_as(scores))
    inverse_discount = 1.0 / torch.log2(1.0 + ranks)
    gains = torch.exp2(scores) - 1.0
    return ((gains[:, :, None] - gains[:, None, :]).abs()
            * (inverse_discount[:, :, None] - inverse_discount[:, None, :]).abs())


def _small_scores(scores: dict, params) -> str | None:
    largest = max(abs(score) for score in scores["response_scores"])
    return None if largest <= MAX_EXP2_GAIN_SCORE else (
        f"a score of {largest:g}: tree_po weights pairs by 2^score, so |scores| must be at "
        f"most {MAX_EXP2_GAIN_SCORE:g}. Rescale the scores, e.g. to [0, 1] as in LiPO.")


@objective("tree_po", params=TreePOParams, needs_reference=True, data="ranked",
           paper="arXiv:2410.12854", check=_small_scores)
def tree_po(inputs: ObjectiveInputs, params: TreePOParams) -> ObjectiveOutput:
    """Tree Preference Optimization (TPO, tree): lambda-weighted pairwise ranking of the list.

    loss = -sum_{i,j: psi_i > psi_j} lambda_ij log sigmoid(r_i - r_j), r = beta rho(y), with
    LiPO-lambda weights lambda_ij = |G_i - G_j| |1/D(tau_i) - 1/D(tau_j)|, G = 2^psi - 1,
    D(tau) = log2(1 + tau), tau_i the rank of y_i by the current implied reward (detached;
    reward ties broken by higher score, then position). Pairs whose swap would change the
    list's DCG most weigh most, so the loss works on the top of the ranking first.
    UNVERIFIED: OBJECTIVES.md recalls this LiPO-style form; the authors' released loss.py
    (MrBlankness/TPO) instead applies -log sigmoid(beta x) to an unweighted mean of pairwise
    logistic losses over step-weighted log-ratios, so the two disagree and this follows the
    spec. The paper's Adaptive Step Reward (step-level rewards reweighted by the similarity
    of steps shared between branches) needs step boundaries and hidden states and is not
    implemented. LiPO's gains assume small scores (labels in [0, 1]); scores above 60 are
    rejected because 2^psi would swamp float32.
    """
    scores = _response_scores(inputs, "tree_po")
    rewards = params.beta * log_ratios(inputs)
    weights = lambda_weights(scores, rewards.detach()) * strictly_better(scores)
    pair_losses = -F.logsigmoid(rewards[:, :, None] - rewards[:, None, :])
    return ObjectiveOutput((weights * pair_losses).sum(dim=(1, 2)), rewards)
