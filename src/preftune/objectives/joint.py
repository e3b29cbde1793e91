"""Objectives on joint preferences: (instruction, response) pairs compared whole, where the two
instructions may differ (data: pairs records with ``chosen_prompt`` and ``rejected_prompt``).

Notation: rho(x, y) = log pi_theta(x, y) - log pi_ref(x, y), the reference-normalised joint
log-probability of prompt and response tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F

from .common import Positive, chosen_minus_rejected, log_ratios
from .registry import ObjectiveInputs, ObjectiveOutput, objective


@dataclass
class DOVEParams:
    beta: Positive = 0.1  # inverse strength of the KL constraint to the reference, as in DPO


@objective("dove", params=DOVEParams, needs_reference=True, paper="arXiv:2404.00530")
def dove(inputs: ObjectiveInputs, params: DOVEParams) -> ObjectiveOutput:
    """DOVE: DPO on joint preferences (x_w, y_w) > (x_l, y_l), whose instructions may differ.

    loss = -log sigmoid(beta * [rho(x_w, y_w) - rho(x_l, y_l)]), implied reward
    r(x, y) = beta * rho(x, y), with rho(x, y) = log pi_theta(x, y) - log pi_ref(x, y) and
    log pi(x, y) the joint log-probability of the prompt and response tokens after the first (the
    paper's code scores each sequence after BOS). On joint-pair data (chosen_prompt,
    rejected_prompt) each side is scored from the end of the token prefix the two prompts share:
    its own prompt tokens, then its response. log pi(shared prefix) is equal on both sides, for
    the policy and the reference alike, so it cancels in the margin and the loss is the paper's
    exactly; logged rewards and log-probs are relative to that prefix. On a conditional pair
    (x_w = x_l) only the responses differ and this is DPO; the paper trains on a mix of both.
    """
    rewards = params.beta * log_ratios(inputs)
    return ObjectiveOutput(-F.logsigmoid(chosen_minus_rejected(rewards)), rewards)
