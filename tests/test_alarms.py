"""Alarms fire on constructed failures and stay quiet on a healthy run."""

import json
import math

import torch

from preftune.cli import main
from preftune.train.alarms import Alarms, WeightProbe
from tiny_models import yes_no_workspace


def healthy(step, accuracy=0.8):
    return {"step": step, "loss": 0.6, "rewards/chosen": 0.05, "rewards/rejected": -0.04,
            "rewards/accuracies": accuracy, "logps/chosen": -10.0, "logps/ref_chosen": -10.5}


def test_quiet_on_a_healthy_run(tmp_path):
    alarms = Alarms(tmp_path / "alarms.jsonl", needs_reference=True, chance_window=5)
    assert all(alarms.check(healthy(step), ["a:1"]) == [] for step in range(1, 30))
    assert not (tmp_path / "alarms.jsonl").exists()


def test_policy_not_moving(tmp_path):
    alarms = Alarms(tmp_path / "alarms.jsonl", needs_reference=True)
    frozen = {**healthy(1), "rewards/chosen": 0.0, "rewards/rejected": 0.0}
    assert alarms.check(frozen, []) == []  # step 1: rewards are 0 by construction
    assert alarms.check({**frozen, "step": 2}, []) == []
    raised = alarms.check({**frozen, "step": 3}, [])
    assert [a["kind"] for a in raised] == ["policy_not_moving"]
    assert alarms.check({**frozen, "step": 4}, []) == []  # once per run
    logged = [json.loads(x) for x in (tmp_path / "alarms.jsonl").read_text().splitlines()]
    assert logged[0]["step"] == 3 and "learning rate" in logged[0]["message"]


def test_reference_free_runs_never_raise_policy_not_moving(tmp_path):
    alarms = Alarms(tmp_path / "alarms.jsonl", needs_reference=False)
    record = {"step": 5, "loss": 0.7, "rewards/chosen": 0.0, "rewards/rejected": 0.0}
    assert alarms.check(record, []) == []


def test_likelihood_displacement(tmp_path):
    alarms = Alarms(tmp_path / "alarms.jsonl", needs_reference=True, displacement_nats=5.0)
    assert alarms.check({**healthy(1), "logps/chosen": -14.9, "logps/ref_chosen": -10.0}, []) == []
    raised = alarms.check({**healthy(2), "logps/chosen": -15.5, "logps/ref_chosen": -10.0}, [])
    assert [a["kind"] for a in raised] == ["likelihood_displacement"]
    assert "5.5 nats" in raised[0]["message"]


def test_non_finite_loss_names_the_examples_every_time(tmp_path):
    alarms = Alarms(tmp_path / "alarms.jsonl", needs_reference=True)
    for step in (1, 2):
        raised = alarms.check({**healthy(step), "loss": math.nan}, ["data.jsonl:3", "data.jsonl:9"])
        assert [a["kind"] for a in raised] == ["non_finite_loss"]
        assert "data.jsonl:3" in raised[0]["message"] and "data.jsonl:9" in raised[0]["message"]


def test_accuracy_stuck_at_chance(tmp_path):
    alarms = Alarms(tmp_path / "alarms.jsonl", needs_reference=True, chance_window=4)
    kinds = [a["kind"] for step, acc in enumerate([0.5, 0.45, 0.55, 0.5], 1)
             for a in alarms.check(healthy(step, acc), [])]
    assert kinds == ["accuracy_at_chance"]


class FakeProbe:
    def __init__(self, moved):
        self._moved, self.calls = moved, 0

    def moved(self):
        self.calls += 1
        return self._moved


def test_policy_not_moving_from_unchanged_weights_even_with_nonzero_rewards(tmp_path):
    """On a GPU the reference pass and the training forward round differently, so rewards are
    ~1e-7, not 0, when nothing trains: the unchanged weights still raise the alarm."""
    noisy = {**healthy(3), "rewards/chosen": 3e-7, "rewards/rejected": -2e-7}
    frozen = Alarms(tmp_path / "a.jsonl", needs_reference=True, weights=FakeProbe(moved=False))
    raised = frozen.check(noisy, [])
    assert [a["kind"] for a in raised] == ["policy_not_moving"]
    assert "bit-for-bit unchanged" in raised[0]["message"]
    probe = FakeProbe(moved=True)
    training = Alarms(tmp_path / "b.jsonl", needs_reference=True, weights=probe)
    assert all(training.check({**noisy, "step": s}, []) == [] for s in range(3, 12))
    assert probe.calls == 1  # the weights are read once, not on every step


def test_weight_probe_sees_a_change_in_any_tensor():
    weight, frozen = torch.nn.Parameter(torch.randn(300)), torch.nn.Parameter(torch.randn(5))
    probe = WeightProbe([weight, frozen])
    assert not probe.moved()
    with torch.no_grad():
        weight[3] += 1e-6
    assert probe.moved()


def test_bf16_rounding_away_a_tiny_update_counts_as_not_moving():
    weight = torch.nn.Parameter(torch.full((8,), 0.5, dtype=torch.bfloat16))
    probe = WeightProbe([weight])
    with torch.no_grad():
        weight += 1e-5  # under half a bf16 ulp of 0.5 (2**-9)
    assert not probe.moved()


def test_held_out_answers_that_are_empty_or_stop_ending(tmp_path):
    alarms = Alarms(tmp_path / "alarms.jsonl", needs_reference=True)
    evaluation = {"step": 4, "loss": 0.6, "eval/answers_empty": 0.25, "eval/answers_ended": 1.0}
    assert alarms.check(evaluation, ["a:1"]) == []  # a quarter empty: not yet
    later = {**evaluation, "step": 8, "eval/answers_empty": 0.5, "eval/answers_ended": 0.375}
    assert [a["kind"] for a in alarms.check(later, ["a:1"])] == ["answers_empty",
                                                                 "answers_unended"]
    assert "against 100% at the first evaluation" in (tmp_path / "alarms.jsonl").read_text()
    assert "50% of the held-out answers are empty or only blank space" in \
        (tmp_path / "alarms.jsonl").read_text()  # (whitespace counts: the message says so)
    # answers that never ended from the start are how the model writes, not a change
    quiet = Alarms(tmp_path / "quiet.jsonl", needs_reference=True)
    for step, ended in ((4, 0.25), (8, 0.0)):
        assert quiet.check({"step": step, "loss": 0.6, "eval/answers_ended": ended},
                           ["a:1"]) == []


def test_a_finite_loss_with_a_non_finite_gradient_says_so(tmp_path):
    alarms = Alarms(tmp_path / "alarms.jsonl", needs_reference=True)
    raised = alarms.check({**healthy(1), "grad_norm": math.inf}, ["data.jsonl:4"])
    assert [a["kind"] for a in raised] == ["non_finite_gradient"]
    assert raised[0]["message"].startswith(
        "the loss is finite but the gradient norm is inf; optimizer step skipped.")
    assert raised[0]["message"].endswith("Examples in this batch: data.jsonl:4")


def test_weights_gone_non_finite_are_the_cause_not_the_batch(tmp_path):
    alarms = Alarms(tmp_path / "alarms.jsonl", needs_reference=True)
    raised = alarms.check({**healthy(2), "loss": math.nan}, ["data.jsonl:3"], diverged=True)
    assert [a["kind"] for a in raised] == ["weights_non_finite"]
    assert "data.jsonl:3" not in raised[0]["message"]
    probe = WeightProbe([torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(70))])
    assert probe.non_finite().item() == 0
    with torch.no_grad():
        probe.parameters[1][69] = math.inf  # past the 64 numbers the probe copies
    assert probe.non_finite().item() == 1


def test_a_run_whose_weights_blow_up_stops_without_saving_a_model(tmp_path, capsys):
    root = yes_no_workspace(tmp_path, with_config=True)
    code = main(["train", str(root / "config.yaml"), "--set", "train.learning_rate=1e38",
                 "--set", "train.max_steps=4", "--set", "train.batch_size=2"])
    assert code == 1
    assert capsys.readouterr().err.splitlines()[-1].startswith(
        "stopped in step 2 of 4: the trainable weights became NaN or inf (see the "
        "weights_non_finite alarm); the model was not saved.")
    logged = [json.loads(line) for line in (root / "run" / "alarms.jsonl").read_text().splitlines()]
    assert [(a["kind"], a["step"]) for a in logged] == [("weights_non_finite", 2)]
    assert not (root / "run" / "model").exists() and not (root / "run" / "run.json").exists()


def test_a_run_whose_every_step_is_skipped_stops_without_saving_a_model(tmp_path, capsys,
                                                                        monkeypatch):
    """(Each step's gradient was NaN, each step was skipped with an alarm, and the run ended
    'done', exit 0, its starting model saved as if trained.)"""
    from dataclasses import replace

    from preftune.objectives import registry
    from preftune.objectives.registry import ObjectiveOutput
    from preftune.train.stopping import SkippedSteps

    def sqrt_at_zero(inputs, params):  # a finite loss (0) whose slope is not finite
        logps = inputs.policy.logps
        return ObjectiveOutput(torch.sqrt((logps * 0.0).abs()).sum(-1), logps.detach())

    monkeypatch.setitem(registry.REGISTRY, "dpo", replace(registry.REGISTRY["dpo"],
                                                          fn=sqrt_at_zero))
    root = yes_no_workspace(tmp_path, with_config=True)
    code = main(["train", str(root / "config.yaml"), "--set", "train.max_steps=3",
                 "--set", "train.batch_size=2"])
    assert code == 1
    assert capsys.readouterr().err.splitlines()[-1].startswith(
        "stopped in step 3: the last 3 steps were all skipped, their loss or gradient not "
        "finite (see the alarms), so nothing trains; the model was not saved.")
    assert not (root / "run" / "model").exists() and not (root / "run" / "run.json").exists()
    skipped = SkippedSteps(steps_left=100)  # a long run: 10 in a row; a good step resets it
    healthy_step, bad_step = {"loss": 0.7, "grad_norm": 1.0}, {"loss": 0.7, "grad_norm": math.inf}
    assert [skipped.after(k, bad_step if k != 5 else healthy_step) is None
            for k in range(16)] == [True] * 15 + [False]
