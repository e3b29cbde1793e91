"""What is wrong with a config, in its own keys: pydantic's validation errors turned into one
line per problem (an unknown key with the closest known one, a value with what was wanted and
what was given, which of several objective terms)."""

from __future__ import annotations

import difflib
import types
import typing

from pydantic import BaseModel


def unknown_key(path: str, key: str, known, where: str, own: tuple = ()) -> str:
    """An unknown key named, with the closest known one (among ``known`` and the section's
    ``own`` keys, e.g. an objective term's weight)."""
    close = difflib.get_close_matches(key, [*known, *own], n=1)
    hint = f" Did you mean {path.rsplit('.', 1)[0] + '.' if '.' in path else ''}{close[0]}?" if close else ""
    keys = f"Known keys: {', '.join(sorted(known))}." if known else "It takes no parameters."
    return f"unknown key {path!r} in {where}.{hint} {keys}"


def _key_path(loc: tuple, model: type[BaseModel]) -> str:
    """An error's location as config keys: list indices and the tags pydantic gives each
    member of a union (``data.train.str``, ``data.train.list[str]``) left out."""
    keys, section, union = [], model, False
    for part in loc:
        if isinstance(part, int):
            continue
        if union:  # the member's tag
            union = False
            continue
        fields = section.model_fields if isinstance(section, type) and issubclass(
            section, BaseModel) else {}
        keys.append(str(part))
        if part not in fields:
            section = None
            continue
        annotation = fields[part].annotation
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        models = [a for a in members or [annotation]
                  if isinstance(a, type) and issubclass(a, BaseModel)]
        section = models[0] if models else None
        union = not models and len(members) > 1 and typing.get_origin(annotation) in (
            typing.Union, types.UnionType)
    return ".".join(keys)


def problems(errors: list[dict], model: type[BaseModel], tree=None) -> list[str]:
    """One line per problem; a value that fits no member of a union is one line that names
    what each member wanted; a problem in one of several list items (objective terms) says
    which."""
    lines, merged = [], {}
    for error in errors:
        item = _list_item(error["loc"], tree)
        if error["type"] in ("extra_forbidden", "value_error"):
            lines.append(item + _describe(error, model))
            continue
        location = _key_path(error["loc"], model)
        if location in merged:
            wanted = error["msg"].removeprefix("Input should be ")
            lines[merged[location]] = lines[merged[location]].replace(
                " (got ", f" or {wanted} (got ", 1)
            continue
        merged[location] = len(lines)
        lines.append(f"{item}{location}: {error['msg']} (got {error.get('input')!r})")
    return lines


def _list_item(loc: tuple, tree) -> str:
    """``"objective item 2 of 3: "`` when ``loc`` runs through a list of several mappings in
    ``tree`` (the terms of an objective list), else nothing."""
    keys, node = [], tree
    for part in loc:
        if isinstance(part, int) and isinstance(node, list) and part < len(node):
            if len(node) > 1 and isinstance(node[part], dict):
                return f"{'.'.join(keys)} item {part + 1} of {len(node)}: "
            node = node[part]
        elif isinstance(part, str) and isinstance(node, dict) and part in node:
            keys.append(part)
            node = node[part]
        else:
            return ""
    return ""


def _describe(error: dict, model: type[BaseModel]) -> str:
    """An unknown key, or a validator's message."""
    location = ".".join(str(part) for part in error["loc"] if not isinstance(part, int))
    if error["type"] == "extra_forbidden":
        section = _section(model, error["loc"][:-1])
        return unknown_key(location, str(error["loc"][-1]), section.model_fields, "the config")
    message = error["msg"].removeprefix("Value error, ")  # a validator's own message
    key = message.split(":", 1)[0]
    if location and key in _section(model, error["loc"]).model_fields:  # a key of the section
        return f"{location}.{message}"
    return message


def _section(model: type[BaseModel], loc: tuple) -> type[BaseModel]:
    """The section class that ``loc`` (keys, list positions) leads to from ``model``."""
    section = model
    for part in loc:
        if isinstance(part, int) or str(part) not in section.model_fields:
            continue
        annotation = section.model_fields[str(part)].annotation
        section = next((a for a in getattr(annotation, "__args__", (annotation,))
                        if isinstance(a, type) and issubclass(a, BaseModel)), section)
    return section
