"""Objectives for vision-language models: preferences that are conditional on the image.

Slot layout: 0 = y_w and 1 = y_l under the record's image m (plus a gold slot if the data has
one); the last slot is y_w again under the negative image m' (the record's ``negative_images``,
e.g. a corrupted copy made by ``data.convert: images:corrupt``), which the loop adds for
objectives registered with ``image_negatives=True``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F

from .common import Finite, Positive, log_ratios
from .registry import ObjectiveInputs, ObjectiveOutput, objective


@dataclass
class MDPOParams:
    beta: Positive = 0.1  # inverse strength of the KL constraint, shared by the three terms
    anchor: Finite = 0.0  # delta: the chosen implied reward is pushed above it (0 in the paper)


@objective("mdpo", params=MDPOParams, needs_reference=True, paper="arXiv:2406.11839",
           image_negatives=True)
def mdpo(inputs: ObjectiveInputs, params: MDPOParams) -> ObjectiveOutput:
    """mDPO: DPO plus an image-conditional preference and a reward anchor.

    loss = -log sigmoid(beta (rho(y_w|m) - rho(y_l|m)))      (standard DPO)
           -log sigmoid(beta (rho(y_w|m) - rho(y_w|m')))     (conditional: the image matters)
           -log sigmoid(beta rho(y_w|m) - delta)             (anchor: chosen reward stays up)
    with rho(y|m) = log pi_theta(y|m, x) - log pi_ref(y|m, x) and m' the negative image.
    Plain DPO on VLM data can be won from the text alone; the conditional term only pays when
    the answer depends on the image, and the anchor stops both chosen terms from being won by
    lowering the chosen likelihood. Implied reward r = beta * rho per slot.
    """
    rewards = params.beta * log_ratios(inputs)
    chosen, rejected, chosen_negative_image = rewards[:, 0], rewards[:, 1], rewards[:, -1]
    losses = (-F.logsigmoid(chosen - rejected) - F.logsigmoid(chosen - chosen_negative_image)
              - F.logsigmoid(chosen - params.anchor))
    return ObjectiveOutput(losses, rewards)
