"""``preftune compare``: several objectives, one data set, one budget, one seed, one leaderboard.

Each objective trains from the same base config (only ``objective`` changes; unpaired objectives
get the pairs split into labelled completions), is evaluated with the same ``preftune eval``
diagnostics on the same held-out pairs, and gets its own report. An entry whose run finished
with the same effective config is not trained again, so an interrupted comparison resumes.
A base config with an ``online`` section compares the objectives inside ``preftune online``
rounds instead (``online/compare.py``). A diffusion config (a diffusers pipeline in
``model.path``) compares diffusion objectives (``diffusion/compare.py``).
"""

from __future__ import annotations

import hashlib
import json
import time
import traceback
from dataclasses import replace
from pathlib import Path

import yaml

from .config import (ConfigError, ObjectiveConfig, as_list, build_config, load_config,
                     read_tree)
from .model.load import released
from .objectives import get_objective
from .score import check_scorer
from .train.output import check_output_folder, resumable

SAMPLES, NEW_TOKENS = 2, 32  # the held-out sampling of a comparison of offline runs
# leaderboard columns: (key in the entry, header, format); missing values print as "-"
COLUMNS = [
    ("win_rate", "win rate vs reference", "{:.1%}"),
    ("win_rate/policy_score", "scorer mean (policy)", "{:.3f}"),
    ("win_rate/reference_score", "scorer mean (reference)", "{:.3f}"),
    ("rewards/accuracy", "implied-reward acc.", "{:.1%}"),
    ("rewards/margin", "margin", "{:.2f}"),
    # (a diffusion run's, from its last logged training step: the loss's own reward terms)
    ("train/rewards/accuracy", "implied-reward acc., last train step", "{:.1%}"),
    ("train/rewards/margin", "margin, last train step", "{:.2f}"),
    ("ranking/normalised", "ranking acc. (norm.)", "{:.1%}"),
    ("displacement/chosen", "d logp chosen", "{:+.2f}"),
    ("displacement/rejected", "d logp rejected", "{:+.2f}"),
    ("sampled/kl", "KL (samples)", "{:.2f}"),
    ("online/pass_rate", "pass rate, last round", "{:.1%}"),
    ("online/score", "held-out score, last round", "{:.3f}"),
    ("online/scores", "held-out score by round (0 = before)", "{}"),
    ("online/kl", "KL to initial, last round", "{:.2f}"),
    ("online/distinct", "distinct samples, last round", "{:.1%}"),
    ("online/word_distance", "sample word distance, last round", "{:.3f}"),
    ("sampled/length_mean", "length", "{:.1f}"),
    ("train_minutes", "train min", "{:.1f}"),
]


def run_compare(objectives: list[str], config_path: str | None, overrides: list[str],
                output_dir: str, eval_data: str | None = None, scorer: str | None = None,
                samples: int = SAMPLES, max_new_tokens: int = NEW_TOKENS,
                plan_only: bool = False, params: dict | None = None) -> Path:
    """Train, evaluate and report every objective; write leaderboard.md/.json/.png.
    ``params`` maps an objective to the parameters it trains with instead of its paper's
    defaults. ``plan_only`` prints each objective's ``--plan`` instead, writing nothing."""
    from .evaluate.run_eval import EvalOptions, read_pairs, run_eval
    from .train.loop import train

    if not objectives:
        raise ConfigError("--objectives names no objective; give a comma-separated list, e.g. "
                          "dpo,ipo,simpo (preftune objectives lists them).")
    twice = sorted({name for name in objectives if objectives.count(name) > 1})
    if twice:
        raise ConfigError(f"--objectives names {', '.join(twice)} more than once; each "
                          "objective trains once, into OUTPUT_DIR/<objective>.")
    check_output_folder(output_dir, "--output-dir")
    if any(o.partition("=")[0].strip() == "output_dir" for o in overrides):
        raise ConfigError("compare writes each objective's run to OUTPUT_DIR/<objective>: give "
                          "--output-dir DIR instead of --set output_dir=DIR.")
    tree = read_tree(config_path, overrides)
    params = _with_base_params(tree, objectives, params or {})
    strangers = sorted(set(params) - set(objectives))
    if strangers:
        raise ConfigError(f"--param {strangers[0]}.KEY: {strangers[0]} is not one of "
                          f"--objectives ({', '.join(objectives)}).")
    flags = {"--eval-data": eval_data is not None, "--samples": samples != SAMPLES,
             "--max-new-tokens": max_new_tokens != NEW_TOKENS}
    if _diffusion(tree, objectives):
        _refuse_unused(flags, "a comparison of denoisers evaluates each run on the config's "
                              "samples.prompts x samples.seeds under --scorer")
        from .diffusion.compare import compare_diffusion

        return compare_diffusion(objectives, tree, config_path, Path(output_dir), scorer,
                                 plan_only, params)
    for name in objectives:  # unknown names fail before anything trains
        try:
            get_objective(name)
        except KeyError as error:
            raise ConfigError(error.args[0]) from None
    if "online" in tree:
        _refuse_unused({**flags, "--scorer": scorer is not None}, "a comparison of online "
                       "runs evaluates each round on the config's data.eval with online.scorer "
                       "(--set data.eval=FILE, --set online.scorer=SPEC)")
        from .online.compare import compare_online

        return compare_online(objectives, tree, config_path, Path(output_dir), plan_only,
                              params)
    base = load_config(config_path, overrides)
    eval_data = eval_data or _first(base.data.eval)
    if not eval_data:
        raise ConfigError("compare evaluates every objective on held-out pairs: set data.eval in "
                         "the base config or pass --eval-data FILE")
    # the held-out pairs are read as training reads data (data.fields), and read now: a
    # missing or bad file stops the comparison before anything trains
    evaluation = EvalOptions(
        model=base.model.path, data=eval_data, fields=base.data.fields or None,
        reference=base.model.path, scorer=scorer, samples=samples,
        max_new_tokens=max_new_tokens, seed=base.train.seed,
        max_length=base.data.max_length,
        max_prompt_length=base.data.max_prompt_length or base.data.max_length - 1)
    read_pairs(evaluation)
    if scorer:  # a typo found now, not after the first objective has trained
        try:
            check_scorer(scorer, eval_data)
        except ConfigError as error:
            raise ConfigError(f"--scorer: {error}") from None
    root = Path(output_dir)
    trees = {name: _config_for(base.model_dump(), term(name, params), root / name)
             for name in objectives}
    configs = {name: build_config(tree, f"{config_path} with objective {name}")
               for name, tree in trees.items()}  # a bad --param stops before anything trains
    if plan_only:
        return plans(objectives, root, configs.get, lambda config: train(config, plan_only=True))
    root.mkdir(parents=True, exist_ok=True)
    entries = []
    for name in objectives:
        run_dir, tree = root / name, trees[name]

        def work(entry: dict, name=name, run_dir=run_dir) -> None:
            trained(entry, configs[name], train)
            started = time.perf_counter()
            results = run_eval(replace(evaluation, model=str(run_dir), output=str(run_dir)))
            entry["eval_minutes"] = (time.perf_counter() - started) / 60
            entry.update({k: v for k, v in results.items() if isinstance(v, (int, float))})

        entries.append(run_entry(name, run_dir, [tree, data_stamps(tree["data"], eval_data),
                                                 eval_data, scorer, samples,
                                                 max_new_tokens], work))
    _write_leaderboard(root, entries, eval_data, scorer)
    return root


def trained(entry: dict, config, train) -> None:
    """``train(config, resume=, overwrite=)`` for a comparison's entry: an interrupted run of
    these settings continues from its checkpoint, a finished one is kept (only the evaluation
    changed), an earlier, different or failed one is moved aside, not reused. The entry's
    ``train_minutes`` are the run's own (its ``train_seconds``, resumed parts summed)."""
    from .train.output import DataChanged

    run_dir = Path(config.output_dir)
    resume = resumable(config)
    try:
        train(config, resume=resume, overwrite=not resume)
    except DataChanged:  # the data was edited since: the earlier run moves aside
        train(config, resume=False, overwrite=True)
    seconds = json.loads((run_dir / "run.json").read_text()).get("train_seconds")
    entry["train_minutes"] = None if seconds is None else seconds / 60  # (older runs: unknown)


def plans(objectives: list[str], root: Path, config_of, plan) -> Path:
    """Each objective's plan (``plan(config_of(name))`` prints it) under its name."""
    for name in objectives:
        print(f"\n[compare] {name}: the plan of {root / name}")
        plan(config_of(name))
    return root


def data_stamps(data: dict, *more) -> list:
    """What the data files of a config's ``data`` section (and ``more`` paths) hold: a hash
    of each file's bytes, a folder's file names and sizes; a name that is no local path (a
    Hub dataset) as it is. In an entry's settings, so editing the data trains it again."""
    paths = [path for key in ("train", "eval") for path in as_list(data.get(key) or [])]
    stamps = []
    for path in dict.fromkeys(map(str, [*paths, *(p for p in more if p)])):
        local = Path(path)
        if local.is_file():
            stamps.append(hashlib.sha256(local.read_bytes()).hexdigest())
        elif local.is_dir():
            stamps.append(sorted((str(f.relative_to(local)), f.stat().st_size)
                                 for f in local.rglob("*") if f.is_file()))
        else:
            stamps.append(path)
    return stamps


def run_entry(name: str, run_dir: Path, settings: list, work) -> dict:
    """One leaderboard entry: skipped when it finished earlier with the same ``settings``;
    else ``work(entry)`` trains and evaluates into ``entry``, then the run's report is
    written. A failure is recorded in the entry, so one objective cannot lose the others."""
    from .report import write_report

    fingerprint = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
    done = run_dir / "compare_entry.json"
    if done.exists() and json.loads(done.read_text()).get("fingerprint") == fingerprint:
        print(f"[compare] {name}: finished earlier with the same settings, skipped")
        return json.loads(done.read_text())
    print(f"\n[compare] {name}: training in {run_dir}")
    entry = {"objective": name, "fingerprint": fingerprint, "run_dir": str(run_dir)}
    # this objective's models go before the next one's load, after a failure too (its
    # traceback's frames held them until attempt returned)
    if released(lambda: attempt(name, entry, lambda: work(entry))):
        write_report(run_dir)
        entry["report"] = str(run_dir / "report.html")
        done.write_text(json.dumps(entry, indent=2) + "\n")
    return entry


def attempt(name: str, entry: dict, work) -> bool:
    """Run one entry's ``work``; a failure is recorded in ``entry`` (and printed: one line
    for bad settings or data, the traceback for anything else), so one objective cannot lose
    the others. A signal stops the whole comparison; running it again continues."""
    from .data.records import DataError
    from .train.stopping import TrainingStopped, stop_if_asked

    try:
        work()
        stop_if_asked("after its run")  # (a signal in its last step)
    except TrainingStopped as stopped:
        raise TrainingStopped(f"compare, objective {name}: {stopped.summary}",
                              "Run the same compare command again to continue: finished "
                              "objectives are skipped and this one resumes.",
                              stopped.signal_name) from None
    except (ConfigError, DataError) as error:
        entry["error"] = f"{type(error).__name__}: {error}"
        print(f"[compare] {name} failed: {error}")
    except Exception as error:
        entry["error"] = f"{type(error).__name__}: {error}"
        traceback.print_exc()
    else:
        return True
    return False


def _refuse_unused(flags: dict, instead: str) -> None:
    """The first of ``flags`` (name -> given) that this kind of comparison does not read is
    refused by name, saying what it reads ``instead`` (it was ignored)."""
    given = [name for name, set_ in flags.items() if set_]
    if given:
        raise ConfigError(f"{given[0]} does nothing here: {instead}.")


def _diffusion(tree: dict, objectives: list[str]) -> bool:
    """A diffusers pipeline config (compared by the diffusion extra)."""
    from .diffusion.compare import is_diffusion_config

    return is_diffusion_config(tree, objectives)


def _first(value):
    return value[0] if isinstance(value, list) else value


def objective_params(items: list[str]) -> dict:
    """``--param OBJECTIVE.KEY=VALUE`` values as {objective: {key: value}} (values read as
    YAML, as --set reads them)."""
    params: dict = {}
    for item in items:
        dotted, equals, raw = item.partition("=")
        name, dot, key = dotted.strip().partition(".")
        if not (equals and dot and name and key) or "." in key:
            raise ConfigError(f"--param {item!r}: expected OBJECTIVE.KEY=VALUE, e.g. "
                              "--param simpo.beta=2.5")
        try:
            params.setdefault(name, {})[key] = yaml.safe_load(raw)
        except yaml.YAMLError:
            raise ConfigError(f"--param {item!r}: the value is not valid YAML; quote text "
                              "that holds brackets or colons") from None
    return params


def term(name: str, params: dict) -> dict:
    """Objective ``name`` with its ``--param`` values (its paper's defaults for the rest)."""
    return {"name": name, **params.get(name, {})}


def _with_base_params(tree: dict, objectives: list[str], params: dict) -> dict:
    """``params`` with the base config's objective parameters as those of that objective
    (``--param`` wins): they configure it when it is compared. Where they would be dropped (it
    is not compared, or the base combines several objectives) they are refused, saying how
    to give them."""
    objective = tree.get("objective")
    terms = objective if isinstance(objective, list) else [objective]
    if len(terms) > 1:
        raise ConfigError("the base config's objective combines several objectives, but compare "
                          "trains each of --objectives alone; leave one objective there.")
    base = terms[0] if isinstance(terms[0], dict) else {"name": terms[0]}
    given = {key: value for key, value in base.items() if key not in ("name", "weight")}
    if not given:
        return params
    name = base.get("name") or ObjectiveConfig().name  # (no name: the default objective)
    if name not in objectives:
        raise ConfigError(
            f"the base config's objective {name} sets {', '.join(given)}, but {name} is not "
            f"among --objectives ({', '.join(objectives)}), so that would be dropped. Give a "
            "compared objective's parameters with --param OBJECTIVE.KEY=VALUE, and leave the "
            "base objective a name (or compare it too).")
    return {**params, name: {**given, **params.get(name, {})}}


def _config_for(tree: dict, objective: dict, run_dir: Path) -> dict:
    """The base config with ``objective`` (a term: its name and parameters) as its only
    objective, and its own dir."""
    name = objective["name"]
    tree = json.loads(json.dumps(tree))
    tree["objective"] = objective
    tree["output_dir"] = str(run_dir)
    tree["reference"]["strategy"] = "auto"
    if get_objective(name).data == "unpaired":  # each pair becomes a good and a bad completion
        given = tree["data"].get("convert") or []
        given = [given] if isinstance(given, str) else given
        if "unpaired" not in given:
            tree["data"]["convert"] = [*given, "unpaired"]
    return tree


def _write_leaderboard(root: Path, entries: list[dict], eval_data: str, scorer) -> None:
    ranked = sorted(entries, key=_sort_key, reverse=True)
    shown = [c for c in COLUMNS if any(c[0] in e for e in entries)]
    lines = [f"Held-out data: `{eval_data}`" + (f"; scorer: `{scorer}`" if scorer else ""), "",
             "| objective | " + " | ".join(h for _, h, _ in shown) + " | report |",
             "|---|" + "---|" * (len(shown) + 1)]
    for entry in ranked:
        if "error" in entry:
            error = " ".join(entry["error"].split()).replace("|", "\\|")
            lines.append(f"| {entry['objective']} | failed: {error} |")
            continue
        cells = [fmt.format(entry[key]) if isinstance(entry.get(key), (int, float, str))
                 else "-" for key, _, fmt in shown]
        link = Path(entry["report"]).relative_to(root)
        lines.append(f"| {entry['objective']} | " + " | ".join(cells) + f" | [report]({link}) |")
    (root / "leaderboard.md").write_text("\n".join(lines) + "\n")
    (root / "leaderboard.json").write_text(json.dumps(ranked, indent=2) + "\n")
    _plot(root / "leaderboard.png", [e for e in ranked if "error" not in e])
    print("\n" + "\n".join(lines))
    print(f"\nleaderboard: {root / 'leaderboard.md'} (and .json, .png)")


def _sort_key(entry: dict) -> tuple:
    if "error" in entry:
        return (-1.0, -1.0)
    return (entry.get("win_rate", entry.get("online/score", -1.0)),
            entry.get("rewards/accuracy", entry.get("train/rewards/accuracy", -1.0)))


def _plot(path: Path, entries: list[dict]) -> None:
    """Grouped bars of the rate-like columns per objective."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [(k, h) for k, h, f in COLUMNS if f.endswith("%}") and any(k in e for e in entries)]
    if not entries or not keys:
        return
    figure, axis = plt.subplots(figsize=(max(6, 1.6 * len(entries)), 4), dpi=120)
    width = 0.8 / len(keys)
    for i, (key, header) in enumerate(keys):
        values = [e.get(key, 0.0) for e in entries]
        axis.bar([x + i * width for x in range(len(entries))], values, width, label=header)
    axis.set_xticks([x + width * (len(keys) - 1) / 2 for x in range(len(entries))],
                    [e["objective"] for e in entries])
    axis.set_ylim(0, 1)
    axis.set_ylabel("fraction of held-out prompts / pairs")
    axis.legend(frameon=False, fontsize=8)
    axis.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)

