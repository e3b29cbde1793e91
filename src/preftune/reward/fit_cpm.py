"""``preftune rm fit-cpm``: fit a compositional preference model's feature weights on labelled
pairs (``score/compositional.py``) and write the scorer file with them."""

from __future__ import annotations

import torch
import yaml

from ..config import ConfigError
from ..data.records import DataError, response_text
from ..data.sources import load_records
from ..score import read_scorer_file
from ..score.base import scorer_prompt
from ..score.compositional import CompositionalScorer, compositional_options, fit_weights
from ..train.logging import progress_bar
from .scoring import new_output_file


def run_fit_cpm(scorer_file: str, data: str, output: str, l2: float = 0.01,
                overwrite: bool = False, fields: dict | None = None,
                dtype: str = "auto") -> dict:
    """Rate every pair's responses on the file's features (the judge in ``dtype``), fit the
    weights (L2 ``l2``) and write ``output``: the scorer file with ``compositional.weights``
    set. Returns the fit: weights, accuracy and log loss on the pairs, and each feature's own
    accuracy."""
    if l2 <= 0:
        raise ConfigError(f"--l2 {l2}: give a value above 0; without it the weights grow "
                          "without bound when a feature separates the pairs.")
    target = new_output_file(output, scorer_file, overwrite)
    tree = read_scorer_file(scorer_file)
    if not isinstance(tree, dict) or "compositional" not in tree:
        raise ConfigError(f"scorer file {scorer_file}: rm fit-cpm fits a 'compositional' "
                          "mapping (judge, features); this file has none.")
    compositional_options(scorer_file, tree)  # before any record or model is read
    records = load_records(data, fields=fields)
    for record in records:
        if record.shape != "pairs":
            raise DataError(f"{record.origin}: rm fit-cpm fits on pairs (prompt, chosen, "
                            f"rejected) and this record is {record.shape}; give it a file "
                            "of pairs.")
    scorer = CompositionalScorer.from_file(scorer_file, tree, dtype)
    prompts = [scorer_prompt(r.prompt, r.images, r.tools) for r in records]
    chosen, rejected = ([response_text(getattr(r, side)) for r in records]
                        for side in ("chosen", "rejected"))
    deltas = _rating_gaps(scorer, prompts, chosen, rejected)
    weights = fit_weights(deltas, l2)
    fit = fit_summary(deltas, weights, scorer.names)
    fitted = {**tree, "compositional": {**tree["compositional"], "weights": fit["weights"]}}
    header = (f"# weights fitted by `preftune rm fit-cpm` on {data} ({len(records)} pairs, "
              f"l2 {l2}): accuracy {fit['accuracy']:.3f}, log loss {fit['log_loss']:.4f}\n")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(header + yaml.safe_dump(fitted, sort_keys=False, allow_unicode=True))
    print(render_fit(fit, len(records)) + f"\nwrote {target}")
    return fit


def _rating_gaps(scorer, prompts, chosen, rejected, chunk: int = 32) -> torch.Tensor:
    """[pairs, features] c(chosen) - c(rejected), ``chunk`` pairs at a time with a progress
    bar (every feature is one judge forward per response)."""
    bar = progress_bar(len(prompts), "rm fit-cpm: rating", unit="pair")
    gaps = []
    for start in range(0, len(prompts), chunk):
        part = slice(start, start + chunk)
        gaps.append(scorer.features(prompts[part], chosen[part])
                    - scorer.features(prompts[part], rejected[part]))
        bar.update(len(prompts[part]))
    bar.close()
    return torch.cat(gaps)


def fit_summary(deltas: torch.Tensor, weights: torch.Tensor, names: list[str]) -> dict:
    """The fitted weights by name, accuracy (ties count as wrong, as in rm eval) and mean log
    loss of P(chosen > rejected) = sigmoid(w^T delta) on the pairs, and each feature's own
    accuracy (the share of pairs where it alone rates chosen higher)."""
    logits = deltas @ weights
    return {"weights": {name: round(float(w), 6) for name, w in zip(names, weights)},
            "accuracy": float((logits > 0).double().mean()),
            "log_loss": float(torch.nn.functional.softplus(-logits).mean()),
            "feature_accuracy": {name: float((deltas[:, f] > 0).double().mean())
                                 for f, name in enumerate(names)}}


def render_fit(fit: dict, pairs: int) -> str:
    lines = [f"compositional preference model fitted on {pairs} pairs: accuracy "
             f"{fit['accuracy']:.3f}, log loss {fit['log_loss']:.4f}",
             f"  {'feature':<24} {'weight':>9} {'own accuracy':>13}"]
    for name, weight in fit["weights"].items():
        lines.append(f"  {name:<24} {weight:>9.4f} {fit['feature_accuracy'][name]:>13.3f}")
    return "\n".join(lines)
