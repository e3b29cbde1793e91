"""Metrics every objective gets for free, computed once from its implied rewards and the stats."""

from __future__ import annotations

import torch

from .registry import ObjectiveInputs, ObjectiveOutput


@torch.no_grad()
def preference_sums(inputs: ObjectiveInputs, output: ObjectiveOutput) -> dict[str, float]:
    """Per-batch SUMS over examples (divide by the example count to log means).

    Response slot 0 is the preferred one (chosen) and slot 1 the dispreferred one (rejected).
    """
    rewards = output.rewards.detach().float()
    chosen, rejected = rewards[:, 0], rewards[:, 1]
    policy = inputs.policy.logps.detach()
    sums = {
        "loss": output.losses.detach().sum(),
        "rewards/chosen": chosen.sum(),
        "rewards/rejected": rejected.sum(),
        "rewards/margins": (chosen - rejected).sum(),
        "rewards/accuracies": (chosen > rejected).float().sum(),
        "logps/chosen": policy[:, 0].sum(),
        "logps/rejected": policy[:, 1].sum(),
    }
    if inputs.reference is not None:
        reference = inputs.reference.logps.detach()
        sums["logps/ref_chosen"] = reference[:, 0].sum()
        sums["logps/ref_rejected"] = reference[:, 1].sum()
    return {name: float(value) for name, value in sums.items()}
