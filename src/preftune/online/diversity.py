"""Diverse pairs for online rounds, after DivPO (Lanchantin et al., "Diverse Preference
Optimization", arXiv:2501.18101), and the diversity of a model's samples.

Best-against-worst pairs teach the policy the single highest-scored answer, and its samples
collapse onto it. DivPO picks the pair from the pool of a prompt's samples differently: the
chosen is the *most diverse* of the good samples, the rejected the *least diverse* of the bad
ones, so the pair teaches quality and rarity at once. With scores s and the prompt's score range
[lo, hi], the pools are (``rho`` in (0, 0.5), so they never meet)

    good = {i : s_i >= hi - rho (hi - lo)}        bad = {i : s_i <= lo + rho (hi - lo)}

and a diversity value D_i of each sample, larger meaning rarer, by ``criterion``:

- ``logprob``: -(1/|y|) log pi(y|x), the sampling policy's mean surprisal per token (answers the
  policy rarely gives);
- ``words``: the mean over y's words w of -log(n_w / N), n_w the count of w in the prompt's
  pool of samples and N all its words (answers in words the other samples do not use);
- ``embedding``: 1 - the mean cosine similarity of y's sentence embedding to the pool's other
  samples (answers that mean something else).

The paper's criteria are model probability, word frequency and an LLM judge; per-token
surprisal (rather than the sequence's, which would favour long answers) and the reading of
``rho`` as a share of the score range are choices made here, unverified against its code. A pass/fail
scorer makes the pools the passing and the failing samples for any ``rho``.

``sample_diversity`` measures what the rounds should move: of each prompt's samples, the share
of distinct answers and the mean word-set (Jaccard) distance between two of them.
"""

from __future__ import annotations

import math
import re
import statistics
from collections import Counter
from typing import Sequence

CRITERIA = ("logprob", "words", "embedding")
_WORD = re.compile(r"\w+")


def words(text: str) -> list[str]:
    """The lower-cased words of ``text``."""
    return _WORD.findall(text.lower())


def word_rarity(texts: Sequence[str]) -> list[float]:
    """Each text's mean word surprisal -log(n_w / N) under the pool's word counts (0 for a text
    without words)."""
    pools = [words(t) for t in texts]
    counts = Counter(w for pool in pools for w in pool)
    total = sum(counts.values())
    return [statistics.fmean(-math.log(counts[w] / total) for w in pool) if pool else 0.0
            for pool in pools]


def embedding_rarity(vectors) -> list[float]:
    """1 - each unit vector's mean cosine similarity to the others (rows of a [n, D] tensor)."""
    n = vectors.shape[0]
    if n < 2:
        return [0.0] * n
    similarity = vectors @ vectors.T
    mean_to_others = (similarity.sum(1) - similarity.diagonal()) / (n - 1)
    return (1.0 - mean_to_others).tolist()


def add_diversity(rows: list[dict], criterion: str, encoder=None) -> None:
    """Set each scored row's ``diversity``: a value per response by ``criterion`` (None for an
    empty response, which no pair takes). ``logprob`` reads the ``surprisal`` the sampling
    phase stored; ``embedding`` needs ``encoder`` (texts -> unit vectors)."""
    for row in rows:
        kept = [k for k, text in enumerate(row["responses"]) if text.strip()]
        texts = [row["responses"][k] for k in kept]
        if criterion == "logprob":
            values = [row["surprisal"][k] for k in kept]
        elif criterion == "words":
            values = word_rarity(texts)
        elif criterion == "embedding":
            values = embedding_rarity(encoder(texts)) if texts else []
        else:
            raise ValueError(f"unknown divpo criterion {criterion!r}; expected one of "
                             f"{', '.join(CRITERIA)}")
        row["diversity"] = [None] * len(row["responses"])
        for k, value in zip(kept, values):
            row["diversity"][k] = round(value, 6)


def needs_surprisal(pairs) -> bool:
    """Whether ``online.pairs`` pairs by the policy's surprisal, which sampling records."""
    return pairs.builder == "divpo" and pairs.divpo_criterion == "logprob"


def add_pair_diversity(rows: list[dict], pairs) -> None:
    """Each scored row's ``diversity`` when ``online.pairs`` pairs by it (divpo)."""
    if pairs.builder == "divpo":
        add_diversity(rows, pairs.divpo_criterion, divpo_encoder(pairs))


ENCODER_SETTING = "online.pairs.divpo_encoder"


def _uses_encoder(pairs) -> bool:
    return pairs.builder == "divpo" and pairs.divpo_criterion == "embedding"


def check_divpo_encoder(pairs) -> None:
    """The embedding criterion's encoder is there (checked before a run writes anything)."""
    if not _uses_encoder(pairs):
        return
    from ..config import ConfigError
    from ..model.load import given_as, resolve_model_dir

    try:
        with given_as(ENCODER_SETTING):
            resolve_model_dir(pairs.divpo_encoder)
    except FileNotFoundError as error:
        raise ConfigError(str(error)) from None


def divpo_encoder(pairs):
    """The sentence encoder of ``online.pairs`` (texts -> unit vectors) when its divpo criterion
    is ``embedding``, else None."""
    if not _uses_encoder(pairs):
        return None
    from accelerate import PartialState

    from ..objectives.udm import SentenceEncoder

    return SentenceEncoder(pairs.divpo_encoder, PartialState().device, ENCODER_SETTING)


def divpo_pair(scores: Sequence[float], diversity: Sequence[float],
               rho: float) -> list[tuple[int, int]]:
    """[(chosen, rejected)]: the most diverse good sample against the least diverse bad one
    (ties: the higher-scored chosen, the lower-scored rejected, then the earlier sample);
    nothing when every score ties."""
    if not 0 < rho < 0.5:
        raise ValueError(f"divpo rho must be in (0, 0.5), got {rho}")
    lo, hi = min(scores), max(scores)
    if hi == lo:
        return []
    good = [i for i, s in enumerate(scores) if s >= hi - rho * (hi - lo)]
    bad = [i for i, s in enumerate(scores) if s <= lo + rho * (hi - lo)]
    chosen = max(good, key=lambda i: (diversity[i], scores[i], -i))
    rejected = min(bad, key=lambda i: (diversity[i], scores[i], i))
    return [(chosen, rejected)]


def sample_diversity(samples: Sequence[Sequence[str]]) -> dict:
    """Of each prompt's samples (two or more): ``distinct`` (the share of different answers) and
    ``word_distance`` (the mean over pairs of 1 - |W_a & W_b| / |W_a | W_b|, W a sample's word
    set; two samples without words are at 0), averaged over prompts."""
    distinct, distance = [], []
    for texts in samples:
        if len(texts) < 2:
            raise ValueError("sample diversity needs at least 2 samples of a prompt")
        distinct.append(len(set(texts)) / len(texts))
        sets = [set(words(t)) for t in texts]
        gaps = [1 - len(a & b) / len(a | b) if a | b else 0.0
                for k, a in enumerate(sets) for b in sets[k + 1:]]
        distance.append(statistics.fmean(gaps))
    return {"distinct": statistics.fmean(distinct),
            "word_distance": statistics.fmean(distance)}
