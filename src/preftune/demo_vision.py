"""``preftune demo --vision``: preference training of a small vision-language model on CPU.

The data are generated 32x32 images of coloured shapes with questions a program can check
(``data/synthetic_vision.py``: the colour, the shape, how many). A LLaVA-style model is built
from a config (``model/scratch_vlm.py``: random weights, character tokenizer), briefly trained
to answer with SFT, and then trained further from that same SFT model three ways for the same
number of steps: more SFT (the control), DPO, and mDPO (DPO plus the image-conditional term on
a corrupted copy of the image, ``data.convert: images:corrupt``). Each model is measured on
held-out images with the evaluation path of ``preftune eval`` (greedy answers checked by the
program, log-prob ranking of the held-out pairs).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from accelerate import PartialState

from .config import build_config
from .data.sources import load_records
from .data.synthetic_vision import check, generate_split, to_records, write_jsonl
from .data.tokenize import TokenizeSettings, tokenize_records
from .evaluate.diagnostics import ranking_correct
from .evaluate.sampling import score_responses
from .generation import greedy_texts, prompt_ids
from .model.load import load_model_and_tokenizer
from .model.scratch_vlm import build_scratch_vlm
from .train.loop import train
from .train.output import move_aside, prepare_output_dir
from .train.run_lock import holding_output_dirs


@dataclass(frozen=True)
class VisionDemoSettings:
    families: tuple = ("colour", "shape")
    train_pairs: int = 1200
    eval_prompts: int = 120
    batch_size: int = 16
    sft_steps: int = 60  # to answer in the format, before it has learned to see well
    sft_learning_rate: float = 3e-3
    steps: int = 60  # per run from the SFT model
    learning_rate: float = 1e-4  # 3e-4 and above: DPO's chosen likelihood collapses
    beta: float = 0.5
    seed: int = 0


QUICK = VisionDemoSettings(train_pairs=48, eval_prompts=12, batch_size=8, sft_steps=4,
                           steps=2)
LIMITS = TokenizeSettings(max_length=160, max_prompt_length=128)  # characters are tokens


def _run_tree(out: Path, model: str, data_dir: Path, settings: VisionDemoSettings,
              objective: dict, steps: int, learning_rate: float, convert=None) -> dict:
    return {
        "output_dir": str(out), "model": {"path": model},
        "data": {"train": str(data_dir / "train.jsonl"), "eval": str(data_dir / "eval.jsonl"),
                 "max_length": LIMITS.max_length, "max_prompt_length": LIMITS.max_prompt_length,
                 **({"convert": convert} if convert else {})},
        "objective": objective,
        "train": {"learning_rate": learning_rate, "batch_size": settings.batch_size,
                  "max_steps": steps, "warmup_ratio": 0.05, "eval_every": steps,
                  "seed": settings.seed},
    }


def _measure(model_dir: Path, records: list, families: list) -> dict:
    """Held-out checker pass rate (greedy, overall and per family) and ranking accuracy."""
    model, tokenizer = load_model_and_tokenizer(str(model_dir), device=PartialState().device)
    shown = [record.images for record in records]
    ids = prompt_ids([record.prompt for record in records], tokenizer, LIMITS, shown)
    texts = greedy_texts(model, tokenizer, ids, 8, batch_size=32, images=shown,
                         description="held-out answers")
    passed = [check(record, text) for record, text in zip(records, texts)]
    by_family: dict = {}
    for family, ok in zip(families, passed):
        by_family.setdefault(family, []).append(ok)
    examples, _ = tokenize_records(records, tokenizer, LIMITS)
    scores = score_responses(model, examples, tokenizer.pad_token_id, 32,
                             images=tokenizer.image_inputs, description="held-out pairs")
    return {"pass_rate": sum(passed) / len(passed),
            "pass_rate_by_family": {f: sum(v) / len(v) for f, v in sorted(by_family.items())},
            "ranking_accuracy": ranking_correct(scores.logps).float().mean().item(),
            "samples": [{"question": r.prompt, "image": r.images[0].path, "answer": t}
                        for r, t in zip(records[:6], texts)]}


def _table(results: dict, settings: VisionDemoSettings, n_eval: int) -> str:
    runs = list(results)
    lines = [f"| held-out ({n_eval} images) | " + " | ".join(runs) + " |",
             "|---" * (len(runs) + 1) + "|",
             "| checker pass rate, greedy | " + " | ".join(
                 f"{results[r]['pass_rate']:.1%}" for r in runs) + " |",
             "| ranking accuracy, log pi(chosen) > log pi(rejected) | " + " | ".join(
                 f"{results[r]['ranking_accuracy']:.1%}" for r in runs) + " |"]
    for family in results[runs[0]]["pass_rate_by_family"]:
        lines.append(f"| pass rate: {family} | " + " | ".join(
            f"{results[r]['pass_rate_by_family'][family]:.0%}" for r in runs) + " |")
    return "\n".join(lines)


@holding_output_dirs
def run_vision_demo(output_dir: str = "runs/vision-demo", quick: bool = False) -> dict:
    settings = QUICK if quick else VisionDemoSettings()
    started = time.perf_counter()
    if any((Path(output_dir) / folder).exists() for folder in ("data", "base", "sft")):
        move_aside(Path(output_dir))  # an earlier demo: its runs are folders inside
    out = prepare_output_dir(output_dir, overwrite=True)
    data_dir = out / "data"
    train_tasks, eval_tasks = generate_split(settings.train_pairs, settings.eval_prompts,
                                             seed=settings.seed, families=settings.families)
    for name, tasks in (("train", train_tasks), ("eval", eval_tasks)):
        # the image right before the answer: a small model trained from scratch learns to
        # look at it in a few hundred steps (tens of thousands with the question in between)
        records = to_records(tasks, data_dir / "images", prefix=name, image_last=True)
        write_jsonl(records, data_dir / f"{name}.jsonl", [t.family for t in tasks])
    eval_records = load_records(str(data_dir / "eval.jsonl"))
    families = [task.family for task in eval_tasks]
    print(f"generated {len(train_tasks)} training pairs and {len(eval_tasks)} held-out images "
          f"in {data_dir}")
    base = build_scratch_vlm(out / "base", seed=settings.seed)

    sft = _run_tree(out / "sft", str(base), data_dir, settings, {"name": "sft"},
                    settings.sft_steps, settings.sft_learning_rate)
    train(build_config(sft))
    results = {"SFT": _measure(out / "sft" / "model", eval_records, families)}
    sft_model = str(out / "sft" / "model")
    runs = {  # name: (run folder, objective, conversion)
        "SFT, more steps": ("sft-more", {"name": "sft"}, None),
        "DPO": ("dpo", {"name": "dpo", "beta": settings.beta}, None),
        "mDPO": ("mdpo", {"name": "mdpo", "beta": settings.beta}, "images:corrupt"),
    }
    for name, (folder, objective, convert) in runs.items():
        tree = _run_tree(out / folder, sft_model, data_dir, settings, objective, settings.steps,
                         settings.learning_rate, convert)
        train(build_config(tree))
        results[name] = _measure(out / folder / "model", eval_records, families)

    minutes = (time.perf_counter() - started) / 60
    table = _table(results, settings, len(eval_tasks))
    record = {"settings": asdict(settings), "results": results, "minutes": minutes,
              "threads": torch.get_num_threads()}
    (out / "demo_results.json").write_text(json.dumps(record, indent=2))
    (out / "demo_results.md").write_text(table + "\n")
    print()
    print(table)
    print(f"\nvision demo finished in {minutes:.1f} min; results in {out / 'demo_results.md'}")
    return record
