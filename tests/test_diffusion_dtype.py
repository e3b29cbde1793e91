"""Denoisers loaded in bfloat16 (``model.dtype``) train and sample: noise, targets and errors
stay fp32 while the denoiser gets its inputs in its own dtype, for pixel-space, latent, SDXL,
SD3 and Flux pipelines; the numbers are the fp32 run's up to bf16 rounding."""

import json

import pytest
import torch

pytest.importorskip("diffusers")

from diffusion_fixtures import (config_tree, one_thread, tiny_flux_pipeline,  # noqa: E402, F401
                                tiny_latent_pipeline, tiny_pipeline, tiny_sd3_pipeline,
                                tiny_sdxl_pipeline, write_pairs)
from preftune.diffusion.config import DiffusionConfig  # noqa: E402
from preftune.diffusion.model import load_diffusion_model  # noqa: E402
from preftune.diffusion.train import train_diffusion  # noqa: E402

PIPELINES = {"pixel": tiny_pipeline, "latent": tiny_latent_pipeline, "sdxl": tiny_sdxl_pipeline,
             "sd3": tiny_sd3_pipeline, "flux": tiny_flux_pipeline}


@pytest.mark.parametrize("kind", sorted(PIPELINES))
def test_bfloat16_weights_train_and_sample_like_float32(tmp_path, kind):
    pipe = PIPELINES[kind](tmp_path / "pipe")
    data = write_pairs(tmp_path / "data", count=4)
    losses = {}
    for dtype in ("float32", "bfloat16"):
        tree = config_tree(pipe, data, tmp_path / dtype, model={"dtype": dtype},
                           objective={"name": "mapo"},  # no reference: the errors themselves
                           samples={"prompts": ["a red circle"], "seeds": [0], "steps": 2,
                                    "guidance_scale": 2.0, "resolution": 16},
                           train={"max_steps": 2, "batch_size": 2, "log_every": 1})
        out = train_diffusion(DiffusionConfig.from_dict(tree), show_progress=False)
        losses[dtype] = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").open()]
        assert (out / "samples" / "after.png").is_file()
    assert losses["bfloat16"][0] == pytest.approx(losses["float32"][0], rel=3e-2)
    trained = load_diffusion_model(tmp_path / "bfloat16" / "model", torch.bfloat16)
    assert trained.compute_dtype == torch.bfloat16
    assert {p.dtype for p in trained.denoiser.parameters()} == {torch.bfloat16}


def test_sampling_commands_load_a_pipeline_as_its_denoiser_is_saved(tmp_path):
    """``diffusion eval`` (and sample, rank, an online round's ranking and evaluation) load
    the pipeline in ``--dtype``, by default its denoiser's saved dtype; eval's reference
    follows the policy's."""
    from preftune.cli import main
    from preftune.diffusion.pipeline_files import saved_denoiser_dtype

    pipe = tiny_pipeline(tmp_path / "pipe")
    tree = config_tree(pipe, write_pairs(tmp_path / "data", count=2), tmp_path / "run",
                       model={"dtype": "bfloat16"}, objective={"name": "mapo"},
                       train={"max_steps": 1, "batch_size": 2})
    run = train_diffusion(DiffusionConfig.from_dict(tree), show_progress=False)
    assert (saved_denoiser_dtype(pipe), saved_denoiser_dtype(run / "model")) == \
        ("float32", "bfloat16")
    flags = ["--reference", str(pipe), "--scorer", "shape_colour", "--prompt", "a red circle",
             "--seeds", "0", "--steps", "2"]
    for given, expected in (([], "bfloat16"), (["--dtype", "float32"], "float32")):
        assert main(["diffusion", "eval", "--model", str(run), *flags, *given,
                     "--output", str(tmp_path / "eval.json")]) == 0
        assert json.loads((tmp_path / "eval.json").read_text())["dtype"] == expected


def test_diffusion_eval_holds_one_pipeline_at_a_time(tmp_path, monkeypatch):
    """The policy samples and is released (even from a reference cycle, with the collector
    off) before the reference loads."""
    import gc
    import weakref

    from preftune.cli import main
    from preftune.diffusion import evaluate as module

    held, alive = [], []
    load = module.load_for_sampling

    def cyclic(*args):
        alive.append(sum(ref() is not None for ref in held))
        model = load(*args)
        model.__dict__["cycle"] = [model]
        held.append(weakref.ref(model))
        return model

    monkeypatch.setattr(module, "load_for_sampling", cyclic)
    pipe = tiny_pipeline(tmp_path / "pipe")
    gc.collect()
    gc.disable()
    try:
        assert main(["diffusion", "eval", "--model", str(pipe), "--reference", str(pipe),
                     "--scorer", "shape_colour", "--prompt", "a red circle", "--seeds", "0",
                     "--steps", "2", "--output", str(tmp_path / "eval.json")]) == 0
    finally:
        gc.enable()
    assert len(held) == 2 and alive == [0, 0]
    assert json.loads((tmp_path / "eval.json").read_text())["win_rate"] == 0.5
