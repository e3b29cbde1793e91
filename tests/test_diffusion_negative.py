"""Negative prompts: classifier-free guidance away from a given prompt instead of the empty one,
against a DDIM loop written by hand (SD) and diffusers' FluxPipeline's true CFG (Flux), through
the sample command, and the settings that would do nothing refused by name."""

import json

import pytest
import torch

pytest.importorskip("diffusers")

from diffusers import DDIMScheduler  # noqa: E402

from diffusion_fixtures import (config_tree, one_thread, tiny_flux_pipeline,  # noqa: E402, F401
                                tiny_pipeline, write_pairs)
from preftune.cli import main  # noqa: E402
from preftune.config import ConfigError  # noqa: E402
from preftune.diffusion.config import DiffusionConfig  # noqa: E402
from preftune.diffusion.model import load_diffusion_model  # noqa: E402
from preftune.diffusion.sample import sample_images  # noqa: E402
from preftune.diffusion.train import train_diffusion  # noqa: E402


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    root = tmp_path_factory.mktemp("negative")
    return {"sd": tiny_pipeline(root / "sd"), "flux": tiny_flux_pipeline(root / "flux")}


def test_guidance_steers_away_from_the_negative_prompt(pipes):
    model = load_diffusion_model(pipes["sd"])
    ours = sample_images(model, ["a red circle"], [4], steps=4, guidance_scale=3.0,
                         negative_prompt="a blue square")
    # by hand: DDIM with eps = eps(negative) + 3 (eps(prompt) - eps(negative))
    scheduler = DDIMScheduler.from_config(model.scheduler.config)
    scheduler.set_timesteps(4)
    x = torch.randn((1, 3, 16, 16), generator=torch.Generator().manual_seed(4))
    prompt, negative = (model.encode_prompts([text]) for text in ("a red circle",
                                                                   "a blue square"))
    with torch.no_grad():
        for t in scheduler.timesteps:
            away = model.predict(model.denoiser, x, t.expand(1), negative)
            toward = model.predict(model.denoiser, x, t.expand(1), prompt)
            x = scheduler.step(away + 3.0 * (toward - away), t, x).prev_sample
    # (ours runs both prompts in one batch: its rounding differs by the CPU's kernels, and
    # four steps grow it to ~3e-5 on some)
    torch.testing.assert_close(ours, x.clamp(-1, 1), rtol=1e-4, atol=1e-4)
    empty = sample_images(model, ["a red circle"], [4], steps=4, guidance_scale=3.0)
    assert (empty - ours).abs().max() > 1e-3  # the negative prompt is used


def test_flux_true_cfg_equals_diffusers_flux_pipeline(pipes):
    from diffusers import FluxPipeline

    model = load_diffusion_model(pipes["flux"])
    reference = FluxPipeline(transformer=model.denoiser, scheduler=model.scheduler, vae=None,
                             text_encoder=model.text_encoder, tokenizer=model.tokenizer,
                             text_encoder_2=model.text_encoder_2, tokenizer_2=model.tokenizer_2)
    ours = sample_images(model, ["a red circle"], [3], steps=3, guidance_scale=3.5,
                         resolution=16, negative_prompt="a blue square", true_cfg_scale=2.0)
    noise = torch.randn((3, 16, 16), generator=torch.Generator().manual_seed(3))[None]
    theirs = reference("a red circle", negative_prompt="a blue square", true_cfg_scale=2.0,
                       height=128, width=128, num_inference_steps=3, guidance_scale=3.5,
                       latents=FluxPipeline._pack_latents(noise, 1, 3, 16, 16),
                       output_type="latent").images
    theirs = FluxPipeline._unpack_latents(theirs, 128, 128, 8)
    torch.testing.assert_close(ours, theirs.clamp(-1, 1), rtol=1e-4, atol=1e-5)
    plain = sample_images(model, ["a red circle"], [3], steps=3, guidance_scale=3.5,
                          resolution=16)
    assert (plain - ours).abs().max() > 1e-3


def test_settings_that_would_do_nothing_are_refused(pipes, tmp_path):
    sd, flux = (load_diffusion_model(pipes[kind]) for kind in ("sd", "flux"))
    with pytest.raises(ConfigError, match="negative prompt 'a blue square' does nothing "
                                          "without classifier-free guidance"):
        sample_images(sd, ["a red circle"], [0], steps=2, negative_prompt="a blue square")
    with pytest.raises(ConfigError, match="true CFG scale 2.0: only Flux takes it"):
        sample_images(sd, ["a red circle"], [0], steps=2, guidance_scale=3.0,
                      true_cfg_scale=2.0)
    with pytest.raises(ConfigError, match=r"\(Flux: a true CFG scale above 1\)"):
        sample_images(flux, ["a red circle"], [0], steps=2, guidance_scale=3.5,
                      resolution=16, negative_prompt="a blue square")
    tree = config_tree(pipes["sd"], write_pairs(tmp_path / "data", count=2), tmp_path / "run",
                       samples={"prompts": ["a red circle"], "negative_prompt": "a blue square"})
    with pytest.raises(ConfigError, match="samples.negative_prompt 'a blue square' does "
                                          "nothing without"):
        train_diffusion(DiffusionConfig.from_dict(tree), show_progress=False)
    assert not (tmp_path / "run").exists()  # made by the run, nothing written: removed


def test_commands_refuse_a_negative_prompt_without_guidance_by_flag_before_writing(
        pipes, tmp_path, capsys):
    from preftune.diffusion.online import DiffusionOnlineConfig, run_diffusion_online

    nothing = ["--prompt", "a red circle", "--seeds", "0,1", "--steps", "1", "--negative-prompt",
               "a blue square"]
    commands = {
        "sample": ["--model", str(pipes["sd"]), "--output-dir", str(tmp_path / "sample")],
        "rank": ["--model", str(pipes["sd"]), "--scorer", "shape_colour", "--output-dir",
                 str(tmp_path / "rank")],
        "eval": ["--model", str(pipes["sd"]), "--reference", str(pipes["sd"]), "--scorer",
                 "shape_colour", "--output", str(tmp_path / "eval")]}
    for name, arguments in commands.items():
        assert main(["diffusion", name, *arguments, *nothing]) == 2
        assert ("error: --negative-prompt 'a blue square' does nothing without classifier-free"
                in capsys.readouterr().err)
        assert not (tmp_path / name).exists()
    assert main(["diffusion", "sample", *commands["sample"], *nothing[:-2], "--guidance-scale",
                 "3", "--true-cfg-scale", "2"]) == 2
    assert "error: --true-cfg-scale 2.0: only Flux takes it" in capsys.readouterr().err
    tree = config_tree(pipes["sd"], write_pairs(tmp_path / "data", count=2), tmp_path / "online",
                       objective={"name": "rank_dpo"},
                       online={"negative_prompt": "a blue square", "rounds": 1, "steps": 1})
    with pytest.raises(ConfigError, match="online.negative_prompt 'a blue square' does nothing"):
        run_diffusion_online(DiffusionOnlineConfig.from_dict(tree), show_progress=False)
    assert not (tmp_path / "online").exists()


def test_online_refuses_a_negative_prompt_for_a_hub_pipeline_id_from_its_configs_alone(
        pipes, tmp_path, monkeypatch):
    from preftune.diffusion.online import DiffusionOnlineConfig, run_diffusion_online
    from test_hub_models import fake_hub

    calls = fake_hub(monkeypatch, tmp_path / "snapshot",
                     {path.relative_to(pipes["sd"]).as_posix(): path.read_bytes()
                      for path in pipes["sd"].rglob("*") if path.is_file()})
    tree = config_tree("org/tiny-sd", write_pairs(tmp_path / "data", count=2), tmp_path / "online",
                       objective={"name": "rank_dpo"},
                       online={"negative_prompt": "a blue square", "rounds": 1, "steps": 1})
    with pytest.raises(ConfigError, match="online.negative_prompt 'a blue square' does nothing"):
        run_diffusion_online(DiffusionOnlineConfig.from_dict(tree), show_progress=False)
    assert not (tmp_path / "online").exists()
    weights = [name for name in sorted(calls[0]) if name.endswith(".safetensors")]
    assert len(calls) == 1 and "unet/config.json" in calls[0] and not weights  # configs only


def test_the_sample_command_takes_a_negative_prompt(pipes, tmp_path, capsys):
    out = tmp_path / "samples"
    assert main(["diffusion", "sample", "--model", str(pipes["sd"]), "--prompt",
                 "a red circle", "--seeds", "4", "--steps", "4", "--guidance-scale", "3",
                 "--negative-prompt", "a blue square", "--output-dir", str(out)]) == 0
    index = json.loads((out / "samples" / "samples.json").read_text())
    assert index["negative_prompt"] == "a blue square" and index["true_cfg_scale"] == 1.0
    from PIL import Image

    from preftune.diffusion.data import tensor_image

    expected = sample_images(load_diffusion_model(pipes["sd"]), ["a red circle"], [4], steps=4,
                             guidance_scale=3.0, negative_prompt="a blue square")[0]
    written = Image.open(next((out / "samples").glob("*/p00_s4.png")))
    assert written.tobytes() == tensor_image(expected).tobytes()
    again = ["diffusion", "sample", "--model", str(pipes["sd"]), "--prompt", "a red circle",
             "--seeds", "5", "--steps", "4", "--output-dir", str(out)]
    assert main(again) == 2  # one samples/ folder, one set of prompts and seeds
    assert "already has grid 'samples'" in capsys.readouterr().err
    assert main(again + ["--label", "other"]) == 2
    assert "grids sampled with other guidance_scale, negative_prompt, seeds" in \
        capsys.readouterr().err
    for label in ("", "../../escape", "a/b", ".."):  # a file name under samples/, no path
        assert main(again + ["--label", label]) == 2
        assert f"--label {label!r}: the grid is written as samples/<label>.png" in \
            capsys.readouterr().err
    assert not list(tmp_path.rglob("escape*")) and not (out / "samples" / "a").exists()
    assert main(again + ["--overwrite"]) == 0
    assert json.loads((out / "samples" / "samples.json").read_text())["seeds"] == [5]
    assert len(list(out.glob("samples.old-*/samples/p00_s4.png"))) == 1
    evaluated = tmp_path / "eval"
    assert main(["diffusion", "eval", "--model", str(pipes["sd"]), "--reference",
                 str(pipes["sd"]), "--prompt", "a red circle", "--seeds", "4", "--steps", "4",
                 "--guidance-scale", "3", "--negative-prompt", "a blue square", "--scorer",
                 "shape_colour", "--output", str(evaluated)]) == 0
    results = json.loads((evaluated / "eval.json").read_text())
    assert results["negative_prompt"] == "a blue square" and results["win_rate"] == 0.5
    assert main(["diffusion", "eval", "--model", str(pipes["sd"]), "--reference",
                 str(pipes["sd"]), "--prompt", "a red circle", "--seeds", "4", "--steps", "1",
                 "--scorer", "shape_colour", "--output", str(tmp_path / "named.json")]) == 0
    assert json.loads((tmp_path / "named.json").read_text())["prompts"] == ["a red circle"]


@pytest.mark.parametrize("kind", ["sd", "flux"])
def test_images_sampled_in_batches_are_those_sampled_at_once(pipes, kind):
    """``batch_size`` splits the rows, each batch with a scheduler of its own (Flux's counts
    its steps): every image is the one sampled with all rows together, its noise seeded by its
    seed alone (up to the rounding of matrix products of another batch size). The last batch
    is short."""
    model = load_diffusion_model(pipes[kind])
    guidance = {"guidance_scale": 3.0, "negative_prompt": "a blue square"} if kind == "sd" \
        else {"guidance_scale": 3.5, "true_cfg_scale": 2.0, "negative_prompt": "a blue square"}
    prompts, seeds = ["a red circle", "a green square", "a blue triangle"], [0, 1]
    together = sample_images(model, prompts, seeds, steps=3, resolution=16, **guidance)
    batched = sample_images(model, prompts, seeds, steps=3, resolution=16, batch_size=4,
                            **guidance)
    assert together.shape[0] == 6
    torch.testing.assert_close(batched, together, rtol=0, atol=1e-4)
