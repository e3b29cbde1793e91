"""TODO (ties) and SELM (optimism term) against plain-Python computations of their formulas."""

import math

import pytest
import torch
from objective_cases import CASES, finite_difference, log_sigmoid, pair_inputs

from preftune.model.forward import SequenceStats
from preftune.objectives import ObjectiveInputs, get_objective
from preftune.objectives.ties_and_exploration import SELMParams, TODOParams


def rho(case):
    pc, pr, rc, rr, _, _ = case
    return pc - rc, pr - rr


# --- TODO ----------------------------------------------------------------------------------------


def todo_formula(case, tie, p):
    """Rao-Kupper tie model in logits, written out with probabilities (authors' tie_loss)."""
    rw, rl = rho(case)
    u, alpha = p.beta * (rw - rl), -p.theta
    if not tie:
        return -log_sigmoid(u - alpha)
    # P(tie) = (e^{2a} - 1) / ((1 + e^{a-u})(1 + e^{a+u})); logs taken term by term for range
    log_p = (math.log(math.exp(2 * alpha) - 1)
             - (math.log1p(math.exp(alpha - u)) if alpha - u < 700 else alpha - u)
             - (math.log1p(math.exp(alpha + u)) if alpha + u < 700 else alpha + u))
    return -log_p


@pytest.mark.parametrize("params", [TODOParams(), TODOParams(beta=0.5, theta=-0.2),
                                    TODOParams(beta=2.0, theta=-1.5)])
@pytest.mark.parametrize("tie", [0.0, 1.0])
def test_todo_matches_formula(params, tie):
    inputs, _ = pair_inputs(CASES, scores={"tie": [tie] * len(CASES)})
    out = get_objective("todo")(inputs, params)
    assert torch.isfinite(out.losses).all() and torch.isfinite(out.rewards).all()
    for i, case in enumerate(CASES):
        expected = todo_formula(case, tie, params)
        assert out.losses[i].item() == pytest.approx(expected, rel=1e-5, abs=1e-5), case
    rw, rl = rho(CASES[0])
    assert out.rewards[0].tolist() == pytest.approx([params.beta * rw, params.beta * rl], rel=1e-6)


def test_todo_mixed_batch_and_tie_probability_peaks_at_zero_margin():
    inputs, _ = pair_inputs(CASES[:2], scores={"tie": [1.0, 0.0]})
    out = get_objective("todo")(inputs, TODOParams(beta=1.0))
    assert out.losses[0].item() == pytest.approx(todo_formula(CASES[0], True, TODOParams(beta=1.0)))
    assert out.losses[1].item() == pytest.approx(todo_formula(CASES[1], False, TODOParams(beta=1.0)))
    # a tie is most likely when the two implied rewards are equal: the loss is lowest at u = 0
    us = torch.linspace(-3, 3, 61)
    from preftune.objectives.ties_and_exploration import tie_nll
    assert us[tie_nll(us, 0.5).argmin()].item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("tie", [0.0, 1.0])
def test_todo_gradient(tie):
    case, p = CASES[0], TODOParams(beta=0.7)
    inputs, policy = pair_inputs([case], dtype=torch.float64, requires_grad=True,
                                 scores={"tie": [tie]})
    get_objective("todo")(inputs, p).losses.sum().backward()
    for slot in (0, 1):
        expected = finite_difference(lambda v: todo_formula(tuple(v), tie, p), list(case), slot)
        assert policy.grad[0, slot].item() == pytest.approx(expected, rel=1e-5, abs=1e-8)


def test_todo_errors():
    inputs, _ = pair_inputs(CASES[:1])
    with pytest.raises(ValueError, match="tie"):
        get_objective("todo")(inputs, TODOParams())
    check = get_objective("todo").check
    assert check({"tie": 1.0}, TODOParams()) is None and check({"tie": False}, TODOParams()) is None
    assert check({"tie": 0.5}, TODOParams()).startswith("tie is 0.5; it is 1 (or true) for a tie")


# --- SELM ----------------------------------------------------------------------------------------

# (policy w, policy l, policy y_ref, reference w, reference l, reference y_ref)
TRIPLES = [
    (-12.0, -15.0, -9.0, -13.0, -14.0, -10.0),
    (-5.0, -5.0, -5.0, -5.0, -5.0, -5.0),
    (-1.0, -900.0, -2.0, -400.0, -400.0, -1.0),
    (-900.0, -1.0, -800.0, -400.0, -400.0, -3.0),
]


def selm_inputs(cases, dtype=torch.float32, requires_grad=False):
    policy = torch.tensor([c[:3] for c in cases], dtype=dtype, requires_grad=requires_grad)
    ref = torch.tensor([c[3:] for c in cases], dtype=dtype)
    counts = torch.ones_like(ref)
    return ObjectiveInputs(SequenceStats(policy, counts), SequenceStats(ref, counts)), policy


def selm_formula(case, p):
    pw, pl, py, rw, rl, ry = case
    h = (pw - rw) - (pl - rl)
    return -log_sigmoid(p.beta * h) + p.alpha * p.beta * (py - ry)


@pytest.mark.parametrize("params", [SELMParams(), SELMParams(beta=0.5, alpha=0.3)])
def test_selm_matches_formula(params):
    inputs, _ = selm_inputs(TRIPLES)
    out = get_objective("selm")(inputs, params)
    assert torch.isfinite(out.losses).all()
    for i, case in enumerate(TRIPLES):
        assert out.losses[i].item() == pytest.approx(selm_formula(case, params), rel=1e-5, abs=1e-6)
    assert out.rewards.shape == (len(TRIPLES), 3)


def test_selm_gradient_lowers_the_reference_sample():
    p = SELMParams(beta=0.5, alpha=0.3)
    inputs, policy = selm_inputs(TRIPLES[:1], dtype=torch.float64, requires_grad=True)
    get_objective("selm")(inputs, p).losses.sum().backward()
    for slot in range(3):
        expected = finite_difference(lambda v: selm_formula(tuple(v), p), list(TRIPLES[0]), slot)
        assert policy.grad[0, slot].item() == pytest.approx(expected, rel=1e-5, abs=1e-8)
    assert policy.grad[0, 2].item() == pytest.approx(p.alpha * p.beta)  # descent lowers y_ref


def test_selm_needs_the_reference_sample():
    inputs, _ = pair_inputs(CASES[:1])
    with pytest.raises(ValueError, match="third response"):
        get_objective("selm")(inputs, SELMParams())


def test_tie_flags_read_from_json_booleans(tmp_path):
    from preftune.data.sources import load_records

    path = tmp_path / "ties.jsonl"
    path.write_text('{"prompt": "p", "chosen": "a", "rejected": "b", "tie": true}\n'
                    '{"prompt": "q", "chosen": "c", "rejected": "d", "tie": false}\n')
    assert [r.scores["tie"] for r in load_records(str(path))] == [1.0, 0.0]
