"""Every registered objective: full declaration, default params, finite values and gradients."""

import dataclasses

import pytest
import torch
from objective_cases import CASES
from pydantic import TypeAdapter

from preftune.model.forward import SequenceStats
from preftune.objectives import REGISTRY, ObjectiveInputs, get_objective

# CASES plus log-ratios of +-10000 nats on long responses
EXTREME_CASES = CASES + [(-20000.0, -0.5, -10000.0, -10000.0, 50, 1),
                         (-0.5, -20000.0, -10000.0, -10000.0, 1, 50)]
SCORES = {"chosen_score": [4.0, 2.0, 9.0, 1.5, 3.0, 7.0, 2.0, 5.0],
          "rejected_score": [1.0, 1.0, 0.5, 1.0, 2.5, 6.0, 1.0, 4.0],
          "chosen_win_prob": [0.9, 0.5, 1.0, 0.6, 0.7, 0.99, 0.55, 0.8],
          "rejected_win_prob": [0.1, 0.5, 0.0, 0.4, 0.3, 0.01, 0.45, 0.2],
          "group": [0.0, 1.0, 0.0, 2.0, 1.0, 0.0, 2.0, 1.0],
          "tie": [0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 1.0]}
NEEDS_GOLD = {"triple_po", "selm"}  # three responses; checked at extremes in their own test files


def split_evenly(total: float, count: int) -> list[float]:
    return [total / count] * count


def stats_from(cases, columns, dtype, requires_grad):
    """[E, 2] sequence stats, with per-token grids whose tokens share each response's log-prob."""
    width = max(max(c[4], c[5]) for c in cases)
    grid = torch.zeros(len(cases), 2, width, dtype=dtype)
    mask = torch.zeros(len(cases), 2, width, dtype=torch.bool)
    for i, case in enumerate(cases):
        for slot, (value_index, length_index) in enumerate(columns):
            grid[i, slot, : case[length_index]] = torch.tensor(
                split_evenly(case[value_index], case[length_index]), dtype=dtype)
            mask[i, slot, : case[length_index]] = True
    grid.requires_grad_(requires_grad)
    return SequenceStats(grid.sum(-1), mask.sum(-1).to(dtype), grid, mask), grid


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_objective_is_declared_completely(name):
    spec = get_objective(name)
    assert spec.summary and not spec.summary.endswith(":"), "docstring's first line says what it is"
    assert spec.paper
    assert dataclasses.is_dataclass(spec.params)
    assert TypeAdapter(spec.params).validate_python({}) == spec.params()
    assert spec.defaults() == dataclasses.asdict(spec.params())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", sorted(n for n, s in REGISTRY.items()
                                        if s.data == "pairs" and n not in NEEDS_GOLD))
def test_default_objective_is_finite_at_extremes(name, dtype):
    """Pair objectives here; unpaired and ranked ones are checked at extremes in their own files."""
    spec = get_objective(name)
    policy, grid = stats_from(EXTREME_CASES, ((0, 4), (1, 5)), dtype, requires_grad=True)
    reference, _ = stats_from(EXTREME_CASES, ((2, 4), (3, 5)), dtype, requires_grad=False)
    scores = {k: torch.tensor(v, dtype=dtype) for k, v in SCORES.items()}
    # per-token KLs that follow the policy (large at the extremes) and a reference mask
    policy.token_kl = torch.where(policy.token_mask, grid.abs() * 0.01, torch.zeros_like(grid))
    policy.kl = policy.token_kl.sum(-1)
    reference.token_activation = torch.full_like(grid, 0.5).detach()
    # log sum_v pi(v)^2 lies between 2 log pi(y_t) and 0: log pi(y_t) itself (WPO's alignment)
    policy.token_log_sum_sq_probs = torch.where(policy.token_mask, grid.detach(),
                                                torch.zeros_like(grid))
    inputs = ObjectiveInputs(policy, reference, scores, step=3, extra_references=[reference])
    output = spec(inputs, spec.params())
    n = len(EXTREME_CASES)
    assert output.losses.shape == (n,) and output.rewards.shape == (n, 2)
    assert torch.isfinite(output.losses).all(), output.losses
    assert torch.isfinite(output.rewards).all(), output.rewards
    output.losses.sum().backward()
    assert torch.isfinite(grid.grad).all()
