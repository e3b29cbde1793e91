"""``preftune rm eval``: how well a reward model, or any scorer, orders held-out pairs, and how
far to trust it.

On every pair it computes logit P(chosen > rejected): from a reward model's head, the reward
gap r_w - r_l (or GPM's s / tau); from a scorer (``--scorer``: a judge, follow-up likelihood, a
function, a combination), its score gap, or the log-odds of ``prefer`` for a pairwise one. It
reports:

- pairwise accuracy (1[logit > 0]; ties count as wrong), overall, per category (a string field
  of the records, ``--category-field``) and per length bucket: whether chosen is the longer
  response (length bias), and quartiles of the pair's mean response length in tokens;
- calibration of p = sigmoid(logit): expected calibration error (Guo et al. 2017, as MORE,
  arXiv:2312.07401, uses for reward models). Each pair predicts "chosen wins" with confidence
  c = max(p, 1 - p), which is right when p > 1/2; pairs are binned by c in equal-width bins over
  [1/2, 1], ECE = sum_b |B_b| / n * |accuracy(B_b) - mean confidence(B_b)|. Also the Brier score
  mean (1 - p)^2 and the log loss mean -log p (a scorer's score gap is not trained to be a
  log-odds, so for scorers these say how far sigmoid(gap) is from one);
- the reward distribution of chosen and rejected responses (mean, std, quantiles, histogram) and
  the Pearson correlation of reward with response length (reward heads and scalar scorers).

Lengths are in tokens of the model's tokenizer (a scorer's, where it has one; else characters).

Writes ``rm_eval.json``, ``rm_eval_pairs.jsonl`` and the figures (``rm_eval/*.png``).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..data.convert import ranked_to_pairs
from ..config import ConfigError
from ..data.records import DataError
from ..data.rows import csv_text_columns, read_rows
from ..data.sources import load_records
from ..evaluate.diagnostics import pearson
from ..train.logging import progress_bar
from ..train.output import check_output_folder
from .scoring import RewardScoring, tied_gaps

RESULTS_FILE = "rm_eval.json"
PAIRS_FILE = "rm_eval_pairs.jsonl"
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


@dataclass
class RewardEvalOptions:
    """The flags of ``preftune rm eval``."""

    model: str | None  # a reward model; or
    data: str
    scorer: str | None = None  # any scorer spec (preftune.score.load_scorer)
    output: str | None = None
    fields: dict | None = None  # canonical field -> the file's column (data.fields, --column)
    category_field: str | None = None  # None: "category", where the records have it
    bins: int = 10
    batch_size: int = 16
    dtype: str = "auto"  # the model's (or the scorer's models'); auto: as saved


def calibration(logit: torch.Tensor, bins: int) -> dict:
    """ECE, Brier score, log loss and the reliability bins of P(chosen > rejected) =
    sigmoid(``logit``) (see the module docstring). Confidence c = max(p, 1 - p) is binned over
    [1/2, 1]; the log loss, -log p = softplus(-logit), is taken from the logit (p itself is 0
    below a logit of about -745)."""
    logit = logit.double()
    p = torch.sigmoid(logit)
    confidence = torch.maximum(p, 1 - p)
    correct = (p > 0.5).double()
    edges = torch.linspace(0.5, 1.0, bins + 1, dtype=torch.float64)
    which = torch.bucketize(confidence, edges[1:-1], right=True)  # bin b covers [e_b, e_b+1)
    table, ece = [], 0.0
    for b in range(bins):
        members = which == b
        count = int(members.sum())
        row = {"low": edges[b].item(), "high": edges[b + 1].item(), "pairs": count}
        if count:
            row["confidence"] = confidence[members].mean().item()
            row["accuracy"] = correct[members].mean().item()
            ece += count / len(p) * abs(row["accuracy"] - row["confidence"])
        table.append(row)
    log_loss = torch.nn.functional.softplus(-logit).mean().item()
    return {"ece": ece, "brier": ((1 - p) ** 2).mean().item(), "log_loss": log_loss,
            "bins": table}


def distribution(values: torch.Tensor) -> dict:
    values = values.double()
    summary = {"mean": values.mean().item(), "std": values.std(correction=0).item()}
    for q in QUANTILES:
        summary[f"q{q:g}"] = values.quantile(q).item()
    return summary


def _accuracy_groups(correct: torch.Tensor, keys: list[str], order: list[str] | None = None):
    """Accuracy and pair count per key, in ``order`` (default: sorted keys)."""
    groups: dict = {}
    for key, right in zip(keys, correct.tolist()):
        total = groups.setdefault(key, [0, 0])
        total[0] += right
        total[1] += 1
    return {key: {"accuracy": groups[key][0] / groups[key][1], "pairs": groups[key][1]}
            for key in (order or sorted(groups)) if key in groups}


def _length_quartiles(lengths: torch.Tensor, unit: str) -> tuple[list[str], list[str]]:
    """Each pair's bucket of mean response length, split at its quartiles (equal cut points
    merged), named by the range of ``unit`` it covers: [lo, hi), the last one [lo, hi].
    Returns the bucket of each pair and the bucket names in increasing order."""
    cuts = sorted(set(lengths.quantile(torch.tensor([0.25, 0.5, 0.75],
                                                    dtype=lengths.dtype)).tolist()))
    cuts = [c for c in cuts if lengths.min().item() < c]
    bounds = [lengths.min().item(), *cuts, lengths.max().item()]
    names = [f"[{bounds[i]:g}, {bounds[i + 1]:g}{']' if i == len(cuts) else ')'} {unit}"
             for i in range(len(cuts) + 1)]
    which = torch.bucketize(lengths, torch.tensor(cuts, dtype=lengths.dtype), right=True)
    return [names[int(i)] for i in which], names


def pair_metrics(logit: torch.Tensor, rewards: torch.Tensor | None, lengths: torch.Tensor,
                 categories: list, bins: int, unit: str = "tokens") -> tuple[dict, list[dict]]:
    """Results and per-pair rows from the logits of P(chosen > rejected) [N], the rewards of
    chosen and rejected [N, 2] (None: a pairwise model) and their lengths in ``unit`` [N, 2]."""
    logit = logit.double()
    p = torch.sigmoid(logit)
    correct = logit > 0
    results: dict = {"pairs": len(logit), "accuracy": correct.double().mean().item(),
                     "preference_logit_mean": logit.mean().item()}
    cal = calibration(logit, bins)
    results.update({f"calibration/{k}": v for k, v in cal.items() if k != "bins"})
    results["reliability"] = cal["bins"]
    longer = ["chosen longer" if c > r else "chosen shorter" if c < r else "same length"
              for c, r in lengths.tolist()]
    buckets, names = _length_quartiles(lengths.double().mean(1), unit)
    groups = {"length_difference": _accuracy_groups(correct, longer),
              "length": _accuracy_groups(correct, buckets, names)}
    if any(c is not None for c in categories):
        groups["category"] = _accuracy_groups(correct, [str(c) for c in categories])
    results["accuracy_by"] = groups
    for kind, table in groups.items():
        results.update({f"accuracy/{kind}/{key}": row["accuracy"] for key, row in table.items()})
    if rewards is not None:
        rewards = rewards.double()
        for slot, name in enumerate(("chosen", "rejected")):
            results.update({f"rewards/{name}_{k}": v
                            for k, v in distribution(rewards[:, slot]).items()})
        results["rewards/length_corr"] = pearson(lengths.flatten().double(), rewards.flatten())
        low, high = rewards.min().item(), rewards.max().item()
        edges = torch.linspace(low, high if high > low else low + 1, 21, dtype=torch.float64)
        results["histogram"] = {"edges": edges.tolist(), **{
            name: torch.histogram(rewards[:, slot], edges).hist.long().tolist()
            for slot, name in enumerate(("chosen", "rejected"))}}
    rows = []
    for i in range(len(logit)):
        row = {"p_chosen": p[i].item(), "correct": bool(correct[i]),
               f"{unit}_chosen": int(lengths[i, 0]), f"{unit}_rejected": int(lengths[i, 1])}
        if rewards is not None:
            row.update(reward_chosen=rewards[i, 0].item(), reward_rejected=rewards[i, 1].item())
        if categories[i] is not None:
            row["category"] = categories[i]
        rows.append(row)
    return results, rows


def run_rm_eval(options: RewardEvalOptions) -> dict:
    """Score the pairs of ``--data``, write rm_eval.json, rm_eval_pairs.jsonl and the figures."""
    started = time.perf_counter()
    if options.bins < 1:
        raise ConfigError("--bins must be at least 1")
    if options.output:
        check_output_folder(options.output, "--output")
    records = load_records(options.data, fields=options.fields)
    raw = [row for _, row in read_rows(options.data, csv_text_columns(options.fields))]
    field = options.category_field or "category"
    categories = [row.get(field) if isinstance(row, dict) else None for row in raw]
    if options.category_field and all(c is None for c in categories):
        raise DataError(f"{options.data}: --category-field {field}: no record has that field "
                        f"(the first has {', '.join(map(repr, raw[0]))}); name one of its "
                        "fields, or leave the option out.")
    shape = records[0].shape
    if shape == "ranked":  # every pair of each list with unequal scores; categories follow
        per_list = [ranked_to_pairs([record], "all_pairs") for record in records]
        records = [pair for pairs in per_list for pair in pairs]
        categories = [c for c, pairs in zip(categories, per_list) for _ in pairs]
    elif shape != "pairs":
        raise DataError(f"{options.data}: rm eval measures how a reward model orders pairs, but "
                        f"the file holds {shape} records; give pairs (prompt, chosen, rejected) or "
                        "ranked lists (scored as all their pairs). To score any records, use "
                        "`preftune rm score`.")
    if (options.model is None) == (options.scorer is None):
        raise ConfigError("rm eval measures one reward model (--model) or one scorer "
                          "(--scorer); give exactly one of them.")
    if options.scorer is not None:
        logit, rewards, lengths, unit = _scorer_gaps(options, records)
        kind = {"scorer": options.scorer}
    else:
        scoring = RewardScoring.load(options.model, options.batch_size, dtype=options.dtype)
        examples = scoring.examples(records)
        bar = progress_bar(len(examples), "rm eval", unit="example")
        outputs = torch.stack([o[:2] for o in scoring.outputs_of(examples, bar.update)])
        bar.close()
        logit = scoring.head.preference_logit(outputs[:, 0], outputs[:, 1])
        rewards = scoring.head.reward(outputs) if scoring.head.has_reward else None
        lengths = torch.tensor([[len(ids) for ids in ex.response_ids[:2]] for ex in examples])
        unit, kind = "tokens", {"model": options.model, "head": scoring.head.kind}
    results, rows = pair_metrics(tied_gaps(logit, records), rewards, lengths, categories,
                                 options.bins, unit)
    results.update(**kind, data=options.data, settings=asdict(options),
                   seconds=time.perf_counter() - started)
    output = _output_dir(options)
    output.mkdir(parents=True, exist_ok=True)
    (output / RESULTS_FILE).write_text(json.dumps(results, indent=2) + "\n")
    with open(output / PAIRS_FILE, "w", encoding="utf-8") as handle:
        for record, row in zip(records, rows):
            handle.write(json.dumps({"origin": record.origin, **row}) + "\n")
    from ..report.reward import write_reward_figures

    figures = write_reward_figures(results, output / "rm_eval")
    print(render_summary(results))
    print(f"\nwrote {output / RESULTS_FILE}, {output / PAIRS_FILE} and {len(figures)} figures in "
          f"{output / 'rm_eval'}")
    return results


def _scorer_gaps(options: RewardEvalOptions, records: list):
    """A scorer's logit of P(chosen > rejected) per pair, its rewards [N, 2] (None for a
    pairwise scorer) and the responses' lengths with their unit."""
    from ..data.records import response_text
    from ..score import load_scorer
    from ..score.base import scored_in_chunks, scorer_prompt

    scorer = load_scorer(options.scorer, options.data, options.dtype)
    prompts = [scorer_prompt(r.prompt, r.images, r.tools) for r in records]
    chosen, rejected = ([response_text(getattr(r, side)) for r in records]
                        for side in ("chosen", "rejected"))
    if scorer.pairwise:
        p = torch.tensor(scored_in_chunks(scorer.prefer, "rm eval", prompts, chosen, rejected),
                         dtype=torch.float64).clamp(1e-12, 1 - 1e-12)
        logit, rewards = p.logit(), None
    else:
        scores = scored_in_chunks(scorer.score, "rm eval", prompts + prompts, chosen + rejected)
        rewards = torch.tensor(scores, dtype=torch.float64).view(2, -1).T
        logit = rewards[:, 0] - rewards[:, 1]
    tokenizer = getattr(scorer, "tokenizer", None)
    measure = (lambda text: len(tokenizer.encode(text, add_special_tokens=False))) \
        if tokenizer is not None else len
    lengths = torch.tensor([[measure(c), measure(r)] for c, r in zip(chosen, rejected)])
    return logit, rewards, lengths, "tokens" if tokenizer is not None else "characters"


def _output_dir(options: RewardEvalOptions) -> Path:
    if options.output:
        return Path(options.output)
    model = Path(options.model or "")  # a run dir (model/, or adapter/ alone): its results
    run = options.model and ((model / "model").is_dir() or (model / "adapter").is_dir())
    return model if run else Path.cwd()


def render_summary(results: dict) -> str:
    measured = (f"{results['model']} on {results['data']} ({results['pairs']} pairs, "
                f"{results['head']} head)" if "model" in results else
                f"scorer {results['scorer']} on {results['data']} ({results['pairs']} pairs)")
    lines = [f"preftune rm eval: {measured}",
             f"  {'pairwise accuracy':<34} {results['accuracy']:.1%}",
             f"  {'ECE (calibration error)':<34} {results['calibration/ece']:.4f}",
             f"  {'Brier score / log loss':<34} {results['calibration/brier']:.4f} / "
             f"{results['calibration/log_loss']:.4f}"]
    for kind, table in results["accuracy_by"].items():
        for key, row in table.items():
            lines.append(f"  {'accuracy, ' + kind + ': ' + key:<34} {row['accuracy']:.1%} "
                         f"({row['pairs']} pair{'s' * (row['pairs'] != 1)})")
    if "rewards/chosen_mean" in results:
        lines.append(f"  {'reward chosen / rejected, mean':<34} "
                     f"{results['rewards/chosen_mean']:.3f} / {results['rewards/rejected_mean']:.3f}")
        corr = results["rewards/length_corr"]
        lines.append(f"  {'corr(reward, length)':<34} "
                     f"{'n/a' if corr is None else f'{corr:.3f}'}")
    return "\n".join(lines)

