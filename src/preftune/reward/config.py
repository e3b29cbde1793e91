"""Typed configuration of ``preftune rm train``: the policy config's sections where they mean the
same thing (data, train, LoRA), plus the head and the reward loss."""

from __future__ import annotations

import dataclasses
import itertools
from typing import Annotated, Literal, get_type_hints

from pydantic import (Field, TypeAdapter, ValidationError,
                      model_validator)

from ..config import (ConfigError, DataConfig, ModelConfig, NonNegative, Positive, RunConfig,
                      Section, TrainConfig, check_data_and_train)
from ..config_errors import unknown_key
from ..config_model import Term, params_problem, refuse_bools, refuse_unused
from ..data.records import DataError
from ..data.detect import is_rating, rating_columns
from ..data.shapes import is_number
from ..data.rows import csv_text_columns, read_rows
from .heads import Head, HeadError
from .losses import get_reward_loss

DETECT_ROWS = 50  # the rows whose numeric columns are a file's attributes


class HeadSettings(Section):
    """``model.head``: which head and its settings (see ``reward/heads.py``). ``auto`` takes the
    loss's natural head: gpm -> gpm, quantile -> quantile, regression with attributes ->
    attributes, otherwise scalar. Regression with no attribute names reads them from the data
    (``detect_attributes``)."""

    kind: Literal["auto", "scalar", "attributes", "quantile", "gpm"] = "auto"
    """The head; auto takes the loss's natural one."""
    attributes: list[str] = []
    """attributes head: the names of the K ratings, e.g. [helpfulness, correctness]."""
    weights: list[float] = []
    """attributes head: w_a of the reward sum (default: 1/K each, their mean)."""
    quantiles: list[Annotated[float, Field(gt=0, lt=1)]] = list(Head().quantiles)
    """quantile head: the quantile levels it predicts."""
    risk: Annotated[str, Field(pattern=r"^(mean|cvar:.+)$")] = "mean"
    """quantile head: the reward is 'mean' or 'cvar:ALPHA' (the mean of the worst ALPHA share)."""
    dims: Annotated[int, Field(ge=2, multiple_of=2)] = 4
    """gpm head: 2k, the size of the preference embedding (even)."""
    tau: Positive = 0.1
    """gpm head: temperature of P(y_i > y_j) = sigmoid(s / tau)."""
    target: str = "score"
    """quantile head: the rating the distribution is fit to."""


HEAD_SETTINGS = {"attributes": ("attributes", "weights"),
                 "quantile": ("quantiles", "risk", "target"), "gpm": ("dims", "tau")}


class RewardModelConfig(ModelConfig):
    head: HeadSettings = HeadSettings()
    """The head on the backbone's last hidden state."""


class RewardLossConfig(Term):
    """``name`` plus that loss's parameters, e.g. ``{name: bt_margin, margin_field: gap}``."""

    registry = staticmethod(get_reward_loss)
    name: str = "bt"
    """A reward loss (`preftune rm losses`); its parameters sit beside the name."""

    @model_validator(mode="after")
    def _known_params(self):
        try:
            spec = get_reward_loss(self.name)
        except KeyError as error:
            raise ValueError(error.args[0]) from None
        known = {f.name for f in dataclasses.fields(spec.params)}
        for key in self.model_extra or {}:
            if key not in known:
                raise ValueError(unknown_key(f"loss.{key}", key, known, f"reward loss {self.name}",
                                          ("name",)))
        refuse_bools(self.model_extra or {}, get_type_hints(spec.params, include_extras=True),
                     "loss.")
        try:
            TypeAdapter(spec.params).validate_python(self.model_extra or {})
        except ValidationError as error:
            raise ValueError(params_problem(error, "loss", self.name)) from None
        return self

    def params(self):
        return TypeAdapter(get_reward_loss(self.name).params).validate_python(
            self.model_extra or {})


class RewardTrainConfig(TrainConfig):
    learning_rate: NonNegative = 1e-5
    """Peak AdamW learning rate (a fresh head needs more than a policy's 1e-6)."""


class RewardConfig(RunConfig):
    """A ``preftune rm train`` run."""

    output_dir: str = "runs/reward"
    """Where the reward model, metrics and checkpoints are written."""
    model: RewardModelConfig = RewardModelConfig()
    """The backbone and its head."""
    data: DataConfig = DataConfig()
    """Training and held-out data (pairs, lists or rated responses)."""
    loss: RewardLossConfig = RewardLossConfig()
    """The reward loss and its parameters."""
    train: RewardTrainConfig = RewardTrainConfig()
    """Optimizer, schedule, batching, logging and checkpoints."""

    @model_validator(mode="after")
    def _consistent(self):
        spec = get_reward_loss(self.loss.name)
        # an attributes head without names gets them from the data (detect_attributes)
        head = (Head() if self.detects_attributes else self.head)  # validates the head settings
        if head.kind not in spec.heads:
            raise ValueError(f"reward loss {spec.name} fits a {' or '.join(spec.heads)} head, not "
                             f"model.head.kind {head.kind!r}; change one of them (or set "
                             "model.head.kind: auto).")
        kind = "attributes" if self.detects_attributes else head.kind
        for owner, names in HEAD_SETTINGS.items():
            if owner != kind:
                refuse_unused(self.model.head, names, "model.head",
                              f"for a {kind} head (it is for the {owner} head)")
        check_data_and_train(self.data, self.train, self.model.attn_implementation)
        return self

    @property
    def detects_attributes(self) -> bool:
        """Regression with an ``attributes`` head whose names are not given: they are read from
        the data (``detect_attributes``); with ``auto`` only when the data lacks the scalar
        target column."""
        head, target_given = self.model.head, "target" in (self.loss.model_extra or {})
        return (self.loss.name == "regression" and not head.attributes
                and (head.kind == "attributes" or (head.kind == "auto" and not target_given)))

    @property
    def head(self) -> Head:
        """The head as configured (``detect_attributes`` completes it from the data)."""
        settings = self.model.head.model_dump()
        kind = settings.pop("kind")
        if kind == "auto":
            spec = get_reward_loss(self.loss.name)
            kind = ("attributes" if "attributes" in spec.heads and settings["attributes"]
                    else spec.heads[0])
        try:
            return Head(kind=kind, **settings)
        except HeadError as error:
            raise ValueError(str(error)) from None


def build_reward_config(tree: dict, source: str = "the config") -> RewardConfig:
    return RewardConfig.from_dict(tree, source=source)


def load_reward_config(path: str | None, overrides: list[str] = ()) -> RewardConfig:
    """Read a reward-model YAML config and apply ``key=value`` overrides."""
    return RewardConfig.from_yaml(path, overrides)


def detect_attributes(config: RewardConfig) -> tuple[Head, str | None]:
    """The head, with attribute names read from the first training record when regression has
    none configured, and a sentence saying which and why (None when nothing was detected).

    Rated rows give their numeric columns (HelpSteer's helpfulness, correctness, ...); pairs give
    each ``X`` that has numeric ``chosen_X`` and ``rejected_X``. With ``model.head.kind: auto``
    a record that has the scalar target column (``loss.target``, or ``chosen_<target>`` for
    pairs) keeps the scalar head, and so does a ``loss.target`` set in the config.
    """
    if not config.detects_attributes:
        return config.head, None
    fields, target = config.data.fields, config.loss.params().target
    path = config.data.train if isinstance(config.data.train, str) else config.data.train[0]
    # the first rows, whose rating columns are the attributes: a bad value in the first alone
    # ("x") would drop its column for the whole file; the records' own checks name the value
    rows = list(itertools.islice(read_rows(path, csv_text_columns(fields)), DETECT_ROWS))
    origin, row = rows[0] if rows else (path, {})
    if not isinstance(row, dict):
        return config.head, None  # load_records names the bad record
    rated = fields.get("response", "response") in row
    if config.model.head.kind == "auto" and (is_rating(row.get(target)) if rated
                                             else is_number(row.get(f"chosen_{target}"))):
        return config.head, None
    columns = {name: fields.get(name, name) for name in ("prompt", "response")}
    first = [r for _, r in rows if isinstance(r, dict)]
    if rated:
        found, where = [rating_columns(r, columns) for r in first], "numeric columns"
    else:
        found = [[name[len("chosen_"):] for name in r if name.startswith("chosen_")
                  and is_number(r[name]) and is_number(r.get("rejected_" + name[7:]))]
                 for r in first]
        where = "numeric chosen_X/rejected_X columns"
    names = list(dict.fromkeys(name for columns_of_row in found for name in columns_of_row))
    if not names:
        raise DataError(
            f"{origin}: the regression loss needs ratings, but this record has neither the "
            f"column {target!r} (loss.target, for a scalar head) nor other {where}; name the "
            f"rating columns with model.head.attributes.")
    settings = config.model.head.model_dump(exclude={"kind", "attributes"})
    try:
        head = Head(kind="attributes", attributes=tuple(names), **settings)
    except HeadError as error:
        raise ConfigError(f"{error} (the attributes were read from {origin})") from None
    why = "no model.head.attributes given"
    if config.model.head.kind == "auto":
        why += f" and no {target!r} column for a scalar head"
    return head, (f"attributes {', '.join(names)}: the {where} of {origin} and the rows "
                  f"after it, up to {DETECT_ROWS} ({why}; set model.head.attributes to choose "
                  "others)")
