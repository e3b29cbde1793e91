"""f-DPO, EXO and AOT against plain-Python computations of their papers' formulas."""

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
from pydantic import TypeAdapter, ValidationError

from preftune.objectives import get_objective
from preftune.objectives.divergence import AOTParams, EXOPairParams, FDPOParams

GUARD = 80.0  # preftune clamps exp() arguments at 80 (documented); applied to u^-1, u^-alpha here


def f_prime(rho, p):
    """f'(u), u = pi/pi_ref = e^rho, from the f-DPO paper's table."""
    if p.divergence == "reverse_kl":
        return math.log(math.exp(rho)) if abs(rho) < 700 else rho  # log u
    if p.divergence == "forward_kl":
        return 1 - math.exp(min(-rho, GUARD))  # 1 - 1/u
    if p.divergence == "js":
        u = math.exp(rho)
        return math.log(2 * u / (1 + u))
    return (1 - math.exp(min(-p.alpha * rho, GUARD))) / p.alpha  # (1 - u^-alpha) / alpha


def f_dpo_formula(case, p):
    pc, pr, rc, rr, _, _ = case
    return -log_sigmoid(p.beta * (f_prime(pc - rc, p) - f_prime(pr - rr, p)))


@pytest.mark.parametrize("params", [
    FDPOParams(), FDPOParams(0.1, "forward_kl"), FDPOParams(0.5, "js"), FDPOParams(0.1, "alpha", 0.5),
    FDPOParams(0.1, "alpha", 0.7), FDPOParams(0.2, "alpha", 0.05),
])
def test_f_dpo_matches_formula(params):
    out = assert_values("f_dpo", params, f_dpo_formula, rel=1e-5)
    pc, _, rc, _, _, _ = CASES[0]
    assert out.rewards[0, 0].item() == pytest.approx(params.beta * f_prime(pc - rc, params), rel=1e-5)
    for case in GRADIENT_CASES:
        assert_gradient("f_dpo", params, f_dpo_formula, case)


def test_f_dpo_alpha_limits_are_the_two_kls():
    inputs, _ = pair_inputs(CASES[:2] + CASES[4:])
    run = lambda p: get_objective("f_dpo")(inputs, p).losses  # noqa: E731
    reverse_kl, forward_kl = run(FDPOParams(0.1, "reverse_kl")), run(FDPOParams(0.1, "forward_kl"))
    assert torch.allclose(run(FDPOParams(0.1, "alpha", 1e-6)), reverse_kl, atol=1e-5)
    assert torch.allclose(run(FDPOParams(0.1, "alpha", 1 - 1e-6)), forward_kl, atol=1e-5)
    with pytest.raises(ValidationError, match="0 < alpha < 1"):
        TypeAdapter(FDPOParams).validate_python({"divergence": "alpha", "alpha": 1.5})


# --- EXO ---------------------------------------------------------------------------------------

def exo_formula(case, p):
    pc, pr, rc, rr, _, _ = case
    z, eps = p.beta * ((pc - rc) - (pr - rr)), p.epsilon
    return (sigmoid(z) * (log_sigmoid(z) - math.log(1 - eps))
            + sigmoid(-z) * (log_sigmoid(-z) - math.log(eps)))


@pytest.mark.parametrize("params", [EXOPairParams(), EXOPairParams(0.5, 0.1), EXOPairParams(0.1, 0.5)])
def test_exo_pair_matches_formula(params):
    assert_values("exo_pair", params, exo_formula)
    for case in GRADIENT_CASES:
        assert_gradient("exo_pair", params, exo_formula, case)


def test_exo_pair_needs_positive_epsilon():
    with pytest.raises(ValidationError, match="epsilon"):
        TypeAdapter(EXOPairParams).validate_python({"epsilon": 0.0})


# --- AOT (sorting couples the batch) -----------------------------------------------------------

def smoothed_logistic(z, eps):
    return -(1 - eps) * log_sigmoid(z) - eps * log_sigmoid(-z)


def aot_pair_batch(cases, p):
    policy = sorted(c[0] - c[1] for c in cases)
    reference = sorted(c[2] - c[3] for c in cases)
    return [smoothed_logistic(p.beta * (a - b), p.epsilon) for a, b in zip(policy, reference)]


def aot_unpaired_batch(cases, p):
    chosen = sorted(c[0] - c[2] for c in cases)
    rejected = sorted(c[1] - c[3] for c in cases)
    return [smoothed_logistic(p.beta * (a - b), p.epsilon) for a, b in zip(chosen, rejected)]


# margins and log-ratios all distinct, so a small perturbation cannot reorder the sort
AOT_GRADIENT_BATCH = [CASES[0], CASES[2], CASES[5]]


@pytest.mark.parametrize("name,formula", [("aot_pair", aot_pair_batch),
                                          ("aot_unpaired", aot_unpaired_batch)])
@pytest.mark.parametrize("params", [AOTParams(), AOTParams(0.5, 0.1)])
def test_aot_matches_formula(name, formula, params):
    inputs, _ = pair_inputs(CASES)
    out = get_objective(name)(inputs, params)
    assert_finite(out)
    assert out.losses.tolist() == pytest.approx(formula(CASES, params), rel=1e-5, abs=1e-6)

    inputs, policy = pair_inputs(AOT_GRADIENT_BATCH, dtype=torch.float64, requires_grad=True)
    get_objective(name)(inputs, params).losses.sum().backward()
    flat = [v for case in AOT_GRADIENT_BATCH for v in case]

    def total(values):
        return sum(formula([tuple(values[6 * i: 6 * i + 6]) for i in range(3)], params))

    for i in range(3):
        for slot in (0, 1):
            expected = finite_difference(total, flat, 6 * i + slot)
            assert policy.grad[i, slot].item() == pytest.approx(expected, rel=1e-5, abs=1e-8)


def test_aot_single_pair_is_dpo_with_label_smoothing():
    params = AOTParams(0.1, 0.0)
    inputs, _ = pair_inputs(CASES[:1])
    (pc, pr, rc, rr, _, _), = CASES[:1]
    expected = -log_sigmoid(0.1 * ((pc - rc) - (pr - rr)))
    for name in ("aot_pair", "aot_unpaired"):
        assert get_objective(name)(inputs, params).losses.item() == pytest.approx(expected, rel=1e-6)
