"""SDXL-layout pipelines (two text encoders, a UNet whose time embedding takes the pooled text
and the time ids): the conditioning equals diffusers' own SDXL pipeline's, and every objective
path (pairs, ranked lists, online SPO with guidance) trains, samples and saves such a model."""

import json

import pytest
import torch

pytest.importorskip("diffusers")

from diffusion_fixtures import (config_tree, one_thread, tiny_sdxl_pipeline,  # noqa: E402, F401
                                write_pairs, write_prompts)
from preftune.diffusion.config import DiffusionConfig  # noqa: E402
from preftune.diffusion.model import load_diffusion_model  # noqa: E402
from preftune.diffusion.train import train_diffusion  # noqa: E402


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return tiny_sdxl_pipeline(tmp_path_factory.mktemp("sdxl") / "pipe")


def test_conditioning_and_prediction_equal_diffusers_sdxl_pipeline(pipe):
    from diffusers import StableDiffusionXLPipeline

    model = load_diffusion_model(pipe)
    reference = StableDiffusionXLPipeline(
        vae=None, text_encoder=model.text_encoder, text_encoder_2=model.text_encoder_2,
        tokenizer=model.tokenizer, tokenizer_2=model.tokenizer_2, unet=model.denoiser,
        scheduler=model.scheduler, force_zeros_for_empty_prompt=True)
    prompts = ["a red circle", "a blue square"]
    hidden, negative, pooled, negative_pooled = reference.encode_prompt(
        prompts, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True)
    ours = model.encode_prompts(prompts)
    torch.testing.assert_close(ours.hidden, hidden)
    torch.testing.assert_close(ours.pooled, pooled)
    assert ours.hidden.shape == (2, 8, 64) and ours.pooled.shape == (2, 16)
    empty = model.unconditional(2)  # SDXL base: zeros, not the empty prompt's encoding
    assert torch.equal(empty.hidden, negative) and torch.equal(empty.pooled, negative_pooled)
    assert not torch.equal(model.encode_prompts([""]).hidden[0], negative[0])

    x = torch.randn((2, 3, 16, 16), generator=torch.Generator().manual_seed(0))
    timesteps = torch.tensor([10, 700])
    time_ids = reference._get_add_time_ids((16, 16), (0, 0), (16, 16), dtype=hidden.dtype,
                                           text_encoder_projection_dim=16).repeat(2, 1)
    with torch.no_grad():
        expected = model.denoiser(x, timesteps, encoder_hidden_states=hidden, added_cond_kwargs={
            "text_embeds": pooled, "time_ids": time_ids}).sample
        torch.testing.assert_close(model.predict(model.denoiser, x, timesteps, ours), expected)


@pytest.mark.parametrize("objective", ["diffusion_dpo", "rank_dpo", "spo"])
def test_every_objective_path_trains_an_sdxl_pipeline(pipe, tmp_path, objective):
    if objective == "rank_dpo":
        from test_diffusion_ranked import write_ranked

        data = write_ranked(tmp_path / "data")
    elif objective == "spo":
        data = write_prompts(tmp_path / "data", ["a red circle", "a blue square"])
    else:
        data = write_pairs(tmp_path / "data", count=4)
    params = {"sampling_steps": 4, "first_step": 1, "pool_size": 2, "guidance_scale": 2.0} \
        if objective == "spo" else {}
    tree = config_tree(pipe, data, tmp_path / "run", objective={"name": objective, **params},
                       samples={"prompts": ["a red circle"], "seeds": [0], "steps": 3,
                                "guidance_scale": 2.0},
                       train={"max_steps": 2, "batch_size": 2, "log_every": 1})
    out = train_diffusion(DiffusionConfig.from_dict(tree), show_progress=False)
    logged = [json.loads(line) for line in (out / "metrics.jsonl").open()]
    assert [row["step"] for row in logged] == [1, 2]
    assert all(torch.isfinite(torch.tensor(row["loss"])) for row in logged)
    trained = load_diffusion_model(out / "model")
    assert trained.text_encoder_2 is not None and trained.zero_empty_prompt
    before = load_diffusion_model(pipe).denoiser.state_dict()
    assert any(not torch.equal(value, before[name])
               for name, value in trained.denoiser.state_dict().items())
    assert json.loads((out / "samples" / "samples.json").read_text())["grids"] == {
        "before": "before.png", "after": "after.png"}


def test_an_sdxl_unet_without_the_second_encoder_is_refused(pipe, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(pipe, broken)
    shutil.rmtree(broken / "text_encoder_2")
    shutil.rmtree(broken / "tokenizer_2")
    with pytest.raises(Exception, match="SDXL-style .addition_embed_type text_time. but the "
                       "pipeline has no text_encoder_2/ and tokenizer_2/"):
        load_diffusion_model(broken)
