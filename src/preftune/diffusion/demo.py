"""``preftune diffusion demo``: Diffusion-DPO on a tiny denoiser, measured by a program.

1. Generate 16x16 images of coloured shapes on white. The pretraining captions name the right
   colour only ``caption_accuracy`` of the time (the rest a random other colour), so the
   pretrained model follows colour words only partly, like a model trained on noisy captions.
2. Pretrain a tiny random UNet2DConditionModel from scratch with the plain denoising loss.
3. Diffusion-DPO on pairs: an image of the requested colour preferred over the same shape, at
   the same place and size, in a wrong colour, for the 8 circle and square prompts.
4. Before and after, sample the 4 held-out triangle prompts (and the 8 training prompts)
   from fixed seeds and let the checker (``shapes.py``) say whether the dominant colour is the
   requested one. Everything goes through the same commands a user runs (config, Trainer, report).
"""

from __future__ import annotations

import json
import random
import shutil
import time
from pathlib import Path

from .config import DiffusionConfig
from .evaluate import win_rate
from .model import build_tiny_pipeline, load_diffusion_model
from .sample import sample_images
from .shapes import COLOURS, SHAPES, ColourScorer, draw_shape, prompt_of, right_colour
from .train import train_diffusion

RESOLUTION = 16
GUIDANCE = 3.0  # classifier-free guidance when sampling; pretraining drops 10% of captions
FULL = {"pretrain_steps": 800, "pretrain_images": 2400, "dpo_steps": 300, "dpo_pairs": 800,
        "seeds": 16, "sampling_steps": 20, "dpo_lr": 5e-5, "mapo_lr": 2e-4}
QUICK = {"pretrain_steps": 20, "pretrain_images": 64, "dpo_steps": 6, "dpo_pairs": 16,
         "seeds": 2, "sampling_steps": 5, "dpo_lr": 5e-5, "mapo_lr": 2e-4}


HELD_OUT_SHAPE = "triangle"


def prompts_split() -> tuple[list[str], list[str]]:
    """(training prompts, held-out prompts): the preference pairs show every colour with the
    circle and the square; the held-out prompts ask for each colour as a triangle. (Holding
    out single (colour, shape) pairs instead would teach "circle -> not red" through the
    rejected images, since a tiny model does not compose words.)"""
    train = [prompt_of(c, s) for c in COLOURS for s in SHAPES if s != HELD_OUT_SHAPE]
    return train, [prompt_of(c, HELD_OUT_SHAPE) for c in COLOURS]


def write_images(directory: Path, name: str, rows: list[tuple[str, str, str]], rng) -> list:
    """Draw (colour, shape) for each row's images; return the rows with file names."""
    images = directory / "images"
    images.mkdir(parents=True, exist_ok=True)
    written = []
    for k, (prompt, *sides) in enumerate(rows):
        files, layout = [], rng.random()
        for side, (colour, shape) in zip(("w", "l"), sides):
            file = f"images/{name}_{k}_{side}.png"  # both sides: same place and size
            draw_shape(colour, shape, RESOLUTION, random.Random(layout)).save(directory / file)
            files.append(file)
        written.append({"prompt": prompt, "chosen": files[0], "rejected": files[-1]})
    return written


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def make_data(directory: Path, settings: dict, caption_accuracy: float, seed: int = 0):
    """pretrain.jsonl (rejected = chosen: the denoising loss reads only chosen) and dpo.jsonl."""
    rng = random.Random(seed)
    colours = list(COLOURS)
    pretrain = []
    for _ in range(settings["pretrain_images"]):
        colour, shape = rng.choice(colours), rng.choice(SHAPES)
        said = colour if rng.random() < caption_accuracy else rng.choice(
            [c for c in colours if c != colour])
        prompt = prompt_of(said, shape) if rng.random() >= 0.1 else ""
        pretrain.append((prompt, (colour, shape)))
    train_prompts, _ = prompts_split()
    pairs = []
    for k in range(settings["dpo_pairs"]):
        prompt = train_prompts[k % len(train_prompts)]
        colour, shape = prompt.split()[1:]
        wrong = rng.choice([c for c in colours if c != colour])
        pairs.append((prompt, (colour, shape), (wrong, shape)))
    return (write_jsonl(directory / "pretrain.jsonl", write_images(directory, "pre", pretrain,
                                                                   rng)),
            write_jsonl(directory / "dpo.jsonl", write_images(directory, "dpo", pairs, rng)))


def colour_accuracy(model, prompts: list[str], seeds: list[int], steps: int) -> float:
    """Share of samples whose dominant painted colour is the prompt's."""
    images = sample_images(model, prompts, seeds, steps, GUIDANCE)
    rows = [p for p in prompts for _ in seeds]
    return sum(right_colour(p, image) for p, image in zip(rows, images)) / len(rows)


def run_config(output_dir: Path, pipeline: Path, data: Path, objective: dict, steps: int,
               batch_size: int, learning_rate: float, samples: dict) -> DiffusionConfig:
    return DiffusionConfig.from_dict({
        "output_dir": str(output_dir), "model": {"path": str(pipeline)},
        "data": {"train": str(data), "resolution": RESOLUTION}, "objective": objective,
        "train": {"max_steps": steps, "batch_size": batch_size, "learning_rate": learning_rate,
                  "warmup_ratio": 0.05, "schedule": "constant", "log_every": 5, "seed": 0},
        "samples": samples})


def measure(model, before, prompts_by_split: dict, seeds: list[int], steps: int) -> dict:
    """Checker accuracy of ``model`` per split, and its win rate over ``before`` on the
    held-out prompts."""
    results = {f"{split}/accuracy": colour_accuracy(model, prompts, seeds, steps)
               for split, prompts in prompts_by_split.items()}
    evaluation = win_rate(model, before, prompts_by_split["held_out"], seeds, ColourScorer(),
                          steps, GUIDANCE)
    results.update({f"held_out/{k}": v for k, v in evaluation.items()
                    if k in ("win_rate", "mean_score/policy", "mean_score/reference")})
    return results


def run_demo(output_dir: str = "runs/diffusion_demo", quick: bool = False, beta: float = 5000.0,
             caption_accuracy: float = 0.6, show_progress: bool = True) -> dict:
    """The whole demo; returns (and writes to ``demo.json``) the measured numbers: the
    pretrained model, then Diffusion-DPO and MaPO each trained from it on the same pairs."""
    from ..report import write_report

    started = time.perf_counter()
    settings = QUICK if quick else FULL
    out = Path(output_dir)
    shutil.rmtree(out, ignore_errors=True)
    train_prompts, held_out = prompts_split()
    pretrain_data, pair_data = make_data(out / "data", settings, caption_accuracy)
    pipeline = build_tiny_pipeline(out / "initial", ["a", *COLOURS, *SHAPES], RESOLUTION)
    seeds, steps = list(range(settings["seeds"])), settings["sampling_steps"]
    samples = {"prompts": held_out, "seeds": seeds[:4], "steps": steps, "guidance_scale": GUIDANCE}
    train_diffusion(run_config(out / "pretrain", pipeline, pretrain_data, {"name": "denoising"},
                               settings["pretrain_steps"], 32, 1e-3, {}),
                    show_progress=show_progress)
    base = load_diffusion_model(out / "pretrain" / "model")
    splits = {"held_out": held_out, "train_prompts": train_prompts}
    results = {"held_out_prompts": held_out, "seeds": len(seeds), "sampling_steps": steps,
               "settings": settings, "caption_accuracy": caption_accuracy,
               "seconds/pretrain": round(time.perf_counter() - started, 1),
               **{f"pretrained/{k}": v for k, v in measure(base, base, splits, seeds,
                                                            steps).items() if "accuracy" in k}}
    for name, objective, learning_rate in (
            ("diffusion_dpo", {"name": "diffusion_dpo", "beta": beta}, settings["dpo_lr"]),
            ("mapo", {"name": "mapo"}, settings["mapo_lr"])):
        began = time.perf_counter()
        train_diffusion(run_config(out / name, out / "pretrain" / "model", pair_data, objective,
                                   settings["dpo_steps"], 16, learning_rate, samples),
                        show_progress=show_progress)
        trained = load_diffusion_model(out / name / "model")
        measured = measure(trained, base, splits, seeds, steps)
        (out / name / "eval.json").write_text(json.dumps(measured, indent=2))
        write_report(out / name)
        results.update({f"{name}/{k}": v for k, v in measured.items()})
        results[f"seconds/{name}"] = round(time.perf_counter() - began, 1)
    results["seconds/total"] = round(time.perf_counter() - started, 1)
    (out / "demo.json").write_text(json.dumps(results, indent=2))
    print(json.dumps({k: v for k, v in results.items() if "/" in k}, indent=2))
    return results
