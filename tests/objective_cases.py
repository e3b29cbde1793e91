"""Shared inputs and plain-Python checks for the objective tests.

The formulas themselves are written out again in each test from the papers; nothing here calls
preftune's objective helpers. This module only builds inputs and compares numbers.
"""

import math

import pytest
import torch

from preftune.model.forward import SequenceStats
from preftune.objectives import ObjectiveInputs, get_objective

# (policy chosen, policy rejected, reference chosen, reference rejected, len chosen, len rejected),
# summed log-probs.
CASES = [
    (-12.0, -15.0, -13.0, -14.0, 4, 6),
    (-5.0, -5.0, -5.0, -5.0, 1, 1),  # equal logps, length-1 responses
    (-1.0, -900.0, -400.0, -400.0, 3, 2),  # very large margin
    (-900.0, -1.0, -400.0, -400.0, 2, 3),  # very negative margin
    (-3.25, -3.2500001, -7.5, -7.5, 1, 1),  # tiny margin
    (-0.02, -40.0, -0.5, -35.0, 1, 7),  # chosen almost certain under the policy
]
GRADIENT_CASES = [CASES[0], CASES[5]]


def log_sigmoid(z: float) -> float:
    """log(1 / (1 + e^-z)), kept finite at both extremes."""
    return -math.log1p(math.exp(-z)) if z > -30 else z - math.log1p(math.exp(z))


def sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))


def pair_inputs(cases, dtype=torch.float32, requires_grad=False, reference=True, scores=None):
    policy = torch.tensor([[c[0], c[1]] for c in cases], dtype=dtype, requires_grad=requires_grad)
    counts = torch.tensor([[c[4], c[5]] for c in cases], dtype=dtype)
    ref = SequenceStats(torch.tensor([[c[2], c[3]] for c in cases], dtype=dtype), counts)
    scores = {k: torch.tensor(v, dtype=dtype) for k, v in (scores or {}).items()}
    return ObjectiveInputs(SequenceStats(policy, counts), ref if reference else None, scores), policy


def assert_finite(output):
    assert torch.isfinite(output.losses).all(), output.losses
    assert torch.isfinite(output.rewards).all(), output.rewards
    assert output.losses.shape == output.rewards.shape[:1] and output.rewards.shape[1] == 2


def assert_values(name, params, formula, cases=CASES, rel=1e-5, abs_=1e-6, **kwargs):
    """Losses on every case equal ``formula(case, params)``; losses and rewards stay finite."""
    inputs, _ = pair_inputs(cases, **kwargs)
    output = get_objective(name)(inputs, params)
    assert_finite(output)
    for i, case in enumerate(cases):
        assert output.losses[i].item() == pytest.approx(formula(case, params), rel=rel, abs=abs_), case
    return output


def finite_difference(f, values: list, index: int) -> float:
    """Central difference of the plain-Python f at values[index], in float64."""
    step = 1e-6 * max(1.0, abs(values[index]))
    plus, minus = list(values), list(values)
    plus[index] += step
    minus[index] -= step
    return (f(plus) - f(minus)) / (2 * step)


def assert_gradient(name, params, formula, case, **kwargs):
    """d loss / d policy logps from torch autograd (float64) equals a finite difference of formula."""
    inputs, policy = pair_inputs([case], dtype=torch.float64, requires_grad=True, **kwargs)
    get_objective(name)(inputs, params).losses.sum().backward()
    for slot in (0, 1):
        expected = finite_difference(lambda values: formula(tuple(values), params), list(case), slot)
        assert policy.grad[0, slot].item() == pytest.approx(expected, rel=1e-5, abs=1e-8), slot


def token_inputs(cases, dtype=torch.float64, requires_grad=False):
    """Per-token stats from cases of (policy_w, policy_l, ref_w, ref_l) token lists."""
    def stats(which, grad):
        width = max(len(c[j]) for c in cases for j in (0, 1, 2, 3))
        grid = torch.zeros(len(cases), 2, width, dtype=dtype)
        mask = torch.zeros(len(cases), 2, width, dtype=torch.bool)
        for i, case in enumerate(cases):
            for slot, j in enumerate(which):
                grid[i, slot, : len(case[j])] = torch.tensor(case[j], dtype=dtype)
                mask[i, slot, : len(case[j])] = True
        grid.requires_grad_(grad)
        return SequenceStats(grid.sum(-1), mask.sum(-1).to(dtype), grid, mask), grid

    policy, grid = stats((0, 1), requires_grad)
    reference, _ = stats((2, 3), False)
    return ObjectiveInputs(policy, reference), grid
