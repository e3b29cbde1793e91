"""Weighted sums of objectives, parameter schedules and per-example weights."""

import math

import pytest
import torch

from preftune.config import ConfigError, build_config
from preftune.model.forward import SequenceStats
from preftune.objectives import ObjectiveInputs
from preftune.objectives.compose import Objective, scheduled_value

POLICY = [[-12.0, -15.0], [-4.0, -3.0]]
REFERENCE = [[-13.0, -14.0], [-4.5, -2.0]]
COUNTS = [[4.0, 6.0], [2.0, 1.0]]


def inputs(step=0, scores=None):
    counts = torch.tensor(COUNTS)
    return ObjectiveInputs(SequenceStats(torch.tensor(POLICY), counts),
                           SequenceStats(torch.tensor(REFERENCE), counts), scores or {}, step)


def dpo_by_hand(i, beta):
    z = beta * ((POLICY[i][0] - REFERENCE[i][0]) - (POLICY[i][1] - REFERENCE[i][1]))
    return math.log1p(math.exp(-z))


def objective(tree, total_steps=10, weight_field=None):
    config = build_config({"objective": tree})
    return Objective.from_config(config.objective, total_steps, weight_field)


def test_dpo_plus_weighted_sft_is_the_weighted_sum():
    combined = objective([{"name": "dpo", "beta": 0.1}, {"name": "sft", "weight": 0.2}])
    assert combined.needs_reference and combined.name == "dpo + 0.2*sft"
    output, parts = combined(inputs())
    for i in range(2):
        sft = -POLICY[i][0] / COUNTS[i][0]
        assert output.losses[i].item() == pytest.approx(dpo_by_hand(i, 0.1) + 0.2 * sft, rel=1e-5)
    assert set(parts) == {"loss/dpo", "loss/sft"}
    # implied rewards are the first term's: beta * log-ratio
    assert output.rewards[0, 0].item() == pytest.approx(0.1 * (POLICY[0][0] - REFERENCE[0][0]))


def test_scheduled_beta_follows_its_schedule():
    ramp = objective({"name": "dpo", "beta": {"start": 0.1, "end": 0.5}}, total_steps=5)
    for step, beta in enumerate([0.1, 0.2, 0.3, 0.4, 0.5]):
        output, _ = ramp(inputs(step))
        assert output.losses[0].item() == pytest.approx(dpo_by_hand(0, beta), rel=1e-5)
    assert scheduled_value({"start": 1.0, "end": 0.0, "schedule": "cosine"}, 2, 5) == \
        pytest.approx(0.5)
    assert scheduled_value({"start": 2.0, "end": 9.0, "schedule": "constant"}, 3, 5) == 2.0


def test_example_weights_scale_each_loss():
    weighted = objective({"name": "dpo"}, weight_field="weight")
    output, _ = weighted(inputs(scores={"weight": torch.tensor([2.0, 0.0])}))
    assert output.losses.tolist() == pytest.approx([2 * dpo_by_hand(0, 0.1), 0.0], rel=1e-5)


@pytest.mark.parametrize("scores, state", [
    ({}, "is missing or not a number"), ({"weight": -1.0}, "is -1.0"),
    ({"weight": float("nan")}, "is nan")])
def test_example_weights_are_checked_as_the_data_is_read(scores, state):
    from types import SimpleNamespace

    from preftune.data.prepare import check_example_weights
    from preftune.data.records import DataError

    examples = [SimpleNamespace(origin="w.jsonl:1", scores={"weight": 2.0}),
                SimpleNamespace(origin="w.jsonl:2", scores=scores)]
    with pytest.raises(DataError, match=f"w.jsonl:2: numeric field 'weight' {state}; "
                                        "train.example_weight_field weights"):
        check_example_weights(examples, "weight")
    check_example_weights(examples[:1], "weight")  # a good one passes


@pytest.mark.parametrize("tree,expected", [
    ({"name": "dpo", "beta": {"start": 0.1}}, "schedule needs start and end"),
    ({"name": "dpo", "beta": {"start": 0.1, "end": 0.2, "schedule": "wavy"}}, "schedule must be"),
    ({"name": "dpo", "beta": {"start": 0.1, "end": "big"}}, "objective.beta"),
    ({"name": "dpo", "weight": 0.5}, "only matters when objective lists several terms"),
    ([{"name": "simpo"}, {"name": "sft", "weight": 0.1}], None),
])
def test_composition_config_errors(tree, expected):
    if expected is None:
        assert build_config({"objective": tree}).reference_strategy == "none"
        return
    with pytest.raises(ConfigError, match=expected):
        build_config({"objective": tree})


def test_each_terms_logged_loss_carries_the_example_weights_as_the_sum_does():
    """(loss/<name> left the weights out, so loss was not sum of weight x loss/<name>.)"""
    weighted = objective([{"name": "dpo", "beta": 0.1}, {"name": "sft", "weight": 0.2}],
                         weight_field="weight")
    weights = [0.5, 1.5]
    output, parts = weighted(inputs(scores={"weight": torch.tensor(weights)}))
    dpo = sum(w * dpo_by_hand(i, 0.1) for i, w in enumerate(weights))
    sft = sum(w * -POLICY[i][0] / COUNTS[i][0] for i, w in enumerate(weights))
    assert parts["loss/dpo"].item() == pytest.approx(dpo, rel=1e-5)
    assert parts["loss/sft"].item() == pytest.approx(sft, rel=1e-5)
    assert output.losses.sum().item() == pytest.approx(dpo + 0.2 * sft, rel=1e-5)


@pytest.mark.parametrize("tree,expected", [
    # both ends keep lambda_min <= lambda_max; 2/3 of the way the cosine passes the line
    ({"name": "dpo_shift", "schedule": "increase_linear", "schedule_steps": 10,
      "lambda_min": {"start": 0.1, "end": 0.9, "schedule": "cosine"},
      "lambda_max": {"start": 0.2, "end": 0.95}},
     r"objective dpo_shift lambda_min \(0.70\d*\) is above lambda_max \(0.70\d*\) 67% of the "
     r"way through the run, where the schedules of lambda_min and lambda_max have moved apart"),
    # read once before training (the UDM weights): a schedule there never moved
    ({"name": "bco", "udm": True, "min_density_ratio": {"start": 0.5, "end": 5.0}},
     r"objective.min_density_ratio: bco reads it once, before training, so it cannot follow a "
     r"schedule"),
])
def test_schedules_that_cannot_train_as_written_are_refused(tree, expected):
    with pytest.raises(ConfigError, match=expected):
        build_config({"objective": tree})


def test_a_schedule_written_as_yaml_reads_it_has_number_ends():
    """YAML 1.1 reads 1e-2 and 1.0e4 as text: a schedule's ends are numbers all the same (they
    crashed the first step's arithmetic), and an end that is no number is named."""
    from preftune.config_tree import load_yaml

    tree = load_yaml("objective: {name: dpo, beta: {start: 1e-2, end: 1.0e4}}")
    assert tree["objective"]["beta"] == {"start": "1e-2", "end": "1.0e4"}  # (as YAML reads)
    config = build_config(tree)
    assert config.objective[0].model_extra["beta"] == {"start": 0.01, "end": 10000.0}
    term = Objective.from_config(config.objective, total_steps=3).terms[0]
    assert [term.params_at(step, 3).beta for step in range(3)] == pytest.approx(
        [0.01, 5000.005, 10000.0])
    with pytest.raises(ConfigError, match=r"objective.beta.end: 'abc' is not a number"):
        build_config({"objective": {"name": "dpo", "beta": {"start": 0.1, "end": "abc"}}})


def test_run_json_records_a_scheduled_parameter_as_its_schedule():
    """(It recorded the start value, 0.1, for a beta that ran from 0.1 to 1.0.)"""
    ramp = objective([{"name": "dpo", "beta": {"start": 0.1, "end": 1.0}},
                      {"name": "sft", "weight": 0.2}])
    assert ramp.recorded_params() == {"dpo": {"beta": {"start": 0.1, "end": 1.0}}, "sft": {}}
    assert objective({"name": "dpo"}).recorded_params() == {"dpo": {"beta": 0.1}}


def test_mrpo_weights_and_extra_models_must_agree_when_the_config_is_read():
    """(Three weights for two references failed at step 1, after both reference passes.)"""
    tree = {"data": {"train": "pairs.jsonl"}, "reference": {"extra_models": ["other"]},
            "objective": {"name": "mrpo", "weights": [0.2, 0.3, 0.5]}}
    with pytest.raises(ConfigError, match=r"mrpo's parameters weigh the main reference and 2 "
                                          r"more, and reference.extra_models lists 1; give one "
                                          r"weight per reference"):
        build_config(tree)
    build_config({**tree, "objective": {"name": "mrpo", "weights": [0.4, 0.6]}})
    build_config({**tree, "objective": "mrpo"})  # equal weights, however many


def test_group_ids_that_float32_cannot_keep_apart_are_refused():
    from preftune.objectives import get_objective

    check = get_objective("group_robust_dpo").check
    assert check({"group": 2.0}, None) is None and check({"group": 16777216.0}, None) is None
    for group in (100000001.0, 1.5):
        assert check({"group": group}, None).startswith(f"group is {group:g}; a group is a "
                                                         "whole number of at most 16777216")
