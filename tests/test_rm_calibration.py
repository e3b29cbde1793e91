"""`rm eval`'s accuracy and calibration against a computation by hand: ECE over confidence
bins, Brier score and log loss of P(chosen > rejected) = sigmoid(reward gap)."""

import math

import pytest
import torch

from preftune.reward.evaluate import pair_metrics


def test_accuracy_ece_brier_and_log_loss_by_hand():
    gaps = [2.0, -1.0, 0.0, 0.5, -1000.0]  # a tie (0) counts wrong with p = 1/2
    results, rows = pair_metrics(torch.tensor(gaps), None, torch.tensor([[3, 4]] * 5), [None] * 5,
                                 bins=2)
    p = [1 / (1 + math.exp(-g)) if g >= 0 else math.exp(g) / (1 + math.exp(g)) for g in gaps]
    assert results["accuracy"] == pytest.approx(2 / 5)
    confidence = [max(q, 1 - q) for q in p]
    right = [q > 0.5 for q in p]
    # bins [0.5, 0.75) and [0.75, 1]: |accuracy - confidence| weighted by the bin's share
    ece = 0.0
    for low, high in ((0.5, 0.75), (0.75, 1.01)):
        members = [k for k, c in enumerate(confidence) if low <= c < high]
        ece += len(members) / 5 * abs(sum(right[k] for k in members) / len(members)
                                      - sum(confidence[k] for k in members) / len(members))
    assert results["calibration/ece"] == pytest.approx(ece)
    assert results["calibration/brier"] == pytest.approx(sum((1 - q) ** 2 for q in p) / 5)
    # -log sigmoid(g) = log(1 + e^-g): 1000 for the last pair (p itself underflows to 0; the
    # log loss was capped at 690.8 there)
    log_loss = [math.log1p(math.exp(-g)) if g > -50 else -g for g in gaps]
    assert results["calibration/log_loss"] == pytest.approx(sum(log_loss) / 5)
    assert [row["pairs"] for row in results["reliability"]] == [3, 2]
