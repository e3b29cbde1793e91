"""Code a config names from outside preftune: ``module:attribute`` and the entry points of
installed packages (groups ``preftune.objectives`` and ``preftune.scorers``)."""

from __future__ import annotations

import importlib
import os
import sys
from importlib.metadata import entry_points


def import_attribute(spec: str):
    """The attribute ``attribute`` of module ``module`` for a ``module:attribute`` spec; the
    module is looked up on ``sys.path`` and in the working directory (which ``python -m`` puts
    on the path and the ``preftune`` command does not)."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ValueError(f"{spec!r} is not module:attribute")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())
    return getattr(importlib.import_module(module_name), attribute)


def load_entry_point(group: str, name: str):
    """The object an installed package declares as entry point ``name`` of ``group`` (loading
    it imports its module); None when no package declares one."""
    for point in entry_points(group=group, name=name):
        return point.load()
    return None


def entry_point_names(group: str) -> list[str]:
    """Names installed packages declare in ``group``, sorted."""
    return sorted({point.name for point in entry_points(group=group)})
