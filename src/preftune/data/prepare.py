"""Config ``data`` section -> tokenized train and eval examples plus a data report."""

from __future__ import annotations

import hashlib
import math
import random
from array import array
from dataclasses import replace

from ..score.base import scorer_prompt
from .convert import convert, curriculum_order
from .records import DataError
from .sources import load_records
from .tokenize import TokenizeSettings, tokenize_records


def _load_all(paths, data_config, skipped: list | None = None,
              detected: list | None = None) -> list:
    records = []
    for path in [paths] if isinstance(paths, str) else paths:
        records += load_records(path, format=data_config.format,
                                fields=data_config.fields or None, shape=data_config.shape,
                                skipped=skipped, detected=detected)
    return records


def _converted(records: list, data_config, seed: int, key: str) -> list:
    """``records`` through ``data.convert``; it must leave some (ranked lists whose scores all
    tie make no pair)."""
    if not data_config.convert or not records:
        return records
    made = convert(records, data_config.convert, seed)
    if not made:
        held_out = key == "data.eval" and not data_config.eval
        where = (f"the {len(records)} records data.eval_fraction held out of data.train"
                 if held_out else f"the {len(records)} read")
        origins = ", ".join(record.origin for record in records[:3])
        raise DataError(f"{key}: data.convert {data_config.convert} made no records from "
                        f"{where} ({origins}{', ...' if len(records) > 3 else ''}): ranked "
                        "lists whose scores all tie make no pair."
                        + (" Raise data.eval_fraction, or give data.eval." if held_out else ""))
    if len(made) != len(records):
        print(f"data: {key}: data.convert {data_config.convert}: {len(records)} records -> "
              f"{len(made)}")
    return made


def examples_fingerprint(examples) -> str:
    """SHA-256 over the training examples' token ids, scores and images, in order: what a
    resumed run checks it trains on (``check_same_data``)."""
    digest = hashlib.sha256()
    for example in examples:
        for ids in (example.prompt_ids, *example.response_ids):
            digest.update(array("q", ids).tobytes() + b"|")
        digest.update(repr((sorted(example.scores.items()), [image.describe() for image in
                                                             example.images])).encode())
    return digest.hexdigest()


def images_fingerprint(keys_by_example) -> str:
    """SHA-256 over each example's image content keys, in order (``ImageRef.key``): an image
    edited in place, or another negative image, changes it where the paths do not."""
    digest = hashlib.sha256()
    for keys in keys_by_example:
        digest.update(("|".join(keys) + ";").encode())
    return digest.hexdigest()


def _say_left_out(key: str, report) -> None:
    """The records tokenization left out of ``key``'s data, and why (data_report.json counts
    them too)."""
    if report.dropped():
        print(f"data: {key}: {report.records - report.kept} of {report.records} records left "
              f"out: {report.dropped()}")


def data_shape(records) -> str:
    shapes = {record.shape for record in records}
    if len(shapes) > 1:
        raise DataError(f"the data mixes shapes {sorted(shapes)}; use one shape per run")
    return shapes.pop()


def _same_response_count(examples, split: str) -> None:
    counts = {len(ex.response_ids) for ex in examples}
    if len(counts) > 1:
        odd = next(ex for ex in examples if len(ex.response_ids) != len(examples[0].response_ids))
        raise DataError(
            f"{split} data: every record needs the same number of responses (found {sorted(counts)};"
            f" e.g. {odd.origin} has {len(odd.response_ids)}). Split the file by list length or "
            "convert lists to pairs (data.convert: pairs:best_vs_worst).")


def check_train_named(data_config) -> None:
    """data.train names some data (checked before a model or tokenizer loads: the bundled
    model's first use converts it, which takes a while)."""
    if not data_config.train:
        raise DataError("data.train is empty: name a preference data file (JSONL, JSON, "
                        "Parquet, CSV or a saved HF dataset directory).")


def prepare_examples(data_config, tokenizer, seed: int, tokenize=tokenize_records,
                     keep_prompts: bool = False, announce: bool = True,
                     gold: tuple | None = None):
    """Read, convert, split and tokenize. Returns (train, eval, report dict, data shape).
    ``tokenize(records, tokenizer, settings, skipped=...)`` is ``tokenize_records`` unless a
    model reads its inputs another way (encoder reward models). Held-out examples keep their
    record's prompt (``.prompt``); training examples too with ``keep_prompts``. Each file's
    layout is printed with ``announce`` (a second reading of the same data stays quiet).
    ``gold`` names the objectives that read a pair's gold response: each pair must have one;
    an empty tuple leaves gold responses out (nothing reads them); None keeps them as read."""
    check_train_named(data_config)
    settings = TokenizeSettings(data_config.max_length, data_config.max_prompt_length,
                                tuple(data_config.mask_roles))
    skipped: list | None = [] if data_config.on_error == "skip" else None
    detected: list = []
    train_records = _load_all(data_config.train, data_config, skipped, detected)
    eval_records = (_load_all(data_config.eval, data_config, skipped, detected)
                    if data_config.eval else [])
    for found in detected if announce else ():
        print(f"data: {found['source']}: {found['layout']} ({found['why']})")
    if data_config.eval_fraction > 0:  # by source record: what a list or pair makes stays on
        order = list(range(len(train_records)))  # one side of the split
        random.Random(seed).shuffle(order)
        n_eval = max(1, round(len(order) * data_config.eval_fraction))
        eval_records = [train_records[i] for i in sorted(order[:n_eval])]
        train_records = [train_records[i] for i in sorted(order[n_eval:])]
        if not train_records:
            raise DataError(f"data.eval_fraction {data_config.eval_fraction} of the "
                            f"{n_eval} records of data.train holds them all out, leaving none "
                            "to train on: lower data.eval_fraction (0 holds none out), or give "
                            "more records or a data.eval file.")
    read = {"train": len(train_records), "eval": len(eval_records)}
    train_records = _converted(train_records, data_config, seed, "data.train")
    eval_records = _converted(eval_records, data_config, seed, "data.eval")
    shape = data_shape(train_records)
    if shape == "pairs" and gold is not None:
        train_records = _gold_slots(train_records, gold, "data.train")
        eval_records = _gold_slots(eval_records, gold, "data.eval")
    for key, records in (("data.train", train_records), ("data.eval", eval_records)):
        tied = [r for r in records if r.shape == "ranked" and len(set(r.response_scores)) == 1]
        if tied:
            print(f"warning: {key}: {len(tied)} of {len(records)} ranked lists give every "
                  f"response the same score (e.g. {tied[0].origin}); they order nothing, so a "
                  "ranking objective learns nothing from them, or the order they are written "
                  "in (data.convert to pairs leaves them out)")
    if eval_records and data_shape(eval_records) != shape:
        first = eval_records[0]
        raise DataError(f"data.eval holds {first.shape} records ({first.origin}) and data.train "
                        f"{shape} records; a run is measured on the shape it trains on (a "
                        "pair objective would read a list's first two responses as its pair): "
                        f"give data.eval {shape} records.")
    if data_config.curriculum:
        train_records = curriculum_order(train_records)
    train, train_report = tokenize(train_records, tokenizer, settings, skipped=skipped)
    if not train:
        raise DataError(f"data.train: none of its {train_report.records} records survived "
                        f"tokenization: {train_report.dropped() or train_report.as_dict()}.")
    _same_response_count(train, "train")
    _say_left_out("data.train", train_report)
    if keep_prompts:
        for example in train:
            example.prompt = train_records[example.index].prompts[0]
    report = {"shape": shape, "detected": detected, "train": train_report.as_dict(),
              "train_fingerprint": examples_fingerprint(train)}
    if any(example.images or example.negative_images for example in train):
        report["train_images_fingerprint"] = images_fingerprint(
            [image.key for image in (*example.images, *example.negative_images)]
            for example in train)
    if train_report.identical_responses:
        print(f"warning: {train_report.identical_responses} of {train_report.records} training "
              "records have identical responses (chosen == rejected, as written or once cut "
              f"to data.max_length){train_report.e_g('identical_responses')}; they carry no "
              "preference signal")
    evaluation = []
    if eval_records:
        evaluation, eval_report = tokenize(eval_records, tokenizer, settings, skipped=skipped)
        _same_response_count(evaluation, "eval")
        _say_left_out("data.eval", eval_report)
        for example in evaluation:  # what answers to it are scored against, as scorers get it
            record = eval_records[example.index]
            example.prompt = scorer_prompt(record.prompts[0], example.images,
                                           getattr(record, "tools", ()))
        report["eval"] = eval_report.as_dict()
    if data_config.convert:  # the counts above are of the records it made
        conversions = data_config.convert
        report["convert"] = {"conversions": " then ".join(
            [conversions] if isinstance(conversions, str) else conversions), "read": read}
    if skipped:  # as read, and as the chat template refused them
        report["skipped_rows"] = {"count": len(skipped), "reasons": skipped[:10]}
        print(f"data.on_error skip: left out {len(skipped)} malformed records; the first: "
              f"{skipped[0]} (up to 10 reasons in data_report.json)")
    return train, evaluation, report, shape


def _gold_slots(records: list, readers: tuple, key: str) -> list:
    """Pairs as the objective reads them: each with its gold response when ``readers`` (the
    objectives that read one) is not empty, refused by record without one; without any gold
    response otherwise (a third slot would change what pair objectives compute)."""
    if readers:
        for record in records:
            if getattr(record, "gold", None) is None:
                raise DataError(
                    f"{record.origin}: objective {' and '.join(readers)} reads a gold response "
                    "in every pair (the record field 'gold', a third response: the reference "
                    "answer, or for selm a sample of the reference model), and this record has "
                    "none. Add it, or name the column that holds it with data.fields: "
                    "{gold: COLUMN}.")
        return records
    with_gold = [record for record in records if getattr(record, "gold", None) is not None]
    if with_gold:
        print(f"data: {key}: {len(with_gold)} of {len(records)} pairs carry a gold response "
              f"(e.g. {with_gold[0].origin}); the objective does not read one, so it is left "
              "out (`preftune objectives` lists those that read one: \"a gold response\")")
    return [replace(record, gold=None) if getattr(record, "gold", None) is not None else record
            for record in records]


def check_example_weights(examples: list, field: str) -> None:
    """Every example's ``train.example_weight_field`` a finite number, not negative: checked as
    the data is read, not at the step that meets a bad one."""
    for example in examples:
        value = example.scores.get(field)
        if value is None or not math.isfinite(value) or value < 0:
            state = "is missing or not a number" if value is None else f"is {value}"
            raise DataError(f"{example.origin}: numeric field {field!r} {state}; "
                            "train.example_weight_field weights each example's loss by it, so "
                            "every record needs it as a finite number, not negative. Fix the "
                            "record, point the setting at the column that holds the weights, or "
                            "remove it.")


def check_objective_scores(examples: list, objective) -> None:
    """Every example carries the numeric fields its objective's terms declare (``scores``),
    with values they take (``check``): checked as the data is read, not at the step that meets
    a record without them."""
    for term in objective.terms:
        check = term.spec.check
        params = term.params_at(0, objective.total_steps) if check is not None else None
        for example in examples:
            missing = [key for key in term.spec.scores if key not in example.scores]
            if missing:
                have = ", ".join(sorted(example.scores)) or "none"
                raise DataError(
                    f"{example.origin}: objective {term.spec.name} needs the numeric field"
                    f"{'s' if len(missing) > 1 else ''} {' and '.join(missing)} in every "
                    f"record (this one's numeric fields: {have}; a column that holds text "
                    "other than a number, or null, counts as missing). Add them (`preftune rm "
                    "score` writes chosen_score and rejected_score), or name the columns that "
                    f"hold them, e.g. data.fields: {{{missing[0]}: COLUMN}}.")
            problem = check(example.scores, params) if check is not None else None
            if problem:
                raise DataError(f"{example.origin}: objective {term.spec.name}: {problem}")


def with_mismatched_completions(examples: list, max_length: int) -> list:
    """Give each example a second response: the completion of the next example in dataset
    order (wrapping around), under its own prompt, cut to fit ``max_length``.

    KTO-style objectives estimate KL(pi || pi_ref) from such mismatched pairs (x_i, y_{i+1}).
    Fixing the pairing at the dataset level, not within a batch, keeps it valid for any batch
    size (odd ones included) and lets the precomputed reference cover these pairs too.
    """
    out = []
    for position, example in enumerate(examples):
        other = examples[(position + 1) % len(examples)].response_ids[0]
        room = max(1, max_length - len(example.prompt_ids))
        out.append(replace(example, response_ids=[*example.response_ids, other[:room]]))
    return out


def with_negative_image_slot(examples: list) -> list:
    """Give each pair a last response slot: its chosen response again, conditioned on the
    record's ``negative_images`` instead of its images (mDPO's image-conditional term)."""
    out = []
    for example in examples:
        if not example.negative_images:
            raise DataError(
                f"{example.origin}: this objective compares the chosen answer under the image "
                "and under a negative image, but the record has no 'negative_images'. Add them "
                "to the data, or make corrupted copies with data.convert: images:corrupt (after "
                "any images:mia_* conversion, which makes new images and keeps no negatives).")
        slots = len(example.response_ids)
        out.append(replace(example, response_ids=[*example.response_ids, example.response_ids[0]],
                           slot_images=(None,) * slots + (example.negative_images,)))
    return out
