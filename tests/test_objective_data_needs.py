"""What an objective declares it reads from a record, checked as the data is read: a pair's
optional ``gold`` response reaches only the objectives that read it (triple_po, selm; the
others train as if it were absent, a reader refuses a pair without one), and declared numeric
fields must hold values the objective takes (todo's tie flag, odpo's scores, ...)."""

import json

import pytest
import torch
import yaml

from preftune.cli import main
from preftune.model.forward import SequenceStats
from preftune.objectives import ObjectiveInputs, get_objective
from preftune.objectives.compose import Objective, Term
from preftune.objectives.catalog import terminal_listing
from preftune.train.logging import read_metrics
from tiny_models import yes_no_workspace


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = yes_no_workspace(tmp_path_factory.mktemp("gold"), pairs=8)
    rows = [json.loads(line) for line in (root / "pairs.jsonl").read_text().splitlines()]
    gold = [{**row, "gold": " yes!", "chosen_score": 1.0, "rejected_score": 0.5}
            for row in rows]
    (root / "gold.jsonl").write_text("".join(json.dumps(r) + "\n" for r in gold))
    plain = [{k: v for k, v in row.items() if k != "gold"} for row in gold]
    (root / "plain.jsonl").write_text("".join(json.dumps(r) + "\n" for r in plain))
    return root


def _train(root, name: str, data: str, run: str) -> int:
    config = {"output_dir": str(root / run), "model": {"path": str(root / "model")},
              "data": {"train": str(root / data)}, "objective": {"name": name},
              "train": {"batch_size": 4, "max_steps": 2, "learning_rate": 1e-3}}
    (root / f"{run}.yaml").write_text(yaml.safe_dump(config))
    return main(["train", str(root / f"{run}.yaml")])


@pytest.mark.parametrize("name", ["wpo", "ld_dpo", "modpo"])
def test_an_objective_that_reads_no_gold_trains_as_without_it(workspace, name, capsys):
    assert _train(workspace, name, "gold.jsonl", f"{name}-gold") == 0
    printed = capsys.readouterr().out
    assert ("data: data.train: 8 of 8 pairs carry a gold response (e.g. "
            f"{workspace / 'gold.jsonl'}:1); the objective does not read one") in printed
    assert _train(workspace, name, "plain.jsonl", f"{name}-plain") == 0
    with_gold = read_metrics(workspace / f"{name}-gold" / "metrics.jsonl")
    without = read_metrics(workspace / f"{name}-plain" / "metrics.jsonl")
    assert [r["loss"] for r in with_gold] == [r["loss"] for r in without]


def test_a_gold_reader_refuses_pairs_without_gold_before_the_model_loads(workspace, capsys):
    assert _train(workspace, "triple_po", "plain.jsonl", "no-gold") == 2
    error = capsys.readouterr().err
    assert (f"{workspace / 'plain.jsonl'}:1: objective triple_po reads a gold response in every "
            "pair") in error
    assert "data.fields: {gold: COLUMN}" in error and "Traceback" not in error
    assert not (workspace / "no-gold").exists()


def test_a_value_an_objective_cannot_take_is_refused_before_the_model_loads(workspace, capsys):
    rows = [json.loads(line) for line in (workspace / "plain.jsonl").read_text().splitlines()]
    ties = [{**row, "tie": 2 if i == 2 else i % 2} for i, row in enumerate(rows)]
    (workspace / "ties.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ties))
    assert _train(workspace, "todo", "ties.jsonl", "ties") == 2
    error = capsys.readouterr().err
    assert (f"{workspace / 'ties.jsonl'}:3: objective todo: tie is 2; it is 1 (or true) for a "
            "tie and 0 (or false) for a preference.") in error
    assert not (workspace / "ties").exists()


def test_the_listing_says_which_objectives_read_gold_and_reference_samples():
    assert get_objective("triple_po").gold and get_objective("selm").gold
    assert not get_objective("dpo").gold
    lines = terminal_listing().splitlines()
    for name, need in (("triple_po", "a gold response"), ("selm", "a gold response"),
                       ("pmpo", "samples of the reference"), ("fdpg", "samples of the reference")):
        assert need in next(line for line in lines if line.startswith(f"{name} "))


def _token_stats(seed: int) -> SequenceStats:
    """Per-token stats of 2 examples x 3 responses (chosen, rejected, gold) of unequal lengths."""
    generator = torch.Generator().manual_seed(seed)
    grid = -torch.rand(2, 3, 5, generator=generator, dtype=torch.float64)
    mask = torch.tensor([[[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]],
                         [[1, 1, 1, 1, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]], dtype=torch.bool)
    grid = grid * mask
    return SequenceStats(grid.sum(-1), mask.sum(-1).to(grid), grid, mask)


def test_a_pair_term_beside_a_gold_reader_sees_only_the_pair():
    policy, reference = _token_stats(0), _token_stats(1)
    both = Objective([Term(get_objective("selm"), {}, 1.0), Term(get_objective("ld_dpo"), {}, 1.0)],
                     total_steps=1, example_weight_field=None)
    _, parts = both(ObjectiveInputs(policy, reference))
    alone = get_objective("ld_dpo")(ObjectiveInputs(policy.first_slots(2),
                                                    reference.first_slots(2)),
                                    get_objective("ld_dpo").params())
    assert parts["loss/ld_dpo"].item() == pytest.approx(alone.losses.sum().item(), rel=1e-12)
    three = get_objective("ld_dpo")(ObjectiveInputs(policy, reference),
                                    get_objective("ld_dpo").params())
    assert three.losses.sum().item() != pytest.approx(alone.losses.sum().item(), rel=1e-3)


@pytest.mark.parametrize("objective, says", [
    ({"name": "f_dpo", "alpha": 0.3}, "alpha does nothing with divergence reverse_kl"),
    ({"name": "tdpo", "alpha": 0.1}, "alpha does nothing with variant tdpo1"),
    ({"name": "triple_po", "gamma": 2.0}, "gamma does nothing with variant sigmoid"),
    ({"name": "bco", "prompt_sample_size": 5}, "prompt_sample_size does nothing without udm: "
                                               "true"),
])
def test_a_parameter_its_other_settings_leave_idle_is_refused(objective, says):
    from preftune.config import ConfigError, build_config

    with pytest.raises(ConfigError, match=says):
        build_config({"objective": objective})
    name = objective["name"]
    switched = {"f_dpo": {"divergence": "alpha"}, "tdpo": {"variant": "tdpo2"},
                "triple_po": {"variant": "tpo_l"}, "bco": {"udm": True}}[name]
    build_config({"objective": {**objective, **switched}})  # where it counts, it is taken
