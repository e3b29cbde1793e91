"""Objective parameters outside their meaningful range are refused when the config is read,
naming the key, the bound and the value (both ends of a schedule too), and the bounds are in
the JSON schema editors read. In range, the same values are accepted."""

import dataclasses

import pytest

from preftune.config import ConfigError, build_config
from preftune.config_schema import json_schema
from preftune.diffusion.config import DiffusionConfig
from preftune.objectives import REGISTRY


def refusal(term: dict) -> str:
    with pytest.raises(ConfigError) as error:
        build_config({"objective": term})
    return str(error.value).split("\n", 1)[1].strip()


# (term, the one line that refuses it); each row's value is just outside the range
REFUSED = [
    ({"name": "dpo", "beta": -0.1}, "objective.beta: Input should be greater than 0 (got -0.1)"),
    ({"name": "ipo", "beta": 0}, "objective.beta: Input should be greater than 0 (got 0)"),
    ({"name": "dpo", "beta": {"start": 0.1, "end": 0.0}},
     "objective.beta.end: Input should be greater than 0 (got 0.0)"),
    ({"name": "cdpo", "epsilon": 0.5},
     "objective.epsilon: Input should be less than 0.5 (got 0.5)"),
    ({"name": "exo_pair", "epsilon": 0.9},
     "objective.epsilon: Input should be less than 0.5 (got 0.9)"),
    ({"name": "exo_pair", "epsilon": 0},
     "objective.epsilon: Input should be greater than 0 (got 0)"),
    ({"name": "dpo_sft", "alpha": -1},
     "objective.alpha: Input should be greater than or equal to 0 (got -1)"),
    ({"name": "discopop", "tau": 0}, "objective.tau: Input should be greater than 0 (got 0)"),
    ({"name": "dpo_shift", "shift_lambda": 1.5},
     "objective.shift_lambda: Input should be less than or equal to 1 (got 1.5)"),
    ({"name": "dpo_shift", "lambda_min": 0.9, "lambda_max": 0.2},
     "objective dpo_shift lambda_min (0.9) is above lambda_max (0.2)"),
    ({"name": "group_robust_dpo", "step_size": -5},
     "objective.step_size: Input should be greater than or equal to 0 (got -5)"),
    ({"name": "pmpo", "alpha": 1.5},
     "objective.alpha: Input should be less than or equal to 1 (got 1.5)"),
    ({"name": "pmpo", "alpha": 0.5, "beta": 0},
     "objective pmpo with negatives (alpha < 1) needs beta > 0: the KL term keeps the "
     "negatives' term from diverging."),
    ({"name": "kto", "desirable_weight": 0, "undesirable_weight": 0},
     "objective kto desirable_weight and undesirable_weight are both 0, so the loss is 0 "
     "whatever the model does; give one of them a weight."),
    ({"name": "triple_po", "variant": "tpo_l", "epsilon": 0.1},
     "objective triple_po variant=tpo_l has no label smoothing (its term is -log sigmoid(beta h "
     "- gamma), with a target margin instead); remove epsilon, or use variant=sigmoid."),
    ({"name": "bonbon", "n": 1},
     "objective.n: Input should be greater than or equal to 2 (got 1)"),
    ({"name": "todo", "theta": 0.3}, "objective.theta: Input should be less than 0 (got 0.3)"),
    ({"name": "modpo", "margin_weight": 1.0},
     "objective.margin_weight: Input should be less than 1 (got 1.0)"),
    ({"name": "d2o", "alpha": 0}, "objective.alpha: Input should be greater than 0 (got 0)"),
    ({"name": "dpo", "beta": float("inf")},
     "objective.beta: Input should be a finite number (got inf)"),
    ({"name": "mdpo", "anchor": float("-inf")},
     "objective.anchor: Input should be a finite number (got -inf)"),
    ({"name": "ipo", "normalize_length": {"start": 0, "end": 1}},
     "objective.normalize_length: only a number parameter can follow a schedule, and ipo's "
     "normalize_length is not one; give one value."),
    ({"name": "bonbon", "n": {"start": 2, "end": 9}},
     "objective.n: only a number parameter can follow a schedule, and bonbon's n is not one; "
     "give one value."),
]


@pytest.mark.parametrize("term,message", REFUSED, ids=[f"{t['name']}-{i}"
                                                       for i, (t, _) in enumerate(REFUSED)])
def test_out_of_range_parameters_are_refused_by_key(term, message):
    assert refusal(term) == message


def test_the_edges_of_each_range_are_accepted():
    for term in ({"name": "cdpo", "epsilon": 0.0}, {"name": "dpo_sft", "alpha": 0},
                 {"name": "dpo_shift", "shift_lambda": 1.0}, {"name": "pmpo", "alpha": 1.0,
                                                              "beta": 0},
                 {"name": "kto", "desirable_weight": 0}, {"name": "bonbon", "n": 2},
                 {"name": "dpo", "beta": {"start": 0.5, "end": 1e-3}}):
        build_config({"objective": term})


def test_every_objectives_beta_must_be_positive():
    """beta is a temperature or inverse KL strength: at 0 or below the loss is constant,
    undefined (ipo, sppo: 1/beta) or prefers the rejected response."""
    named = [spec.name for spec in REGISTRY.values()
             if "beta" in {f.name for f in dataclasses.fields(spec.params)}
             and spec.name != "pmpo"]  # pmpo's beta weighs a KL term; 0 drops it (alpha = 1)
    assert len(named) >= 40
    for name in named:
        assert refusal({"name": name, "beta": -1}) == (
            "objective.beta: Input should be greater than 0 (got -1)"), name


def test_the_schema_carries_the_bounds():
    """For a fixed value and for both ends of a schedule, as editors check them."""
    terms = json_schema("train")["$defs"]["ObjectiveConfig"]["anyOf"]
    cdpo = next(t for t in terms if t["properties"]["name"] == {"const": "cdpo"})["properties"]
    fixed, schedule = cdpo["epsilon"]["anyOf"]
    assert (fixed["minimum"], fixed["exclusiveMaximum"], fixed["default"]) == (0, 0.5, 0.1)
    assert schedule["properties"]["end"] == {"type": "number", "minimum": 0,
                                             "exclusiveMaximum": 0.5}
    assert cdpo["beta"]["anyOf"][0]["exclusiveMinimum"] == 0
    bonbon = next(t for t in terms if t["properties"]["name"] == {"const": "bonbon"})
    assert "anyOf" not in bonbon["properties"]["n"]  # a whole number: no schedule
    assert bonbon["properties"]["n"]["minimum"] == 2


def test_diffusion_objectives_are_bounded_too():
    tree = {"model": {"path": "m"}, "data": {"train": "d.jsonl"},
            "objective": {"name": "mapo", "snr_value": 0}}
    with pytest.raises(ConfigError, match=r"objective.snr_value: Input should be greater than 0"):
        DiffusionConfig.from_dict(tree)
    tree["objective"] = {"name": "diffusion_dpo", "beta": -5000}
    with pytest.raises(ConfigError, match=r"objective.beta: Input should be greater than 0"):
        DiffusionConfig.from_dict(tree)


def test_reward_losses_are_bounded_too():
    from preftune.reward.config import RewardConfig

    tree = {"model": {"path": "m"}, "data": {"train": "d.jsonl"},
            "loss": {"name": "bt", "label_smoothing": 0.5}}
    with pytest.raises(ConfigError, match=r"loss.label_smoothing: Input should be less than 0.5 "
                                          r"\(got 0.5\)"):
        RewardConfig.from_dict(tree)
    tree["loss"] = {"name": "gpm"}
    tree["model"]["head"] = {"tau": float("inf")}
    with pytest.raises(ConfigError, match=r"model.head.tau: Input should be a finite number"):
        RewardConfig.from_dict(tree)
    del tree["model"]["head"]
    tree["loss"] = {"name": "bt_margin", "center_coefficient": -0.01}
    with pytest.raises(ConfigError, match=r"loss.center_coefficient: Input should be greater "
                                          r"than or equal to 0 \(got -0.01\)"):
        RewardConfig.from_dict(tree)
