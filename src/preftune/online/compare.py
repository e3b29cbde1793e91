"""``preftune compare`` on a config with an ``online`` section: every objective through the
same online rounds (same prompts, scorer, sampling and steps), each measured as its rounds are
(the config's ``data.eval`` under ``online.scorer``); the leaderboard has each run's held-out
score after every round and its KL to the initial model."""

from __future__ import annotations

import json
from pathlib import Path

from ..compare import _first, _write_leaderboard, attempt, plans, term
from ..config import ConfigError, build_config
from ..objectives import get_objective


def compare_online(objectives: list[str], tree: dict, config_path, root: Path,
                    plan_only: bool = False, params: dict | None = None) -> Path:
    """Each objective through the same online rounds (same prompts, scorer, sampling, steps);
    ``plan_only``: each one's ``--plan``."""
    from .config import OnlineConfig
    from .loop import continues, run_online
    from ..report import write_report

    base = build_config(tree, config_path or "the config", schema=OnlineConfig)
    if not base.data.eval:
        raise ConfigError("an online compare measures every objective on held-out prompts: set "
                         "data.eval in the base config")
    configs = {name: build_config(online_tree(base.model_dump(), term(name, params),
                                               root / name),
                                  f"{config_path} with objective {name}", schema=OnlineConfig)
               for name in objectives}  # a bad --param stops before anything trains
    if plan_only:
        return plans(objectives, root, configs.get,
                     lambda config: run_online(config, plan_only=True))
    root.mkdir(parents=True, exist_ok=True)
    entries = []
    for name in objectives:
        run_dir = root / name
        entry = {"objective": name, "run_dir": str(run_dir)}

        def work(entry=entry, name=name, run_dir=run_dir) -> None:
            config = configs[name]
            print(f"\n[compare] {name}: online rounds in {run_dir}")
            resume = continues(config)  # an earlier run under other settings: moved aside
            run_online(config, resume=resume, overwrite=not resume)
            summary = json.loads((run_dir / "online.json").read_text())
            entry["train_minutes"] = run_seconds(summary) / 60
            entry.update(_online_numbers(summary))
            write_report(run_dir)
            entry["report"] = str(run_dir / "report.html")

        attempt(name, entry, work)
        entries.append(entry)
    _write_leaderboard(root, entries, f"{_first(base.data.eval)} (its prompts)",
                       base.online.scorer)
    return root


def online_tree(tree: dict, objective: dict, run_dir: Path) -> dict:
    """The base online config with ``objective`` (a term: its name and parameters): list
    objectives get lists, and what an objective declares of its online rows (builder, win
    probabilities) is set."""
    from .build import DATA_PAIR_BUILDERS, LIST_BUILDERS

    name = objective["name"]
    tree = json.loads(json.dumps(tree))
    tree["objective"] = objective
    tree["output_dir"] = str(run_dir)
    tree["reference"]["strategy"] = "auto"
    tree["reference"].pop("model", None)
    spec, pairs = get_objective(name), tree["online"]["pairs"]
    ranked, given = spec.data == "ranked", pairs["builder"]
    if spec.online_builder:  # what the objective declares its online rows need
        pairs["builder"] = spec.online_builder
    elif ranked != (pairs["builder"] in LIST_BUILDERS) or pairs["builder"] in DATA_PAIR_BUILDERS:
        pairs["builder"] = "list" if ranked else "best_vs_worst"
    if pairs["builder"] != given:  # the given builder's own settings (rso_*, divpo_*) go
        for key in [k for k in pairs if k.startswith(f"{given}_")]:
            del pairs[key]
    pairs["win_probs"] = pairs["win_probs"] or spec.online_win_probs
    # y_ref, or the whole list: samples of the round's start model, which is the reference
    if pairs["builder"] in DATA_PAIR_BUILDERS or spec.reference_samples:
        tree["online"]["reference"] = "previous"
    return tree


def run_seconds(summary: dict) -> float:
    """An online run's own seconds (``online.json``): every phase of its rounds and the first
    evaluation, a round's training as its run.json counts it (the parts before a stop and
    resume summed), so a resumed run is not timed by its last part alone."""
    phases = [summary["initial"] or {}] + [phase for info in summary["rounds"]
                                          for phase in info.values() if isinstance(phase, dict)]
    return sum(phase.get("train_seconds", phase.get("seconds", 0.0)) for phase in phases)


def _online_numbers(summary: dict) -> dict:
    """The leaderboard's numbers of one online run: the last round's and the curve."""
    evaluations = [summary["initial"]] + [r["evaluate"] for r in summary["rounds"]]
    last = evaluations[-1]
    numbers = {"online/score": last["mean_score"],
               "online/scores": " → ".join(f"{e['mean_score']:.3f}" for e in evaluations)}
    if "pass_rate" in last:
        numbers["online/pass_rate"] = last["pass_rate"]
    if "kl_to_initial" in last:
        numbers["online/kl"] = last["kl_to_initial"]
    for key, value in last.get("sample_diversity", {}).items():  # distinct, word_distance
        numbers[f"online/{key}"] = value
    return numbers
