"""``preftune diffusion rank``: ranked image lists made without people, as Syn-Pic makes them
(Karthik et al. 2024, arXiv:2410.18013): several pipelines sample each prompt, several scorers
rate every image, and each image's score is its share of wins against the other images of its
list, averaged over the scorers (ties count 1/2).

A win share is in [0, 1] whatever a scorer's scale, so scorers with different ranges weigh
equally and RankDPO's gain 2^score - 1 stays small. The paper's exact aggregation is not
published in the spec; this is ours (UNVERIFIED).

Writes ``ranked.jsonl`` (``rank_dpo``'s data: prompt, images, image_scores, plus each
scorer's raw scores and where each image came from), ``pairs.jsonl`` (the best image over
the worst of each list that orders anything: ``diffusion_dpo``'s data from the same images)
and the images under ``images/``.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..config import ConfigError
from ..score.base import checked
from .data import tensor_image
from .evaluate import image_scorer
from .model import load_for_sampling
from .pipeline_files import pipeline_dir
from .ranked import best_vs_worst
from .sample import SAMPLING_FLAGS, check_negative_prompt, image_batches


def win_shares(scores: list[float]) -> list[float]:
    """Each score's share of wins against the others (ties 1/2), [0, 1]; one score: 0.5."""
    if len(scores) < 2:
        return [0.5] * len(scores)
    return [sum(1.0 if mine > other else 0.5 if mine == other else 0.0
                for j, other in enumerate(scores) if j != i) / (len(scores) - 1)
            for i, mine in enumerate(scores)]


def list_members(prompts: list[str], models: list[str], seeds: list[int],
                 list_size: int | None):
    """(prompt index, [(model index, seed), ...]) per list: a prompt's images (every model x
    seed) in groups of ``list_size`` seeds (default: all of them in one list); a last group
    that would hold one image joins the group before it (one image ranks nothing)."""
    size = list_size or len(seeds)
    groups = [seeds[k : k + size] for k in range(0, len(seeds), size)]
    if len(groups) > 1 and len(models) * len(groups[-1]) < 2:
        last = groups.pop()
        groups[-1] = groups[-1] + last
    return [(p, [(m, seed) for m in range(len(models)) for seed in group])
            for p in range(len(prompts)) for group in groups]


def check_list_size(models: list, seeds: list[int], list_size: int | None) -> None:
    """Lists of at least two images, or a ``ConfigError`` before anything samples."""
    if list_size is not None and list_size < 1:
        raise ConfigError(f"--list-size must be at least 1 (got {list_size}).")
    if len(models) * min(list_size or len(seeds), len(seeds)) < 2:
        raise ConfigError(f"{len(seeds)} seed(s) in lists of {list_size or len(seeds)} with "
                          f"{len(models)} model(s) make lists of one image, which order "
                          "nothing: give at least 2 seeds per list (--list-size, "
                          "online.list_size) or more models.")


def make_ranked_lists(prompts: list[str], models: list[str], scorers: list[str],
                      seeds: list[int], output_dir: str | Path, steps: int = 25,
                      guidance_scale: float = 1.0, list_size: int | None = None,
                      resolution: int | None = None, negative_prompt: str = "",
                      true_cfg_scale: float = 1.0, keys: tuple = SAMPLING_FLAGS,
                      dtype: str = "auto", batch_size: int = 8) -> dict:
    """Sample, score and write the lists (see the module docstring), each model in ``dtype``
    ('auto': as saved), ``batch_size`` images at a time: each batch is saved and scored before
    the next is sampled, so no more are held at once. Returns counts. Errors name ``keys``:
    what the caller calls a model, the negative prompt and the true-CFG scale."""
    if not prompts or not models or not scorers or not seeds:
        raise ConfigError("preftune diffusion rank needs at least one prompt, --model, "
                          "--scorer and seed.")
    check_list_size(models, seeds, list_size)
    rating = [image_scorer(spec) for spec in scorers]
    for spec, scorer in zip(scorers, rating):
        if getattr(scorer, "pairwise", False):
            raise ConfigError(f"scorer {spec!r} only compares two images; preftune diffusion "
                              "rank needs a score per image (shape_colour, spm:PATH or "
                              "module:function(prompt, PIL image) -> float).")
    out = Path(output_dir)
    files: dict[tuple, str] = {}  # (prompt, model, seed) -> image path, relative to out
    raw: dict[tuple, list[float]] = {}  # same key -> one score per scorer
    for m, model_path in enumerate(models):
        model = load_for_sampling(pipeline_dir(model_path), keys[0], dtype)
        check_negative_prompt(model.family, negative_prompt, guidance_scale, true_cfg_scale,
                              keys[1:])
        (out / "images").mkdir(parents=True, exist_ok=True)  # once the settings hold
        rows = [(p, seed) for p in range(len(prompts)) for seed in seeds]
        done = 0
        for batch in image_batches(model, prompts, seeds, steps, guidance_scale,
                                   resolution=resolution, negative_prompt=negative_prompt,
                                   true_cfg_scale=true_cfg_scale, batch_size=batch_size):
            images, sampled = [tensor_image(x) for x in batch], rows[done : done + len(batch)]
            texts = [prompts[p] for p, _ in sampled]
            per_scorer = [checked(s.score(texts, images), s.name, len(texts)) for s in rating]
            for k, ((p, seed), image) in enumerate(zip(sampled, images)):
                key = (p, m, seed)
                files[key] = f"images/p{p:03d}_m{m}_s{seed}.png"
                image.save(out / files[key])
                raw[key] = [scores[k] for scores in per_scorer]
            done += len(batch)
        del model
    ranked, pairs, ties = [], [], 0
    for p, members in list_members(prompts, models, seeds, list_size):
        keys = [(p, m, seed) for m, seed in members]
        shares = [win_shares([raw[key][r] for key in keys]) for r in range(len(rating))]
        image_scores = [round(sum(column) / len(rating), 6) for column in zip(*shares)]
        ranked.append({"prompt": prompts[p], "images": [files[key] for key in keys],
                       "image_scores": image_scores,
                       "scorer_scores": {spec: [raw[key][r] for key in keys]
                                         for r, spec in enumerate(scorers)},
                       "sources": [{"model": models[m], "seed": seed} for m, seed in members]})
        found = best_vs_worst(image_scores)
        if found is None:
            ties += 1
            continue
        best, worst = found
        pairs.append({"prompt": prompts[p], "chosen": files[keys[best]],
                      "rejected": files[keys[worst]], "chosen_score": image_scores[best],
                      "rejected_score": image_scores[worst]})
    for name, rows in (("ranked.jsonl", ranked), ("pairs.jsonl", pairs)):
        (out / name).write_text("".join(json.dumps(row) + "\n" for row in rows))
    return {"lists": len(ranked), "images": len(files), "pairs": len(pairs),
            "lists_all_tied": ties, "ranked": str(out / "ranked.jsonl"),
            "pairs_file": str(out / "pairs.jsonl")}
