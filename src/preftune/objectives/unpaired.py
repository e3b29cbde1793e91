"""Unpaired objectives: one completion per example with a thumbs-up/down label, no pairs needed.

Inputs: slot 0 of every [E, R] tensor is the example's completion y; ``scores["label"]`` [E] is
1.0 for desirable and 0.0 for undesirable. Objectives registered with ``kl_completions=True``
also get slot 1: the completion of another example under this example's prompt (see
``data.prepare.with_mismatched_completions``). Notation: rho(y) = log pi_theta(y|x) -
log pi_ref(y|x) (summed log-probs), r(y) = beta rho(y).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

import torch
import torch.nn.functional as F
from pydantic import Field

from .common import (NonNegative, Positive, log_ratios, refuse_idle, required_scores,
                     step_mean)
from .registry import READ_ONCE, ObjectiveInputs, ObjectiveOutput, objective
from .state import RunningMean
from .udm import WEIGHT, prepare_udm


def _desirable(inputs: ObjectiveInputs, name: str) -> torch.Tensor:
    """The label as a bool [E] (True = desirable), or an error naming what the data lacks."""
    (label,) = required_scores(inputs, ("label",), name)
    if not ((label == 0) | (label == 1)).all():
        raise ValueError(f"objective {name!r} needs label values 0 (undesirable) or 1 "
                         f"(desirable); got {sorted(set(label.tolist()))[:5]}")
    return label > 0.5


@dataclass
class KTOParams:
    beta: Positive = 0.1
    desirable_weight: NonNegative = 1.0  # lambda_D
    undesirable_weight: NonNegative = 1.0  # lambda_U

    def __post_init__(self):
        if self.desirable_weight == self.undesirable_weight == 0:
            raise ValueError("kto desirable_weight and undesirable_weight are both 0, so the "
                             "loss is 0 whatever the model does; give one of them a weight.")


@objective("kto", params=KTOParams, needs_reference=True, data="unpaired",
           paper="arXiv:2402.01306", kl_completions=True,
           whole_batch="gathered")
def kto(inputs: ObjectiveInputs, params: KTOParams) -> ObjectiveOutput:
    """Kahneman-Tversky Optimization (KTO): prospect-theoretic value of each labelled completion.

    z_ref = max(0, mean_i [log pi_theta(y'_i|x_i) - log pi_ref(y'_i|x_i)]), detached, where y'_i
    is another example's completion (slot 1; mean over the micro-batch, in training over every
    process's micro-batch, as TRL gathers it). Per example:
    desirable: loss = lambda_D (1 - sigmoid(beta (rho(y) - z_ref))),
    undesirable: loss = lambda_U (1 - sigmoid(beta (z_ref - rho(y)))); r(y) = beta rho(y).
    z_ref estimates KL(pi_theta || pi_ref), the reference point of the value function: a
    completion counts as a gain only if the policy raised it more than it moved on average, so
    the policy cannot win by raising every log-ratio at once. Losses saturate (sigmoid), which
    makes KTO less sensitive to noisy labels than DPO's logistic loss.
    The mismatched completions are paired at the dataset level (example i gets example i+1's
    completion, wrapping around), not within a batch as in TRL (which therefore requires a
    per-device batch > 1), so any batch size works, odd ones and 1 included; a smaller batch
    only makes the z_ref estimate noisier. Paper guidance: pick the weights so that
    lambda_D n_D / (lambda_U n_U) is in [1, 4/3] for n_D desirable and n_U undesirable examples.
    Matches TRL 1.16 KTOTrainer (loss "kto").
    """
    if inputs.policy.logps.shape[1] < 2:
        raise ValueError("kto needs the mismatched completion as response slot 1 for its KL "
                         "estimate; the loop adds it (kl_completions=True), hand-built inputs "
                         "must too")
    desirable = _desirable(inputs, "kto")
    ratios = log_ratios(inputs)
    z_ref = step_mean(ratios[:, 1], inputs).clamp(min=0)
    rho = ratios[:, 0]
    losses = torch.where(
        desirable,
        params.desirable_weight * (1.0 - torch.sigmoid(params.beta * (rho - z_ref))),
        params.undesirable_weight * (1.0 - torch.sigmoid(params.beta * (z_ref - rho))),
    )
    return ObjectiveOutput(losses, params.beta * ratios)


@dataclass
class BCOParams:
    beta: Positive = 0.01  # paper (via the TRL paper index); TRL's BCOConfig default was 0.1
    # underlying distribution matching: weigh undesirable examples by their prompt's density
    # ratio p(desirable|x) / p(undesirable|x) from a classifier on prompt embeddings
    udm: bool = False
    udm_encoder: str = "minilm"  # the sentence encoder of the prompts: a path or "minilm"
    prompt_sample_size: Annotated[int, Field(gt=0)] = 1024  # prompts per label to fit it on
    min_density_ratio: NonNegative = field(default=0.5, metadata=READ_ONCE)  # (by prepare_udm)
    max_density_ratio: Positive = field(default=10.0, metadata=READ_ONCE)

    def __post_init__(self):
        if not self.udm:
            refuse_idle(self, ("udm_encoder", "prompt_sample_size", "min_density_ratio",
                               "max_density_ratio"), "without udm: true (it sets up the "
                        "density-ratio weights)")
        if self.min_density_ratio > self.max_density_ratio:
            raise ValueError(f"bco min_density_ratio {self.min_density_ratio} exceeds "
                             f"max_density_ratio {self.max_density_ratio}")


@objective("bco", params=BCOParams, needs_reference=True, data="unpaired", paper="arXiv:2404.04656",
           state=RunningMean, prepare=prepare_udm)
def bco(inputs: ObjectiveInputs, params: BCOParams) -> ObjectiveOutput:
    """Binary Classifier Optimization (BCO): a logistic classifier on the shifted implied reward.

    desirable: loss = -log sigmoid(r(y) - delta), undesirable: loss = -log sigmoid(-(r(y) - delta)),
    r(y) = beta rho(y). The implied reward is the logit of "this completion is desirable";
    delta (the reward shift) centres the classifier so that it separates the two labels rather
    than moving all rewards one way. delta is the running mean of every reward of both labels
    seen in training so far, this micro-batch's included (updated before it is used, as in
    TRL's former BCOTrainer; every process's rewards count), detached. It is checkpointed and
    resumed with the run; evaluation uses it as training left it. (TRL averaged per-batch
    means; this is the mean over rewards, equal when batches are equal.)
    With udm (underlying distribution matching, for desirable and undesirable prompts drawn
    differently), each undesirable loss is multiplied by its prompt's density ratio
    w(x) = clamp(p(desirable|x) / p(undesirable|x), min_density_ratio, max_density_ratio),
    inputs.scores udm_weight (1 for desirable examples), which the training loop makes before
    training from a logistic regression on udm_encoder's embeddings of prompt_sample_size
    training prompts of each label (objectives/udm.py).
    """
    desirable = _desirable(inputs, "bco")
    rewards = params.beta * log_ratios(inputs)
    delta = inputs.state.update(rewards[:, 0]) if inputs.training else inputs.state.mean
    shifted = rewards[:, 0] - delta
    losses = torch.where(desirable, -F.logsigmoid(shifted), -F.logsigmoid(-shifted))
    if params.udm:
        if WEIGHT not in inputs.scores:
            raise ValueError("bco with udm: true weighs examples by scores['udm_weight'], which "
                             "preftune train makes before training; hand-built inputs need it")
        losses = losses * inputs.scores[WEIGHT].to(losses)
    return ObjectiveOutput(losses, rewards)
