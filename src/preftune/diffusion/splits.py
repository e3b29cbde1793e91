"""The records a diffusion run trains and is measured on: split as the objective reads them,
with the report (and fingerprint) a resumed run checks its data against."""

from __future__ import annotations

import random

from ..config import ConfigError, as_list
from ..data.images import image_ref
from ..data.prepare import images_fingerprint
from .data import image_data_kind, load_pairs, records_fingerprint
from .losses import get_diffusion_loss
from .ranked import lists_to_pairs, load_ranked


def split_pairs(config, spec=None) -> dict:
    """Train (and eval) records as the objective ``spec`` (default: the config's) reads
    them; ``data.eval_fraction`` splits off a seeded share of train."""
    data, spec = config.data, spec or get_diffusion_loss(config.objective.name)
    if not data.train:
        raise ConfigError(
            f"data.train is empty: give a file of prompts (a prompt field per record: "
            f"{spec.name} samples its own images)." if spec.online else
            "data.train is empty: give a file of image preference records (prompt, chosen, "
            "rejected).")
    def load(paths):
        if spec.ranked:  # lists whose images all tie make no pair: left out, counted
            return load_ranked(paths, data.fields)
        if data.convert and not spec.online:
            if spec.captions:
                raise ConfigError(f"data.convert: {spec.name} conditions each image on its own "
                                  "caption, which ranked lists do not have.")
            for path in as_list(paths):  # pairs already: the conversion is not needed
                if image_data_kind(path, data.fields) == "pairs":
                    raise ConfigError(f"data.convert: {data.convert} turns ranked image lists "
                                      f"into pairs, and {path} holds pairs already; remove "
                                      "data.convert.")
            return lists_to_pairs(load_ranked(paths, data.fields), data.convert)
        return load_pairs(paths, data.fields, captions=spec.captions, prompts_only=spec.online,
                          rejected=spec.uses_rejected)

    train = load(data.train)
    evaluation = load(data.eval) if data.eval else []
    if data.eval_fraction:
        order = list(range(len(train)))
        random.Random(config.train.seed).shuffle(order)
        held = set(order[: max(1, int(len(train) * data.eval_fraction))])
        evaluation = [p for p in train if p.index in held]
        train = [p for p in train if p.index not in held]
    return {"train": train, **({"eval": evaluation} if evaluation else {})}


def read_pairs(config) -> tuple[dict, dict]:
    """The run's records by split (ranked lists that order nothing left out) and the data
    report, with the fingerprint a resumed run checks."""
    spec = get_diffusion_loss(config.objective.name)
    splits = split_pairs(config)
    kept = {name: [r for r in records if getattr(r, "orders_something", True)]
            for name, records in splits.items()}
    if not kept["train"]:
        raise ConfigError(f"{config.data.train}: every ranked list gives all its images the "
                          "same score, so no list orders anything to train on.")
    report = {"shape": "prompts" if spec.online else "ranked image lists" if spec.ranked
              else "image pairs",
              **{name: {"records": len(splits[name]), "kept": len(kept[name])}
                 for name in splits}}
    report["train_fingerprint"] = records_fingerprint(kept["train"])
    if not spec.online:  # (prompts alone hold no images)
        keys = [[image_ref(image, record.origin, "image", record.base_dir).key for image in
                 (record.images if hasattr(record, "images") else (record.chosen,
                                                                   record.rejected))
                 if image is not None] for record in kept["train"]]
        report["train_images_fingerprint"] = images_fingerprint(keys)
        # a pair whose two images are the same picture teaches nothing (its margin is 0)
        report["identical_images"] = sum(len(set(shown)) < len(shown) for shown in keys)
    return kept, report
