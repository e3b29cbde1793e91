"""Margin-based pairwise objectives against plain-Python computations of their papers' formulas."""

import math

import pytest
from objective_cases import (
    CASES,
    GRADIENT_CASES,
    assert_gradient,
    assert_values,
    log_sigmoid,
    pair_inputs,
    sigmoid,
)

from preftune.objectives import get_objective
from preftune.objectives.pairwise import (
    CDPOParams,
    DiscoPOPParams,
    DPOSFTParams,
    DPOShiftParams,
    HingeParams,
    IPOParams,
    LNDPOParams,
    MIPOParams,
    ODPOParams,
    RobustDPOParams,
)


def margin(case):
    """h = [log pi(y_w) - log ref(y_w)] - [log pi(y_l) - log ref(y_l)]."""
    pc, pr, rc, rr, _, _ = case
    return (pc - rc) - (pr - rr)


# --- IPO ---------------------------------------------------------------------------------------

def ipo_formula(case, p):
    pc, pr, rc, rr, lc, lr = case
    chosen, rejected = pc - rc, pr - rr
    if p.normalize_length:
        chosen, rejected = chosen / lc, rejected / lr
    return (chosen - rejected - 1 / (2 * p.beta)) ** 2


@pytest.mark.parametrize("params", [IPOParams(0.1, True), IPOParams(0.5, False), IPOParams(0.01)])
def test_ipo_matches_formula(params):
    out = assert_values("ipo", params, ipo_formula)
    pc, _, rc, _, lc, _ = CASES[0]
    expected = params.beta * (pc - rc) / (lc if params.normalize_length else 1)
    assert out.rewards[0, 0].item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("case", GRADIENT_CASES)
@pytest.mark.parametrize("params", [IPOParams(0.1, True), IPOParams(0.1, False)])
def test_ipo_gradient(params, case):
    assert_gradient("ipo", params, ipo_formula, case)


# --- conservative and robust DPO -----------------------------------------------------------------

def cdpo_formula(case, p):
    z = p.beta * margin(case)
    return -(1 - p.epsilon) * log_sigmoid(z) - p.epsilon * log_sigmoid(-z)


def robust_formula(case, p):
    z, eps = p.beta * margin(case), p.epsilon
    return ((1 - eps) * -log_sigmoid(z) - eps * -log_sigmoid(-z)) / (1 - 2 * eps)


@pytest.mark.parametrize("params", [CDPOParams(), CDPOParams(0.5, 0.3), CDPOParams(0.1, 0.0)])
def test_cdpo_matches_formula(params):
    assert_values("cdpo", params, cdpo_formula)
    for case in GRADIENT_CASES:
        assert_gradient("cdpo", params, cdpo_formula, case)


@pytest.mark.parametrize("params", [RobustDPOParams(), RobustDPOParams(0.1, 0.4), RobustDPOParams(0.1, 0)])
def test_robust_dpo_matches_formula(params):
    assert_values("robust_dpo", params, robust_formula)
    for case in GRADIENT_CASES:
        assert_gradient("robust_dpo", params, robust_formula, case)


def test_robust_dpo_keeps_its_value_as_the_flip_rate_nears_one_half():
    """At h = 0 the loss is log 2 whatever eps; in float32 the formula's difference of two
    nearly equal terms gave 0.745 at eps = 0.4999999 and 0 at 0.49999999999."""
    for eps in (0.4999, 0.4999999, 0.49999999999):
        output = assert_values("robust_dpo", RobustDPOParams(0.1, eps), robust_formula,
                               cases=[CASES[1]])  # equal log-probs: h = 0
        assert output.losses[0].item() == pytest.approx(math.log(2), rel=1e-6)




# --- hinge -------------------------------------------------------------------------------------

def hinge_formula(case, p):
    return max(0.0, 1 - p.beta * margin(case))


@pytest.mark.parametrize("params", [HingeParams(), HingeParams(0.5), HingeParams(2.0)])
def test_hinge_matches_formula(params):
    assert_values("hinge", params, hinge_formula)
    for case in (CASES[3], CASES[5]):  # away from the kink at beta h = 1
        assert_gradient("hinge", params, hinge_formula, case)


def test_hinge_is_flat_once_the_margin_is_met():
    inputs, policy = pair_inputs([CASES[2]], requires_grad=True)
    get_objective("hinge")(inputs, HingeParams(0.5)).losses.sum().backward()
    assert policy.grad.abs().max().item() == 0.0


# --- ODPO --------------------------------------------------------------------------------------

SCORES = {"chosen_score": [9.0, 3.5, 7.0, 2.0, 5.0, 8.0],
          "rejected_score": [1.0, 3.0, 6.5, 1.5, 4.0, 0.5]}


def odpo_formula_for(index):
    def formula(case, p):
        sw, sl = SCORES["chosen_score"][index], SCORES["rejected_score"][index]
        offset = p.alpha * (math.log(sw - sl) if p.offset == "difference" else math.log(sw / sl))
        return -log_sigmoid(p.beta * margin(case) - offset)
    return formula


@pytest.mark.parametrize("params", [ODPOParams(), ODPOParams(0.5, 2.0, "ratio"), ODPOParams(0.1, 0.5)])
def test_odpo_matches_formula(params):
    inputs, _ = pair_inputs(CASES, scores=SCORES)
    out = get_objective("odpo")(inputs, params)
    for i, case in enumerate(CASES):
        expected = odpo_formula_for(i)(case, params)
        assert out.losses[i].item() == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert_gradient("odpo", params, odpo_formula_for(0), CASES[0],
                    scores={k: v[:1] for k, v in SCORES.items()})


def test_odpo_names_missing_scores():
    inputs, _ = pair_inputs(CASES, scores={"chosen_score": SCORES["chosen_score"]})
    with pytest.raises(ValueError, match="rejected_score") as error:
        get_objective("odpo")(inputs, ODPOParams())
    assert "chosen_score" in str(error.value)  # lists what the batch does have


def test_odpo_refuses_records_its_offset_is_undefined_for():
    check = get_objective("odpo").check
    assert check({"chosen_score": 2.0, "rejected_score": 1.0}, ODPOParams()) is None
    assert check({"chosen_score": 1.0, "rejected_score": 1.0}, ODPOParams()).startswith(
        "chosen_score 1 is not above rejected_score 1, and offset 'difference' takes the log")
    ratio = ODPOParams(offset="ratio")
    assert check({"chosen_score": 1.0, "rejected_score": 2.0}, ratio) is None
    assert check({"chosen_score": 1.0, "rejected_score": 0.0}, ratio).startswith(
        "chosen_score 1 and rejected_score 0: offset 'ratio' takes the log of their ratio")


# --- DPO-Shift ---------------------------------------------------------------------------------

def dpo_shift_formula_at(lam):
    def formula(case, p):
        pc, pr, rc, rr, _, _ = case
        return -log_sigmoid(p.beta * ((pc - lam * pr) - (rc - lam * rr)))
    return formula


@pytest.mark.parametrize("lam", [0.95, 0.5, 1.0])
def test_dpo_shift_fixed_matches_formula(lam):
    params = DPOShiftParams(shift_lambda=lam)
    out = assert_values("dpo_shift", params, dpo_shift_formula_at(lam))
    pr, rr = CASES[0][1], CASES[0][3]
    assert out.rewards[0, 1].item() == pytest.approx(0.1 * lam * (pr - rr), rel=1e-6)
    assert_gradient("dpo_shift", params, dpo_shift_formula_at(lam), CASES[0])


@pytest.mark.parametrize("schedule,step,lam", [
    ("increase_linear", 0, 0.5), ("increase_linear", 25, 0.625), ("increase_linear", 100, 1.0),
    ("increase_linear", 400, 1.0), ("decrease_linear", 0, 1.0), ("decrease_linear", 50, 0.75),
    ("decrease_linear", 100, 0.5),
])
def test_dpo_shift_schedules_follow_the_step(schedule, step, lam):
    params = DPOShiftParams(schedule=schedule, schedule_steps=100)
    inputs, _ = pair_inputs(CASES)
    inputs.step = step
    out = get_objective("dpo_shift")(inputs, params)
    for i, case in enumerate(CASES):
        expected = dpo_shift_formula_at(lam)(case, params)
        assert out.losses[i].item() == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_dpo_shift_linear_schedule_needs_its_length():
    with pytest.raises(ValueError, match="schedule_steps"):
        DPOShiftParams(schedule="decrease_linear")


# --- LN-DPO, DPO+SFT ---------------------------------------------------------------------------

def ln_dpo_formula(case, p):
    pc, pr, rc, rr, lc, lr = case
    return -log_sigmoid(p.beta * ((pc - rc) / lc - (pr - rr) / lr))


def dpo_sft_formula(case, p):
    pc, lc = case[0], case[4]
    return -log_sigmoid(p.beta * margin(case)) + p.alpha * (-pc / lc)


@pytest.mark.parametrize("params", [LNDPOParams(), LNDPOParams(2.0)])
def test_ln_dpo_matches_formula(params):
    out = assert_values("ln_dpo", params, ln_dpo_formula)
    pc, _, rc, _, lc, _ = CASES[0]
    assert out.rewards[0, 0].item() == pytest.approx(params.beta * (pc - rc) / lc, rel=1e-6)
    for case in GRADIENT_CASES:
        assert_gradient("ln_dpo", params, ln_dpo_formula, case)


@pytest.mark.parametrize("params", [DPOSFTParams(), DPOSFTParams(0.1, 1.0)])
def test_dpo_sft_matches_formula(params):
    assert_values("dpo_sft", params, dpo_sft_formula)
    for case in GRADIENT_CASES:
        assert_gradient("dpo_sft", params, dpo_sft_formula, case)


# --- DiscoPOP ----------------------------------------------------------------------------------

def discopop_formula(case, p):
    z = p.beta * margin(case)
    gate = sigmoid(z / p.tau)
    exponential = gate * math.exp(-z) if gate > 0 else 0.0  # the product's limit when gate -> 0
    return (1 - gate) * -log_sigmoid(z) + exponential


@pytest.mark.parametrize("params", [DiscoPOPParams(), DiscoPOPParams(0.1, 0.5), DiscoPOPParams(1, 0.05)])
def test_discopop_matches_formula(params):
    assert_values("discopop", params, discopop_formula)
    for case in GRADIENT_CASES:
        assert_gradient("discopop", params, discopop_formula, case)


# --- MIPO --------------------------------------------------------------------------------------

def mipo_formula(case, p):
    pc, pr, rc, rr, lc, lr = case
    k = rc / lc - rr / lr
    return -log_sigmoid(p.beta * (pc / lc - pr / lr - math.log(1 + math.exp(k))))


@pytest.mark.parametrize("params", [MIPOParams(), MIPOParams(5.0)])
def test_mipo_matches_formula(params):
    out = assert_values("mipo", params, mipo_formula)
    assert out.rewards[0, 0].item() == pytest.approx(params.beta * CASES[0][0] / CASES[0][4], rel=1e-6)
    for case in GRADIENT_CASES:
        assert_gradient("mipo", params, mipo_formula, case)
