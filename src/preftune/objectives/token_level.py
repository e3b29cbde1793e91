"""Token-level objectives that constrain the policy per token with the forward KL from the
reference's full next-token distribution.

They are registered with reference_distributions=True: the policy stats then carry
kl = D_SeqKL(x, y) = sum_t KL(pi_ref(.|x, y_<t) || pi_theta(.|x, y_<t)) per response, computed
chunk by chunk from both models' hidden states (model.chunked_logps), never as full-batch logits.
Notation: rho(y) = log pi_theta(y|x) - log pi_ref(y|x); u = rho(y_w) - rho(y_l).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from .common import NonNegative, Positive, chosen_minus_rejected, log_ratios, refuse_idle
from .registry import ObjectiveInputs, ObjectiveOutput, objective


@dataclass
class TDPOParams:
    beta: Positive = 0.1
    alpha: NonNegative = 0.5  # weight of the KL difference (TDPO2 only)
    variant: Literal["tdpo1", "tdpo2"] = "tdpo1"  # the authors' config default is TDPO1

    def __post_init__(self):
        if self.variant == "tdpo1":
            refuse_idle(self, ("alpha",), "with variant tdpo1 (it weighs TDPO2's KL difference)")


def sequence_kl(inputs: ObjectiveInputs, objective: str):
    kl = inputs.policy.kl
    if kl is None:
        raise ValueError(f"objective {objective!r} needs the per-token KL to the reference's "
                         "distribution (stats.kl); it is registered with "
                         "reference_distributions=True, so it is missing only when the stats "
                         "were built by hand")
    return kl


@objective("tdpo", params=TDPOParams, needs_reference=True, paper="arXiv:2404.11999",
           reference_distributions=True)
def tdpo(inputs: ObjectiveInputs, params: TDPOParams) -> ObjectiveOutput:
    """Token-level DPO (TDPO): DPO whose margin is corrected by sequential forward KLs.

    D(y) = sum_t KL(pi_ref(.|x, y_<t) || pi_theta(.|x, y_<t)) over the response's positions.
    TDPO1: loss = -log sigmoid(beta (u - (D(y_l) - D(y_w)))).
    TDPO2: loss = -log sigmoid(beta (u - alpha (D(y_l) - sg[D(y_w)]))), sg = stop-gradient.
    r(y) = beta (rho(y) + w D(y)) with w = 1 (TDPO1) or alpha (TDPO2): the loss's logit is
    exactly r(y_w) - r(y_l), so the logged margins and accuracies are the loss's own.
    Sequence-level DPO only sees the sampled tokens; the KL term watches the whole next-token
    distribution at every position, so the policy cannot buy its margin by drifting far from the
    reference on tokens it does not sample; TDPO2 lets the rejected response's divergence grow
    but holds the chosen one's. Formula as in the authors'
    Vance0124/Token-level-Direct-Preference-Optimization tdpo_loss.
    """
    kl = sequence_kl(inputs, "tdpo")
    ratios = log_ratios(inputs)
    u = chosen_minus_rejected(ratios)
    if params.variant == "tdpo2":
        weight, delta = params.alpha, params.alpha * (kl[:, 1] - kl[:, 0].detach())
    else:
        weight, delta = 1.0, kl[:, 1] - kl[:, 0]
    rewards = params.beta * (ratios + weight * kl.detach())
    return ObjectiveOutput(-F.logsigmoid(params.beta * (u - delta)), rewards)


@dataclass
class SparsePOParams:
    beta: Positive = 0.1  # 0.8 in the paper's IMDB and TL;DR runs, 0.1 for HH


@objective("sparse_po", params=SparsePOParams, needs_reference=True, paper="arXiv:2410.05102",
           per_token=True, reference_distributions=True)
def sparse_po(inputs: ObjectiveInputs, params: SparsePOParams) -> ObjectiveOutput:
    """SparsePO with reference-activation masks: TDPO whose token terms are weighted by a mask.

    Per response token t: rho_t = log pi_theta(y_t) - log pi_ref(y_t), KL_t as in tdpo, and a
    weight m_t in [0, 1] from the reference model's activations. U(y) = sum_t m_t rho_t,
    K(y) = sum_t m_t KL_t; loss = -log sigmoid(beta [(U(y_w) - U(y_l)) - (K(y_l) - K(y_w))]),
    r(y) = beta (U(y) + K(y)), so that r(y_w) - r(y_l) is the loss's logit. Tokens the
    reference barely activates on get weights near 0, so the reward and the KL constraint
    concentrate on the tokens that carry the preference.
    m_t: each decoder layer's output is averaged over features, min-max rescaled over the
    response's tokens, and averaged over layers (the authors' "zn_rescale" mapping, whose
    z-normalisation cancels under the min-max rescale; huawei-noah/HEBO SparsePO MAPOTrainer).
    Departure: the authors hook MLP, attention and residual activations inside each layer;
    here the layer outputs (the residual stream) are used. The learned-mask variant, which
    trains a mask head alongside the policy, is not implemented.
    """
    policy, reference = inputs.policy, inputs.reference
    mask = reference.token_activation
    if policy.token_kl is None or mask is None:
        raise ValueError("objective 'sparse_po' needs per-token KLs and the reference's "
                         "activation mask (stats.token_kl, reference.token_activation); they are "
                         "computed when the reference is 'live' or 'adapter-off'")
    weights = torch.where(policy.token_mask, mask, torch.zeros_like(mask))
    u = (weights * (policy.token_logps - reference.token_logps)).sum(-1)
    k = (weights * policy.token_kl).sum(-1)
    logits = chosen_minus_rejected(u) - (k[:, 1] - k[:, 0])
    return ObjectiveOutput(-F.logsigmoid(params.beta * logits), params.beta * (u + k))
