"""SPO's step-aware preference model: at init it is exactly the CLIP it starts from, its time
conditioning is the adaLN rule computed by hand, its loss is PickScore's, it learns from the
pipeline's guided x̂_0 computed by hand, `preftune diffusion spm` trains, saves and resumes
it, and SPO, `diffusion eval` and `diffusion rank` use it as `spm:PATH`."""

import json
import math
import re

import pytest
import torch
import torch.nn.functional as F
import yaml

pytest.importorskip("diffusers")

from accelerate import Accelerator  # noqa: E402

from diffusion_fixtures import (config_tree, one_thread, tiny_clip_dir,  # noqa: E402, F401
                                tiny_pipeline, tiny_sd3_pipeline, write_pairs, write_prompts)
from preftune.cli import main  # noqa: E402
from preftune.config import ConfigError  # noqa: E402
from preftune.diffusion.step_model import StepAwarePreferenceModel  # noqa: E402
from preftune.diffusion.step_model_train import (StepModelConfig, pickscore_loss,  # noqa: E402
                                                 step_model_task)
from preftune.diffusion.train import shared_noise  # noqa: E402

PROMPTS = ["a red circle", "a blue square"]


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("spm")
    return {"clip": tiny_clip_dir(root / "clip"), "pipe": tiny_pipeline(root / "pipe"),
            "pairs": write_pairs(root / "data", count=6), "root": root}


def clip_pixels(model, images):
    """CLIP's input by hand: [-1, 1] -> [0, 1], bicubic to 16, normalised."""
    x = F.interpolate((images + 1) / 2, size=(16, 16), mode="bicubic",
                      align_corners=False).clamp(0, 1)
    mean = torch.tensor([0.48, 0.46, 0.41]).view(1, 3, 1, 1)
    std = torch.tensor([0.27, 0.26, 0.28]).view(1, 3, 1, 1)
    return (x - mean) / std


def text_features(model, prompts):
    ids = model.tokenizer(prompts, padding="max_length", max_length=8, return_tensors="pt")
    out = model.clip.get_text_features(input_ids=ids.input_ids,
                                       attention_mask=ids.attention_mask)
    return F.normalize(getattr(out, "pooler_output", out), dim=-1)


def test_at_init_it_is_the_clip_it_starts_from(parts):
    model = StepAwarePreferenceModel.from_pretrained(parts["clip"])
    images = torch.rand(2, 3, 24, 24) * 2 - 1
    with torch.no_grad():
        out = model.clip.get_image_features(pixel_values=clip_pixels(model, images))
        image = F.normalize(getattr(out, "pooler_output", out), dim=-1)
        expected = model.clip.logit_scale.exp() * (text_features(model, PROMPTS) * image).sum(-1)
        for t in (0, 500, 999):
            torch.testing.assert_close(model(PROMPTS, images, torch.tensor([t, t])), expected)


def test_time_conditioning_is_the_adaln_rule_computed_by_hand(parts):
    model = StepAwarePreferenceModel.from_pretrained(parts["clip"])
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.time.parameters():
            parameter.copy_(0.2 * torch.randn(parameter.shape, generator=generator))
    images = torch.rand(2, 3, 16, 16, generator=generator) * 2 - 1
    timesteps = torch.tensor([30, 700])
    with torch.no_grad():
        half = 128
        angles = timesteps[:, None].float() * torch.exp(
            -math.log(10000.0) * torch.arange(half) / half)[None]
        embed = model.time.embed(torch.cat([angles.cos(), angles.sin()], dim=-1))
        condition = F.silu(embed)
        vision = model.clip.vision_model
        h = vision.pre_layrnorm(vision.embeddings(clip_pixels(model, images)))
        for layer, modulation in zip(vision.encoder.layers, model.time.layers):
            sa, ca, ga, sm, cm, gm = modulation(condition).chunk(6, dim=-1)
            x = layer.layer_norm1(h) * (1 + ca[:, None]) + sa[:, None]
            h = h + (1 + ga[:, None]) * layer.self_attn(hidden_states=x, attention_mask=None)[0]
            x = layer.layer_norm2(h) * (1 + cm[:, None]) + sm[:, None]
            h = h + (1 + gm[:, None]) * layer.mlp(x)
        shift, scale = model.time.pooled(condition).chunk(2, dim=-1)
        pooled = vision.post_layernorm(h[:, 0]) * (1 + scale) + shift
        image = F.normalize(model.clip.visual_projection(pooled), dim=-1)
        expected = model.clip.logit_scale.exp() * (text_features(model, PROMPTS) * image).sum(-1)
        got = model(PROMPTS, images, timesteps)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        assert (model(PROMPTS, images, torch.tensor([0, 0])) - got).abs().max() > 1e-3


def test_the_loss_is_pickscores_cross_entropy():
    chosen, rejected = torch.tensor([2.0, 1.0, 0.5]), torch.tensor([1.0, 3.0, 0.5])
    labels = torch.tensor([1.0, 1.0, 0.5])
    expected = [-math.log(math.exp(2) / (math.exp(2) + math.exp(1))),
                -math.log(math.exp(1) / (math.exp(1) + math.exp(3))),
                math.log(2)]
    assert pickscore_loss(chosen, rejected, labels).tolist() == pytest.approx(expected)


def spm_tree(parts, output_dir, **sections):
    tree = {"output_dir": str(output_dir), "model": {"path": str(parts["clip"])},
            "pipeline": {"path": str(parts["pipe"])},
            "data": {"train": str(parts["pairs"]), "resolution": 16},
            "train": {"max_steps": 2, "batch_size": 3, "learning_rate": 1e-3}}
    for name, values in sections.items():
        tree.setdefault(name, {}).update(values)
    return tree


def test_it_learns_from_the_pipelines_guided_x0_computed_by_hand(parts, tmp_path):
    task, _ = step_model_task(StepModelConfig.from_dict(spm_tree(parts, tmp_path / "run")),
                              Accelerator())
    batch = task.make_batch(task.train_examples[:3])
    timesteps = torch.tensor([10, 400, 900])
    chosen, rejected, t = task.predicted_images(batch, step=5, timesteps=timesteps)
    pipe = task.pipeline
    noise, _ = shared_noise((3, 16, 16), batch.indices, task.config.train.seed, 5, 1000)
    abar = pipe.scheduler.alphas_cumprod[timesteps].view(-1, 1, 1, 1)

    def ids(texts):
        return pipe.tokenizer(texts, padding="max_length", max_length=8,
                              return_tensors="pt").input_ids

    with torch.no_grad():
        text = pipe.text_encoder(ids(batch.pairs.chosen_text))[0]
        empty = pipe.text_encoder(ids([""] * 3))[0]
        for pixels, got in ((batch.pairs.chosen, chosen), (batch.pairs.rejected, rejected)):
            x_t = abar.sqrt() * pixels + (1 - abar).sqrt() * noise
            eps_c = pipe.denoiser(x_t, timesteps, encoder_hidden_states=text).sample
            eps_u = pipe.denoiser(x_t, timesteps, encoder_hidden_states=empty).sample
            eps = eps_u + 5.0 * (eps_c - eps_u)
            x0 = ((x_t - (1 - abar).sqrt() * eps) / abar.sqrt()).clamp(-1, 1)
            torch.testing.assert_close(got, x0, rtol=1e-4, atol=1e-4)
    assert torch.equal(t, timesteps)
    assert batch.labels.tolist() == [1.0, 1.0, 1.0]


def test_spm_trains_saves_and_serves_spo_eval_and_rank(parts, tmp_path):
    from transformers import CLIPModel

    config = tmp_path / "spm.yaml"
    config.write_text(yaml.safe_dump(spm_tree(
        parts, tmp_path / "run", data={"eval": str(parts["pairs"])},
        train={"eval_every": 2, "log_every": 1})))
    assert main(["diffusion", "spm", str(config)]) == 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert [row["step"] for row in rows if "loss" in row] == [1, 2]
    evaluation = rows[-1]
    for t in (0, 250, 750, 950):
        assert f"eval/rewards/accuracies@t{t}" in evaluation
    assert "eval/rewards/accuracies" in evaluation  # t = 500
    saved = tmp_path / "run" / "model"
    CLIPModel.from_pretrained(saved)  # a plain CLIP directory
    trained = StepAwarePreferenceModel.from_pretrained(saved)
    assert any(p.abs().sum() > 0 for p in trained.time.layers.parameters())  # it moved

    # SPO rates its candidates with it
    spo = config_tree(parts["pipe"], write_prompts(tmp_path / "prompts", PROMPTS),
                      tmp_path / "spo", objective={"name": "spo", "scorer": f"spm:{saved}",
                                                   "sampling_steps": 4, "first_step": 1},
                      train={"max_steps": 1, "batch_size": 2})
    from preftune.diffusion.config import DiffusionConfig
    from preftune.diffusion.step_scorers import step_scorer
    from preftune.diffusion.train import train_diffusion

    scorer = step_scorer(f"spm:{saved}")
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        expected = trained(PROMPTS, images, torch.tensor([250.0, 750.0])).tolist()
    assert scorer.score(PROMPTS, images, [250, 750]) == pytest.approx(expected, abs=1e-5)
    out = train_diffusion(DiffusionConfig.from_dict(spo), show_progress=False)
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").open()] == [1]

    # `diffusion eval` and `rank` score clean images with it (t = 0)
    assert main(["diffusion", "eval", "--model", str(parts["pipe"]), "--reference",
                 str(parts["pipe"]), "--scorer", f"spm:{saved}", "--prompt", PROMPTS[0],
                 "--steps", "2", "--output", str(tmp_path / "eval")]) == 0
    assert json.loads((tmp_path / "eval" / "eval.json").read_text())["win_rate"] == 0.5
    assert main(["diffusion", "rank", "--model", str(parts["pipe"]), "--scorer",
                 f"spm:{saved}", "--prompt", PROMPTS[1], "--seeds", "0,1", "--steps", "2",
                 "--output-dir", str(tmp_path / "ranked")]) == 0
    assert (tmp_path / "ranked" / "ranked.jsonl").is_file()


def test_what_it_cannot_take_is_refused_by_name(parts, tmp_path):
    with pytest.raises(ConfigError, match=r"a flow-matching pipeline \(sd3\); SPO"):
        step_model_task(StepModelConfig.from_dict(spm_tree(
            parts, tmp_path / "a", pipeline={"path": str(tiny_sd3_pipeline(tmp_path / "sd3"))})),
            Accelerator())
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text((parts["clip"] / "config.json").read_text())
    with pytest.raises(ConfigError, match="no preprocessor_config.json; a step-aware"):
        StepAwarePreferenceModel.from_pretrained(bare)
    with pytest.raises(ValueError, match="train.layout applies to language models only and "
                       "does nothing for a step-aware preference model"):
        StepModelConfig.from_dict(spm_tree(parts, tmp_path / "b", train={"layout": "packed"}))
    with pytest.raises(ConfigError, match=re.escape(f"pipeline.path {bare}: no unet/ or ")):
        step_model_task(StepModelConfig.from_dict(spm_tree(
            parts, tmp_path / "c", pipeline={"path": str(bare)})), Accelerator())


def test_a_stopped_run_resumes_to_the_same_losses(parts, tmp_path, monkeypatch):
    from preftune.diffusion import step_model_train
    from preftune.diffusion.step_model_train import train_step_model

    def losses(run):
        return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").open()
                if "loss" in line]

    tree = spm_tree(parts, tmp_path / "whole", train={"max_steps": 4, "save_every": 2,
                                                      "log_every": 1})
    train_step_model(StepModelConfig.from_dict(tree), show_progress=False)
    tree["output_dir"] = str(tmp_path / "stopped")
    original = step_model_train.StepModelTask.losses

    def stop_at_step_2(self, module, batch, step, timesteps=None):
        if step == 2:
            raise KeyboardInterrupt
        return original(self, module, batch, step, timesteps)

    monkeypatch.setattr(step_model_train.StepModelTask, "losses", stop_at_step_2)
    with pytest.raises(KeyboardInterrupt):
        train_step_model(StepModelConfig.from_dict(tree), show_progress=False)
    monkeypatch.setattr(step_model_train.StepModelTask, "losses", original)
    train_step_model(StepModelConfig.from_dict(tree), resume=True, show_progress=False)
    assert len(losses(tmp_path / "whole")) == 4
    assert losses(tmp_path / "stopped") == losses(tmp_path / "whole")


def test_two_processes_train_as_one_with_the_same_global_batch(parts, tmp_path):
    from diffusion_fixtures import on_two_processes

    from preftune.diffusion.step_model_train import train_step_model

    def losses(run):
        return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").open()
                if "loss" in line]

    one = spm_tree(parts, tmp_path / "one", train={"max_steps": 2, "batch_size": 4,
                                                   "log_every": 1})
    one["data"]["train"] = str(write_pairs(tmp_path / "data", count=8))
    train_step_model(StepModelConfig.from_dict(one), show_progress=False)
    two = {**one, "output_dir": str(tmp_path / "two"), "train": {**one["train"], "batch_size": 2}}
    done = on_two_processes("spm", two, tmp_path / "two.yaml")
    assert done.returncode == 0, done.stderr[-3000:]
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=1e-4)
    assert json.loads((tmp_path / "two" / "run.json").read_text())["processes"] == 2


def test_a_hub_id_is_fetched_once_as_a_clip_directory(parts, monkeypatch):
    from preftune.model import hub

    asked = []
    monkeypatch.setattr(hub, "hub_snapshot", lambda repo: asked.append(repo) or
                        str(parts["clip"]))
    model = StepAwarePreferenceModel.from_pretrained("laion/CLIP-ViT-H-14-laion2B-s32B-b79K")
    assert asked == ["laion/CLIP-ViT-H-14-laion2B-s32B-b79K"]
    assert model.size == 16


def test_an_sdxl_pipelines_predictions_train_it(parts, tmp_path):
    """SDXL's pooled text, time ids and zeros as the unconditional input reach x̂_0 too."""
    from diffusion_fixtures import tiny_sdxl_pipeline

    from preftune.diffusion.step_model_train import train_step_model

    tree = spm_tree(parts, tmp_path / "run",
                    pipeline={"path": str(tiny_sdxl_pipeline(tmp_path / "sdxl"))},
                    train={"max_steps": 2, "log_every": 1})
    task, _ = step_model_task(StepModelConfig.from_dict(tree), Accelerator())
    assert task.pipeline.zero_empty_prompt and task.pipeline.text_encoder_2 is not None
    chosen, _, _ = task.predicted_images(task.make_batch(task.train_examples[:2]), step=0)
    assert chosen.shape == (2, 3, 16, 16) and chosen.abs().max() <= 1
    out = train_step_model(StepModelConfig.from_dict({**tree, "output_dir": str(
        tmp_path / "trained")}), show_progress=False)
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").open()] == [1, 2]
