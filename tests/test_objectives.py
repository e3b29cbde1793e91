"""Objective losses against independent, plain-Python computations of the papers' formulas."""

import math

import pytest
import torch

from objective_cases import CASES, log_sigmoid, pair_inputs
from preftune.objectives import get_objective
from preftune.objectives.pairwise import DPOParams
from preftune.objectives.reference_free import SimPOParams


def neg_log_sigmoid(z: float) -> float:
    return -log_sigmoid(z)


def inputs_for(cases, requires_grad=False):
    return pair_inputs(cases, requires_grad=requires_grad)


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_matches_formula(beta):
    inputs, _ = inputs_for(CASES)
    out = get_objective("dpo")(inputs, DPOParams(beta=beta))
    for i, (pc, pr, rc, rr, _, _) in enumerate(CASES):
        z = beta * ((pc - rc) - (pr - rr))
        assert out.losses[i].item() == pytest.approx(neg_log_sigmoid(z), rel=1e-5, abs=1e-6)
        assert out.rewards[i, 0].item() == pytest.approx(beta * (pc - rc), rel=1e-6)
        assert out.rewards[i, 1].item() == pytest.approx(beta * (pr - rr), rel=1e-6)
    assert torch.isfinite(out.losses).all()


def test_dpo_gradient_matches_formula():
    beta = 0.1
    inputs, policy = inputs_for(CASES[:1], requires_grad=True)
    get_objective("dpo")(inputs, DPOParams(beta=beta)).losses.sum().backward()
    pc, pr, rc, rr, _, _ = CASES[0]
    z = beta * ((pc - rc) - (pr - rr))
    # d/dz -log sigmoid(z) = -(1 - sigmoid(z)) = -1 / (1 + e^z)
    dz = -1.0 / (1.0 + math.exp(z))
    assert policy.grad[0, 0].item() == pytest.approx(beta * dz, rel=1e-5)
    assert policy.grad[0, 1].item() == pytest.approx(-beta * dz, rel=1e-5)


@pytest.mark.parametrize("beta,ratio", [(2.0, 0.5), (2.5, 0.1)])
def test_simpo_matches_formula(beta, ratio):
    inputs, _ = inputs_for(CASES)
    inputs.reference = None
    out = get_objective("simpo")(inputs, SimPOParams(beta=beta, gamma_beta_ratio=ratio))
    gamma = beta * ratio
    for i, (pc, pr, _, _, lc, lr) in enumerate(CASES):
        z = beta / lc * pc - beta / lr * pr - gamma
        assert out.losses[i].item() == pytest.approx(neg_log_sigmoid(z), rel=1e-5, abs=1e-6)
        assert out.rewards[i, 0].item() == pytest.approx(beta * pc / lc, rel=1e-6)
    assert torch.isfinite(out.losses).all()


def test_simpo_gradient_matches_formula():
    beta, ratio = 2.0, 0.5
    inputs, policy = inputs_for(CASES[:1], requires_grad=True)
    inputs.reference = None
    get_objective("simpo")(inputs, SimPOParams(beta, ratio)).losses.sum().backward()
    pc, pr, _, _, lc, lr = CASES[0]
    z = beta / lc * pc - beta / lr * pr - beta * ratio
    dz = -1.0 / (1.0 + math.exp(z))
    assert policy.grad[0, 0].item() == pytest.approx(dz * beta / lc, rel=1e-5)
    assert policy.grad[0, 1].item() == pytest.approx(-dz * beta / lr, rel=1e-5)


def test_reference_objective_refuses_missing_reference():
    inputs, _ = inputs_for(CASES)
    inputs.reference = None
    with pytest.raises(ValueError, match="needs reference"):
        get_objective("dpo")(inputs, DPOParams())


def test_unknown_objective_suggests_the_closest_name():
    with pytest.raises(KeyError, match="dpo"):
        get_objective("dpoo")
