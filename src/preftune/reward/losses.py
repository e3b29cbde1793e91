"""Reward-model losses: each a small pure function over head outputs, registered with the data
shapes and heads it works with.

A loss sees ``RewardInputs``: the raw head outputs of every response, [E, R, K] in fp32 (R = 2
for pairs, slot 0 chosen and slot 1 rejected; R = K_list for ranked lists; R = 1 for unpaired
and rated records), the ``Head`` that says what they mean, and the batch's numeric side data.
It returns per-example losses [E]. Accuracy, margins and rewards are computed by the trainer
from the head, not by each loss.

Notation: r_w, r_l are the rewards of the chosen and rejected response; h = r_w - r_l;
sigma is the logistic function.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from ..objectives.common import FlipRate, NonNegative
from .heads import Head

PAPERS = {
    "bt": "Ouyang et al. 2022 (InstructGPT RM); Bradley & Terry 1952",
    "llama2": "arXiv:2307.09288",
    "helpsteer2_pref": "arXiv:2410.01257",
    "helpsteer2": "arXiv:2406.08673",
    "qrm": "arXiv:2409.10164",
    "gpm": "arXiv:2410.02197",
    "plackett_luce": "Plackett 1975; Luce 1959 (listwise RM, e.g. arXiv:2306.17492 PRO)",
}


@dataclass
class RewardInputs:
    outputs: torch.Tensor  # [E, R, K] raw head outputs, fp32
    head: Head
    scores: dict  # numeric side data: name -> [E] (or [E, K] for lists)


@dataclass(frozen=True)
class RewardLossSpec:
    name: str
    fn: Callable[[RewardInputs, object], torch.Tensor]
    params: type
    data: tuple  # data shapes it trains on
    heads: tuple  # head kinds it fits
    paper: str
    # (params, head) -> (numeric fields every record needs, ratings every response needs)
    fields: Callable | None = None
    # params -> the per-example fields among them that must not be negative
    nonnegative: Callable | None = None

    @property
    def summary(self) -> str:
        return (self.fn.__doc__ or "").strip().splitlines()[0]

    def defaults(self) -> dict:
        return dataclasses.asdict(self.params())

    def record_fields(self, params, head: Head, slots: int) -> list[str]:
        """The numeric fields each record must carry: per-example fields, and each rating as
        ``name`` (one response) or ``chosen_name``/``rejected_name`` (pairs)."""
        if self.fields is None:
            return []
        per_example, ratings = self.fields(params, head)
        prefixes = [""] if slots == 1 else ["chosen_", "rejected_"]
        return [*per_example, *(p + name for name in ratings for p in prefixes)]


REWARD_LOSSES: dict[str, RewardLossSpec] = {}


def reward_loss(name: str, *, params: type, data: tuple, heads: tuple, paper: str,
                fields: Callable | None = None, nonnegative: Callable | None = None):
    """Register ``fn(inputs, params) -> losses [E]`` as reward loss ``name``. ``fields(params,
    head)`` names the numeric data it reads: (per-example fields, per-response ratings), and
    ``nonnegative(params)`` those of its per-example fields that must not be negative, so bad
    records are found, and named, before training starts."""

    def register(fn):
        if name in REWARD_LOSSES:
            raise ValueError(f"reward loss {name!r} is registered twice")
        REWARD_LOSSES[name] = RewardLossSpec(name, fn, params, data, heads, paper, fields,
                                             nonnegative)
        return fn

    return register


def get_reward_loss(name: str) -> RewardLossSpec:
    if name not in REWARD_LOSSES:
        import difflib

        close = difflib.get_close_matches(name, REWARD_LOSSES, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise KeyError(f"unknown reward loss {name!r}.{hint} Known: "
                       f"{', '.join(sorted(REWARD_LOSSES))}.")
    return REWARD_LOSSES[name]


# ---------------------------------------------------------------------------------------------
# helpers


def pair_rewards(inputs: RewardInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """(r_w, r_l), each [E], from the chosen and rejected slots."""
    rewards = inputs.head.reward(inputs.outputs)
    return rewards[:, 0], rewards[:, 1]


def side_column(inputs: RewardInputs, field: str, loss: str, setting: str) -> torch.Tensor:
    """A per-example numeric field of the data, or an error that names it and the setting."""
    if field not in inputs.scores:
        have = ", ".join(sorted(inputs.scores)) or "none"
        raise ValueError(f"reward loss {loss!r} reads the numeric field {field!r} of every record, "
                         f"which the data lacks (numeric fields present: {have}). Add it, or name "
                         f"another column with loss.{setting}.")
    return inputs.scores[field].to(inputs.outputs)


def slot_targets(inputs: RewardInputs, names: tuple, loss: str) -> torch.Tensor:
    """Ratings per response slot and name, [E, R, len(names)].

    One-response records (rated) read ``name``; pairs read ``chosen_<name>`` and
    ``rejected_<name>`` (HelpSteer2-style ratings of both responses).
    """
    slots = inputs.outputs.shape[1]
    if slots == 1:
        keys = [[name] for name in names]
    elif slots == 2:
        keys = [[f"chosen_{name}", f"rejected_{name}"] for name in names]
    else:
        raise ValueError(f"reward loss {loss!r} fits ratings of single responses or pairs, not "
                         f"lists of {slots}.")
    missing = [key for group in keys for key in group if key not in inputs.scores]
    if missing:
        have = ", ".join(sorted(inputs.scores)) or "none"
        raise ValueError(f"reward loss {loss!r} needs the numeric rating fields "
                         f"{', '.join(missing)} on every record (present: {have}).")
    columns = [torch.stack([inputs.scores[k] for k in group], dim=1) for group in keys]
    return torch.stack(columns, dim=-1).to(inputs.outputs)


def _smoothed_bt(logit: torch.Tensor, smoothing: float) -> torch.Tensor:
    """-(1 - eps) log sigma(z) - eps log sigma(-z): BT with labels flipped with probability eps."""
    return -(1 - smoothing) * F.logsigmoid(logit) - smoothing * F.logsigmoid(-logit)


def _centering(chosen: torch.Tensor, rejected: torch.Tensor, coefficient: float) -> torch.Tensor:
    """eta (r_w + r_l)^2: keeps rewards centred on zero (their scale is otherwise free)."""
    return coefficient * (chosen + rejected) ** 2


# ---------------------------------------------------------------------------------------------
# pairwise Bradley-Terry family


@dataclass
class BTParams:
    label_smoothing: FlipRate = 0.0  # eps: probability that a label is flipped
    # eta of the centering penalty eta (r_w + r_l)^2 (0.01 common)
    center_coefficient: NonNegative = 0.0


@reward_loss("bt", params=BTParams, data=("pairs",), heads=("scalar", "attributes"),
             paper=PAPERS["bt"])
def bt(inputs: RewardInputs, params: BTParams) -> torch.Tensor:
    """Bradley-Terry: P(y_w > y_l) = sigma(r_w - r_l).

    loss = -(1 - eps) log sigma(h) - eps log sigma(-h) + eta (r_w + r_l)^2, h = r_w - r_l.
    """
    chosen, rejected = pair_rewards(inputs)
    return (_smoothed_bt(chosen - rejected, params.label_smoothing)
            + _centering(chosen, rejected, params.center_coefficient))


@dataclass
class MarginBTParams(BTParams):
    margin_field: str = "margin"  # numeric field holding each pair's margin m


@reward_loss("bt_margin", params=MarginBTParams, data=("pairs",), heads=("scalar", "attributes"),
             paper=PAPERS["llama2"], fields=lambda params, head: ((params.margin_field,), ()))
def bt_margin(inputs: RewardInputs, params: MarginBTParams) -> torch.Tensor:
    """Bradley-Terry with a per-pair margin (Llama 2): the reward gap must exceed m.

    loss = -(1 - eps) log sigma(h - m) - eps log sigma(m - h) + eta (r_w + r_l)^2.
    """
    chosen, rejected = pair_rewards(inputs)
    margin = side_column(inputs, params.margin_field, "bt_margin", "margin_field")
    return (_smoothed_bt(chosen - rejected - margin, params.label_smoothing)
            + _centering(chosen, rejected, params.center_coefficient))


@dataclass
class ScaledBTParams(BTParams):
    magnitude_field: str = "magnitude"  # numeric field: preference strength m (e.g. 1, 2, 3)


@reward_loss("scaled_bt", params=ScaledBTParams, data=("pairs",),
             heads=("scalar", "attributes"), paper=PAPERS["helpsteer2_pref"],
             fields=lambda params, head: ((params.magnitude_field,), ()),
             nonnegative=lambda params: (params.magnitude_field,))
def scaled_bt(inputs: RewardInputs, params: ScaledBTParams) -> torch.Tensor:
    """Scaled Bradley-Terry (HelpSteer2-Preference): stronger preferences weigh more.

    loss = m * [-(1 - eps) log sigma(h) - eps log sigma(-h)] + eta (r_w + r_l)^2, the
    strength m not negative (1 slightly, 2 better, 3 much better; a negative m would reward
    the rejected response: refused by record before training).
    """
    chosen, rejected = pair_rewards(inputs)
    magnitude = side_column(inputs, params.magnitude_field, "scaled_bt", "magnitude_field")
    return (magnitude * _smoothed_bt(chosen - rejected, params.label_smoothing)
            + _centering(chosen, rejected, params.center_coefficient))


@dataclass
class GPMParams:
    pass


@reward_loss("gpm", params=GPMParams, data=("pairs",), heads=("gpm",), paper=PAPERS["gpm"])
def gpm(inputs: RewardInputs, params: GPMParams) -> torch.Tensor:
    """General preference model: a skew-symmetric score between preference embeddings.

    loss = -log sigma(s(y_w > y_l) / tau), s = <R v_w, v_l>, v = normalize(W h) (see heads.py).
    """
    return -F.logsigmoid(inputs.head.preference_logit(inputs.outputs[:, 0], inputs.outputs[:, 1]))


# ---------------------------------------------------------------------------------------------
# lists and labels


@dataclass
class PlackettLuceParams:
    pass


@reward_loss("plackett_luce", params=PlackettLuceParams, data=("ranked",),
             heads=("scalar", "attributes"), paper=PAPERS["plackett_luce"])
def plackett_luce(inputs: RewardInputs, params: PlackettLuceParams) -> torch.Tensor:
    """Listwise Plackett-Luce: the list's ranking is drawn best-first with softmax(r).

    With responses sorted by score, best first, y_(1) .. y_(K):
    loss = -sum_{k=1}^{K-1} [r_(k) - log sum_{j>=k} exp r_(j)]. Equal scores keep list order.
    """
    rewards = inputs.head.reward(inputs.outputs)  # [E, K]
    scores = inputs.scores["response_scores"].to(rewards)
    order = scores.argsort(dim=1, descending=True, stable=True)
    ranked = rewards.gather(1, order)
    # log sum_{j >= k} exp r_(j): a reversed cumulative logsumexp
    tails = ranked.flip(1).logcumsumexp(1).flip(1)
    return -(ranked - tails)[:, :-1].sum(1)


@dataclass
class BinaryParams:
    pass


@reward_loss("binary", params=BinaryParams, data=("unpaired",), heads=("scalar",),
             paper=PAPERS["bt"])
def binary(inputs: RewardInputs, params: BinaryParams) -> torch.Tensor:
    """Thumbs-up/down as binary targets: P(desirable) = sigma(r).

    loss = -[l log sigma(r) + (1 - l) log sigma(-r)], l = 1 for desirable, 0 otherwise.
    """
    reward = inputs.head.reward(inputs.outputs)[:, 0]
    label = inputs.scores["label"].to(reward)
    return -(label * F.logsigmoid(reward) + (1 - label) * F.logsigmoid(-reward))


# ---------------------------------------------------------------------------------------------
# ratings


@dataclass
class RegressionParams:
    target: str = "score"  # scalar head: the rating it fits (an attributes head fits its own)


def _rated_names(params: RegressionParams, head: Head) -> tuple:
    return tuple(head.attributes) if head.kind == "attributes" else (params.target,)


@reward_loss("regression", params=RegressionParams, data=("rated", "pairs"),
             heads=("scalar", "attributes"), paper=PAPERS["helpsteer2"],
             fields=lambda params, head: ((), _rated_names(params, head)))
def regression(inputs: RewardInputs, params: RegressionParams) -> torch.Tensor:
    """Regression on ratings (HelpSteer2 multi-attribute RM): squared error per attribute.

    loss = mean over the example's responses of sum_a (r_a(x, y) - label_a)^2.
    """
    targets = slot_targets(inputs, _rated_names(params, inputs.head), "regression")
    return ((inputs.outputs - targets) ** 2).sum(-1).mean(-1)


@dataclass
class QuantileParams:
    pass


@reward_loss("quantile", params=QuantileParams, data=("rated", "pairs"), heads=("quantile",),
             paper=PAPERS["qrm"], fields=lambda params, head: ((), (head.target,)))
def quantile(inputs: RewardInputs, params: QuantileParams) -> torch.Tensor:
    """Quantile regression (QRM): the head's outputs are quantiles of the rating's distribution.

    loss = mean over the example's responses of sum_tau rho_tau(s - q_tau(x, y)),
    rho_tau(u) = u (tau - 1[u < 0]) (the pinball loss); s is the rating ``head.target``.
    """
    target = slot_targets(inputs, (inputs.head.target,), "quantile")  # [E, R, 1]
    levels = inputs.outputs.new_tensor(inputs.head.quantiles)
    error = target - inputs.outputs
    return (error * (levels - (error < 0).to(error))).sum(-1).mean(-1)
