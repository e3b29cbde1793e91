"""Typed run configuration. Unknown keys, wrong types and settings that would do nothing are
errors that name the key and suggest the right one."""

from __future__ import annotations

import dataclasses
import difflib
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import (BaseModel, ConfigDict, Field, ValidationError, field_validator,
                      model_validator)

from .objectives import get_objective
from .objectives.compose import Objective, validate_params


class ConfigError(ValueError):
    """A configuration problem a user can fix; the message names the key."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# numeric ranges, checked when the config is read (before any work)
Count = Annotated[int, Field(ge=1)]  # a size or a number of things: at least 1
Positive = Annotated[float, Field(gt=0, allow_inf_nan=False)]
NonNegative = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Fraction = Annotated[float, Field(ge=0, lt=1, allow_inf_nan=False)]  # a share in [0, 1)


class LoraConfig(Section):
    r: Count = 16
    alpha: Count = 32
    dropout: Fraction = 0.0
    target_modules: list[str] | str = "all-linear"
    save_merged: bool = True  # also write the merged full model next to the adapter


class ModelConfig(Section):
    path: str = "default"  # "default" (SmolLM2-135M-Instruct), a HF model dir, or a .gguf file
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    trust_remote_code: bool = False
    allow_pickle: bool = False  # load pickle weight files (*.bin) when no safetensors exist
    lora: LoraConfig | None = None
    # attention kernel; None = transformers' default (sdpa). "flex_attention" (CUDA) runs the
    # prefix-shared and packed layouts as block-sparse FlexAttention instead of a dense mask
    attn_implementation: Literal["sdpa", "eager", "flex_attention"] | None = None


class DataConfig(Section):
    train: str | list[str] = ""
    eval: str | list[str] | None = None
    eval_fraction: Fraction = 0.0  # split this share off train when no eval file is given
    format: Literal["auto", "standard", "conversational", "implicit"] = "auto"
    fields: dict[str, str] = {}
    shape: Literal["auto", "pairs", "unpaired", "ranked", "rated"] = "auto"
    # turn the data into the shape the objective needs, e.g. ranked lists into pairs
    convert: Literal["pairs:best_vs_worst", "pairs:all_pairs", "pairs:best_vs_each",
                     "unpaired"] | None = None
    curriculum: bool = False  # Curry-DPO: train in order of score gap, easiest first
    # a malformed record: raise (stop with file, line and field) or skip (count it, keep going)
    on_error: Literal["raise", "skip"] = "raise"
    max_length: Count = 1024
    max_prompt_length: Count | None = 512


class ObjectiveConfig(BaseModel):
    """``name`` plus that objective's own parameters, e.g. ``{name: dpo, beta: 0.1}``.

    A parameter may be a schedule ``{start, end, schedule}``; ``weight`` scales the term when
    several objectives are summed (``objective`` given as a list).
    """

    model_config = ConfigDict(extra="allow")
    name: str = "dpo"
    weight: float = 1.0

    @model_validator(mode="after")
    def _known_params(self):
        try:
            spec = get_objective(self.name)
        except KeyError as error:
            raise ValueError(error.args[0]) from None
        known = {f.name for f in dataclasses.fields(spec.params)}
        for key in self.model_extra or {}:
            if key not in known:
                raise ValueError(_unknown(f"objective.{key}", key, known, f"objective {self.name}"))
        validate_params(spec, self.model_extra or {})
        return self


class ReferenceConfig(Section):
    strategy: Literal["auto", "precomputed", "adapter-off", "live", "none"] = "auto"
    cache_dir: str | None = None  # default: <preftune cache>/reference
    # the reference's weights, a path like model.path (same tokenizer); default: model.path, i.e.
    # the model before training. Precomputed only (e.g. online rounds: the initial model)
    model: str | None = None
    # more reference models (MRPO): paths like model.path, same tokenizer; precomputed one by one
    extra_models: list[str] = []


class TrainConfig(Section):
    learning_rate: NonNegative = 1e-6  # 0 trains nothing (the policy_not_moving alarm says so)
    batch_size: Count = 8  # examples per micro-batch
    gradient_accumulation_steps: Count = 1
    epochs: Positive = 1.0
    max_steps: Count | None = None  # optimizer steps; overrides epochs
    warmup_ratio: Fraction = 0.1
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    weight_decay: NonNegative = 0.0
    max_grad_norm: Positive | None = 1.0
    seed: int = 42
    log_every: Count = 1
    eval_every: Count | None = None
    save_every: Count | None = None
    keep_checkpoints: Count = 2
    logps_chunk_tokens: Count = 256
    example_weight_field: str | None = None  # numeric record field that scales each example
    gradient_checkpointing: bool = False  # recompute layer activations in backward: less memory
    # AdamW applied to each weight as soon as its gradient is complete, which frees it at once:
    # no full set of gradients in memory. Needs gradient_accumulation_steps 1, max_grad_norm null.
    optimizer_in_backward: bool = False
    # how examples become rows: auto picks prefix sharing when prompts are long (see data.layout)
    layout: Literal["auto", "padded", "prefix_shared", "packed", "packed_prefix_shared"] = "auto"
    max_row_tokens: Count | None = None  # packed layouts: tokens per row (default: data.max_length)
    # torch.compile each decoder layer ("reduce-overhead" adds CUDA graphs on a GPU); row widths
    # are then rounded up to pad_to_multiple_of (default 64; 128 under flex_attention)
    compile: bool = False
    compile_mode: Literal["default", "reduce-overhead", "max-autotune"] = "default"
    pad_to_multiple_of: Count | None = None
    # experiment trackers that get every metrics.jsonl record and the config (extras to install)
    report_to: list[Literal["tensorboard", "mlflow", "wandb"]] = []
    tracking_dir: str | None = None  # where offline trackers write; default: output_dir/tracking
    run_name: str | None = None  # the run's name in the trackers; default: output_dir's name

    @field_validator("report_to", mode="before")
    @classmethod
    def _one_or_many_trackers(cls, value):
        return [value] if isinstance(value, str) else value

    @field_validator("report_to")
    @classmethod
    def _trackers_installed(cls, value):
        from .train.tracking import check_installed

        check_installed(value)
        return value


class Config(Section):
    output_dir: str = "runs/preftune"
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    objective: list[ObjectiveConfig] = [ObjectiveConfig()]  # one term, or a weighted sum
    reference: ReferenceConfig = ReferenceConfig()
    train: TrainConfig = TrainConfig()

    @field_validator("objective", mode="before")
    @classmethod
    def _one_or_many(cls, value):
        return [value] if isinstance(value, dict) else value

    @model_validator(mode="after")
    def _no_silent_settings(self):
        """Refuse combinations where a setting would silently do nothing."""
        names = [term.name for term in self.objective]
        objective = Objective.from_config(self.objective, total_steps=1)
        needs_reference = objective.needs_reference
        if len(names) == 1 and self.objective[0].weight != 1.0:
            raise ValueError("objective.weight only matters when objective is a list of terms.")
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
        if objective.extra_references and not self.reference.extra_models:
            raise ValueError(f"{objective.name} combines several reference models; list them in "
                             "reference.extra_models (paths or 'default', same tokenizer).")
        if self.reference.extra_models and not objective.extra_references:
            raise ValueError(f"reference.extra_models does nothing for {objective.name}; remove "
                             "it or use an objective with several references (mrpo).")
        if self.reference.model is not None and self.reference_strategy != "precomputed":
            raise ValueError(f"reference.model is read by the precomputed reference only, but "
                             f"the reference here is {self.reference_strategy!r}; remove it or "
                             "set reference.strategy: precomputed.")
        if objective.reference_distributions and strategy == "precomputed":
            raise ValueError(f"{objective.name} needs the reference's full next-token "
                             "distributions, which are not precomputed; use reference.strategy "
                             "'live' or 'adapter-off' (or leave it 'auto').")
        check_data_and_train(self.data, self.train)
        return self

    @property
    def reference_strategy(self) -> str:
        if self.reference.strategy != "auto":
            return self.reference.strategy
        objective = Objective.from_config(self.objective, total_steps=1)
        if not objective.needs_reference:
            return "none"
        if objective.reference_distributions:  # full distributions: a model must be at hand
            return "adapter-off" if self.model.lora is not None else "live"
        return "precomputed"


def check_data_and_train(data: DataConfig, train: TrainConfig) -> None:
    """The checks every trainer's ``data`` and ``train`` sections need (policy or reward model):
    settings that would do nothing or cannot work together."""
    if train.optimizer_in_backward and (train.gradient_accumulation_steps != 1
                                        or train.max_grad_norm is not None):
        raise ValueError("train.optimizer_in_backward updates each weight during backward, so it "
                         "cannot accumulate gradients or clip by their global norm: set "
                         "train.gradient_accumulation_steps: 1 and train.max_grad_norm: null.")
    has_eval = data.eval is not None or data.eval_fraction > 0
    if train.eval_every and not has_eval:
        raise ValueError("train.eval_every does nothing without data.eval or data.eval_fraction.")
    if data.eval is not None and data.eval_fraction > 0:
        raise ValueError("set data.eval or data.eval_fraction, not both.")
    if train.max_row_tokens is not None and not train.layout.startswith("packed"):
        raise ValueError("train.max_row_tokens only applies to packed layouts; set train.layout "
                         "to 'packed' or 'packed_prefix_shared', or remove it.")
    limit = data.max_prompt_length
    if limit is not None and limit >= data.max_length:
        raise ValueError(f"data.max_prompt_length ({limit}) must be below data.max_length "
                         f"({data.max_length}) or responses would be cut to nothing.")


def _unknown(path: str, key: str, known, where: str) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    hint = f" Did you mean {path.rsplit('.', 1)[0] + '.' if '.' in path else ''}{close[0]}?" if close else ""
    return f"unknown key {path!r} in {where}.{hint} Known keys: {', '.join(sorted(known))}."


def _describe(error: dict, model: type[BaseModel]) -> str:
    location = ".".join(str(part) for part in error["loc"] if not isinstance(part, int))
    if error["type"] == "extra_forbidden":
        section = model
        for part in error["loc"][:-1]:
            annotation = section.model_fields[str(part)].annotation
            section = next((a for a in getattr(annotation, "__args__", (annotation,))
                            if isinstance(a, type) and issubclass(a, BaseModel)), section)
        return _unknown(location, str(error["loc"][-1]), section.model_fields, "the config")
    if error["type"] == "value_error":
        return error["msg"].removeprefix("Value error, ")
    return f"{location}: {error['msg']} (got {error.get('input')!r})"


def set_dotted(tree: dict, dotted: str, raw_value: str) -> None:
    """Apply one ``--set a.b.c=value`` override; the value is parsed as YAML."""
    *parents, leaf = dotted.split(".")
    try:
        value = yaml.safe_load(raw_value)
    except yaml.YAMLError as error:
        problem = getattr(error, "problem", None) or "not valid YAML"
        raise ConfigError(f"--set {dotted}={raw_value}: the value is not valid YAML ({problem}); "
                          "quote text that holds brackets or colons, e.g. --set "
                          f"'{dotted}=\"{raw_value}\"'") from None
    node, where = tree, []
    for part in parents:
        if isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]  # e.g. objective.1.weight for a list of objectives
        elif isinstance(node, dict):
            node = node.setdefault(part, {})
        else:
            raise ConfigError(f"--set {dotted}: {'.'.join(where)} is a value ({node!r}), not a "
                              f"section, so it has no key {part!r}")
        where.append(part)
    if isinstance(node, list):
        if not (leaf.isdigit() and int(leaf) < len(node)):
            raise ConfigError(f"--set {dotted}: {leaf!r} is not an index of that list")
        node[int(leaf)] = value
    elif isinstance(node, dict):
        node[leaf] = value
    else:
        raise ConfigError(f"--set {dotted}: {'.'.join(where)} is a value ({node!r}), not a "
                          f"section, so it has no key {leaf!r}")


def build_config(tree: dict, source: str = "the config", schema: type[BaseModel] | None = None):
    """``tree`` validated as ``schema`` (default: ``Config``, a policy run); every problem is
    described by its key in one ``ConfigError``."""
    schema = schema or Config
    try:
        return schema.model_validate(tree)
    except ValidationError as error:
        problems = "\n  ".join(_describe(e, schema) for e in error.errors())
        raise ConfigError(f"invalid configuration in {source}:\n  {problems}") from None


def load_config(path: str | None, overrides: list[str] = ()) -> Config:
    """Read a YAML config file and apply ``key=value`` overrides."""
    return build_config(read_tree(path, overrides), path or "the config")


def read_tree(path: str | None, overrides: list[str] = ()) -> dict:
    """A YAML config file as a dict, with ``key=value`` overrides applied."""
    tree: dict = {}
    if path is not None:
        file = Path(path)
        if not file.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            tree = yaml.safe_load(file.read_text()) or {}
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(error, "problem", None) or str(error).splitlines()[0]
            if "python/" in str(error) or "constructor" in problem:
                problem += " (tags that would build Python objects are refused: a config is data)"
            raise ConfigError(f"{path}: not a valid YAML config{where}: {problem}; nothing was "
                              "run") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. train.learning_rate=1e-6")
        key, value = item.split("=", 1)
        set_dotted(tree, key.strip(), value)
    return tree
