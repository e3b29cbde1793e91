"""Reference-free objectives (CPO, ORPO, ASFT) against plain-Python computations of their formulas."""

import math

import pytest
import torch
from objective_cases import (
    CASES,
    GRADIENT_CASES,
    assert_gradient,
    assert_values,
    log_sigmoid,
    pair_inputs,
)

from preftune.objectives import get_objective
from preftune.objectives.reference_free import ASFTParams, CPOParams, ORPOParams


def mean_logps(case):
    pc, pr, _, _, lc, lr = case
    return pc / lc, pr / lr


def log_odds(mean_logp):
    """log(P / (1 - P)) with P = exp(mean per-token log-prob), ORPO's length-normalised odds."""
    p = math.exp(mean_logp)
    return math.log(p / (1 - p))


def cpo_formula(case, p):
    pc, pr, _, _, lc, _ = case
    return -log_sigmoid(p.beta * (pc - pr)) + p.alpha * (-pc / lc)


def orpo_formula(case, p):
    chosen, rejected = mean_logps(case)
    return -chosen - p.odds_ratio_weight * log_sigmoid(log_odds(chosen) - log_odds(rejected))


def asft_formula(case, p):
    chosen, rejected = mean_logps(case)
    weight = p.alignment_weight
    return -chosen - weight * (log_sigmoid(log_odds(chosen)) + log_sigmoid(-log_odds(rejected)))


@pytest.mark.parametrize("name,formula,params", [
    ("cpo", cpo_formula, CPOParams()), ("cpo", cpo_formula, CPOParams(0.5, 0.0)),
    ("orpo", orpo_formula, ORPOParams()), ("orpo", orpo_formula, ORPOParams(1.0)),
    ("asft", asft_formula, ASFTParams()), ("asft", asft_formula, ASFTParams(1.0)),
])
def test_reference_free_objectives_match_formula(name, formula, params):
    assert_values(name, params, formula, reference=False)
    for case in GRADIENT_CASES:
        assert_gradient(name, params, formula, case, reference=False)


def test_orpo_and_asft_rewards_are_log_odds():
    inputs, _ = pair_inputs(CASES[:1], reference=False)
    chosen, rejected = mean_logps(CASES[0])
    for name, params in (("orpo", ORPOParams()), ("asft", ASFTParams())):
        rewards = get_objective(name)(inputs, params).rewards[0].tolist()
        assert rewards == pytest.approx([log_odds(chosen), log_odds(rejected)], rel=1e-5)


@pytest.mark.parametrize("name,params", [("orpo", ORPOParams()), ("asft", ASFTParams())])
def test_odds_objectives_stay_finite_when_a_response_is_certain(name, params):
    # mean log-prob 0 or just below: log(1 - P) -> -inf unguarded
    cases = [(0.0, -2.0, 0, 0, 1, 2), (-2.0, 0.0, 0, 0, 2, 1), (-1e-9, -1e-9, 0, 0, 1, 1),
             (-3e-6, -0.7, 0, 0, 3, 1), (-0.7, -3e-6, 0, 0, 1, 3)]
    inputs, policy = pair_inputs(cases, reference=False, requires_grad=True)
    out = get_objective(name)(inputs, params)
    out.losses.sum().backward()
    assert torch.isfinite(out.losses).all() and torch.isfinite(out.rewards).all()
    assert torch.isfinite(policy.grad).all()
    # far enough from 0 the guard is inactive: still the exact formula
    formula = orpo_formula if name == "orpo" else asft_formula
    for i in (3, 4):
        assert out.losses[i].item() == pytest.approx(formula(cases[i], params), rel=1e-4)
