"""Objectives with per-response terms (BCO, NCA, APO, SPPO, Cal-DPO, BoNBoN) against plain Python."""

import math

import pytest
import torch
from objective_cases import (
    CASES,
    GRADIENT_CASES,
    assert_finite,
    assert_gradient,
    assert_values,
    finite_difference,
    log_sigmoid,
    pair_inputs,
    sigmoid,
)

from preftune.objectives import get_objective
from preftune.objectives.absolute import (
    AnchoredPOParams,
    BCOPairParams,
    BoNBoNParams,
    CalDPOParams,
    NCAPairParams,
    SPPOHardParams,
)


def log_ratios(case):
    pc, pr, rc, rr, _, _ = case
    return pc - rc, pr - rr


# --- BCO on pairs (the reward shift couples the batch) -----------------------------------------

def bco_batch_formula(cases, p, delta=None):
    rewards = [(p.beta * win, p.beta * lose) for win, lose in map(log_ratios, cases)]
    if delta is None:
        delta = sum(win + lose for win, lose in rewards) / (2 * len(rewards)) if p.reward_shift else 0.0
    return [-log_sigmoid(win - delta) - log_sigmoid(-(lose - delta)) for win, lose in rewards]


@pytest.mark.parametrize("params", [BCOPairParams(), BCOPairParams(0.1, True), BCOPairParams(1.0)])
def test_bco_pair_matches_formula(params):
    inputs, _ = pair_inputs(CASES)
    out = get_objective("bco_pair")(inputs, params)
    assert_finite(out)
    assert out.losses.tolist() == pytest.approx(bco_batch_formula(CASES, params), rel=1e-5, abs=1e-6)


def test_bco_pair_default_pins_each_reward_not_only_the_gap():
    """OBJECTIVES.md's paired form has no shift: raising both log-ratios by 10 (same margin)
    changes the loss, -log s(5.5) - log s(-5) -> the value below at beta 0.5, rho = (1, 0) + 10."""
    assert BCOPairParams().reward_shift is False
    spec, params = get_objective("bco_pair"), BCOPairParams(beta=0.5)
    low = spec(pair_inputs([(-3.0, -4.0, -4.0, -4.0, 2, 2)])[0], params).losses.item()
    high = spec(pair_inputs([(7.0, 6.0, -4.0, -4.0, 2, 2)])[0], params).losses.item()
    assert low == pytest.approx(-log_sigmoid(0.5) - log_sigmoid(0.0))
    assert high == pytest.approx(-log_sigmoid(5.5) - log_sigmoid(-5.0))
    shifted = BCOPairParams(beta=0.5, reward_shift=True)  # one pair: only the gap is left
    for case in ([(-3.0, -4.0, -4.0, -4.0, 2, 2)], [(7.0, 6.0, -4.0, -4.0, 2, 2)]):
        assert spec(pair_inputs(case)[0], shifted).losses.item() == pytest.approx(
            -2 * log_sigmoid(0.25))


@pytest.mark.parametrize("reward_shift", [True, False])
def test_bco_pair_gradient_treats_the_shift_as_a_constant(reward_shift):
    params = BCOPairParams(0.1, reward_shift)
    batch = GRADIENT_CASES
    inputs, policy = pair_inputs(batch, dtype=torch.float64, requires_grad=True)
    get_objective("bco_pair")(inputs, params).losses.sum().backward()
    # delta is detached: differentiate the formula with delta held at its value on these inputs
    rewards = [params.beta * (x) for case in batch for x in log_ratios(case)]
    delta = sum(rewards) / len(rewards) if reward_shift else 0.0
    flat = [v for case in batch for v in case]

    def total(values):
        cases = [tuple(values[6 * i: 6 * i + 6]) for i in range(len(batch))]
        return sum(bco_batch_formula(cases, params, delta))

    for i in range(len(batch)):
        for slot in (0, 1):
            expected = finite_difference(total, flat, 6 * i + slot)
            assert policy.grad[i, slot].item() == pytest.approx(expected, rel=1e-5, abs=1e-8)


# --- NCA, APO ----------------------------------------------------------------------------------

def nca_formula(case, p):
    win, lose = (p.beta * x for x in log_ratios(case))
    return -log_sigmoid(win) - 0.5 * log_sigmoid(-win) - 0.5 * log_sigmoid(-lose)


def apo_zero_formula(case, p):
    win, lose = (p.beta * x for x in log_ratios(case))
    return (1 - sigmoid(win)) + sigmoid(lose)


def apo_down_formula(case, p):
    win, lose = (p.beta * x for x in log_ratios(case))
    return sigmoid(win) + (1 - sigmoid(win - lose))


@pytest.mark.parametrize("name,formula,params", [
    ("nca_pair", nca_formula, NCAPairParams()), ("nca_pair", nca_formula, NCAPairParams(0.5)),
    ("anchored_po_zero", apo_zero_formula, AnchoredPOParams()),
    ("anchored_po_zero", apo_zero_formula, AnchoredPOParams(0.02)),
    ("anchored_po_down", apo_down_formula, AnchoredPOParams()),
    ("anchored_po_down", apo_down_formula, AnchoredPOParams(0.02)),
])
def test_classifier_style_objectives_match_formula(name, formula, params):
    out = assert_values(name, params, formula)
    win, lose = log_ratios(CASES[0])
    assert out.rewards[0].tolist() == pytest.approx([params.beta * win, params.beta * lose], rel=1e-6)
    for case in GRADIENT_CASES:
        assert_gradient(name, params, formula, case)


# --- SPPO (hard labels), Cal-DPO ---------------------------------------------------------------

def sppo_hard_formula(case, p):
    win, lose = log_ratios(case)
    return 0.5 * ((win - 1 / (2 * p.beta)) ** 2 + (lose + 1 / (2 * p.beta)) ** 2)


def cal_dpo_formula(case, p):
    win, lose = log_ratios(case)
    target = 1 / (2 * p.beta)
    return -log_sigmoid(win - lose) + p.calibration_weight * ((win - target) ** 2 + (lose + target) ** 2)


@pytest.mark.parametrize("name,formula,params", [
    ("sppo_hard", sppo_hard_formula, SPPOHardParams()),
    ("sppo_hard", sppo_hard_formula, SPPOHardParams(0.1)),
    ("cal_dpo", cal_dpo_formula, CalDPOParams()),
    ("cal_dpo", cal_dpo_formula, CalDPOParams(0.1, 0.5)),
])
def test_regression_style_objectives_match_formula(name, formula, params):
    assert_values(name, params, formula)
    for case in GRADIENT_CASES:
        assert_gradient(name, params, formula, case)


# --- BoNBoN ------------------------------------------------------------------------------------

def harmonic(m):
    return sum(1 / k for k in range(1, m + 1))


def bonbon_formula(case, p):
    win, lose = log_ratios(case)
    nll = -case[0] / (case[4] if p.normalize_sft_length else 1)
    target = (p.n - 1) * harmonic(p.n - 1)
    return p.alpha * nll + (1 - p.alpha) * (win - lose - target) ** 2


@pytest.mark.parametrize("params", [BoNBoNParams(), BoNBoNParams(2, 0.5), BoNBoNParams(16, 0.1, True)])
def test_bonbon_matches_formula(params):
    assert_values("bonbon", params, bonbon_formula)
    for case in GRADIENT_CASES:
        assert_gradient("bonbon", params, bonbon_formula, case)


@pytest.mark.parametrize("n", [2, 4, 8])
def test_bonbon_target_is_the_best_of_n_log_ratio_gap(n):
    """E over n uniform quantiles u of (n-1)[log u_max - log u_min], by numerical integration.

    log pi_BoN/pi_0 (y) = log n + (n-1) log F(r(y)), and F(r) of the best/worst of n samples is
    the max/min of n uniforms, with densities n u^(n-1) and n (1-u)^(n-1).
    """
    steps = 200_000
    grid = [(i + 0.5) / steps for i in range(steps)]
    e_log_max = sum(math.log(u) * n * u ** (n - 1) for u in grid) / steps
    e_log_min = sum(math.log(u) * n * (1 - u) ** (n - 1) for u in grid) / steps
    gap = (n - 1) * (e_log_max - e_log_min)
    inputs, _ = pair_inputs([(-10.0, -10.0 - gap, -10.0, -10.0, 1, 1)])
    loss = get_objective("bonbon")(inputs, BoNBoNParams(n=n, alpha=0.0)).losses.item()
    assert math.sqrt(loss) == pytest.approx(0.0, abs=1e-4)  # loss = (h - target)^2 with h = gap


