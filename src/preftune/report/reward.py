"""Figures of a reward model's evaluation (``rm_eval.json`` from ``preftune rm eval``):
a reliability diagram, the reward distribution of chosen and rejected responses, and
accuracy per category and length bucket. Same style and size as the training panels."""

from __future__ import annotations

import io
from pathlib import Path

from matplotlib import rc_context
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .plots import DPI, FIGURE_SIZE, ROLE_COLOURS, STYLE

BLUE = ROLE_COLOURS["margins"]


def _canvas():
    figure = Figure(figsize=FIGURE_SIZE, dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure, figure.add_subplot()


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


def reliability_png(results: dict) -> bytes:
    """Accuracy against mean confidence per bin; the diagonal is perfect calibration."""
    with rc_context(STYLE):
        figure, axes = _canvas()
        filled = [row for row in results["reliability"] if row["pairs"]]
        widths = [row["high"] - row["low"] for row in filled]
        axes.bar([row["low"] for row in filled], [row["accuracy"] for row in filled], widths,
                 align="edge", color=BLUE, alpha=0.8, edgecolor="white", label="accuracy")
        axes.plot([row["confidence"] for row in filled], [row["accuracy"] for row in filled],
                  "o", color="#222222", markersize=4, label="mean confidence of the bin")
        axes.plot([0.5, 1.0], [0.5, 1.0], "--", color="#999999", label="perfect calibration")
        for row in filled:
            axes.annotate(str(row["pairs"]), (row["low"] + (row["high"] - row["low"]) / 2, 0.02),
                          ha="center", fontsize=7, color="white")
        axes.set_xlim(0.5, 1.0)
        axes.set_ylim(0.0, 1.02)
        axes.set_title(f"Reliability (ECE {results['calibration/ece']:.3f})", pad=10)
        axes.set_xlabel("confidence max(p, 1 - p) of P(chosen > rejected)")
        axes.set_ylabel("accuracy")
        axes.legend(loc="upper left")
        return _png(figure)


def histogram_png(results: dict) -> bytes:
    """Histogram of the rewards of chosen and of rejected responses."""
    histogram = results["histogram"]
    edges = histogram["edges"]
    with rc_context(STYLE):
        figure, axes = _canvas()
        for name in ("chosen", "rejected"):
            axes.stairs(histogram[name], edges, fill=True, alpha=0.45, color=ROLE_COLOURS[name],
                        label=f"{name} (mean {results[f'rewards/{name}_mean']:.2f})")
        axes.set_title("Reward distribution", pad=10)
        axes.set_xlabel("reward")
        axes.set_ylabel("responses")
        axes.legend(loc="best")
        return _png(figure)


def groups_png(results: dict) -> bytes:
    """Accuracy per category and per length bucket, one bar each, with pair counts."""
    labels, values, counts = [], [], []
    for kind, table in results["accuracy_by"].items():
        for key, row in table.items():
            labels.append(f"{kind}: {key}")
            values.append(row["accuracy"])
            counts.append(row["pairs"])
    with rc_context(STYLE):
        figure = Figure(figsize=(FIGURE_SIZE[0], max(FIGURE_SIZE[1], 0.28 * len(labels) + 1)),
                        dpi=DPI, layout="constrained")
        FigureCanvasAgg(figure)
        axes = figure.add_subplot()
        positions = list(range(len(labels)))[::-1]
        axes.barh(positions, values, color=BLUE, alpha=0.8)
        for y, value, count in zip(positions, values, counts):
            axes.annotate(f"{value:.0%} ({count})", (value, y), xytext=(3, 0),
                          textcoords="offset points", va="center", fontsize=7)
        axes.axvline(results["accuracy"], color="#222222", linestyle="--", linewidth=1)
        axes.set_yticks(positions, labels, fontsize=7)
        axes.set_xlim(0, 1.15)
        axes.set_title(f"Pairwise accuracy by group (overall {results['accuracy']:.1%}, dashed)",
                       pad=10)
        axes.set_xlabel("accuracy (pairs in brackets)")
        return _png(figure)


def reward_figures(results: dict) -> list[tuple[str, str, bytes]]:
    """(file name, title, PNG) of every figure ``results`` has data for."""
    figures = [("rm_reliability.png", "Reliability diagram", reliability_png(results)),
               ("rm_accuracy_by_group.png", "Accuracy by group", groups_png(results))]
    if "histogram" in results:
        figures.insert(1, ("rm_rewards.png", "Reward distribution", histogram_png(results)))
    return figures


def write_reward_figures(results: dict, directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, _, png in reward_figures(results):
        (directory / name).write_bytes(png)
        written.append(directory / name)
    return written
