"""Drawing panels as PNG images with matplotlib's Agg renderer (no display needed).

Colours carry meaning across panels: chosen / desirable / best are green, rejected / undesirable
/ worst red, margins and accuracies blue. Reference log-probs are dashed in the colour of the
policy curve they correspond to, and eval points are diamonds in the colour of their train
curve, so a reader can compare without hunting through the legend.
"""

from __future__ import annotations

import io
import math
from itertools import cycle

from matplotlib import rc_context
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .panels import REFERENCE_PREFIX, Panel, Series

STYLE = {
    "font.family": "DejaVu Sans",  # ships with matplotlib: no system fonts needed
    "font.size": 10,
    "axes.titlesize": 12,
    "axes.titleweight": "bold",
    "axes.titlelocation": "left",
    "axes.labelcolor": "#333333",
    "axes.edgecolor": "#999999",
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.color": "#e6e6e6",
    "grid.linewidth": 0.8,
    "xtick.color": "#555555",
    "ytick.color": "#555555",
    "legend.frameon": False,
    "legend.fontsize": 9,
    "lines.linewidth": 1.8,
}
FIGURE_SIZE = (6.4, 3.6)  # inches: 960 x 540 pixels at DPI, readable in a two-column paper
DPI = 150
ROLE_COLOURS = {
    "chosen": "#2a9d58", "desirable": "#2a9d58", "best": "#2a9d58",
    "rejected": "#d1495b", "undesirable": "#d1495b", "worst": "#d1495b",
    "margins": "#3b6fb6", "accuracies": "#3b6fb6", "top1_accuracy": "#7b4fb0",
    "loss": "#222222",
}
OTHER_COLOURS = ["#3b6fb6", "#7b4fb0", "#1b9aaa", "#8c564b", "#c2549d", "#6b8e23", "#5f6b7a"]
ALARM_COLOUR = "#e07b00"  # used for nothing else, so an alarm line is never read as a curve
# Below this many points per curve, draw a marker on each so single steps stay visible.
MARKERS_BELOW = 40
# A legend with more entries than this goes beside the plot, where it cannot hide curves.
LEGEND_INSIDE_UP_TO = 4


def render_panel(panel: Panel, alarms: list[dict] | None = None) -> bytes:
    """``panel`` as PNG bytes; ``alarms`` (dicts with step and kind) become vertical lines."""
    with rc_context(STYLE):
        figure = Figure(figsize=FIGURE_SIZE, dpi=DPI, layout="constrained")
        FigureCanvasAgg(figure)
        axes = figure.add_subplot()
        colours = _colours(panel.series)
        train_keys = {curve.key for curve in panel.series if not curve.is_eval}
        for curve in panel.series:
            _draw_series(axes, curve, colours[_role(curve)], curve.base_key in train_keys)
        if any(curve.is_eval and curve.base_key in train_keys for curve in panel.series):
            axes.plot([], [], color="#555555", linestyle=":", marker="D", markersize=6,
                      label="eval (held-out)")
        if alarms:
            _draw_alarms(axes, alarms)
        axes.set_title(panel.title, pad=10)
        axes.set_xlabel("step")
        axes.set_ylabel(panel.ylabel)
        steps = {step for curve in panel.series for step in curve.steps}
        if len(steps) == 1:  # one point: the locator would tick fractions of a step around it
            axes.set_xticks(sorted(steps))
        else:
            axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.ticklabel_format(axis="y", style="sci", scilimits=(-3, 4), useOffset=False)
        _legend(axes)
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


def _legend(axes) -> None:
    """No legend for a single curve, inside for a few, beside the plot for many."""
    entries = len(axes.get_legend_handles_labels()[0])
    if entries > LEGEND_INSIDE_UP_TO:
        axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))
    elif entries > 1:
        axes.legend(loc="best")


def series_label(curve: Series) -> str:
    """A short legend label: the key's last part, with policy/reference and eval spelled out."""
    base = curve.base_key
    if base.startswith(REFERENCE_PREFIX):
        label = "reference " + base[len(REFERENCE_PREFIX):]
    elif base.startswith("logps/"):
        label = "policy " + base.partition("/")[2]
    elif base == "loss":
        label = "loss"
    elif base.startswith("loss/"):
        label = "part: " + base.partition("/")[2]
    else:
        label = base.partition("/")[2] or base
    return f"eval {label}" if curve.is_eval else label


def _role(curve: Series) -> str:
    """What a curve stands for, ignoring eval/ and ref_: equal roles share a colour."""
    leaf = curve.base_key.rpartition("/")[2]
    return leaf[len("ref_"):] if curve.base_key.startswith(REFERENCE_PREFIX) else leaf


def _colours(series: list[Series]) -> dict[str, str]:
    """A colour per role in the panel: the meaningful colour if it has one, else the next free."""
    roles = list(dict.fromkeys(_role(curve) for curve in series))
    taken = {ROLE_COLOURS[role] for role in roles if role in ROLE_COLOURS}
    spare = cycle([colour for colour in OTHER_COLOURS if colour not in taken] or OTHER_COLOURS)
    return {role: ROLE_COLOURS.get(role) or next(spare) for role in roles}


def _draw_series(axes, curve: Series, colour: str, has_train_twin: bool) -> None:
    """Train curves as lines, reference curves dashed; eval points as diamonds (hollow for
    the reference, so they stay visible when the policy's eval point sits on top).

    An eval curve with a train twin of the same colour is not listed in the legend on its own:
    one "eval (held-out)" entry stands for all of them, which keeps the legend short.
    """
    label = None if curve.is_eval and has_train_twin else series_label(curve)
    dashed = curve.base_key.startswith(REFERENCE_PREFIX)
    if curve.is_eval:
        axes.plot(curve.steps, curve.values, color=colour, label=label, linestyle=":",
                  marker="D", markersize=7 if dashed else 6, markeredgewidth=1.4 if dashed else 0.8,
                  markerfacecolor="white" if dashed else colour,
                  markeredgecolor=colour if dashed else "white", zorder=3)
        return
    few = len(curve.steps) < MARKERS_BELOW
    axes.plot(curve.steps, curve.values, color=colour, label=label,
              linestyle="--" if dashed else "-", alpha=0.75 if dashed else 1.0,
              marker="o" if few else None, markersize=3)
    broken = [step for step, value in zip(curve.steps, curve.values) if math.isnan(value)]
    if broken:  # a gap in the line would be easy to miss: a cross at the foot of each step
        axes.plot(broken, [0.03] * len(broken), linestyle="none", marker="x", color=colour,
                  markersize=7, transform=axes.get_xaxis_transform(), clip_on=False,
                  label=f"{series_label(curve)}: NaN/inf")


def _draw_alarms(axes, alarms: list[dict]) -> None:
    """A dotted vertical line with a marker on top per alarm; the first line of each kind is
    labelled with the kind, on a white backing so the curves behind it do not garble it."""
    labelled: set[str] = set()
    top = axes.get_xaxis_transform()  # x in data, y in axes fraction
    for alarm in alarms:
        axes.axvline(alarm["step"], color=ALARM_COLOUR, linestyle=(0, (2, 2)), linewidth=1.2,
                     label="alarm" if not labelled else None, zorder=1)
        axes.plot(alarm["step"], 1.0, marker="v", markersize=7, color=ALARM_COLOUR,
                  transform=top, clip_on=False, zorder=4)
        if alarm["kind"] not in labelled:
            labelled.add(alarm["kind"])
            axes.annotate(alarm["kind"], xy=(alarm["step"], 1.0), xycoords=top,
                          xytext=(4, -10), textcoords="offset points", rotation=90, va="top",
                          ha="left", fontsize=8, color=ALARM_COLOUR, zorder=5,
                          bbox={"boxstyle": "round,pad=0.2", "facecolor": "white",
                                "edgecolor": "none", "alpha": 0.85})
