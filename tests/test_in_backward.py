"""AdamWInBackward on its own: the update of each weight during backward equals AdamW's."""

import math

import pytest
import torch

from preftune.train.in_backward import AdamWInBackward


def test_updates_match_adamw_and_skip_non_finite_gradients():
    torch.manual_seed(0)
    a, b = torch.randn(3, requires_grad=True), torch.randn(4, requires_grad=True)
    twin_a, twin_b = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    fused = AdamWInBackward([a, b], lr=0.1, weight_decay=0.01)
    plain = torch.optim.AdamW([twin_a, twin_b], lr=0.1, weight_decay=0.01)
    for _ in range(3):
        ((a ** 2).sum() + (b ** 3).sum()).backward()
        assert a.grad is None and b.grad is None  # applied and freed inside backward
        ((twin_a ** 2).sum() + (twin_b ** 3).sum()).backward()
        norm = torch.linalg.vector_norm(torch.cat([twin_a.grad, twin_b.grad]))
        assert float(fused.grad_norm()) == pytest.approx(float(norm), rel=1e-6)
        plain.step()
        plain.zero_grad()
        fused.zero_grad()
    torch.testing.assert_close(a, twin_a)
    torch.testing.assert_close(b, twin_b)

    before = a.detach().clone()
    (a.sum() * float("nan") + b.sum()).backward()
    assert torch.equal(a.detach(), before)  # a NaN gradient is never applied
    assert not math.isfinite(float(fused.grad_norm()))
