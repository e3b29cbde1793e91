"""Pair and list builders: one prompt's scored samples -> training records.

Each builder is a small function of one prompt's scores that returns positions; ``build_rows``
turns them into JSONL rows that keep their provenance. Ties never make a pair.

- ``best_vs_worst``: the highest score against the lowest (West-of-N, arXiv:2401.12086: the
  best and worst of N samples of the policy);
- ``all_pairs``: every (i, j) with s_i > s_j;
- ``best_vs_each``: the best against every lower score;
- ``rso``: statistical rejection sampling (RSO, arXiv:2309.06657): sample i is accepted with
  probability exp((s_i - max s) / beta), passing over the samples in order until ``accept`` are
  accepted; the accepted ones are paired two by two in order of acceptance, the higher chosen.
  The kept samples approximate draws from pi*(y|x) ~ pi(y|x) exp(r(x, y) / beta), the policy
  that DPO's optimum is, rather than from pi itself;
- ``divpo``: DivPO (arXiv:2501.18101): the most diverse of the prompt's good samples against the
  least diverse of its bad ones, by a diversity value of each sample (``diversity.py``);
- ``list``: the whole list with its scores, for listwise objectives;
- ``d2o``: the samples (scored 1, whatever the scorer said) and the prompt's negative from the
  data (its ``rejected``, scored 0) as one list: D2O's anchors and negative;
- ``selm``: SELM's round (arXiv:2405.19332): the first sample y_ref (of the round's starting
  model, the reference) is ranked with the data's chosen and rejected; the best of the three is
  chosen, the worst rejected, and y_ref is kept as the third response ``gold`` for the
  optimism term.

``min_margin`` drops pairs whose score gap is smaller. ``win_probs`` (SPPO/DNO) is each
sample's mean probability of beating the prompt's other samples. Empty samples (the model
answered with EOS alone) are left out of pairs, as training drops empty responses; a list with
one is left out whole (``incomplete``), since the lists of a run all have the same length.
"""

from __future__ import annotations

import math
import random
from typing import Sequence

from ..data.convert import PAIRINGS
from .diversity import divpo_pair

BUILDERS = (*PAIRINGS, "rso", "divpo", "list", "d2o", "selm")
DATA_PAIR_BUILDERS = ("selm",)  # these also score each prompt's chosen and rejected from the data
LIST_BUILDERS = ("list", "d2o")  # these make ranked lists, the others pairs


def rso_pairs(scores: Sequence[float], beta: float, accept: int,
              rng: random.Random) -> list[tuple[int, int]]:
    """RSO's accepted samples, paired two by two in order of acceptance (higher score first).

    Rejection sampling passes over the samples in order, accepting sample i with probability
    p_i = exp((s_i - max s) / beta), until ``accept`` are kept. Sample i is accepted on pass
    G_i ~ Geometric(p_i), drawn here at once (one uniform each, by inversion), so the
    acceptance order is by (G_i, i): the same distribution without the passes, of which a
    sample far below the best would need about 1 / p_i (10^8 for a gap of 10 at beta 0.5). A
    sample whose p_i is 0 in floating point, or so small (a gap above about 709 beta) that its
    pass does not fit a float, is never accepted."""
    if beta <= 0:
        raise ValueError(f"rso beta must be above 0, got {beta}")
    top = max(scores)
    passes = {}
    for i, score in enumerate(scores):
        p, u = math.exp((score - top) / beta), rng.random()
        if p >= 1.0:
            passes[i] = 1
        elif p > 0.0 and math.isfinite(draw := math.log1p(-u) / math.log1p(-p)):
            passes[i] = max(1, math.ceil(draw))
    accepted = sorted(passes, key=lambda i: (passes[i], i))[:accept]
    pairs = []
    for a, b in zip(accepted[0::2], accepted[1::2]):
        if scores[a] != scores[b]:
            pairs.append((a, b) if scores[a] > scores[b] else (b, a))
    return pairs


def score_preferences(scores: Sequence[float]) -> list[list[float]]:
    """P(i beats j) by the scores: 1 above, 0 below, 1/2 for a tie."""
    return [[1.0 if a > b else 0.0 if a < b else 0.5 for b in scores] for a in scores]


def win_probs(preference: Sequence[Sequence[float]]) -> list[float]:
    """P(sample i beats the others): the mean over j != i of ``preference[i][j]`` = P(i > j)."""
    n = len(preference)
    if n < 2:
        raise ValueError("win probabilities need at least 2 samples of a prompt")
    return [sum(preference[i][j] for j in range(n) if j != i) / (n - 1) for i in range(n)]


def positions(builder: str, scores: Sequence[float], min_margin: float = 0.0,
              rso_beta: float = 0.5, rso_accept: int = 4, rng: random.Random | None = None,
              diversity: Sequence[float] | None = None,
              divpo_rho: float = 0.3) -> list[tuple[int, int]]:
    """The (chosen, rejected) positions that ``builder`` makes of one prompt's ``scores``
    (divpo: and each sample's ``diversity``)."""
    if builder == "rso":
        pairs = rso_pairs(scores, rso_beta, rso_accept, rng or random.Random(0))
    elif builder == "divpo":
        if diversity is None:
            raise ValueError("builder divpo needs each sample's diversity")
        pairs = divpo_pair(scores, diversity, divpo_rho)
    elif builder in PAIRINGS:
        pairs = PAIRINGS[builder](scores)
    else:
        raise ValueError(f"unknown pair builder {builder!r}; expected one of "
                         f"{', '.join(b for b in BUILDERS if b not in LIST_BUILDERS)}.")
    return [(i, j) for i, j in pairs if scores[i] - scores[j] >= min_margin]


def build_rows(scored: Sequence[dict], builder: str, min_margin: float = 0.0,
               rso_beta: float = 0.5, rso_accept: int = 4, seed: int = 0,
               divpo_rho: float = 0.3, unfinished_penalty: float = 0.0,
               with_win_probs: bool = False) -> tuple[list, dict]:
    """Training rows from scored rows (``prompt``, ``responses``, ``scores``, optional
    ``win_probs`` and ``diversity``, ``ended``, ``origin``, provenance); returns them and
    counts: prompts, ``tied`` (fewer than two different scores among the non-empty samples:
    nothing to learn), ``no_pair`` (different scores, no pair the builder keeps), ``empty``
    samples, ``incomplete`` lists, rows made. ``unfinished_penalty`` is taken off the score of
    each sample that did not end. ``with_win_probs``: pairs carry each side's win probability,
    a pairwise scorer's (``win_probs``) or else by the (penalized) scores."""
    rows, counts = [], {"prompts": len(scored), "tied": 0, "no_pair": 0, "empty": 0, "rows": 0}
    for number, item in enumerate(scored):
        item = _penalized(item, unfinished_penalty)
        if with_win_probs and "win_probs" not in item:
            item = {**item, "win_probs": win_probs(score_preferences(item["scores"]))}
        kept = [k for k, text in enumerate(item["responses"]) if text.strip()]
        counts["empty"] += len(item["responses"]) - len(kept)
        if builder in LIST_BUILDERS and len(kept) < len(item["responses"]):
            counts["incomplete"] = counts.get("incomplete", 0) + 1  # lists train at one length
            continue
        if builder in WHOLE_ROW_BUILDERS:
            rows += WHOLE_ROW_BUILDERS[builder](item, kept, counts)
            continue
        scores = [item["scores"][k] for k in kept]
        if len(set(scores)) <= 1:
            counts["tied"] += 1
            continue
        provenance = _provenance(item)
        if builder == "list":
            rows.append({"prompt": item["prompt"],
                         "responses": [item["responses"][k] for k in kept],
                         "scores": scores, **_unfinished(item, kept),
                         "source": f"{item['origin']} {kept}", **provenance})
            continue
        rng = random.Random(f"{seed}:{number}")
        diversity = [item["diversity"][k] for k in kept] if "diversity" in item else None
        chosen_pairs = positions(builder, scores, min_margin, rso_beta, rso_accept, rng,
                                 diversity, divpo_rho)
        counts["no_pair"] += not chosen_pairs
        for a, b in chosen_pairs:
            i, j = kept[a], kept[b]
            row = {"prompt": item["prompt"],
                   "chosen": item["responses"][i], "rejected": item["responses"][j],
                   "chosen_score": item["scores"][i], "rejected_score": item["scores"][j]}
            if "win_probs" in item:
                row.update(chosen_win_prob=item["win_probs"][i],
                           rejected_win_prob=item["win_probs"][j])
            if diversity is not None:
                row.update(chosen_diversity=item["diversity"][i],
                           rejected_diversity=item["diversity"][j])
            rows.append({**row, **_unfinished(item, [i, j]),
                         "source": f"{item['origin']} [{i}>{j}]", **provenance})
    counts["rows"] = len(rows)
    return rows, counts


def why_no_rows(counts: dict, scorer: str) -> str:
    """Why ``build_rows`` made no row, from its counts."""
    reasons = {"tied": f"every sample scored alike by {scorer}",
               "no_pair": "no score gap of at least online.pairs.min_margin (or no pair drawn "
                          "by rejection sampling)",
               "without_negative": "no rejected response in the data",
               "without_data_pair": "no chosen and rejected response in the data",
               "incomplete": "an empty sample in the list (lists train at one length: every "
                             "sample of a prompt)"}
    found = [f"{counts[key]} of {counts['prompts']} prompts: {why}"
             for key, why in reasons.items() if counts.get(key)]
    if counts.get("empty"):
        found.append(f"{counts['empty']} empty samples left out")
    for key, why in (("estimator_reversed", "reversed"), ("estimator_uncertain", "too uncertain")):
        if counts.get(key):
            found.append(f"{counts[key]} pairs dropped by online.pairs.estimator as {why}")
    return "; ".join(found) or "no prompts"


def _d2o_row(item: dict, kept: list, counts: dict) -> list:
    """[samples..., the data's negative] scored [1, ..., 1, 0], or nothing without a negative."""
    negative = item.get("negative")
    if not negative:
        counts["without_negative"] = counts.get("without_negative", 0) + 1
        return []
    provenance = _provenance(item)
    responses = [item["responses"][k] for k in kept] + [negative]
    return [{"prompt": item["prompt"], "responses": responses,
             "scores": [1.0] * len(kept) + [0.0], **_unfinished(item, [*kept, None]),
             "source": f"{item['origin']} {kept} + rejected", **provenance}]


def _selm_row(item: dict, kept: list, counts: dict) -> list:
    """(best, worst) of {y_ref, data chosen, data rejected} with y_ref as ``gold``, or nothing
    without a non-empty sample and the data's pair, or when all three scores tie."""
    if not kept or item.get("data_scores") is None:
        key = "without_data_pair" if kept else "tied"
        counts[key] = counts.get(key, 0) + 1
        return []
    sample = item["responses"][kept[0]]
    texts = [sample, item["positive"], item["negative"]]
    scores = [item["scores"][kept[0]], *item["data_scores"]]
    if len(set(scores)) <= 1:
        counts["tied"] += 1
        return []
    # ties go by the data's label: its chosen above the sample above its rejected
    order = sorted(range(3), key=lambda k: (scores[k], (1, 2, 0)[k]))
    best, worst = order[-1], order[0]
    names = ("sample", "chosen", "rejected")
    return [{"prompt": item["prompt"], "chosen": texts[best], "rejected": texts[worst],
             "gold": sample, "chosen_score": scores[best],
             "rejected_score": scores[worst], "gold_score": scores[0],
             **_unfinished(item, [kept[0] if best == 0 else None,
                                  kept[0] if worst == 0 else None, kept[0]]),
             "source": f"{item['origin']} [{kept[0]}] {names[best]}>{names[worst]}",
             **_provenance(item)}]


# builders that make one row of a prompt from its samples and the data's responses
WHOLE_ROW_BUILDERS = {"d2o": _d2o_row, "selm": _selm_row}


def _provenance(item: dict) -> dict:
    """What a scored row carries besides its texts and scores: round, policy, sampling..."""
    return {k: v for k, v in item.items()
            if k not in ("prompt", "responses", "scores", "win_probs", "origin", "negative",
                         "positive", "data_scores", "diversity", "surprisal", "ended")}


def _penalized(item: dict, penalty: float) -> dict:
    """``item`` with ``penalty`` taken off the scores of its samples that did not end. A
    pairwise scorer's scores are its win probabilities: those lose it too (down to 0), so the
    chosen side's is never below the rejected side's."""
    if not penalty or item.get("ended") is None:
        return item
    cut = {"scores": [score - (0.0 if ended else penalty)
                      for score, ended in zip(item["scores"], item["ended"])]}
    if "win_probs" in item:
        cut["win_probs"] = [max(0.0, p - (0.0 if ended else penalty))
                            for p, ended in zip(item["win_probs"], item["ended"])]
    return {**item, **cut}


def _unfinished(item: dict, samples: list) -> dict:
    """``{"unfinished": [slot, ...]}``: the row's response slots whose sample (its index in
    ``samples``, None for one of the data's) was cut off at max_new_tokens, so that no end of
    turn is trained after it; {} when each ended (or a run of an earlier version kept no
    ``ended``)."""
    ended = item.get("ended")
    cut = [slot for slot, k in enumerate(samples)
           if ended is not None and k is not None and not ended[k]]
    return {"unfinished": cut} if cut else {}

