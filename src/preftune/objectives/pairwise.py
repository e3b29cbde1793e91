"""Pairwise objectives that compare a chosen and a rejected response against a reference.

Notation: rho(y) = log pi_theta(y|x) - log pi_ref(y|x); h = rho(y_w) - rho(y_l).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F

from .registry import ObjectiveInputs, ObjectiveOutput, objective


@dataclass
class DPOParams:
    beta: float = 0.1  # inverse strength of the KL constraint to the reference


@objective("dpo", params=DPOParams, needs_reference=True, paper="arXiv:2305.18290")
def dpo(inputs: ObjectiveInputs, params: DPOParams) -> ObjectiveOutput:
    """Direct Preference Optimization: logistic loss on the implied-reward margin.

    loss = -log sigmoid(beta * h), implied reward r(y) = beta * rho(y).
    The policy is pushed to raise chosen log-probs relative to the reference more than rejected
    ones; beta sets how far it may drift from the reference.
    """
    log_ratios = inputs.policy.logps - inputs.reference.logps
    margin = log_ratios[:, 0] - log_ratios[:, 1]
    return ObjectiveOutput(-F.logsigmoid(params.beta * margin), params.beta * log_ratios)
