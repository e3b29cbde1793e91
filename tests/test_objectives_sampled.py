"""D2O and PMPO (objectives on the model's own samples) against plain-Python formulas."""

import math

import pytest
import torch
from objective_cases import finite_difference, log_sigmoid
from test_objectives_listwise import CASES_3, CASES_4, TIED_3, ranked_inputs

from preftune.objectives import get_objective
from preftune.objectives.sampled import D2OParams, PMPOParams


def top_bottom(scores):
    top = [i for i, s in enumerate(scores) if s == max(scores)]
    bottom = [i for i, s in enumerate(scores) if s == min(scores)]
    return top, bottom


def d2o_formula(case, params):
    policy, reference, _, scores = case
    if len(set(scores)) == 1:
        return 0.0
    top, bottom = top_bottom(scores)
    rho = [p - r for p, r in zip(policy, reference)]
    anchors = sum(rho[i] for i in top) / len(top)
    negatives = sum(rho[j] for j in bottom) / len(bottom)
    return -log_sigmoid(params.beta * anchors - params.alpha * params.beta * negatives)


def pmpo_formula(case, params):
    policy, reference, _, scores = case
    if len(set(scores)) == 1:
        return 0.0
    top, bottom = top_bottom(scores)
    positives = sum(policy[i] for i in top) / len(top)
    negatives = sum(policy[j] for j in bottom) / len(bottom)
    kl = sum(r - p for p, r in zip(policy, reference)) / len(policy)
    return -params.alpha * positives + (1 - params.alpha) * negatives + params.beta * kl


@pytest.mark.parametrize("name,formula,params", [
    ("d2o", d2o_formula, D2OParams()), ("d2o", d2o_formula, D2OParams(beta=0.5, alpha=0.3)),
    ("pmpo", pmpo_formula, PMPOParams()), ("pmpo", pmpo_formula, PMPOParams(alpha=1.0, beta=0.1)),
    ("pmpo", pmpo_formula, PMPOParams(alpha=0.0, beta=2.0)),
])
def test_values_match_the_formula(name, formula, params):
    for cases in (CASES_3, TIED_3, CASES_4):
        inputs, _ = ranked_inputs(cases, torch.float64)
        output = get_objective(name)(inputs, params)
        for i, case in enumerate(cases):
            assert output.losses[i].item() == pytest.approx(formula(case, params), rel=1e-9,
                                                             abs=1e-9), case


@pytest.mark.parametrize("name,formula,params", [
    ("d2o", d2o_formula, D2OParams(beta=0.5, alpha=0.7)),
    ("pmpo", pmpo_formula, PMPOParams(alpha=0.3, beta=0.5)),
])
def test_gradient_matches_a_finite_difference(name, formula, params):
    case = CASES_4[0]
    inputs, policy = ranked_inputs([case], torch.float64, requires_grad=True)
    get_objective(name)(inputs, params).losses.sum().backward()
    for k in range(4):
        def f(values):
            return formula((values, case[1], case[2], case[3]), params)
        assert policy.grad[0, k].item() == pytest.approx(
            finite_difference(f, list(case[0]), k), rel=1e-5, abs=1e-8)


def test_d2o_with_one_anchor_and_alpha_1_is_dpo():
    case = ([-12.0, -15.0], [-13.0, -14.0], [4, 6], [1.0, 0.0])
    inputs, _ = ranked_inputs([case], torch.float64)
    loss = get_objective("d2o")(inputs, D2OParams(beta=0.1)).losses.item()
    assert loss == pytest.approx(-math.log(1 / (1 + math.exp(-0.1 * ((1.0) - (-1.0))))))


def test_pmpo_without_negatives_weight_is_sft_on_positives_plus_kl():
    # alpha = 1: -mean log pi of the top responses + beta KL; the negatives do not move it
    case = CASES_3[0]
    inputs, policy = ranked_inputs([case], torch.float64, requires_grad=True)
    get_objective("pmpo")(inputs, PMPOParams(alpha=1.0, beta=0.0)).losses.sum().backward()
    best = case[3].index(max(case[3]))
    assert policy.grad[0].tolist() == [(-1.0 if k == best else 0.0) for k in range(3)]
