"""Every reward loss against its formula written out independently in plain Python floats:
values, and the gradient (central finite differences of the plain formula vs autograd)."""

import math

import pytest
import torch

from preftune.reward.heads import Head, gpm_score, lower_cvar
from preftune.reward.losses import REWARD_LOSSES, RewardInputs, get_reward_loss


def log_sigmoid(z: float) -> float:
    return -math.log1p(math.exp(-z)) if z > 0 else z - math.log1p(math.exp(z))


def finite_difference(plain, values: list[float], eps: float = 1e-6) -> list[float]:
    grads = []
    for i in range(len(values)):
        up, down = list(values), list(values)
        up[i] += eps
        down[i] -= eps
        grads.append((plain(up) - plain(down)) / (2 * eps))
    return grads


def check(name: str, params: dict, outputs: list, plain, head: Head = Head(), scores=None):
    """Loss of one example from the registry == plain(flat outputs); gradients agree too."""
    spec = get_reward_loss(name)
    tensor = torch.tensor([outputs], dtype=torch.float64, requires_grad=True)  # [1, R, K]
    side = {k: torch.tensor([v], dtype=torch.float64) for k, v in (scores or {}).items()}
    loss = spec.fn(RewardInputs(tensor, head, side), spec.params(**params))
    flat = [x for response in outputs for x in response]
    assert loss.shape == (1,)
    assert loss.item() == pytest.approx(plain(flat), rel=1e-9, abs=1e-12)
    loss.sum().backward()
    expected = finite_difference(plain, flat)
    assert tensor.grad.flatten().tolist() == pytest.approx(expected, rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("smoothing,center", [(0.0, 0.0), (0.1, 0.0), (0.0, 0.01), (0.2, 0.05)])
def test_bt(smoothing, center):
    def plain(v):
        h = v[0] - v[1]
        return (-(1 - smoothing) * log_sigmoid(h) - smoothing * log_sigmoid(-h)
                + center * (v[0] + v[1]) ** 2)

    check("bt", {"label_smoothing": smoothing, "center_coefficient": center},
          [[0.7], [-0.4]], plain)
    check("bt", {"label_smoothing": smoothing, "center_coefficient": center},
          [[-1.3], [2.1]], plain)


def test_bt_margin_reads_the_margin_field():
    margin = 1.5

    def plain(v):
        return -log_sigmoid(v[0] - v[1] - margin)

    check("bt_margin", {"margin_field": "gap"}, [[0.9], [0.2]], plain, scores={"gap": margin})
    # a margin of 0 is plain BT
    spec = get_reward_loss("bt_margin")
    outputs = torch.tensor([[[0.9], [0.2]]])
    zero = spec.fn(RewardInputs(outputs, Head(), {"margin": torch.tensor([0.0])}), spec.params())
    bt = get_reward_loss("bt")
    assert zero.item() == pytest.approx(bt.fn(RewardInputs(outputs, Head(), {}), bt.params()).item())


def test_scaled_bt_weighs_by_magnitude():
    def plain(v):
        return -3.0 * log_sigmoid(v[0] - v[1]) + 0.01 * (v[0] + v[1]) ** 2

    check("scaled_bt", {"center_coefficient": 0.01}, [[0.3], [0.5]], plain,
          scores={"magnitude": 3.0})


def test_bt_on_an_attributes_head_uses_the_weighted_reward():
    head = Head(kind="attributes", attributes=("help", "safe"), weights=(0.75, 0.25))

    def plain(v):  # v = [help_w, safe_w, help_l, safe_l]
        return -log_sigmoid((0.75 * v[0] + 0.25 * v[1]) - (0.75 * v[2] + 0.25 * v[3]))

    check("bt", {}, [[1.0, -2.0], [0.5, 0.5]], plain, head=head)


def test_gpm_skew_symmetric_score():
    head = Head(kind="gpm", dims=4, tau=0.1)

    def plain(v):
        a, b = v[:4], v[4:]
        na, nb = math.sqrt(sum(x * x for x in a)), math.sqrt(sum(x * x for x in b))
        a, b = [x / na for x in a], [x / nb for x in b]
        s = (a[0] * b[1] - a[1] * b[0]) + (a[2] * b[3] - a[3] * b[2])
        return -log_sigmoid(s / 0.1)

    check("gpm", {}, [[0.3, -0.8, 1.1, 0.2], [-0.5, 0.4, 0.9, -1.2]], plain, head=head)


def test_gpm_score_is_antisymmetric_and_zero_on_itself():
    a, b = torch.randn(5, 6, dtype=torch.float64), torch.randn(5, 6, dtype=torch.float64)
    torch.testing.assert_close(gpm_score(a, b), -gpm_score(b, a))
    torch.testing.assert_close(gpm_score(a, a), torch.zeros(5, dtype=torch.float64))


def test_plackett_luce_orders_by_score_best_first():
    scores = [1.0, 3.0, 2.0]  # ranking: slot 1, slot 2, slot 0

    def plain(v):
        ranked = [v[1], v[2], v[0]]
        total = 0.0
        for k in range(len(ranked) - 1):
            tail = math.log(sum(math.exp(x) for x in ranked[k:]))
            total -= ranked[k] - tail
        return total

    spec = get_reward_loss("plackett_luce")
    outputs = torch.tensor([[[0.2], [-0.1], [0.7]]], dtype=torch.float64, requires_grad=True)
    side = {"response_scores": torch.tensor([scores], dtype=torch.float64)}
    loss = spec.fn(RewardInputs(outputs, Head(), side), spec.params())
    assert loss.item() == pytest.approx(plain([0.2, -0.1, 0.7]), rel=1e-12)
    loss.sum().backward()
    assert outputs.grad.flatten().tolist() == pytest.approx(
        finite_difference(plain, [0.2, -0.1, 0.7]), rel=1e-5)


def test_plackett_luce_of_two_responses_is_bt():
    outputs = torch.tensor([[[0.4], [1.9]]])
    side = {"response_scores": torch.tensor([[5.0, 2.0]])}  # slot 0 is better
    pl = get_reward_loss("plackett_luce")
    value = pl.fn(RewardInputs(outputs, Head(), side), pl.params()).item()
    assert value == pytest.approx(-log_sigmoid(0.4 - 1.9), rel=1e-6)


@pytest.mark.parametrize("label", [1.0, 0.0])
def test_binary(label):
    def plain(v):
        return -(label * log_sigmoid(v[0]) + (1 - label) * log_sigmoid(-v[0]))

    check("binary", {}, [[0.8]], plain, scores={"label": label})


def test_regression_on_rated_single_responses():
    head = Head(kind="attributes", attributes=("helpfulness", "verbosity"))

    def plain(v):
        return (v[0] - 3.0) ** 2 + (v[1] - 1.0) ** 2

    check("regression", {}, [[2.5, 1.5]], plain, head=head,
          scores={"helpfulness": 3.0, "verbosity": 1.0})


def test_regression_on_pairs_reads_chosen_and_rejected_ratings():
    def plain(v):  # scalar head, target "score": mean over the two responses
        return ((v[0] - 4.0) ** 2 + (v[1] - 1.0) ** 2) / 2

    check("regression", {}, [[3.0], [2.0]], plain,
          scores={"chosen_score": 4.0, "rejected_score": 1.0})


def test_regression_names_missing_ratings():
    spec = get_reward_loss("regression")
    with pytest.raises(ValueError, match="rejected_score"):
        spec.fn(RewardInputs(torch.zeros(1, 2, 1), Head(), {"chosen_score": torch.tensor([1.0])}),
                spec.params())


def test_quantile_pinball():
    levels = (0.1, 0.5, 0.9)
    head = Head(kind="quantile", quantiles=levels, target="helpfulness")

    def plain(v):
        total = 0.0
        for tau, q in zip(levels, v):
            u = 2.0 - q
            total += u * (tau - (1.0 if u < 0 else 0.0))
        return total

    check("quantile", {}, [[1.2, 2.4, 3.1]], plain, head=head, scores={"helpfulness": 2.0})


def test_quantile_head_reward_is_mean_or_lower_cvar():
    outputs = torch.tensor([[3.0, 1.0, 2.0, 4.0]])  # unsorted quantiles at the levels below
    levels = (0.125, 0.375, 0.625, 0.875)
    assert Head(kind="quantile", quantiles=levels).reward(outputs).item() == pytest.approx(2.5)
    # the quantile function as a step: 1 on [0, 0.25), 2 on [0.25, 0.5), 3, 4 (each level's
    # value from the midpoints with its neighbours); CVaR_a = (1/a) int_0^a q(u) du
    cvar = Head(kind="quantile", quantiles=levels, risk="cvar:0.4").reward(outputs)
    assert cvar.item() == pytest.approx((1 * 0.25 + 2 * 0.15) / 0.4)
    assert lower_cvar(outputs, levels, 0.25).item() == pytest.approx(1.0)
    assert lower_cvar(outputs, levels, 0.01).item() == pytest.approx(1.0)
    assert lower_cvar(outputs, levels, 1.0).item() == pytest.approx(2.5)  # the whole mean
    # the default levels 0.05 ... 0.95 and N(0, 1) quantiles: cvar:0.25 weighs the 0.25
    # level by the half of its cell below 0.25 (it was the plain mean of three levels)
    normal = torch.distributions.Normal(0.0, 1.0)
    default = tuple(round(0.05 + 0.1 * k, 2) for k in range(10))
    values = normal.icdf(torch.tensor(default))[None]
    expected = (values[0, 0] * 0.1 + values[0, 1] * 0.1 + values[0, 2] * 0.05) / 0.25
    assert lower_cvar(values, default, 0.25).item() == pytest.approx(expected.item())


def test_every_registered_loss_is_covered_here():
    covered = {"bt", "bt_margin", "scaled_bt", "gpm", "plackett_luce", "binary", "regression",
               "quantile"}
    assert set(REWARD_LOSSES) == covered
