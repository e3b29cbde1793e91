"""TPO, MODPO, soft SPPO and group-robust DPO against plain-Python computations of their formulas."""

import math

import pytest
import torch
from objective_cases import (
    CASES,
    GRADIENT_CASES,
    assert_gradient,
    finite_difference,
    log_sigmoid,
    pair_inputs,
)

from preftune.model.forward import SequenceStats
from preftune.objectives import ObjectiveInputs, get_objective
from preftune.objectives.pairwise_extra import (
    GroupRobustDPOParams,
    MODPOParams,
    SPPOSoftParams,
    TriplePOParams,
)


def rho(case):
    pc, pr, rc, rr, _, _ = case
    return pc - rc, pr - rr


# --- Triple PO ---------------------------------------------------------------------------------

# (policy chosen, policy rejected, policy gold, len chosen, len rejected, len gold)
TRIPLES = [
    (-12.0, -15.0, -8.0, 4, 6, 5),
    (-5.0, -5.0, -5.0, 1, 1, 1),
    (-1.0, -9000.0, -0.001, 3, 2, 1),
    (-9000.0, -1.0, -900.0, 2, 3, 4),
    (-0.02, -40.0, -60.0, 1, 7, 9),
]


def triple_inputs(cases, dtype=torch.float32, requires_grad=False):
    logps = torch.tensor([c[:3] for c in cases], dtype=dtype, requires_grad=requires_grad)
    counts = torch.tensor([c[3:] for c in cases], dtype=dtype)
    return ObjectiveInputs(SequenceStats(logps, counts)), logps


def tpo_formula(case, p):
    w, l, g, lw, ll, lg = case
    if p.variant == "tpo_l":
        pref = -log_sigmoid(p.beta * (w / lw - l / ll) - p.gamma)
    else:
        z = p.beta * (w - l)
        pref = -(1 - p.epsilon) * log_sigmoid(z) - p.epsilon * log_sigmoid(-z)
    return pref + p.alpha * (-g / lg)


PARAMS_TPO = [TriplePOParams(), TriplePOParams(0.5, 0.3, 0.1), TriplePOParams(variant="tpo_l"),
              TriplePOParams(2.0, 0.0, variant="tpo_l", gamma=1.5)]


@pytest.mark.parametrize("params", PARAMS_TPO)
def test_triple_po_matches_formula(params):
    inputs, _ = triple_inputs(TRIPLES)
    out = get_objective("triple_po")(inputs, params)
    assert torch.isfinite(out.losses).all() and torch.isfinite(out.rewards).all()
    assert out.rewards.shape == (len(TRIPLES), 3)
    for i, case in enumerate(TRIPLES):
        assert out.losses[i].item() == pytest.approx(tpo_formula(case, params), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("params", PARAMS_TPO)
@pytest.mark.parametrize("case", [TRIPLES[0], TRIPLES[4]])
def test_triple_po_gradient(params, case):
    inputs, logps = triple_inputs([case], dtype=torch.float64, requires_grad=True)
    get_objective("triple_po")(inputs, params).losses.sum().backward()
    for slot in (0, 1, 2):
        expected = finite_difference(lambda v: tpo_formula(tuple(v), params), list(case), slot)
        assert logps.grad[0, slot].item() == pytest.approx(expected, rel=1e-5, abs=1e-8)


def test_triple_po_is_reference_free_and_needs_gold():
    assert not get_objective("triple_po").needs_reference
    inputs, _ = pair_inputs(CASES, reference=False)
    with pytest.raises(ValueError, match="gold"):
        get_objective("triple_po")(inputs, TriplePOParams())


# --- MODPO -------------------------------------------------------------------------------------

MODPO_SCORES = {"chosen_score": [0.3, 0.0, -2.0, 5.0, 1.0, 100.0],
                "rejected_score": [0.1, 0.0, 3.0, -5.0, 1.0, -100.0]}


def modpo_formula(case, p, s_w, s_l):
    w0 = 1 - p.margin_weight
    rw, rl = rho(case)
    return -log_sigmoid(((p.beta * rw - p.margin_weight * s_w) - (p.beta * rl - p.margin_weight * s_l)) / w0)


@pytest.mark.parametrize("params", [MODPOParams(), MODPOParams(0.5, 0.9), MODPOParams(0.1, 0.1),
                                    MODPOParams(0.1, 0.0)])
def test_modpo_matches_formula(params):
    inputs, _ = pair_inputs(CASES, scores=MODPO_SCORES)
    out = get_objective("modpo")(inputs, params)
    assert torch.isfinite(out.losses).all() and torch.isfinite(out.rewards).all()
    for i, case in enumerate(CASES):
        s_w, s_l = MODPO_SCORES["chosen_score"][i], MODPO_SCORES["rejected_score"][i]
        assert out.losses[i].item() == pytest.approx(modpo_formula(case, params, s_w, s_l),
                                                     rel=1e-5, abs=1e-6)
    rw, _ = rho(CASES[0])
    expected = (params.beta * rw - params.margin_weight * 0.3) / (1 - params.margin_weight)
    assert out.rewards[0, 0].item() == pytest.approx(expected, rel=1e-5)


def test_modpo_without_margin_weight_is_dpo():
    inputs, _ = pair_inputs(CASES, scores=MODPO_SCORES)
    ours = get_objective("modpo")(inputs, MODPOParams(0.1, 0.0)).losses
    dpo = get_objective("dpo")(inputs, get_objective("dpo").params(0.1)).losses
    torch.testing.assert_close(ours, dpo)


@pytest.mark.parametrize("case", GRADIENT_CASES)
def test_modpo_gradient(case):
    params = MODPOParams(0.2, 0.3)
    assert_gradient("modpo", params, lambda c, p: modpo_formula(c, p, 1.5, -0.5), case,
                    scores={"chosen_score": [1.5], "rejected_score": [-0.5]})


def test_modpo_names_missing_scores():
    inputs, _ = pair_inputs(CASES)
    with pytest.raises(ValueError, match="chosen_score"):
        get_objective("modpo")(inputs, MODPOParams())


# --- soft SPPO ---------------------------------------------------------------------------------

WINS = {"chosen_win_prob": [0.7, 0.5, 1.0, 0.0, 0.55, 0.9],
        "rejected_win_prob": [0.2, 0.5, 0.0, 1.0, 0.45, 0.1]}


def sppo_formula(case, p, pw, pl):
    rw, rl = rho(case)
    return 0.5 * ((rw - (pw - 0.5) / p.beta) ** 2 + (rl - (pl - 0.5) / p.beta) ** 2)


@pytest.mark.parametrize("params", [SPPOSoftParams(), SPPOSoftParams(0.1), SPPOSoftParams(1.0)])
def test_sppo_soft_matches_formula(params):
    inputs, _ = pair_inputs(CASES, scores=WINS)
    out = get_objective("sppo_soft")(inputs, params)
    assert torch.isfinite(out.losses).all() and torch.isfinite(out.rewards).all()
    for i, case in enumerate(CASES):
        expected = sppo_formula(case, params, WINS["chosen_win_prob"][i], WINS["rejected_win_prob"][i])
        assert out.losses[i].item() == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_sppo_soft_with_hard_targets_is_sppo_hard():
    hard = {"chosen_win_prob": [1.0] * len(CASES), "rejected_win_prob": [0.0] * len(CASES)}
    inputs, _ = pair_inputs(CASES, dtype=torch.float64, scores=hard)
    soft = get_objective("sppo_soft")(inputs, SPPOSoftParams(0.01)).losses
    spec = get_objective("sppo_hard")
    torch.testing.assert_close(soft, spec(inputs, spec.params(0.01)).losses)


@pytest.mark.parametrize("case", GRADIENT_CASES)
def test_sppo_soft_gradient(case):
    assert_gradient("sppo_soft", SPPOSoftParams(0.1), lambda c, p: sppo_formula(c, p, 0.8, 0.3), case,
                    scores={"chosen_win_prob": [0.8], "rejected_win_prob": [0.3]})


def test_sppo_soft_checks_its_scores():
    inputs, _ = pair_inputs(CASES)
    with pytest.raises(ValueError, match="chosen_win_prob"):
        get_objective("sppo_soft")(inputs, SPPOSoftParams())
    check = get_objective("sppo_soft").check
    assert check({"chosen_win_prob": 1.0, "rejected_win_prob": 0.0}, SPPOSoftParams()) is None
    assert check({"chosen_win_prob": 0.5, "rejected_win_prob": -0.1}, SPPOSoftParams()) == (
        "rejected_win_prob is -0.1; a win probability is between 0 and 1.")


# --- group-robust DPO --------------------------------------------------------------------------

GROUPS = [0.0, 1.0, 0.0, 2.0, 1.0, 0.0]


def group_robust_formula(cases, groups, p):
    """Per-example losses l_i alpha_g E / N_g with alpha = softmax(eta L_g) over batch groups."""
    base = [-log_sigmoid(p.beta * (rho(c)[0] - rho(c)[1])) for c in cases]
    members = {g: [i for i, gi in enumerate(groups) if gi == g] for g in set(groups)}
    group_loss = {g: sum(base[i] for i in idx) / len(idx) for g, idx in members.items()}
    top = max(p.step_size * v for v in group_loss.values())
    unnorm = {g: math.exp(p.step_size * v - top) for g, v in group_loss.items()}
    alpha = {g: u / sum(unnorm.values()) for g, u in unnorm.items()}
    return [base[i] * alpha[g] * len(cases) / len(members[g]) for i, g in enumerate(groups)], alpha


@pytest.mark.parametrize("params", [GroupRobustDPOParams(), GroupRobustDPOParams(0.5, 0.1),
                                    GroupRobustDPOParams(0.1, 10.0)])
def test_group_robust_dpo_matches_formula(params):
    inputs, _ = pair_inputs(CASES, scores={"group": GROUPS})
    out = get_objective("group_robust_dpo")(inputs, params)
    assert torch.isfinite(out.losses).all() and torch.isfinite(out.rewards).all()
    expected, alpha = group_robust_formula(CASES, GROUPS, params)
    for i in range(len(CASES)):
        assert out.losses[i].item() == pytest.approx(expected[i], rel=1e-5, abs=1e-6)
    # the batch mean is the alpha-weighted sum of in-batch group means
    base = [-log_sigmoid(params.beta * (rho(c)[0] - rho(c)[1])) for c in CASES]
    robust = sum(a * sum(b for b, g in zip(base, GROUPS) if g == k) / GROUPS.count(k)
                 for k, a in alpha.items())
    assert out.losses.mean().item() == pytest.approx(robust, rel=1e-5)


def test_group_robust_dpo_single_group_is_dpo():
    inputs, _ = pair_inputs(CASES, scores={"group": [3.0] * len(CASES)})
    ours = get_objective("group_robust_dpo")(inputs, GroupRobustDPOParams(0.1, 0.5)).losses
    dpo = get_objective("dpo")(inputs, get_objective("dpo").params(0.1)).losses
    torch.testing.assert_close(ours, dpo)


def test_group_robust_dpo_favours_the_worse_group():
    inputs, _ = pair_inputs(CASES[:4], scores={"group": [0.0, 0.0, 1.0, 1.0]})
    out = get_objective("group_robust_dpo")(inputs, GroupRobustDPOParams(0.1, 1.0))
    _, alpha = group_robust_formula(CASES[:4], [0.0, 0.0, 1.0, 1.0], GroupRobustDPOParams(0.1, 1.0))
    assert alpha[1.0] > alpha[0.0]  # case 3 (very negative margin) makes group 1 the worse one
    assert torch.isfinite(out.losses).all()


def test_group_robust_dpo_gradient_treats_weights_as_constants():
    cases, groups = [CASES[0], CASES[5], CASES[4]], [0.0, 1.0, 1.0]
    params = GroupRobustDPOParams(0.5, 0.5)
    inputs, policy = pair_inputs(cases, dtype=torch.float64, requires_grad=True,
                                 scores={"group": groups})
    get_objective("group_robust_dpo")(inputs, params).losses.sum().backward()
    _, alpha = group_robust_formula(cases, groups, params)
    for i, (case, g) in enumerate(zip(cases, groups)):
        scale = alpha[g] * len(cases) / groups.count(g)
        for slot in (0, 1):
            dpo = lambda v: scale * -log_sigmoid(params.beta * ((v[0] - v[2]) - (v[1] - v[3])))
            expected = finite_difference(dpo, list(case), slot)
            assert policy.grad[i, slot].item() == pytest.approx(expected, rel=1e-5, abs=1e-8)


def test_group_robust_dpo_needs_groups():
    inputs, _ = pair_inputs(CASES)
    with pytest.raises(ValueError, match="group"):
        get_objective("group_robust_dpo")(inputs, GroupRobustDPOParams())
