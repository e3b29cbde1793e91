"""The render scorer (Prompt-A-Video's reward pipeline for images): each response rendered from
each seed by a text-to-image pipeline and judged by an image scorer against the user's prompt,
against that rule computed by hand; the scorer file's errors; and an online round of a
language model scored by it."""

import json

import pytest
import yaml

pytest.importorskip("diffusers")

from diffusion_fixtures import one_thread, tiny_pipeline  # noqa: E402, F401
from preftune.config import ConfigError  # noqa: E402
from preftune.diffusion.data import tensor_image  # noqa: E402
from preftune.diffusion.model import load_diffusion_model  # noqa: E402
from preftune.diffusion.render import RenderScorer  # noqa: E402
from preftune.diffusion.sample import sample_images  # noqa: E402
from preftune.diffusion.shapes import ColourScorer  # noqa: E402
from preftune.score import load_scorer  # noqa: E402

SETTINGS = {"scorer": "shape_colour", "seeds": [0, 1, 2], "steps": 3, "guidance_scale": 2.0}


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return tiny_pipeline(tmp_path_factory.mktemp("render") / "pipe")


def scorer_file(path, pipe, **settings):
    path.write_text(yaml.safe_dump({"render": {"pipeline": str(pipe), **SETTINGS, **settings}}))
    return str(path)


def by_hand(pipe, target, response, seeds=(0, 1, 2)):
    """The mean colour score of ``response`` rendered from ``seeds``, judged against
    ``target``."""
    images = sample_images(load_diffusion_model(pipe), [response], list(seeds), 3, 2.0)
    scores = ColourScorer().score([target] * len(seeds), [tensor_image(x) for x in images])
    return sum(scores) / len(seeds)


def test_each_response_is_rendered_from_every_seed_and_judged_against_the_prompt(pipe,
                                                                                tmp_path):
    scorer = load_scorer(scorer_file(tmp_path / "render.yaml", pipe, batch_size=2))
    assert isinstance(scorer, RenderScorer) and not scorer.pairwise
    prompts = ["a red circle", "a red circle", [{"role": "user", "content": "a blue square"}]]
    responses = ["a red circle", "a green triangle", "a blue square"]
    ours = scorer.score(prompts, responses)
    expected = [by_hand(pipe, "a red circle", "a red circle"),
                by_hand(pipe, "a red circle", "a green triangle"),
                by_hand(pipe, "a blue square", "a blue square")]
    assert ours == pytest.approx(expected, abs=1e-6)
    assert len(set(ours)) > 1  # the renders differ by response
    one_at_a_time = load_scorer(scorer_file(tmp_path / "one.yaml", pipe, batch_size=1))
    assert one_at_a_time.score(prompts, responses) == pytest.approx(ours, abs=1e-6)
    assert scorer.prefer(prompts[:1], responses[:1], responses[1:2]) == [
        1.0 if ours[0] > ours[1] else 0.0 if ours[0] < ours[1] else 0.5]


def test_target_pattern_takes_the_users_prompt_out_of_the_instruction(pipe, tmp_path):
    scorer = load_scorer(scorer_file(tmp_path / "render.yaml", pipe,
                                     target_pattern=r"for the painter: (.*)"))
    instruction = "Rewrite this for the painter: a yellow circle"
    assert scorer.target(instruction) == "a yellow circle"
    assert scorer.score([instruction], ["a yellow circle"]) == pytest.approx(
        [by_hand(pipe, "a yellow circle", "a yellow circle")], abs=1e-6)
    with pytest.raises(ConfigError, match="does not match the prompt 'say hello'"):
        scorer.score(["say hello"], ["a red circle"])


@pytest.mark.parametrize("settings, message", [
    ({"colour": 1}, r"render: unknown keys \['colour'\]"),
    ({"pipeline": ""}, "render.pipeline is required"),
    ({"seeds": []}, "render.seeds must be a non-empty list of integers"),
    ({"steps": 0}, r"render.steps must be an integer >= 1"),
    ({"target_pattern": "no group"}, "render.target_pattern 'no group': it has no group"),
    ({"dtype": "fp8"}, "render.dtype 'fp8': give one of auto, float32, bfloat16, float16"),
])
def test_bad_scorer_files_name_the_file_and_key(pipe, tmp_path, settings, message):
    path = scorer_file(tmp_path / "bad.yaml", pipe, **settings)
    with pytest.raises(ConfigError, match=f"{tmp_path / 'bad.yaml'}: {message}"):
        load_scorer(path)


def test_the_pipeline_loads_as_its_denoiser_is_saved_or_in_render_dtype(pipe, tmp_path):
    import torch

    saved = load_scorer(scorer_file(tmp_path / "auto.yaml", pipe)).model.denoiser.dtype
    assert saved == torch.float32  # the tiny pipeline is saved in float32
    halved = load_scorer(scorer_file(tmp_path / "bf16.yaml", pipe, dtype="bfloat16"))
    assert {p.dtype for p in halved.model.denoiser.parameters()} == {torch.bfloat16}


def test_an_online_round_trains_a_prompt_writer_on_rendered_scores(pipe, tmp_path):
    from preftune.config import build_config
    from preftune.online.config import OnlineConfig
    from preftune.online.loop import run_online
    from tiny_models import save_tiny_model_dir

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Rewrite this for the painter: {p}"})
                               + "\n" for p in ("a red circle", "a blue square",
                                                "a green triangle", "a yellow circle")))
    scorer = scorer_file(tmp_path / "render.yaml", pipe, seeds=[0],
                         target_pattern=r"painter: (.*)")
    out = tmp_path / "run"
    run_online(build_config({
        "output_dir": str(out),
        "model": {"path": str(save_tiny_model_dir(tmp_path / "policy", seed=1))},
        "data": {"train": str(prompts), "max_length": 64, "max_prompt_length": 32},
        "objective": {"name": "dpo", "beta": 0.1},
        "train": {"learning_rate": 1e-3, "batch_size": 2, "max_steps": 2, "seed": 0},
        "online": {"rounds": 1, "scorer": scorer, "eval_max_new_tokens": 4,
                   "sampling": {"samples": 3, "max_new_tokens": 6, "batch_size": 6}}},
        schema=OnlineConfig))
    rows = [json.loads(line) for line in (out / "round-1" / "scored.jsonl").read_text()
            .splitlines()]
    assert len(rows) == 4
    for row in rows:  # the scores the round trained on are the rendered ones
        target = row["prompt"].split("painter: ")[1]
        assert row["scores"] == pytest.approx(
            [by_hand(pipe, target, response, seeds=[0]) for response in row["responses"]],
            abs=1e-6)
    pairs = (out / "round-1" / "pairs.jsonl").read_text().splitlines()
    assert pairs and (out / "round-1" / "model" / "model.safetensors").exists()


def short(prompt, response):
    """A format check on the rewrite: fewer words is better."""
    return -float(len(response.split()))


def test_a_render_file_is_a_term_of_a_combination(pipe, tmp_path):
    render = scorer_file(tmp_path / "render.yaml", pipe)
    combined = tmp_path / "combined.yaml"
    combined.write_text(yaml.safe_dump({"combine": "sum", "terms": [
        {"scorer": render, "weight": 2.0}, {"scorer": "test_render_scorer:short"}]}))
    responses = ["a red circle", "a blue square of a red circle"]
    expected = [2 * by_hand(pipe, "a red circle", r) + short(None, r) for r in responses]
    assert load_scorer(str(combined)).score(["a red circle"] * 2, responses) == pytest.approx(
        expected, abs=1e-6)


@pytest.mark.parametrize("settings, message", [
    ({"pipeline": "MISSING"}, "render.pipeline MISSING is not a directory; give a diffusers "
                              "pipeline directory"),
    ({"pipeline": "NOT_A_PIPELINE"}, "render.pipeline NOT_A_PIPELINE: no unet/ or "
                                     "transformer/ folder"),
    ({"scorer": "judge:default"}, "render.scorer: scorer 'judge:default'"),
    ({"seeds": []}, "render.seeds must be a non-empty list of integers"),
])
def test_a_render_file_is_checked_before_an_online_run_samples(pipe, tmp_path, settings,
                                                               message):
    """check_scorer (what online and its --plan run first) checks the render mapping, its
    pipeline and its image scorer without loading them: a missing pipeline was found only
    after round 1 had sampled every prompt, leaving a half-made run behind."""
    from preftune.config import build_config
    from preftune.online.config import OnlineConfig
    from preftune.online.loop import run_online
    from preftune.score import check_scorer
    from tiny_models import save_tiny_model_dir

    (tmp_path / "NOT_A_PIPELINE").mkdir()
    places = {"MISSING": str(tmp_path / "MISSING"), "NOT_A_PIPELINE": str(tmp_path /
                                                                        "NOT_A_PIPELINE")}
    settings = {key: places.get(value, value) if isinstance(value, str) else value
                for key, value in settings.items()}
    path = scorer_file(tmp_path / "render.yaml", pipe, **settings)
    expected = f"{path}: " + message.replace("MISSING", places["MISSING"]).replace(
        "NOT_A_PIPELINE", places["NOT_A_PIPELINE"])
    with pytest.raises(ConfigError) as error:
        check_scorer(path)
    assert str(error.value).startswith(expected)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "a red circle"}\n{"prompt": "a blue square"}\n')
    with pytest.raises(ConfigError) as error:
        run_online(build_config({
            "output_dir": str(tmp_path / "run"),
            "model": {"path": str(save_tiny_model_dir(tmp_path / "policy"))},
            "data": {"train": str(prompts)}, "objective": {"name": "dpo"},
            "online": {"rounds": 1, "scorer": path}}, schema=OnlineConfig))
    assert expected in str(error.value)
    assert not (tmp_path / "run").exists()
