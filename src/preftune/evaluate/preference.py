"""How a model ranks the responses of preference pairs, without any training objective."""

from __future__ import annotations

import torch

from ..data.layout import collate_padded
from ..model.forward import LogpModel, sequence_stats


@torch.no_grad()
def ranking_accuracy(model, examples, pad_token_id: int, batch_size: int = 16) -> dict:
    """Share of pairs where the model gives chosen a higher log-prob than rejected.

    ``summed`` compares log pi(y|x); ``normalised`` compares log pi(y|x) / |y|.
    """
    logp_model = LogpModel(model).eval()
    device = next(model.parameters()).device
    summed = normalised = 0
    for start in range(0, len(examples), batch_size):
        batch = collate_padded(examples[start : start + batch_size], pad_token_id).to(device)
        stats = sequence_stats(logp_model(batch), batch)
        summed += int((stats.logps[:, 0] > stats.logps[:, 1]).sum())
        normalised += int((stats.mean_logps[:, 0] > stats.mean_logps[:, 1]).sum())
    return {"summed": summed / len(examples), "normalised": normalised / len(examples)}
