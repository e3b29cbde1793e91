"""The versions a bug report or a model card names, read from the installed packages'
metadata (nothing is imported)."""

from __future__ import annotations

import platform
import re
from importlib.metadata import PackageNotFoundError, requires, version

from . import __version__


def installed_versions() -> dict[str, str]:
    """preftune, torch, transformers and Python, by name."""
    return {"preftune": __version__,
            "torch": _installed("torch") or "not installed",
            "transformers": _installed("transformers") or "not installed",
            "Python": platform.python_version()}


def _installed(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def below_floors() -> str | None:
    """What of preftune's requirements (the ``>=`` floors in its installed metadata, extras
    left out) is missing or too old, with the command that fixes it; None when all is met or
    preftune runs from a source tree without metadata."""
    try:
        requirements = requires("preftune") or []
    except PackageNotFoundError:
        return None
    problems, fixes = [], []
    for requirement in requirements:
        floor = re.fullmatch(r"([A-Za-z0-9_.-]+)>=([0-9.]+)", requirement.replace(" ", ""))
        if floor is None:  # an extra's (``; extra == ...``) or another form
            continue
        name, needed = floor[1], floor[2]
        have = _installed(name)
        if have is None or _release(have) < _release(needed):
            problems.append(f"{name} {have or 'is not installed'} (preftune needs >={needed})")
            fixes.append(f"'{name}>={needed}'")
    if not problems:
        return None
    return f"{'; '.join(problems)}. Upgrade: pip install -U {' '.join(fixes)}"


def _release(text: str) -> tuple[int, ...]:
    """The leading release numbers: 2.9.0+cu128 -> (2, 9, 0), 5.0.0rc1 -> (5, 0, 0)."""
    numbers = re.match(r"\d+(?:\.\d+)*", text)
    return tuple(int(n) for n in numbers[0].split(".")) if numbers else ()
