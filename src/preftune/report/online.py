"""An online run (``preftune online`` or ``preftune diffusion online``) in the report: per-round
figures from ``online.json`` (held-out score and pass rate, the scores of each round's samples,
KL to the initial model, the diversity and score of the held-out samples, a denoiser's win rate
over it) and the rounds' training metrics joined into one curve per metric (steps counted
across rounds)."""

from __future__ import annotations

from pathlib import Path

from matplotlib import rc_context

from .plots import ROLE_COLOURS, STYLE
from .reward import _canvas, _png

BLUE, GREEN = ROLE_COLOURS["margins"], ROLE_COLOURS["chosen"]


def joined_metrics(run_dir: Path, summary: dict, read_jsonl,
                   read_alarms) -> tuple[list[dict], list[dict]]:
    """The finished rounds' ``metrics.jsonl`` one after another, steps offset so they
    continue, and their alarms (``read_alarms(alarms.jsonl, records)``) at the same steps."""
    joined, alarms, offset = [], [], 0
    for info in summary["rounds"]:
        here = run_dir / f"round-{info['round']}"
        # `preftune online` trains in the round's folder, `diffusion online` in its train/
        path = next((p for p in (here / "metrics.jsonl", here / "train" / "metrics.jsonl")
                     if p.is_file()), None)
        records = read_jsonl(path) if path is not None else []
        joined += [{**r, "step": r["step"] + offset} for r in records]
        if path is not None:
            alarms += [{**alarm, "step": alarm["step"] + offset, "round": info["round"]}
                       for alarm in read_alarms(path.parent / "alarms.jsonl", records)]
        offset += records[-1]["step"] if records else 0
    return joined, alarms


def rounds_run_info(run_dir: Path, summary: dict, read_json) -> dict | None:
    """The newest trained round's ``run.json`` (objective, reference, layout), its ``steps``
    and ``train_examples`` the rounds' totals and its ``eval_examples`` the held-out prompts
    each round is measured on; None before a round finished training."""
    infos = [info for r in summary["rounds"] for here in [run_dir / f"round-{r['round']}"]
             for path in (here / "run.json", here / "train" / "run.json")
             if (info := read_json(path)) is not None]
    if not infos:
        return None
    held_out = next((r["evaluate"]["prompts"] for r in summary["rounds"]
                     if "prompts" in r.get("evaluate", {})), infos[-1].get("eval_examples", 0))
    return {**infos[-1], "steps": sum(info.get("steps", 0) for info in infos),
            "train_examples": sum(info.get("train_examples", 0) for info in infos),
            "eval_examples": held_out}


def _held_out(summary: dict) -> list[tuple[int, dict]]:
    points = [(0, summary["initial"])] if summary.get("initial") else []
    return points + [(r["round"], r["evaluate"]) for r in summary["rounds"] if "evaluate" in r]


def held_out_png(summary: dict) -> bytes:
    """Held-out mean score (the pass rate for pass/fail scorers) after each round."""
    points = _held_out(summary)
    key = "pass_rate" if all("pass_rate" in e for _, e in points) else "mean_score"
    with rc_context(STYLE):
        figure, axes = _canvas()
        axes.plot([r for r, _ in points], [e[key] for _, e in points], "o-", color=GREEN)
        for r, e in points:
            axes.annotate(f"{e[key]:.3g}", (r, e[key]), textcoords="offset points",
                          xytext=(0, 6), ha="center", fontsize=8)
        axes.set_title(f"Held-out {key.replace('_', ' ')} by round (0 = before)", pad=10)
        axes.set_xlabel("round")
        axes.set_xticks([r for r, _ in points])
        return _png(figure)


def sample_scores_png(summary: dict) -> bytes:
    """The scores of each round's samples: mean +- std, and the range."""
    rounds = [r for r in summary["rounds"] if "score" in r]
    with rc_context(STYLE):
        figure, axes = _canvas()
        x = [r["round"] for r in rounds]
        axes.errorbar(x, [r["score"]["mean"] for r in rounds],
                      yerr=[r["score"]["std"] for r in rounds], fmt="o", color=BLUE,
                      capsize=4, label="mean +- std")
        axes.vlines(x, [r["score"]["min"] for r in rounds], [r["score"]["max"] for r in rounds],
                    color=BLUE, alpha=0.3, linewidth=6, label="min to max")
        axes.set_title("Scores of each round's samples", pad=10)
        axes.set_xlabel("round")
        axes.set_xticks(x)
        axes.legend(loc="best")
        return _png(figure)


def kl_png(summary: dict) -> bytes:
    """KL of each round's model to the initial model, on its own held-out samples."""
    points = [(r, e["kl_to_initial"]) for r, e in _held_out(summary) if "kl_to_initial" in e]
    with rc_context(STYLE):
        figure, axes = _canvas()
        axes.plot([0] + [r for r, _ in points], [0.0] + [k for _, k in points], "o-",
                  color=ROLE_COLOURS["rejected"])
        axes.set_title("KL(round model || initial model), nats per response", pad=10)
        axes.set_xlabel("round")
        return _png(figure)


def diversity_png(summary: dict) -> bytes:
    """The held-out samples' word distance and distinct share by round (0 = before), beside
    their mean score: answers that get better while collapsing onto one show here."""
    points = [(r, e) for r, e in _held_out(summary) if "sample_diversity" in e]
    rounds = [r for r, _ in points]
    with rc_context(STYLE):
        figure, axes = _canvas()
        axes.plot(rounds, [e["sample_diversity"]["word_distance"] for _, e in points], "o-",
                  color=BLUE, label="word distance between two samples")
        axes.plot(rounds, [e["sample_diversity"]["distinct"] for _, e in points], "s--",
                  color=ROLE_COLOURS["rejected"], label="distinct share")
        scored = [(r, e["sample_mean_score"]) for r, e in points if "sample_mean_score" in e]
        if scored:
            axes.plot([r for r, _ in scored], [v for _, v in scored], "^:", color=GREEN,
                      label="mean score of the samples")
        axes.set_title("Held-out samples by round (0 = before)", pad=10)
        axes.set_xlabel("round")
        axes.set_xticks(rounds)
        axes.legend(loc="best")
        return _png(figure)


def online_figures(summary: dict) -> list[tuple[str, str, bytes]]:
    figures = []
    if _held_out(summary):
        figures.append(("online_held_out.png", "Held-out score by round", held_out_png(summary)))
    if any("score" in r for r in summary["rounds"]):
        figures.append(("online_sample_scores.png", "Sample scores by round",
                        sample_scores_png(summary)))
    if any("kl_to_initial" in e for _, e in _held_out(summary)):
        figures.append(("online_kl.png", "KL to the initial model", kl_png(summary)))
    if any("sample_diversity" in e for _, e in _held_out(summary)):
        figures.append(("online_diversity.png", "Diversity of the held-out samples",
                        diversity_png(summary)))
    return figures


def round_rows(summary: dict) -> list[dict]:
    """One row per round for the page's table: what was sampled, paired, trained and measured."""
    rows = []
    for r in summary["rounds"]:
        sample, build, train = r.get("sample", {}), r.get("build", {}), r.get("train", {})
        evaluate = r.get("evaluate", {})
        rows.append({"round": r["round"], "prompts": sample.get("prompts"),
                     "samples": sample.get("samples"),
                     "generation tokens/s": sample.get("tokens_per_second"),
                     "sample score mean": r.get("score", {}).get("mean"),
                     "rows built": build.get("rows"), "tied prompts": build.get("tied"),
                     "steps": train.get("steps"), "last loss": train.get("loss"),
                     "held-out score": evaluate.get("mean_score"),
                     "KL to initial": evaluate.get("kl_to_initial"),
                     "held-out sample score": evaluate.get("sample_mean_score"),
                     "held-out distinct": evaluate.get("sample_diversity", {}).get("distinct"),
                     "held-out word distance": evaluate.get("sample_diversity", {}).get(
                         "word_distance"),
                     "win rate vs initial": evaluate.get("win_rate")})
    return [{k: v for k, v in row.items()  # columns no round has (e.g. KL for images)
             if any(other[k] is not None for other in rows)} for row in rows]
