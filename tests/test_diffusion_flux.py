"""Flux pipelines: the conditioning and the sampler equal diffusers' own FluxPipeline's (pixel
space with a guidance input, and through a VAE without one), Diffusion-DPO's loss equals a hand
computation on diffusers' packed latents, the offline objectives train, sample and save a
pipeline diffusers loads, and settings Flux cannot take are refused by name."""

import json

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("diffusers")

from accelerate import Accelerator  # noqa: E402

from diffusion_fixtures import (config_tree, losses_of_a_moved_policy,  # noqa: E402, F401
                                one_thread, tiny_flux_pipeline, tiny_pipeline, write_pairs,
                                write_prompts)
from preftune.config import ConfigError  # noqa: E402
from preftune.diffusion.config import DiffusionConfig  # noqa: E402
from preftune.diffusion.flux import pack, unpack  # noqa: E402
from preftune.diffusion.model import load_diffusion_model  # noqa: E402
from preftune.diffusion.sample import sample_images  # noqa: E402
from preftune.diffusion.train import diffusion_task, train_diffusion  # noqa: E402
from test_diffusion_sd3 import image_pixels  # noqa: E402

PROMPTS = ["a red circle", "a blue square"]


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    root = tmp_path_factory.mktemp("flux")
    return {"dev": tiny_flux_pipeline(root / "dev"),
            "schnell_vae": tiny_flux_pipeline(root / "schnell_vae", guidance=False, vae=True)}


def diffusers_pipeline(model):
    from diffusers import FluxPipeline

    return FluxPipeline(transformer=model.denoiser, scheduler=model.scheduler, vae=model.vae,
                        text_encoder=model.text_encoder, tokenizer=model.tokenizer,
                        text_encoder_2=model.text_encoder_2, tokenizer_2=model.tokenizer_2)


def test_pack_is_diffusers_packing_and_unpack_its_inverse():
    from diffusers import FluxPipeline

    x = torch.randn(2, 3, 6, 4)
    torch.testing.assert_close(pack(x), FluxPipeline._pack_latents(x, 2, 3, 6, 4), rtol=0, atol=0)
    assert torch.equal(unpack(pack(x), 6, 4), x)


def test_conditioning_and_guided_sampling_equal_diffusers_flux_pipeline(pipes):
    from diffusers import FluxPipeline

    model = load_diffusion_model(pipes["dev"])
    assert model.family == "flux" and model.flow and model.vae is None
    reference = diffusers_pipeline(model)
    hidden, pooled, _ = reference.encode_prompt(PROMPTS, PROMPTS, device="cpu")
    ours = model.encode_prompts(PROMPTS)
    torch.testing.assert_close(ours.hidden, hidden)
    torch.testing.assert_close(ours.pooled, pooled)
    assert ours.hidden.shape == (2, 512, 32) and ours.pooled.shape == (2, 32)

    # the guidance scale goes into the transformer (no classifier-free guidance), from the
    # same starting noise; FluxPipeline assumes an 8x VAE: 128 pixels are 16 samples
    ours = sample_images(model, PROMPTS[:1], [3], steps=4, guidance_scale=3.5, resolution=16)
    noise = torch.randn((3, 16, 16), generator=torch.Generator().manual_seed(3))[None]
    theirs = reference(PROMPTS[0], height=128, width=128, num_inference_steps=4,
                       guidance_scale=3.5, latents=FluxPipeline._pack_latents(noise, 1, 3, 16, 16),
                       output_type="latent").images
    theirs = FluxPipeline._unpack_latents(theirs, 128, 128, 8)
    torch.testing.assert_close(ours, theirs.clamp(-1, 1), rtol=1e-4, atol=1e-5)
    weaker = sample_images(model, PROMPTS[:1], [3], steps=4, guidance_scale=1.0, resolution=16)
    assert (weaker - ours).abs().max() > 1e-3  # the guidance input is used


def test_sampling_through_a_vae_equals_diffusers_flux_pipeline(pipes):
    from diffusers import FluxPipeline

    model = load_diffusion_model(pipes["schnell_vae"])
    assert model.pixels_per_sample == 2 and model.sample_shape(16) == (4, 8, 8)
    ours = sample_images(model, PROMPTS[1:], [5], steps=3, resolution=16)
    noise = torch.randn((4, 8, 8), generator=torch.Generator().manual_seed(5))[None]
    theirs = diffusers_pipeline(model)(
        PROMPTS[1], height=16, width=16, num_inference_steps=3, guidance_scale=1.0,
        latents=FluxPipeline._pack_latents(noise, 1, 4, 8, 8), output_type="pt").images
    assert ours.shape == theirs.shape == (1, 3, 16, 16)
    torch.testing.assert_close((ours + 1) / 2, theirs, rtol=1e-4, atol=1e-5)
    with pytest.raises(ConfigError, match="guidance scale 3.5: this Flux transformer has no "
                       "guidance input"):
        sample_images(model, PROMPTS[1:], [5], steps=3, guidance_scale=3.5, resolution=16)


def test_diffusion_dpo_on_packed_latents_matches_a_hand_computation(pipes, tmp_path):
    from diffusers import FluxPipeline

    data = write_pairs(tmp_path / "data", count=3)
    tree = config_tree(pipes["dev"], data, tmp_path / "run", model={"guidance": 2.0},
                       objective={"name": "diffusion_dpo", "beta": 200.0})
    task, _ = diffusion_task(DiffusionConfig.from_dict(tree), Accelerator())
    model = task.module
    assert model.train_guidance == 2.0
    losses, noise, steps = losses_of_a_moved_policy(task)  # policy != reference

    prompts = [p.prompt for p in task.train_examples]
    hidden, pooled, text_ids = diffusers_pipeline(model).encode_prompt(prompts, prompts,
                                                                       device="cpu")
    sigma = model.scheduler.sigmas[steps].view(-1, 1, 1, 1)
    timestep = model.scheduler.timesteps[steps]
    image_ids = FluxPipeline._prepare_latent_image_ids(3, 8, 8, "cpu", torch.float32)

    def error(denoiser, side, guidance=2.0):
        pixels = torch.stack([image_pixels(f"{p.base_dir}/{getattr(p, side)}")
                              for p in task.train_examples])
        x_t = FluxPipeline._pack_latents((1 - sigma) * pixels + sigma * noise, 3, 3, 16, 16)
        velocity = denoiser(hidden_states=x_t, timestep=timestep / 1000,
                            guidance=torch.full((3,), guidance), pooled_projections=pooled,
                            encoder_hidden_states=hidden, txt_ids=text_ids,
                            img_ids=image_ids).sample
        target = FluxPipeline._pack_latents(noise - pixels, 3, 3, 16, 16)
        return ((velocity - target) ** 2).flatten(1).mean(dim=1)

    with torch.no_grad():
        ref = {side: error(task.reference, side) for side in ("chosen", "rejected")}
    inside = -100.0 * ((error(model.denoiser, "chosen") - ref["chosen"])
                       - (error(model.denoiser, "rejected") - ref["rejected"]))
    torch.testing.assert_close(losses, -F.logsigmoid(inside), rtol=1e-4, atol=1e-5)
    with torch.no_grad():  # the guidance given while training is the configured 2.0
        assert (error(model.denoiser, "chosen", 3.5) - error(model.denoiser, "chosen")
                ).abs().max() > 1e-4


@pytest.mark.parametrize("kind, objective, lora", [("dev", "diffusion_dpo", False),
                                                   ("dev", "mapo", True),
                                                   ("schnell_vae", "rank_dpo", True)])
def test_offline_objectives_train_a_flux_pipeline_diffusers_loads(pipes, tmp_path, kind,
                                                                    objective, lora):
    from diffusers import FluxPipeline

    if objective == "rank_dpo":
        from test_diffusion_ranked import write_ranked

        data = write_ranked(tmp_path / "data")
    else:
        data = write_pairs(tmp_path / "data", count=4)
    tree = config_tree(pipes[kind], data, tmp_path / "run", objective={"name": objective},
                       samples={"prompts": PROMPTS[:1], "seeds": [0], "steps": 3,
                                "resolution": 16,
                                "guidance_scale": 3.5 if kind == "dev" else 1.0},
                       train={"max_steps": 2, "batch_size": 2, "log_every": 1},
                       **({"model": {"lora": {"r": 4, "alpha": 8}}} if lora else {}))
    out = train_diffusion(DiffusionConfig.from_dict(tree), show_progress=False)
    logged = [json.loads(line) for line in (out / "metrics.jsonl").open()]
    assert [row["step"] for row in logged] == [1, 2]
    trained = load_diffusion_model(out / "model")
    assert trained.family == "flux"
    before = load_diffusion_model(pipes[kind]).denoiser.state_dict()
    assert any(not torch.equal(value, before[name])
               for name, value in trained.denoiser.state_dict().items())
    assert (out / "model" / "unet_lora").is_dir() == lora
    assert (out / "samples" / "after.png").is_file()
    assert json.loads((out / "samples" / "samples.json").read_text())["resolution"] == 16
    # any diffusers user loads it (a pixel-space one without its vae)
    pipeline = FluxPipeline.from_pretrained(out / "model", **({"vae": None} if kind == "dev"
                                                              else {}))
    for name, value in pipeline.transformer.state_dict().items():
        assert torch.equal(value, trained.denoiser.state_dict()[name])


def test_settings_flux_cannot_take_are_refused_by_name(pipes, tmp_path):
    data = write_pairs(tmp_path / "data", count=2)

    def task(pipe, **sections):
        tree = config_tree(pipe, data, tmp_path / "run", **sections)
        return diffusion_task(DiffusionConfig.from_dict(tree), Accelerator())

    with pytest.raises(ConfigError, match="data.resolution 15: a Flux transformer packs 2x2 "
                       r"patches of 1x1-pixel samples, so the side must be a multiple of 2 "):
        task(pipes["dev"], data={"resolution": 15})
    with pytest.raises(ConfigError, match="data.resolution 18: .* 2x2-pixel samples, .* "
                       r"multiple of 4 \(e.g. 16\)"):
        task(pipes["schnell_vae"], data={"resolution": 18})
    for pipe in (pipes["schnell_vae"], tiny_pipeline(tmp_path / "sd")):
        with pytest.raises(ConfigError, match="model.guidance 2.0: .* takes no guidance input"):
            task(pipe, model={"guidance": 2.0}, data={"resolution": 16})
    with pytest.raises(ConfigError, match="samples.guidance_scale 3.5: this Flux transformer "
                       "has no guidance input"):
        task(pipes["schnell_vae"], data={"resolution": 16},
             samples={"prompts": PROMPTS, "guidance_scale": 3.5})
    with pytest.raises(ConfigError, match="samples.resolution 18: .* multiple of 4"):
        task(pipes["schnell_vae"], data={"resolution": 16},
             samples={"prompts": PROMPTS, "resolution": 18})
    tree = config_tree(pipes["dev"], write_prompts(tmp_path / "prompts", PROMPTS),
                       tmp_path / "spo", objective={"name": "spo"})
    with pytest.raises(ConfigError, match=r"objective spo samples DDIM transitions; .* is a "
                       r"flow-matching pipeline \(flux\)"):
        diffusion_task(DiffusionConfig.from_dict(tree), Accelerator())


def test_sample_eval_and_rank_commands_take_a_resolution(pipes, tmp_path):
    from PIL import Image

    from preftune.cli import main

    common = ["--prompt", PROMPTS[0], "--seeds", "0,1", "--steps", "2", "--resolution", "16",
              "--guidance-scale", "3.5"]
    assert main(["diffusion", "sample", "--model", str(pipes["dev"]),
                 "--output-dir", str(tmp_path), *common]) == 0
    assert Image.open(tmp_path / "samples" / "samples" / "p00_s0.png").size == (16, 16)
    expected = sample_images(load_diffusion_model(pipes["dev"]), PROMPTS[:1], [1], steps=2,
                             guidance_scale=3.5, resolution=16)
    saved = image_pixels(tmp_path / "samples" / "samples" / "p00_s1.png")
    torch.testing.assert_close(saved[None], expected, rtol=0, atol=1 / 127.5)
    assert main(["diffusion", "eval", "--model", str(pipes["dev"]), "--reference",
                 str(pipes["dev"]), "--scorer", "shape_colour",
                 "--output", str(tmp_path / "eval"), *common]) == 0
    assert json.loads((tmp_path / "eval" / "eval.json").read_text())["win_rate"] == 0.5
    assert main(["diffusion", "rank", "--model", str(pipes["dev"]), "--scorer", "shape_colour",
                 "--output-dir", str(tmp_path / "ranked"), *common]) == 0
    ranked = json.loads((tmp_path / "ranked" / "ranked.jsonl").read_text().splitlines()[0])
    assert [Image.open(tmp_path / "ranked" / path).size for path in ranked["images"]] == \
        [(16, 16), (16, 16)]
