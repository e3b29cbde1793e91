"""Reliable-pair sampling for online rounds, after UPO (Wang et al., "Self-Evolutionary Large
Language Models through Uncertainty-Enhanced Preference Optimization", arXiv:2409.11212).

A round's scorer can be wrong about a pair, and training on its mistakes feeds them back into
the next round's samples. UPO asks a second model, the estimator, about every built pair
several times (MC dropout) and trains on the pairs it is sure of. Here the estimator is one or
more reward models (``online.pairs.estimator``), scored ``passes`` times each with dropout on
the head's input, as ``preftune rm strength`` does. For a pair with members' logits d_m:

    estimator_prob = mean_m sigmoid(d_m)        (P(chosen > rejected))
    estimator_std  = std_m sigmoid(d_m)         (the estimator's uncertainty)

Pairs with ``estimator_prob`` below ``min_prob`` are dropped as reversed; of the rest, the
``keep`` share with the smallest ``estimator_std`` trains. Dropped pairs go to
``pairs_dropped.jsonl`` with the reason. UPO also weights the loss by certainty:
``train.example_weight_field: estimator_prob`` does that with these fields.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ..config import ConfigError
from ..data.sources import load_records
from ..reward.model import reward_model_dir
from ..reward.strength import ensemble_gaps


def check_estimator(estimator) -> None:
    """Every estimator model is a saved reward model (checked before a run starts)."""
    for model in estimator.models:
        try:
            reward_model_dir(model)
        except FileNotFoundError as error:
            raise ConfigError(f"online.pairs.estimator.models: {error}") from None


def estimator_probs(estimator, pairs_file: Path, seed: int, dtype: str) -> torch.Tensor:
    """[members, pairs] P(chosen > rejected) of each pair of ``pairs_file`` by each estimator
    member (model x pass) loaded in ``dtype`` (the run's model.dtype), the pairs read as the
    round's training reads them."""
    records = load_records(str(pairs_file), shape="pairs")
    return torch.sigmoid(ensemble_gaps(estimator.models, records, estimator.passes,
                                       estimator.dropout, seed, dtype=dtype))


def select_pairs(rows: list[dict], probs: torch.Tensor, estimator) -> tuple[list, list, dict]:
    """The rows kept and dropped (each with ``estimator_prob``/``estimator_std``, a dropped
    one with ``dropped``: reversed or uncertain), and their counts."""
    means, spreads = probs.mean(0).tolist(), probs.std(0, correction=0).tolist()
    marked = [{**row, "estimator_prob": m, "estimator_std": s}
              for row, m, s in zip(rows, means, spreads, strict=True)]
    reversed_ = [i for i, m in enumerate(means) if m < estimator.min_prob]
    eligible = sorted((i for i, m in enumerate(means) if m >= estimator.min_prob),
                      key=lambda i: spreads[i])
    kept = set(eligible[:math.ceil(estimator.keep * len(eligible))])
    dropped = [{**marked[i], "dropped": "reversed" if i in reversed_ else "uncertain"}
               for i in range(len(rows)) if i not in kept]
    counts = {"estimator_reversed": len(reversed_),
              "estimator_uncertain": len(eligible) - len(kept)}
    return [marked[i] for i in sorted(kept)], dropped, counts
