"""Flow-matching (SD3-layout) pipelines: the conditioning and the sampler equal diffusers' own
StableDiffusion3Pipeline's, the training noise and target are the straight path's (checked
through Diffusion-DPO's loss by hand), and the offline objectives train, sample and save one;
SPO, whose DDIM transitions do not exist here, is refused."""

import json

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("diffusers")

from accelerate import Accelerator  # noqa: E402

from diffusion_fixtures import (config_tree, losses_of_a_moved_policy,  # noqa: E402, F401
                                one_thread, tiny_sd3_pipeline, write_pairs, write_prompts)
from preftune.config import ConfigError  # noqa: E402
from preftune.diffusion.config import DiffusionConfig  # noqa: E402
from preftune.diffusion.model import load_diffusion_model  # noqa: E402
from preftune.diffusion.sample import sample_images  # noqa: E402
from preftune.diffusion.train import diffusion_task, train_diffusion  # noqa: E402

PROMPTS = ["a red circle", "a blue square"]


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd3")
    return {"t5": tiny_sd3_pipeline(root / "t5"),
            "no_t5": tiny_sd3_pipeline(root / "no_t5", t5=False)}


def diffusers_pipeline(model):
    from diffusers import StableDiffusion3Pipeline

    return StableDiffusion3Pipeline(
        transformer=model.denoiser, scheduler=model.scheduler, vae=None,
        text_encoder=model.text_encoder, tokenizer=model.tokenizer,
        text_encoder_2=model.text_encoder_2, tokenizer_2=model.tokenizer_2,
        text_encoder_3=model.text_encoder_3, tokenizer_3=model.tokenizer_3)


@pytest.mark.parametrize("kind", ["t5", "no_t5"])
def test_conditioning_and_sampling_equal_diffusers_sd3_pipeline(pipes, kind):
    model = load_diffusion_model(pipes[kind])
    assert model.flow and model.family == "sd3"
    assert (model.text_encoder_3 is None) == (kind == "no_t5")
    reference = diffusers_pipeline(model)
    hidden, negative, pooled, negative_pooled = reference.encode_prompt(
        PROMPTS, PROMPTS, PROMPTS, device="cpu", do_classifier_free_guidance=True)
    ours = model.encode_prompts(PROMPTS)
    torch.testing.assert_close(ours.hidden, hidden)
    torch.testing.assert_close(ours.pooled, pooled)
    assert ours.hidden.shape == (2, 8 + 256, 64) and ours.pooled.shape == (2, 32)
    empty = model.unconditional(2)  # SD3 encodes the empty prompt (no zeros)
    torch.testing.assert_close(empty.hidden, negative)
    torch.testing.assert_close(empty.pooled, negative_pooled)

    # Euler flow sampling with guidance from the same starting noise
    ours = sample_images(model, PROMPTS[:1], [3], steps=4, guidance_scale=2.0)
    noise = torch.randn((3, 16, 16), generator=torch.Generator().manual_seed(3))[None]
    theirs = reference(PROMPTS[0], height=128, width=128, num_inference_steps=4,
                       guidance_scale=2.0, latents=noise, output_type="latent").images
    torch.testing.assert_close(ours, theirs.clamp(-1, 1), rtol=1e-4, atol=1e-5)


def test_diffusion_dpo_on_the_straight_path_matches_a_hand_computation(pipes, tmp_path):
    data = write_pairs(tmp_path / "data", count=3)
    tree = config_tree(pipes["t5"], data, tmp_path / "run",
                       objective={"name": "diffusion_dpo", "beta": 200.0})
    task, _ = diffusion_task(DiffusionConfig.from_dict(tree), Accelerator())
    model = task.module
    losses, noise, steps = losses_of_a_moved_policy(task)  # policy != reference

    reference = diffusers_pipeline(model)
    prompts = [p.prompt for p in task.train_examples]
    hidden, _, pooled, _ = reference.encode_prompt(prompts, prompts, prompts, device="cpu",
                                                   do_classifier_free_guidance=False)
    sigma = model.scheduler.sigmas[steps].view(-1, 1, 1, 1)  # the scheduler's sigma_k
    timestep = model.scheduler.timesteps[steps]  # = 1000 sigma_k

    def error(denoiser, side):
        pixels = torch.stack([image_pixels(f"{p.base_dir}/{getattr(p, side)}")
                              for p in task.train_examples])
        x_t = (1 - sigma) * pixels + sigma * noise
        velocity = denoiser(hidden_states=x_t, timestep=timestep, encoder_hidden_states=hidden,
                            pooled_projections=pooled).sample
        return ((velocity - (noise - pixels)) ** 2).flatten(1).mean(dim=1)

    with torch.no_grad():
        ref = {side: error(task.reference, side) for side in ("chosen", "rejected")}
    inside = -100.0 * ((error(model.denoiser, "chosen") - ref["chosen"])
                       - (error(model.denoiser, "rejected") - ref["rejected"]))
    torch.testing.assert_close(losses, -F.logsigmoid(inside), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(timestep, 1000 * sigma.flatten())


def image_pixels(path):
    import numpy as np
    from PIL import Image

    return torch.tensor(np.asarray(Image.open(path).convert("RGB")),
                        dtype=torch.float32).permute(2, 0, 1) / 127.5 - 1


@pytest.mark.parametrize("objective, lora", [("diffusion_dpo", False), ("rank_dpo", False),
                                             ("mapo", True), ("rank_dpo", True)])
def test_offline_objectives_train_an_sd3_pipeline(pipes, tmp_path, objective, lora):
    if objective == "rank_dpo":
        from test_diffusion_ranked import write_ranked

        data = write_ranked(tmp_path / "data")
    else:
        data = write_pairs(tmp_path / "data", count=4)
    tree = config_tree(pipes["no_t5"], data, tmp_path / "run", objective={"name": objective},
                       samples={"prompts": PROMPTS[:1], "seeds": [0], "steps": 3,
                                "guidance_scale": 2.0},
                       train={"max_steps": 2, "batch_size": 2, "log_every": 1},
                       **({"model": {"lora": {"r": 4, "alpha": 8}}} if lora else {}))
    out = train_diffusion(DiffusionConfig.from_dict(tree), show_progress=False)
    logged = [json.loads(line) for line in (out / "metrics.jsonl").open()]
    assert [row["step"] for row in logged] == [1, 2]
    trained = load_diffusion_model(out / "model")
    assert trained.family == "sd3" and trained.flow
    before = load_diffusion_model(pipes["no_t5"]).denoiser.state_dict()
    assert any(not torch.equal(value, before[name])
               for name, value in trained.denoiser.state_dict().items())
    assert (out / "samples" / "after.png").is_file()


def test_spo_is_refused_on_a_flow_matching_pipeline(pipes, tmp_path):
    tree = config_tree(pipes["no_t5"], write_prompts(tmp_path / "data", PROMPTS),
                       tmp_path / "run", objective={"name": "spo"})
    with pytest.raises(ConfigError, match="objective spo samples DDIM transitions; .* is a "
                       "flow-matching pipeline .sd3."):
        diffusion_task(DiffusionConfig.from_dict(tree), Accelerator())


def test_logit_normal_timesteps_are_drawn_from_each_examples_generator(pipes, tmp_path):
    from preftune.diffusion.train import example_generator

    data = write_pairs(tmp_path / "data", count=4)
    tree = config_tree(pipes["no_t5"], data, tmp_path / "run", objective={"name": "mapo"},
                       train={"timestep_sampling": "logit_normal", "logit_mean": 0.5,
                              "logit_std": 2.0, "seed": 3})
    task, _ = diffusion_task(DiffusionConfig.from_dict(tree), Accelerator())
    batch = task.make_batch(task.train_examples)
    noise, timesteps = task.noise_for(batch, step=7)
    for row, index in enumerate(batch.indices):
        generator = example_generator(3, 7, index)
        z = torch.randn(1, generator=generator, dtype=torch.float64).item()
        expected = int(1000 / (1 + torch.exp(torch.tensor(-(0.5 + 2.0 * z))).item()))
        assert timesteps[row].item() == expected
        assert torch.equal(noise[row], torch.randn((3, 16, 16), generator=generator))

    tree = config_tree(pipes["no_t5"], write_prompts(tmp_path / "prompts", PROMPTS),
                       tmp_path / "spo", objective={"name": "spo"},
                       train={"timestep_sampling": "logit_normal"})
    with pytest.raises(ConfigError, match="train.timestep_sampling: logit_normal draws the "
                       "noise level of pairs and lists; objective spo samples its own"):
        diffusion_task(DiffusionConfig.from_dict(tree), Accelerator())
