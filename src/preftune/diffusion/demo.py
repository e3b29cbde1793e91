"""``preftune diffusion demo``: preference training of a tiny denoiser, measured by a program.

1. Generate 16x16 images of coloured shapes on white, captioned "a {colour} {shape}" (10%
   empty, for classifier-free guidance).
2. Pretrain a tiny random UNet2DConditionModel from scratch, briefly, with the plain denoising
   loss: it follows colour words only partly (about half its samples have the right colour).
3. Preference pairs the way Pick-a-Pic-style data is made: the pretrained model samples each
   circle and square prompt from many seeds, the checker (``shapes.py``) labels every sample,
   and a right-colour sample is preferred over a wrong-colour one of the same prompt.
   The same samples, rated by the checker's score, also make ranked lists of 4
   (``preftune diffusion rank``'s Syn-Pic-style lists).
4. From the pretrained model: Diffusion-DPO on those pairs, SPO online on the same prompts
   (its pools scored by the same checker), and RankDPO on the ranked lists.
5. Before and after, sample the 4 held-out triangle prompts (and the 8 training prompts) from
   fixed seeds and let the checker say whether the dominant colour is the requested one.
   Everything goes through the same code a user runs (config, Trainer, report).
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

from ..train.output import move_aside, prepare_output_dir
from ..train.run_lock import holding_output_dirs
from .config import DiffusionConfig
from .evaluate import win_rate
from .model import load_for_sampling
from .tiny import build_tiny_pipeline
from .ranking import make_ranked_lists
from .sample import sample_images
from .shapes import COLOURS, SHAPES, ColourScorer, draw_shape, prompt_of, right_colour
from .train import train_diffusion

RESOLUTION = 16
RANK_LR = 3e-6  # 1e-5 left it where it was, 3e-5 collapsed it (README)
GUIDANCE = 3.0  # classifier-free guidance when sampling; pretraining drops 10% of captions
FULL = {"pretrain_steps": 500, "pretrain_lr": 2e-3, "pretrain_images": 2400,
        "pair_seeds": 64, "pairs_per_prompt": 100, "drawn_pairs": 800, "dpo_steps": 300,
        "dpo_lr": 1e-5, "spo_steps": 60, "spo_lr": 5e-5, "list_size": 4, "rank_steps": 150,
        "rank_lr": RANK_LR, "seeds": 16, "sampling_steps": 20}
QUICK = {"pretrain_steps": 20, "pretrain_lr": 2e-3, "pretrain_images": 64, "pair_seeds": 4,
         "pairs_per_prompt": 4, "drawn_pairs": 16, "dpo_steps": 6, "dpo_lr": 1e-5,
         "spo_steps": 2, "spo_lr": 5e-5, "list_size": 4, "rank_steps": 2, "rank_lr": RANK_LR,
         "seeds": 2, "sampling_steps": 5}
SPO = {"name": "spo", "guidance_scale": GUIDANCE, "steps_per_trajectory": 4}


HELD_OUT_SHAPE = "triangle"


def prompts_split() -> tuple[list[str], list[str]]:
    """(training prompts, held-out prompts): the preference pairs show every colour with the
    circle and the square; the held-out prompts ask for each colour as a triangle. (Holding
    out single (colour, shape) pairs instead would teach "circle -> not red" through the
    rejected images, since a tiny model does not compose words.)"""
    train = [prompt_of(c, s) for c in COLOURS for s in SHAPES if s != HELD_OUT_SHAPE]
    return train, [prompt_of(c, HELD_OUT_SHAPE) for c in COLOURS]


def pair_seeds(settings: dict) -> list[int]:
    """The seeds the preference data is sampled from (not the measuring seeds)."""
    return list(range(1000, 1000 + settings["pair_seeds"]))


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def make_pretraining_data(directory: Path, settings: dict, seed: int = 0) -> Path:
    """pretrain.jsonl: drawn images with their captions (rejected = chosen: the denoising loss
    reads only chosen); 10% of captions are empty, for classifier-free guidance."""
    rng = random.Random(seed)
    (directory / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for k in range(settings["pretrain_images"]):
        colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        file = f"images/pre_{k}.png"
        draw_shape(colour, shape, RESOLUTION, rng).save(directory / file)
        prompt = prompt_of(colour, shape) if rng.random() >= 0.1 else ""
        rows.append({"prompt": prompt, "chosen": file, "rejected": file})
    return write_jsonl(directory / "pretrain.jsonl", rows)


def sample_pairs(ranked: Path, directory: Path, settings: dict,
                 seed: int = 0) -> tuple[Path, str]:
    """dpo.jsonl from the model's own samples, as ``ranked`` (``preftune diffusion rank``'s
    lists, from ``directory``'s ``ranked/``) holds them with the checker's score: a sample is
    right when the score is at least 1/2 (``right_colour``), and ``pairs_per_prompt`` random
    (right colour, wrong colour) pairs are drawn, with replacement, per prompt that has both.
    A model with no such pair yet (the quick demo's) gets drawn pairs instead: the requested
    colour over another colour, same shape, place and size. Returns the file and which kind it
    holds."""
    rng = random.Random(seed)
    prompts, _ = prompts_split()
    samples: dict[str, list] = {prompt: [] for prompt in prompts}
    for line in ranked.read_text().splitlines():
        row = json.loads(line)  # a prompt's lists come in seed order
        samples[row["prompt"]] += zip(row["images"], row["scorer_scores"]["shape_colour"])
    rows = []
    for prompt in prompts:
        right = [f"ranked/{file}" for file, score in samples[prompt] if score >= 0.5]
        wrong = [f"ranked/{file}" for file, score in samples[prompt] if score < 0.5]
        for _ in range(settings["pairs_per_prompt"] if right and wrong else 0):
            rows.append({"prompt": prompt, "chosen": rng.choice(right),
                         "rejected": rng.choice(wrong)})
    kind = "the pretrained model's samples, labelled by the checker"
    if not rows:
        kind = "drawn (the model had no right and wrong sample of one prompt)"
        rows = drawn_pairs(directory, settings["drawn_pairs"], rng)
    rng.shuffle(rows)
    return write_jsonl(directory / "dpo.jsonl", rows), kind


def drawn_pairs(directory: Path, count: int, rng) -> list[dict]:
    prompts, _ = prompts_split()
    rows = []
    for k in range(count):
        prompt = prompts[k % len(prompts)]
        colour, shape = prompt.split()[1:]
        wrong, layout = rng.choice([c for c in COLOURS if c != colour]), rng.random()
        for side, paint in (("w", colour), ("l", wrong)):  # same place and size
            draw_shape(paint, shape, RESOLUTION, random.Random(layout)).save(
                directory / f"images/drawn_{k}_{side}.png")
        rows.append({"prompt": prompt, "chosen": f"images/drawn_{k}_w.png",
                     "rejected": f"images/drawn_{k}_l.png"})
    return rows


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
                  "warmup_ratio": 0.05, "schedule": "constant", "log_every": min(5, steps),
                  "seed": 0},
        "samples": samples})


def measure(model, before, prompts_by_split: dict, seeds: list[int], steps: int) -> dict:
    """Checker accuracy of ``model`` per split, and its win rate over ``before`` on the
    held-out prompts."""
    results = {f"{split}/accuracy": colour_accuracy(model, prompts, seeds, steps)
               for split, prompts in prompts_by_split.items()}
    evaluation = win_rate(lambda: model, lambda: before, prompts_by_split["held_out"], seeds,
                          ColourScorer(), steps, GUIDANCE)
    results.update({f"held_out/{k}": v for k, v in evaluation.items()
                    if k in ("win_rate", "mean_score/policy", "mean_score/reference")})
    return results


DEMO_FILES = ("demo.json", "data", "initial", "pretrain")  # what says a folder holds a demo


@holding_output_dirs
def run_demo(output_dir: str = "runs/diffusion_demo", quick: bool = False, beta: float = 5000.0,
             show_progress: bool = True) -> dict:
    """The whole demo; returns (and writes to ``demo.json``) the measured numbers: the
    pretrained model, then Diffusion-DPO, SPO and RankDPO each trained from it (RankDPO only
    when some ranked list orders its images, which the quick demo's model may not give)."""
    from ..report import write_report

    started = time.perf_counter()
    settings = QUICK if quick else FULL
    if any((Path(output_dir) / name).exists() for name in DEMO_FILES):
        move_aside(Path(output_dir))  # an earlier demo (its runs are folders inside): kept
    out = prepare_output_dir(output_dir, overwrite=True)  # (it deleted the folder it was given)
    train_prompts, held_out = prompts_split()
    pretrain_data = make_pretraining_data(out / "data", settings)
    pipeline = build_tiny_pipeline(out / "initial", ["a", *COLOURS, *SHAPES], RESOLUTION)
    seeds, steps = list(range(settings["seeds"])), settings["sampling_steps"]
    samples = {"prompts": held_out, "seeds": seeds[:4], "steps": steps, "guidance_scale": GUIDANCE}
    train_diffusion(run_config(out / "pretrain", pipeline, pretrain_data, {"name": "denoising"},
                               settings["pretrain_steps"], 32, settings["pretrain_lr"], {}),
                    show_progress=show_progress)
    base = load_for_sampling(out / "pretrain" / "model", "model.path")
    ranked = make_ranked_lists(train_prompts, [str(out / "pretrain" / "model")],
                               ["shape_colour"], pair_seeds(settings), out / "data" / "ranked",
                               steps, GUIDANCE, settings["list_size"])
    pair_data, pair_kind = sample_pairs(Path(ranked["ranked"]), out / "data", settings)
    splits = {"held_out": held_out, "train_prompts": train_prompts}
    results = {"held_out_prompts": held_out, "seeds": len(seeds), "sampling_steps": steps,
               "settings": settings, "pairs": pair_kind,
               "pairs/count": sum(1 for _ in pair_data.open()),
               "ranked/lists": ranked["lists"],
               "ranked/lists_all_tied": ranked["lists_all_tied"],
               "seconds/pretrain": round(time.perf_counter() - started, 1),
               **{f"pretrained/{k}": v for k, v in measure(base, base, splits, seeds,
                                                            steps).items() if "accuracy" in k}}
    runs = [("diffusion_dpo", {"name": "diffusion_dpo", "beta": beta}, pair_data,
             settings["dpo_steps"], 16, settings["dpo_lr"]),
            ("spo", SPO, pair_data, settings["spo_steps"], 16, settings["spo_lr"])]
    if ranked["lists"] > ranked["lists_all_tied"]:  # lists of 4: 8 a step = 32 images, as DPO
        runs.append(("rank_dpo", {"name": "rank_dpo", "beta": beta}, Path(ranked["ranked"]),
                     settings["rank_steps"], 8, settings["rank_lr"]))
    for name, objective, data, run_steps, batch_size, learning_rate in runs:
        began = time.perf_counter()
        train_diffusion(run_config(out / name, out / "pretrain" / "model", data, objective,
                                   run_steps, batch_size, learning_rate, samples),
                        show_progress=show_progress)
        trained = load_for_sampling(out / name / "model", "model.path")
        measured = measure(trained, base, splits, seeds, steps)
        (out / name / "eval.json").write_text(json.dumps(measured, indent=2))
        write_report(out / name)
        results.update({f"{name}/{k}": v for k, v in measured.items()})
        results[f"seconds/{name}"] = round(time.perf_counter() - began, 1)
    results["seconds/total"] = round(time.perf_counter() - started, 1)
    (out / "demo.json").write_text(json.dumps(results, indent=2))
    print(results_table(results))
    print(f"every number: {out / 'demo.json'}; each run's report.html shows its samples")
    return results


NAMES = {"pretrained": "pretrained (denoising)", "diffusion_dpo": "Diffusion-DPO", "spo": "SPO",
         "rank_dpo": "RankDPO"}


def results_table(results: dict) -> str:
    """The demo's numbers as a markdown table: a row per model, the checker's accuracy on the
    held-out and training prompts, and each trained model's win rate over the pretrained one."""
    samples = results["seeds"] * len(results["held_out_prompts"])
    lines = [f"| model | accuracy, held-out prompts ({samples} samples) | accuracy, training "
             "prompts | win rate vs pretrained, held-out | seconds |", "|---|---|---|---|---|"]
    for name, label in NAMES.items():
        if f"{name}/held_out/accuracy" not in results:  # RankDPO without an ordered list
            continue
        win = results.get(f"{name}/held_out/win_rate")
        seconds = results.get(f"seconds/{name}", results["seconds/pretrain"])
        lines.append(f"| {label} | {results[f'{name}/held_out/accuracy']:.3f} | "
                     f"{results[f'{name}/train_prompts/accuracy']:.3f} | "
                     f"{'' if win is None else f'{win:.3f}'} | {seconds:.0f} |")
    return "\n".join(lines)
