"""Preference objectives. Importing this package registers every objective."""

from . import pairwise, reference_free  # noqa: F401  (registration side effect)
from .registry import REGISTRY, ObjectiveInputs, ObjectiveOutput, get_objective

__all__ = ["REGISTRY", "ObjectiveInputs", "ObjectiveOutput", "get_objective"]
