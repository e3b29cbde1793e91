"""``preftune rm strength``: how strongly several reward models agree with each pair's label.

Secrets of RLHF II (Wang et al., arXiv:2401.06080) trains M reward models on the same pairs
(different seeds, so different data orders) and reads each pair's *preference strength* from
them: member m gives d_m = r_m(chosen) - r_m(rejected), and the pair gets their mean and
standard deviation. A negative mean says the ensemble thinks the label is wrong; a mean near 0
says the pair is ambiguous; a large mean is a clear preference. The paper flips the first,
and trains with a margin that grows with the strength (``bt_margin`` reading the field).

One model scored several times with dropout is the same kind of ensemble (MC dropout, the
estimator of UPO, arXiv:2409.11212): each pass drops a share ``p`` of the features the head
reads (the last hidden state for a decoder, the classifier's input for an encoder) and scales
the rest by 1 / (1 - p), so a pass's reward is unbiased and their spread is the uncertainty.

For a pair, with d_1..d_M over every model and pass (d_m is the logit of P_m(chosen >
rejected): the reward gap, or s / tau for a GPM head)::

    strength           = mean_m d_m
    strength_std       = sqrt(mean_m (d_m - strength)^2)
    strength_agreement = share of members with d_m > 0
"""

from __future__ import annotations

import contextlib
import gc
from pathlib import Path

import torch
import torch.nn.functional as F

from ..data.records import DataError
from ..data.images import portable_row
from ..data.rows import csv_text_columns, read_rows, write_rows
from ..data.sources import load_records
from ..model.forward import causal_lm_of
from ..train.logging import progress_bar
from .model import reward_model_dir
from .scoring import RewardScoring, check_field, new_output_file, tied_gaps


def strength_fields(field: str, flip: bool) -> list[str]:
    """The names ``preftune rm strength`` adds to a row."""
    names = [field, f"{field}_std", f"{field}_agreement"]
    return names + ([f"{field}_flipped"] if flip else [])


def head_module(reward_model) -> torch.nn.Module:
    """The module that maps features to the head's outputs: a decoder's ``score`` layer, an
    encoder's ``classifier``."""
    model = causal_lm_of(reward_model.model)
    for name in ("score", "classifier"):
        module = getattr(model, name, None)
        if isinstance(module, torch.nn.Module):
            return module
    raise DataError(f"{type(model).__name__} has no 'score' or 'classifier' module to apply "
                    "dropout before; score it without --passes.")


@contextlib.contextmanager
def head_dropout(reward_model, p: float):
    """Dropout with probability ``p`` on the head's input, on in evaluation mode too."""
    def drop(module, args):
        return (F.dropout(args[0], p, training=True), *args[1:])

    handle = head_module(reward_model).register_forward_pre_hook(drop)
    try:
        yield
    finally:
        handle.remove()


def member_gaps(scoring: RewardScoring, records, passes: int, dropout: float,
                progress=None) -> torch.Tensor:
    """[passes, pairs] logits of P(chosen > rejected) from one reward model, each pass with
    its own dropout masks (one pass without dropout when ``passes`` is 1)."""
    examples = scoring.examples(records)
    head = scoring.head
    rows = []
    with head_dropout(scoring.model, dropout) if dropout > 0 else contextlib.nullcontext():
        for _ in range(passes):
            outputs = scoring.outputs_of(examples, progress)
            rows.append(torch.stack([head.preference_logit(o[0], o[1]) for o in outputs]))
    return torch.stack(rows).double()


def strength_stats(gaps: torch.Tensor) -> dict[str, list[float]]:
    """Mean, population standard deviation and share above 0 of [members, pairs] gaps."""
    return {"mean": gaps.mean(0).tolist(), "std": gaps.std(0, correction=0).tolist(),
            "agreement": (gaps > 0).double().mean(0).tolist()}


def no_spread(models: int, passes: int, dropout: float, keys: dict) -> str | None:
    """Why ``models`` reward models scored ``passes`` times with ``dropout`` give no spread to
    measure, or None; ``keys`` names the settings (passes, dropout, models) as the user wrote
    them, and ``where`` they are (command-line flags, or a config section)."""
    where, passes_key, dropout_key = keys["where"], keys["passes"], keys["dropout"]
    if passes > 1 and dropout <= 0:
        return (f"{where}{passes_key} {passes} without {dropout_key} gives {passes} identical "
                f"scores; set {dropout_key} (e.g. 0.1) for MC dropout.")
    if dropout > 0 and passes < 2:
        return (f"{where}{dropout_key} needs {passes_key} of 2 or more: the spread of several "
                "dropout passes is the uncertainty.")
    if models * passes < 2:
        return (f"{where}one model scored once gives no spread: {keys['models']} (an "
                f"ensemble, e.g. seeds of one config), or {passes_key} K with {dropout_key} P "
                "(MC dropout).")
    return None


CLI_KEYS = {"where": "", "passes": "--passes", "dropout": "--dropout",
            "models": "pass --model several times"}


def ensemble_gaps(models: list[str], records, passes: int, dropout: float, seed: int,
                  batch_size: int = 16, progress=None, dtype: str = "auto") -> torch.Tensor:
    """[models x passes, pairs] logits of P(chosen > rejected), the models loaded one at a time
    in ``dtype`` and the dropout masks drawn from ``seed`` (the caller's random state is left
    as it was)."""
    gaps = []
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for model in models:
            scoring = RewardScoring.load(model, batch_size, dtype=dtype)
            gaps.append(member_gaps(scoring, records, passes, dropout, progress))
            del scoring
            gc.collect()
    return torch.cat(gaps)


def _swap(row: dict, fields: dict | None) -> dict:
    """The row with chosen and rejected exchanged, with every pair of columns that belong to
    one side each: those the field map names for a side (``chosen_score: good_score``), and
    those named after a side (``chosen_votes``/``rejected_votes``, ``score_chosen``/
    ``score_rejected``)."""
    mapped = fields or {}
    pairs = {(mapped.get("chosen", "chosen"), mapped.get("rejected", "rejected"))}
    for canonical, column in mapped.items():
        other = mapped.get(canonical.replace("chosen", "rejected", 1))
        if canonical.startswith("chosen") and other is not None:
            pairs.add((column, other))
    pairs |= {(key, key.replace("chosen", "rejected")) for key in row
              if "chosen" in key and key.replace("chosen", "rejected") in row}
    swapped = dict(row)
    for one, other in pairs:
        if one in row and other in row:
            swapped[one], swapped[other] = row[other], row[one]
    return swapped


def run_strength(models: list[str], data: str, output: str, *, passes: int = 1,
                 dropout: float = 0.0, flip: bool = False, field: str = "strength",
                 seed: int = 0, batch_size: int = 16, overwrite: bool = False,
                 fields: dict | None = None, dtype: str = "auto") -> Path:
    """Score every pair of ``data`` with each of ``models`` (``passes`` times each, with
    ``dropout``) and write ``output``: each row with ``strength_fields`` added; with ``flip``,
    pairs whose mean strength is below 0 are written swapped (their strength then above 0).
    Everything is checked before a model loads; the models load in ``dtype``. Returns the
    file."""
    problem = no_spread(len(models), passes, dropout, CLI_KEYS)
    if problem is not None:
        raise DataError(problem)
    if not 0 <= dropout < 1:
        raise DataError(f"--dropout {dropout}: a probability in [0, 1).")
    check_field(field)
    target = new_output_file(output, data, overwrite)
    for model in models:
        reward_model_dir(model)  # a missing model is named before anything is scored
    records = load_records(data, fields=fields)
    rows = [row for _, row in read_rows(data, csv_text_columns(fields))]
    names = strength_fields(field, flip)
    for row, record in zip(rows, records):
        if record.shape != "pairs":
            raise DataError(f"{record.origin}: rm strength scores pairs (prompt, chosen, "
                            f"rejected) and this record is {record.shape}; give it a "
                            "file of pairs.")
        taken = [name for name in names if name in row]
        if taken and not overwrite:
            raise DataError(f"{record.origin}: field {taken[0]!r} already exists; pass --field "
                            "NAME to write under another name, or --overwrite to replace it.")
    bar = progress_bar(len(models) * passes * len(records), f"rm strength {Path(data).name}",
                       unit="pair")
    gaps = tied_gaps(ensemble_gaps(models, records, passes, dropout, seed, batch_size,
                                   bar.update, dtype), records)
    bar.close()
    means = gaps.mean(0)
    turned = (means < 0) if flip else torch.zeros_like(means, dtype=torch.bool)
    stats = strength_stats(torch.where(turned, -gaps, gaps))  # a flipped pair's own gaps
    target.parent.mkdir(parents=True, exist_ok=True)

    def scored(i: int, row: dict, record) -> dict:
        turn = bool(turned[i])
        values = [stats["mean"][i], stats["std"][i], stats["agreement"][i]]
        added = dict(zip(names, values + ([turn] if flip else [])))
        row = portable_row(row, record, fields or {}, target.parent / f"{target.stem}_images")
        return {"origin": record.origin, **(_swap(row, fields) if turn else row), **added}

    write_rows(target, (scored(i, row, record) for i, (row, record) in
                        enumerate(zip(rows, records))), default=str)
    members = f"{len(models)} model{'s' * (len(models) > 1)}" + (
        f" x {passes} dropout passes (p={dropout})" if passes > 1 else "")
    print(f"preference strength of {len(records)} pairs from {members}: mean "
          f"{means.mean():.3f}; the members prefer rejected in {int((means < 0).sum())}"
          f"{' (flipped)' if flip else ''} and disagree in "
          f"{sum(0 < a < 1 for a in stats['agreement'])}: {target}")
    return target
