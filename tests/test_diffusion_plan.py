"""``preftune diffusion train --plan``: its total against the tensor bytes two real training
steps peak at (the CPU allocator's count), for full fine-tuning and LoRA, with a live
reference, with none (MaPO), ranked lists of different lengths, gradient checkpointing and
SPO (which samples inside the step); and a plan writes nothing."""

import json

import pytest
import torch

pytest.importorskip("diffusers")

import preftune.diffusion.train as diffusion_train  # noqa: E402
from diffusion_fixtures import (config_tree, one_thread, write_pairs,  # noqa: E402, F401
                                write_prompts)
from preftune import api  # noqa: E402
from preftune.cli import main  # noqa: E402
from preftune.diffusion.config import DiffusionConfig  # noqa: E402
from preftune.diffusion.tiny import build_tiny_pipeline  # noqa: E402
from preftune.train.peak import peak_allocated  # noqa: E402
from test_diffusion_ranked import write_ranked  # noqa: E402
from test_diffusion_spo import PROMPTS, SMALL  # noqa: E402

RESOLUTION = 32


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A pixel-space pipeline wide enough (width 64) for MiB-sized figures at 32 x 32."""
    root = tmp_path_factory.mktemp("diffusion_plan")
    pipeline = build_tiny_pipeline(root / "pipe", ["red", "green", "blue", "a", "circle",
                                                   "square", "triangle"], RESOLUTION,
                                   width=64)
    return pipeline, write_pairs(root / "data", count=6)


def tree(files, output_dir, **sections):
    tree = config_tree(*files, output_dir, **{
        **sections, "train": {"batch_size": 4, **sections.get("train", {})}})
    tree["data"]["resolution"] = RESOLUTION
    return tree


def planned_total(printed: str) -> float:
    return float(next(line for line in printed.splitlines()
                      if line.startswith("  total")).split()[1])


def test_plan_names_the_run_and_writes_nothing(files, tmp_path, capsys):
    config = DiffusionConfig.from_dict(tree(files, tmp_path / "run"))
    assert main(["diffusion", "train", "--plan", "--set", f"model.path={files[0]}",
                 "--set", f"data.train={files[1]}", "--set", f"data.resolution={RESOLUTION}",
                 "--set", f"output_dir={tmp_path / 'run'}"]) == 0
    printed = capsys.readouterr().out
    assert "objective          diffusion_dpo (image pairs, needs reference)" in printed
    assert f"images             {RESOLUTION} x {RESOLUTION}, 4 examples a micro-batch, the " \
        "largest" in printed
    assert "with checkpointing" in printed
    assert not (tmp_path / "run").exists() and config.output_dir == str(tmp_path / "run")
    api.train_diffusion(tree(files, tmp_path / "run"), plan_only=True)  # a dict, from Python
    counted = [line for line in printed[printed.index("objective "):].splitlines()
               if not line.startswith(("  step", "  total", "  with"))]  # (not the measured)
    assert len(counted) == 8  # objective, reference, images, parameters, memory: 4 lines
    assert set(counted) <= set(capsys.readouterr().out.splitlines())
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("sections", [
    pytest.param({}, id="full-live-reference"),
    pytest.param({"model": {"lora": {"r": 8, "alpha": 8}}}, id="lora-adapter-off",
                 marks=pytest.mark.slow),  # (the slowest three: `pytest -m slow`)
    pytest.param({"objective": {"name": "mapo"}}, id="mapo-no-reference"),
    pytest.param({"train": {"gradient_checkpointing": True}}, id="checkpointing"),
    # three lists of 3, 4 and 2 images, all in each step: the line through one list and two
    # meets nine images
    pytest.param({"objective": {"name": "rank_dpo"}, "train": {"batch_size": 3}},
                 id="ranked-lists", marks=pytest.mark.slow),
    pytest.param({"objective": {"name": "spo", **SMALL}, "train": {"batch_size": 2}},
                 id="spo-samples-in-the-step", marks=pytest.mark.slow),
])
def test_plan_total_is_within_a_few_percent_of_two_real_steps(files, tmp_path, capsys,
                                                              monkeypatch, sections):
    name = sections.get("objective", {}).get("name")
    if name == "rank_dpo":
        files = (files[0], write_ranked(tmp_path / "lists"))  # lists of 3, 4 and 2 images
    if name == "spo":  # prompts alone: the step samples, then trains on the sampled pairs
        files = (files[0], write_prompts(tmp_path / "prompts", PROMPTS))
    config = tree(files, tmp_path / "planned", **sections)
    diffusion_train.train_diffusion(DiffusionConfig.from_dict(config), plan_only=True,
                                    show_progress=False)
    planned = planned_total(capsys.readouterr().out)

    found = {}

    class Measured(diffusion_train.Trainer):
        def run(self, before_step=None):
            """The steps alone (nothing saved), and the weights they start from."""
            def steps():
                for step in range(self.total_steps):
                    self.step(step)

            held = [*self.task.module.parameters(), *self.task.module.buffers()]
            if self.task.reference is not None:
                held += list(self.task.reference.parameters())
            found["weights"] = sum(t.numel() * t.element_size() for t in held)
            found["steps"] = peak_allocated(steps, torch.device("cpu"))

    monkeypatch.setattr(diffusion_train, "Trainer", Measured)
    diffusion_train.train_diffusion(DiffusionConfig.from_dict(
        tree(files, tmp_path / "measured", **sections)), show_progress=False)
    measured = (found["weights"] + found["steps"]) / 2**20
    assert planned == pytest.approx(measured, rel=0.05)


def online_plan(files, tmp_path, capsys, **online) -> str:
    """What ``diffusion online --plan`` prints for 2 prompts x 3 seeds (and ``online``)."""
    prompts = write_prompts(tmp_path / "prompts", ["a red circle", "a blue square"])
    config = tmp_path / "online.yaml"
    config.write_text(json.dumps({
        "output_dir": str(tmp_path / "online"), "model": {"path": str(files[0])},
        "data": {"train": str(prompts), "resolution": RESOLUTION},
        "objective": {"name": "rank_dpo"}, "train": {"batch_size": 2, "max_steps": 1},
        "online": {"rounds": 1, "seeds": [0, 1, 2], **online}}))
    assert main(["diffusion", "online", str(config), "--plan"]) == 0
    return capsys.readouterr().out


def test_online_plan_is_train_plan_on_lists_like_its_samples(files, tmp_path, capsys):
    printed = online_plan(files, tmp_path, capsys)
    assert "rounds             1, 2 prompts x 3 samples (25 steps) ranked by shape_colour" \
        in printed
    assert "training (round 1, on lists of 3 images):" in printed
    assert not (tmp_path / "online").exists()
    # `diffusion train --plan` on two lists of three images of the prompts
    lists = write_ranked(tmp_path / "lists", [("red", ["red", "blue", "green"], [1.0, 0.5, 0.0]),
                                              ("blue", ["blue", "red", "green"], [1.0, 0.5, 0.0])])
    diffusion_train.train_diffusion(DiffusionConfig.from_dict(tree(
        (files[0], lists), tmp_path / "offline", objective={"name": "rank_dpo"},
        train={"batch_size": 2})), plan_only=True)
    offline = capsys.readouterr().out
    training = printed[printed.index("objective "):]
    assert training.splitlines()[:8] == offline[offline.index("objective "):].splitlines()[:8]
    assert planned_total(training) == pytest.approx(planned_total(offline), rel=0.02)


@pytest.mark.slow  # (a real round's ranking: `pytest -m slow`)
def test_online_plan_ranking_memory_is_near_a_real_rounds_ranking_peak(files, tmp_path,
                                                                       capsys):
    """The ranking section (the pipeline, the scorers and one batch, measured with one
    denoising step) against the tensor bytes a real round's ranking peaks at on CPU, from
    before its pipeline loads: 2 prompts x 3 seeds in batches of 4, with guidance."""
    from common import PhaseMemory

    from preftune.diffusion.ranking import make_ranked_lists

    printed = online_plan(files, tmp_path, capsys, steps=3, batch_size=4,
                          guidance_scale=2.0).splitlines()
    section = printed[next(i for i, line in enumerate(printed)
                           if line.startswith("ranking memory")):]
    assert section[0] == ("ranking memory (MiB, each round; the pipeline in float32 without "
                          "gradients, and the scorers):")
    assert section[3].startswith("  sampling ") and "4 images at 32 px a batch" in section[3]
    memory = PhaseMemory("tensors")
    make_ranked_lists(["a red circle", "a blue square"], [str(files[0])], ["shape_colour"],
                      [0, 1, 2], tmp_path / "ranked", steps=3, guidance_scale=2.0,
                      dtype="float32", batch_size=4)
    measured = memory.stop()["setup"]
    assert planned_total("\n".join(section)) == pytest.approx(measured, rel=0.05)


@pytest.mark.parametrize("objective", [pytest.param("longalign", marks=pytest.mark.slow),
                                       "spo"])
def test_plan_counts_the_frozen_scorer_the_step_keeps_on_the_device(files, tmp_path, capsys,
                                                                    objective):
    """LongAlign's reward model and SPO's spm: scorer stay on the device for the whole run:
    their weights are in the plan's total (they were left out), and only theirs."""
    from accelerate import Accelerator

    from diffusion_fixtures import tiny_clip_dir
    from preftune.diffusion.plan import held_weights
    from preftune.diffusion.train import diffusion_task
    from test_diffusion_longalign import SMALL as LONGALIGN_SMALL

    clip = tiny_clip_dir(tmp_path / "clip")
    params = ({"reward_model": str(clip), **LONGALIGN_SMALL} if objective == "longalign" else
              {"scorer": f"spm:{clip}", **SMALL})
    prompts = write_prompts(tmp_path / "prompts", PROMPTS)
    config = DiffusionConfig.from_dict(tree((files[0], prompts), tmp_path / "run", objective={
        "name": objective, **params}, train={"batch_size": 2}))
    task = diffusion_task(config, Accelerator())[0]
    scorer = task.reward.model if objective == "longalign" else task.scorer.model
    expected = sum(t.numel() * t.element_size()
                   for t in (*scorer.parameters(), *scorer.buffers()))
    assert expected > 0 and held_weights(task) == expected
    plain = diffusion_task(DiffusionConfig.from_dict(tree(files, tmp_path / "plain")),
                           Accelerator())[0]
    assert held_weights(plain) == 0  # the pipeline and the reference are not counted twice
    diffusion_train.train_diffusion(config, plan_only=True, show_progress=False)
    printed = capsys.readouterr().out
    setting = "objective.reward_model" if objective == "longalign" else "objective.scorer"
    assert f"  scorer           {expected / 2**20:10.0f}  (frozen, on the device: {setting})" \
        in printed
