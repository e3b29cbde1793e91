"""Typed run configuration. Unknown keys, wrong types and settings that would do nothing are
errors that name the key and suggest the right one."""

from __future__ import annotations

import copy
import dataclasses
import difflib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (BaseModel, Field, ValidationError, field_validator,
                      model_validator)

from .config_model import (Count, Fraction, LoraConfig, ModelConfig, NonNegative,  # noqa: F401
                           Positive, Section, Share, Term)
from .config_train import PolicyTrainConfig, TrainConfig  # noqa: F401
from .config_errors import problems, unknown_key
from .config_tree import ConfigError, apply_overrides, read_tree
from .data.convert import CONVERSIONS
from .data.messages import misspelt_role
from .data.tools import MASK_ROLES
from .objectives import get_objective
from .objectives.compose import Objective, numeric_schedule, validate_params


Conversion = Literal[CONVERSIONS]  # data.convert names


def as_list(overrides) -> list[str]:
    """``key=value`` overrides as a list (one given as a bare string is one override, not a
    sequence of characters)."""
    return [overrides] if isinstance(overrides, str) else list(overrides)


class RunConfig(Section):
    """A whole run's configuration, read with the command line's checks and error messages."""

    @classmethod
    def from_yaml(cls, path: str | Path | None, overrides: Sequence[str] = ()):
        """The YAML file ``path`` (None: start empty) with ``key=value`` overrides applied."""
        source = str(path) if path is not None else None
        return build_config(read_tree(source, as_list(overrides)), source or "the config", cls)

    @classmethod
    def from_dict(cls, tree: dict, overrides: Sequence[str] = (), source: str = "the config"):
        """A config from nested dicts as in the YAML file (``tree`` is not modified); a path
        value may be a ``pathlib.Path``."""
        if not isinstance(tree, dict):
            raise ConfigError(f"{cls.__name__}.from_dict: expected a dict shaped like the YAML "
                              f"file (sections such as model, data, train), got "
                              f"{type(tree).__name__}.")
        tree = path_text(copy.deepcopy(tree))
        apply_overrides(tree, as_list(overrides))
        return build_config(tree, source, cls)


def path_text(node):
    """``node`` with every ``os.PathLike`` in it (at any depth of dicts, lists and tuples) as
    its string: paths given as ``pathlib.Path`` read as the strings a YAML file gives."""
    if isinstance(node, dict):
        return {key: path_text(value) for key, value in node.items()}
    if isinstance(node, (list, tuple)):
        return type(node)(path_text(value) for value in node)
    return os.fspath(node) if isinstance(node, os.PathLike) else node


class DataConfig(Section):
    train: str | list[str] = ""
    """Training data: JSONL, JSON, Parquet, CSV or a saved HF dataset (dir or dir:split); a list
    reads several."""
    eval: str | list[str] | None = None
    """Held-out data, same formats as train."""
    eval_fraction: Fraction = 0.0
    """Split this share off train when no eval file is given."""
    format: Literal["auto", "standard", "conversational", "implicit"] = "auto"
    """Text fields: strings, message lists, or whole dialogues with an implicit prompt."""
    fields: dict[str, str] = {}
    """Rename columns, e.g. {prompt: question, chosen: good}."""
    shape: Literal["auto", "pairs", "unpaired", "ranked", "rated"] = "auto"
    """Record shape; auto detects it from the fields."""
    convert: Conversion | list[Conversion] | None = None
    """Turn the data into the shape the objective needs (ranked lists into pairs:
    pairs:best_vs_worst, pairs:all_pairs, pairs:best_vs_each; pairs into unpaired), or make
    vision pairs: images:corrupt[:crop|mask|noise|blur] (mDPO negative images),
    images:mia_sequence, images:mia_grid, images:mia_pip (MIA-DPO), pairs:povid (POVID rejected
    answers). A list is applied in order; the run seed fixes their randomness."""
    curriculum: bool = False
    """Curry-DPO: train in order of score gap, easiest first."""

    @field_validator("convert", mode="before")
    @classmethod
    def _known_conversions(cls, value):
        """A conversion that is not one is named, with the closest one."""
        for name in [value] if isinstance(value, str) else value or []:
            if isinstance(name, str) and name not in CONVERSIONS:
                close = difflib.get_close_matches(name, CONVERSIONS, n=1)
                hint = f" Did you mean {close[0]}?" if close else ""
                raise ValueError(f"data.convert: unknown conversion {name!r}.{hint} Known: "
                                 f"{', '.join(CONVERSIONS)}.")
        return value
    on_error: Literal["raise", "skip"] = "raise"
    """A malformed record: raise (stop with file, line and field) or skip (count it, go on)."""
    max_length: Annotated[int, Field(ge=2)] = 1024
    """Tokens of the prompt plus one response (at least 2: one of each); longer ones keep the
    prompt's end and the response's start."""
    max_prompt_length: Count | None = 512
    """Tokens of the prompt alone (its end is kept); null: only max_length applies. Unset, it
    is 512, or half of max_length when max_length is 512 or less."""
    mask_roles: list[str] = list(MASK_ROLES)
    """Inside a multi-turn response, messages of these roles (tool results) are context: their
    tokens stay in the sequence but are left out of log-probs and the loss. []: score every
    token of a response."""

    @field_validator("mask_roles")
    @classmethod
    def _roles_as_written_in_messages(cls, roles):
        """A misspelt role (``tools``) would mask nothing, silently."""
        for role in roles:
            near = misspelt_role(role)
            if near:
                raise ValueError(f"data.mask_roles: {role!r} is no role chat messages have; did "
                                 f"you mean {near!r}? (the default: {', '.join(MASK_ROLES)})")
        return roles

    @model_validator(mode="before")
    @classmethod
    def _prompt_limit_fits(cls, tree):
        """A lowered max_length brings the unset prompt limit down with it (to half)."""
        if isinstance(tree, dict) and "max_prompt_length" not in tree:
            length = tree.get("max_length")
            if isinstance(length, int) and not isinstance(length, bool) and 2 <= length <= 512:
                tree = {**tree, "max_prompt_length": length // 2}
        return tree


class ObjectiveConfig(Term):
    """``name`` plus that objective's own parameters, e.g. ``{name: dpo, beta: 0.1}``.

    A parameter may be a schedule ``{start, end, schedule}``; ``weight`` scales the term when
    several objectives are summed (``objective`` given as a list).
    """

    registry = staticmethod(get_objective)
    name: str = "dpo"
    """A registered objective (`preftune objectives`), or module:function of one registered in
    your code; its parameters sit beside the name."""
    weight: float = Field(1.0, json_schema_extra={"exclusiveMinimum": 0})
    """Scale of this term when objective is a list (a weighted sum)."""

    @model_validator(mode="after")
    def _known_params(self):
        try:
            spec = get_objective(self.name)
        except KeyError as error:
            raise ValueError(error.args[0]) from None
        known = {f.name for f in dataclasses.fields(spec.params)}
        for key in self.model_extra or {}:
            if key not in known:
                raise ValueError(unknown_key(f"objective.{key}", key, known,
                                          f"objective {self.name}", ("name", "weight")))
        extra = self.model_extra or {}
        for key, value in extra.items():  # (a schedule's ends as numbers, as a value's are)
            if isinstance(value, dict):
                extra[key] = numeric_schedule(key, value)
        validate_params(spec, extra)
        return self


class ReferenceConfig(Section):
    strategy: Literal["auto", "precomputed", "adapter-off", "live", "none"] = "auto"
    """How reference log-probs are had: auto picks none for a reference-free objective, live
    with reference.sync_every (TR-DPO), for an objective that reads the reference's full
    next-token distributions adapter-off with LoRA (else live), and precomputed otherwise."""
    cache_dir: str | None = None
    """Where precomputed reference log-probs are cached; default: <preftune cache>/reference."""
    model: str | None = None
    """The reference's weights, a path like model.path (same tokenizer); default: model.path,
    i.e. the model before training. Precomputed only (e.g. online rounds: the initial model)."""
    extra_models: list[str] = []
    """More reference models (MRPO): paths like model.path, same tokenizer; precomputed one by
    one."""
    sync_every: Count | None = None
    """TR-DPO: every this many optimizer steps the reference moves toward the policy,
    ref <- mix * policy + (1 - mix) * ref (a live reference; null: it never moves)."""
    sync_mix: Share | None = None
    """The policy's share in each reference sync (default 0.6; 1: the reference becomes the
    policy, TR-DPO's hard update). Needs sync_every."""

    @model_validator(mode="after")
    def _mix_needs_every(self):
        if self.sync_mix is not None and self.sync_every is None:
            raise ValueError("reference.sync_mix does nothing without reference.sync_every "
                             "(how often the reference moves); set it, or remove sync_mix.")
        return self


class Config(RunConfig):
    """A ``preftune train`` run (also the base of ``preftune online``'s config)."""

    output_dir: str = "runs/preftune"
    """Where the model, metrics, checkpoints and run record are written."""
    model: ModelConfig = ModelConfig()
    """The policy model to train."""
    data: DataConfig = DataConfig()
    """Training and held-out data."""
    objective: list[ObjectiveConfig] = [ObjectiveConfig()]
    """One objective {name, params...}, or a list of them summed with their weights."""
    reference: ReferenceConfig = ReferenceConfig()
    """The reference policy of reference-normalised objectives."""
    train: PolicyTrainConfig = PolicyTrainConfig()
    """Optimizer, schedule, batching, logging, checkpoints and what evaluations generate."""

    @field_validator("objective", mode="before")
    @classmethod
    def _one_or_many(cls, value):
        """One term (``{name: dpo, beta: 0.1}``, or just its name) or a list of them."""
        if isinstance(value, str):
            value = {"name": value}
        if isinstance(value, list) and not value:
            raise ValueError("objective is an empty list; give one term ({name: dpo}) or several.")
        return [value] if isinstance(value, dict) else value

    @model_validator(mode="after")
    def _no_silent_settings(self):
        """Refuse combinations where a setting would silently do nothing."""
        names = [term.name for term in self.objective]
        objective = Objective.from_config(self.objective, total_steps=1)
        needs_reference = objective.needs_reference
        if len(names) == 1 and self.objective[0].weight != 1.0:
            raise ValueError("objective.weight only matters when objective lists several terms "
                             "(a weighted sum); one term's weight stays 1: remove it.")
        twice = sorted({name for name in names if names.count(name) > 1})
        if twice:
            raise ValueError(f"objective {twice[0]} appears twice in the list; give each "
                             "objective once (its loss is logged as loss/<name>).")
        if any(term.weight <= 0 for term in self.objective):
            raise ValueError("objective weights must be above 0 (a term of weight 0 does "
                             "nothing: remove it).")
        if self.data.curriculum and objective.data != "pairs":
            raise ValueError(f"data.curriculum orders pairs by their score gap; {objective.name} "
                             f"trains on {objective.data} data. Remove it.")
        strategy = self.reference.strategy
        if not needs_reference and strategy not in ("auto", "none"):
            raise ValueError(
                f"reference.strategy={strategy!r} does nothing: {' + '.join(names)} is "
                "reference-free. Remove reference.strategy (or use 'none')."
            )
        if needs_reference and strategy == "none":
            raise ValueError(f"{' + '.join(names)} needs a reference; "
                             "use reference.strategy 'precomputed', 'live' or 'adapter-off'.")
        if strategy == "adapter-off" and self.model.lora is None:
            raise ValueError("reference.strategy='adapter-off' needs model.lora to be set.")
        if strategy == "adapter-off" and self.model.lora.init != "default":
            raise ValueError(f"reference.strategy='adapter-off' is the base without adapters, "
                             f"but model.lora.init: {self.model.lora.init} takes the adapters' "
                             "part out of the base: use 'precomputed' or 'live'.")
        if objective.extra_references and not self.reference.extra_models:
            raise ValueError(f"{objective.name} combines several reference models; list them in "
                             "reference.extra_models (paths or 'default', same tokenizer).")
        if self.reference.extra_models and not objective.extra_references:
            raise ValueError(f"reference.extra_models does nothing for {objective.name}; remove "
                             "it or use an objective with several references (mrpo).")
        for term in objective.terms:  # how many its parameters read (mrpo's weights)
            need = term.spec.extra_references
            wanted = need(term.params_at(0, 1)) if callable(need) else need
            if not isinstance(wanted, bool) and wanted != len(self.reference.extra_models):
                raise ValueError(f"{term.spec.name}'s parameters weigh the main reference and "
                                 f"{wanted} more, and reference.extra_models lists "
                                 f"{len(self.reference.extra_models)}; give one weight per "
                                 "reference, the main one first.")
        if self.reference.model is not None and self.reference_strategy not in ("precomputed",
                                                                                "live"):
            raise ValueError(f"reference.model is read by the precomputed and live references, "
                             f"but the reference here is {self.reference_strategy!r} (the "
                             "policy's own base); remove it or set reference.strategy: "
                             "precomputed or live.")
        self._check_reference_sync(needs_reference, names)
        if objective.reference_distributions and strategy == "precomputed":
            raise ValueError(f"{objective.name} needs the reference's full next-token "
                             "distributions, which are not precomputed; use reference.strategy "
                             "'live' or 'adapter-off' (or leave it 'auto').")
        check_data_and_train(self.data, self.train, self.model.attn_implementation)
        return self

    def _check_reference_sync(self, needs_reference: bool, names: list[str]) -> None:
        """reference.sync_every / sync_mix (TR-DPO): a reference in memory that can move."""
        sync = self.reference
        if sync.sync_every is None:
            return
        if not needs_reference:
            raise ValueError(f"reference.sync_every does nothing: {' + '.join(names)} is "
                             "reference-free. Remove it.")
        if sync.strategy not in ("auto", "live"):
            raise ValueError(f"reference.sync_every moves a reference held in memory, but "
                             f"reference.strategy is {sync.strategy!r}; set it to 'live' (or "
                             "leave it 'auto').")
        if self.model.quantize:
            raise ValueError("reference.sync_every mixes the policy's weights into the "
                             "reference's, which a 4-bit base (model.quantize) does not have "
                             "in full; remove one of the two.")

    @property
    def reference_strategy(self) -> str:
        if self.reference.strategy != "auto":
            return self.reference.strategy
        if self.reference.sync_every is not None:
            return "live"
        objective = Objective.from_config(self.objective, total_steps=1)
        if not objective.needs_reference:
            return "none"
        if objective.reference_distributions:  # full distributions: a model must be at hand
            lora = self.model.lora  # (adapters off show the policy's base, not reference.model)
            return "adapter-off" if lora is not None and lora.init == "default" \
                and self.reference.model is None else "live"
        return "precomputed"


def check_data_and_train(data: DataConfig, train: TrainConfig,
                         attn_implementation: str | None = None) -> None:
    """The checks every trainer's ``data`` and ``train`` sections need (policy or reward model):
    settings that would do nothing or cannot work together."""
    if attn_implementation == "varlen" and "prefix_shared" in train.layout:
        raise ValueError(f"model.attn_implementation 'varlen' runs padded and packed rows; "
                         f"train.layout {train.layout!r} shares prompts, which needs a mask: "
                         "use layout packed (or auto), or flex_attention / sdpa.")
    if train.optimizer_in_backward and (train.gradient_accumulation_steps != 1
                                        or train.max_grad_norm is not None):
        raise ValueError("train.optimizer_in_backward updates each weight during backward, so it "
                         "cannot accumulate gradients or clip by their global norm: set "
                         "train.gradient_accumulation_steps: 1 and train.max_grad_norm: null.")
    has_eval = data.eval is not None or data.eval_fraction > 0
    if train.eval_every and not has_eval:
        raise ValueError("train.eval_every does nothing without data.eval or data.eval_fraction: "
                         "add held-out data, or turn it off (--set train.eval_every=null).")
    if data.eval is not None and data.eval_fraction > 0:
        raise ValueError("set data.eval or data.eval_fraction, not both (data.eval_fraction: "
                         "0 turns the split off, e.g. --set data.eval_fraction=0).")
    if train.max_row_tokens is not None and not train.layout.startswith("packed"):
        raise ValueError("train.max_row_tokens only applies to packed layouts; set train.layout "
                         "to 'packed' or 'packed_prefix_shared', or remove it.")
    limit = data.max_prompt_length
    if limit is not None and limit >= data.max_length:
        raise ValueError(f"data.max_prompt_length ({limit}) must be below data.max_length "
                         f"({data.max_length}) or responses would be cut to nothing; lower it "
                         f"too, e.g. --set data.max_prompt_length={max(1, data.max_length // 2)}.")


def build_config(tree: dict, source: str = "the config", schema: type[BaseModel] | None = None):
    """``tree`` validated as ``schema`` (default: ``Config``, a policy run); every problem is
    described by its key in one ``ConfigError``."""
    schema = schema or Config
    try:
        return schema.model_validate(tree)
    except ValidationError as error:
        lines = "\n  ".join(problems(error.errors(), schema, tree))
        raise ConfigError(f"invalid configuration in {source}:\n  {lines}") from None


def prompt_limit(max_length: int, max_prompt_length: int | None) -> int:
    """The prompt limit of the command-line flags, by the config's rule: unset, 512, or half
    of ``max_length`` when that is 512 or less; below ``max_length`` in any case."""
    if max_length < 2:
        raise ConfigError(f"--max-length {max_length}: at least 2 (a prompt token and a "
                          "response token).")
    limit = max_prompt_length if max_prompt_length is not None else (
        max_length // 2 if max_length <= 512 else 512)
    if limit >= max_length:
        raise ConfigError(f"--max-prompt-length ({limit}) must be below --max-length "
                          f"({max_length}) or responses would be cut to nothing; lower it, e.g. "
                          f"--max-prompt-length {max(1, max_length // 2)}.")
    return limit


def load_config(path: str | None, overrides: Sequence[str] = ()) -> Config:
    """Read a YAML config file and apply ``key=value`` overrides (``Config.from_yaml``)."""
    return Config.from_yaml(path, overrides)
