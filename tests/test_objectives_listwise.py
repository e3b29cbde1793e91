"""Listwise objectives (PRO, listwise DPO, EXO, tree PO) against plain-Python formulas."""

import math

import pytest
import torch
from objective_cases import finite_difference, log_sigmoid

from preftune.model.forward import SequenceStats
from preftune.objectives import ObjectiveInputs, get_objective
from preftune.objectives.listwise import EXOParams, ListwisePLParams, PROParams, TreePOParams

# A case is (policy logps, reference logps, lengths, scores), one entry per response, in data
# order (deliberately not sorted by score). Summed log-probs.
CASES_3 = [
    ([-12.0, -15.0, -9.0], [-13.0, -14.0, -9.5], [4, 6, 3], [0.2, 0.9, 0.5]),
    ([-5.0, -5.0, -5.0], [-5.0, -5.0, -5.0], [1, 1, 1], [1.0, 0.0, 0.5]),  # equal, length 1
    ([-1.0, -900.0, -40.0], [-400.0, -400.0, -40.0], [3, 2, 5], [0.9, 0.1, 0.4]),  # large margins
    ([-900.0, -1.0, -40.0], [-400.0, -400.0, -40.0], [2, 3, 5], [0.9, 0.1, 0.4]),  # reversed
    ([-3.25, -3.2500001, -3.2499999], [-7.5, -7.5, -7.5], [1, 1, 1], [0.3, 0.6, 0.45]),  # tiny
    ([-0.02, -40.0, -22.0], [-0.5, -35.0, -20.0], [1, 7, 4], [3.0, -2.0, 0.5]),  # wider scores
]
TIED_3 = [
    ([-12.0, -15.0, -9.0], [-13.0, -14.0, -9.5], [4, 6, 3], [0.5, 0.9, 0.5]),  # tie at bottom
    ([-12.0, -15.0, -9.0], [-13.0, -14.0, -9.5], [4, 6, 3], [0.9, 0.9, 0.1]),  # tie at top
    ([-7.0, -8.0, -6.5], [-7.5, -7.0, -6.0], [2, 2, 2], [0.4, 0.4, 0.4]),  # all tied
]
CASES_4 = [
    ([-10.0, -11.0, -12.0, -13.0], [-10.5, -10.0, -12.0, -14.0], [3, 4, 5, 6],
     [0.1, 0.7, 0.4, 1.0]),
    ([-2.0, -2.0, -2.0, -2.0], [-2.0, -2.0, -2.0, -2.0], [1, 1, 1, 1], [0.0, 1.0, 0.5, 0.25]),
]
CASES_2 = [
    ([-12.0, -15.0], [-13.0, -14.0], [4, 6], [1.0, 0.0]),
    ([-15.0, -12.0], [-14.0, -13.0], [6, 4], [0.0, 1.0]),
]
EXTREMES_3 = [
    ([-20000.0, -0.5, -3.0], [-0.5, -20000.0, -3.0], [50, 1, 2], [1.0, 0.0, 0.5]),
    ([-0.5, -20000.0, -3.0], [-20000.0, -0.5, -3.0], [1, 50, 2], [1.0, 0.0, 0.5]),
    ([-20000.0, -20000.0, -0.5], [-0.5, -0.5, -20000.0], [60, 1, 1], [50.0, -50.0, 50.0]),
]
ALL_NAMES = ("pro", "listwise_pl", "exo", "tree_po")


def ranked_inputs(cases, dtype=torch.float32, requires_grad=False):
    policy = torch.tensor([c[0] for c in cases], dtype=dtype, requires_grad=requires_grad)
    reference = torch.tensor([c[1] for c in cases], dtype=dtype)
    counts = torch.tensor([c[2] for c in cases], dtype=dtype)
    scores = torch.tensor([c[3] for c in cases], dtype=dtype)
    inputs = ObjectiveInputs(SequenceStats(policy, counts), SequenceStats(reference, counts),
                             {"response_scores": scores})
    return inputs, policy


def logsumexp(values):
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values))


def by_score(case):
    """Response indices sorted best first (only used on tie-free cases)."""
    return sorted(range(len(case[3])), key=lambda i: -case[3][i])


def assert_matches(name, params, formula, cases, rel=1e-5, abs_=1e-5, dtype=torch.float32):
    inputs, _ = ranked_inputs(cases, dtype)
    output = get_objective(name)(inputs, params)
    assert output.losses.shape == (len(cases),)
    assert output.rewards.shape == inputs.policy.logps.shape
    assert torch.isfinite(output.losses).all() and torch.isfinite(output.rewards).all()
    for i, case in enumerate(cases):
        expected = formula(case, params)
        assert output.losses[i].item() == pytest.approx(expected, rel=rel, abs=abs_), case
    return output


def assert_gradient(name, params, formula, case):
    """d loss / d policy logps (float64 autograd) equals central differences of ``formula``."""
    inputs, policy = ranked_inputs([case], torch.float64, requires_grad=True)
    get_objective(name)(inputs, params).losses.sum().backward()
    for k in range(len(case[0])):
        def loss_of(values):
            return formula((values, *case[1:]), params)

        expected = finite_difference(loss_of, list(case[0]), k)
        assert policy.grad[0, k].item() == pytest.approx(expected, rel=1e-5, abs=1e-8), k


def permuted(case, order):
    return tuple([column[i] for i in order] for column in case)


# --- PRO ---------------------------------------------------------------------------------------

def pro_paper_formula(case, p):
    """PRO as in the paper / authors' compute_loss: the list sorted by score, stages 1..n-1."""
    logps, _, lengths, scores = case
    order = by_score(case)
    s = [logps[i] / lengths[i] for i in order]
    r = [scores[i] for i in order]
    n = len(order)
    total = 0.0
    for k in range(n - 1):
        if p.reward_gap_temperature:
            temps = [r[k] - r[i] for i in range(k + 1, n)]
        else:
            temps = [1.0] * (n - k - 1)
        top = max(temps)
        terms = [s[k] * top] + [s[i] * t for i, t in zip(range(k + 1, n), temps)]
        total += logsumexp(terms) - s[k] * top
    return total + p.sft_weight * (n - 1) ** 2 * -logps[order[0]]


def pro_tie_formula(case, p):
    """The documented tie rule: stage k contrasts y_k only with strictly lower-scored responses;
    the SFT term averages over the responses tied for the best score."""
    logps, _, lengths, scores = case
    n = len(scores)
    s = [logps[i] / lengths[i] for i in range(n)]
    total = 0.0
    for k in range(n):
        worse = [j for j in range(n) if scores[j] < scores[k]]
        if not worse:
            continue
        temps = [scores[k] - scores[j] for j in worse]
        top = max(temps)
        total += logsumexp([s[k] * top] + [s[j] * t for j, t in zip(worse, temps)]) - s[k] * top
    best = [i for i in range(n) if scores[i] == max(scores)]
    nll = sum(-logps[i] for i in best) / len(best)
    return total + p.sft_weight * (n - 1) ** 2 * nll


PRO_PARAMS = [PROParams(), PROParams(0.0), PROParams(1.0), PROParams(0.05, False)]


@pytest.mark.parametrize("params", PRO_PARAMS)
def test_pro_matches_paper_formula(params):
    for cases in (CASES_3, CASES_4, CASES_2):
        out = assert_matches("pro", params, pro_paper_formula, cases)
    assert out.rewards[0, 0].item() == pytest.approx(-12.0 / 4)  # s = mean log-prob


def test_pro_ties_follow_the_documented_rule_and_ignore_tie_order():
    params = PROParams()
    assert_matches("pro", params, pro_tie_formula, TIED_3)
    assert_matches("pro", params, pro_tie_formula, CASES_3)  # same rule without ties
    for case in TIED_3:
        tied_pair = [1, 0, 2] if case[3][0] == case[3][1] else [2, 1, 0]
        swapped = permuted(case, tied_pair)
        a = get_objective("pro")(ranked_inputs([case])[0], params).losses
        b = get_objective("pro")(ranked_inputs([swapped])[0], params).losses
        assert a.item() == pytest.approx(b.item(), rel=1e-6)
    # all tied: no ranking stage, only the SFT term on all of them
    all_tied = TIED_3[2]
    assert pro_tie_formula(all_tied, params) == pytest.approx(0.05 * 4 * (7.0 + 8.0 + 6.5) / 3)


@pytest.mark.parametrize("params", PRO_PARAMS[:2] + PRO_PARAMS[3:])
def test_pro_gradient(params):
    for case in (CASES_3[0], CASES_3[5], CASES_4[0]):
        assert_gradient("pro", params, pro_paper_formula, case)
    assert_gradient("pro", params if params.reward_gap_temperature else PROParams(),
                    pro_tie_formula, TIED_3[0])


def test_pro_needs_no_reference():
    spec = get_objective("pro")
    assert not spec.needs_reference and spec.data == "ranked"
    inputs, _ = ranked_inputs(CASES_3)
    inputs.reference = None
    assert torch.isfinite(spec(inputs, PROParams()).losses).all()


# --- listwise DPO (Plackett-Luce) --------------------------------------------------------------

def pl_formula(case, p):
    """-log P(ranking) under Plackett-Luce with r = beta * log-ratio, list sorted by score."""
    order = by_score(case)
    r = [p.beta * (case[0][i] - case[1][i]) for i in order]
    return sum(logsumexp(r[k:]) - r[k] for k in range(len(r) - 1))


def pl_tie_formula(case, p):
    scores = case[3]
    n = len(scores)
    r = [p.beta * (case[0][i] - case[1][i]) for i in range(n)]
    total = 0.0
    for k in range(n):
        worse = [r[j] for j in range(n) if scores[j] < scores[k]]
        if worse:
            total += logsumexp([r[k]] + worse) - r[k]
    return total


@pytest.mark.parametrize("params", [ListwisePLParams(), ListwisePLParams(0.5),
                                    ListwisePLParams(2.0)])
def test_listwise_pl_matches_formula(params):
    for cases in (CASES_3, CASES_4):
        assert_matches("listwise_pl", params, pl_formula, cases)
    assert_matches("listwise_pl", params, pl_tie_formula, TIED_3)
    for case in (CASES_3[0], CASES_4[0]):
        assert_gradient("listwise_pl", params, pl_formula, case)
    assert_gradient("listwise_pl", params, pl_tie_formula, TIED_3[1])


def test_listwise_pl_with_two_responses_is_dpo():
    params = ListwisePLParams(0.1)

    def dpo(case, p):
        w, l = by_score(case)
        h = (case[0][w] - case[1][w]) - (case[0][l] - case[1][l])
        return -log_sigmoid(p.beta * h)

    assert_matches("listwise_pl", params, dpo, CASES_2)


def test_listwise_pl_ties_are_not_ordered():
    # two tied responses at the top, nothing below: no stage at all
    case = ([-3.0, -9.0], [-4.0, -2.0], [2, 2], [0.7, 0.7])
    inputs, policy = ranked_inputs([case], requires_grad=True)
    out = get_objective("listwise_pl")(inputs, ListwisePLParams())
    out.losses.sum().backward()
    assert out.losses.item() == 0.0 and policy.grad.abs().max().item() == 0.0


# --- EXO ---------------------------------------------------------------------------------------

def exo_formula(case, p):
    n = len(case[0])
    logits = [p.beta_pi * (case[0][i] - case[1][i]) for i in range(n)]
    target = [case[3][i] / p.beta_r for i in range(n)]
    log_p = [x - logsumexp(logits) for x in logits]
    log_q = [x - logsumexp(target) for x in target]
    return sum(math.exp(a) * (a - b) for a, b in zip(log_p, log_q))


@pytest.mark.parametrize("params", [EXOParams(), EXOParams(0.1, 0.1), EXOParams(1.0, 0.05)])
def test_exo_matches_formula(params):
    for cases in (CASES_3, TIED_3, CASES_4, CASES_2):
        out = assert_matches("exo", params, exo_formula, cases)
    assert out.rewards[0, 0].item() == pytest.approx(params.beta_pi * (-12.0 + 13.0), rel=1e-6)
    for case in (CASES_3[0], CASES_3[5], TIED_3[0]):
        assert_gradient("exo", params, exo_formula, case)


def test_exo_is_zero_when_the_policy_matches_the_score_distribution():
    p = EXOParams(0.5, 0.5)
    scores = [0.3, 1.2, -0.4]
    case = ([s / p.beta_r / p.beta_pi - 7.0 for s in scores], [-7.0] * 3, [2, 2, 2], scores)
    inputs, _ = ranked_inputs([case], torch.float64)
    assert get_objective("exo")(inputs, p).losses.item() == pytest.approx(0.0, abs=1e-12)


def test_exo_with_two_responses_equals_exo_pair_with_a_soft_label():
    """K = 2 with scores (0, log((1 - eps) / eps) * beta_r) is EXO-pref with label smoothing eps."""
    from preftune.objectives.divergence import EXOPairParams

    eps, beta = 1e-3, 0.1
    gap = math.log((1 - eps) / eps) * beta
    pair_case = ([-12.0, -15.0], [-13.0, -14.0], [4, 6], [gap, 0.0])
    inputs, _ = ranked_inputs([pair_case], torch.float64)
    listwise = get_objective("exo")(inputs, EXOParams(beta, beta)).losses.item()
    inputs.scores = {}
    pair = get_objective("exo_pair")(inputs, EXOPairParams(beta=beta, epsilon=eps)).losses.item()
    assert listwise == pytest.approx(pair, rel=1e-9)




# --- tree PO (LiPO-lambda weights) -------------------------------------------------------------

def tree_po_formula(case, p):
    n = len(case[0])
    r = [p.beta * (case[0][i] - case[1][i]) for i in range(n)]
    psi = case[3]
    # rank by implied reward (desc), ties by score (desc), then by position
    order = sorted(range(n), key=lambda i: (-r[i], -psi[i], i))
    rank = {i: position + 1 for position, i in enumerate(order)}
    gain = [2.0 ** x - 1.0 for x in psi]
    inv_discount = [1.0 / math.log2(1 + rank[i]) for i in range(n)]
    total = 0.0
    for i in range(n):
        for j in range(n):
            if psi[i] > psi[j]:
                weight = abs(gain[i] - gain[j]) * abs(inv_discount[i] - inv_discount[j])
                total += -weight * log_sigmoid(r[i] - r[j])
    return total


@pytest.mark.parametrize("params", [TreePOParams(), TreePOParams(0.5), TreePOParams(2.0)])
def test_tree_po_matches_formula(params):
    # float64: the tiny-margin case's rewards differ by 1e-7, below float32 resolution, and the
    # rank (so the weight) of near-tied rewards depends on which way they fall
    for cases in (CASES_3, TIED_3, CASES_4, CASES_2):
        assert_matches("tree_po", params, tree_po_formula, cases, dtype=torch.float64)
    assert_matches("tree_po", params, tree_po_formula, CASES_3[:4] + CASES_3[5:])
    # away from reward ties (where the rank, and so the weight, jumps)
    for case in (CASES_3[0], CASES_3[5], CASES_4[0], TIED_3[0]):
        assert_gradient("tree_po", params, tree_po_formula, case)


def test_tree_po_weights_are_detached_and_swap_sensitive():
    # a correctly ranked list still gets weights; weights follow the model's current ranking
    case = ([-10.0, -12.0, -14.0], [-12.0, -12.0, -12.0], [2, 2, 2], [1.0, 0.5, 0.0])
    flipped = ([-14.0, -12.0, -10.0], [-12.0, -12.0, -12.0], [2, 2, 2], [1.0, 0.5, 0.0])
    params = TreePOParams(1.0)
    for c in (case, flipped):
        inputs, _ = ranked_inputs([c], torch.float64)
        assert get_objective("tree_po")(inputs, params).losses.item() == pytest.approx(
            tree_po_formula(c, params), rel=1e-10)


def test_tree_po_rejects_scores_that_overflow_its_gains():
    check = get_objective("tree_po").check
    assert check({"response_scores": [60.0, -60.0]}, TreePOParams()) is None
    assert check({"response_scores": [1.0, -100.0]}, TreePOParams()).startswith(
        "a score of 100: tree_po weights pairs by 2^score, so |scores| must be at most 60.")


# --- shared properties ---------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", ALL_NAMES)
def test_listwise_objectives_finite_at_extremes(name, dtype):
    spec = get_objective(name)
    cases = EXTREMES_3 + CASES_3 + TIED_3
    inputs, policy = ranked_inputs(cases, dtype, requires_grad=True)
    output = spec(inputs, spec.params())
    assert torch.isfinite(output.losses).all(), output.losses
    assert torch.isfinite(output.rewards).all()
    output.losses.sum().backward()
    assert torch.isfinite(policy.grad).all()


@pytest.mark.parametrize("name", ALL_NAMES)
def test_listwise_objectives_do_not_depend_on_response_order(name):
    spec = get_objective(name)
    order = [2, 0, 1]
    a, _ = ranked_inputs(CASES_3 + TIED_3, torch.float64)
    b, _ = ranked_inputs([permuted(c, order) for c in CASES_3 + TIED_3], torch.float64)
    la, lb = spec(a, spec.params()).losses, spec(b, spec.params()).losses
    assert torch.allclose(la, lb, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ALL_NAMES)
def test_listwise_objectives_name_missing_scores(name):
    inputs, _ = ranked_inputs(CASES_3)
    inputs.scores = {}
    with pytest.raises(ValueError, match="response_scores"):
        get_objective(name)(inputs, get_objective(name).params())
