"""Objectives that need no reference model: the policy's own log-probs carry the reward."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F

from .registry import ObjectiveInputs, ObjectiveOutput, objective


@dataclass
class SimPOParams:
    beta: float = 2.0  # reward scale
    gamma_beta_ratio: float = 0.5  # target margin gamma, expressed as gamma / beta


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
