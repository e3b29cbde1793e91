"""More pairwise objectives: gold-anchored (TPO), multi-objective margins (MODPO), soft-target
SPPO, the in-batch form of group-robust DPO and several references (MRPO).

Notation as in pairwise.py: rho(y) = log pi_theta(y|x) - log pi_ref(y|x) (summed log-probs);
h = rho(y_w) - rho(y_l); |y| is the number of response tokens; bar log pi(y) = log pi(y|x)/|y|.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal, Optional

import torch
import torch.nn.functional as F
from pydantic import Field

from .common import (
    FlipRate,
    NonNegative,
    Positive,
    chosen_minus_rejected,
    conservative_logistic,
    log_ratios,
    refuse_idle,
    required_scores,
)
from .registry import ObjectiveInputs, ObjectiveOutput, objective
from .state import GroupWeights


@dataclass
class TriplePOParams:
    beta: Positive = 0.01  # TRL TPOConfig / paper
    alpha: NonNegative = 1.0  # tpo_alpha: weight of the gold-response NLL
    epsilon: FlipRate = 0.0  # label smoothing of the preference term (TRL label_smoothing)
    variant: Literal["sigmoid", "tpo_l"] = "sigmoid"
    gamma: NonNegative = 0.5  # TPO-L target margin (only for variant="tpo_l")

    def __post_init__(self):
        if self.variant == "sigmoid":
            refuse_idle(self, ("gamma",), "with variant sigmoid (it is TPO-L's target margin)")
        if self.variant == "tpo_l" and self.epsilon:
            raise ValueError("triple_po variant=tpo_l has no label smoothing (its term is "
                             "-log sigmoid(beta h - gamma), with a target margin instead); "
                             "remove epsilon, or use variant=sigmoid.")


@objective("triple_po", params=TriplePOParams, needs_reference=False, paper="arXiv:2405.16681",
           gold=True)
def triple_po(inputs: ObjectiveInputs, params: TriplePOParams) -> ObjectiveOutput:
    """Triple Preference Optimization (TPO): reference-free preference loss plus NLL on a gold response.

    sigmoid: loss = -(1 - eps) log sigmoid(beta d) - eps log sigmoid(-beta d) + alpha NLL(y_gold),
    d = log pi_theta(y_w|x) - log pi_theta(y_l|x);
    tpo_l: loss = -log sigmoid(beta [bar log pi(y_w) - bar log pi(y_l)] - gamma) + alpha NLL(y_gold),
    NLL(y_gold) = -log pi_theta(y_gold|x) / |y_gold|; r(y) = beta log pi_theta(y) (beta bar log pi for
    tpo_l), for chosen, rejected and gold. The gold response plays the part of DPO's reference: the
    SFT term keeps the policy on it, so no reference model is needed. Needs pairs with a ``gold``
    response (slot 2). The NLL is a per-example token mean; TRL 1.16's TPOTrainer takes one token
    mean over the batch, which equals it when all gold responses have the same length.
    """
    logps, counts = inputs.policy.logps, inputs.policy.token_counts
    gold_nll = -logps[:, 2] / counts[:, 2]
    if params.variant == "tpo_l":
        rewards = params.beta * logps / counts
        preference = -F.logsigmoid(chosen_minus_rejected(rewards) - params.gamma)
    else:
        rewards = params.beta * logps
        preference = conservative_logistic(chosen_minus_rejected(rewards), params.epsilon)
    return ObjectiveOutput(preference + params.alpha * gold_nll, rewards)


@dataclass
class MODPOParams:
    beta: Positive = 0.1
    # w_1, weight of the other objective; w_0 = 1 - w_1 (paper sweeps 0.1/0.5/0.9). Not
    # `weight`: that key of a config term scales the term's loss.
    margin_weight: Annotated[float, Field(ge=0, lt=1)] = 0.5


@objective("modpo", params=MODPOParams, needs_reference=True, paper="arXiv:2310.03708",
           scores=("chosen_score", "rejected_score"))
def modpo(inputs: ObjectiveInputs, params: MODPOParams) -> ObjectiveOutput:
    """Multi-Objective DPO (MODPO): DPO whose margin is corrected by another objective's reward.

    r~(y) = (1/w_0) [beta rho(y) - w_1 s(y)], w_0 = 1 - w_1; loss = -log sigmoid(r~(y_w) - r~(y_l)),
    r(y) = r~(y). s(y_w), s(y_l) are inputs.scores chosen_score, rejected_score: the margin reward
    model's score (e.g. a separately trained DPO model's beta log pi_dpo/pi_sft) of each response.
    Training on the pairs of objective 0 with this margin gives the policy that is optimal for the
    w-weighted sum of the rewards; sweeping w traces a Pareto front. One margin model here (the
    paper allows several; sum their weighted scores into the two fields).
    """
    chosen, rejected = required_scores(inputs, ("chosen_score", "rejected_score"), "modpo")
    margin_scores = torch.stack((chosen, rejected), dim=1)
    w_1 = params.margin_weight
    rewards = (params.beta * log_ratios(inputs) - w_1 * margin_scores) / (1.0 - w_1)
    return ObjectiveOutput(-F.logsigmoid(chosen_minus_rejected(rewards)), rewards)


@dataclass
class SPPOSoftParams:
    beta: Positive = 0.001  # 1/eta in the paper (eta = 1000)


def _probabilities(scores: dict, params) -> str | None:
    bad = [key for key in ("chosen_win_prob", "rejected_win_prob") if not 0 <= scores[key] <= 1]
    return None if not bad else (f"{bad[0]} is {scores[bad[0]]:g}; a win probability is "
                                 "between 0 and 1.")


@objective("sppo_soft", params=SPPOSoftParams, needs_reference=True, paper="arXiv:2405.00675",
           online_win_probs=True, scores=("chosen_win_prob", "rejected_win_prob"),
           check=_probabilities)
def sppo_soft(inputs: ObjectiveInputs, params: SPPOSoftParams) -> ObjectiveOutput:
    """Self-Play PO with soft win probabilities: regress each log-ratio onto (P - 1/2)/beta.

    loss = 1/2 [(rho(y_w) - (P_w - 1/2)/beta)^2 + (rho(y_l) - (P_l - 1/2)/beta)^2], r(y) = beta rho(y).
    P_w, P_l are inputs.scores chosen_win_prob, rejected_win_prob: the estimated probability
    P(y > pi_t) that each response beats the current policy (SPPO averages PairRM's pairwise
    probabilities over K samples). P_w = 1, P_l = 0 gives sppo_hard. The 1/2 follows the authors'
    uclaml/SPPO code, as in sppo_hard; the reference should be the previous iterate pi_t.
    """
    win_w, win_l = required_scores(inputs, ("chosen_win_prob", "rejected_win_prob"), "sppo_soft")
    wins = torch.stack((win_w, win_l), dim=1)
    ratios = log_ratios(inputs)[:, :2]
    losses = 0.5 * ((ratios - (wins - 0.5) / params.beta) ** 2).sum(dim=1)
    return ObjectiveOutput(losses, params.beta * ratios)


@dataclass
class GroupRobustDPOParams:
    beta: Positive = 0.1
    # eta_alpha of the mirror-ascent group weights (paper plots: 0.05, 0.1); 0: group-balanced
    step_size: NonNegative = 0.01
    # L_g = (N / N_g) x the group's loss sum in the batch, N_g of the N training examples being
    # in group g (the authors' divide_by_totalcount); false: the group's mean loss in the batch
    divide_by_totalcount: bool = False
    # c of the weight step on L_g + c / sqrt(N_g), which favours small groups (paper eq. 5); 0: off
    adjustment: NonNegative = 0.0


def _group_id(scores: dict, params) -> str | None:
    group = scores["group"]  # carried as float32 on the device: whole numbers up to 2^24 only
    return None if float(group).is_integer() and abs(group) <= 2 ** 24 else (
        f"group is {group:g}; a group is a whole number of at most 16777216 (2^24; larger "
        "ones, such as user ids or hashes, merge in float32): number the groups 0, 1, 2, ...")


@objective("group_robust_dpo", params=GroupRobustDPOParams, needs_reference=True,
           paper="arXiv:2405.20304", scores=("group",), state=GroupWeights, check=_group_id)
def group_robust_dpo(inputs: ObjectiveInputs, params: GroupRobustDPOParams) -> ObjectiveOutput:
    """Group Robust DPO (GRPO of Ramesh et al., not DeepSeek's): DPO with worst-group emphasis.

    l_i = -log sigmoid(beta h_i); L_g = mean of l_i over the batch examples of group g (0 for a
    group the batch lacks), or with divide_by_totalcount (N / N_g) sum of them, N_g of the
    training data's N examples being in group g; mirror ascent on the group weights, kept
    across steps: alpha <- alpha exp(eta (L + c / sqrt(N_g))) / sum, from uniform over the
    training data's groups (c = adjustment); objective sum_g alpha_g L_g, returned per example
    as l_i alpha_g(i) E s_g(i), s_g being L_g's factor (1 / the group's batch count, or N / N_g),
    so the batch mean equals it (E examples). r(y) = beta rho(y). Group ids are inputs.scores
    group. alpha takes its step on every training micro-batch (all processes' losses counted)
    before it weighs it; it is checkpointed with the run, and evaluation weighs groups by it as
    training left it. Groups that fare worst gain weight step after step, so the policy cannot
    trade one group's loss for another's average gain. With divide_by_totalcount the loss
    grows with the batch size, as in the authors' code (rsshyam/GRPO).
    """
    (group,) = required_scores(inputs, ("group",), "group_robust_dpo")
    rewards = params.beta * log_ratios(inputs)
    losses = -F.logsigmoid(chosen_minus_rejected(rewards))
    weights = inputs.state.weights(group, losses, params.step_size, update=inputs.training,
                                   by_data_counts=params.divide_by_totalcount,
                                   adjustment=params.adjustment)
    return ObjectiveOutput(losses * weights, rewards)


@dataclass
class MRPOParams:
    beta: Positive = 0.1
    # alpha_k of the combined reference, for [the main reference, *reference.extra_models];
    # None = equal weights. Must sum to 1.
    weights: Optional[list[float]] = None

    def __post_init__(self):
        if self.weights is not None:
            if any(w < 0 for w in self.weights) or abs(sum(self.weights) - 1.0) > 1e-6:
                raise ValueError(f"mrpo weights must be non-negative and sum to 1; got {self.weights}")


@objective("mrpo", params=MRPOParams, needs_reference=True, paper="arXiv:2405.16388",
           extra_references=lambda params: len(params.weights) - 1 if params.weights else True)
def mrpo(inputs: ObjectiveInputs, params: MRPOParams) -> ObjectiveOutput:
    """Multi-Reference PO (MRPO): DPO against a weighted combination of several reference models.

    log pi~_ref(y) = sum_k alpha_k log pi_ref^k(y) over the main reference (the initial policy)
    and each model of reference.extra_models; loss = -log sigmoid(beta [rho~(y_w) - rho~(y_l)]),
    rho~(y) = log pi_theta(y) - log pi~_ref(y), r(y) = beta rho~(y). The geometric mixture is the
    paper's closed-form lower bound for a KL constraint to every reference at once, so the policy
    borrows the prior knowledge of all of them. Extra references must share the policy's
    tokenizer here. UNVERIFIED against code (none public): the paper's clipped trust-region
    (CTRO) and adaptive weighting (ARWC) refinements are not implemented; weights are fixed.
    """
    references = [inputs.reference, *inputs.extra_references]
    weights = params.weights or [1.0 / len(references)] * len(references)
    if len(weights) != len(references):
        raise ValueError(f"mrpo has {len(references)} references (the main one plus "
                         f"{len(references) - 1} in reference.extra_models) but {len(weights)} "
                         "weights; give one weight per reference, main reference first")
    combined = sum(w * ref.logps for w, ref in zip(weights, references))
    rewards = params.beta * (inputs.policy.logps - combined)
    return ObjectiveOutput(-F.logsigmoid(chosen_minus_rejected(rewards)), rewards)
