"""SPO (online, prompts only): the DDIM transition log-probs and the loss against a hand-written
computation (values and gradients), the pool's pair picking and ties, seeding and the step-wise
resampler, a CLI run end to end, and errors that name the key, file, record and field."""

import json
import math

import pytest
import torch

pytest.importorskip("diffusers")

from accelerate import Accelerator  # noqa: E402
from diffusers import DDIMScheduler, UNet2DConditionModel  # noqa: E402

import diffusion_fixtures  # noqa: E402
from diffusion_fixtures import (config_tree, one_thread, tiny_latent_pipeline,  # noqa: E402, F401
                                tiny_pipeline,
                                write_prompts)
from preftune.cli import main  # noqa: E402
from preftune.config import ConfigError  # noqa: E402
from preftune.data.records import DataError  # noqa: E402
from preftune.diffusion.config import DiffusionConfig  # noqa: E402
from preftune.diffusion.losses import DIFFUSION_LOSSES  # noqa: E402
from preftune.diffusion.model import load_diffusion_model  # noqa: E402
from preftune.diffusion.spo import DDIMTransition, pick_pairs  # noqa: E402
from preftune.diffusion.train import diffusion_task  # noqa: E402

PROMPTS = ["a red circle", "a blue square", "a green triangle", "a yellow circle"]
SMALL = {"sampling_steps": 5, "first_step": 1, "pool_size": 3, "guidance_scale": 1.0}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("spo")
    return tiny_pipeline(root / "pipe"), write_prompts(root / "data", PROMPTS)


def make_task(files, tmp_path, perturb=False, params=None, **sections):
    tree = config_tree(*files, tmp_path / "run", objective={"name": "spo", **SMALL,
                                                           **(params or {})}, **sections)
    task, _ = diffusion_task(DiffusionConfig.from_dict(tree), Accelerator())
    if perturb:  # policy != reference, so both log-probs matter
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for parameter in task.module.denoiser.parameters():
                parameter.add_(0.01 * torch.randn(parameter.shape, generator=generator))
    return task


def test_registered_with_the_papers_defaults(capsys):
    spec = DIFFUSION_LOSSES["spo"]
    assert spec.online and spec.needs_reference and spec.paper == "arXiv:2406.04314"
    assert spec.defaults() == {"beta": 10.0, "clip": 0.1, "pool_size": 4, "eta": 1.0,
                               "sampling_steps": 20, "first_step": 4, "steps_per_trajectory": 0,
                               "scorer": "shape_colour", "guidance_scale": 5.0, "min_gap": 0.0}
    assert main(["diffusion", "objectives"]) == 0
    assert "spo " in capsys.readouterr().out


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
def test_transition_is_the_ddim_schedulers_step(files, kind):
    """mean + sigma z is diffusers' DDIMScheduler.step with the same eta and noise z."""
    config = {**DDIMScheduler.load_config(files[0] / "scheduler"), "prediction_type": kind}
    transition = DDIMTransition(config, 10, 0.7)
    scheduler = DDIMScheduler.from_config(config)
    scheduler.set_timesteps(10)
    generator = torch.Generator().manual_seed(0)
    for t in transition.timesteps[:-1]:
        x, prediction, z = (torch.randn((2, 3, 16, 16), generator=generator) for _ in range(3))
        mean, sigma, _ = transition(prediction, [t, t], x)
        expected = scheduler.step(prediction, t, x, eta=0.7, variance_noise=z).prev_sample
        torch.testing.assert_close(mean + sigma * z, expected, rtol=1e-5, atol=1e-5)
    assert transition.step_sigma(transition.timesteps[-1]) == 0.0  # onto alpha_bar = 1


def hand_logps(denoiser, model, x_t, t, prompts, sides, guidance, eta, steps):
    """log N(x_{t-1}; mu, sigma^2 I) averaged over dims, from the parts: the tokenizer, the
    text encoder, the denoiser and the scheduler's alphas_cumprod (DDIM, eq. 12 and 16)."""
    def condition(texts):
        ids = model.tokenizer(texts, padding="max_length", truncation=True, return_tensors="pt",
                              max_length=model.tokenizer.model_max_length).input_ids
        return model.text_encoder(ids).last_hidden_state

    conditional = denoiser(x_t, t, encoder_hidden_states=condition(prompts)).sample
    unconditional = denoiser(x_t, t, encoder_hidden_states=condition([""] * len(t))).sample
    eps = unconditional + guidance * (conditional - unconditional)
    abar = model.scheduler.alphas_cumprod
    a_t, a_prev = abar[t].view(-1, 1, 1, 1), abar[t - 1000 // steps].view(-1, 1, 1, 1)
    assert model.scheduler.config.clip_sample  # the sampler clips x0 to [-1, 1]
    x0 = ((x_t - torch.sqrt(1 - a_t) * eps) / torch.sqrt(a_t)).clamp(-1, 1)
    sigma = eta * torch.sqrt((1 - a_prev) / (1 - a_t)) * torch.sqrt(1 - a_t / a_prev)
    mean = torch.sqrt(a_prev) * x0 + torch.sqrt(1 - a_prev - sigma**2) * eps
    return [(-(x - mean) ** 2 / (2 * sigma**2) - torch.log(sigma)
             - 0.5 * math.log(2 * math.pi)).mean(dim=(1, 2, 3)) for x in sides], mean, sigma


@pytest.mark.parametrize("clip", [0.5, 0.1])
def test_log_ratios_and_loss_equal_the_hand_computation(files, tmp_path, clip):
    params = {"beta": 10.0, "clip": clip, "eta": 0.8, "sampling_steps": 10,
              "guidance_scale": 2.0}
    task = make_task(files, tmp_path, perturb=True, params=params)
    model, weight = task.module, task.module.denoiser.conv_in.weight
    generator = torch.Generator().manual_seed(3)
    x_t = torch.randn((3, 3, 16, 16), generator=generator)
    t = torch.tensor([900, 500, 100])
    prompts = PROMPTS[:3]
    with torch.no_grad():  # candidates x_{t-1} drawn around the reference's transition mean
        _, mean, sigma = hand_logps(task.reference, model, x_t, t, prompts, [], 2.0, 0.8, 10)
        chosen, rejected = (mean + sigma * torch.randn(mean.shape, generator=generator)
                            for _ in range(2))
    output, logps = task.transition_losses(model, x_t, t, *task.conditions(prompts),
                                           chosen, rejected)

    (policy_w, policy_l), _, _ = hand_logps(model.denoiser, model, x_t, t, prompts,
                                            [chosen, rejected], 2.0, 0.8, 10)
    with torch.no_grad():
        (ref_w, ref_l), _, _ = hand_logps(task.reference, model, x_t, t, prompts,
                                          [chosen, rejected], 2.0, 0.8, 10)
    ratio_w = torch.clamp(torch.exp(policy_w - ref_w), 1 - clip, 1 + clip)
    ratio_l = torch.clamp(torch.exp(policy_l - ref_l), 1 - clip, 1 + clip)
    expected = -torch.log(torch.sigmoid(10 * torch.log(ratio_w) - 10 * torch.log(ratio_l)))
    for got, want in zip((logps.policy_chosen, logps.policy_rejected, logps.reference_chosen,
                          logps.reference_rejected), (policy_w, policy_l, ref_w, ref_l)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(output.losses, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(output.chosen_rewards, 10 * torch.log(ratio_w).detach(),
                               rtol=1e-5, atol=1e-5)
    (got,) = torch.autograd.grad(output.losses.sum(), weight)
    (want,) = torch.autograd.grad(expected.sum(), weight)
    # pairs at t 900 and 500 inside the clip range, the one at t 100 (tiny sigma_t) clipped
    # on both sides: its loss is log 2 and it adds no gradient
    inside = ((ratio_w > 1 - clip) & (ratio_w < 1 + clip)) & (
        (ratio_l > 1 - clip) & (ratio_l < 1 + clip))
    assert inside.tolist() == [True, True, False]
    assert output.losses[2].item() == pytest.approx(math.log(2))
    scale = want.abs().max().item()
    assert scale > 0
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * scale)


def test_pick_pairs_takes_argmax_and_argmin_and_skips_ties():
    scores = torch.tensor([[1.0, 3.0, 2.0, 0.0], [5.0, 5.0, 5.0, 5.0], [0.0, 0.2, 1.0, 0.2]])
    win, lose, gap, kept = pick_pairs(scores)
    assert win.tolist() == [1, 0, 2] and lose[[0, 2]].tolist() == [3, 0]
    assert kept.tolist() == [True, False, True]
    torch.testing.assert_close(gap, torch.tensor([3.0, 0.0, 1.0]))
    assert pick_pairs(scores, min_gap=1.0)[3].tolist() == [True, False, False]


def test_pool_pair_is_the_scorers_best_and_worst_of_the_policys_x0(files, tmp_path):
    task = make_task(files, tmp_path, params={
        "scorer": "diffusion_fixtures:brightness_scorer", "guidance_scale": 2.0})
    diffusion_fixtures.SCORED.clear()
    batch = task.make_batch(task.train_examples[:2])
    model = task.module
    rollout = task.rollout(batch, 0, *task.conditions(batch.prompts))
    # steps 1..3 of 0..4 for each prompt: step 0 is before first_step, step 4 (t 0, onto
    # alpha_bar = 1) is deterministic
    assert rollout.step_index.tolist() == [1, 1, 2, 2, 3, 3]
    scores = torch.tensor([s for call in diffusion_fixtures.SCORED for s in call[3]])
    torch.testing.assert_close(rollout.scores.flatten(), scores)
    assert torch.equal(rollout.win, rollout.scores.argmax(1))
    assert torch.equal(rollout.lose, rollout.scores.argmin(1))
    assert rollout.kept.all() and (rollout.gap > 0).all()
    # the scorer saw x0 predicted by the policy (guided) at each candidate and the next t
    row = 0
    prompts, images, timesteps, _ = diffusion_fixtures.SCORED[0]
    t_next = task.transition.timesteps[rollout.step_index[row] + 1]
    assert timesteps[0] == t_next and prompts[:3] == [batch.prompts[rollout.example[row]]] * 3
    with torch.no_grad():
        prediction = task.predict(model, rollout.pool[row], t_next,
                                  *task.conditions(prompts[:3]))
    x0 = ((rollout.pool[row] - (1 - model.scheduler.alphas_cumprod[t_next]).sqrt() * prediction)
          / model.scheduler.alphas_cumprod[t_next].sqrt()).clamp(-1, 1)
    torch.testing.assert_close(images[:3], x0, rtol=1e-5, atol=1e-5)
    # SD's schedule (steps_offset 1, final alpha_bar = alpha_bar_0): the last step trains, its
    # candidates are the clean images, rated at timestep 0
    config = {**DDIMScheduler.load_config(files[0] / "scheduler"), "steps_offset": 1,
              "set_alpha_to_one": False}
    task.transition = DDIMTransition(config, 5, 1.0)
    task.eligible = task.eligible_steps()
    assert task.transition.timesteps == [801, 601, 401, 201, 1] and task.eligible == [1, 2, 3, 4]
    rollout = task.rollout(batch, 0, *task.conditions(batch.prompts))
    prompts, images, timesteps, scores = diffusion_fixtures.SCORED[-1]
    assert rollout.step_index[-2:].tolist() == [4, 4] and timesteps == [0] * 6
    torch.testing.assert_close(images, rollout.pool[-2:].flatten(0, 1).clamp(-1, 1))
    assert torch.equal(rollout.win[-2:], torch.tensor(scores).view(2, 3).argmax(1))


def test_ties_are_skipped_and_counted(files, tmp_path):
    task = make_task(files, tmp_path, params={"scorer": "diffusion_fixtures:constant_scorer"})
    batch = task.make_batch(task.train_examples[:2])
    losses, metrics = task.losses(task.module, batch, 0)
    assert losses.tolist() == [0.0, 0.0] and metrics["spo/skipped_ties"] == (6.0, 6)
    assert metrics["spo/score_gap"][0] == 0 and metrics["rewards/chosen"][1] == 0
    assert metrics["spo/ratio_chosen"][1] == 0 and metrics["loss"] == (0.0, 2)
    losses.sum().backward()  # nothing to learn: zero gradients, and nothing breaks
    assert all(p.grad is not None and not p.grad.any()
               for p in task.module.denoiser.parameters())


def test_same_seed_same_pools_and_loss_and_the_resampler_continues_from_the_pool(files,
                                                                               tmp_path):
    task = make_task(files, tmp_path, perturb=True, params={"first_step": 0})
    model = task.module
    batch = task.make_batch(task.train_examples[:2])
    conditions = task.conditions(batch.prompts)
    first, again = (task.rollout(batch, 5, *conditions) for _ in range(2))
    assert torch.equal(first.pool, again.pool) and torch.equal(first.continued, again.continued)
    assert torch.equal(task.losses(model, batch, 5)[0], task.losses(model, batch, 5)[0])
    other = task.rollout(batch, 6, *conditions)
    assert not torch.allclose(first.pool, other.pool)
    # the second prompt alone: the same trajectory as in the batch of two
    alone = task.make_batch(task.train_examples[1:2])
    single = task.rollout(alone, 5, *task.conditions(alone.prompts))
    torch.testing.assert_close(single.pool, first.pool[first.example == 1], rtol=1e-4,
                               atol=1e-4)  # batched convolutions round differently
    # step-wise resampler: the next step starts from the pool member it continued from
    for example in (0, 1):
        rows = (first.example == example).nonzero().flatten().tolist()
        assert first.step_index[rows].tolist() == [0, 1, 2, 3]
        for row, following in zip(rows, rows[1:]):
            assert torch.equal(first.x_t[following], first.pool[row, first.continued[row]])
    assert len(set(first.continued.tolist())) > 1  # a random member, not always the same
    subset = make_task(files, tmp_path / "b", params={"steps_per_trajectory": 2})
    rollout = subset.rollout(batch, 5, *conditions)
    assert [int((rollout.example == e).sum()) for e in (0, 1)] == [2, 2]


def test_adapter_off_reference_is_the_base_denoiser(files, tmp_path):
    pytest.importorskip("peft")
    task = make_task(files, tmp_path, model={"lora": {"r": 4, "alpha": 8}})
    assert task.reference_strategy == "adapter-off" and task.reference is None
    with torch.no_grad():
        for name, parameter in task.module.denoiser.named_parameters():
            if "lora_B" in name:
                parameter.add_(0.05)
    model, generator = task.module, torch.Generator().manual_seed(0)
    x_t, chosen, rejected = (torch.randn((2, 3, 16, 16), generator=generator) * 0.5
                             for _ in range(3))
    inputs = (x_t, torch.tensor([600, 200]), *task.conditions(PROMPTS[:2]), chosen,
              rejected)
    _, logps = task.transition_losses(model, *inputs)
    task.reference, task.reference_strategy = load_diffusion_model(files[0]).denoiser, "live"
    _, expected = task.transition_losses(model, *inputs)
    torch.testing.assert_close(logps.reference_chosen, expected.reference_chosen)
    assert not torch.allclose(logps.policy_chosen, logps.reference_chosen)


def test_latent_pipeline_scores_decoded_pixels(files, tmp_path):
    """With vae/ the pools are latents; the scorer sees the VAE's decoding of x0."""
    pipe = tiny_latent_pipeline(tmp_path / "latent")
    task = make_task((pipe, files[1]), tmp_path, params={
        "scorer": "diffusion_fixtures:brightness_scorer", "steps_per_trajectory": 1})
    diffusion_fixtures.SCORED.clear()
    batch = task.make_batch(task.train_examples[:2])
    losses, metrics = task.losses(task.module, batch, 0)
    assert losses.shape == (2,) and metrics["rewards/chosen"][1] == 2
    images = torch.cat([call[1] for call in diffusion_fixtures.SCORED])
    assert images.shape == (6, 3, 16, 16)  # 2 pools of 3, decoded


def test_cli_trains_from_prompts_only_and_the_model_reloads(files, tmp_path):
    config = tmp_path / "spo.yaml"
    config.write_text(json.dumps(config_tree(
        *files, tmp_path / "run", objective={"name": "spo", **SMALL, "guidance_scale": 2.0,
                                             "steps_per_trajectory": 3},
        data={"eval_fraction": 0.25}, train={"max_steps": 2, "eval_every": 2,
                                             "learning_rate": 1e-3})))
    assert main(["diffusion", "train", str(config)]) == 0
    run = tmp_path / "run"
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins",
                "rewards/accuracies", "spo/skipped_ties", "spo/score_gap", "spo/ratio_chosen",
                "eval/loss"):
        assert key in metrics[-1], key
    assert metrics[0]["rewards/margins"] == 0.0 and metrics[0]["loss"] == pytest.approx(
        math.log(2), abs=1e-6)  # step 1: policy == reference
    info = json.loads((run / "run.json").read_text())
    assert (info["objective"], info["online"], info["reference"]) == ("spo", True, "live")
    assert json.loads((run / "data_report.json").read_text())["shape"] == "prompts"
    reloaded = UNet2DConditionModel.from_pretrained(run / "model" / "unet")
    initial = load_diffusion_model(files[0]).denoiser
    x = torch.randn((1, 3, 16, 16), generator=torch.Generator().manual_seed(0))
    condition = torch.randn((1, 8, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert not torch.allclose(reloaded(x, 500, condition).sample,
                                  initial(x, 500, condition).sample)


def test_bad_input_names_the_key_file_record_and_field(files, tmp_path):
    pipe, prompts = files
    tree = config_tree(pipe, prompts, tmp_path / "run", objective={"name": "spo"})
    with pytest.raises(ConfigError, match="objective.scorer: .*unknown scorer 'nope'"):
        DiffusionConfig.from_dict(tree, ["objective.scorer=nope"])
    with pytest.raises(ConfigError, match="objective.eta"):
        DiffusionConfig.from_dict(tree, ["objective.eta=0"])
    with pytest.raises(ConfigError, match="data.fields.chosen does nothing for spo"):
        DiffusionConfig.from_dict(tree, ["data.fields={chosen: jpg_0}"])
    with pytest.raises(ConfigError, match="objective.scorer: .*'no_such_module_xyz:score': "
                                          "expected shape_colour, spm:PATH or module:function"):
        make_task(files, tmp_path, params={"scorer": "no_such_module_xyz:score"})
    # an image scorer's (prompt, image) in place of (prompts, images, timesteps): refused as
    # the config is read, before the run writes anything
    with pytest.raises(ConfigError, match=r"objective.scorer: .*write_prompts\(directory.* "
                                          r"cannot be called as function\(prompts, images, "
                                          r"timesteps\)"):
        DiffusionConfig.from_dict(tree, ["objective.scorer=diffusion_fixtures:write_prompts"])
    with pytest.raises(ConfigError, match="objective.first_step 5"):
        make_task(files, tmp_path, params={"first_step": 5})
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "a red circle"}) + "\n"
                   + json.dumps({"text": "a blue square"}) + "\n")
    with pytest.raises(DataError, match=rf"{bad}:2: field 'prompt' \(prompt\) is missing.*"
                                        "needs only its prompt.*present fields: text"):
        make_task((pipe, bad), tmp_path)
    # an offline objective on the same prompt-only file names the image field it lacks
    with pytest.raises(DataError, match=rf"{prompts}:1: field 'chosen'"):
        diffusion_task(DiffusionConfig.from_dict(
            config_tree(pipe, prompts, tmp_path / "dpo")), Accelerator())


def test_an_error_in_a_step_scorer_names_the_scorer():
    import sys

    from preftune.diffusion.step_scorers import FunctionStepScorer

    def down(prompts, images, timesteps):
        raise RuntimeError("scorer backend down")

    with pytest.raises(RuntimeError, match="scorer backend down") as raised:
        FunctionStepScorer(down, "mymod:down").score(["a red circle"], torch.zeros(1, 3, 4, 4),
                                                      [0])
    if sys.version_info >= (3, 11):
        assert raised.value.__notes__ == ["(raised by scorer 'mymod:down' while scoring a batch "
                                          "of prompt 'a red circle')"]


def test_a_missing_step_aware_model_is_named_by_its_config_key(tmp_path, monkeypatch):
    from preftune.diffusion.step_scorers import step_scorer

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="^objective.scorer: 'runs/nonexist' is not a "
                                                "local model directory"):
        step_scorer("spm:runs/nonexist")
    with pytest.raises(ConfigError, match="expected shape_colour, spm:PATH or module:function"):
        step_scorer("no_such_module_here:f")
