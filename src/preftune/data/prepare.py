"""Config ``data`` section -> tokenized train and eval examples plus a data report."""

from __future__ import annotations

import random

from .records import DataError
from .sources import load_records
from .tokenize import TokenizeSettings, tokenize_records


def _load_all(paths, data_config) -> list:
    records = []
    for path in [paths] if isinstance(paths, str) else paths:
        records += load_records(path, format=data_config.format, fields=data_config.fields or None)
    return records


def prepare_examples(data_config, tokenizer, seed: int):
    """Read, split and tokenize. Returns (train, eval, report dict, settings)."""
    if not data_config.train:
        raise DataError("data.train is empty: name a preference data file (JSONL, JSON, "
                        "Parquet, CSV or a saved HF dataset directory).")
    settings = TokenizeSettings(data_config.max_length, data_config.max_prompt_length)
    train_records = _load_all(data_config.train, data_config)
    eval_records = _load_all(data_config.eval, data_config) if data_config.eval else []
    if data_config.eval_fraction > 0:
        order = list(range(len(train_records)))
        random.Random(seed).shuffle(order)
        n_eval = max(1, round(len(order) * data_config.eval_fraction))
        eval_records = [train_records[i] for i in sorted(order[:n_eval])]
        train_records = [train_records[i] for i in sorted(order[n_eval:])]
    train, train_report = tokenize_records(train_records, tokenizer, settings)
    if not train:
        raise DataError(f"no training example survived tokenization: {train_report.as_dict()}")
    report = {"train": train_report.as_dict()}
    evaluation = []
    if eval_records:
        evaluation, eval_report = tokenize_records(eval_records, tokenizer, settings)
        report["eval"] = eval_report.as_dict()
    return train, evaluation, report, settings
