"""Training end to end on a tiny denoiser: the saved pipeline reloads in diffusers and
denoises exactly as the trained model; LoRA's merged save equals the adapted model; the CLI,
the report's sample grids, eval win rates and the quick demo."""

import json
import os
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")

from diffusers import UNet2DConditionModel  # noqa: E402

from diffusion_fixtures import (config_tree, one_thread, tiny_latent_pipeline,  # noqa: E402, F401
                                tiny_pipeline,
                                write_pairs)
from forked_python import run_python  # noqa: E402
from preftune.cli import main  # noqa: E402
from preftune.diffusion.config import DiffusionConfig  # noqa: E402
from preftune.diffusion.model import load_diffusion_model  # noqa: E402
from preftune.diffusion.train import train_diffusion  # noqa: E402


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("diffusion_train")
    return tiny_pipeline(root / "pipe"), write_pairs(root / "data", count=4)


def denoise(unet, seed=3):
    generator = torch.Generator().manual_seed(seed)
    x_t = torch.randn((2, 3, 16, 16), generator=generator)
    condition = torch.randn((2, 8, 32), generator=generator)
    with torch.no_grad():
        return unet(x_t, torch.tensor([5, 700]), encoder_hidden_states=condition).sample


def trained(files, tmp_path, **sections):
    config = DiffusionConfig.from_dict(config_tree(*files, tmp_path / "run", **sections))
    output = train_diffusion(config, show_progress=False)
    return output, load_diffusion_model(files[0])


def test_a_denoisers_dropout_is_off_unless_kept(files, tmp_path):
    """(A denoiser with dropout trained with it on against a reference without: step 1's
    loss was 8.8, not log 2, and train.keep_dropout changed nothing.)"""
    import shutil

    pipe = tmp_path / "dropout-pipe"
    shutil.copytree(files[0], pipe)
    unet_config = json.loads((pipe / "unet" / "config.json").read_text())
    (pipe / "unet" / "config.json").write_text(json.dumps({**unet_config, "dropout": 0.5}))
    first = {}
    for keep in (False, True):
        config = DiffusionConfig.from_dict(config_tree(
            pipe, files[1], tmp_path / f"run-{keep}",
            train={"max_steps": 1, "keep_dropout": keep}))
        output = train_diffusion(config, show_progress=False)
        first[keep] = json.loads((output / "metrics.jsonl").read_text().splitlines()[0])["loss"]
    assert first[False] == pytest.approx(0.6931472, abs=1e-6)
    assert first[True] != pytest.approx(0.6931472, abs=1e-3)


def test_saved_denoiser_reloads_in_diffusers_and_denoises_identically(files, tmp_path):
    output, initial = trained(files, tmp_path, data={"eval_fraction": 0.25},
                              train={"max_steps": 3, "learning_rate": 1e-3, "eval_every": 3})
    reloaded = UNet2DConditionModel.from_pretrained(output / "model" / "unet")
    # the run's own model after training, rebuilt from its checkpoint-free save
    trained_model = load_diffusion_model(output / "model")
    torch.testing.assert_close(denoise(reloaded), denoise(trained_model.denoiser), rtol=0, atol=0)
    assert not torch.allclose(denoise(reloaded), denoise(initial.denoiser))  # it trained
    metrics = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert metrics[0]["rewards/margins"] == 0.0 and metrics[0]["loss"] == pytest.approx(
        0.6931472, abs=1e-6)  # step 1: policy == reference, loss log 2
    info = json.loads((output / "run.json").read_text())
    assert (info["reference"], info["train_examples"], info["eval_examples"]) == ("live", 3, 1)
    assert "eval/rewards/accuracies" in metrics[-1] and "eval/loss" not in metrics[0]
    for part in ("text_encoder", "tokenizer", "scheduler"):
        assert (output / "model" / part).is_dir()


def test_lora_targets_that_name_no_layer_of_the_denoiser_are_refused(files):
    from preftune.config import ConfigError
    from preftune.diffusion.model import attach_lora

    config = DiffusionConfig.from_dict(config_tree(*files, Path("unused"), model={
        "lora": {"r": 4, "target_modules": ["to_qq"]}}))
    with pytest.raises(ConfigError, match=r"model.lora.target_modules: 'to_qq' names no module "
                                          r"of UNet2DConditionModel; its linear layers are "
                                          r"called .*to_q"):
        attach_lora(load_diffusion_model(files[0]), config.model.lora)


@pytest.mark.parametrize("dora", [False, True])
def test_lora_merged_save_denoises_like_the_adapted_model(files, tmp_path, dora):
    pytest.importorskip("peft")
    output, initial = trained(files, tmp_path, model={"lora": {"r": 4, "alpha": 8,
                                                               "dora": dora}},
                              train={"max_steps": 2, "learning_rate": 1e-2})
    merged = UNet2DConditionModel.from_pretrained(output / "model" / "unet")
    adapted = load_diffusion_model(files[0]).denoiser
    adapted.load_lora_adapter(str(output / "model" / "unet_lora"), prefix=None,
                              weight_name="pytorch_lora_weights.safetensors")
    torch.testing.assert_close(denoise(merged), denoise(adapted), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(denoise(merged), denoise(initial.denoiser), atol=1e-4)


def test_cli_train_report_inspect_and_eval(files, tmp_path, capsys, monkeypatch):
    import preftune.diffusion.sample as sample

    pipe, pairs = files
    config = tmp_path / "config.yaml"
    config.write_text(json.dumps(config_tree(pipe, pairs, tmp_path / "run", objective={
        "name": "mapo"}, samples={"prompts": ["a red circle", "a blue square"], "seeds": [0],
                                  "steps": 3, "batch_size": 1})))
    batches, denoised = [], sample._denoised
    monkeypatch.setattr(sample, "_denoised", lambda model, denoiser, rows, *rest: (
        batches.append(len(rows)), denoised(model, denoiser, rows, *rest))[1])
    assert main(["diffusion", "train", str(config)]) == 0
    assert batches == [1, 1, 1, 1]  # the grids before and after, an image at a time
    monkeypatch.undo()
    run = tmp_path / "run"
    assert json.loads((run / "run.json").read_text())["objective"] == "mapo"
    index = json.loads((run / "samples" / "samples.json").read_text())
    assert index["grids"] == {"before": "before.png", "after": "after.png"}
    assert sorted(os.listdir(run / "samples" / "before")) == ["p00_s0.png", "p01_s0.png"]
    assert main(["report", str(run)]) == 0
    html = (run / "report.html").read_text()
    assert "Samples before and after training" in html and html.count("data:image/png") >= 3
    assert main(["data", "inspect", str(pairs)]) == 0
    assert "4 image preference pairs" in capsys.readouterr().out
    assert main(["diffusion", "eval", "--model", str(run), "--reference", str(pipe),
                 "--prompt", "a red circle", "--seeds", "0,1", "--steps", "3",
                 "--scorer", "shape_colour"]) == 0
    results = json.loads((run / "eval.json").read_text())
    assert results["samples"] == 2 and results["scorer"] == "shape_colour"
    assert main(["diffusion", "sample", "--model", str(run), "--prompt", "a red circle",  # as
                 "--seeds", "0", "--steps", "3", "--output-dir", str(tmp_path / "s")]) == 0  # eval
    after = sorted((run / "samples" / "after").iterdir())[0]  # the run's own after-grid image
    assert (tmp_path / "s" / "samples" / "samples" / "p00_s0.png").read_bytes() == \
        after.read_bytes()
    assert main(["diffusion", "train", str(config)]) == 2  # the run exists: an error, not a redo


def test_python_api_trains_and_evaluates_as_the_cli_does(files, tmp_path):
    from safetensors.torch import load_file

    from preftune import api

    pipe, pairs = files
    tree = config_tree(pipe, pairs, tmp_path / "by_api", train={"learning_rate": 1e-3})
    assert api.train_diffusion(tree, show_progress=False) == tmp_path / "by_api"
    card = (tmp_path / "by_api" / "model" / "README.md").read_text()  # (run from Python)
    assert f"```bash\npreftune diffusion train {tmp_path / 'by_api' / 'config.yaml'}\n```" \
        in card
    config = tmp_path / "config.yaml"
    config.write_text(json.dumps({**tree, "output_dir": str(tmp_path / "by_cli")}))
    assert main(["diffusion", "train", str(config)]) == 0
    weights = "model/unet/diffusion_pytorch_model.safetensors"
    by_api, by_cli = (load_file(tmp_path / run / weights) for run in ("by_api", "by_cli"))
    assert by_api.keys() == by_cli.keys()
    assert all(torch.equal(by_api[name], by_cli[name]) for name in by_api)
    results = api.evaluate_diffusion(str(tmp_path / "by_api"), str(pipe), ["a red circle"],
                                     "shape_colour", seeds=[0, 1], steps=3)
    assert main(["diffusion", "eval", "--model", str(tmp_path / "by_cli"), "--reference",
                 str(pipe), "--prompt", "a red circle", "--seeds", "0,1", "--steps", "3",
                 "--scorer", "shape_colour"]) == 0
    by_cli_results = json.loads((tmp_path / "by_cli" / "eval.json").read_text())
    assert by_cli_results.pop("model") == str(tmp_path / "by_cli" / "model")
    assert results.pop("model") == str(tmp_path / "by_api" / "model")
    assert by_cli_results == results and results["samples"] == 2
    page = api.write_report(tmp_path / "by_api", tmp_path / "page.html")
    figures = sorted((tmp_path / "by_api" / "report").glob("*.png"))
    html = page.read_text()
    assert page == tmp_path / "page.html" and not (tmp_path / "by_api" / "report.html").exists()
    assert html.count('src="data:image/png;base64,') == len(figures) >= 3
    assert "diffusion_dpo" in html and "Samples before and after" not in html  # none asked for


# diffusers warns that the tiny fixture's scheduler config predates steps_offset
@pytest.mark.filterwarnings("ignore:The configuration file of this scheduler")
def test_a_hub_pipeline_id_fetches_the_loaded_components_and_saves_a_loadable_pipeline(
        files, tmp_path, monkeypatch):
    from diffusers import DiffusionPipeline
    from safetensors.torch import load_file

    from preftune import api
    from test_hub_models import fake_hub

    pipe, pairs = tiny_latent_pipeline(tmp_path / "latent"), files[1]
    components = {path.relative_to(pipe).as_posix(): path.read_bytes()
                  for path in pipe.rglob("*") if path.is_file()}
    index = {"_class_name": "StableDiffusionPipeline", "requires_safety_checker": False,
             "unet": ["diffusers", "UNet2DConditionModel"],
             "text_encoder": ["transformers", "CLIPTextModel"],
             "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
             "scheduler": ["diffusers", "DDPMScheduler"], "vae": ["diffusers", "AutoencoderKL"],
             "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"],
             "feature_extractor": ["transformers", "CLIPImageProcessor"]}
    calls = fake_hub(monkeypatch, tmp_path / "snapshot", {
        **components, "model_index.json": json.dumps(index),
        "v1-5-pruned.safetensors": b"a whole-pipeline checkpoint",
        "unet/diffusion_pytorch_model.fp16.safetensors": b"a variant",
        "safety_checker/config.json": "{}", "safety_checker/model.safetensors": b"weights",
        "feature_extractor/preprocessor_config.json": "{}"})
    tree = config_tree(pipe, pairs, tmp_path / "by_id", train={"learning_rate": 1e-3,
                                                                "max_steps": 1})
    tree["model"]["path"] = "org/tiny-sd"
    api.train_diffusion(tree, show_progress=False)
    # model_index.json and what preftune loads; no variant, checkpoint or other component
    assert set(calls[-1]) == {*components, "model_index.json"}
    api.train_diffusion({**tree, "model": {"path": str(pipe)},
                         "output_dir": str(tmp_path / "by_dir")}, show_progress=False)
    weights = "model/unet/diffusion_pytorch_model.safetensors"
    by_id, by_dir = (load_file(tmp_path / run / weights) for run in ("by_id", "by_dir"))
    assert all(torch.equal(by_id[name], by_dir[name]) for name in by_dir)
    saved = json.loads((tmp_path / "by_id" / "model" / "model_index.json").read_text())
    assert saved["safety_checker"] == saved["feature_extractor"] == [None, None]
    assert saved["unet"] == ["diffusers", "UNet2DConditionModel"]
    loaded = DiffusionPipeline.from_pretrained(tmp_path / "by_id" / "model")
    assert loaded.safety_checker is None
    assert all(torch.equal(tensor, by_id[name]) for name, tensor in loaded.unet.state_dict().items())


def test_a_hub_pipeline_id_that_cannot_be_fetched_is_one_error_line(monkeypatch, capsys):
    import huggingface_hub

    def not_found(repo_id, **patterns):
        raise OSError("404 Client Error: Repository Not Found for url ...\nmore detail")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", not_found)
    assert main(["diffusion", "sample", "--model", "nobody/no-pipeline", "--prompt", "a"]) == 2
    assert capsys.readouterr().err == (  # named by the flag that gave it
        "error: --model: 'nobody/no-pipeline' is not a local diffusers pipeline directory, "
        "and fetching it as a Hugging Face Hub diffusers pipeline failed (OSError: 404 Client "
        "Error: Repository Not Found for url ...). Pass a diffusers pipeline directory; for a "
        "Hub diffusers pipeline, check the id and the network (HF_TOKEN for a gated one), or "
        "download it where there is a network with `hf download nobody/no-pipeline` and copy "
        "the HF cache over.\n")


def test_a_pipeline_given_by_a_flag_is_named_by_that_flag(files, tmp_path, capsys):
    pipe, not_a_pipeline = str(files[0]), str(tmp_path)
    common = ["--prompt", "a red circle", "--seeds", "0,1", "--steps", "1"]
    commands = {
        "--model": ["diffusion", "rank", "--model", not_a_pipeline, "--scorer", "shape_colour",
                    "--output-dir", str(tmp_path / "ranked"), *common],
        "--reference": ["diffusion", "eval", "--model", pipe, "--reference", not_a_pipeline,
                        "--scorer", "shape_colour", "--output", str(tmp_path / "e.json"),
                        *common]}
    for flag, command in commands.items():
        assert main(command) == 2
        assert (f"error: {flag} {not_a_pipeline}: no unet/ or transformer/ folder"
                in capsys.readouterr().err)
    assert not (tmp_path / "ranked").exists() and not (tmp_path / "e.json").exists()


@pytest.mark.slow  # (the whole diffusion demo: `pytest -m slow`)
def test_quick_demo_numbers_are_the_checkers(tmp_path):
    """``preftune diffusion demo --quick`` as a user runs it; its before/after numbers are
    recounted from the saved models by the checker."""
    earlier = tmp_path / "demo"  # an earlier demo, with a note of the user's: moved aside
    earlier.mkdir()
    (earlier / "demo.json").write_text('{"earlier": true}')
    (earlier / "notes.txt").write_text("mine")
    done = run_python(["-m", "preftune", "diffusion", "demo", "--quick", "--output-dir",
                       str(tmp_path / "demo")])
    assert done.returncode == 0, done.stderr[-3000:]
    (aside,) = tmp_path.glob("demo.old-*")  # (the folder was deleted, notes and all)
    assert (aside / "notes.txt").read_text() == "mine"
    assert json.loads((aside / "demo.json").read_text()) == {"earlier": True}
    (tmp_path / "file").write_text("kept")
    refused = run_python(["-m", "preftune", "diffusion", "demo", "--quick", "--output-dir",
                          str(tmp_path / "file")])
    assert refused.returncode == 2 and "is a file, not a directory" in refused.stderr
    assert (tmp_path / "file").read_text() == "kept"
    results = json.loads((tmp_path / "demo" / "demo.json").read_text())
    assert (f"| SPO | {results['spo/held_out/accuracy']:.3f} | "  # the table it prints
            f"{results['spo/train_prompts/accuracy']:.3f} | "
            f"{results['spo/held_out/win_rate']:.3f} | {results['seconds/spo']:.0f} |"
            in done.stdout.splitlines())
    assert (f"| pretrained (denoising) | {results['pretrained/held_out/accuracy']:.3f} | "
            f"{results['pretrained/train_prompts/accuracy']:.3f} |  |" in done.stdout)
    from preftune.diffusion.demo import colour_accuracy
    from preftune.diffusion.ranking import win_shares
    from preftune.diffusion.shapes import colour_score, right_colour

    after = load_diffusion_model(tmp_path / "demo" / "diffusion_dpo" / "model")
    held_out = results["held_out_prompts"]
    assert held_out == ["a red triangle", "a green triangle", "a blue triangle",
                        "a yellow triangle"]
    assert results["diffusion_dpo/held_out/accuracy"] == colour_accuracy(
        after, held_out, list(range(results["seeds"])), results["sampling_steps"])
    # (one recount stands for the others: every model is measured by the same `measure`)
    for name in ("diffusion_dpo", "spo", "rank_dpo"):
        assert (tmp_path / "demo" / name / "report.html").is_file()
    # RankDPO's lists: the 8 training prompts' 4 samples each, scored by the checker's win shares
    data = tmp_path / "demo" / "data"
    lists = [json.loads(line) for line in (data / "ranked" / "ranked.jsonl").open()]
    assert len(lists) == results["ranked/lists"] == 8
    for ranked in lists:
        raw = [colour_score(ranked["prompt"], data / "ranked" / f) for f in ranked["images"]]
        assert ranked["scorer_scores"]["shape_colour"] == pytest.approx(raw, abs=1e-6)
        assert ranked["image_scores"] == pytest.approx(win_shares(raw), abs=1e-6)
    # every preference pair is right by the checker: chosen in the prompt's colour, rejected not
    pairs = [json.loads(line) for line in (data / "dpo.jsonl").read_text().splitlines()]
    assert len(pairs) == results["pairs/count"] > 0
    for pair in pairs:
        assert right_colour(pair["prompt"], data / pair["chosen"])
        assert not right_colour(pair["prompt"], data / pair["rejected"])


def test_latent_pipeline_with_a_vae_trains_and_samples(files, tmp_path):
    """With vae/ the denoiser works on VAE latents: pairs are encoded, samples decoded."""
    pipe = tiny_latent_pipeline(tmp_path / "latent")
    output, _ = trained((pipe, files[1]), tmp_path, train={"max_steps": 1},
                        samples={"prompts": ["a red circle"], "seeds": [0], "steps": 2})
    model = load_diffusion_model(output / "model")
    assert model.vae is not None
    pixels = torch.zeros((1, 3, 16, 16))
    assert model.to_model_space(pixels).shape == (1, 4, 8, 8)
    from PIL import Image

    assert Image.open(output / "samples" / "after" / "p00_s0.png").size == (16, 16)


@pytest.mark.parametrize("objective", ["diffusion_dpo", "rank_dpo"])
def test_prompt_dropout_gives_a_seeded_share_the_empty_prompt_in_training_only(files, tmp_path,
                                                                             objective):
    from accelerate import Accelerator

    from preftune.diffusion.train import EVAL_STEP, diffusion_task, dropped_prompts
    from test_diffusion_ranked import LISTS, write_ranked

    data = (write_ranked(tmp_path / "lists", LISTS * 2) if objective == "rank_dpo"
            else write_pairs(tmp_path / "pairs", count=6))
    tree = config_tree(files[0], data, tmp_path / "run", objective={"name": objective,
                                                                     "beta": 50.0},
                       data={"prompt_dropout": 0.5})
    task = diffusion_task(DiffusionConfig.from_dict(tree), Accelerator())[0]
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # the policy off its reference, so that the prompt matters
        for parameter in task.module.denoiser.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    records = task.train_examples[:6]
    batch, seed = task.make_batch(records), task.config.train.seed
    draws = [dropped_prompts(batch.indices, seed, step, 0.5) for step in range(200)]
    assert sum(map(len, draws)) / 1200 == pytest.approx(0.5, abs=0.05)  # the share
    step = next(k for k, rows in enumerate(draws) if 0 < len(rows) < 6)
    dropped = draws[step]
    assert dropped == dropped_prompts(batch.indices, seed, step, 0.5)  # seeded
    assert dropped_prompts(batch.indices[2:], seed, step, 0.5) == {r - 2 for r in dropped
                                                                   if r >= 2}
    by_hand = batch.without_prompts(dropped)
    texts = by_hand.texts if objective == "rank_dpo" else by_hand.chosen_text
    assert [text == "" for text in texts] == [row in dropped for row in range(6)]
    noise = task.noise_for(batch, step)
    torch.testing.assert_close(task.losses(task.module, batch, step)[0],
                               task.losses_with(task.module, by_hand, *noise)[0])
    kept = task.losses_with(task.module, batch, *noise)[0]
    differs = ~torch.isclose(task.losses(task.module, batch, step)[0], kept)
    assert differs.tolist() == [row in dropped for row in range(6)]
    # evaluation keeps every prompt
    torch.testing.assert_close(task.losses(task.module, batch, EVAL_STEP)[0], task.losses_with(
        task.module, batch, *task.noise_for(batch, EVAL_STEP))[0])
    from preftune.config import ConfigError

    with pytest.raises(ConfigError, match="data.prompt_dropout does nothing for spo"):
        DiffusionConfig.from_dict({**tree, "objective": {"name": "spo"}})


def test_resume_refuses_pairs_that_changed_since_the_run_started(files, tmp_path, monkeypatch):
    """As for text runs: the training records' fingerprints (prompts, image paths, scores;
    the images' content) in data_report.json are compared when a run resumes, before the
    pipeline loads; the same data resumes."""
    import shutil

    from preftune.config import ConfigError
    from test_train_loop import crash_after_checkpoint

    pipe, pairs = files
    data = tmp_path / "pairs.jsonl"
    shutil.copytree(pairs.parent / "images", tmp_path / "images")
    original = pairs.read_text()
    data.write_text(original)
    config = DiffusionConfig.from_dict(config_tree(pipe, data, tmp_path / "run", train={
        "max_steps": 4, "save_every": 2}))
    crash_after_checkpoint(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        train_diffusion(config, show_progress=False)
    data.write_text(original.replace('"chosen_score": 1.0', '"chosen_score": 0.5', 1))
    import preftune.diffusion.train as diffusion_train

    monkeypatch.setattr(diffusion_train, "load_diffusion_model",
                        lambda *a, **k: pytest.fail("the pipeline loaded"))
    with pytest.raises(ConfigError, match="--resume: the training data read now differs from "
                                          "what .*run started on"):
        train_diffusion(config, resume=True, show_progress=False)
    monkeypatch.undo()
    data.write_text(original)
    assert (train_diffusion(config, resume=True, show_progress=False) / "model").is_dir()
    data.write_text(original.replace('"chosen_score": 1.0', '"chosen_score": 0.5', 1))
    with pytest.raises(ConfigError, match="what .*run trained on .*; its finished model was "
                                          "trained on other examples"):
        train_diffusion(config, resume=True, show_progress=False)  # finished: checked too
    # an image edited in place: same records, same paths, other pixels (it resumed before)
    data.write_text(original)
    image = tmp_path / "images" / "0_w.png"
    kept = image.read_bytes()
    image.write_bytes((tmp_path / "images" / "1_w.png").read_bytes())
    with pytest.raises(ConfigError, match=r"\(\d+ examples then, \d+ now, other image "
                                          r"content\); its finished model"):
        train_diffusion(config, resume=True, show_progress=False)
    image.write_bytes(kept)
    assert (train_diffusion(config, resume=True, show_progress=False) / "model").is_dir()
