"""Objectives that keep a state across steps (BCO's running mean reward, group-robust DPO's
mirror-ascent weights), over several batches, against plain-Python computations of the papers'
updates; evaluation reads the state without moving it."""

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from objective_cases import CASES, log_sigmoid, pair_inputs
from safetensors.torch import load_file
from test_objectives_unpaired import CASES as UNPAIRED, unpaired_inputs
from test_train_loop import (assert_same_weights, crashed_run, resume, run,  # noqa: F401
                             workspace)

import preftune
from preftune.config import ObjectiveConfig as ObjectiveItem
from preftune.config_schema import json_schema
from preftune.objectives import get_objective
from preftune.objectives.compose import Objective
from preftune.objectives.pairwise_extra import GroupRobustDPOParams
from preftune.objectives.state import GroupWeights, RunningMean
from preftune.objectives.unpaired import BCOParams
from preftune.train.logging import read_metrics

# --- BCO: delta = the mean of every reward seen in training so far ------------------------------

BCO_BATCHES = [UNPAIRED[:3], UNPAIRED[3:5], UNPAIRED[5:]]


def bco_losses(batch, beta, delta):
    losses = []
    for policy, reference, _, _, _, label in batch:
        z = beta * (policy - reference) - delta
        losses.append(-log_sigmoid(z) if label else -log_sigmoid(-z))
    return losses


def test_bco_shifts_by_the_running_mean_of_every_reward_so_far():
    bco, params, state = get_objective("bco"), BCOParams(0.1), RunningMean()
    seen = []
    for batch in BCO_BATCHES:
        inputs, _ = unpaired_inputs(batch, kl=False)
        inputs.state = state
        losses = bco(inputs, params).losses
        seen += [params.beta * (c[0] - c[1]) for c in batch]
        delta = sum(seen) / len(seen)  # this batch's rewards included
        assert losses.tolist() == pytest.approx(bco_losses(batch, params.beta, delta), rel=1e-5)
    assert state.mean.item() == pytest.approx(delta, rel=1e-6)
    assert state.count.item() == len(UNPAIRED)


def test_bco_evaluation_uses_the_mean_training_left_and_does_not_move_it():
    bco, params, state = get_objective("bco"), BCOParams(0.1), RunningMean()
    trained, _ = unpaired_inputs(UNPAIRED[:3], kl=False)
    trained.state = state
    bco(trained, params)
    delta = sum(0.1 * (c[0] - c[1]) for c in UNPAIRED[:3]) / 3
    held_out, _ = unpaired_inputs(UNPAIRED[3:], kl=False)
    held_out.state, held_out.training = state, False
    losses = bco(held_out, params).losses
    assert losses.tolist() == pytest.approx(bco_losses(UNPAIRED[3:], 0.1, delta), rel=1e-5)
    assert state.mean.item() == pytest.approx(delta, rel=1e-6) and state.count.item() == 3


# --- group-robust DPO: alpha = softmax(eta * the sum of each group's batch losses) --------------

GROUP_BATCHES = [(CASES[:3], [0.0, 1.0, 0.0]), (CASES[3:5], [1.0, 1.0]),
                 (CASES[5:] + CASES[:1], [0.0, 0.0])]


def robust_losses(cases, groups, p, cumulative, data_counts=None):
    """This batch's per-example losses after alpha steps on it; ``cumulative`` {g: sum of eta
    (L_g + c / sqrt(N_g))} over every group of the data, updated in place (L_g = 0 when g is not
    in the batch). With ``data_counts`` {g: N_g}, L_g = N / N_g x the group's loss sum."""
    base = [-log_sigmoid(p.beta * ((c[0] - c[2]) - (c[1] - c[3]))) for c in cases]
    factor = {}
    for g in cumulative:
        members = [b for b, gi in zip(base, groups) if gi == g]
        factor[g] = (sum(data_counts.values()) / data_counts[g] if p.divide_by_totalcount
                     else 1 / max(len(members), 1))
        adjusted = p.adjustment / math.sqrt(data_counts[g]) if p.adjustment else 0.0
        cumulative[g] += p.step_size * (sum(members) * factor[g] + adjusted)
    total = sum(math.exp(v) for v in cumulative.values())
    alpha = {g: math.exp(v) / total for g, v in cumulative.items()}
    return [b * alpha[g] * len(cases) * factor[g] for b, g in zip(base, groups)]


def test_group_weights_carry_over_steps_and_count_every_group_of_the_data():
    """Group 2 is in the data but in no batch: it keeps the starting weight, and alpha is
    normalised over it too (as in the paper, which starts uniform over all groups)."""
    objective, params = get_objective("group_robust_dpo"), GroupRobustDPOParams(0.1, 2.0)
    data = [SimpleNamespace(scores={"group": g}) for g in (0.0, 1.0, 2.0, 1.0)]
    state, cumulative = GroupWeights(data), {0.0: 0.0, 1.0: 0.0, 2.0: 0.0}
    for cases, groups in GROUP_BATCHES:
        inputs, _ = pair_inputs(cases, scores={"group": groups})
        inputs.state = state
        expected = robust_losses(cases, groups, params, cumulative)
        assert objective(inputs, params).losses.tolist() == pytest.approx(expected, rel=1e-5)
    assert state.ids.tolist() == [0.0, 1.0, 2.0]
    assert state.log_weights.tolist() == pytest.approx([cumulative[g] for g in (0.0, 1.0, 2.0)],
                                                       rel=1e-5)


@pytest.mark.parametrize("params", [GroupRobustDPOParams(0.1, 0.05, divide_by_totalcount=True),
                                    GroupRobustDPOParams(0.1, 2.0, adjustment=3.0),
                                    GroupRobustDPOParams(0.5, 0.1, True, 1.0)])
def test_group_losses_scale_by_the_datas_group_counts_and_the_step_favours_small_groups(params):
    """divide_by_totalcount: L_g = N / N_g x the group's batch loss sum (N_g of the N training
    examples in group g); adjustment c: alpha steps on L_g + c / sqrt(N_g)."""
    objective = get_objective("group_robust_dpo")
    data = [SimpleNamespace(scores={"group": g}) for g in [0.0] * 5 + [1.0] * 2 + [2.0]]
    state, cumulative = GroupWeights(data), {0.0: 0.0, 1.0: 0.0, 2.0: 0.0}
    for cases, groups in GROUP_BATCHES:
        inputs, _ = pair_inputs(cases, scores={"group": groups})
        inputs.state = state
        expected = robust_losses(cases, groups, params, cumulative, {0.0: 5, 1.0: 2, 2.0: 1})
        assert objective(inputs, params).losses.tolist() == pytest.approx(expected, rel=1e-5)
    assert state.log_weights.tolist() == pytest.approx([cumulative[g] for g in (0.0, 1.0, 2.0)],
                                                       rel=1e-5)
    assert set(state.state_dict()) == {"ids", "log_weights"}  # the counts are the data's


def test_counts_of_the_data_are_made_again_on_resume_and_a_group_without_one_is_refused():
    params = GroupRobustDPOParams(0.1, 1.0, divide_by_totalcount=True)
    data = [SimpleNamespace(scores={"group": g}) for g in (0.0, 0.0, 1.0)]
    state = GroupWeights(data)
    inputs, _ = pair_inputs(CASES[:3], scores={"group": [0.0, 1.0, 0.0]})
    inputs.state = state
    get_objective("group_robust_dpo")(inputs, params)
    resumed = GroupWeights(data)
    resumed.load_state_dict(state.state_dict())
    assert resumed.counts.tolist() == [2.0, 1.0] and torch.equal(resumed.log_weights,
                                                                 state.log_weights)
    held_out, _ = pair_inputs(CASES[3:5], scores={"group": [1.0, 7.0]})
    held_out.state, held_out.training = state, False
    with pytest.raises(ValueError, match=r"group\(s\) \[7.0\] have none there"):
        get_objective("group_robust_dpo")(held_out, params)


def test_group_weights_in_evaluation_are_read_and_an_unknown_group_starts_at_zero():
    objective, params = get_objective("group_robust_dpo"), GroupRobustDPOParams(0.1, 2.0)
    state = GroupWeights([SimpleNamespace(scores={"group": g}) for g in (0.0, 1.0)])
    trained, _ = pair_inputs(CASES[:3], scores={"group": [0.0, 1.0, 0.0]})
    trained.state = state
    objective(trained, params)
    before = state.log_weights.clone()
    cases, groups = CASES[3:6], [1.0, 5.0, 5.0]  # group 5: only in the held-out data
    held_out, _ = pair_inputs(cases, scores={"group": groups})
    held_out.state, held_out.training = state, False
    weights = {0.0: math.exp(before[0].item()), 1.0: math.exp(before[1].item()), 5.0: 1.0}
    alpha = {g: w / sum(weights.values()) for g, w in weights.items()}
    base = [-log_sigmoid(0.1 * ((c[0] - c[2]) - (c[1] - c[3]))) for c in cases]
    expected = [b * alpha[g] * 3 / groups.count(g) for b, g in zip(base, groups)]
    assert objective(held_out, params).losses.tolist() == pytest.approx(expected, rel=1e-5)
    assert torch.equal(state.log_weights, before) and state.ids.tolist() == [0.0, 1.0]


# --- the machinery: one state per term, in and out of checkpoints -------------------------------

def test_a_composed_objective_gives_each_stateful_term_its_own_state_and_saves_them():
    items = [ObjectiveItem(name="group_robust_dpo", step_size=1.0),
             ObjectiveItem(name="dpo", weight=0.5), ObjectiveItem(name="group_robust_dpo")]
    data = [SimpleNamespace(scores={"group": g}) for g in (0.0, 1.0)]
    objective = Objective.from_config(items, total_steps=3, examples=data)
    assert objective.has_state and objective.terms[1].state is None
    inputs, _ = pair_inputs(CASES[:4], scores={"group": [0.0, 1.0, 1.0, 0.0]})
    objective(inputs)
    saved = objective.state_dict()
    assert sorted(saved) == ["0.ids", "0.log_weights", "2.ids", "2.log_weights"]
    # step sizes 1.0 and 0.01: each term moved its own weights
    assert saved["0.log_weights"].tolist() == pytest.approx(
        (100 * saved["2.log_weights"]).tolist(), rel=1e-5)
    fresh = Objective.from_config(items, total_steps=3, examples=data)
    fresh.load_state_dict(saved)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in saved.items())
    assert not Objective.from_config([ObjectiveItem(name="dpo")], total_steps=3).has_state


def test_an_objective_called_on_its_own_starts_a_fresh_state_each_call():
    inputs, _ = unpaired_inputs(UNPAIRED[:3], kl=False)
    first = get_objective("bco")(inputs, BCOParams()).losses
    assert torch.equal(get_objective("bco")(inputs, BCOParams()).losses, first)
    assert inputs.state is None


def test_user_objectives_declare_a_state_and_a_wrong_one_is_refused(registries):
    class Count(preftune.ObjectiveState):
        def __init__(self, examples=()):
            self.calls = torch.zeros(())

    @preftune.register_objective(needs_reference=False, state=Count)
    def counting_test_objective(inputs, params):
        inputs.state.calls = inputs.state.calls + 1
        rewards = inputs.policy.logps
        return preftune.ObjectiveOutput(-rewards[:, 0], rewards)

    objective = Objective.from_config([ObjectiveItem(name="counting_test_objective")], 2)
    inputs, _ = pair_inputs(CASES[:2], reference=False)
    objective(inputs)
    objective(inputs)
    assert objective.state_dict() == {"0.calls": torch.tensor(2.0)}
    # without a docstring it is listed with an empty summary (the schema used to fail on it)
    assert '"const": "counting_test_objective"' in json.dumps(json_schema("train"))
    with pytest.raises(TypeError, match="not a subclass of preftune.ObjectiveState"):
        @preftune.register_objective(needs_reference=False, state=dict)
        def stateless_test_objective(inputs, params):
            return counting_test_objective(inputs, params)
    with pytest.raises(ValueError, match="whole_batch='processes'; expected False, True, "
                                         "\"gathered\""):
        @preftune.register_objective(needs_reference=False, whole_batch="processes")
        def misdeclared_test_objective(inputs, params):
            return counting_test_objective(inputs, params)


# --- in the real loop: resumed runs continue the state, evaluation leaves it --------------------

STATEFUL_RUNS = {  # objective -> the data settings it trains on
    "bco": lambda workspace: {"data__convert": "unpaired"},
    "group_robust_dpo": lambda workspace: {"data__train": str(grouped_pairs(workspace))},
}


def grouped_pairs(workspace: Path) -> Path:
    """The workspace's pairs, each in one of three groups."""
    path = workspace / "grouped.jsonl"
    rows = [json.loads(line) for line in (workspace / "pairs.jsonl").read_text().splitlines()]
    path.write_text("".join(json.dumps({**row, "group": i % 3}) + "\n"
                            for i, row in enumerate(rows)))
    return path


def stateful_settings(name: str, workspace: Path) -> dict:
    params = {"step_size": 0.5, "divide_by_totalcount": True, "adjustment": 1.0} \
        if name == "group_robust_dpo" else {"beta": 1.0}
    return {"objective": {"name": name, **params}, **STATEFUL_RUNS[name](workspace)}


@pytest.mark.parametrize("name", sorted(STATEFUL_RUNS))
def test_a_resumed_run_continues_the_objective_state_where_it_was_saved(workspace, monkeypatch,
                                                                        name):
    settings = dict(train__max_steps=6, train__save_every=2, train__batch_size=4,
                    train__eval_every=3, train__learning_rate=5e-2,
                    **stateful_settings(name, workspace))
    straight = run(workspace, f"{name}-straight", **settings)
    interrupted = crashed_run(workspace, f"{name}-interrupted", monkeypatch, 4, **settings)
    saved = load_file(interrupted / "checkpoints" / "step-00000004" / "objective.safetensors")
    if name == "bco":  # 4 steps of 4 examples: the mean of 16 rewards
        assert saved["0.count"].item() == 16
    else:
        assert saved["0.ids"].tolist() == [0.0, 1.0, 2.0] and saved["0.log_weights"].min() > 0
    resumed = resume(interrupted)
    logged = read_metrics(straight / "metrics.jsonl")
    for a, b in zip(logged, read_metrics(resumed / "metrics.jsonl"), strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5), a["step"]
    evaluated = {r["step"]: r["eval/loss"] for r in logged if "eval/loss" in r}
    assert sorted(evaluated) == [3, 6]
    assert {r["step"]: r["eval/loss"] for r in read_metrics(resumed / "metrics.jsonl")
            if "eval/loss" in r} == pytest.approx(evaluated, rel=1e-5)
    assert_same_weights(straight, resumed)


def test_a_checkpoint_without_an_objective_state_resumes_with_a_fresh_one(workspace,
                                                                         monkeypatch, capsys):
    """One written before objectives kept a state: resumed, with a note, not refused."""
    settings = dict(train__max_steps=4, train__save_every=2, train__batch_size=4,
                    **stateful_settings("bco", workspace))
    interrupted = crashed_run(workspace, "bco-old-checkpoint", monkeypatch, 2, **settings)
    (interrupted / "checkpoints" / "step-00000002" / "objective.safetensors").unlink()
    resumed = resume(interrupted)
    assert "holds no objective state; the objective's running statistics start afresh" \
        in capsys.readouterr().out
    assert [r["step"] for r in read_metrics(resumed / "metrics.jsonl")] == [1, 2, 3, 4]


@pytest.mark.parametrize("terms, accumulation, processes, named", [
    ([{"name": "kto"}], 2, 1, "kto"),  # z_ref: a mean over the micro-batch
    ([{"name": "kto"}], 1, 2, None),  # (a mean over every process's micro-batch)
    ([{"name": "bco_pair", "reward_shift": True}], 1, 2, None),
    ([{"name": "aot_pair"}], 1, 2, "aot_pair"),  # quantiles: a sort over it
    ([{"name": "bco_pair", "reward_shift": True}], 2, 1, "bco_pair"),
    ([{"name": "group_robust_dpo"}], 2, 1, "group_robust_dpo"),  # a state per micro-batch
    ([{"name": "group_robust_dpo"}], 1, 2, None),  # (updated with what all processes saw)
    ([{"name": "bco_pair"}], 2, 2, None),
    ([{"name": "dpo"}, {"name": "aot_pair", "weight": 0.5}], 1, 1, None),
])
def test_a_run_says_when_splitting_a_step_changes_what_an_objective_computes(
        terms, accumulation, processes, named, capsys):
    from preftune.train.loop import _say_split
    objective = Objective.from_config([ObjectiveItem(**term) for term in terms], 10)
    _say_split(objective, accumulation, processes)
    said = capsys.readouterr().out
    if named is None:
        assert said == ""
    else:
        assert said.startswith(f"note: {named} reads each micro-batch as a whole") and \
            f"split into {accumulation} micro-batches on {processes} processes" in said
