"""Code a config names from outside preftune: ``module:attribute`` and the entry points of
installed packages (groups ``preftune.objectives`` and ``preftune.scorers``)."""

from __future__ import annotations

import importlib
import inspect
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


def call_problem(function, args: tuple, form: str, name: str) -> str | None:
    """Why ``function`` (a user's, given as ``name``) cannot be called with ``args``, as a
    ``form`` such as "function(prompt, response)"; None when it can, or when it has no
    signature to read (a builtin: tried when called)."""
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):
        return None
    try:
        signature.bind(*args)
    except TypeError as error:
        return (f"{getattr(function, '__name__', name)}{signature} cannot be called as {form} "
                f"({error})")
    return None


def load_entry_point(group: str, name: str):
    """The object an installed package declares as entry point ``name`` of ``group`` (loading
    it imports its module); None when no package declares one. A declaration that does not
    load raises ``ValueError`` naming it, its package and what to do."""
    for point in entry_points(group=group, name=name):
        try:
            return point.load()
        except Exception as error:  # the package's own import: anything may go wrong there
            package = point.dist.name if point.dist is not None else "an installed package"
            raise ValueError(f"entry point {name} = {point.value} of {package} (group {group}) "
                             f"does not load ({type(error).__name__}: {error}); fix or "
                             f"reinstall {package}, or uninstall it.") from error
    return None


def entry_point_names(group: str) -> list[str]:
    """Names installed packages declare in ``group``, sorted."""
    return sorted({point.name for point in entry_points(group=group)})
