"""Preference objectives. Importing this package registers every objective."""

# Importing each family module registers its objectives.
from . import absolute, divergence, joint, pairwise, reference_free, token_weighted  # noqa: F401
from . import listwise, pairwise_extra, sampled, ties_and_exploration, token_level  # noqa: F401
from . import unpaired, vision  # noqa: F401
from .registry import REGISTRY, ObjectiveInputs, ObjectiveOutput, get_objective

__all__ = ["REGISTRY", "ObjectiveInputs", "ObjectiveOutput", "get_objective"]
