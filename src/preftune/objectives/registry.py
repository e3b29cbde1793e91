"""The objective registry: each objective is a pure function plus a declaration of its needs.

The declaration drives the machinery (reference pass or not, per-token log-probs or not, which
data shape to collate), so the training loop never branches on an objective's name.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..model.forward import SequenceStats
from .state import ObjectiveState

DATA_SHAPES = ("pairs", "unpaired", "ranked")


@dataclass
class ObjectiveInputs:
    """What an objective sees: per-response stats shaped [examples, responses] and side data."""

    policy: SequenceStats
    reference: SequenceStats | None = None
    scores: dict = field(default_factory=dict)
    step: int = 0
    extra_references: list[SequenceStats] = field(default_factory=list)  # reference.extra_models
    state: object = None  # the objective's declared state (objectives.state), kept across steps
    training: bool = True  # False in evaluation: a state is read, not updated


@dataclass
class ObjectiveOutput:
    """Per-example losses [E] and the objective's implied reward per response [E, R].

    The framework turns ``rewards`` into the logged rewards/margins/accuracies, so no objective
    repeats that bookkeeping.
    """

    losses: torch.Tensor
    rewards: torch.Tensor


@dataclass(frozen=True)
class ObjectiveSpec:
    name: str
    fn: Callable[[ObjectiveInputs, object], ObjectiveOutput]
    params: type
    needs_reference: bool
    data: str
    per_token: bool
    paper: str
    kl_completions: bool = False  # wants a mismatched completion as the last response slot
    reference_distributions: bool = False  # wants per-token KL(pi_ref || pi_theta) in the stats
    # wants each token's log sum_v pi_theta(v)^2 in the stats (or a function of the params
    # that says whether it does)
    policy_collisions: bool | Callable = False
    # wants stats from reference.extra_models as well: True, or a function of the params
    # giving how many it reads (True for any number)
    extra_references: bool | Callable = False
    image_negatives: bool = False  # wants y_w under the negative images as the last slot
    online_builder: str | None = None  # online rounds must build its data with this builder
    online_win_probs: bool = False  # online rounds must add each response's win probability
    reference_samples: bool = False  # its lists must be samples of the reference model
    scores: tuple = ()  # numeric fields every record must carry (checked as the data is read)
    state: type | None = None  # what it keeps across steps (an objectives.state.ObjectiveState)
    prepare: Callable | None = None  # a step over the data before training (see ``objective``)
    gold: bool = False  # reads each pair's gold response, its third slot (refused without)
    check: Callable | None = None  # check(record's numbers, params) -> what is wrong, or None
    # its loss reads the micro-batch as a whole (a mean or a sort over its examples), or a
    # function of the params that says whether it does
    whole_batch: bool | str | Callable = False

    @property
    def summary(self) -> str:
        lines = (self.fn.__doc__ or "").strip().splitlines()
        return lines[0] if lines else ""

    def defaults(self) -> dict:
        return dataclasses.asdict(self.params())

    def __call__(self, inputs: ObjectiveInputs, params) -> ObjectiveOutput:
        if self.needs_reference and inputs.reference is None:
            raise ValueError(f"objective {self.name!r} needs reference log-probs")
        if self.gold and inputs.policy.logps.shape[1] < 3:
            raise ValueError(f"objective {self.name!r} needs a gold response per pair (the "
                             "record field 'gold', the third response slot); this data has "
                             "chosen and rejected only")
        if self.state is not None and inputs.state is None:  # called on its own: a fresh state
            inputs = dataclasses.replace(inputs, state=self.state())
        output = self.fn(inputs, params)
        examples = inputs.policy.logps.shape[0]  # shapes are known on the host: no device read
        if not isinstance(output, ObjectiveOutput) or output.losses.shape != (examples,):
            got = (f"losses of shape {tuple(output.losses.shape)}"
                   if isinstance(output, ObjectiveOutput) else type(output).__name__)
            raise TypeError(f"objective {self.name!r} returned {got}; an objective returns "
                            f"ObjectiveOutput(losses=[examples] ({examples},), rewards=[examples, "
                            "responses]).")
        return output


REGISTRY: dict[str, ObjectiveSpec] = {}


def objective(name, *, params, needs_reference, paper, data="pairs", per_token=False,
              kl_completions=False, reference_distributions=False, policy_collisions=False,
              extra_references=False, image_negatives=False, online_builder=None,
              online_win_probs=False, reference_samples=False, scores=(), state=None,
              prepare=None, gold=False, check=None, whole_batch=False):
    """Register ``fn`` as objective ``name`` with its params dataclass and declared needs.

    ``kl_completions``: each example also carries the completion of another example under its
    own prompt, as its last response slot (KTO's KL estimate; see data.prepare).
    ``reference_distributions``: the policy stats carry the per-token forward KL from the
    reference's full next-token distribution (``kl``, and ``token_kl`` when per_token).
    ``policy_collisions``: the per-token policy stats carry log sum_v pi_theta(v | x, y_<t)^2
    over the vocabulary (``token_log_sum_sq_probs``, no gradient; WPO's weight alignment);
    a function of the params says whether those params need it.
    ``extra_references``: ``inputs.extra_references`` holds the stats of each model of
    ``reference.extra_models`` (MRPO).
    ``image_negatives``: each pair also carries its chosen response conditioned on the record's
    ``negative_images`` instead of its images, as the last response slot (mDPO).
    ``online_builder``: in ``preftune online`` its rows come from this pair/list builder
    (``online.pairs.builder``); ``online_win_probs``: they carry win probabilities.
    ``reference_samples``: its lists must be samples of the reference model (online rounds:
    round 1, or ``online.reference: previous``), as its estimates assume.
    ``scores``: the numeric record fields it reads from ``inputs.scores`` (odpo's
    chosen_score, ...): a record without one is refused as the data is read.
    ``state``: an ``objectives.state.ObjectiveState`` subclass; the loop makes one per run,
    passes it as ``inputs.state``, checkpoints it, and sets ``inputs.training`` False in
    evaluation, where it is only read (BCO's running mean, group-robust DPO's weights).
    ``prepare(params, train, held_out, seed, device) -> dict``: run once before training with
    the params of every term of this objective; the examples carry their record's prompt
    (``.prompt``) and it may add scores to them (BCO's UDM weights). What it returns goes into
    the run's data report.
    ``gold``: each pair carries its ``gold`` response as the third slot; a pair without one
    is refused as the data is read (other objectives never see a gold slot).
    ``check(scores, params) -> str | None``: what is wrong with one record's numeric fields
    (``scores``, a dict of its ``scores`` names) for these params, or None; run on every
    record as the data is read, so the loss itself never reads values back from the device.
    ``whole_batch``: its loss reads the micro-batch as a whole (AOT's sorted quantiles), so a
    step split into micro-batches or over processes is not one batch of the same examples (a
    run says so); ``"gathered"``: a statistic taken over every process (KTO's z_ref, through
    ``step_mean``), so only micro-batches split it; a function of the params says which (or
    False) for those params.
    """
    if data not in DATA_SHAPES:
        raise ValueError(f"unknown data shape {data!r}; expected one of {DATA_SHAPES}")
    if not callable(whole_batch) and whole_batch not in (False, True, "gathered"):
        raise ValueError(f"objective {name!r}: whole_batch={whole_batch!r}; expected False, "
                         "True, \"gathered\" or a function of the params giving one")
    _check_params(name, params)
    if state is not None and not (isinstance(state, type) and issubclass(state, ObjectiveState)):
        raise TypeError(f"objective {name!r}: state={state!r} is not a subclass of "
                        "preftune.ObjectiveState")

    def register(fn):
        if name in REGISTRY:
            raise ValueError(f"objective {name!r} is registered twice")
        REGISTRY[name] = ObjectiveSpec(name, fn, params, needs_reference, data, per_token, paper,
                                       kl_completions, reference_distributions,
                                       policy_collisions, extra_references, image_negatives,
                                       online_builder, online_win_probs, reference_samples,
                                       tuple(scores), state, prepare, gold, check,
                                       whole_batch)
        return fn

    return register


RESERVED_PARAMS = ("name", "weight")  # an objective term's own keys in a config
# a params field's metadata: read once before training (by ``prepare``), so it follows no
# schedule: ``x: float = field(default=1.0, metadata=READ_ONCE)``
READ_ONCE = {"read_once": True}


def _check_params(name: str, params) -> None:
    """A params class is a dataclass whose every field has a default and none of whose names a
    config term uses for itself."""
    if not (isinstance(params, type) and dataclasses.is_dataclass(params)):
        raise TypeError(f"objective {name!r}: params={params!r} is not a dataclass; declare "
                        "the parameters as a @dataclass with defaults.")
    for f in dataclasses.fields(params):
        if f.name in RESERVED_PARAMS:
            raise ValueError(f"objective {name!r}: parameter {f.name!r} is taken by the config "
                             f"term itself ({', '.join(RESERVED_PARAMS)}); rename it.")
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ValueError(f"objective {name!r}: parameter {f.name!r} has no default; every "
                             "parameter needs one (a config may leave it out).")


@dataclass
class NoParams:
    """An objective without parameters."""


def register_objective(name: str | None = None, *, params: type = NoParams,
                       needs_reference: bool, data: str = "pairs", paper: str = "", **needs):
    """Register an objective from user code, declared like the built-ins (see ``objective``);
    ``name`` defaults to the function's name. Re-running the same definition (a notebook cell)
    replaces it."""

    def register(fn):
        key = name or fn.__name__
        previous = REGISTRY.get(key)
        if previous is not None and _same_definition(previous.fn, fn):
            del REGISTRY[key]
        elif previous is not None:
            owner = ("is built into preftune" if previous.fn.__module__.startswith("preftune.")
                     else f"is already registered by {previous.fn.__module__}."
                          f"{previous.fn.__qualname__}")
            raise ValueError(f"objective {key!r} {owner}; register yours under another name "
                             f"(register_objective(name=...) or rename {fn.__name__}).")
        return objective(key, params=params, needs_reference=needs_reference, paper=paper,
                         data=data, **needs)(fn)

    return register


def _same_definition(a, b) -> bool:
    return (a.__module__, a.__qualname__) == (b.__module__, b.__qualname__)


ENTRY_POINT_GROUP = "preftune.objectives"


def get_objective(name: str) -> ObjectiveSpec:
    """The objective registered as ``name``; else ``module:function`` of a registered function,
    or an installed package's entry point of group ``preftune.objectives``."""
    if name in REGISTRY:
        return REGISTRY[name]
    target = _load_target(name)
    if target is not None:
        spec = next((s for s in REGISTRY.values() if s.fn is target), None)
        if spec is None:
            raise KeyError(f"objective {name!r}: {getattr(target, '__name__', target)!r} is not "
                           "a registered objective; decorate it with "
                           "@preftune.register_objective(params=..., needs_reference=..., "
                           "data=...) so it declares what it needs.")
        if ":" not in name and spec.name != name:  # an entry point: one name, listed and run
            raise KeyError(f"objective {name!r}: the installed entry point {name} registers its "
                           f"function as objective {spec.name!r}; name them alike "
                           f"(@preftune.register_objective({name!r}, ...), or call the entry "
                           f"point {spec.name}) in the package that declares it.")
        return spec
    import difflib

    close = ([name.lower()] if name.lower() in REGISTRY else  # (names are lowercase)
             difflib.get_close_matches(name.lower(), REGISTRY, n=3))
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise KeyError(f"unknown objective {name!r}.{hint} Run `preftune objectives` to list them, "
                   "or name one from your code as module:function.")


def load_installed() -> list[str]:
    """Register the objectives that installed packages declare (entry points); returns what
    was wrong with those that could not be (one broken package leaves the rest usable)."""
    from ..entry_points import entry_point_names

    problems = []
    for name in entry_point_names(ENTRY_POINT_GROUP):
        try:
            get_objective(name)
        except KeyError as error:
            problems.append(error.args[0])
    return problems


def _load_target(name: str):
    """What ``module:function`` or an installed entry point called ``name`` refers to (loading
    it runs its registration); None when ``name`` is neither."""
    if ":" in name:
        from ..entry_points import import_attribute

        try:
            return import_attribute(name)
        except (ImportError, AttributeError, ValueError) as error:
            raise KeyError(f"objective {name!r}: expected module:function with an importable "
                           f"module and function ({error}).") from None
    from ..entry_points import load_entry_point

    try:
        return load_entry_point(ENTRY_POINT_GROUP, name)
    except ValueError as error:
        raise KeyError(f"objective {name!r}: {error}") from None
