"""Pairwise objectives built on a different divergence or distance than DPO's reverse KL.

f-DPO swaps the KL regulariser for another f-divergence, EXO minimises the reverse KL between the
model's and the labels' preference distributions, AOT asks for distributional (stochastic)
dominance of chosen over rejected rewards across the batch.
Notation: rho(y) = log pi_theta(y|x) - log pi_ref(y|x); h = rho(y_w) - rho(y_l); u = e^rho.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from .common import (
    MAX_EXPONENT,
    Finite,
    FlipRate,
    Positive,
    chosen_minus_rejected,
    conservative_logistic,
    log_ratios,
    refuse_idle,
)
from .registry import ObjectiveInputs, ObjectiveOutput, objective


@dataclass
class FDPOParams:
    beta: Positive = 0.1
    divergence: Literal["reverse_kl", "forward_kl", "js", "alpha"] = "reverse_kl"
    alpha: Finite = 0.5  # alpha-divergence coefficient, paper convention, in (0, 1)

    def __post_init__(self):
        if self.divergence != "alpha":
            refuse_idle(self, ("alpha",), f"with divergence {self.divergence} (it is the "
                        "alpha-divergence's coefficient)")
        if self.divergence == "alpha" and not 0.0 < self.alpha < 1.0:
            raise ValueError(f"f_dpo alpha-divergence needs 0 < alpha < 1; got {self.alpha} "
                             "(alpha -> 0 is reverse_kl, alpha -> 1 is forward_kl)")


def f_derivative(ratios: torch.Tensor, params: FDPOParams) -> torch.Tensor:
    """f'(u) at u = e^rho for the chosen f-divergence (constants cancel in the chosen-rejected gap)."""
    if params.divergence == "reverse_kl":
        return ratios
    # -expm1(x) = 1 - e^x without cancellation when x is near 0 (rho ~ 0 or a small alpha)
    if params.divergence == "forward_kl":
        return -torch.expm1((-ratios).clamp(max=MAX_EXPONENT))
    if params.divergence == "js":
        return math.log(2.0) + F.logsigmoid(ratios)
    return -torch.expm1((-params.alpha * ratios).clamp(max=MAX_EXPONENT)) / params.alpha


@objective("f_dpo", params=FDPOParams, needs_reference=True, paper="arXiv:2309.16240")
def f_dpo(inputs: ObjectiveInputs, params: FDPOParams) -> ObjectiveOutput:
    """f-DPO: DPO under a general f-divergence constraint to the reference.

    loss = -log sigmoid(beta [f'(u_w) - f'(u_l)]), u = pi_theta(y|x)/pi_ref(y|x) = e^rho,
    implied reward r(y) = beta f'(u(y)). f'(u) by divergence:
      reverse_kl  log u = rho (this is DPO)
      forward_kl  1 - 1/u = 1 - e^-rho
      js          log(2u / (1 + u)) = log 2 + log sigmoid(rho)
      alpha       (1 - u^-alpha) / alpha, 0 < alpha < 1 (reverse KL as alpha -> 0, forward KL at 1)
    Forward KL and small alpha are mass-covering: they keep more of the reference's diversity.
    The alpha convention is the paper's; TRL's f_alpha_divergence_coef c writes
    (u^(c-1) - 1)/(c - 1), the same function with alpha = 1 - c (equal at the 0.5 default).
    exp() arguments are clamped at 80 (as TRL does for alpha) so rho << 0 stays finite; past the
    clamp the loss is flat, so such an example gives no gradient.
    """
    rewards = params.beta * f_derivative(log_ratios(inputs), params)
    return ObjectiveOutput(-F.logsigmoid(chosen_minus_rejected(rewards)), rewards)


@dataclass
class EXOPairParams:
    beta: Positive = 0.1  # beta_r in the paper's section B (via the TRL paper index)
    # label smoothing of the target distribution (1 - eps, eps): log eps needs eps > 0, and
    # from 0.5 on the target prefers the rejected response
    epsilon: Annotated[float, Field(gt=0, lt=0.5)] = 1e-3


@objective("exo_pair", params=EXOPairParams, needs_reference=True, paper="arXiv:2402.00856")
def exo_pair(inputs: ObjectiveInputs, params: EXOPairParams) -> ObjectiveOutput:
    """EXO on pairs: reverse KL from the model's pair distribution to the smoothed label.

    z = beta h; loss = KL(p_theta || p_label) = sigmoid(z) [log sigmoid(z) - log(1 - eps)]
    + sigmoid(-z) [log sigmoid(-z) - log eps], r(y) = beta rho(y).
    p_theta = softmax(beta rho) over {y_w, y_l}, p_label = (1 - eps, eps). Reverse KL is
    mode-seeking, where DPO's loss behaves like a forward KL; that is the paper's argument for
    exactness.
    """
    eps = params.epsilon
    rewards = params.beta * log_ratios(inputs)
    z = chosen_minus_rejected(rewards)
    losses = (torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-eps))
              + torch.sigmoid(-z) * (F.logsigmoid(-z) - math.log(eps)))
    return ObjectiveOutput(losses, rewards)


@dataclass
class AOTParams:
    beta: Positive = 0.01  # OBJECTIVES.md; the paper has no other hyperparameter
    epsilon: FlipRate = 0.0  # label smoothing of the logistic loss (TRL's label_smoothing)


@objective("aot_pair", params=AOTParams, needs_reference=True, paper="arXiv:2406.05882",
           whole_batch=True)
def aot_pair(inputs: ObjectiveInputs, params: AOTParams) -> ObjectiveOutput:
    """Alignment via Optimal Transport, paired: stochastic dominance of policy over reference margins.

    d = sort_batch(log pi_theta(y_w) - log pi_theta(y_l))
        - sort_batch(log pi_ref(y_w) - log pi_ref(y_l));
    loss_i = -(1 - eps) log sigmoid(beta d_i) - eps log sigmoid(-beta d_i), r(y) = beta rho(y).
    In one dimension optimal transport with a convex cost reduces to matching sorted values, so
    this asks every quantile of the policy's chosen-minus-rejected margin to exceed the same
    quantile of the reference's (TRL's "aot").
    The sort runs over the micro-batch (larger batches give better quantiles), and losses[i]
    belongs to rank i, not to example i: only their sum is meaningful.
    """
    policy_margin, _ = torch.sort(chosen_minus_rejected(inputs.policy.logps))
    reference_margin, _ = torch.sort(chosen_minus_rejected(inputs.reference.logps))
    losses = conservative_logistic(params.beta * (policy_margin - reference_margin), params.epsilon)
    return ObjectiveOutput(losses, params.beta * log_ratios(inputs))


@objective("aot_unpaired", params=AOTParams, needs_reference=True, paper="arXiv:2406.05882",
           whole_batch=True)
def aot_unpaired(inputs: ObjectiveInputs, params: AOTParams) -> ObjectiveOutput:
    """Alignment via Optimal Transport, unpaired: chosen log-ratios dominate rejected ones by quantile.

    d = sort_batch(rho(y_w)) - sort_batch(rho(y_l)), the two sorted separately;
    loss_i = -(1 - eps) log sigmoid(beta d_i) - eps log sigmoid(-beta d_i), r(y) = beta rho(y).
    Pairing is ignored: the i-th best chosen log-ratio is compared with the i-th best rejected
    one, so the distribution of chosen rewards must dominate that of rejected rewards (TRL's
    "aot_unpaired", here fed with pairs).
    The sort runs over the micro-batch (larger batches give better quantiles), and losses[i]
    belongs to rank i, not to example i: only their sum is meaningful.
    """
    ratios = log_ratios(inputs)
    chosen, _ = torch.sort(ratios[:, 0])
    rejected, _ = torch.sort(ratios[:, 1])
    losses = conservative_logistic(params.beta * (chosen - rejected), params.epsilon)
    return ObjectiveOutput(losses, params.beta * ratios)
