"""Every registered objective trains 3 steps through the real loop on its data shape."""

import json
import math
import random

import pytest
import torch
from safetensors.torch import load_file

from preftune.config import build_config
from preftune.objectives import REGISTRY
from preftune.train import loop
from preftune.train.logging import read_metrics
from tiny_models import save_tiny_model_dir

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("every")
    save_tiny_model_dir(root / "model")
    save_tiny_model_dir(root / "other_model", seed=1)  # a second reference (mrpo)
    rng = random.Random(1)
    pairs = []
    for i in range(24):
        a, b = rng.randint(1, 30), rng.randint(1, 30)
        pairs.append({"prompt": f"{a}+{b}=", "chosen": f" {a + b}", "rejected": f" {a + b + 3} or so",
                      "chosen_score": rng.uniform(5, 9), "rejected_score": rng.uniform(0, 4),
                      "weight": rng.uniform(0.5, 2.0), "group": i % 3,
                      "chosen_win_prob": rng.uniform(0.5, 1.0), "rejected_win_prob": rng.uniform(0, 0.5),
                      "tie": int(i % 4 == 0)})
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs))
    with_gold = [{**pair, "gold": pair["chosen"] + "."} for pair in pairs]
    (root / "pairs_gold.jsonl").write_text("".join(json.dumps(r) + "\n" for r in with_gold))
    unpaired, ranked = [], []
    for i in range(23):  # odd on purpose: the mismatched-completion pairing wraps around
        a, b = rng.randint(1, 30), rng.randint(1, 30)
        good = i % 3 != 0
        unpaired.append({"prompt": f"{a}+{b}=", "label": good,
                         "completion": f" {a + b}" if good else f" {a + b + 3} or so"})
        ranked.append({"prompt": f"{a}*{b}=",
                       "responses": [f" {a * b + 7} maybe", f" {a * b}", f" {a * b + 1}"],
                       "scores": [0.0, 1.0, round(rng.uniform(0.2, 0.8), 3)]})
    (root / "unpaired.jsonl").write_text("".join(json.dumps(r) + "\n" for r in unpaired))
    (root / "ranked.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ranked))
    return root


DATA_FILES = {"pairs": "pairs.jsonl", "unpaired": "unpaired.jsonl", "ranked": "ranked.jsonl"}


# image-conditional objectives (mdpo) need image data: they train in test_vision_runs.py
@pytest.mark.parametrize("name", sorted(n for n, s in REGISTRY.items()
                                        if s.data in DATA_FILES and not s.image_negatives))
def test_objective_trains_three_steps(workspace, name):
    spec = REGISTRY[name]
    output = loop.train(build_config({
        "output_dir": str(workspace / "runs" / name),
        "model": {"path": str(workspace / "model")},
        "data": {"train": str(workspace / ("pairs_gold.jsonl" if spec.gold
                                           else DATA_FILES[spec.data]))},
        "objective": {"name": name},
        "reference": {"cache_dir": str(workspace / "cache"),
                      **({"extra_models": [str(workspace / "other_model")]}
                         if spec.extra_references else {})},
        "train": {"learning_rate": 1e-2, "batch_size": 4, "max_steps": 3},
    }), show_progress=False)
    log = read_metrics(output / "metrics.jsonl")
    assert len(log) == 3
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in log)
    before = load_file(workspace / "model" / "model.safetensors")
    after = load_file(output / "model" / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before), "weights did not change"


def test_weighted_sum_with_example_weights_trains(workspace):
    output = loop.train(build_config({
        "output_dir": str(workspace / "runs" / "mix"),
        "model": {"path": str(workspace / "model")},
        "data": {"train": str(workspace / "pairs.jsonl")},
        "objective": [{"name": "dpo", "beta": {"start": 0.05, "end": 0.2}},
                      {"name": "sft", "weight": 0.2}],
        "reference": {"cache_dir": str(workspace / "cache")},
        "train": {"learning_rate": 1e-2, "batch_size": 4, "max_steps": 3,
                  "example_weight_field": "weight"},
    }), show_progress=False)
    log = read_metrics(output / "metrics.jsonl")
    assert {"loss/dpo", "loss/sft"} <= set(log[0])
    run = json.loads((output / "run.json").read_text())
    assert run["objective"] == "dpo + 0.2*sft"
    assert run["params"]["dpo"]["beta"] == {"start": 0.05, "end": 0.2}  # as it trained
