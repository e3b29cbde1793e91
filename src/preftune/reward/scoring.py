"""Scoring with a trained reward model: records in, head outputs out, and ``preftune rm score``.

Records are tokenized exactly as in training (the settings are stored with the model), batched
by length, and laid out with prefix sharing when prompts are long, so a pair or a list costs
one prompt. Empty responses are scored too (EOS alone), since a model's sample can be empty.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from accelerate import PartialState

from ..data.records import DataError
from ..data.images import portable_row
from ..data.rows import csv_text_columns, read_rows, write_rows
from ..data.sources import load_records
from ..data.tokenize import TokenizeSettings, tokenize_records
from ..train.logging import progress_bar
from .encoder import encoder_examples
from .heads import Head
from .model import RewardModel, head_outputs, reward_model_dir


class RewardScoring:
    """A loaded reward model with its tokenizer and tokenization settings."""

    def __init__(self, reward_model: RewardModel, tokenizer, settings: TokenizeSettings,
                 batch_size: int = 16):
        self.model, self.tokenizer = reward_model, tokenizer
        self.settings, self.batch_size = settings, batch_size
        self.make_batch = reward_model.make_batch(
            tokenizer.pad_token_id, "auto", images=getattr(tokenizer, "image_inputs", None))

    @classmethod
    def load(cls, path: str, batch_size: int = 16, device: str | None = None,
             dtype: str = "float32") -> "RewardScoring":
        """The reward model at ``path`` in ``dtype`` ('auto': as saved), on ``device``
        (default: the process's accelerator, else the CPU)."""
        reward_model, tokenizer = RewardModel.from_pretrained(path, dtype)
        _, record = Head.load(reward_model_dir(path))
        settings = TokenizeSettings(record.get("max_length", 1024),
                                    record.get("max_prompt_length", 512))
        device = device or PartialState().device
        return cls(reward_model.to(device), tokenizer, settings, batch_size)

    @property
    def head(self) -> Head:
        return self.model.head

    def examples(self, records) -> list:
        """The records tokenized as the model was trained (one example per record, in order)."""
        tokenize = tokenize_records if self.model.last_token else encoder_examples
        examples, report = tokenize(records, self.tokenizer, self.settings, keep_empty=True)
        if len(examples) != len(records):
            kept = {example.index for example in examples}
            lost = next(r for i, r in enumerate(records) if i not in kept)
            raise DataError(f"{lost.origin}: this record cannot be scored ({report.as_dict()}); "
                            "its prompt leaves no room for a response token under the model's "
                            f"max_length {self.settings.max_length}.")
        return examples

    def outputs(self, records, progress=None) -> list[torch.Tensor]:
        """Head outputs per record, [responses of the record, K], in record order."""
        return self.outputs_of(self.examples(records), progress)

    def outputs_of(self, examples: list, progress=None) -> list[torch.Tensor]:
        """Head outputs per tokenized example, in order. Examples are grouped by their number
        of responses (lists may differ in length)."""
        results: list = [None] * len(examples)
        groups: dict[int, list[int]] = {}
        for position, example in enumerate(examples):
            groups.setdefault(len(example.response_ids), []).append(position)
        for positions in groups.values():
            outputs = head_outputs(self.model, [examples[p] for p in positions], self.make_batch,
                                   self.batch_size, progress)
            for position, value in zip(positions, outputs):
                results[position] = value
        return results


def tied_gaps(gaps: torch.Tensor, records: list) -> torch.Tensor:
    """The reward gaps (or preference logits) of pairs [..., N], zero where a pair holds one
    response twice: a tie, whatever float noise the batch gave its two sides."""
    same = torch.tensor([record.chosen == record.rejected for record in records])
    return torch.where(same, torch.zeros_like(gaps), gaps)


def response_values(head: Head, outputs: torch.Tensor) -> list[float]:
    """One number per response of a record (outputs [R, K]): its reward, or for a GPM head
    (no reward of one response) its mean P(beats each other response) over the record."""
    if head.has_reward:
        return head.reward(outputs).tolist()
    count = outputs.shape[0]  # at least 2: run_score refuses single responses for GPM
    logits = head.preference_logit(outputs[:, None], outputs[None, :])  # [R, R]
    wins = torch.sigmoid(logits).masked_fill(torch.eye(count, dtype=torch.bool), 0.0)
    return (wins.sum(1) / (count - 1)).tolist()


def labelled(head: Head, outputs: torch.Tensor) -> dict:
    return {label: float(v) for label, v in zip(head.labels, outputs.tolist())}


DETAILED = ("attributes", "quantile")  # heads whose named outputs are written too


def check_field(field: str) -> None:
    """``--field``: a column name of its own (not empty, not the ``origin`` the command adds)."""
    if not re.fullmatch(r"[A-Za-z_][\w.-]*", field) or field == "origin":
        raise DataError(f"--field {field!r}: name the column to write, e.g. score or "
                        "strength: letters, digits, '_', '-' and '.', not origin (which the "
                        "command writes: where each row came from).")


def score_fields(head: Head, shape: str, field: str) -> list[str]:
    """The names ``preftune rm score`` adds to a row of ``shape``, in ``score_row``'s order."""
    if shape == "pairs":
        names = [f"chosen_{field}", f"rejected_{field}", f"{field}_preference"]
        details = [f"chosen_{field}_outputs", f"rejected_{field}_outputs"]
    elif shape == "ranked":
        names, details = [f"{field}s"], [f"{field}_outputs"]
    else:
        names, details = [field], [f"{field}_outputs"]
    return names + (details if head.kind in DETAILED else [])


def score_row(record, head: Head, outputs: torch.Tensor, field: str) -> dict:
    """The fields ``preftune rm score`` adds to one input row (see ``run_score``)."""
    values = response_values(head, outputs)
    if record.shape == "pairs":
        logit = head.preference_logit(outputs[0], outputs[1])
        numbers = [values[0], values[1], float(torch.sigmoid(logit))]
        details = [labelled(head, outputs[0]), labelled(head, outputs[1])]
    elif record.shape == "ranked":
        numbers, details = [values], [[labelled(head, o) for o in outputs]]
    else:
        numbers, details = [values[0]], [labelled(head, outputs[0])]
    written = numbers + (details if head.kind in DETAILED else [])
    return dict(zip(score_fields(head, record.shape, field), written, strict=True))


def new_output_file(output: str, source: str, overwrite: bool) -> Path:
    """``--output`` as a path, refused when it is the ``source`` file the command reads, or
    exists (unless ``overwrite``)."""
    target = Path(output)
    if target.is_dir():
        raise DataError(f"--output {output} is a folder; name the file to write in it (e.g. "
                        f"{target / 'output.jsonl'}).")
    if target.resolve() == Path(source).resolve():
        raise DataError(f"--output {output} is the file the command reads; write to a new "
                        "file.")
    if target.exists() and not overwrite:
        raise DataError(f"--output {output} already exists; choose another file, or pass "
                        "--overwrite to replace it.")
    return target


def run_score(model: str, data: str, output: str, batch_size: int = 16, field: str = "score",
              overwrite: bool = False, fields: dict | None = None, dtype: str = "auto") -> Path:
    """Score every record of ``data`` and write ``output`` (JSONL; an existing file only with
    ``overwrite``): each input row with its ``origin`` (unless it has one) and the scores added
    (``score_fields``; a field a row already has only with ``overwrite``, refused before any
    record is scored); the model loads in ``dtype`` ('auto': as saved). Returns the file."""
    check_field(field)
    target = new_output_file(output, data, overwrite)
    records = load_records(data, fields=fields, unscored_lists=True)
    rows = [row for _, row in read_rows(data, csv_text_columns(fields))]
    head, _ = Head.load(reward_model_dir(model))
    for row, record in zip(rows, records):  # before any weight loads or record is scored
        if not head.has_reward and record.shape not in ("pairs", "ranked"):
            raise DataError(f"{record.origin}: a GPM reward model compares responses and gives "
                            "no score of one: score pairs or lists, not single responses.")
        taken = [name for name in score_fields(head, record.shape, field) if name in row]
        if taken and not overwrite:
            raise DataError(f"{record.origin}: field {taken[0]!r} already exists; pass "
                            f"--field NAME to write the scores under another name, or "
                            f"--overwrite to replace it.")
    scoring = RewardScoring.load(model, batch_size, dtype=dtype)
    bar = progress_bar(len(records), f"rm score {Path(data).name}", unit="record")
    outputs = scoring.outputs(records, progress=bar.update)
    bar.close()
    target.parent.mkdir(parents=True, exist_ok=True)
    # a row's own origin (where an earlier step took it from) is kept
    images = target.parent / f"{target.stem}_images"  # (images given as bytes)
    write_rows(target, ({"origin": record.origin,
                         **portable_row(row, record, fields or {}, images),
                         **score_row(record, scoring.head, values, field)}
                        for row, record, values in zip(rows, records, outputs)), default=str)
    print(f"scored {len(records)} records ({records[0].shape}) with {model}: {target}")
    return target
