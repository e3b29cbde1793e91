"""Metrics every objective gets for free, computed once from its implied rewards and the stats.

Each function returns ``{name: (sum, count)}`` so that micro-batches and eval batches add up
exactly; the logged value is sum / count. Sums stay tensors on the device (and counts too where
they depend on the data): the trainer reads a whole step's metrics back in one go.
"""

from __future__ import annotations

import math

import torch

from .registry import ObjectiveInputs, ObjectiveOutput


def sum_count(values: torch.Tensor, where: torch.Tensor | None = None) -> tuple:
    """(sum, count) of ``values``, or of those where ``where`` is True (no boolean indexing,
    whose output size a GPU would have to report back)."""
    values = values.detach().float()
    if where is None:
        return values.sum(), values.numel()
    return torch.where(where, values, 0.0).sum(), where.sum()


def _pair_metrics(inputs: ObjectiveInputs, rewards: torch.Tensor) -> dict:
    """Slot 0 is the preferred response (chosen), slot 1 the dispreferred one (rejected)."""
    chosen, rejected = rewards[:, 0], rewards[:, 1]
    metrics = {
        "rewards/chosen": sum_count(chosen),
        "rewards/rejected": sum_count(rejected),
        "rewards/margins": sum_count(chosen - rejected),
        "rewards/accuracies": sum_count((chosen > rejected).float()),
        "logps/chosen": sum_count(inputs.policy.logps[:, 0]),
        "logps/rejected": sum_count(inputs.policy.logps[:, 1]),
    }
    if inputs.reference is not None:
        metrics["logps/ref_chosen"] = sum_count(inputs.reference.logps[:, 0])
        metrics["logps/ref_rejected"] = sum_count(inputs.reference.logps[:, 1])
    return metrics


def _unpaired_metrics(inputs: ObjectiveInputs, rewards: torch.Tensor) -> dict:
    """Rewards and log-probs split by the thumbs-up/down label."""
    label = inputs.scores["label"] > 0.5
    metrics = {}
    for name, where in (("desirable", label), ("undesirable", ~label)):
        metrics[f"rewards/{name}"] = sum_count(rewards[:, 0], where)
        metrics[f"logps/{name}"] = sum_count(inputs.policy.logps[:, 0], where)
    return metrics


def top1_hits(rewards: torch.Tensor, scores: torch.Tensor,
              present: torch.Tensor | None = None) -> torch.Tensor:
    """Per list [L, K], whether its highest reward is on a best-scored item: items tied for
    the highest reward share the list's credit (at step 1 every reward ties), so the number
    does not depend on the order a list is written in. ``present`` masks padding."""
    present = torch.ones_like(scores, dtype=torch.bool) if present is None else present
    top = present & (rewards == rewards.masked_fill(~present, -math.inf).amax(1, keepdim=True))
    best = scores == scores.masked_fill(~present, -math.inf).amax(1, keepdim=True)
    return (top & best).sum(1) / top.sum(1)


def _ranked_metrics(inputs: ObjectiveInputs, rewards: torch.Tensor) -> dict:
    """Pairwise ranking accuracy of the implied rewards against the data's scores."""
    scores = inputs.scores["response_scores"].to(rewards)
    better = scores[:, :, None] > scores[:, None, :]  # [E, K, K]: i ranked above j
    agree = (rewards[:, :, None] > rewards[:, None, :]) & better
    best, worst = scores.argmax(dim=1), scores.argmin(dim=1)
    rows = torch.arange(len(scores), device=scores.device)
    ordered = ordered_lists(scores)  # a list scored all alike has no best to find
    return {
        "rewards/accuracies": (agree.sum(), better.sum()),
        "rewards/best": sum_count(rewards[rows, best], ordered),
        "rewards/worst": sum_count(rewards[rows, worst], ordered),
        "rewards/margins": sum_count(rewards[rows, best] - rewards[rows, worst], ordered),
        "rewards/top1_accuracy": sum_count(top1_hits(rewards, scores), ordered),
    }


def ordered_lists(scores: torch.Tensor) -> torch.Tensor:
    """Per list [L, K], whether its scores are not all alike (a best and a worst to tell)."""
    return scores.amax(1) > scores.amin(1)


SHAPE_METRICS = {"pairs": _pair_metrics, "unpaired": _unpaired_metrics, "ranked": _ranked_metrics}


@torch.no_grad()
def metric_sums(shape: str, inputs: ObjectiveInputs, output: ObjectiveOutput) -> dict:
    """Loss plus the shape's reward metrics, as ``{name: (sum, count)}``."""
    rewards = output.rewards.detach().float()
    return {"loss": sum_count(output.losses), **SHAPE_METRICS[shape](inputs, rewards)}
