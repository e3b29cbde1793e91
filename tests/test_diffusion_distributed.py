"""Two processes (gloo on CPU, through accelerate) train a denoiser
exactly like one process with the same global batch: each process takes its share of every
step's pairs or lists, their noise is seeded per example, and DDP averages the gradients."""

import json

import pytest
import torch
import yaml

pytest.importorskip("diffusers")

from safetensors.torch import load_file  # noqa: E402

from diffusion_fixtures import (config_tree, on_two_processes, one_thread,  # noqa: E402, F401
                                tiny_clip_dir, tiny_flux_pipeline, tiny_pipeline,
                                tiny_sdxl_pipeline,
                                write_pairs, write_prompts)
from preftune.diffusion.config import DiffusionConfig  # noqa: E402
from preftune.diffusion.train import train_diffusion  # noqa: E402
from test_diffusion_ranked import LISTS, write_ranked  # noqa: E402


def losses(run):
    """Each step's loss, then each evaluation's."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows] + [r["eval/loss"] for r in rows if "eval/loss" in r]


def two_processes(config_tree_, tmp_path, name):
    return on_two_processes("train", config_tree_, tmp_path / f"{name}.yaml")


PIPELINES = {"sd": tiny_pipeline, "sdxl": tiny_sdxl_pipeline, "flux": tiny_flux_pipeline}


def one_and_two_processes(tmp_path, objective, lora, kind, launcher):
    """The same run on one process (batch 4) and on two (2 each, launched by
    ``launcher(config_tree, tmp_path, name)``); returns the pipeline it started from."""
    pipe = PIPELINES[kind](tmp_path / "pipe")
    data = (write_ranked(tmp_path / "data", [*LISTS, LISTS[0]]) if objective == "rank_dpo"
            else write_pairs(tmp_path / "data", count=8))
    sections = {"objective": {"name": objective, "beta": 500.0},
                "train": {"max_steps": 3, "batch_size": 4, "log_every": 1, "eval_every": 3},
                "data": {"eval": str(data)},
                "samples": {"prompts": ["a red circle"], "seeds": [0], "steps": 2,
                            "resolution": 16}}
    if lora:
        sections["model"] = {"lora": {"r": 4, "alpha": 8}}
    one = config_tree(pipe, data, tmp_path / "one", **sections)
    train_diffusion(DiffusionConfig.from_dict(one), show_progress=False)
    two = {**one, "output_dir": str(tmp_path / "two"),
           "train": {**one["train"], "batch_size": 2}}  # per process: 2 x 2 = the same 4
    done = launcher(two, tmp_path, objective)
    assert done.returncode == 0, done.stderr[-3000:]
    return pipe


def assert_same_training(tmp_path, pipe, kind):
    """Two processes' losses, evaluation and final denoiser equal one process's."""
    # (other batch sizes per forward and an all-reduce: float32 rounding, magnified by beta/2)
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=1e-4)
    assert len(losses(tmp_path / "one")) == 4  # 3 steps and the evaluation at step 3
    assert json.loads((tmp_path / "two" / "run.json").read_text())["processes"] == 2
    folder = "transformer" if kind == "flux" else "unet"
    weights = [load_file(tmp_path / run / "model" / folder / "diffusion_pytorch_model.safetensors")
               for run in ("one", "two")]
    # Adam moves each weight by about the learning rate (1e-4) a step whatever its gradient's
    # size, so the odd weight whose gradient is near 0 moves by rounding noise: every weight
    # agrees to a tenth of the 3 steps' reach, and on average to a thousandth of the distance
    # weights moved. An attention key's bias has no gradient at all (softmax ignores it), so
    # it moves by noise alone and is left out.
    initial = load_file(pipe / folder / "diffusion_pytorch_model.safetensors")
    differences, movements = [], []
    for name, value in weights[0].items():
        if not name.endswith("k_proj.bias"):
            torch.testing.assert_close(weights[1][name], value, rtol=0, atol=3e-5, msg=name)
        differences.append((weights[1][name] - value).abs().flatten())
        movements.append((value - initial[name]).abs().flatten())
    difference, movement = torch.cat(differences).mean(), torch.cat(movements).mean()
    assert movement > 1e-5 and difference < 1e-3 * movement
    # the main process alone wrote the samples
    index = json.loads((tmp_path / "two" / "samples" / "samples.json").read_text())
    assert sorted(index["grids"]) == ["after", "before"]


# SDXL: its pooled text and time ids through the wrapper; Flux: its packed latents and guidance
@pytest.mark.parametrize("objective, lora, kind", [
    ("diffusion_dpo", False, "sd"), ("rank_dpo", False, "sd"),
    ("diffusion_dpo", True, "sd"), ("diffusion_dpo", False, "sdxl"),
    ("diffusion_dpo", False, "flux")])
def test_two_processes_equal_one_with_the_same_global_batch(tmp_path, objective, lora, kind):
    pipe = one_and_two_processes(tmp_path, objective, lora, kind, two_processes)
    assert_same_training(tmp_path, pipe, kind)


def fsdp2_processes(config_tree_, tmp_path, name):
    """Two CPU processes under accelerate's FSDP2 (``examples/accelerate/fsdp2.yaml``)."""
    from test_fsdp import launch

    config = tmp_path / f"{name}.yaml"
    config.write_text(yaml.safe_dump(config_tree_))
    return launch(config, command=("diffusion", "train"))


@pytest.mark.parametrize("objective, lora, kind", [
    ("diffusion_dpo", False, "sd"), ("diffusion_dpo", True, "flux"), ("mapo", False, "flux")])
def test_fsdp2_splits_the_denoiser_and_trains_as_one_process(tmp_path, objective, lora, kind):
    """Under FSDP2 the denoiser is split block by block, the text encoders and VAE stay whole;
    a live reference, adapters-off (LoRA) or none; the final pipeline is gathered."""
    pipe = one_and_two_processes(tmp_path, objective, lora, kind, fsdp2_processes)
    assert json.loads((tmp_path / "two" / "run.json").read_text())["engine"] == "FSDP"
    assert_same_training(tmp_path, pipe, kind)


def zero2_processes(config_tree_, tmp_path, name):
    """Two CPU processes under DeepSpeed ZeRO-2 (``examples/accelerate/zero3.yaml``, stage 2)."""
    from test_deepspeed import zero_environment
    from test_fsdp import launch

    config = tmp_path / f"{name}.yaml"
    config.write_text(yaml.safe_dump(config_tree_))
    return launch(config, command=("diffusion", "train"), engine=lambda: zero_environment(2))


def test_zero2_trains_a_denoiser_as_one_process_and_zero3_is_refused(tmp_path):
    pipe = one_and_two_processes(tmp_path, "diffusion_dpo", True, "sd", zero2_processes)
    assert json.loads((tmp_path / "two" / "run.json").read_text())["engine"] == "DEEPSPEED"
    assert_same_training(tmp_path, pipe, "sd")
    from test_deepspeed import zero_environment
    from test_fsdp import launch

    config = tmp_path / "zero3.yaml"
    config.write_text(yaml.safe_dump(config_tree(pipe, write_pairs(tmp_path / "z3"),
                                                 tmp_path / "z3run")))
    done = launch(config, command=("diffusion", "train"), engine=lambda: zero_environment(3))
    assert done.returncode != 0 and "not ZeRO-3 (it would partition the frozen" in done.stderr


def prompt_objective_on_one_and_two_processes(tmp_path, objective: dict, prompts: list[str],
                                              keys: tuple, launcher=None) -> list[dict]:
    """An objective trained from prompts, on one process accumulating two micro-batches of 2
    and on two processes of 2 each (DDP, or ``launcher(tree, tmp_path, name)``): the same
    metrics (``keys``) at every step and the same weights. Returns the one-process metric
    rows."""
    pipe = tiny_pipeline(tmp_path / "pipe")
    one = config_tree(pipe, write_prompts(tmp_path / "data", prompts * 2), tmp_path / "one",
                      objective=objective, train={
                          "max_steps": 2, "batch_size": 2, "log_every": 1,
                          "gradient_accumulation_steps": 2, "learning_rate": 1e-3})
    train_diffusion(DiffusionConfig.from_dict(one), show_progress=False)
    two = {**one, "output_dir": str(tmp_path / "two"),
           "train": {**one["train"], "gradient_accumulation_steps": 1}}
    done = (launcher or two_processes)(two, tmp_path, objective["name"])
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {run: [json.loads(line) for line in
                  (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
            for run in ("one", "two")}
    assert len(rows["one"]) == 2
    for first, second in zip(rows["one"], rows["two"]):
        for key in keys:
            assert second[key] == pytest.approx(first[key], rel=1e-4, abs=1e-6), key
    weights = [load_file(tmp_path / run / "model" / "unet" / "diffusion_pytorch_model.safetensors")
               for run in ("one", "two")]
    initial = load_file(pipe / "unet" / "diffusion_pytorch_model.safetensors")
    assert sum(float((value - initial[name]).abs().sum()) for name, value in weights[0].items())
    for name, value in weights[0].items():
        if not name.endswith("k_proj.bias"):  # no gradient: moved by Adam's rounding noise
            torch.testing.assert_close(weights[1][name], value, rtol=0, atol=3e-5, msg=name)
    return rows["one"]


@pytest.mark.parametrize("engine", ["ddp", "zero2"])
def test_spo_on_two_processes_equals_one_accumulating_their_shares(tmp_path, engine):
    """Each process samples its prompts' trajectories (seeded per prompt) with its own
    denoiser calls and averages over its kept pairs: one process accumulating the two shares
    as micro-batches gives the same losses, metrics and weights, under DDP and ZeRO-2."""
    rows = prompt_objective_on_one_and_two_processes(
        tmp_path, {"name": "spo", "sampling_steps": 4, "first_step": 1, "pool_size": 3,
                   "guidance_scale": 2.0},
        ["a red circle", "a blue square", "a green triangle", "a yellow circle"],
        ("loss", "rewards/margins", "spo/score_gap", "spo/skipped_ties", "spo/ratio_chosen"),
        zero2_processes if engine == "zero2" else None)
    assert rows[0]["rewards/chosen"] == 0.0  # the first step: policy = reference
    assert rows[1]["rewards/margins"] != 0  # the second step saw a moved policy


def test_spo_refuses_fsdp(tmp_path):
    tree = config_tree(tiny_pipeline(tmp_path / "pipe"), write_prompts(
        tmp_path / "data", ["a red circle", "a blue square"]), tmp_path / "run",
        objective={"name": "spo"})
    done = fsdp2_processes(tree, tmp_path, "spo_fsdp")
    assert done.returncode != 0
    assert ("objective spo samples with the whole denoiser at every step, outside the trained "
            "forward: it runs in one process, under DDP or DeepSpeed ZeRO-1/2") in done.stderr


@pytest.mark.parametrize("engine", ["ddp", "zero2"])
def test_longalign_on_two_processes_equals_one_accumulating_their_shares(tmp_path, engine):
    """Several denoiser calls with gradients per step go through the DDP wrapper (or
    DeepSpeed's engine, ZeRO-2); the text-irrelevant direction comes from all training
    prompts, not the process's batch."""
    rows = prompt_objective_on_one_and_two_processes(
        tmp_path, {"name": "longalign", "reward_model": str(tiny_clip_dir(tmp_path / "clip")),
                   "sampling_steps": 6, "grad_steps": 2, "guidance_scale": 2.0},
        ["a red circle. a blue square", "a blue square", "a green triangle", "a yellow circle"],
        ("loss", "reward/score", "reward/text_relevant", "reward/text_irrelevant", "grad_norm"),
        zero2_processes if engine == "zero2" else None)
    assert rows[1]["loss"] != rows[0]["loss"]
