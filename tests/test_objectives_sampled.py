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


def exact_f_divergence(policy_logps, reference_logps, rewards, beta, divergence):
    """D_f(pi || p) = sum_y p(y) f(pi(y) / p(y)) over a whole finite support, with
    p = pi_ref exp(r / beta) / Z: the quantity f-DPG minimises, written out directly."""
    tilted = reference_logps + rewards / beta
    p = torch.exp(tilted - torch.logsumexp(tilted, 0))
    t = torch.exp(policy_logps) / p
    f = {"reverse_kl": lambda t: t * torch.log(t), "forward_kl": lambda t: -torch.log(t),
         "js": lambda t: 0.5 * (t * torch.log(2 * t / (1 + t)) - torch.log((1 + t) / 2)),
         "tv": lambda t: 0.5 * (t - 1).abs()}[divergence]
    return (p * f(t)).sum()


@pytest.mark.parametrize("divergence", ["reverse_kl", "forward_kl", "js", "tv"])
@pytest.mark.parametrize("beta", [0.5, 2.0])
def test_fdpg_is_the_f_divergence_to_the_tilted_reference_and_its_gradient(divergence, beta):
    """A list that is the whole support of a uniform reference (each outcome once: its sample
    mean is the expectation): the loss equals D_f(pi_theta || pi_ref e^(r/beta) / Z) and its
    gradient in the policy's logits that of the exact divergence."""
    from preftune.model.forward import SequenceStats
    from preftune.objectives.registry import ObjectiveInputs
    from preftune.objectives.sampled import FDPGParams

    logits = torch.tensor([0.3, -1.2, 0.8, 0.1, -0.4], dtype=torch.float64, requires_grad=True)
    rewards = torch.tensor([1.0, 0.0, 0.5, 1.0, -0.3], dtype=torch.float64)
    reference = torch.full((5,), math.log(1 / 5), dtype=torch.float64)
    exact = exact_f_divergence(torch.log_softmax(logits, 0), reference, rewards, beta,
                               divergence)
    (expected,) = torch.autograd.grad(exact, logits)
    policy = torch.log_softmax(logits, 0)[None]
    counts = torch.ones_like(policy)
    inputs = ObjectiveInputs(SequenceStats(policy, counts),
                             SequenceStats(reference[None], counts),
                             {"response_scores": rewards[None]})
    loss = get_objective("fdpg")(inputs, FDPGParams(beta=beta, divergence=divergence)).losses
    assert loss.item() == pytest.approx(exact.item(), rel=1e-10, abs=1e-12)
    loss.sum().backward()
    torch.testing.assert_close(logits.grad, expected, rtol=1e-9, atol=1e-12)


def test_fdpg_pulls_a_policy_equal_to_the_reference_toward_the_rewarded_samples():
    """At pi_theta = pi_ref (round start) the weights are 1 and each sample's gradient is
    (f'(t_i) - mean f') / K with t_i = Z e^(-r_i / beta): written out for reverse KL."""
    case = ([-4.0, -6.0, -5.0], [-4.0, -6.0, -5.0], [2, 3, 2], [1.0, 0.0, 0.5])
    inputs, policy = ranked_inputs([case], torch.float64, requires_grad=True)
    from preftune.objectives.sampled import FDPGParams

    get_objective("fdpg")(inputs, FDPGParams(beta=0.5, divergence="reverse_kl")).losses.sum() \
        .backward()
    z = sum(math.exp(r / 0.5) for r in case[3]) / 3
    slopes = [math.log(z) - r / 0.5 + 1 for r in case[3]]
    mean = sum(slopes) / 3
    assert policy.grad[0].tolist() == pytest.approx([(s - mean) / 3 for s in slopes])
    assert policy.grad[0, 0] < 0 < policy.grad[0, 1]  # the best sample goes up, the worst down
