"""Conversions between record shapes, pairs-to-pairs data transforms (vision data: mDPO,
MIA-DPO, POVID, in ``image_transforms.py`` and ``povid.py``), and curriculum ordering. Pure
functions on records.

A converted record's ``origin`` extends its source's: ``file.jsonl:3 [1>4]`` is the pair made
from responses 1 and 4 (0-based list positions) of the ranked record at line 3;
``file.jsonl:3 [chosen]`` is the unpaired record made from that pair's chosen response.
"""

from __future__ import annotations

from functools import partial
from typing import Sequence

from .image_transforms import CORRUPTIONS, MIA_LAYOUTS, corrupt_pairs, mia_pairs
from .povid import povid_pairs
from .records import DataError, Pair, Unpaired, carried_unfinished

RANKED_TO_PAIRS_MODES = ("best_vs_worst", "all_pairs", "best_vs_each")


def _povid(records: Sequence, seed: int) -> list:
    unchanged: list = []
    pairs = povid_pairs(records, seed, unchanged)
    if unchanged:
        print(f"data: pairs:povid: {len(unchanged)} of {len(pairs)} pairs have no word to "
              f"substitute in chosen (e.g. {unchanged[0]}); they keep their rejected answer")
    return pairs


# pairs -> pairs transforms: name -> function(records, seed=...)
PAIR_TRANSFORMS = {
    "images:corrupt": partial(corrupt_pairs, kind="crop"),
    **{f"images:corrupt:{kind}": partial(corrupt_pairs, kind=kind) for kind in CORRUPTIONS},
    **{f"images:mia_{layout}": partial(mia_pairs, layout=layout) for layout in MIA_LAYOUTS},
    "pairs:povid": _povid,
}
CONVERSIONS = tuple(f"pairs:{mode}" for mode in RANKED_TO_PAIRS_MODES) + ("unpaired",) \
    + tuple(PAIR_TRANSFORMS)


def ranked_to_pairs(records: Sequence, mode: str = "best_vs_worst") -> list[Pair]:
    """Ranked lists -> pairs (chosen scored strictly higher than rejected).

    ``best_vs_worst``: one pair per list, highest vs lowest score. ``all_pairs``: every (i, j)
    with score_i > score_j, in (i, j) order. ``best_vs_each``: the best vs every response scored
    strictly lower. Ties are never a pair: a list whose scores are all equal gives none; among
    tied best (or worst) responses the earliest position is used. ``Pair.scores`` is the list's
    ``scores`` plus ``chosen_score`` and ``rejected_score`` from its response scores.
    """
    if mode not in RANKED_TO_PAIRS_MODES:
        raise ValueError(f"unknown ranked-to-pairs mode {mode!r}; expected one of "
                         f"{', '.join(RANKED_TO_PAIRS_MODES)}.")
    _expect_shape(records, "ranked", "ranked_to_pairs")
    pairs = []
    for record in records:
        scores = record.response_scores
        for i, j in PAIRINGS[mode](scores):
            pairs.append(Pair(
                record.prompt, record.responses[i], record.responses[j],
                origin=f"{record.origin} [{i}>{j}]", images=record.images, tools=record.tools,
                scores={**record.scores, "chosen_score": scores[i], "rejected_score": scores[j]},
                unfinished=carried_unfinished(record, (i, j)),
            ))
    return pairs


def _best_vs_worst(scores: Sequence[float]) -> list[tuple[int, int]]:
    best, worst = scores.index(max(scores)), scores.index(min(scores))
    return [(best, worst)] if scores[best] > scores[worst] else []


def _all_pairs(scores: Sequence[float]) -> list[tuple[int, int]]:
    positions = range(len(scores))
    return [(i, j) for i in positions for j in positions if scores[i] > scores[j]]


def _best_vs_each(scores: Sequence[float]) -> list[tuple[int, int]]:
    best = scores.index(max(scores))
    return [(best, j) for j in range(len(scores)) if scores[j] < scores[best]]


PAIRINGS = {"best_vs_worst": _best_vs_worst, "all_pairs": _all_pairs,
             "best_vs_each": _best_vs_each}


def pairs_to_unpaired(records: Sequence) -> list[Unpaired]:
    """Each pair -> its chosen response labelled True, then its rejected one labelled False.

    Shared ``scores`` go to both; ``chosen_X`` goes to the chosen record as ``X`` and
    ``rejected_X`` to the rejected one (so ``chosen_score`` becomes its ``score``). A gold
    response, if any, is not carried over. Each response keeps the prompt it answers (a joint
    pair's two sides keep their own).
    """
    _expect_shape(records, "pairs", "pairs_to_unpaired")
    unpaired = []
    for pair in records:
        shared = {k: v for k, v in pair.scores.items()
                  if not k.startswith(("chosen_", "rejected_"))}
        for slot, (side, prompt, text, label) in enumerate((
                ("chosen", pair.prompts[0], pair.chosen, True),
                ("rejected", pair.prompts[1], pair.rejected, False))):
            prefix = side + "_"
            own = {k[len(prefix):]: v for k, v in pair.scores.items() if k.startswith(prefix)}
            unpaired.append(Unpaired(prompt, text, label, origin=f"{pair.origin} [{side}]",
                                     scores={**shared, **own},
                                     images=getattr(pair, "images", ()), tools=pair.tools,
                                     unfinished=carried_unfinished(pair, (slot,))))
    return unpaired


def curriculum_order(pairs: Sequence, chosen_key: str = "chosen_score",
                     rejected_key: str = "rejected_score") -> list[Pair]:
    """Curry-DPO order (arXiv:2403.07230): easy pairs first, hard last.

    Easy = a large score gap ``scores[chosen_key] - scores[rejected_key]``; equal gaps keep
    their input order.
    """
    _expect_shape(pairs, "pairs", "curriculum_order")
    gaps = []
    for position, pair in enumerate(pairs):
        values = []
        for key in (chosen_key, rejected_key):
            value = pair.scores.get(key)
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                have = ", ".join(sorted(pair.scores)) or "none"
                raise DataError(
                    f"{_name(pair, position)}: curriculum ordering needs numeric scores "
                    f"{chosen_key!r} and {rejected_key!r}; {key!r} is "
                    f"{'missing' if value is None else f'{value!r}'} (scores present: {have}). "
                    f"Add {chosen_key}/{rejected_key} columns to the data, or make the pairs from "
                    f"ranked lists (ranked_to_pairs sets them)."
                )
            values.append(float(value))
        gaps.append(values[0] - values[1])
    order = sorted(range(len(pairs)), key=lambda i: -gaps[i])  # sorted() is stable
    return [pairs[i] for i in order]


def conversions(source: str, target: str) -> list[str]:
    """The ``data.convert`` values that turn ``source``-shaped records into ``target``."""
    to_pairs = [f"pairs:{mode}" for mode in RANKED_TO_PAIRS_MODES]
    if (source, target) == ("ranked", "pairs"):
        return to_pairs
    if (source, target) == ("pairs", "unpaired"):
        return ["unpaired"]
    if (source, target) == ("ranked", "unpaired"):
        return [f"[{mode}, unpaired]" for mode in to_pairs]
    return []


def convert(records: Sequence, to: str | Sequence[str], seed: int = 0) -> list:
    """Convert records by a config string, or a list of them applied in order.

    Ranked -> pairs: "pairs:best_vs_worst", "pairs:all_pairs", "pairs:best_vs_each". Pairs ->
    unpaired: "unpaired". Pairs -> pairs: "images:corrupt" (= "images:corrupt:crop"),
    "images:corrupt:KIND" (KIND in crop, mask, noise, blur; mDPO negative images),
    "images:mia_sequence", "images:mia_grid", "images:mia_pip" (MIA-DPO) and "pairs:povid"
    (POVID rejected answers); ``seed`` fixes their randomness (with each record's origin).
    """
    if not isinstance(to, str):
        for step in to:
            records = convert(records, step, seed)
        return list(records)
    if to not in CONVERSIONS:
        raise ValueError(f"unknown conversion {to!r}; expected one of {', '.join(CONVERSIONS)}.")
    if not records:
        return []
    source = _common_shape(records)
    needed = "ranked" if to.startswith("pairs:") and to not in PAIR_TRANSFORMS else "pairs"
    target = "unpaired" if to == "unpaired" else "pairs"
    if source != needed:
        if source == target:
            advice = f"the records are already {source}; drop the conversion."
        elif source == "ranked":
            advice = "convert ranked lists with 'pairs:<mode>' first (then 'unpaired' if needed)."
        else:
            advice = f"it applies only to {needed} records; use data of that shape."
        raise DataError(f"{_name(records[0], 0)}: cannot convert {source} records with "
                        f"{to!r}: {advice}")
    if to in PAIR_TRANSFORMS:
        return PAIR_TRANSFORMS[to](records, seed=seed)
    if target == "pairs":
        return ranked_to_pairs(records, to.partition(":")[2])
    return pairs_to_unpaired(records)


def _common_shape(records: Sequence) -> str:
    shape = getattr(records[0], "shape", None)
    for position, record in enumerate(records):
        this = getattr(record, "shape", None)
        if this is None or this != shape:
            raise DataError(
                f"{_name(record, position)}: record is {this or type(record).__name__} but the "
                f"first record ({_name(records[0], 0)}) is {shape}; convert records of one "
                f"shape at a time."
            )
    return shape


def _expect_shape(records: Sequence, shape: str, function: str) -> None:
    for position, record in enumerate(records):
        this = getattr(record, "shape", None)
        if this != shape:
            raise DataError(
                f"{_name(record, position)}: {function} takes {shape} records, got "
                f"{this or type(record).__name__}. Check which file or conversion made it."
            )


def _name(record, position: int) -> str:
    return getattr(record, "origin", "") or f"record {position}"
