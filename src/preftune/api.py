"""The Python API: the functions the ``preftune`` commands that train, evaluate, score and
report call, for scripts and notebooks.

    from preftune.api import Config, train
    config = Config.from_yaml("examples/dpo.yaml", overrides=["train.max_steps=10"])
    run_dir = train(config)          # same run, same files as `preftune train`

A config argument may be a config object, a dict shaped like the YAML file, or a YAML path;
dicts and files go through the same checks and error messages (``ConfigError``) as the CLI.
Objectives and scorers from your own code: ``register_objective`` / ``register_scorer``, or
``module:function`` in a config, or an installed package's entry points (groups
``preftune.objectives`` and ``preftune.scorers``).
"""

from __future__ import annotations

import functools
import inspect
import json
import numbers
from pathlib import Path
from typing import Sequence

from .arguments import DTYPE_CHOICES
from .config import Config, ConfigError, path_text
from .diffusion import require_diffusers
from .diffusion.config import DiffusionConfig
from .objectives.common import FlipRate, NonNegative, Positive, Share
from .objectives.registry import NoParams, ObjectiveInputs, ObjectiveOutput, register_objective
from .objectives.state import ObjectiveState, RunningMean
from .online.config import OnlineConfig
from .reward.config import RewardConfig
from .score import load_scorer, register_scorer

__all__ = ["Config", "ConfigError", "DiffusionConfig", "FlipRate", "NoParams", "NonNegative",
           "ObjectiveInputs", "ObjectiveOutput", "ObjectiveState", "ObjectivesFailed",
           "OnlineConfig", "Positive", "RewardConfig", "RunningMean", "Share", "compare",
           "evaluate", "evaluate_diffusion", "evaluate_reward_model", "fit_compositional",
           "load_scorer",
           "preference_strength", "register_objective", "register_scorer", "run_online",
           "score_with_reward_model", "train", "train_diffusion", "train_reward_model",
           "tree_pairs", "pairs_from_commits", "relevance_pairs", "write_report"]


def _as_the_command_takes(function):
    """Let ``function``'s path arguments be ``pathlib.Path`` (any ``os.PathLike``), alone or in
    a list, as well as strings: they are passed on as the strings the commands pass. Its
    numbers and dtype are checked as its command's flags are (``_check_arguments``)."""
    signature = inspect.signature(function)

    @functools.wraps(function)
    def call(*args, **options):
        _check_arguments(function.__name__, signature.bind(*args, **options).arguments)
        return function(*path_text(args), **path_text(options))
    return call


# what the commands' flags accept (argparse types, choices), by argument name
COUNTS = {"batch_size": 1, "passes": 1, "bins": 1, "steps": 1, "resolution": 1,
          "max_new_tokens": 1, "top_k": 1, "max_length": 1, "max_prompt_length": 1,
          "step_tokens": 1, "answer_tokens": 1, "branches": 1, "rollouts": 1, "expansions": 1,
          "samples": 0, "seed": None}
NUMBERS = ("beta", "filter_top", "dropout", "l2", "guidance_scale", "true_cfg_scale",
           "min_gap", "temperature", "min_similarity", "max_similarity")
MAY_BE_NONE = ("filter_top", "max_prompt_length", "resolution")  # None: the default rule


def _check_arguments(function: str, arguments: dict) -> None:
    """A count, number or dtype of an API call that its command's flag would refuse is a
    ``ConfigError`` naming it, before anything loads or is written (it was a KeyError or a
    comparison's TypeError deep inside, or a crash halfway through)."""
    for name, value in {**arguments.pop("options", {}), **arguments.pop("settings", {}),
                        **arguments}.items():
        if value is None and name in MAY_BE_NONE:
            continue
        problem = None
        if name in COUNTS:
            lowest = COUNTS[name]
            if not isinstance(value, numbers.Integral) or isinstance(value, bool):
                problem = "a whole number" + (f" of at least {lowest}" if lowest is not None
                                              else "")
            elif lowest is not None and value < lowest:
                problem = f"at least {lowest}"
        elif name in NUMBERS and (not isinstance(value, numbers.Real) or isinstance(value, bool)):
            problem = "a number"
        elif name == "dtype" and value not in DTYPE_CHOICES:
            problem = f"one of {', '.join(DTYPE_CHOICES)}"
        if problem:
            raise ConfigError(f"{function}(): {name} should be {problem}, got {value!r}.")


def _as(kind: type, config):
    """``config`` as a ``kind``: kept if it is one, read if it is a dict or a YAML path. A
    config of another kind is refused, naming the function that takes it: an OnlineConfig,
    a Config's subclass, would train offline with its online section ignored."""
    if type(config) is kind:
        return config
    if isinstance(config, dict):
        return kind.from_dict(config)
    if isinstance(config, (str, Path)):
        return kind.from_yaml(config)
    takes = {Config: "train", OnlineConfig: "run_online", RewardConfig: "train_reward_model",
             DiffusionConfig: "train_diffusion"}
    raise TypeError(f"{takes[kind]}() takes a {kind.__name__}, a dict or a YAML path, got "
                    f"{'an' if type(config).__name__[0] in 'AEIOU' else 'a'} "
                    f"{type(config).__name__}"
                    + (f"; call {takes[type(config)]}(config) to run it" if type(config) in
                       takes else "") + ".")


def train(config: Config | dict | str | Path, *, resume: bool = False, overwrite: bool = False,
          plan_only: bool = False, show_progress: bool = True) -> Path:
    """Train a policy (``preftune train``); returns the output directory. An output_dir that
    holds a run needs ``resume`` (same settings) or ``overwrite`` (the old run is moved
    aside); ``plan_only`` prints the layout, reference and memory plan and stops."""
    from .train.logging import bars_shown
    from .train.loop import train as train_policy

    with bars_shown(show_progress):
        return train_policy(_as(Config, config), resume=resume, show_progress=show_progress,
                            plan_only=plan_only, overwrite=overwrite)


@_as_the_command_takes
def evaluate(model: str, data: str, **options) -> dict:
    """Diagnostics of a trained model against its reference on preference pairs (``preftune
    eval``; ``options`` are its flags, e.g. ``beta=0.1, samples=0, scorer="synthetic"``).
    Writes eval.json and returns the results."""
    from .evaluate.run_eval import EvalOptions, run_eval

    return run_eval(_made(EvalOptions, "evaluate", model=model, data=data, **options))


@_as_the_command_takes
def compare(objectives: Sequence[str], config: str | None = None, *,
            overrides: Sequence[str] = (), output_dir: str = "runs/compare",
            eval_data: str | None = None, scorer: str | None = None, samples: int = 2,
            max_new_tokens: int = 32, plan_only: bool = False,
            params: dict | None = None) -> Path:
    """Train each objective on the base config ``config`` (a YAML path, its objective
    replaced), evaluate them alike and write a leaderboard (``preftune compare``);
    ``params`` gives an objective other parameters than its paper's defaults, e.g.
    ``{"simpo": {"beta": 2.5}}``; ``plan_only`` prints each objective's ``--plan`` instead.
    When an objective failed, the others were trained and ranked, and ``ObjectivesFailed``
    (its ``failed`` names, ``output_dir``) is raised once the leaderboard is written."""
    from .compare import run_compare
    from .config import as_list

    if config is not None and not isinstance(config, str):
        raise ConfigError(f"compare(): config is the path of a YAML file (each objective's run "
                          f"is that file with its objective replaced), got "
                          f"{type(config).__name__}; save it (yaml.safe_dump(config.model_dump"
                          f"())) and pass the path, or give settings as overrides.")
    if isinstance(objectives, str):  # "dpo,ipo", as on the command line
        objectives = [name.strip() for name in objectives.split(",") if name.strip()]
    root = run_compare(list(objectives), config, as_list(overrides), output_dir, eval_data,
                       scorer, samples, max_new_tokens, plan_only, params)
    entries = [] if plan_only else json.loads((Path(root) / "leaderboard.json").read_text())
    failed = [entry["objective"] for entry in entries if "error" in entry]
    if failed:
        raise ObjectivesFailed(failed, len(entries), Path(root))
    return root


class ObjectivesFailed(Exception):
    """``compare()``: these objectives (``failed``) failed, their errors in the leaderboard
    under ``output_dir``; the others were trained, evaluated and ranked."""

    def __init__(self, failed: list[str], total: int, output_dir: Path):
        self.failed, self.output_dir = failed, output_dir
        super().__init__(f"compare: {len(failed)} of {total} objectives failed "
                         f"({', '.join(failed)}); see {output_dir / 'leaderboard.md'}")


def train_reward_model(config: RewardConfig | dict | str | Path, *, resume: bool = False,
                       overwrite: bool = False, show_progress: bool = True,
                       plan_only: bool = False) -> Path:
    """Train a reward model (``preftune rm train``); returns the output directory.
    ``plan_only`` prints the layout and memory plan and stops."""
    from .reward.train import train_reward_model as train_reward
    from .train.logging import bars_shown

    with bars_shown(show_progress):
        return train_reward(_as(RewardConfig, config), resume=resume,
                            show_progress=show_progress, overwrite=overwrite, plan_only=plan_only)


@_as_the_command_takes
def evaluate_reward_model(model: str | None, data: str, **options) -> dict:
    """Accuracy, calibration and reward distribution of a reward model (``preftune rm eval``;
    ``options``: scorer (instead of a model: any scorer spec), fields, output, category_field,
    bins, batch_size, dtype). Returns the results."""
    from .reward.evaluate import RewardEvalOptions, run_rm_eval

    return run_rm_eval(_made(RewardEvalOptions, "evaluate_reward_model", model=model,
                             data=data, **options))


@_as_the_command_takes
def score_with_reward_model(model: str, data: str, output: str, *, batch_size: int = 16,
                            field: str = "score", overwrite: bool = False,
                            fields: dict | None = None, dtype: str = "auto") -> Path:
    """Write every record of ``data`` with its reward-model scores to ``output`` (JSONL;
    ``preftune rm score``); ``fields`` maps canonical field names to the file's columns,
    ``dtype`` is the model's ('auto': as saved)."""
    from .reward.scoring import run_score

    return run_score(model, data, output, batch_size, field, overwrite, fields, dtype)


@_as_the_command_takes
def preference_strength(models: str | list[str], data: str, output: str, *, passes: int = 1,
                        dropout: float = 0.0, flip: bool = False, field: str = "strength",
                        seed: int = 0, batch_size: int = 16, overwrite: bool = False,
                        fields: dict | None = None, dtype: str = "auto") -> Path:
    """Each pair of ``data`` with the mean, spread and agreement of the reward gaps that
    ``models`` (an ensemble) or ``passes`` dropout passes give it, written to ``output``
    (``preftune rm strength``; Secrets of RLHF II, UPO's MC-dropout estimator)."""
    from .reward.strength import run_strength

    models = [models] if isinstance(models, str) else list(models)
    return run_strength(models, data, output, passes=passes, dropout=dropout, flip=flip,
                        field=field, seed=seed, batch_size=batch_size, overwrite=overwrite,
                        fields=fields, dtype=dtype)


@_as_the_command_takes
def fit_compositional(scorer_file: str, data: str, output: str, *, l2: float = 0.01,
                      overwrite: bool = False, fields: dict | None = None,
                      dtype: str = "auto") -> dict:
    """Fit the feature weights of a compositional preference model (a scorer file's
    ``compositional`` mapping) on labelled pairs and write the file with them to ``output``
    (``preftune rm fit-cpm``); returns the fit (weights, accuracy, log loss). The judge loads
    in ``dtype`` (auto: the dtype its weights are saved in)."""
    from .reward.fit_cpm import run_fit_cpm

    return run_fit_cpm(scorer_file, data, output, l2, overwrite, fields, dtype)


@_as_the_command_takes
def tree_pairs(model: str, data: str, output_dir: str, scorer: str, *,
               fields: dict | None = None, max_length: int = 1024,
               max_prompt_length: int | None = None, dtype: str = "float32",
               chat_template: str | None = None, overwrite: bool = False,
               **settings) -> Path:
    """Step-level pairs from best-first search trees of ``model``'s answers to the prompts of
    ``data``, each step valued by the mean ``scorer`` score of its rollouts, written to
    ``output_dir`` (``pairs.jsonl``, ``trees.jsonl``; ``preftune data tree``, Tree-PLV).
    ``settings``: ``branches``, ``rollouts``, ``expansions``, ``delimiter``, ``step_tokens``,
    ``answer_tokens``, ``min_gap``, ``temperature``, ``seed``, ``batch_size``. Returns the
    pairs file."""
    from .config import prompt_limit
    from .data.tree import TreeSettings, run_tree

    search = _made(TreeSettings, "tree_pairs", **settings)
    return run_tree(model, data, output_dir, scorer, search, fields=fields,
                    max_length=max_length,
                    max_prompt_length=prompt_limit(max_length, max_prompt_length),
                    dtype=dtype, chat_template=chat_template, overwrite=overwrite)


@_as_the_command_takes
def pairs_from_commits(repo: str, output: str, *, overwrite: bool = False,
                       **settings) -> Path:
    """Code preference pairs from ``repo``'s git history written to ``output``: each Python
    function a commit changed, after over before, the commit message as the request
    (``preftune data commits``; CodeFavor's Commit-Instruct). ``settings``: ``max_commits``,
    ``min_words``, ``max_functions``, ``max_chars``, ``context``. Returns the file."""
    from .data.commits import CommitSettings, run_commits

    return run_commits(repo, output, _made(CommitSettings, "pairs_from_commits",
                                           **settings), overwrite)


@_as_the_command_takes
def relevance_pairs(data: str, output: str, *, min_similarity: float = 0.3,
                    max_similarity: float = 0.95, encoder: str = "minilm",
                    fields: dict | None = None, overwrite: bool = False) -> Path:
    """Each prompt of ``data`` with its best answer over the best answer to the most similar
    other prompt (cosine of sentence embeddings in [min_similarity, max_similarity]), written
    to ``output`` (``preftune data relevance``; axiomatic preference modeling's relevance
    axiom). Returns the file."""
    from .data.relevance import RelevanceSettings, run_relevance

    settings = _made(RelevanceSettings, "relevance_pairs", min_similarity=min_similarity,
                     max_similarity=max_similarity, encoder=encoder)
    return run_relevance(data, output, settings, fields=fields, overwrite=overwrite)


def run_online(config: OnlineConfig | dict | str | Path, *, resume: bool = False,
               overwrite: bool = False, plan_only: bool = False) -> Path:
    """Online rounds: sample, score, pair, train, evaluate (``preftune online``); returns the
    output directory. ``plan_only`` prints the sampling and training memory plan and stops."""
    from .online.loop import run_online as run_rounds

    return run_rounds(_as(OnlineConfig, config), resume=resume, overwrite=overwrite,
                      plan_only=plan_only)


@_as_the_command_takes
def write_report(run_dir: str | Path, output: str | Path | None = None) -> Path:
    """Plots, alarms and eval results of a run of any kind as one self-contained HTML page
    (``preftune report``): ``output``, else ``RUN_DIR/report.html``; each figure also as a PNG
    under ``RUN_DIR/report/``. Returns the page's path; ``ReportError`` says what is missing."""
    from .report import write_report as write_page

    return write_page(run_dir, output)


def train_diffusion(config: DiffusionConfig | dict | str | Path, *, resume: bool = False,
                    overwrite: bool = False, show_progress: bool = True,
                    plan_only: bool = False) -> Path:
    """Train a diffusers denoiser on image preference pairs or ranked lists, or on prompts alone
    with ``spo`` and ``longalign`` (``preftune diffusion train``; needs ``pip install
    'preftune[diffusion]'``). Returns the output directory; the pipeline is saved under its
    ``model/``. ``plan_only`` prints the objective, the images and the memory of a step,
    and stops."""
    require_diffusers("preftune diffusion train")
    from .diffusion.train import train_diffusion as train_denoiser
    from .train.logging import bars_shown

    with bars_shown(show_progress):
        return train_denoiser(_as(DiffusionConfig, config), resume=resume,
                              show_progress=show_progress, overwrite=overwrite,
                              plan_only=plan_only)


@_as_the_command_takes
def evaluate_diffusion(model: str, reference: str, prompts: Sequence[str], scorer: str, *,
                       seeds: Sequence[int] = (0, 1), steps: int = 25,
                       guidance_scale: float = 1.0, output: str | None = None,
                       resolution: int | None = None, negative_prompt: str = "",
                       true_cfg_scale: float = 1.0, dtype: str = "auto",
                       batch_size: int = 8) -> dict:
    """Win rate of ``model`` (a run dir or a pipeline dir) over ``reference`` under an image
    scorer, same prompts and seeds (``preftune diffusion eval``), sampled at ``resolution``
    pixels per side (default: the denoiser's own size), guided away from ``negative_prompt``
    (Flux: with ``true_cfg_scale``), both pipelines in ``dtype`` ('auto': the policy's saved
    dtype), ``batch_size`` images at a time. Writes eval.json and returns the results."""
    require_diffusers("preftune diffusion eval")
    from .diffusion.evaluate import evaluate_diffusion as win_rate_over_reference

    return win_rate_over_reference(model, reference, list(prompts), list(seeds), scorer, steps,
                                   guidance_scale, output, resolution, negative_prompt,
                                   true_cfg_scale, dtype, batch_size)


SIMPLE_TYPES = {"int": int, "float": (int, float), "bool": bool, "str": str}


def _made(cls, function: str, **given):
    """``cls(**given)`` for the API ``function``: an option it does not take, a value of the
    wrong type or out of range is said in its own name (not the settings class's, or as a
    comparison's TypeError deep inside)."""
    import dataclasses
    import difflib

    fields = {field.name: field for field in dataclasses.fields(cls)}
    for name, value in given.items():
        if name not in fields:
            near = difflib.get_close_matches(name, fields, n=1)
            raise TypeError(f"{function}() takes no option {name!r}"
                            + (f"; did you mean {near[0]!r}?" if near else "")
                            + f" Its options: {', '.join(fields)}.")
        wanted = SIMPLE_TYPES.get(str(fields[name].type))
        if wanted is not None and value is not None and (
                not isinstance(value, wanted) or (wanted is not bool and isinstance(value, bool))):
            kind = str(fields[name].type)
            article = "an" if kind[0] in "aeiou" else "a"
            raise ConfigError(f"{function}(): {name} should be {article} {kind}, got "
                              f"{value!r}.")
    try:
        return cls(**given)
    except ValueError as error:
        raise ConfigError(f"{function}(): {error}") from None
