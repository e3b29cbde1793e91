"""``online.pairs.estimator`` (UPO's reliable-pair sampling): which pairs a round keeps, the
estimator's numbers on them against the reward models' own scores, certainty as the loss
weight, and settings refused before a run starts."""

import json
import math

import pytest
import torch

from preftune.config import ConfigError, build_config
from preftune.data.records import Pair
from preftune.online.config import EstimatorSection, OnlineConfig
from preftune.online.estimator import select_pairs
from preftune.online.loop import run_online
from preftune.reward.config import build_reward_config
from preftune.reward.scoring import RewardScoring
from preftune.reward.train import train_reward_model
from tiny_models import save_tiny_model_dir

pytestmark = pytest.mark.filterwarnings("ignore")


def count_a(prompt, response):
    """The round's scorer: more letters 'a' is better."""
    return float(response.count("a"))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny policy, its prompts, and two reward models of one config (seeds 0 and 1)."""
    root = tmp_path_factory.mktemp("estimator")
    policy = str(save_tiny_model_dir(root / "policy", seed=1))
    (root / "prompts.jsonl").write_text("".join(
        json.dumps({"prompt": f"say a{'a' * k} {k}"}) + "\n" for k in range(6)))
    (root / "rm_pairs.jsonl").write_text("".join(
        json.dumps({"prompt": f"q{k}", "chosen": "a" * (k % 4 + 1), "rejected": "b" * 3}) + "\n"
        for k in range(16)))
    models = [str(train_reward_model(build_reward_config({
        "output_dir": str(root / f"rm_{seed}"), "model": {"path": policy},
        "data": {"train": str(root / "rm_pairs.jsonl")},
        "train": {"learning_rate": 3e-3, "batch_size": 8, "max_steps": 6, "seed": seed}}),
        show_progress=False)) for seed in (0, 1)]
    return root, policy, models


def tree(workspace, output_dir, estimator, **train):
    root, policy, _ = workspace
    return {"output_dir": str(output_dir), "model": {"path": policy},
            "data": {"train": str(root / "prompts.jsonl"), "max_length": 64,
                     "max_prompt_length": 32},
            "objective": {"name": "dpo", "beta": 0.1},
            "train": {"learning_rate": 1e-3, "batch_size": 2, "max_steps": 2, "seed": 0,
                      "warmup_ratio": 0.0, **train},
            "online": {"rounds": 1, "scorer": "test_online_estimator:count_a",
                       "sampling": {"samples": 4, "max_new_tokens": 10, "batch_size": 6},
                       "pairs": {"builder": "all_pairs", "estimator": estimator}}}


def test_select_pairs_drops_reversed_pairs_then_keeps_the_least_uncertain_share():
    rows = [{"source": str(i)} for i in range(5)]
    probs = torch.tensor([[0.9, 0.2, 0.6, 0.7, 0.55],  # members x pairs
                          [0.7, 0.4, 0.6, 0.9, 0.45]], dtype=torch.float64)
    estimator = EstimatorSection(models=["a", "b"], keep=0.5)
    kept, dropped, counts = select_pairs(rows, probs, estimator)
    # means 0.8, 0.3, 0.6, 0.8, 0.5; stds 0.1, 0.1, 0.0, 0.1, 0.05. Pair 1 is reversed (0.3 <
    # 0.5); of the other four, ceil(0.5 * 4) = 2 with the smallest spread: pairs 2 and 4.
    assert [r["source"] for r in kept] == ["2", "4"]
    assert [(r["source"], r["dropped"]) for r in dropped] == [
        ("0", "uncertain"), ("1", "reversed"), ("3", "uncertain")]
    assert [r["estimator_prob"] for r in kept] == pytest.approx([0.6, 0.5])
    assert [r["estimator_std"] for r in kept + dropped] == pytest.approx([0, .05, .1, .1, .1])
    assert counts == {"estimator_reversed": 1, "estimator_uncertain": 2}
    everything = select_pairs(rows, probs, EstimatorSection(models=["a", "b"], min_prob=0.0))
    assert len(everything[0]) == 5 and everything[2] == {"estimator_reversed": 0,
                                                         "estimator_uncertain": 0}


def run_round(workspace, output_dir, estimator, **train) -> tuple[list, list]:
    run_online(build_config(tree(workspace, output_dir, estimator, **train), schema=OnlineConfig))
    here = output_dir / "round-1"
    return tuple([json.loads(line) for line in (here / name).read_text().splitlines()]
                 for name in ("pairs.jsonl", "pairs_dropped.jsonl"))


def test_a_round_trains_on_the_pairs_its_ensemble_is_sure_of_weighted_by_certainty(workspace,
                                                                                    tmp_path):
    _, _, models = workspace
    # every built pair kept: the estimator's numbers, against each reward model's own scores
    everything, none = run_round(workspace, tmp_path / "all", {"models": models, "min_prob": 0})
    assert none == [] and len(everything) >= 3
    scorings = [RewardScoring.load(model) for model in models]
    for row in everything:
        pair = Pair(row["prompt"], row["chosen"], row["rejected"], origin=row["source"],
                    unfinished=tuple(row.get("unfinished", ())))  # (as the round reads it)
        probs = [float(torch.sigmoid(o[0, 0] - o[1, 0]))
                 for s in scorings for o in s.outputs([pair])]
        assert row["estimator_prob"] == pytest.approx(sum(probs) / 2, abs=1e-6)
        assert row["estimator_std"] == pytest.approx(abs(probs[0] - probs[1]) / 2, abs=1e-6)
    # the same round (same seed, same samples) with a threshold at the median probability and
    # half of the rest kept, the loss weighted by the estimator's probability
    prob = {row["source"]: row["estimator_prob"] for row in everything}
    std = {row["source"]: row["estimator_std"] for row in everything}
    threshold = sorted(prob.values())[len(prob) // 2]
    out = tmp_path / "half"
    kept, dropped = run_round(workspace, out, {"models": models, "min_prob": threshold,
                                               "keep": 0.5},
                              example_weight_field="estimator_prob")
    reversed_ = sorted(k for k, p in prob.items() if p < threshold)
    eligible = sorted((k for k, p in prob.items() if p >= threshold), key=lambda k: std[k])
    wanted = eligible[:math.ceil(len(eligible) / 2)]
    assert sorted(r["source"] for r in kept) == sorted(wanted) and reversed_
    assert sorted((r["source"], r["dropped"]) for r in dropped) == sorted(
        [(k, "reversed") for k in reversed_] + [(k, "uncertain") for k in eligible[len(wanted):]])
    build = json.loads((out / "round-1" / "phases.json").read_text())["build"]
    assert (build["rows"], build["estimator_reversed"]) == (len(wanted), len(reversed_))
    metrics = [json.loads(line) for line in (out / "round-1" / "metrics.jsonl").open()]
    assert metrics[-1]["step"] == 2


@pytest.mark.parametrize("estimator, online, message", [
    ({"passes": 4, "dropout": 0.1}, {}, "estimator.models is required"),
    ({"models": ["m"], "passes": 4}, {}, "passes 4 without dropout"),
    ({"models": ["m"], "dropout": 0.1}, {}, "dropout needs passes of 2 or more"),
    ({"models": ["m"]}, {}, "one model scored once gives no spread"),
    ({"models": ["m", "n"]}, {"mode": "per_step"}, "it needs online.mode: rounds"),
])
def test_settings_the_estimator_cannot_use_are_refused(workspace, tmp_path, estimator, online,
                                                       message):
    config = tree(workspace, tmp_path / "run", estimator)
    config["online"].update(online)
    if online.get("mode") == "per_step":
        config["online"]["pairs"]["builder"] = "best_vs_worst"
        del config["online"]["rounds"]
    with pytest.raises(ConfigError, match=message):
        build_config(config, schema=OnlineConfig)
    listwise = tree(workspace, tmp_path / "run", {"models": ["m", "n"]})
    listwise["online"]["pairs"]["builder"] = "list"
    listwise["objective"] = {"name": "listwise_pl"}
    with pytest.raises(ConfigError, match="estimator judges pairs; builder list makes lists"):
        build_config(listwise, schema=OnlineConfig)


def test_a_missing_estimator_model_is_named_before_the_run_starts(workspace, tmp_path):
    _, _, models = workspace
    out = tmp_path / "run"
    config = build_config(tree(workspace, out, {"models": [models[0], str(tmp_path / "no")]}),
                          schema=OnlineConfig)
    with pytest.raises(ConfigError, match="online.pairs.estimator.models: .*no is not a "
                                          "preftune reward model"):
        run_online(config)
    assert not out.exists()
