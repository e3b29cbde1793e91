"""The versions a bug report or a model card names, read from the installed packages'
metadata (nothing is imported)."""

from __future__ import annotations

import platform
from importlib.metadata import PackageNotFoundError, version

from . import __version__


def installed_versions() -> dict[str, str]:
    """preftune, torch, transformers and Python, by name."""

    def installed(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    return {"preftune": __version__, "torch": installed("torch"),
            "transformers": installed("transformers"), "Python": platform.python_version()}
