"""The step-aware scorers SPO rates its candidates with (``objective.scorer``): the demo's
colour checker, a trained step-aware preference model (``spm:PATH``), or a user's
``module:function(prompts, images, timesteps)``."""

from __future__ import annotations

from ..config import ConfigError
from ..entry_points import call_problem, import_attribute
from ..score.base import checked


class ColourStepScorer:
    """``shape_colour``: the demo's ``ColourScorer`` on each candidate's predicted x_0. It
    ignores the timestep: a checkable stand-in for the paper's time-conditioned preference
    model, which sees the same x̂_0-like input."""

    name = "shape_colour"

    def score(self, prompts, images, timesteps) -> list[float]:
        from .shapes import ColourScorer

        return checked(ColourScorer().score(prompts, list(images)), self.name, len(prompts))


class FunctionStepScorer:
    """``module:function``: ``function(prompts, images, timesteps) -> scores``, images a float
    tensor [N, 3, H, W] in [-1, 1] (``data.tensor_image`` makes a PIL image of one), timesteps
    the noise level of each candidate (0 for a clean image)."""

    def __init__(self, function, name: str):
        self.function, self.name = function, name

    def score(self, prompts, images, timesteps) -> list[float]:
        from ..score.function import named_errors

        with named_errors(self.name, "a batch of", prompts[0] if len(prompts) else ""):
            values = self.function(list(prompts), images, list(timesteps))
        return checked(values, self.name, len(prompts))


def step_scorer(spec: str):
    """The step-aware scorer ``objective.scorer`` names."""
    if spec == "shape_colour":
        return ColourStepScorer()
    if spec.startswith("spm:"):  # a trained step-aware preference model (step_model.py)
        from ..model.load import given_as
        from .step_model import StepModelScorer

        with given_as("objective.scorer"):
            return StepModelScorer(spec[4:], "objective.scorer")

    try:
        function = import_attribute(spec)
    except (ImportError, AttributeError, ValueError) as error:
        raise ConfigError(f"objective.scorer {spec!r}: expected shape_colour, spm:PATH or "
                          "module:function with an importable module and function "
                          f"({type(error).__name__}: {error}).") from None
    if not callable(function):
        raise ConfigError(f"objective.scorer {spec!r}: {spec.partition(':')[2]} is not callable.")
    _check_signature(function, spec)
    return FunctionStepScorer(function, spec)


def _check_signature(function, spec: str) -> None:
    """A step scorer takes (prompts, images, timesteps): a ConfigError before the run writes
    anything, not a TypeError at its first step (the image scorers of rank and eval take
    (prompt, image), an easy mix-up)."""
    problem = call_problem(function, ([], None, []), "function(prompts, images, timesteps)",
                           spec)
    if problem:
        raise ConfigError(
            f"objective.scorer {spec!r}: {problem}; a step-aware scorer rates a batch of "
            "candidates (images: a [N, 3, H, W] tensor in [-1, 1]; timesteps: each one's noise "
            "level). The function(prompt, image) form is for diffusion rank, eval and online.")
