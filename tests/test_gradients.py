"""A step's gradient norm is computed in float32 and clips by it: float16 gradients whose norm
is past float16's range (65504) are finite, and the step they make is not skipped."""

import torch

from preftune.train.gradients import clipped_norm


def float16_weights(value: float) -> list[torch.nn.Parameter]:
    weights = [torch.nn.Parameter(torch.zeros(2, dtype=torch.float16)) for _ in range(2)]
    for weight in weights:
        weight.grad = torch.full((2,), value, dtype=torch.float16)
    return weights


def test_a_float16_norm_past_float16s_range_is_finite_and_clips():
    weights = float16_weights(40000.0)  # norm sqrt(4 x 40000^2) = 80000
    assert torch.isinf(torch.nn.utils.get_total_norm([w.grad for w in weights]))  # (torch's)
    norm = clipped_norm(weights, max_norm=1.0)
    assert norm.dtype == torch.float32 and norm.item() == 80000.0
    for weight in weights:  # each 40000 x (1 / 80000)
        torch.testing.assert_close(weight.grad, torch.full((2,), 0.5, dtype=torch.float16),
                                   rtol=1e-3, atol=0)


def test_the_norm_equals_torchs_where_torchs_is_finite_and_no_limit_leaves_gradients_alone():
    weights = [torch.nn.Parameter(torch.zeros(3)) for _ in range(3)]
    for k, weight in enumerate(weights):
        weight.grad = torch.arange(3.0) * (k + 1)
    expected = torch.nn.utils.get_total_norm([w.grad for w in weights])
    before = [w.grad.clone() for w in weights]
    assert clipped_norm(weights, max_norm=None).item() == expected.item()
    assert all(torch.equal(w.grad, b) for w, b in zip(weights, before))
    assert clipped_norm([torch.nn.Parameter(torch.zeros(1))], 1.0).item() == 0.0  # no grads
