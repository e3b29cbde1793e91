"""LongAlign (decomposed preference optimization): the loss against a hand computation of the
decomposed score (values and gradients), the sentence-level text embedding, the sampler
against diffusers' DDIM scheduler, which calls carry gradients, seeding, a CLI run end to end,
and errors that name the key."""

import json

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("diffusers")

from accelerate import Accelerator  # noqa: E402
from diffusers import DDIMScheduler, UNet2DConditionModel  # noqa: E402
from transformers import AutoTokenizer, CLIPModel  # noqa: E402

from diffusion_fixtures import (config_tree, one_thread,  # noqa: E402, F401
                                tiny_clip_dir, tiny_pipeline, write_prompts)
from preftune.cli import main  # noqa: E402
from preftune.config import ConfigError  # noqa: E402
from preftune.diffusion.config import DiffusionConfig  # noqa: E402
from preftune.diffusion.segments import sentences  # noqa: E402
from preftune.diffusion.losses import DIFFUSION_LOSSES  # noqa: E402
from preftune.diffusion.model import load_diffusion_model  # noqa: E402
from preftune.diffusion.reward_loss import LongAlignParams, RewardEmbeddings  # noqa: E402
from preftune.diffusion.train import diffusion_task  # noqa: E402

PROMPTS = ["a red circle. a blue square", "a green triangle", "a yellow circle; a red square!",
           "a blue circle"]
SMALL = {"sampling_steps": 6, "grad_steps": 2, "guidance_scale": 3.0}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("longalign")
    return (tiny_pipeline(root / "pipe"), write_prompts(root / "data", PROMPTS),
            tiny_clip_dir(root / "clip"))


def tree(files, run, **params):
    pipe, prompts, clip = files
    return config_tree(pipe, prompts, run, objective={
        "name": "longalign", "reward_model": str(clip), **SMALL, **params})


def make_task(files, tmp_path, **params):
    config = DiffusionConfig.from_dict(tree(files, tmp_path / "run", **params))
    return diffusion_task(config, Accelerator())[0]


def test_registered_with_the_papers_defaults():
    spec = DIFFUSION_LOSSES["longalign"]
    assert spec.online == "reward" and not spec.needs_reference
    assert spec.paper == "arXiv:2410.11817"
    assert spec.defaults() == {"reward_model": "", "reweight": 0.3, "sampling_steps": 50,
                               "grad_steps": 5, "guidance_scale": 7.5}


@pytest.mark.parametrize("reweight", [0.3, 1.0, 0.0])
def test_loss_is_the_decomposed_score_by_hand(reweight):
    generator = torch.Generator().manual_seed(0)
    text = F.normalize(torch.randn(3, 8, generator=generator), dim=-1) * 0.9
    direction = F.normalize(torch.randn(8, generator=generator), dim=0)
    image = F.normalize(torch.randn(3, 8, generator=generator), dim=-1).requires_grad_()
    params = LongAlignParams(reweight=reweight)
    output = DIFFUSION_LOSSES["longalign"].fn(RewardEmbeddings(text, image, direction), params)
    output.losses.sum().backward()
    ours = image.grad.clone()
    # by hand: the text split into its part along v and the rest, one sample at a time
    image.grad = None
    expected = []
    for e in range(3):
        along = float(text[e] @ direction)
        rest = text[e] - along * direction
        score = rest @ image[e] + reweight * along * (direction @ image[e])
        expected.append((1 - score) / 2)
    torch.stack(expected).sum().backward()
    torch.testing.assert_close(output.losses, torch.stack(expected).detach())
    torch.testing.assert_close(ours, image.grad)
    if reweight == 1.0:  # the plain score
        torch.testing.assert_close(output.chosen_rewards, (text * image).sum(-1).detach())
    relevant, irrelevant = RewardEmbeddings(text, image.detach(), direction).parts()
    torch.testing.assert_close(relevant + reweight * irrelevant, output.chosen_rewards)


def test_sentences_and_the_prompt_embedding_is_the_mean_of_its_sentences(files, tmp_path):
    assert sentences("A red circle. On a blue square! big; ") == [
        "A red circle.", "On a blue square.", "big."]
    assert sentences("") == [""] and sentences("no stop") == ["no stop."]
    task = make_task(files, tmp_path)
    clip = CLIPModel.from_pretrained(files[2])
    tokenizer = AutoTokenizer.from_pretrained(files[2])

    def unit(texts):
        tokens = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length,
                           truncation=True, return_tensors="pt")
        with torch.no_grad():
            features = clip.get_text_features(**tokens)
        return F.normalize(getattr(features, "pooler_output", features), dim=-1)

    ours = task.reward.text(PROMPTS[:3])
    torch.testing.assert_close(ours[0], unit(["a red circle.", "a blue square."]).mean(0))
    torch.testing.assert_close(ours[1], unit(["a green triangle."])[0])
    torch.testing.assert_close(ours[2], unit(["a yellow circle.", "a red square."]).mean(0))
    # the text-irrelevant direction: the unit mean over the training prompts
    torch.testing.assert_close(task.direction, F.normalize(
        torch.cat([unit(sentences(p)).mean(0, keepdim=True) for p in PROMPTS]).mean(0), dim=0))


def test_sampler_is_ddim_and_only_planned_steps_carry_gradients(files, tmp_path):
    task = make_task(files, tmp_path)
    model = task.module
    batch = task.make_batch(task.train_examples[:3])
    cond, uncond = task.conditions(batch.prompts)
    traced = []

    def call(x, t, c):  # what goes through the trained forward (the DDP wrapper in training)
        traced.append((len(x) // 2, x.requires_grad, torch.is_grad_enabled()))
        return model(x, t, c)

    x0 = task.sample(call, batch, 3, cond, uncond)
    assert x0.requires_grad
    # grad_steps calls of the whole batch, one every 6 // 2 = 3 steps from a seeded phase
    assert [rows for rows, _, _ in traced] == [3, 3] and task.grad_plan(3) in ({0, 3}, {1, 4},
                                                                                {2, 5})
    assert not any(requires for _, requires, _ in traced) and all(on for *_, on in traced)
    assert len({frozenset(task.grad_plan(step)) for step in range(12)}) == 3  # it varies
    # the same trajectories by diffusers' DDIM scheduler (eta 0) with the same noise
    from preftune.diffusion.train import example_generator

    scheduler = DDIMScheduler.from_config(model.scheduler.config)
    scheduler.set_timesteps(6)
    x = torch.stack([torch.randn(model.sample_shape(), generator=example_generator(
        task.config.train.seed, 3, index)) for index in batch.indices])
    with torch.no_grad():
        for t in scheduler.timesteps:
            both = model(torch.cat([x, x]), t.expand(6), type(cond).cat([uncond, cond]))
            free, conditional = both.chunk(2)
            out = scheduler.step(free + 3.0 * (conditional - free), t, x, eta=0.0)
            x = out.prev_sample
    torch.testing.assert_close(x0.detach(), out.pred_original_sample, rtol=1e-4, atol=1e-4)
    # seeded per prompt: the second prompt alone samples the same image
    alone = task.make_batch(task.train_examples[1:2])
    with torch.no_grad():
        single = task.sample(model, alone, 3, *task.conditions(alone.prompts))
    torch.testing.assert_close(single[0], x0[1].detach(), rtol=1e-4, atol=1e-4)
    # the loss backpropagates into the denoiser through the planned steps
    losses, metrics = task.losses(model, batch, 3)
    losses.sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0
               for p in model.denoiser.parameters())
    assert metrics["reward/score"][1] == 3
    torch.testing.assert_close(metrics["reward/text_relevant"][0]
                               + 0.3 * metrics["reward/text_irrelevant"][0],
                               metrics["reward/score"][0], rtol=1e-5, atol=1e-5)


def test_cli_trains_from_prompts_and_the_model_reloads(files, tmp_path):
    config = tmp_path / "longalign.yaml"
    config.write_text(json.dumps(tree(files, tmp_path / "run") | {
        "train": {"max_steps": 2, "batch_size": 2, "learning_rate": 1e-3, "log_every": 1},
        "data": {"train": str(files[1]), "eval_fraction": 0.25, "resolution": 16}}))
    assert main(["diffusion", "train", str(config)]) == 0
    run = tmp_path / "run"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    for key in ("loss", "reward/score", "reward/text_relevant", "reward/text_irrelevant"):
        assert key in rows[-1], key
    assert rows[0]["loss"] == pytest.approx((1 - rows[0]["reward/score"]) / 2, abs=1e-6)
    info = json.loads((run / "run.json").read_text())
    assert (info["objective"], info["online"], info["reference"]) == ("longalign", True, "none")
    reloaded = UNet2DConditionModel.from_pretrained(run / "model" / "unet")
    initial = load_diffusion_model(files[0]).denoiser
    assert any(not torch.equal(a, b) for a, b in zip(reloaded.state_dict().values(),
                                                     initial.state_dict().values()))


def test_bad_input_names_the_key(files, tmp_path):
    with pytest.raises(ConfigError, match="objective.reward_model is required for longalign"):
        make_task(files, tmp_path, reward_model="")
    with pytest.raises(ConfigError, match="objective.grad_steps 7 exceeds"):
        make_task(files, tmp_path, grad_steps=7)
    with pytest.raises(ConfigError, match="objective.reweight"):
        DiffusionConfig.from_dict(tree(files, tmp_path / "r", reweight=1.5))
    with pytest.raises(ConfigError, match="no config.json"):
        make_task(files, tmp_path, reward_model=str(tmp_path))
