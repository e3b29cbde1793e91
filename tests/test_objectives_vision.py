"""mDPO (arXiv:2406.11839) against its formula written out in plain Python."""

import math

import torch

from preftune.model.forward import SequenceStats
from preftune.objectives import ObjectiveInputs, get_objective
from objective_cases import log_sigmoid

# (policy y_w|m, y_l|m, y_w|m', reference y_w|m, y_l|m, y_w|m'), summed log-probs
CASES = [
    (-12.0, -15.0, -14.0, -13.0, -14.0, -13.5),
    (-5.0, -5.0, -5.0, -5.0, -5.0, -5.0),
    (-2.0, -30.0, -2.5, -9.0, -9.0, -3.0),  # chosen far above the reference
    (-40.0, -3.0, -1.0, -20.0, -20.0, -20.0),  # everything wrong
]


def inputs(requires_grad=False):
    policy = torch.tensor([c[:3] for c in CASES], requires_grad=requires_grad)
    counts = torch.ones(len(CASES), 3)
    reference = SequenceStats(torch.tensor([c[3:] for c in CASES]), counts)
    return ObjectiveInputs(SequenceStats(policy, counts), reference), policy


def expected_loss(case, beta, anchor):
    rho_w, rho_l, rho_w_neg = (case[0] - case[3], case[1] - case[4], case[2] - case[5])
    return (-log_sigmoid(beta * (rho_w - rho_l)) - log_sigmoid(beta * (rho_w - rho_w_neg))
            - log_sigmoid(beta * rho_w - anchor))


def test_mdpo_values_and_rewards():
    spec = get_objective("mdpo")
    assert spec.image_negatives and spec.needs_reference and spec.paper == "arXiv:2406.11839"
    for beta, anchor in ((0.1, 0.0), (0.5, 0.3)):
        batch, _ = inputs()
        out = spec(batch, spec.params(beta=beta, anchor=anchor))
        want = torch.tensor([expected_loss(c, beta, anchor) for c in CASES])
        torch.testing.assert_close(out.losses, want)
        rewards = torch.tensor([[beta * (c[i] - c[i + 3]) for i in range(3)] for c in CASES])
        torch.testing.assert_close(out.rewards, rewards)


def test_mdpo_gradient():
    """d loss / d log pi(y_w|m) = -beta [s(-beta h1) + s(-beta h2) + s(-(beta rho_w - delta))],
    d / d log pi(y_l|m) = beta s(-beta h1), d / d log pi(y_w|m') = beta s(-beta h2)."""
    beta = 0.1
    batch, policy = inputs(requires_grad=True)
    spec = get_objective("mdpo")
    spec(batch, spec.params(beta=beta)).losses.sum().backward()

    def s(z):
        return 1 / (1 + math.exp(-z))

    for row, c in enumerate(CASES):
        rho_w, rho_l, rho_n = c[0] - c[3], c[1] - c[4], c[2] - c[5]
        h1, h2 = rho_w - rho_l, rho_w - rho_n
        want = [-beta * (s(-beta * h1) + s(-beta * h2) + s(-beta * rho_w)),
                beta * s(-beta * h1), beta * s(-beta * h2)]
        torch.testing.assert_close(policy.grad[row], torch.tensor(want))
