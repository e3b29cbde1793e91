"""Compositional preference models (CPM; Go et al., "Compositional preference models for
aligning LMs", ICLR 2024, arXiv:2310.13011).

Instead of one opaque reward, a prompted LM rates each response on a few named features
(helpfulness, specificity, factuality, ...), giving c(y) in R^F, and a logistic regression on
the differences combines them: P(y_a > y_b) = sigmoid(w^T (c(y_a) - c(y_b))), so the reward is
r(y) = w^T c(y). Each w_f says how much feature f decides the labels, and only those features
can be exploited by a policy, which is the paper's case for robustness to over-optimisation.

A feature's rating is the LLM judge's expected rating (``judge.py``: the next-token
probabilities of the digits 1..scale, one forward pass) under the question of that feature.
The weights are fitted on labelled pairs by ``preftune rm fit-cpm`` (``fit_weights``: L2-
regularised logistic regression without intercept, since every pair is written chosen first).

A scorer file::

    compositional:
      judge: default                  # any causal LM directory
      scale: 5                        # ratings 1..scale (at most 9: one-token answers)
      features:                       # name: the question the judge answers
        helpfulness: How helpful is the response to the request?
        specificity: How specific is the response, rather than vague or generic?
      weights: {helpfulness: 1.3, specificity: 0.4}   # written by rm fit-cpm; default 1 each
"""

from __future__ import annotations

import torch

from ..config import ConfigError
from ..data.shapes import is_number
from .base import checked, paired_scores

FEATURE_TEMPLATE = (
    "Answer this question about the response, from 1 (not at all) to {{scale}} (completely): "
    "{question} Reply with the number only.\n\n"
    "Request:\n{{prompt}}\n\nResponse:\n{{response}}")
KEYS = ("judge", "scale", "features", "weights", "batch_size")


def compositional_options(path: str, tree: dict) -> dict:
    """The ``compositional`` mapping of a scorer file, checked (see the module docstring)."""
    spec = tree["compositional"]
    where = f"scorer file {path}: compositional"
    if not isinstance(spec, dict) or "judge" not in spec or "features" not in spec:
        raise ConfigError(f"{where} takes a mapping with 'judge' (a causal LM directory, or "
                          "default), 'features' (name: question) and optionally 'weights', "
                          f"'scale', 'batch_size'; got {spec!r}.")
    unknown = sorted(set(spec) - set(KEYS))
    if unknown:
        raise ConfigError(f"{where}: unknown keys {unknown}; expected {', '.join(KEYS)}.")
    features = spec["features"]
    if not isinstance(features, dict) or not features or not all(
            isinstance(q, str) and q.strip() for q in features.values()):
        raise ConfigError(f"{where}.features must map each feature's name to the question the "
                          f"judge answers about it; got {features!r}.")
    weights = spec.get("weights", {name: 1.0 for name in features})
    if not isinstance(weights, dict) or set(weights) != set(features) or not all(
            is_number(w) for w in weights.values()):
        raise ConfigError(f"{where}.weights must give a number for each feature "
                          f"({', '.join(features)}); got {weights!r}. `preftune rm fit-cpm` "
                          "fits them on labelled pairs.")
    scale, batch_size = spec.get("scale", 5), spec.get("batch_size", 8)
    if not isinstance(scale, int) or not 2 <= scale <= 9:
        raise ConfigError(f"{where}.scale must be a whole number from 2 to 9; got {scale!r}.")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"{where}.batch_size must be a whole number of at least 1; got "
                          f"{batch_size!r}.")
    return {"judge": str(spec["judge"]), "features": dict(features), "scale": scale,
            "weights": {name: float(weights[name]) for name in features},
            "batch_size": batch_size}


class CompositionalScorer:
    """r(y) = sum_f w_f c_f(y), c_f the judge's expected rating under feature f's question."""

    pairwise = False

    def __init__(self, judge_model, tokenizer, options: dict, name: str):
        from .judge import LLMJudge

        self.options, self.name = options, name
        self.names = list(options["features"])
        self.weights = torch.tensor([options["weights"][f] for f in self.names],
                                    dtype=torch.float64)
        self.judges = [LLMJudge(judge_model, tokenizer, f"{name} {feature}",
                                scale=options["scale"], batch_size=options["batch_size"],
                                template=FEATURE_TEMPLATE.format(
                                    question=question.replace("{", "{{").replace("}", "}}")))
                       for feature, question in options["features"].items()]

    @classmethod
    def from_file(cls, path: str, tree: dict, dtype: str = "float32") -> "CompositionalScorer":
        """The scorer a file's ``compositional`` mapping describes, its judge in ``dtype``."""
        from accelerate import PartialState

        from ..model.load import load_model_and_tokenizer

        options = compositional_options(path, tree)
        try:
            model, tokenizer = load_model_and_tokenizer(options["judge"], dtype)
        except (FileNotFoundError, OSError) as error:
            raise ConfigError(f"scorer file {path}: compositional.judge: {error}") from None
        return cls(model.to(PartialState().device), tokenizer, options, f"cpm:{path}")

    def features(self, prompts, responses) -> torch.Tensor:
        """[responses, features] ratings c_f(y), in ``names`` order."""
        return torch.tensor([judge.score(prompts, responses) for judge in self.judges],
                            dtype=torch.float64).T

    def score(self, prompts, responses) -> list[float]:
        rewards = self.features(prompts, responses) @ self.weights
        return checked(rewards.tolist(), self.name, len(responses))

    def prefer(self, prompts, first, second) -> list[float]:
        """CPM's own preference model: P(first > second) = sigmoid(r(first) - r(second)),
        r(first) - r(second) = w . (c(first) - c(second)), what ``rm fit-cpm`` fits."""
        a, b = (torch.tensor(side, dtype=torch.float64)
                for side in paired_scores(self, prompts, first, second))
        return torch.sigmoid(a - b).tolist()


def fit_weights(deltas: torch.Tensor, l2: float) -> torch.Tensor:
    """w minimising mean_i log(1 + exp(-w^T delta_i)) + l2 / 2 * |w|^2 over [pairs, features]
    rating differences (chosen - rejected): the logistic regression of CPM, without intercept.
    The objective is convex; L-BFGS runs to its optimum (the gradient test checks it)."""
    deltas = deltas.double()
    w = torch.zeros(deltas.shape[1], dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([w], lr=1.0, max_iter=500, tolerance_grad=1e-12,
                                  tolerance_change=1e-15, line_search_fn="strong_wolfe")

    def objective():
        optimizer.zero_grad()
        loss = torch.nn.functional.softplus(-deltas @ w).mean() + l2 / 2 * w.dot(w)
        loss.backward()
        return loss

    optimizer.step(objective)
    return w.detach()
