"""``preftune eval``: diagnostics of a trained model against its reference on preference pairs.

On the pairs of ``--data``: implied-reward accuracy and margin, ranking accuracy (summed and
length-normalised), idealized ranking accuracy R* and the alignment gap when pairs carry
``chosen_votes``/``rejected_votes`` or ``chosen_score``/``rejected_score``, likelihood
displacement, and CHES. On responses sampled from the policy: KL to the reference, top-k
entropy and mass, length statistics and the length-reward correlation. With ``--scorer``: the
win rate of the policy's greedy answers over the reference's. The formulas are in
``diagnostics.py``; results go to ``eval.json`` and ``eval_pairs.jsonl``.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from accelerate import PartialState

from ..config import ConfigError, prompt_limit
from ..data.records import DataError, JointPair, Pair
from ..data.rows import csv_text_columns, read_rows
from ..data.sources import load_records
from ..data.tokenize import (TokenizedExample, TokenizeSettings, distinct_prompts,
                             tokenize_records)
from ..model.forward import SequenceStats
from ..model.verify import check_model
from ..model.chat_template import use_chat_template
from ..model.load import given_as, load_tokenizer, released, resolve_model_dir, saved_dtype
from ..score import check_scorer, load_scorer
from ..train.output import check_output_folder
from . import diagnostics as D
from .generated import greedy_answers, sampled_metrics, win_rate
from .run_models import load_models, model_location, run_mask_roles, run_reference
from .sampling import score_responses

VOTE_FIELDS = ("chosen_votes", "rejected_votes")  # vote fractions or counts: r* gap = log ratio
SCORE_FIELDS = ("chosen_score", "rejected_score")  # rewards: r* gap = score difference


@dataclass
class EvalOptions:
    """The flags of ``preftune eval`` (see ``preftune eval --help``)."""

    model: str
    data: str
    fields: dict | None = None  # canonical field -> the file's column (data.fields, --column)
    reference: str | None = None  # None: the run's own reference (run_reference)
    output: str | None = None
    beta: float = 0.1
    ches_model: str = "reference"  # or "policy"; the paper uses the model before training
    filter_top: float | None = None
    samples: int = 4
    max_new_tokens: int = 64
    top_k: int = 10
    scorer: str | None = None
    batch_size: int = 16
    max_length: int = 1024
    max_prompt_length: int | None = None  # None: 512, or max_length // 2 when that is <= 512
    seed: int = 0
    chat_template: str | None = None  # a .jinja file or the text, for a model without one
    dtype: str = "auto"  # every model's; auto: the evaluated model's saved dtype (saved_dtype)


SHAPE_NAMES = {"Ranked": "a ranked list", "Unpaired": "a labelled completion",
               "Rated": "a rated response"}


def read_pairs(options: EvalOptions) -> list:
    """The pairs of ``--data`` (its columns mapped by ``fields``); a file of another shape
    (ranked lists, ...) is named as such, not as pairs that lack their fields."""
    try:
        return load_records(options.data, shape="pairs", fields=options.fields)
    except DataError:
        try:
            records = load_records(options.data, fields=options.fields)
        except DataError:
            records = []
        other = next((r for r in records if not isinstance(r, (Pair, JointPair))), None)
        if other is None:
            raise
        raise DataError(f"{other.origin}: eval compares each pair's chosen and rejected "
                        f"response, and this record is {SHAPE_NAMES[type(other).__name__]}. "
                        "Make pairs of it first (a config's data.convert, e.g. "
                        "pairs:best_vs_worst for ranked lists), or evaluate a pairs file.") \
            from None


def run_eval(options: EvalOptions) -> dict:
    """Run every diagnostic, write ``eval.json`` and ``eval_pairs.jsonl``; return the results."""
    _check_options(options)
    if options.output:
        check_output_folder(options.output, "--output")
    model_dir, run_dir = model_location(options.model)
    if not options.output and run_dir is not None and (run_dir.parent / "online.json").exists():
        raise ConfigError(f"--model {options.model}: {run_dir.name} of an online run, whose "
                          "eval.json and eval_answers.jsonl are the round's own held-out "
                          "evaluation (online.json and the report read them); eval would "
                          "replace them. Pass --output DIR for this evaluation's files.")
    if options.reference is None:
        options = replace(options, reference=run_reference(run_dir))
        if run_dir is not None and (run_dir / "config.yaml").is_file():
            print(f"reference: {options.reference} (what {run_dir / 'config.yaml'} trained "
                  "against; --reference chooses another)")
    seconds: dict = {}
    clock = time.perf_counter()
    records = read_pairs(options)
    joint = next((r for r in records if isinstance(r, JointPair)), None)
    if joint is not None:
        raise DataError(f"{joint.origin}: a joint pair (chosen_prompt/rejected_prompt); eval "
                        "compares responses to one prompt, so evaluate ordinary pairs only.")
    with given_as("--model"):
        if options.dtype == "auto":  # policy, reference and scorer alike
            options = replace(options, dtype=saved_dtype(resolve_model_dir(model_dir,
                                                                           weights=False)))
    if options.scorer:  # a bad spec stops here; its models load once the evaluated ones go
        try:
            check_scorer(options.scorer, options.data)
        except ConfigError as error:
            raise ConfigError(f"--scorer: {error}") from None
    with given_as("--model"):
        tokenizer = load_tokenizer(model_dir)
        if options.chat_template is not None:
            use_chat_template(tokenizer, options.chat_template, "--chat-template")
    masked = run_mask_roles(run_dir)  # the run's data.mask_roles: the tokens it trained on
    settings = TokenizeSettings(options.max_length,
                                prompt_limit(options.max_length, options.max_prompt_length),
                                **({} if masked is None else {"mask_roles": masked}))
    examples, report = tokenize_records(records, tokenizer, settings)
    if not examples:
        raise DataError(f"{options.data}: no pair survived tokenization ({report.as_dict()}).")
    if report.dropped():  # (pairs_dropped in eval.json)
        print(f"{options.data}: {report.records - report.kept} of {report.records} pairs left "
              f"out: {report.dropped()}")
    examples = [replace(ex, response_ids=ex.response_ids[:2]) for ex in examples]  # no gold
    prompts = distinct_prompts(examples)
    metrics, pair_rows, texts = released(lambda: _with_models(
        options, model_dir, run_dir, tokenizer, examples, prompts, seconds, clock))
    if options.scorer:
        clock = time.perf_counter()
        try:
            scorer = load_scorer(options.scorer, options.data, options.dtype)
        except ConfigError as error:
            raise ConfigError(f"--scorer: {error}") from None
        win, answers = win_rate(scorer, texts, prompts, records)
        metrics.update(win)
        seconds["win_rate"] += time.perf_counter() - clock
    results = {**metrics, "pairs": len(examples), "pairs_dropped": report.records - report.kept,
               "settings": {**asdict(options), "model_dir": str(model_dir)},
               "seconds": seconds}
    output = Path(options.output or run_dir or ".")
    _write_outputs(results, pair_rows, examples, options, output)
    if options.scorer:
        with open(output / "eval_answers.jsonl", "w", encoding="utf-8") as handle:
            handle.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in answers)
        print(f"wrote {output / 'eval_answers.jsonl'} (each prompt's greedy answers and scores)")
    else:  # an earlier evaluation's answers would read as this one's
        (output / "eval_answers.jsonl").unlink(missing_ok=True)
    return results


def _with_models(options: EvalOptions, model_dir: str, run_dir, tokenizer, examples: list,
                 prompts: list, seconds: dict, clock: float):
    """What needs the policy and the reference: the pairs' metrics and per-pair rows, the
    sampled metrics, and (with a scorer) both models' greedy answers. The models are loaded
    here and gone when it returns, before the scorer's load."""
    policy, reference, as_reference = load_models(model_dir, run_dir, options.reference,
                                                  tokenizer, options.dtype,
                                                  PartialState().device)
    seconds["load"] = time.perf_counter() - clock
    check_model(policy, examples, key="--model")
    check_model(reference, examples, key="the reference model (--reference)")
    torch.manual_seed(options.seed)

    clock = time.perf_counter()
    pad = tokenizer.pad_token_id
    images = getattr(tokenizer, "image_inputs", None)
    on_policy = score_responses(policy, examples, pad, options.batch_size,
                                hidden_sums=options.ches_model == "policy",
                                description="eval pairs: policy", images=images)
    with as_reference():
        on_reference = score_responses(reference, examples, pad, options.batch_size,
                                       hidden_sums=options.ches_model == "reference",
                                       description="eval pairs: reference", images=images)
    metrics, pair_rows = _pair_metrics(examples, on_policy, on_reference, options)
    seconds["pairs"] = time.perf_counter() - clock
    if options.samples:
        clock = time.perf_counter()
        metrics.update(sampled_metrics(policy, reference, tokenizer, prompts, options,
                                       as_reference))
        seconds["sampled"] = time.perf_counter() - clock
    texts = None
    if options.scorer:
        clock = time.perf_counter()
        texts = greedy_answers(policy, reference, as_reference, tokenizer, prompts, options)
        seconds["win_rate"] = time.perf_counter() - clock
    return metrics, pair_rows, texts


def _write_outputs(results: dict, pair_rows: list, examples: list, options: EvalOptions,
                   output: Path) -> None:
    """eval.json, eval_pairs.jsonl, the CHES-filtered data (``--filter-top``) and the table."""
    output.mkdir(parents=True, exist_ok=True)
    (output / "eval.json").write_text(json.dumps(results, indent=2) + "\n")
    with open(output / "eval_pairs.jsonl", "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in pair_rows)
    print(render_table(results, options))
    print(f"\nwrote {output / 'eval.json'} and {output / 'eval_pairs.jsonl'}")
    if options.filter_top:
        ches_values = torch.tensor([row["ches"] for row in pair_rows])
        drop = {examples[p].index for p in D.highest_positions(ches_values, options.filter_top)}
        filtered = _write_filtered(options.data, options.fields, drop, output,
                                   options.filter_top)
        print(f"wrote {filtered}: {options.data} without the {len(drop)} highest-CHES pairs")


def _check_options(options: EvalOptions) -> None:
    checks = [
        (options.beta > 0, "--beta must be positive"),
        (options.ches_model in ("reference", "policy"), "--ches-model is reference or policy"),
        (options.filter_top is None or 0 < options.filter_top < 1,
         "--filter-top is a fraction between 0 and 1 (e.g. 0.1)"),
        (options.samples >= 0, "--samples must be 0 (no sampling) or more"),
        (options.max_new_tokens >= 1 and options.top_k >= 1 and options.batch_size >= 1,
         "--max-new-tokens, --top-k and --batch-size must be at least 1"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


def _true_reward_gap(example: TokenizedExample) -> float | None:
    """r*(y_w) - r*(y_l) from a pair's side columns, or None when it has neither kind:
    log(chosen_votes / rejected_votes), else chosen_score - rejected_score (votes win)."""
    for names in (VOTE_FIELDS, SCORE_FIELDS):
        given = [name for name in names if name in example.scores]
        if not given:
            continue
        if len(given) == 1:
            other = names[1 - names.index(given[0])]
            raise DataError(f"{example.origin}: field {other!r} is missing while {given[0]!r} "
                            f"is set; give both (or neither) for the idealized ranking accuracy.")
        chosen, rejected = (float(example.scores[name]) for name in names)
        votes = names == VOTE_FIELDS
        valid = math.isfinite(chosen) and math.isfinite(rejected)
        if votes:
            valid = valid and min(chosen, rejected) >= 0 and max(chosen, rejected) > 0
        if not valid:
            need = "finite vote fractions or counts >= 0, not both 0" if votes else "finite numbers"
            raise DataError(f"{example.origin}: fields {names[0]!r} and {names[1]!r} are "
                            f"{chosen} and {rejected}; expected {need}.")
        if votes:
            return D.vote_reward_gap(torch.tensor(chosen), torch.tensor(rejected)).item()
        return chosen - rejected
    return None


def _pair_metrics(examples, on_policy, on_reference, options: EvalOptions):
    """Metrics over the pairs and one row of per-pair values each."""
    policy, reference, counts = on_policy.logps, on_reference.logps, on_policy.token_counts
    metrics = D.cheap_signals(SequenceStats(policy, counts), SequenceStats(reference, counts),
                              options.beta)
    metrics["ranking/reference_summed"] = D.ranking_correct(reference).float().mean().item()
    metrics["ranking/reference_normalised"] = (
        D.ranking_correct(reference / counts).float().mean().item())
    sums = (on_reference if options.ches_model == "reference" else on_policy).hidden_sums
    ches, ches_normalised = D.ches(sums[:, 0], sums[:, 1], counts[:, 0], counts[:, 1])
    metrics["ches/mean"] = ches.mean().item()
    metrics["ches/normalised_mean"] = ches_normalised.mean().item()
    gaps = [_true_reward_gap(ex) for ex in examples]
    known = torch.tensor([gap is not None for gap in gaps])
    correct = D.ranking_correct(policy)
    normalised_correct = D.ranking_correct(policy / counts)
    idealized = torch.zeros(len(examples), dtype=torch.bool)
    if known.any():
        gap = torch.tensor([g for g in gaps if g is not None], dtype=torch.float64)
        idealized[known] = D.idealized_correct(reference[known].double(), gap, options.beta)
        r_star = idealized[known].float().mean().item()
        metrics["ranking/idealized"] = r_star
        metrics["ranking/alignment_gap"] = r_star - correct[known].float().mean().item()
        metrics["ranking/idealized_pairs"] = int(known.sum())
    rewards = D.implied_rewards(policy, reference, options.beta)
    rows = []
    for e, example in enumerate(examples):
        row = {"index": example.index, "origin": example.origin,
               "logp_chosen": policy[e, 0].item(), "logp_rejected": policy[e, 1].item(),
               "ref_logp_chosen": reference[e, 0].item(),
               "ref_logp_rejected": reference[e, 1].item(),
               "tokens_chosen": int(counts[e, 0]), "tokens_rejected": int(counts[e, 1]),
               "reward_chosen": rewards[e, 0].item(), "reward_rejected": rewards[e, 1].item(),
               "displacement_chosen": (policy[e, 0] - reference[e, 0]).item(),
               "displacement_rejected": (policy[e, 1] - reference[e, 1]).item(),
               "ranked_correct": bool(correct[e]),
               "ranked_correct_normalised": bool(normalised_correct[e]),
               "ches": ches[e].item(), "ches_normalised": ches_normalised[e].item()}
        if known[e]:
            row["idealized_correct"] = bool(idealized[e])
        rows.append(row)
    return metrics, rows


def _write_filtered(data: str, fields: dict | None, drop: set, output: Path,
                    fraction: float) -> Path:
    """``data`` as JSONL without the records at positions ``drop``; returns the file written."""
    target = output / f"{Path(data).stem}.without-top-ches-{fraction:g}.jsonl"
    with open(target, "w", encoding="utf-8") as handle:
        for position, (_, row) in enumerate(read_rows(data, csv_text_columns(fields))):
            if position not in drop:
                handle.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
    return target


TABLE = [  # (label, key, percent?)
    ("implied-reward accuracy", "rewards/accuracy", True),
    ("implied-reward margin", "rewards/margin", False),
    ("ranking accuracy, summed log pi", "ranking/summed", True),
    ("  reference", "ranking/reference_summed", True),
    ("ranking accuracy, length-normalised", "ranking/normalised", True),
    ("  reference", "ranking/reference_normalised", True),
    ("idealized ranking accuracy R*", "ranking/idealized", True),
    ("alignment gap R* - R", "ranking/alignment_gap", True),
    ("  pairs with votes or scores", "ranking/idealized_pairs", False),
    ("displacement, chosen (mean delta_w)", "displacement/chosen", False),
    ("displacement, rejected (mean delta_l)", "displacement/rejected", False),
    ("share of pairs with delta_w < 0", "displacement/chosen_fell", True),
    ("CHES, mean", "ches/mean", False),
    ("CHES, length-normalised, mean", "ches/normalised_mean", False),
    ("KL(pi || ref) on samples", "sampled/kl", False),
    ("top-k entropy H_k", "sampled/topk_entropy", False),
    ("top-k probability mass M_k", "sampled/topk_mass", False),
    ("sampled length, mean", "sampled/length_mean", False),
    ("sampled length, std", "sampled/length_std", False),
    ("sampled length, min / max", ("sampled/length_min", "sampled/length_max"), False),
    ("corr(length, implied reward)", "sampled/length_reward_corr", False),
    ("win rate vs reference (greedy)", "win_rate", True),
    ("  policy / reference mean score",
     ("win_rate/policy_score", "win_rate/reference_score"), False),
    ("  P(policy > reference), mean", "win_rate/preference_mean", False),
    ("  identical answers (ties)", "win_rate/same_answer", True),
]


def render_table(results: dict, options: EvalOptions) -> str:
    """The results as aligned lines; metrics that were not computed are left out."""
    lines = [f"preftune eval: {options.model} vs reference {options.reference} on "
             f"{options.data} ({results['pairs']} pairs, {options.dtype}, beta "
             f"{options.beta:g}, CHES with the {options.ches_model})"]
    for label, keys, percent in TABLE:
        keys = keys if isinstance(keys, tuple) else (keys,)
        if any(key not in results for key in keys):
            continue
        values = [results[key] for key in keys]
        text = " / ".join("n/a" if v is None else f"{v:.1%}" if percent else f"{v:.4g}"
                          for v in values)
        lines.append(f"  {label:<40} {text}")
    return "\n".join(lines)
