"""A config file as a tree of dicts: the YAML read safely, then ``key=value`` overrides
(``--set``) applied, each problem a one-line ``ConfigError``. ``config.py`` validates the tree."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

import yaml


class ConfigError(ValueError):
    """A configuration problem a user can fix; the message names the key."""


class _UniqueKeys(yaml.SafeLoader):
    """Safe YAML whose mappings may not repeat a key: PyYAML keeps the last one silently, so a
    second ``train:`` section would drop every setting of the first."""


def _mapping_once(loader: _UniqueKeys, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` may be overridden
            continue
        key = loader.construct_object(key_node, deep=True)
        try:
            first = seen.get(key)
            seen[key] = key_node.start_mark
        except TypeError:  # an unhashable key: construct_mapping names that problem
            break
        if first is not None:
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} appears twice (also at line {first.line + 1}), and "
                "the second would silently replace the first; merge them", key_node.start_mark)
    return loader.construct_mapping(node, deep)


_UniqueKeys.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_once)


def read_utf8(path: Path, error: type[Exception], advice: str) -> str:
    """``path``'s text; bytes that are not UTF-8 (a file saved as UTF-16 or Latin-1) raise
    ``error`` naming the file, the line and, in ``advice``, what to do."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as bad:
        line = data.count(b"\n", 0, bad.start) + 1
        raise error(f"{path}:{line}: not valid UTF-8 ({bad.reason} at byte {bad.start}); "
                    f"{advice}") from None


def load_yaml(text: str):
    """``text`` read as safe YAML that refuses a repeated key (yaml.YAMLError says where)."""
    return yaml.load(text, Loader=_UniqueKeys)


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
            tree = load_yaml(read_utf8(file, ConfigError, "re-save the config as UTF-8; "
                                       "nothing was run")) or {}
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
        if not tree and not overrides:
            raise ConfigError(f"config file {path} is empty: it sets nothing. Start from one of "
                              "examples/*.yaml, or list the keys with `preftune config explain`.")
    apply_overrides(tree, overrides)
    return tree


def apply_overrides(tree: dict, overrides: Sequence[str]) -> None:
    """Apply ``key=value`` overrides (``--set``); a new objective (or loss) name first, so that
    --set objective.beta=... in any order sets the new objective's parameter."""
    for item in sorted(overrides, key=lambda item: not _names_a_term(item.partition("=")[0])):
        set_override(tree, item)


TERMS = ("objective", "loss")  # sections that are a registered name and its own parameters
KEPT = ("name", "weight")  # a term's own keys, kept when its name changes


def _names_a_term(dotted: str) -> bool:
    """``objective.name``, ``objective.1.name`` or ``loss.name``."""
    parts = dotted.strip().split(".")
    return parts[0] in TERMS and parts[-1] == "name" and (
        len(parts) == 2 or (len(parts) == 3 and parts[1].isdigit()))


def _switch_term(node: dict, dotted: str, name) -> None:
    """``--set objective.name=X`` names another objective: the parameters the file gave the
    old one mean other things to X (simpo's beta is 20x dpo's), so they are dropped, and said."""
    old = node.get("name")
    dropped = {k: v for k, v in node.items() if k not in KEPT}
    if old is None or old == name or not dropped:
        return
    for key in dropped:
        del node[key]
    settings = ", ".join(f"{k}={v}" for k, v in dropped.items())
    print(f"note: --set {dotted}={name} replaces {old}; its parameters from the config "
          f"({settings}) are dropped (set {name}'s with --set "
          f"{dotted.rsplit('.', 1)[0]}.KEY=VALUE)", file=sys.stderr)


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
    if isinstance(value, dict) and len(value) == 1 and None in value.values() and \
            raw_value.strip().endswith(":"):  # `judge:` read as a mapping; meant as text
        value = raw_value.strip()
    node, where = tree, []
    for part in parents:
        if part in TERMS and not where and isinstance(node.get(part), str):
            node[part] = {"name": node[part]}  # `objective: dpo`, the name alone
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
        if _names_a_term(dotted):
            _switch_term(node, dotted, value)
        node[leaf] = value
    else:
        raise ConfigError(f"--set {dotted}: {'.'.join(where)} is a value ({node!r}), not a "
                          f"section, so it has no key {leaf!r}")
