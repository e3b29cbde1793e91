"""A config file as a tree of dicts: the YAML read safely, then ``key=value`` overrides
(``--set``) applied, each problem a one-line ``ConfigError``. ``config.py`` validates the tree."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import yaml


class ConfigError(ValueError):
    """A configuration problem a user can fix; the message names the key."""


def read_tree(path: str | None, overrides: Sequence[str] = ()) -> dict:
    """A YAML config file as a dict, with ``key=value`` overrides applied."""
    tree: dict = {}
    if path is not None:
        file = Path(path)
        if not file.is_file():
            what = "is a folder, not a file" if file.is_dir() else "does not exist"
            raise ConfigError(
                f"config file {path} {what} (relative paths start at {Path.cwd()}). The "
                "examples/ configs that --help names are in preftune's source repository; "
                "without a file, every key can come from --set (`preftune config explain` "
                "lists them)")
        try:
            tree = yaml.safe_load(file.read_text()) or {}
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(error, "problem", None) or str(error).splitlines()[0]
            if "python/" in str(error) or "constructor" in problem:
                problem += " (tags that would build Python objects are refused: a config is data)"
            raise ConfigError(f"{path}: not a valid YAML config{where}: {problem}; nothing was "
                              "run") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    for item in overrides:
        set_override(tree, item)
    return tree


def set_override(tree: dict, item: str) -> None:
    """Apply one ``key=value`` override (``--set``) to ``tree``."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key=value, e.g. train.learning_rate=1e-6")
    key, value = item.split("=", 1)
    set_dotted(tree, key.strip(), value)


def set_dotted(tree: dict, dotted: str, raw_value: str) -> None:
    """Apply one ``--set a.b.c=value`` override; the value is parsed as YAML."""
    *parents, leaf = dotted.split(".")
    try:
        value = yaml.safe_load(raw_value)
    except yaml.YAMLError as error:
        problem = getattr(error, "problem", None) or "not valid YAML"
        raise ConfigError(f"--set {dotted}={raw_value}: the value is not valid YAML ({problem}); "
                          "quote text that holds brackets or colons, e.g. --set "
                          f"'{dotted}=\"{raw_value}\"'") from None
    node, where = tree, []
    for part in parents:
        if isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]  # e.g. objective.1.weight for a list of objectives
        elif isinstance(node, dict):
            node = node.setdefault(part, {})
        else:
            raise ConfigError(f"--set {dotted}: {'.'.join(where)} is a value ({node!r}), not a "
                              f"section, so it has no key {part!r}")
        where.append(part)
    if isinstance(node, list):
        if not (leaf.isdigit() and int(leaf) < len(node)):
            raise ConfigError(f"--set {dotted}: {leaf!r} is not an index of that list")
        node[int(leaf)] = value
    elif isinstance(node, dict):
        node[leaf] = value
    else:
        raise ConfigError(f"--set {dotted}: {'.'.join(where)} is a value ({node!r}), not a "
                          f"section, so it has no key {leaf!r}")
