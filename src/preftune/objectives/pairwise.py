"""Pairwise objectives that shape a loss on the chosen-vs-rejected margin against a reference.

Notation: rho(y) = log pi_theta(y|x) - log pi_ref(y|x) (summed log-probs); h = rho(y_w) - rho(y_l);
|y| is the number of response tokens; a bar (bar log pi) means the per-token mean log pi(y|x)/|y|.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from .common import (
    MAX_EXPONENT,
    FlipRate,
    NonNegative,
    Positive,
    PositiveShare,
    chosen_minus_rejected,
    chosen_nll,
    conservative_logistic,
    log_ratios,
    required_scores,
)
from .registry import ObjectiveInputs, ObjectiveOutput, objective


@dataclass
class DPOParams:
    beta: Positive = 0.1  # inverse strength of the KL constraint to the reference


@objective("dpo", params=DPOParams, needs_reference=True, paper="arXiv:2305.18290")
def dpo(inputs: ObjectiveInputs, params: DPOParams) -> ObjectiveOutput:
    """Direct Preference Optimization: logistic loss on the implied-reward margin.

    loss = -log sigmoid(beta * h), implied reward r(y) = beta * rho(y).
    The policy is pushed to raise chosen log-probs relative to the reference more than rejected
    ones; beta sets how far it may drift from the reference.
    """
    rewards = params.beta * log_ratios(inputs)
    return ObjectiveOutput(-F.logsigmoid(chosen_minus_rejected(rewards)), rewards)


@dataclass
class IPOParams:
    beta: Positive = 0.1  # tau in the paper: the target margin is 1 / (2 * beta)
    normalize_length: bool = True  # TRL's convention; False gives the paper's summed Eq. 17


@objective("ipo", params=IPOParams, needs_reference=True, paper="arXiv:2310.12036")
def ipo(inputs: ObjectiveInputs, params: IPOParams) -> ObjectiveOutput:
    """Identity Preference Optimization: squared regression of the margin onto 1/(2 beta).

    loss = (h' - 1/(2 beta))^2, implied reward r(y) = beta * rho'(y), where
    - normalize_length=True (default, TRL 1.16): rho'(y) = rho(y)/|y|, h' = rho'(y_w) - rho'(y_l).
      TRL states the IPO authors confirmed this per-token form is what the paper's results used.
    - normalize_length=False: rho' = rho on summed log-probs, the paper's Eq. 17 as written (and
      the rycolab/ODPO and OpenRLHF code).
    Unlike DPO's logistic loss, which keeps rewarding a larger margin, the square stops at a
    finite target, so deterministic preferences cannot drive the policy arbitrarily far from the
    reference.
    """
    ratios = log_ratios(inputs)
    if params.normalize_length:
        ratios = ratios / inputs.policy.token_counts
    margin = chosen_minus_rejected(ratios)
    return ObjectiveOutput((margin - 1.0 / (2.0 * params.beta)) ** 2, params.beta * ratios)


@dataclass
class CDPOParams:
    beta: Positive = 0.1
    epsilon: FlipRate = 0.1  # assumed probability that a preference label is flipped


@objective("cdpo", params=CDPOParams, needs_reference=True,
           paper="https://ericmitchell.ai/cdpo.pdf")
def cdpo(inputs: ObjectiveInputs, params: CDPOParams) -> ObjectiveOutput:
    """Conservative DPO: DPO with label smoothing epsilon.

    loss = -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h), r(y) = beta * rho(y).
    Treats each label as flipped with probability eps, so the loss stops rewarding margins past
    log((1 - eps)/eps) / beta instead of growing them forever (Mitchell's note; the rDPO paper
    calls it the practitioners' heuristic). TRL 1.16's "sigmoid" loss no longer takes label
    smoothing, so there is no TRL counterpart.
    """
    rewards = params.beta * log_ratios(inputs)
    losses = conservative_logistic(chosen_minus_rejected(rewards), params.epsilon)
    return ObjectiveOutput(losses, rewards)


@dataclass
class RobustDPOParams:
    beta: Positive = 0.01  # paper App. B (via the TRL paper index)
    epsilon: FlipRate = 0.1  # assumed label-flip rate, in [0, 0.5)


@objective("robust_dpo", params=RobustDPOParams, needs_reference=True, paper="arXiv:2403.00409")
def robust_dpo(inputs: ObjectiveInputs, params: RobustDPOParams) -> ObjectiveOutput:
    """Robust DPO (rDPO): unbiased DPO loss under labels flipped at a known rate epsilon.

    loss = [(1 - eps)(-log sigmoid(beta h)) - eps(-log sigmoid(-beta h))] / (1 - 2 eps),
    r(y) = beta * rho(y). Its expectation over the label noise equals the clean DPO loss, so the
    noise is de-biased rather than only damped as in cdpo.
    Default beta = 0.01 follows the TRL paper index for App. B (OBJECTIVES.md says 0.1).
    Computed as -log sigmoid(z) - eps z / (1 - 2 eps), z = beta h, the same value (log
    sigmoid(-z) = log sigmoid(z) - z) without the difference of two nearly equal terms that
    lost the value as eps neared 0.5.
    """
    eps = params.epsilon
    rewards = params.beta * log_ratios(inputs)
    z = chosen_minus_rejected(rewards)
    losses = -F.logsigmoid(z) - eps / (1.0 - 2.0 * eps) * z
    return ObjectiveOutput(losses, rewards)


@dataclass
class HingeParams:
    beta: Positive = 0.05  # the hinge asks for a margin h >= 1 / beta (RSO's gamma, via TRL index)


@objective("hinge", params=HingeParams, needs_reference=True, paper="arXiv:2309.06657")
def hinge(inputs: ObjectiveInputs, params: HingeParams) -> ObjectiveOutput:
    """Hinge loss on the reference-normalised margin (SLiC-HF calibration / RSO "hinge-norm").

    loss = max(0, 1 - beta h), r(y) = beta * rho(y).
    Pairs already separated by 1/beta in log-ratio give no gradient at all. SLiC-HF
    (arXiv:2305.10425) applies the hinge to raw policy log-probs; the reference-normalised form
    here is RSO's and TRL's "hinge".
    """
    rewards = params.beta * log_ratios(inputs)
    return ObjectiveOutput(torch.relu(1.0 - chosen_minus_rejected(rewards)), rewards)


@dataclass
class ODPOParams:
    beta: Positive = 0.1
    alpha: NonNegative = 1.0  # scale of the offset (config/loss/odpo.yaml)
    offset: Literal["difference", "ratio"] = "difference"


def _offset_defined(scores: dict, params) -> str | None:
    chosen, rejected = scores["chosen_score"], scores["rejected_score"]
    if params.offset == "difference" and chosen <= rejected:
        return (f"chosen_score {chosen:g} is not above rejected_score {rejected:g}, and offset "
                "'difference' takes the log of their difference. Drop ties and flipped pairs, "
                "or use offset: ratio.")
    if params.offset == "ratio" and min(chosen, rejected) <= 0:
        return (f"chosen_score {chosen:g} and rejected_score {rejected:g}: offset 'ratio' takes "
                "the log of their ratio, so both must be positive. Use offset: difference, or "
                "shift the scores above 0.")
    return None


@objective("odpo", params=ODPOParams, needs_reference=True, paper="arXiv:2402.10571",
           scores=("chosen_score", "rejected_score"), check=_offset_defined)
def odpo(inputs: ObjectiveInputs, params: ODPOParams) -> ObjectiveOutput:
    """DPO with an offset: the margin must beat a gap that grows with the score difference.

    loss = -log sigmoid(beta h - Delta), Delta = alpha * log(s_w - s_l) ("difference") or
    alpha * log(s_w / s_l) ("ratio"); s_w, s_l are inputs.scores chosen_score, rejected_score.
    r(y) = beta * rho(y). Strongly preferred pairs must be separated more than near-ties.
    """
    chosen, rejected = required_scores(inputs, ("chosen_score", "rejected_score"), "odpo")
    if params.offset == "difference":
        gap = torch.log(chosen - rejected)
    else:
        gap = torch.log(chosen) - torch.log(rejected)
    rewards = params.beta * log_ratios(inputs)
    return ObjectiveOutput(-F.logsigmoid(chosen_minus_rejected(rewards) - params.alpha * gap), rewards)


@dataclass
class DPOShiftParams:
    beta: Positive = 0.1
    schedule: Literal["fixed", "increase_linear", "decrease_linear"] = "fixed"
    shift_lambda: PositiveShare = 0.95  # lambda for schedule="fixed" (paper: 0.75-0.95 work well)
    lambda_min: PositiveShare = 0.5  # bounds of the linear schedules (authors' config defaults)
    lambda_max: PositiveShare = 1.0
    schedule_steps: int = 0  # T: optimizer steps over which a linear schedule runs (required)

    def __post_init__(self):
        if self.schedule != "fixed" and self.schedule_steps <= 0:
            raise ValueError(f"dpo_shift schedule={self.schedule!r} needs schedule_steps > 0 "
                             "(usually the run's total optimizer steps)")
        if self.lambda_min > self.lambda_max:
            raise ValueError(f"dpo_shift lambda_min ({self.lambda_min}) is above lambda_max "
                             f"({self.lambda_max})")


def shift_lambda_at(params: DPOShiftParams, step: int) -> float:
    """lambda_t: fixed, or linear in t/T between lambda_min and lambda_max (held at the end)."""
    if params.schedule == "fixed":
        return params.shift_lambda
    progress = min(max(step, 0) / params.schedule_steps, 1.0)
    span = params.lambda_max - params.lambda_min
    if params.schedule == "increase_linear":
        return params.lambda_min + span * progress
    return params.lambda_max - span * progress


@objective("dpo_shift", params=DPOShiftParams, needs_reference=True, paper="arXiv:2502.07599")
def dpo_shift(inputs: ObjectiveInputs, params: DPOShiftParams) -> ObjectiveOutput:
    """DPO-Shift: DPO with the rejected log-ratio scaled down by lambda <= 1.

    loss = -log sigmoid(beta [rho(y_w) - lambda_t rho(y_l)]), rewards r(y_w) = beta rho(y_w),
    r(y_l) = beta lambda_t rho(y_l). lambda_t is fixed, or moves linearly with the optimizer step
    t (inputs.step) over schedule_steps T: increase_linear lambda_min + (lambda_max - lambda_min) t/T,
    decrease_linear lambda_max - (lambda_max - lambda_min) t/T. lambda < 1 counters DPO's habit of
    lowering the chosen likelihood too, at some cost in reward margin.
    """
    lam = shift_lambda_at(params, inputs.step)
    ratios = log_ratios(inputs)
    rewards = params.beta * torch.stack((ratios[:, 0], lam * ratios[:, 1]), dim=1)
    return ObjectiveOutput(-F.logsigmoid(chosen_minus_rejected(rewards)), rewards)


@dataclass
class LNDPOParams:
    beta: Positive = 0.1  # the paper's value is not in OBJECTIVES.md; TRL's default


@objective("ln_dpo", params=LNDPOParams, needs_reference=True, paper="arXiv:2407.15229")
def ln_dpo(inputs: ObjectiveInputs, params: LNDPOParams) -> ObjectiveOutput:
    """Length-normalised DPO (LN-DPO): DPO on per-token log-ratios.

    loss = -log sigmoid(beta [rho(y_w)/|y_w| - rho(y_l)/|y_l|]), r(y) = beta rho(y)/|y|.
    Identical to TRL's "sigmoid_norm". Normalising removes the reward's growth with length, the
    lever behind DPO's verbosity. Matching TRL's formula to the LN-DPO paper is OBJECTIVES.md's
    reading of the abstract (UNVERIFIED against the authors' code).
    """
    rewards = params.beta * log_ratios(inputs) / inputs.policy.token_counts
    return ObjectiveOutput(-F.logsigmoid(chosen_minus_rejected(rewards)), rewards)


@dataclass
class DPOSFTParams:
    beta: Positive = 0.01  # paper App. E.1 via TRL index
    alpha: NonNegative = 0.005  # eta: weight of the chosen NLL


@objective("dpo_sft", params=DPOSFTParams, needs_reference=True, paper="arXiv:2405.16436")
def dpo_sft(inputs: ObjectiveInputs, params: DPOSFTParams) -> ObjectiveOutput:
    """DPO plus an SFT term on the chosen response (Regularized PO; TRL ["sigmoid", "sft"]).

    loss = -log sigmoid(beta h) + alpha * (-log pi_theta(y_w|x) / |y_w|), r(y) = beta rho(y).
    The paper shows the SFT term acts as an adversarial regulariser against reward
    over-optimisation. The NLL here is a per-example token mean; TRL's "sft" is one token mean
    over the whole batch, which equals it when all chosen responses have the same length.
    """
    rewards = params.beta * log_ratios(inputs)
    losses = -F.logsigmoid(chosen_minus_rejected(rewards)) + params.alpha * chosen_nll(inputs.policy)
    return ObjectiveOutput(losses, rewards)


@dataclass
class DiscoPOPParams:
    beta: Positive = 0.05  # paper B.1
    tau: Positive = 0.05  # temperature of the modulation (paper E)


@objective("discopop", params=DiscoPOPParams, needs_reference=True, paper="arXiv:2406.08414")
def discopop(inputs: ObjectiveInputs, params: DiscoPOPParams) -> ObjectiveOutput:
    """DiscoPOP (log-ratio modulated loss): logistic and exponential losses blended by the margin.

    z = beta h; loss = (1 - sigmoid(z/tau)) (-log sigmoid(z)) + sigmoid(z/tau) exp(-z),
    r(y) = beta rho(y). Negative margins get the logistic loss, positive ones the exponential.
    The second term is evaluated as exp(log sigmoid(z/tau) - z), so very negative margins give no
    0 * inf; its exponent is clamped at 80, which only binds for tau > 1 (flat, no gradient, there).
    A property of the formula itself (the paper's, as in TRL): it is not monotone in the margin.
    At the defaults it rises with h for h in about (-2.4, 1.4), so at the start of training
    (policy = reference, h = 0) its gradient lowers the chosen log-prob and raises the rejected
    one (d loss / d log pi(y_w) = +0.039); larger margins are pushed the right way.
    """
    rewards = params.beta * log_ratios(inputs)
    z = chosen_minus_rejected(rewards)
    scaled = z / params.tau
    exponential = torch.exp((F.logsigmoid(scaled) - z).clamp(max=MAX_EXPONENT))
    return ObjectiveOutput(torch.sigmoid(-scaled) * -F.logsigmoid(z) + exponential, rewards)


@dataclass
class MIPOParams:
    beta: Positive = 20.0  # Llama-3-8B-Instruct config; README: 5-25 all fine


@objective("mipo", params=MIPOParams, needs_reference=True, paper="arXiv:2409.17545")
def mipo(inputs: ObjectiveInputs, params: MIPOParams) -> ObjectiveOutput:
    """MIPO: per-token likelihood margin whose target grows with how well the reference fits the pair.

    K = bar log pi_ref(y_w) - bar log pi_ref(y_l);
    loss = -log sigmoid(beta [bar log pi_theta(y_w) - bar log pi_theta(y_l) - log(1 + e^K)]),
    r(y) = beta bar log pi_theta(y). Pairs the reference already ranks right (large K) must keep a
    large margin, so the policy stays near the reference there; poorly aligned pairs (K << 0) get
    a target near zero and are free to move.
    """
    rewards = params.beta * inputs.policy.mean_logps
    target = F.softplus(chosen_minus_rejected(inputs.reference.mean_logps))
    losses = -F.logsigmoid(chosen_minus_rejected(rewards) - params.beta * target)
    return ObjectiveOutput(losses, rewards)
