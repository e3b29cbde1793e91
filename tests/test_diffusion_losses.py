"""Each diffusion objective against a hand-written computation of its formula, with the same
noise and timesteps: values and a gradient. The reference strategies give the reference they
promise."""

import math

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("diffusers")

from accelerate import Accelerator  # noqa: E402

from diffusion_fixtures import (assert_same_gradient, config_tree, hand_error,  # noqa: E402
                                one_thread, tiny_pipeline, write_pairs)  # noqa: F401
from preftune.diffusion.config import DiffusionConfig  # noqa: E402
from preftune.diffusion.losses import DIFFUSION_LOSSES  # noqa: E402
from preftune.diffusion.model import load_diffusion_model  # noqa: E402
from preftune.diffusion.train import diffusion_task  # noqa: E402


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("diffusion")
    return tiny_pipeline(root / "pipe"), write_pairs(root / "data", count=3, captions=True), root


def make_task(files, name, tmp_path, perturb=True, **sections):
    pipe, pairs, _ = files
    tree = config_tree(pipe, pairs, tmp_path / "run", objective={"name": name, **sections.pop(
        "params", {})}, **sections)
    task, _ = diffusion_task(DiffusionConfig.from_dict(tree), Accelerator())
    if perturb:  # policy != reference, so every term of the formula matters
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for parameter in task.module.denoiser.parameters():
                if parameter.requires_grad:
                    parameter.add_(0.02 * torch.randn(parameter.shape, generator=generator))
    return task


def shared_inputs(task):
    batch = task.make_batch(task.train_examples)
    noise = torch.randn((3, 3, 16, 16), generator=torch.Generator().manual_seed(7))
    timesteps = torch.tensor([10, 500, 990])
    paths = {side: [f"{p.base_dir}/{getattr(p, side)}" for p in task.train_examples]
             for side in ("chosen", "rejected")}
    return batch, noise, timesteps, paths


def check(task, expected_fn, captions=False):
    """The task's losses and d loss / d conv_in.weight equal those of ``expected_fn(errors)``
    on hand-computed errors."""
    batch, noise, timesteps, paths = shared_inputs(task)
    model, weight = task.module, task.module.denoiser.conv_in.weight
    losses, metrics = task.losses_with(model, batch, noise, timesteps)
    texts = {side: [p.caption(side) if captions else p.prompt for p in task.train_examples]
             for side in ("chosen", "rejected")}
    # both sides in one batch of 2E, as the task runs them: per-example math is the same in any
    # batch, and float32 sums then round alike (beta/2 = 100 and T c = 700 magnify rounding);
    # the chosen side alone for an objective that reads no rejected image (denoising)
    sides = ("chosen", "rejected") if task.spec.uses_rejected else ("chosen",)
    both = ([path for side in sides for path in paths[side]],
            [text for side in sides for text in texts[side]],
            torch.cat([noise] * len(sides)), torch.cat([timesteps] * len(sides)))
    errors = dict(zip(("policy_chosen", "policy_rejected"),
                      hand_error(model.denoiser, model, *both).chunk(len(sides))))
    if task.reference is not None:
        with torch.no_grad():
            errors.update(zip(("reference_chosen", "reference_rejected"),
                              hand_error(task.reference, model, *both).chunk(2)))
    expected = expected_fn(errors)
    # (1e-4: float32 kernels differ between CPUs, AVX2 against AVX-512, by about 1e-5 once
    # mapo's T c = 700 magnifies them)
    torch.testing.assert_close(losses, expected, rtol=1e-4, atol=1e-6)
    assert_same_gradient(losses, expected, weight)  # (exp - 1 vs expm1, the order of sums)
    return losses, metrics, errors


def dpo_by_hand(beta):
    def loss(e):
        inside = -0.5 * beta * ((e["policy_chosen"] - e["reference_chosen"])
                                - (e["policy_rejected"] - e["reference_rejected"]))
        return -torch.log(torch.sigmoid(inside))
    return loss


def test_paper_defaults():
    assert DIFFUSION_LOSSES["diffusion_dpo"].defaults() == {"beta": 5000.0}
    assert DIFFUSION_LOSSES["mapo"].defaults() == {"beta": 0.1, "snr_value": 0.5}
    assert DIFFUSION_LOSSES["dcpo"].captions and not DIFFUSION_LOSSES["mapo"].needs_reference


def test_diffusion_dpo_matches_formula(files, tmp_path):
    task = make_task(files, "diffusion_dpo", tmp_path, params={"beta": 200.0})
    losses, metrics, e = check(task, dpo_by_hand(200.0))
    chosen = -100.0 * (e["policy_chosen"] - e["reference_chosen"])
    rejected = -100.0 * (e["policy_rejected"] - e["reference_rejected"])
    torch.testing.assert_close(metrics["rewards/chosen"][0], chosen.sum().detach(), rtol=1e-5,
                               atol=1e-5)
    torch.testing.assert_close(metrics["rewards/margins"][0], (chosen - rejected).sum().detach(),
                               rtol=1e-5, atol=1e-5)
    assert metrics["rewards/accuracies"][0].item() == float((chosen > rejected).sum())


def test_dcpo_conditions_each_side_on_its_caption(files, tmp_path):
    task = make_task(files, "dcpo", tmp_path, params={"beta": 200.0})
    check(task, dpo_by_hand(200.0), captions=True)
    prompt_conditioned = make_task(files, "diffusion_dpo", tmp_path / "b", params={"beta": 200.0})
    batch, noise, timesteps, _ = shared_inputs(task)
    dcpo_losses = task.losses_with(task.module, batch, noise, timesteps)[0]
    assert batch.rejected_text != [p.prompt for p in task.train_examples]
    batch = prompt_conditioned.make_batch(task.train_examples)
    assert batch.rejected_text == [p.prompt for p in task.train_examples]
    dpo_losses = prompt_conditioned.losses_with(prompt_conditioned.module, batch, noise,
                                                timesteps)[0]
    assert not torch.allclose(dcpo_losses, dpo_losses)  # the rejected captions differ


def test_mapo_matches_formula(files, tmp_path):
    task = make_task(files, "mapo", tmp_path, params={"beta": 0.5, "snr_value": 0.7})
    assert task.reference is None

    def by_hand(e):
        c = 0.7
        odds = (c * e["policy_chosen"] / (math.e ** (c * e["policy_chosen"]) - 1)
                - c * e["policy_rejected"] / (math.e ** (c * e["policy_rejected"]) - 1))
        return e["policy_chosen"] - 0.5 * F.logsigmoid(1000 * odds)

    losses, metrics, e = check(task, by_hand)
    assert "denoise/reference_chosen" not in metrics


def test_denoising_is_the_chosen_error(files, tmp_path):
    task = make_task(files, "denoising", tmp_path)
    check(task, lambda e: e["policy_chosen"])


def test_live_reference_is_the_initial_denoiser(files, tmp_path):
    task = make_task(files, "diffusion_dpo", tmp_path)
    initial = load_diffusion_model(files[0]).denoiser
    for (name, a), (_, b) in zip(task.reference.named_parameters(), initial.named_parameters()):
        torch.testing.assert_close(a, b, msg=name)
    assert not any(p.requires_grad for p in task.reference.parameters())


def test_adapter_off_reference_is_the_base_denoiser(files, tmp_path):
    pytest.importorskip("peft")
    task = make_task(files, "diffusion_dpo", tmp_path, perturb=False,
                     model={"lora": {"r": 4, "alpha": 8}})
    assert task.reference_strategy == "adapter-off" and task.reference is None
    with torch.no_grad():  # gaussian-initialised A, zero B: make the adapters do something
        for name, parameter in task.module.denoiser.named_parameters():
            if "lora_B" in name:
                parameter.add_(0.05)
    base = load_diffusion_model(files[0]).denoiser
    task.reference = base  # the hand computation's reference: the untouched base
    batch, noise, timesteps, _ = shared_inputs(task)
    losses, metrics = task.losses_with(task.module, batch, noise, timesteps)
    task.reference_strategy = "live"
    expected, _ = task.losses_with(task.module, batch, noise, timesteps)
    torch.testing.assert_close(losses, expected)
    assert metrics["denoise/policy_chosen"][0] != metrics["denoise/reference_chosen"][0]
    trainable = [n for n, p in task.module.named_parameters() if p.requires_grad]
    assert trainable and all("lora" in n for n in trainable)
