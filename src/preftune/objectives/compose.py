"""What the loop trains on: one objective or a weighted sum of several, with parameters that
may follow a schedule over steps, and optional per-example weights from the data.

Config forms this reads (values of ``objective`` in YAML):
    {name: dpo, beta: 0.1}
    [{name: dpo, beta: 0.1}, {name: sft, weight: 0.2}]            # DPO + 0.2 x SFT
    {name: dpo, beta: {start: 0.05, end: 0.5, schedule: linear}}  # beta ramps over the run
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import get_type_hints

from pydantic import TypeAdapter, ValidationError

from ..config_model import params_problem, refuse_bools
from .registry import (REGISTRY, ObjectiveInputs, ObjectiveOutput, ObjectiveSpec,
                       get_objective)

SCHEDULES = ("linear", "cosine", "constant")
SCHEDULE_KEYS = {"start", "end", "schedule"}


def scheduled_value(spec: dict, step: int, total_steps: int) -> float:
    """Value of ``{start, end, schedule}`` at ``step`` (0-based) of ``total_steps``."""
    kind = spec.get("schedule", "linear")
    progress = min(1.0, step / max(1, total_steps - 1))
    if kind == "constant":
        return spec["start"]
    if kind == "cosine":
        progress = 0.5 * (1.0 - math.cos(math.pi * progress))
    return spec["start"] + (spec["end"] - spec["start"]) * progress


def numeric_schedule(key: str, schedule: dict) -> dict:
    """``schedule`` with its start and end as numbers (YAML reads ``1e-2`` as text); one that
    is no number is a ValueError naming the key."""
    numbers = dict(schedule)
    for end in ("start", "end"):
        if end not in numbers:
            continue  # (validate_params says what a schedule needs)
        value = numbers[end]
        if isinstance(value, bool):
            continue  # (refused by validate_params, which says why YAML wrote one)
        try:
            if not isinstance(value, (int, float, str)):
                raise ValueError
            numbers[end] = float(value)
        except ValueError:
            raise ValueError(f"objective.{key}.{end}: {value!r} is not a number") from None
    return numbers


def number_params(params: type) -> set[str]:
    """The parameters that are real numbers: the ones a schedule may move."""
    properties = TypeAdapter(params).json_schema().get("properties", {})
    return {key for key, value in properties.items() if value.get("type") == "number"}


def validate_params(spec: ObjectiveSpec, raw: dict) -> None:
    """Type-check raw params (both ends of any schedule, and every 1% of the run between them
    when several move: a rule between two parameters can break on the way); raises ValueError
    naming the key."""
    numbers = None
    once = {f.name for f in fields(spec.params) if f.metadata.get("read_once")}
    for key, value in raw.items():
        if isinstance(value, dict):
            numbers = number_params(spec.params) if numbers is None else numbers
            if key not in numbers:
                raise ValueError(f"objective.{key}: only a number parameter can follow a "
                                 f"schedule, and {spec.name}'s {key} is not one; give one value.")
            if key in once:
                raise ValueError(f"objective.{key}: {spec.name} reads it once, before training, "
                                 "so it cannot follow a schedule; give one value.")
            unknown = set(value) - SCHEDULE_KEYS
            if unknown or not {"start", "end"} <= set(value):
                raise ValueError(f"objective.{key}: a schedule needs start and end (and optionally "
                                 f"schedule: {'/'.join(SCHEDULES)}); got keys {sorted(value)}")
            if value.get("schedule", "linear") not in SCHEDULES:
                raise ValueError(f"objective.{key}.schedule must be one of {SCHEDULES}")
    scheduled = [key for key, value in raw.items() if isinstance(value, dict)]
    adapter = TypeAdapter(spec.params)
    for end in ("start", "end"):
        values = {k: v[end] if isinstance(v, dict) else v for k, v in raw.items()}
        refuse_bools(values, get_type_hints(spec.params, include_extras=True), "objective.")
        try:
            adapter.validate_python(values)
        except ValidationError as error:
            raise ValueError(params_problem(error, "objective", spec.name, scheduled, end)
                             ) from None
    for percent in range(1, 100) if len(scheduled) > 1 else ():
        values = {k: scheduled_value(v, percent, 101) if isinstance(v, dict) else v
                  for k, v in raw.items()}
        try:
            adapter.validate_python(values)
        except ValidationError as error:
            raise ValueError(f"{params_problem(error, 'objective', spec.name)} {percent}% of "
                             f"the way through the run, where the schedules of "
                             f"{' and '.join(scheduled)} have moved apart; give schedules that "
                             "keep it all along.") from None


@dataclass
class Term:
    spec: ObjectiveSpec
    raw_params: dict
    weight: float
    state: object = None  # the spec's declared state, made by Objective

    def __post_init__(self):
        self._adapter = TypeAdapter(self.spec.params)
        scheduled = any(isinstance(v, dict) for v in self.raw_params.values())
        self._fixed = None if scheduled else self._adapter.validate_python(self.raw_params)

    def params_at(self, step: int, total_steps: int):
        if self._fixed is not None:  # the common case: no schedule, validate once
            return self._fixed
        values = {k: scheduled_value(v, step, total_steps) if isinstance(v, dict) else v
                  for k, v in self.raw_params.items()}
        return self._adapter.validate_python(values)


def _need(need, params):
    """A need declared as a value, or as a function of the term's parameters."""
    return need(params) if callable(need) else need


def _wants(need, params) -> bool:
    return bool(_need(need, params))


class Objective:
    """A weighted sum of registered objectives, presented to the loop as one objective.

    Its needs are the union of its terms' needs; the implied rewards (and so the logged
    rewards, margins and accuracies) are those of the first term. Terms that keep a state
    across steps (``ObjectiveSpec.state``) get theirs made from ``examples``, the training
    data (none when it is made while training); ``state_dict`` holds them all.
    """

    def __init__(self, terms: list[Term], total_steps: int, example_weight_field: str | None,
                 examples=()):
        shapes = {term.spec.data for term in terms}
        if len(shapes) > 1:
            raise ValueError(f"objectives {[t.spec.name for t in terms]} need different data "
                             f"shapes {sorted(shapes)}; combine objectives of one shape")
        self.terms = terms
        self.total_steps = total_steps
        self.example_weight_field = example_weight_field
        self.needs_reference = any(t.spec.needs_reference for t in terms)
        self.per_token = any(t.spec.per_token for t in terms)
        self.kl_completions = any(t.spec.kl_completions for t in terms)
        self.image_negatives = any(t.spec.image_negatives for t in terms)
        self.gold = any(t.spec.gold for t in terms)
        self.reference_distributions = any(t.spec.reference_distributions for t in terms)
        self.policy_collisions = any(_wants(t.spec.policy_collisions, t.params_at(0, 1))
                                     for t in terms)
        self.extra_references = any(t.spec.extra_references for t in terms)
        # terms whose loss reads the micro-batch as a whole (its step depends on the split):
        # name -> True, or "gathered" where processes do not split it
        self.whole_batch = {t.spec.name: need for t in terms
                            if (need := _need(t.spec.whole_batch, t.params_at(0, 1)))}
        self.data = shapes.pop()
        for term in terms:
            term.state = term.spec.state(examples) if term.spec.state is not None else None
        self.name = " + ".join(
            t.spec.name if t.weight == 1 and i == 0 else f"{t.weight:g}*{t.spec.name}"
            for i, t in enumerate(terms))

    @classmethod
    def from_config(cls, objective_config, total_steps: int, example_weight_field=None,
                    examples=()):
        terms = [Term(get_objective(item.name), dict(item.model_extra or {}), item.weight)
                 for item in objective_config]
        return cls(terms, total_steps, example_weight_field, examples)

    @property
    def has_state(self) -> bool:
        return any(term.state is not None for term in self.terms)

    def split_by(self, micro_batches: bool, processes: bool) -> list[str]:
        """The terms whose step changes when it is split into more (or other) micro-batches,
        or over other processes: a loss over the micro-batch as a whole (a "gathered"
        statistic takes in every process), a state updated on each micro-batch."""
        names = [name for name, need in self.whole_batch.items()
                 if micro_batches or (processes and need != "gathered")]
        return names + [t.spec.name for t in self.terms
                        if t.spec.state is not None and micro_batches]

    @classmethod
    def split_by_config(cls, config, micro_batches: bool, processes: bool) -> list[str]:
        """``split_by`` of a run config's objective; none for the configs of other runs (their
        objectives are not these)."""
        terms = getattr(config, "objective", None)
        if not (micro_batches or processes) or not isinstance(terms, list) or \
                not all(getattr(term, "name", None) in REGISTRY for term in terms):
            return []
        return cls.from_config(terms, 1).split_by(micro_batches, processes)

    def prepare(self, train: list, held_out: list, seed: int, device) -> dict:
        """Each objective's step over the data before training (``ObjectiveSpec.prepare``),
        once, with all its terms' params; returns what they report."""
        report = {}
        for spec in dict.fromkeys(t.spec for t in self.terms if t.spec.prepare is not None):
            params = [t.params_at(0, self.total_steps) for t in self.terms if t.spec is spec]
            report.update(spec.prepare(params, train, held_out, seed, device))
        return report

    def params_at(self, step: int) -> dict:
        return {t.spec.name: t.params_at(step, self.total_steps) for t in self.terms}

    def __call__(self, inputs: ObjectiveInputs) -> tuple[ObjectiveOutput, dict]:
        """Combined output and each term's mean loss (for logging when there are several),
        both scaled by the examples' weights (``loss`` = sum of weight x ``loss/<name>``)."""
        losses, rewards, parts = 0.0, None, {}
        # (example weights were checked as the data was read: check_example_weights; here a
        # check would read the device every step)
        scale = None if self.example_weight_field is None else \
            inputs.scores[self.example_weight_field]
        for term in self.terms:
            given = inputs if term.state is None else replace(inputs, state=term.state)
            if self.gold and not term.spec.gold:  # a pair term beside a gold reader
                given = _pairs_only(given)
            output = term.spec(given, term.params_at(inputs.step, self.total_steps))
            term_losses = output.losses if scale is None else output.losses * scale.to(
                output.losses)
            losses = losses + term.weight * term_losses
            rewards = output.rewards if rewards is None else rewards
            if len(self.terms) > 1:
                parts[f"loss/{term.spec.name}"] = term_losses.detach().sum()
        return ObjectiveOutput(losses, rewards), parts

    def recorded_params(self) -> dict:
        """Each term's parameters as it trains with them, for run.json and the model card:
        values, and a scheduled one as its ``{start, end, schedule}``."""
        return {term.spec.name: {**asdict(term.params_at(0, self.total_steps)),
                                 **{key: value for key, value in term.raw_params.items()
                                    if isinstance(value, dict)}} for term in self.terms}

    def state_dict(self) -> dict:
        """The states of the terms that keep one, keyed ``<term index>.<name>``."""
        return {f"{i}.{name}": value for i, term in enumerate(self.terms) if term.state is not None
                for name, value in term.state.state_dict().items()}

    def load_state_dict(self, state: dict) -> None:
        for i, term in enumerate(self.terms):
            if term.state is not None:
                prefix = f"{i}."
                term.state.load_state_dict({name[len(prefix):]: value for name, value
                                            in state.items() if name.startswith(prefix)})


def _pairs_only(inputs: ObjectiveInputs) -> ObjectiveInputs:
    """``inputs`` without the gold slot, for a term that does not read it."""
    return replace(inputs, policy=inputs.policy.first_slots(2),
                   reference=inputs.reference and inputs.reference.first_slots(2),
                   extra_references=[stats.first_slots(2) for stats in inputs.extra_references])
