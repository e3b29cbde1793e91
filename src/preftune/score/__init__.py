"""Scorers: turn (prompt, response) into numbers for win rates, data construction and online
rounds. ``load_scorer`` reads the spec a user writes on the command line or in a config:

- ``synthetic``: the demo's program checkers (needs the data they were written with);
- ``module:function``: a Python function ``function(prompt, response) -> float``;
- a name given with ``register_scorer`` or an installed package's ``preftune.scorers`` entry
  point: such a function by name;
- ``rm:DIR`` (or a reward-model directory): a model trained with ``preftune rm train``;
- ``judge:MODEL`` / ``judge-pair:MODEL``: a causal LM as judge, pointwise or pairwise
  (``judge.py``); ``default`` is the bundled SmolLM2;
- ``follow-up:MODEL``: a causal LM's likelihood of positive against negative follow-up
  reactions (FLR, ``follow_up.py``);
- ``FILE.yaml``: a combination of the above (see ``combine.py``), or with a ``render`` mapping
  a text-to-image pipeline that renders each response and an image scorer that judges the
  images (``diffusion/render.py``), or with a ``follow_up`` mapping an FLR scorer with its
  own follow-ups, or with a ``compositional`` mapping a compositional preference model
  (CPM: a judge's ratings of named features, weighted; ``compositional.py``).
"""

from __future__ import annotations

from pathlib import Path

from ..config import ConfigError
from .base import Scorer, prompt_key
from .combine import (CombinedScorer, LogSigmoidCentred, baselines_from_samples,
                      check_combination, combined_from_tree)
from .function import FunctionScorer, SyntheticScorer, is_function_spec, register_scorer

__all__ = ["CombinedScorer", "FunctionScorer", "LogSigmoidCentred", "Scorer", "SyntheticScorer",
           "baselines_from_samples", "check_scorer", "load_scorer", "prompt_key",
           "register_scorer"]


def load_scorer(spec: str, data: str | list[str] | None = None,
                dtype: str = "float32") -> Scorer:
    """The scorer a spec names (see the module docstring). ``data`` is the file (or files)
    whose prompts will be scored (the synthetic scorer reads its checkers from it); ``dtype``:
    the dtype its models (judges, reward models, follow-up likelihood) load in."""
    if not isinstance(spec, str) or not spec.strip():
        raise _unknown(str(spec))
    if spec == "synthetic":
        if data is None:
            raise ConfigError("the synthetic scorer reads its checkers from the data file; "
                              "give the data written by preftune demo / data synthetic.")
        return SyntheticScorer.from_data(data)
    registered = FunctionScorer.registered(spec)
    if registered is not None:
        return registered
    for prefix, pairwise in (("judge:", False), ("judge-pair:", True)):
        if spec.startswith(prefix):
            from .judge import LLMJudge

            try:
                return LLMJudge.from_pretrained(spec[len(prefix):], pairwise=pairwise,
                                                dtype=dtype)
            except (FileNotFoundError, OSError) as error:
                raise ConfigError(f"scorer {spec!r}: {error}") from None
    if spec.startswith("follow-up:"):
        from .follow_up import FollowUpScorer

        try:
            return FollowUpScorer.from_pretrained(spec.removeprefix("follow-up:"), dtype)
        except (FileNotFoundError, OSError) as error:
            raise ConfigError(f"scorer {spec!r}: {error}") from None
    if spec.endswith((".yaml", ".yml")):
        tree = read_scorer_file(spec)
        if isinstance(tree, dict) and "render" in tree:  # responses rendered, images judged
            from ..diffusion.render import RenderScorer

            return RenderScorer.from_file(spec, tree)
        if isinstance(tree, dict) and "follow_up" in tree:
            from .follow_up import follow_up_from_tree

            return follow_up_from_tree(spec, tree, dtype)
        if isinstance(tree, dict) and "compositional" in tree:
            from .compositional import CompositionalScorer

            return CompositionalScorer.from_file(spec, tree, dtype)
        return combined_from_tree(spec, tree, data, lambda term, data: load_scorer(
            term, data, dtype))
    if spec.startswith("rm:") or (Path(spec).exists() and not is_function_spec(spec)):
        from .reward_model import RewardModelScorer

        try:
            return RewardModelScorer.from_pretrained(spec.removeprefix("rm:"), dtype=dtype)
        except FileNotFoundError as error:
            raise ConfigError(f"scorer {spec!r}: {error}") from None
    if is_function_spec(spec):
        return FunctionScorer.from_spec(spec)
    raise _unknown(spec)


def check_scorer(spec: str, data: str | list[str] | None = None,
                 within: tuple[Path, ...] = ()) -> None:
    """Refuse a scorer spec that cannot work, without loading a model: its form, the file or
    directory it names, the function it imports, a combination that names itself (``within``:
    the combination files being checked); what a run checks before any work (a judge's or
    reward model's weights are read when the scorer loads)."""
    if not isinstance(spec, str) or not spec.strip():
        raise _unknown(str(spec))
    if spec == "synthetic":
        load_scorer(spec, data)  # the checkers come from the data file: cheap
    elif spec.startswith(("judge:", "judge-pair:", "follow-up:")):
        prefix, model = spec.split(":", 1)
        if not model.strip():
            raise ConfigError(f"scorer {spec!r}: name the model after {prefix}: (a model "
                              f"directory, default, or policy in an online run).")
        check_local_model(f"scorer {spec!r}", model)
    elif FunctionScorer.registered(spec):
        return
    elif spec.endswith((".yaml", ".yml")):
        tree = read_scorer_file(spec)
        if isinstance(tree, dict) and "follow_up" in tree:
            from .follow_up import follow_up_options

            check_local_model(f"scorer file {spec}: follow_up.model",
                              follow_up_options(spec, tree)[0])
        elif isinstance(tree, dict) and "compositional" in tree:
            from .compositional import compositional_options

            check_local_model(f"scorer file {spec}: compositional.judge",
                              compositional_options(spec, tree)["judge"])
        elif isinstance(tree, dict) and "render" in tree:
            from ..diffusion.render import check_render

            check_render(spec, tree)
        else:  # a combination: each term
            here = Path(spec).resolve()
            if here in within:
                chain = " -> ".join(str(path) for path in (*within, here))
                raise ConfigError(f"scorer file {spec}: a combination that names itself among "
                                  f"its terms ({chain}) would never finish scoring; remove "
                                  "that term.")
            for term in check_combination(spec, tree):
                check_scorer(term, data, (*within, here))
    elif spec.startswith("rm:"):
        if not Path(spec.removeprefix("rm:")).is_dir():
            raise ConfigError(f"scorer {spec!r}: {spec.removeprefix('rm:')} is not a directory "
                              "(a reward model from preftune rm train).")
    elif is_function_spec(spec):
        FunctionScorer.from_spec(spec)
    elif not Path(spec).exists():
        raise _unknown(spec)


def text_only_parts(spec: str) -> list[str]:
    """The parts of scorer ``spec`` that read the prompt as text alone (an LLM judge, a
    follow-up scorer, a compositional judge), the terms of a combination file included: given
    a prompt that shows images, they would rate it without seeing them."""
    if spec.startswith(("judge:", "judge-pair:", "follow-up:")):
        return [spec]
    if not spec.endswith((".yaml", ".yml")) or not Path(spec).is_file():
        return []
    tree = read_scorer_file(spec)
    if isinstance(tree, dict) and ("follow_up" in tree or "compositional" in tree):
        return [spec]
    if isinstance(tree, dict) and "render" in tree:
        return []
    return [part for term in check_combination(spec, tree) for part in text_only_parts(term)]


def check_local_model(what: str, path: str) -> None:
    """A model a scorer names by a local path (not ``policy``, the bundled ``default`` or a Hub
    id) is a model directory, or a ``ConfigError`` saying so after ``what`` (the scorer, or
    the file and key that name the model)."""
    from ..model.load import resolve_model_dir

    if not Path(path).expanduser().exists() and not path.startswith((".", "/", "~")):
        return
    try:
        resolve_model_dir(path, weights=False)
    except FileNotFoundError as error:
        raise ConfigError(f"{what}: {str(error).removeprefix('model.path: ')}") from None


def _unknown(spec: str) -> ConfigError:
    import difflib

    from .function import SCORERS

    close = difflib.get_close_matches(spec, ["synthetic", *SCORERS], n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return ConfigError(f"scorer {spec!r}: expected 'synthetic', 'module:function', a registered "
                       "scorer name, 'rm:DIR' (a reward model from preftune rm train), "
                       "'judge:MODEL' or 'judge-pair:MODEL' (an LLM judge), "
                       "'follow-up:MODEL' (follow-up likelihood) or a .yaml scorer "
                       f"file.{hint}")


def read_scorer_file(path: str):
    """What the scorer file ``path`` holds (its readers name what is wrong with it)."""
    import yaml

    from ..config_tree import load_yaml

    source = Path(path)
    if not source.is_file():
        raise ConfigError(f"scorer file {path} does not exist.")
    try:
        tree = load_yaml(source.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"scorer file {path}: not valid YAML ({error}).") from None
    return tree or {}
