"""Which metrics go on which plot.

The metric keys are an open set (objectives, data shapes and composite objectives all add their
own), so panels are derived from the names rather than listed: ``rewards/*`` share a panel,
accuracies get their own, ``logps/ref_*`` sit next to the policy log-probs they correspond to,
``loss/<part>`` joins ``loss``, any other ``group/name`` keys share a panel per ``group``, and
``eval/<key>`` is drawn on the panel of ``<key>``, so an eval curve overlays its train
counterpart.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

EVAL_PREFIX = "eval/"
REFERENCE_PREFIX = "logps/ref_"
# Keys of every record that are bookkeeping, not curves.
NOT_PLOTTED = {"step"}

# Known panels in display order, with a title and a y-axis label; others follow alphabetically.
KNOWN_PANELS = {
    "loss": ("Loss", "loss"),
    "rewards": ("Implied rewards", "reward"),
    "accuracy": ("Reward accuracy", "fraction"),
    "logps": ("Log-probabilities: policy vs reference", "sequence log-prob (nats)"),
    "lr": ("Learning rate", "lr"),
    "grad_norm": ("Gradient norm (before clipping)", "L2 norm"),
    "tokens_per_second": ("Throughput", "tokens / s"),
    "padding_fraction": ("Padding fraction", "fraction of slots"),
    "step_seconds": ("Step time", "seconds"),
    "answer_score": ("Greedy answers to held-out prompts: mean score", "score"),
    "answer_tokens": ("Greedy answers to held-out prompts: mean length", "tokens"),
    "answers_ended": ("Greedy answers that ended (EOS)", "fraction"),
    "answers_empty": ("Greedy answers that are empty", "fraction"),
    "displacement": ("Held-out log-probs against the reference", "change (nats)"),
    "ranking": ("Held-out ranking accuracy, and pairs whose chosen fell", "fraction"),
}


@dataclass
class Series:
    """One curve: a metric key with its (step, value) points."""

    key: str
    steps: list[int] = field(default_factory=list)
    values: list[float] = field(default_factory=list)

    @property
    def is_eval(self) -> bool:
        return self.key.startswith(EVAL_PREFIX)

    @property
    def base_key(self) -> str:
        """The key without ``eval/``: the train metric this curve is compared with."""
        return self.key[len(EVAL_PREFIX):] if self.is_eval else self.key


@dataclass
class Panel:
    """One plot: a name (also its PNG file stem), a title, a y label and its curves."""

    name: str
    title: str
    ylabel: str
    series: list[Series]


def panel_name(key: str) -> str:
    """The panel a metric key is drawn on (eval keys share their train key's panel)."""
    base = key[len(EVAL_PREFIX):] if key.startswith(EVAL_PREFIX) else key
    group, _, leaf = base.partition("/")
    if group == "rewards" and ("accurac" in leaf):
        return "accuracy"
    if group in ("loss", "rewards", "logps"):
        return group
    if group == "diag":  # nats and fractions on separate axes
        return "ranking" if leaf.startswith("ranking/") or leaf.endswith("_fell") \
            else "displacement" if leaf.startswith("displacement/") else group
    return re.sub(r"[^A-Za-z0-9_.-]", "_", group)


def numeric_series(metrics: list[dict]) -> dict[str, Series]:
    """Every numeric key of ``metrics`` as a series, in first-seen key order.

    Non-finite values (a NaN loss is a real event) become NaN, which the plots show as a gap.
    """
    series: dict[str, Series] = {}
    for record in metrics:
        for key, value in record.items():
            if key in NOT_PLOTTED or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            curve = series.setdefault(key, Series(key))
            curve.steps.append(record["step"])
            curve.values.append(float(value) if math.isfinite(value) else math.nan)
    return series


def build_panels(metrics: list[dict]) -> list[Panel]:
    """The panels for a run's metrics: known ones first in a fixed order, then the rest.

    A key that is never finite has nothing to draw and gets no curve, nor does a padding
    fraction that is 0 throughout (images, packed rows: there is no padding to watch). The
    loss always has its panel: the alarms are drawn there, and its NaN steps are marked.
    """
    grouped: dict[str, list[Series]] = {}
    for curve in numeric_series(metrics).values():
        if curve.key != "loss" and all(math.isnan(value) for value in curve.values):
            continue
        if curve.key == "padding_fraction" and all(value == 0 for value in curve.values):
            continue
        grouped.setdefault(panel_name(curve.key), []).append(curve)
    order = [name for name in KNOWN_PANELS if name in grouped]
    order += sorted(name for name in grouped if name not in KNOWN_PANELS)
    panels = []
    for name in order:
        title, ylabel = KNOWN_PANELS.get(name, (name.replace("_", " "), name))
        panels.append(Panel(name, title, ylabel, _train_first(grouped[name])))
    return panels


def _train_first(series: list[Series]) -> list[Series]:
    """Train curves before eval ones so the legend reads train, then eval."""
    return [s for s in series if not s.is_eval] + [s for s in series if s.is_eval]
