"""Unpaired objectives (KTO, BCO) against plain-Python computations of their papers' formulas."""

import math

import pytest
import torch
from objective_cases import finite_difference, log_sigmoid, sigmoid
from pydantic import TypeAdapter, ValidationError

from preftune.model.forward import SequenceStats
from preftune.objectives import ObjectiveInputs, get_objective
from preftune.objectives.unpaired import BCOParams, KTOParams

# (policy logp of y, reference logp of y, policy logp of the mismatched y', reference logp of y',
#  |y|, label 1 = desirable), summed log-probs.
CASES = [
    (-12.0, -13.0, -20.0, -21.5, 4, 1),
    (-5.0, -5.0, -5.0, -5.0, 1, 0),  # equal logps, length-1 response
    (-1.0, -400.0, -30.0, -31.0, 3, 1),  # very large log-ratio
    (-900.0, -400.0, -8.0, -9.0, 2, 0),  # very negative log-ratio
    (-3.25, -3.2500001, -7.5, -7.5, 1, 1),  # tiny log-ratio
    (-0.02, -0.5, -14.0, -10.0, 1, 0),  # undesirable, policy almost certain of it
    (-40.0, -35.0, -60.0, -55.0, 7, 1),  # desirable pushed below the reference
]
EXTREMES = [
    (-20000.0, -0.5, -0.5, -20000.0, 50, 1),
    (-0.5, -20000.0, -20000.0, -0.5, 1, 0),
    (-0.5, -20000.0, -0.5, -20000.0, 1, 1),
]


def unpaired_inputs(cases, dtype=torch.float32, requires_grad=False, kl=True):
    slots = (0, 2) if kl else (0,)
    ref_slots = (1, 3) if kl else (1,)
    policy = torch.tensor([[c[i] for i in slots] for c in cases], dtype=dtype,
                          requires_grad=requires_grad)
    reference = torch.tensor([[c[i] for i in ref_slots] for c in cases], dtype=dtype)
    counts = torch.tensor([[c[4]] * len(slots) for c in cases], dtype=dtype)
    label = torch.tensor([float(c[5]) for c in cases], dtype=dtype)
    inputs = ObjectiveInputs(SequenceStats(policy, counts), SequenceStats(reference, counts),
                             {"label": label})
    return inputs, policy


def assert_finite(output, cases, slots):
    assert output.losses.shape == (len(cases),)
    assert output.rewards.shape == (len(cases), slots)
    assert torch.isfinite(output.losses).all(), output.losses
    assert torch.isfinite(output.rewards).all(), output.rewards


# --- KTO ---------------------------------------------------------------------------------------

def kto_reference_point(cases):
    """z_ref = max(0, mean over the batch of the mismatched completions' log-ratios)."""
    return max(0.0, sum(c[2] - c[3] for c in cases) / len(cases))


def kto_formula(case, p, z_ref):
    rho = case[0] - case[1]
    if case[5]:
        return p.desirable_weight * (1 - sigmoid(p.beta * (rho - z_ref)))
    return p.undesirable_weight * (1 - sigmoid(p.beta * (z_ref - rho)))


KTO_PARAMS = [KTOParams(), KTOParams(0.5, 1.33, 1.0), KTOParams(2.0, 1.0, 0.5)]


@pytest.mark.parametrize("params", KTO_PARAMS)
@pytest.mark.parametrize("size", [1, 2, 3, 5, 7])  # odd sizes and a batch of one
def test_kto_matches_formula_for_any_batch_size(params, size):
    cases = CASES[:size]
    inputs, _ = unpaired_inputs(cases)
    output = get_objective("kto")(inputs, params)
    assert_finite(output, cases, 2)
    z_ref = kto_reference_point(cases)
    for i, case in enumerate(cases):
        expected = kto_formula(case, params, z_ref)
        assert output.losses[i].item() == pytest.approx(expected, rel=1e-5, abs=1e-6), case
        assert output.rewards[i, 0].item() == pytest.approx(params.beta * (case[0] - case[1]),
                                                            rel=1e-6, abs=1e-6)


def test_kto_reference_point_is_clamped_at_zero_and_positive_otherwise():
    # all mismatched log-ratios negative: z_ref = 0, the loss is apo-zero-like
    cases = [(-4.0, -5.0, -9.0, -7.0, 2, 1), (-6.0, -5.0, -9.0, -8.0, 2, 0)]
    inputs, _ = unpaired_inputs(cases)
    losses = get_objective("kto")(inputs, KTOParams(beta=1.0)).losses
    assert losses[0].item() == pytest.approx(1 - sigmoid(1.0))
    assert losses[1].item() == pytest.approx(1 - sigmoid(1.0))
    # a positive KL estimate raises the bar for desirable and lowers it for undesirable
    # z_ref = (8 + 9) / 2 = 8.5
    shifted = [(c[0], c[1], c[2] + 10.0, c[3], c[4], c[5]) for c in cases]
    inputs, _ = unpaired_inputs(shifted, dtype=torch.float64)
    losses = get_objective("kto")(inputs, KTOParams(beta=1.0)).losses
    assert losses[0].item() == pytest.approx(1 - sigmoid(1.0 - 8.5))
    assert losses[1].item() == pytest.approx(1 - sigmoid(8.5 + 1.0))


@pytest.mark.parametrize("params", KTO_PARAMS[:2])
@pytest.mark.parametrize("size", [1, 3])
def test_kto_gradient_and_detached_reference_point(params, size):
    cases = CASES[:size] if size == 1 else [CASES[0], CASES[5], CASES[6]]
    inputs, policy = unpaired_inputs(cases, dtype=torch.float64, requires_grad=True)
    get_objective("kto")(inputs, params).losses.sum().backward()
    z_ref = kto_reference_point(cases)
    for i, case in enumerate(cases):
        def loss_of(values, case=case):
            return kto_formula((values[0], *case[1:]), params, z_ref)

        expected = finite_difference(loss_of, [case[0]], 0)
        assert policy.grad[i, 0].item() == pytest.approx(expected, rel=1e-5, abs=1e-10)
    # z_ref is detached: no gradient flows into the mismatched completions
    assert policy.grad[:, 1].abs().max().item() == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kto_and_bco_finite_at_extremes(dtype):
    for name, slots in (("kto", 2), ("bco", 1)):
        spec = get_objective(name)
        inputs, policy = unpaired_inputs(EXTREMES + CASES, dtype, True, kl=slots == 2)
        output = spec(inputs, spec.params())
        assert_finite(output, EXTREMES + CASES, slots)
        output.losses.sum().backward()
        assert torch.isfinite(policy.grad).all()


def test_kto_needs_the_mismatched_slot_and_labels():
    inputs, _ = unpaired_inputs(CASES, kl=False)
    with pytest.raises(ValueError, match="mismatched completion"):
        get_objective("kto")(inputs, KTOParams())
    inputs, _ = unpaired_inputs(CASES)
    inputs.scores = {}
    with pytest.raises(ValueError, match="label"):
        get_objective("kto")(inputs, KTOParams())
    inputs.scores = {"label": torch.full((len(CASES),), 0.5)}
    with pytest.raises(ValueError, match="label values 0"):
        get_objective("kto")(inputs, KTOParams())
    with pytest.raises(ValidationError, match="both 0, so the loss is 0"):
        TypeAdapter(KTOParams).validate_python({"desirable_weight": 0, "undesirable_weight": 0})


def test_kto_is_declared_with_mismatched_completions():
    spec = get_objective("kto")
    assert spec.kl_completions and spec.data == "unpaired" and spec.needs_reference
    assert (spec.defaults() == {"beta": 0.1, "desirable_weight": 1.0, "undesirable_weight": 1.0})


# --- BCO ---------------------------------------------------------------------------------------

def bco_shift(cases, p):
    """delta = mean of the batch's implied rewards over both labels (held fixed: detached)."""
    return sum(p.beta * (c[0] - c[1]) for c in cases) / len(cases)


def bco_formula(case, p, delta):
    z = p.beta * (case[0] - case[1]) - delta
    return -log_sigmoid(z) if case[5] else -log_sigmoid(-z)


@pytest.mark.parametrize("params", [BCOParams(), BCOParams(0.1), BCOParams(1.0)])
@pytest.mark.parametrize("size", [1, 2, 5, 7])
def test_bco_matches_formula(params, size):
    cases = CASES[:size]
    inputs, _ = unpaired_inputs(cases, kl=False)
    output = get_objective("bco")(inputs, params)
    assert_finite(output, cases, 1)
    delta = bco_shift(cases, params)
    for i, case in enumerate(cases):
        assert output.losses[i].item() == pytest.approx(bco_formula(case, params, delta),
                                                        rel=1e-5, abs=1e-6), case


def test_bco_single_example_has_zero_shifted_reward():
    inputs, _ = unpaired_inputs(CASES[:1], kl=False)
    loss = get_objective("bco")(inputs, BCOParams(1.0)).losses[0].item()
    assert loss == pytest.approx(math.log(2))


@pytest.mark.parametrize("params", [BCOParams(), BCOParams(0.5)])
def test_bco_gradient(params):
    cases = [CASES[0], CASES[1], CASES[5], CASES[6]]
    inputs, policy = unpaired_inputs(cases, dtype=torch.float64, requires_grad=True, kl=False)
    get_objective("bco")(inputs, params).losses.sum().backward()
    delta = bco_shift(cases, params)
    for i, case in enumerate(cases):
        def loss_of(values, case=case):
            return bco_formula((values[0], *case[1:]), params, delta)

        expected = finite_difference(loss_of, [case[0]], 0)
        assert policy.grad[i, 0].item() == pytest.approx(expected, rel=1e-5, abs=1e-10)


def test_bco_uses_only_the_completion_slot():
    """Composed with kto (which adds the mismatched slot), bco still classifies slot 0 only."""
    cases = CASES[:5]
    with_slot, _ = unpaired_inputs(cases)
    without, _ = unpaired_inputs(cases, kl=False)
    a = get_objective("bco")(with_slot, BCOParams()).losses
    b = get_objective("bco")(without, BCOParams()).losses
    assert torch.allclose(a, b)
