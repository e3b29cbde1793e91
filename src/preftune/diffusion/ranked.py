"""Ranked image lists: a prompt with K >= 2 images and a score per image (higher = better),
what listwise diffusion objectives (``rank_dpo``) train on.

A record is a row of any file ``data.train`` reads, e.g.

    {"prompt": "a red circle", "images": ["a.png", "b.png", "c.png"], "image_scores": [1, 0.5, 0]}

Images take every form a pair record's images do (paths relative to the data file, bytes, HF
``Image`` values, ``data:`` URIs); ``data.fields`` renames ``images`` and ``image_scores`` too.
Lists may differ in length. Every image is opened when the data is read; a list whose images
all have the same score makes no pair and is left out of training (counted in ``data_report.json``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from ..data.dialogues import map_field
from ..data.records import DataError
from ..objectives.listwise import MAX_EXP2_GAIN_SCORE
from .data import (DenoiserBatch, ImagePair, describe_source, image_tensor, open_image,
                   rows_and_folders)

LIST_FIELDS = ("images", "image_scores")


@dataclass
class RankedImages:
    """One ranked list; ``origin`` is ``file:record N``."""

    index: int
    origin: str
    prompt: str
    images: tuple
    image_scores: tuple
    base_dir: str = "."
    scores: dict = field(default_factory=dict)

    @property
    def orders_something(self) -> bool:
        """False when every image has the same score: the list makes no pair to train."""
        return len(set(self.image_scores)) > 1


def _field_error(origin: str, name: str, key: str, problem: str, row: dict) -> DataError:
    return DataError(f"{origin}: field {name!r} ({key}) {problem}; present fields: "
                     f"{', '.join(sorted(row))}. Fix the record or map the column with "
                     f"{map_field(key)}; a ranked record: prompt, images, image_scores.")


def ranked_from_row(index: int, origin: str, row: Any, fields: dict,
                    base_dir: str) -> RankedImages:
    """A ``RankedImages`` from one row, or a ``DataError`` naming the record and the field."""
    if not isinstance(row, dict):
        raise DataError(f"{origin}: expected a record (an object with prompt, images, "
                        f"image_scores), got {type(row).__name__}")
    name = {key: fields.get(key, key) for key in ("prompt", *LIST_FIELDS)}
    if not isinstance(row.get(name["prompt"]), str):
        raise _field_error(origin, name["prompt"], "prompt", "is missing or not text", row)
    images, scores = row.get(name["images"]), row.get(name["image_scores"])
    if not isinstance(images, (list, tuple)) or len(images) < 2:
        hint = " (objective rank_dpo trains on ranked lists; pairs train diffusion_dpo)" \
            if "chosen" in row else ""
        raise _field_error(origin, name["images"], "images",
                           f"must be a list of at least 2 images{hint}", row)
    if not isinstance(scores, (list, tuple)) or len(scores) != len(images):
        raise _field_error(origin, name["image_scores"], "image_scores",
                           f"must be a list of {len(images)} numbers, one per image", row)
    for k, score in enumerate(scores):
        if (isinstance(score, bool) or not isinstance(score, (int, float))
                or not math.isfinite(score) or abs(score) > MAX_EXP2_GAIN_SCORE):
            raise _field_error(origin, name["image_scores"], "image_scores",
                               f"holds {score!r} at position {k}: scores must be finite "
                               f"numbers within +-{MAX_EXP2_GAIN_SCORE:g} (RankDPO's gain is "
                               "2^score; scores in [0, 1] are the norm)", row)
    used = set(name.values())
    numbers = {key: float(value) for key, value in row.items() if key not in used
               and isinstance(value, (int, float)) and not isinstance(value, bool)
               and math.isfinite(value)}
    return RankedImages(index, origin, row[name["prompt"]], tuple(images),
                        tuple(float(s) for s in scores), base_dir, numbers)


def check_list_images(ranked: RankedImages, fields: dict) -> None:
    """Open every image of ``ranked`` now; a ``DataError`` names the record, field and image."""
    for k, source in enumerate(ranked.images):
        try:
            open_image(source, ranked.base_dir)
        except Exception as error:  # PIL raises several types for bad bytes
            raise DataError(f"{ranked.origin}: field {fields.get('images', 'images')!r} "
                            f"(images), image {k}: cannot read it ({type(error).__name__}: "
                            f"{error}). Check the file or bytes; paths are relative to the "
                            "data file's folder.") from None


def load_ranked(paths: str | list[str], fields: dict | None = None,
                check: bool = True) -> list[RankedImages]:
    """Every record of ``paths`` as ``RankedImages`` (images checked unless ``check`` is
    False); an empty source is an error."""
    fields = fields or {}
    lists: list[RankedImages] = []
    for origin, row, base_dir in rows_and_folders(paths, fields):
        ranked = ranked_from_row(len(lists), origin, row, fields, base_dir)
        if check:
            check_list_images(ranked, fields)
        lists.append(ranked)
    if not lists:
        raise DataError(f"{paths}: no records; expected rows with a prompt, images and "
                        "image_scores.")
    return lists


def best_vs_worst(scores) -> tuple[int, int] | None:
    """(first best-scored slot, first worst-scored slot), or None when every score ties."""
    best, worst = scores.index(max(scores)), scores.index(min(scores))
    return None if scores[best] == scores[worst] else (best, worst)


def lists_to_pairs(lists: list[RankedImages], how: str) -> list[ImagePair]:
    """Pairs for a pair objective from ranked lists (``data.convert``): ``pairs:best_vs_worst``
    (each list's first best-scored image over its first worst-scored one) or
    ``pairs:all_pairs`` (every pair with a higher and a lower score, in list order); a list
    whose images all tie gives none. Scores come along as chosen_score / rejected_score."""
    pairs = []
    for ranked in lists:
        scores = ranked.image_scores
        if how == "pairs:best_vs_worst":
            found = best_vs_worst(scores)
            candidates = [found] if found else []
        else:
            candidates = [(i, j) for i in range(len(scores)) for j in range(len(scores))]
        for i, j in candidates:
            if scores[i] > scores[j]:
                pairs.append(ImagePair(len(pairs), f"{ranked.origin} (images {i} > {j})",
                                       ranked.prompt, ranked.images[i], ranked.images[j],
                                       ranked.base_dir, scores={
                                           **ranked.scores, "chosen_score": scores[i],
                                           "rejected_score": scores[j]}))
    return pairs


@dataclass
class RankedBatch(DenoiserBatch):
    """A micro-batch of ranked lists, their images flattened: ``images`` [N, 3, R, R] in
    [-1, 1]; image n belongs to list ``owner[n]`` at slot ``slot[n]``; ``scores`` and
    ``present`` [E, K] (K the longest list; absent slots score 0, present False)."""

    images: torch.Tensor
    owner: torch.Tensor
    slot: torch.Tensor
    scores: torch.Tensor
    present: torch.Tensor
    texts: list[str]
    indices: list[int]

    def _map(self, function) -> "RankedBatch":
        return RankedBatch(*(function(t) for t in (self.images, self.owner, self.slot,
                                                   self.scores, self.present)),
                           self.texts, self.indices)

    @property
    def one_image(self) -> torch.Tensor:
        return self.images[:1]

    def without_prompts(self, rows: set[int]) -> "RankedBatch":
        """The batch with the empty prompt for the lists at ``rows``."""
        return replace(self, texts=["" if row in rows else text
                                    for row, text in enumerate(self.texts)])

    @property
    def real_tokens(self) -> int:
        return len(self.images)

    def grid(self, values: torch.Tensor) -> torch.Tensor:
        """Per-image values [N] -> [E, K] by list and slot (zeros where no image; keeps the
        gradient)."""
        return values.new_zeros(self.scores.shape).index_put((self.owner, self.slot), values)


def collate_ranked(lists: list[RankedImages], resolution: int) -> RankedBatch:
    width = max(len(r.images) for r in lists)
    scores = torch.zeros(len(lists), width)
    present = torch.zeros(len(lists), width, dtype=torch.bool)
    pixels, owner, slot = [], [], []
    for e, ranked in enumerate(lists):
        for k, source in enumerate(ranked.images):
            pixels.append(image_tensor(source, ranked.base_dir, resolution))
            owner.append(e)
            slot.append(k)
        scores[e, : len(ranked.images)] = torch.tensor(ranked.image_scores)
        present[e, : len(ranked.images)] = True
    return RankedBatch(torch.stack(pixels), torch.tensor(owner), torch.tensor(slot), scores,
                       present, [r.prompt for r in lists], [r.index for r in lists])


def inspect_ranked(path: str, example: int | None = None, fields: dict | None = None) -> str:
    """What ``preftune data inspect`` prints for ranked image lists: counts, then each shown
    list's prompt and its images (source, size, score) from best to worst."""
    lists = load_ranked(path, fields)
    shown = [r for r in lists if r.index == example] if example is not None else lists[:3]
    if example is not None and not shown:
        raise DataError(f"record {example} of {path} does not exist ({len(lists)} records)")
    sizes = sorted({len(r.images) for r in lists})
    lines = [f"{path}: {len(lists)} ranked image lists (prompt, images, image_scores) of "
             f"{', '.join(map(str, sizes))} images; every image opened and readable",
             f"lists that give every image the same score (left out of training): "
             f"{sum(not r.orders_something for r in lists)}"]
    for ranked in shown:
        lines += ["", f"record {ranked.index} ({ranked.origin})", f"  prompt: {ranked.prompt}"]
        order = sorted(range(len(ranked.images)), key=lambda k: -ranked.image_scores[k])
        for k in order:
            width, height = open_image(ranked.images[k], ranked.base_dir).size
            lines.append(f"  score {ranked.image_scores[k]:<8g} "
                         f"{describe_source(ranked.images[k], ranked.base_dir)} "
                         f"({width}x{height})")
    return "\n".join(lines)
