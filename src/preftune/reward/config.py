"""Typed configuration of ``preftune rm train``: the policy config's sections where they mean the
same thing (data, train, LoRA), plus the head and the reward loss."""

from __future__ import annotations

import dataclasses
from typing import Literal

from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError, model_validator

from ..config import (DataConfig, ModelConfig, NonNegative, RunConfig, Section, TrainConfig,
                      _unknown, check_data_and_train)
from .heads import Head, HeadError
from .losses import get_reward_loss


class HeadSettings(Section):
    """``model.head``: which head and its settings (see ``reward/heads.py``). ``auto`` takes the
    loss's natural head: gpm -> gpm, quantile -> quantile, regression with attributes ->
    attributes, otherwise scalar."""

    kind: Literal["auto", "scalar", "attributes", "quantile", "gpm"] = "auto"
    """The head; auto takes the loss's natural one."""
    attributes: list[str] = []
    """attributes head: the names of the K ratings, e.g. [helpfulness, correctness]."""
    weights: list[float] = []
    """attributes head: w_a of the reward sum (default: 1/K each, their mean)."""
    quantiles: list[float] = list(Head().quantiles)
    """quantile head: the quantile levels it predicts."""
    risk: str = "mean"
    """quantile head: the reward is 'mean' or 'cvar:ALPHA' (mean of the levels <= ALPHA)."""
    dims: int = 4
    """gpm head: 2k, the size of the preference embedding (even)."""
    tau: float = 0.1
    """gpm head: temperature of P(y_i > y_j) = sigmoid(s / tau)."""
    target: str = "score"
    """quantile head: the rating the distribution is fit to."""


class RewardModelConfig(ModelConfig):
    head: HeadSettings = HeadSettings()
    """The head on the backbone's last hidden state."""


class RewardLossConfig(BaseModel):
    """``name`` plus that loss's parameters, e.g. ``{name: bt_margin, margin_field: gap}``."""

    model_config = ConfigDict(extra="allow", use_attribute_docstrings=True)
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
                raise ValueError(_unknown(f"loss.{key}", key, known, f"reward loss {self.name}"))
        try:
            TypeAdapter(spec.params).validate_python(self.model_extra or {})
        except ValidationError as error:
            first = error.errors()[0]
            raise ValueError(f"loss.{'.'.join(map(str, first['loc']))}: {first['msg']} "
                             f"(got {first.get('input')!r})") from None
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
        head = self.head  # validates the head settings
        if head.kind not in spec.heads:
            raise ValueError(f"reward loss {spec.name} fits a {' or '.join(spec.heads)} head, not "
                             f"model.head.kind {head.kind!r}; change one of them (or set "
                             "model.head.kind: auto).")
        check_data_and_train(self.data, self.train)
        return self

    @property
    def head(self) -> Head:
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
