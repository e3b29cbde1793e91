"""Pairwise objectives with one more piece of data per pair: a tie flag (TODO) or a sample of the
reference policy (SELM's optimism term).

Notation as in pairwise.py: rho(y) = log pi_theta(y|x) - log pi_ref(y|x) (summed log-probs);
h = rho(y_w) - rho(y_l).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from typing import Annotated

import torch
import torch.nn.functional as F
from pydantic import Field

from .common import NonNegative, Positive, chosen_minus_rejected, log_ratios, required_scores
from .registry import ObjectiveInputs, ObjectiveOutput, objective


@dataclass
class TODOParams:
    beta: Positive = 0.01
    # dpo_theta in the authors' code; alpha = -theta > 0 is the tie band
    theta: Annotated[float, Field(lt=0)] = -0.5


def tie_nll(u: torch.Tensor, alpha: float) -> torch.Tensor:
    """-log P(tie) under Rao-Kupper with logit u and band alpha:
    P(tie) = (e^{2 alpha} - 1) / ((1 + e^{alpha - u}) (1 + e^{alpha + u}))."""
    return F.softplus(alpha - u) + F.softplus(alpha + u) - math.log(math.expm1(2.0 * alpha))


def _tie_flag(scores: dict, params) -> str | None:
    return None if scores["tie"] in (0, 1) else (
        f"tie is {scores['tie']:g}; it is 1 (or true) for a tie and 0 (or false) for a "
        "preference.")


@objective("todo", params=TODOParams, needs_reference=True, paper="arXiv:2411.02442",
           scores=("tie",), check=_tie_flag)
def todo(inputs: ObjectiveInputs, params: TODOParams) -> ObjectiveOutput:
    """TODO (Tie-rank Oriented DPO): DPO under a Bradley-Terry model extended with ties (TOBT).

    u = beta h, alpha = -theta. A clear preference: loss = -log sigmoid(u - alpha); a tie:
    loss = -log [(e^{2 alpha} - 1) / ((1 + e^{alpha - u}) (1 + e^{alpha + u}))], the Rao-Kupper
    probability that neither response wins, largest at u = 0. r(y) = beta rho(y).
    The tie flag is inputs.scores tie (1 = tie, 0 = a real preference; a `tie` field of each
    record). DPO has to treat tied pairs as preferences or drop them; here they pull the two
    implied rewards together, while real preferences must win by the band alpha.
    Formula as in the authors' XXares/TODO DPOTieTrainer.tie_loss.
    """
    (tie,) = required_scores(inputs, ("tie",), "todo")
    alpha = -params.theta
    rewards = params.beta * log_ratios(inputs)
    u = chosen_minus_rejected(rewards)
    losses = torch.where(tie > 0.5, tie_nll(u, alpha), -F.logsigmoid(u - alpha))
    return ObjectiveOutput(losses, rewards)


@dataclass
class SELMParams:
    beta: Positive = 0.01
    alpha: NonNegative = 0.001  # weight of the optimism term (1e-4 for Llama-3-8B-Instruct)


@objective("selm", params=SELMParams, needs_reference=True, paper="arXiv:2405.19332",
           online_builder="selm", gold=True)
def selm(inputs: ObjectiveInputs, params: SELMParams) -> ObjectiveOutput:
    """Self-Exploring LMs (SELM): DPO plus an optimism term on a sample of the reference policy.

    loss = -log sigmoid(beta h) + alpha beta rho(y_ref), r(y) = beta rho(y) for y_w, y_l, y_ref.
    y_ref is a response the reference (the previous iterate) generated for the prompt, given as
    the pair's third response `gold` (map another column with data.fields: {gold: <column>}).
    Lowering the likelihood of the reference's own samples relative to pi_ref pushes probability
    towards responses neither model has produced, which is the paper's active exploration.
    Formula as in shenao-zhang/SELM SELMTrainer.optimistic_dpo_loss. ``preftune online`` with
    online.pairs.builder selm runs the paper's loop: each round samples y_ref from the
    previous iterate (the reference) and ranks it with the data's chosen and rejected.
    """
    rewards = params.beta * log_ratios(inputs)
    dpo = -F.logsigmoid(chosen_minus_rejected(rewards))
    return ObjectiveOutput(dpo + params.alpha * rewards[:, 2], rewards)
