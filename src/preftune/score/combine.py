"""Combining scorers (Wang et al., "Transforming and Combining Rewards for Aligning Large
Language Models", arXiv:2402.00742; MaxMin-RLHF, arXiv:2402.08925).

- ``LogSigmoidCentred``: u(x, y) = log sigmoid(r(x, y) - r_ref(x)), r_ref(x) a per-prompt
  reference reward (e.g. the median reward of the initial policy's samples for x). It rewards
  fixing poor answers more than polishing good ones, and saturates, which limits reward hacking.
- ``CombinedScorer``: sum_i w_i u_i ("sum"; with log-sigmoid terms this is log prod P(good_i), a
  logical AND); min_i w_i u_i of each response ("min": its worst-rated criterion, a
  worst-case ensemble); or "maxmin", MaxMin-RLHF's egalitarian objective max_pi min_k
  E[r_k]: the term whose mean over the scored responses is lowest (the worst-served group's
  reward model) scores them all, so training serves that group next.

A combination is written as YAML and passed wherever a scorer is named::

    combine: sum                       # or min, maxmin
    terms:
      - scorer: rm:runs/rm_helpful     # any scorer spec
        weight: 1.0
        transform: lsc                 # none (default) or lsc
        baseline: {data: ref_samples.jsonl, quantile: 0.5}
      - scorer: my_checks:passes

``baseline.data`` holds reference samples, one (prompt, response) record per line and any
number per prompt; r_ref(x) is the ``quantile`` of the scorer's rewards on those of prompt x.
"""

from __future__ import annotations

import math

import torch

from ..config import ConfigError
from ..data.records import DataError, response_text
from ..data.shapes import is_number
from ..data.sources import load_records
from .base import checked, prefer_by_scores, prompt_key


def baselines_from_samples(scorer, prompts, responses, quantile: float = 0.5) -> dict:
    """r_ref(x) per prompt: the ``quantile`` of ``scorer``'s scores of that prompt's samples."""
    values: dict = {}
    for prompt, score in zip(prompts, scorer.score(prompts, responses)):
        values.setdefault(prompt_key(prompt), []).append(score)
    return {key: torch.tensor(v, dtype=torch.float64).quantile(quantile).item()
            for key, v in values.items()}


class LogSigmoidCentred:
    """log sigmoid(r(x, y) - r_ref(x)); ``baselines`` maps ``prompt_key(x)`` to r_ref(x)."""

    pairwise = False

    def __init__(self, scorer, baselines: dict):
        if scorer.pairwise:
            raise ConfigError(f"transform lsc needs a scalar scorer; {scorer.name} is pairwise.")
        self.scorer, self.baselines = scorer, baselines
        self.whole_set = getattr(scorer, "whole_set", False)
        self.name = f"lsc({scorer.name})"

    def score(self, prompts, responses) -> list[float]:
        rewards = self.scorer.score(prompts, responses)
        out = []
        for prompt, reward in zip(prompts, rewards):
            key = prompt_key(prompt)
            if key not in self.baselines:
                raise ConfigError(f"scorer {self.name}: no reference reward for the prompt "
                                  f"{prompt!r}; the baseline samples must cover every prompt "
                                  "scored.")
            gap = reward - self.baselines[key]
            out.append(-math.log1p(math.exp(-gap)) if gap > 0 else gap - math.log1p(math.exp(gap)))
        return out

    def prefer(self, prompts, first, second) -> list[float]:
        return prefer_by_scores(self, prompts, first, second)


COMBINE = ("sum", "min", "maxmin")


class CombinedScorer:
    """sum_i w_i s_i or min_i w_i s_i per response over scalar scorers, or (maxmin) the
    w_k s_k whose mean over the scored responses is lowest. A maxmin is ``whole_set``: it
    is called with all the responses it ranks (an online round's samples) at once."""

    pairwise = False

    def __init__(self, terms: list[tuple], how: str = "sum"):
        if how not in COMBINE:
            raise ConfigError(f"combine: expected one of {', '.join(COMBINE)}, got {how!r}.")
        if not terms:
            raise ConfigError("combine: give at least one term.")
        for scorer, _ in terms:
            if scorer.pairwise:
                raise ConfigError(f"combine: {scorer.name} compares responses and has no score "
                                  "of its own, so it cannot be summed or minimised.")
        self.terms, self.how = terms, how
        # (a maxmin term inside makes the whole combination rank sets as a whole too)
        self.whole_set = how == "maxmin" or any(getattr(s, "whole_set", False) for s, _ in terms)
        self.worst = None  # maxmin: the name of the term that scored the last set
        self.name = f"{how}(" + ", ".join(f"{w:g}*{s.name}" for s, w in terms) + ")"

    def score(self, prompts, responses) -> list[float]:
        columns = [[weight * value for value in scorer.score(prompts, responses)]
                   for scorer, weight in self.terms]
        if self.how == "maxmin":  # the worst-served term, by its mean over these responses
            worst = min(range(len(columns)), key=lambda k: math.fsum(columns[k]))
            self.worst = self.terms[worst][0].name
            values = columns[worst] if responses else []
        else:
            reduce = sum if self.how == "sum" else min
            values = [reduce(row) for row in zip(*columns)]
        return checked(values, self.name, len(responses))

    def prefer(self, prompts, first, second) -> list[float]:
        return prefer_by_scores(self, prompts, first, second)  # (a maxmin: one call, one term)


TERM_KEYS = ("scorer", "weight", "transform", "baseline")


def check_combination(path: str, spec) -> list[str]:
    """The scorer specs of the terms of the combination ``spec`` (the YAML file ``path`` holds),
    or a ``ConfigError`` naming the file, the term and the key that is wrong: checked before
    any term's scorer loads (``check_scorer`` then checks each spec)."""
    if not isinstance(spec, dict) or not isinstance(spec.get("terms"), list):
        raise ConfigError(f"{path}: expected a mapping with 'terms' (a list) and optionally "
                          f"'combine' ({', '.join(COMBINE)}).")
    unknown = set(spec) - {"combine", "terms"}
    if unknown:
        raise ConfigError(f"{path}: unknown keys {sorted(unknown)}; expected combine, terms.")
    if spec.get("combine", "sum") not in COMBINE:
        raise ConfigError(f"{path}: combine is one of {', '.join(COMBINE)}, got "
                          f"{spec['combine']!r}.")
    if not spec["terms"]:
        raise ConfigError(f"{path}: terms is empty; give at least one term.")
    for number, term in enumerate(spec["terms"]):
        where = f"{path}: terms[{number}]"
        if not isinstance(term, dict) or "scorer" not in term:
            raise ConfigError(f"{where}: expected a mapping with 'scorer' (and optionally weight, "
                              "transform, baseline).")
        extra = set(term) - set(TERM_KEYS)
        if extra:
            raise ConfigError(f"{where}: unknown keys {sorted(extra)}; expected "
                              f"{', '.join(TERM_KEYS)}.")
        if not is_number(term.get("weight", 1.0)):
            raise ConfigError(f"{where}: weight must be a number, got {term['weight']!r}.")
        transform = term.get("transform", "none")
        if transform == "lsc":
            baseline = term.get("baseline")
            if not isinstance(baseline, dict) or "data" not in baseline:
                raise ConfigError(f"{where}: transform lsc needs baseline: {{data: FILE, "
                                  "quantile: 0.5}} with reference samples of every prompt.")
            quantile = baseline.get("quantile", 0.5)
            if not is_number(quantile) or not 0 <= quantile <= 1:
                raise ConfigError(f"{where}: baseline.quantile must be a number in [0, 1], got "
                                  f"{quantile!r}.")
            try:  # read now: a bad record stops a run before it samples
                load_records(str(baseline["data"]), shape="rated")
            except DataError as error:  # (a baseline file takes no field map: name them so)
                raise ConfigError(f"{where}: baseline.data (reference samples: rows with "
                                  f"'prompt' and 'response'): {error}") from None
        elif transform != "none":
            raise ConfigError(f"{where}: transform is 'none' or 'lsc', got {transform!r}.")
        elif "baseline" in term:
            raise ConfigError(f"{where}: baseline does nothing without transform: lsc.")
    return [str(term["scorer"]) for term in spec["terms"]]


def combined_from_tree(path: str, spec, data: str | None, load) -> CombinedScorer:
    """A ``CombinedScorer`` from the YAML file ``path`` holds, ``spec`` as read (see the
    module docstring; checked by ``check_combination`` first); ``load(spec, data)`` builds
    each term's scorer."""
    check_combination(path, spec)
    terms = []
    for term in spec["terms"]:
        scorer = load(str(term["scorer"]), data)
        if term.get("transform", "none") == "lsc":
            baseline = term["baseline"]
            samples = load_records(str(baseline["data"]), shape="rated")
            scorer = LogSigmoidCentred(scorer, baselines_from_samples(
                scorer, [r.prompt for r in samples], [response_text(r.response) for r in samples],
                float(baseline.get("quantile", 0.5))))
        terms.append((scorer, float(term.get("weight", 1.0))))
    return CombinedScorer(terms, spec.get("combine", "sum"))
