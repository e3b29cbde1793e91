"""``preftune demo``: DPO on the bundled SmolLM2-135M-Instruct with generated, checkable data.

It writes a train and a held-out set of instructions whose correct answer a program can check,
measures the model before training, trains with DPO through the same path as ``preftune train``,
and measures again: the share of greedy generations that pass the checker, and how the model
ranks each held-out pair. ``--online`` then spends the same number of optimizer steps another
way: half on the offline pairs, half in ``preftune online`` rounds on the model's own samples
judged by the checkers, and measures that model the same way. Generation and scoring are those
of ``preftune eval`` and ``preftune online`` (``preftune.generation``, the synthetic scorer).
"""

from __future__ import annotations

import gc
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import PartialState

from .config import build_config
from .data.prepare import prepare_examples
from .data.synthetic import generate_split, write_jsonl
from .data.tokenize import TokenizeSettings
from .evaluate.diagnostics import ranking_correct
from .evaluate.sampling import score_responses
from .generation import greedy_texts, prompt_ids
from .model.load import load_model_and_tokenizer
from .online.config import OnlineConfig
from .online.loop import has_started, policy_before, run_online
from .score import SyntheticScorer
from .train.logging import read_metrics
from .train.loop import train
from .train.output import prepare_output_dir
from .train.run_lock import holding_output_dirs


@dataclass(frozen=True)
class DemoSettings:
    train_pairs: int = 192
    eval_prompts: int = 96
    batch_size: int = 8
    max_steps: int = 24
    learning_rate: float = 2e-5
    beta: float = 0.1
    max_new_tokens: int = 16
    seed: int = 0
    # --online: offline steps first, then rounds; warmup + rounds x round_steps = max_steps
    warmup_steps: int = 12
    rounds: int = 3
    round_steps: int = 4
    prompts_per_round: int = 64
    samples: int = 4


QUICK = DemoSettings(train_pairs=16, eval_prompts=8, batch_size=4, max_steps=4, warmup_steps=2,
                     rounds=1, round_steps=2, prompts_per_round=8, samples=2)
LIMITS = TokenizeSettings(max_length=256, max_prompt_length=192)


def _on_device(path: str):
    """(model, tokenizer) at ``path``, on the accelerator when there is one: measured there."""
    return load_model_and_tokenizer(path, device=PartialState().device)


def _measure(model, tokenizer, tasks, eval_examples, scorer, settings) -> dict:
    """Greedy pass rate (overall and per family) and ranking accuracy on the held-out data."""
    prompts = [t.prompt for t in tasks]
    texts = greedy_texts(model, tokenizer, prompt_ids(prompts, tokenizer, LIMITS),
                         settings.max_new_tokens, description="held-out answers")
    passed = scorer.score(prompts, texts)
    per_family: dict[str, list[float]] = {}
    for task, value in zip(tasks, passed):
        per_family.setdefault(task.family, []).append(value)
    scores = score_responses(model, eval_examples, tokenizer.pad_token_id,
                             description="held-out pairs")
    return {
        "pass_rate": sum(passed) / len(passed),
        "pass_rate_by_family": {f: sum(v) / len(v) for f, v in sorted(per_family.items())},
        "ranking_accuracy": {
            "summed": ranking_correct(scores.logps).float().mean().item(),
            "normalised": ranking_correct(scores.logps / scores.token_counts).float().mean().item()},
        "samples": [{"prompt": t.prompt_text, "response": x} for t, x in zip(tasks[:6], texts)],
    }


def _table(before: dict, after: dict, final_eval: dict, n_eval: int) -> str:
    rows = [
        ("checker pass rate, greedy (held-out prompts)", before["pass_rate"], after["pass_rate"]),
        ("ranking accuracy, log pi(chosen) > log pi(rejected)",
         before["ranking_accuracy"]["summed"], after["ranking_accuracy"]["summed"]),
        ("ranking accuracy, length-normalised",
         before["ranking_accuracy"]["normalised"], after["ranking_accuracy"]["normalised"]),
    ]
    lines = [f"| held-out metric ({n_eval} prompts) | before | after |", "|---|---|---|"]
    lines += [f"| {name} | {b:.1%} | {a:.1%} |" for name, b, a in rows]
    lines.append(f"| implied-reward accuracy (DPO) | n/a: policy = reference, all rewards 0 "
                 f"| {final_eval['eval/rewards/accuracies']:.1%} |")
    lines.append(f"| implied-reward margin (DPO) | 0.000 | {final_eval['eval/rewards/margins']:.3f} |")
    families = sorted(before["pass_rate_by_family"])
    lines += ["", "| task family | pass before | pass after |", "|---|---|---|"]
    lines += [f"| {f} | {before['pass_rate_by_family'][f]:.0%} | "
              f"{after['pass_rate_by_family'][f]:.0%} |" for f in families]
    return "\n".join(lines)


def _online_table(offline: dict, online: dict, settings: DemoSettings, offline_minutes: float,
                  online_minutes: float) -> str:
    trained = online["rounds_trained"]
    steps = f"{settings.warmup_steps} offline + {trained} x {settings.round_steps} online"
    if trained < settings.rounds:  # a round whose samples all scored alike builds no pair
        steps += (f" ({settings.rounds - trained} of {settings.rounds} rounds trained nothing: "
                  "every sample scored alike)")
    lines = [f"| same {settings.max_steps} optimizer steps of {settings.batch_size} | offline DPO "
             f"| {steps} |", "|---|---|---|",
             f"| checker pass rate, greedy (held-out prompts) | {offline['pass_rate']:.1%} | "
             f"{online['pass_rate']:.1%} |",
             f"| minutes | {offline_minutes:.1f} (with the measurements before) | "
             f"{online_minutes:.1f} |", "",
             "| task family | offline | online |", "|---|---|---|"]
    lines += [f"| {f} | {offline['pass_rate_by_family'][f]:.0%} | "
              f"{online['pass_rate_by_family'][f]:.0%} |"
              for f in sorted(offline["pass_rate_by_family"])]
    return "\n".join(lines)


def _dpo_tree(out: Path, data_dir: Path, settings: DemoSettings, steps: int) -> dict:
    return {
        "output_dir": str(out),
        "model": {"path": "default"},
        "data": {"train": str(data_dir / "train.jsonl"), "eval": str(data_dir / "eval.jsonl"),
                 "max_length": LIMITS.max_length, "max_prompt_length": LIMITS.max_prompt_length},
        "objective": {"name": "dpo", "beta": settings.beta},
        "train": {"learning_rate": settings.learning_rate, "batch_size": settings.batch_size,
                  "max_steps": steps, "warmup_ratio": 0.1, "eval_every": steps,
                  "seed": settings.seed},
    }


def _online(out: Path, data_dir: Path, settings: DemoSettings) -> Path:
    """Offline DPO for ``warmup_steps``, then online rounds from that model; returns the final
    model's directory."""
    warmup = _dpo_tree(out / "online-warmup", data_dir, settings, settings.warmup_steps)
    train(build_config(warmup))
    tree = _dpo_tree(out / "online", data_dir, settings, settings.round_steps)
    tree["model"]["path"] = str(out / "online-warmup" / "model")
    tree["train"]["eval_every"] = None
    tree["online"] = {
        "rounds": settings.rounds, "scorer": "synthetic", "reference": "initial",
        "prompts_per_round": settings.prompts_per_round,
        "eval_max_new_tokens": settings.max_new_tokens,
        "sampling": {"samples": settings.samples, "temperature": 1.0,
                     "max_new_tokens": settings.max_new_tokens},
    }
    tree["data"]["eval"] = str(data_dir / "eval.jsonl")
    config = build_config(tree, "the online demo", schema=OnlineConfig)
    run_online(config, resume=has_started(out / "online"))
    return Path(policy_before(out / "online", settings.rounds + 1, tree["model"]["path"]))


@holding_output_dirs
def run_demo(output_dir: str = "runs/demo", quick: bool = False, online: bool = False) -> dict:
    settings = QUICK if quick else DemoSettings()
    started = time.perf_counter()
    out = prepare_output_dir(output_dir, overwrite=True)  # an earlier demo is moved aside
    data_dir = out / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    train_tasks, eval_tasks = generate_split(settings.train_pairs, settings.eval_prompts,
                                             seed=settings.seed)
    write_jsonl(train_tasks, data_dir / "train.jsonl")
    write_jsonl(eval_tasks, data_dir / "eval.jsonl")
    print(f"generated {len(train_tasks)} training pairs and {len(eval_tasks)} held-out prompts "
          f"in {data_dir}")

    config = build_config(_dpo_tree(out, data_dir, settings, settings.max_steps))
    scorer = SyntheticScorer.from_data(str(data_dir / "eval.jsonl"))
    model, tokenizer = _on_device("default")
    _, eval_examples, _, _ = prepare_examples(config.data, tokenizer, settings.seed,
                                              announce=False)  # training says what it read
    print("measuring the model before training ...")
    before = _measure(model, tokenizer, eval_tasks, eval_examples, scorer, settings)
    del model
    gc.collect()  # the process's first load sits in a reference cycle (model/load.released)

    train(config)

    trained, _ = _on_device(str(out / "model"))
    print("measuring the trained model ...")
    after = _measure(trained, tokenizer, eval_tasks, eval_examples, scorer, settings)
    final_eval = read_metrics(out / "metrics.jsonl")[-1]
    table = _table(before, after, final_eval, len(eval_tasks))
    online_result = None
    if online:
        offline_minutes = (time.perf_counter() - started) / 60
        online_model = _online(out, data_dir, settings)
        print("measuring the online model ...")
        online_result = _measure(_on_device(str(online_model))[0], tokenizer,
                                 eval_tasks, eval_examples, scorer, settings)
        rounds = json.loads((out / "online" / "online.json").read_text())["rounds"]
        online_result["rounds_trained"] = sum("skipped" not in r.get("train", {"skipped": 1})
                                              for r in rounds)
        table += "\n\n" + _online_table(after, online_result, settings, offline_minutes,
                                         (time.perf_counter() - started) / 60 - offline_minutes)
    minutes = (time.perf_counter() - started) / 60
    results = {"settings": settings.__dict__, "before": before, "after": after,
               "final_eval": final_eval, "minutes": minutes, "online": online_result,
               "threads": torch.get_num_threads()}
    (out / "demo_results.json").write_text(json.dumps(results, indent=2))
    (out / "demo_results.md").write_text(table + "\n")
    print("\nheld-out samples (greedy), before -> after:")
    for old, new in zip(before["samples"], after["samples"]):
        print(f"  {old['prompt']}\n    before: {old['response']!r}\n    after:  {new['response']!r}")
    print()
    print(table)
    print(f"\ndemo finished in {minutes:.1f} min; model in {out / 'model'}, "
          f"results in {out / 'demo_results.md'}")
    return results
