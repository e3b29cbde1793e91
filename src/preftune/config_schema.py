"""The config files as a JSON schema (for editors: completion, hover help, checks) and as a
listing of every key with its type, default and help (``preftune config explain``). Both are
read off the pydantic config classes; objective and reward-loss parameters come from the
registries, so every registered name is offered with its own parameters."""

from __future__ import annotations

import difflib
import json
import sys
import textwrap
from pathlib import Path

from pydantic import TypeAdapter

from .config import Config, ConfigError

SCHEDULE = {"type": "object", "description": "a schedule over the run's steps",
            "properties": {"start": {"type": "number"}, "end": {"type": "number"},
                           "schedule": {"enum": ["linear", "cosine", "constant"]}},
            "required": ["start", "end"], "additionalProperties": False}
FROM_CODE = {"type": "object", "required": ["name"], "additionalProperties": True,
             "description": "module:function of an objective registered in your code",
             "properties": {"name": {"type": "string", "pattern": "^[^:]+:[^:]+$"}}}

# keys whose value is a registered name with that name's own parameters
LISTINGS = {"objective": ("{name, parameters...} or a list of them", "preftune objectives"),
            "loss": ("{name, parameters...}", "preftune rm losses")}
DIFFUSION_LISTINGS = {"objective": ("{name, parameters...}", "preftune diffusion objectives")}


def config_class(kind: str) -> type:
    """The config class of ``kind`` (one of ``arguments.CONFIG_KINDS``)."""
    from .diffusion.config import DiffusionConfig
    from .diffusion.online import DiffusionOnlineConfig
    from .diffusion.step_model_train import StepModelConfig
    from .online.config import OnlineConfig
    from .reward.config import RewardConfig

    return {"train": Config, "rm": RewardConfig, "online": OnlineConfig,
            "diffusion": DiffusionConfig, "diffusion-online": DiffusionOnlineConfig,
            "diffusion-spm": StepModelConfig}[kind]


def json_schema(kind: str = "train") -> dict:
    """A JSON schema (draft 2020-12) of a ``kind`` config file."""
    schema = config_class(kind).model_json_schema()
    definitions = schema.setdefault("$defs", {})
    if kind == "rm":
        from .reward.losses import REWARD_LOSSES

        definitions["RewardLossConfig"] = {"anyOf": [
            _term(spec.name, spec.params, spec.summary, definitions, default="bt")
            for spec in sorted(REWARD_LOSSES.values(), key=lambda s: s.name)]}
    elif kind.startswith("diffusion"):
        from .diffusion.losses import DIFFUSION_LOSSES

        if "DiffusionObjectiveConfig" in definitions:  # (spm trains no objective)
            definitions["DiffusionObjectiveConfig"] = {"anyOf": [
                _term(spec.name, spec.params, spec.summary, definitions,
                      default="diffusion_dpo")
                for spec in sorted(DIFFUSION_LOSSES.values(), key=lambda s: s.name)]}
    else:
        terms = _objective_terms(definitions)
        names = [term["properties"]["name"]["const"] for term in terms]
        definitions["ObjectiveConfig"] = {"anyOf": [
            *terms, FROM_CODE, {"enum": names, "description": "an objective by name alone"},
            {**FROM_CODE["properties"]["name"], "description": FROM_CODE["description"]}]}
        field = schema["properties"]["objective"]
        field.pop("type"), field.pop("items")
        item = {"$ref": "#/$defs/ObjectiveConfig"}
        field["anyOf"] = [item, {"type": "array", "items": item, "minItems": 1}]
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema,
            "title": f"preftune {kind} config"}


def write_schema(kind: str, output: str | None) -> None:
    """``preftune config schema``: the ``kind`` config's schema on stdout, or written to
    ``output`` (its folder made), which may replace only an earlier schema."""
    text = json.dumps(json_schema(kind), indent=2) + "\n"
    if output is None:
        print(text, end="")
        return
    from .train.output import replacing_problem

    target = Path(output)
    problem = replacing_problem(target, "-o", '"$schema"', ("a JSON schema", "the schema"),
                                f"{kind}.schema.json")
    if problem:
        raise ConfigError(problem)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text)
    print(f"wrote the {kind} config schema to {target}")


def _objective_terms(definitions: dict) -> list[dict]:
    from .objectives import REGISTRY
    from .objectives.registry import load_installed

    for problem in load_installed():
        print(f"warning: left out of the schema: {problem}", file=sys.stderr)
    return [_term(spec.name, spec.params, spec.summary, definitions, default="dpo",
                  schedulable=True)
            for spec in sorted(REGISTRY.values(), key=lambda s: s.name)]


def _term(name: str, params: type, summary: str, definitions: dict, default: str,
          schedulable: bool = False) -> dict:
    """One registered name with its parameters; ``name`` may be left out for the default."""
    params_schema = TypeAdapter(params).json_schema(ref_template="#/$defs/{model}")
    definitions.update(params_schema.pop("$defs", {}))
    properties = {"name": {"const": name}}
    if schedulable:
        properties["weight"] = {"type": "number", "default": 1.0, "exclusiveMinimum": 0}
    for key, value in params_schema.get("properties", {}).items():
        properties[key] = ({"anyOf": [value, _schedule_of(value)]}
                           if schedulable and value.get("type") == "number" else value)
    return {"type": "object", "description": summary, "properties": properties,
            "required": [] if name == default else ["name"], "additionalProperties": False}


def _schedule_of(value: dict) -> dict:
    """The schedule form of a number parameter: its ends obey the parameter's own bounds."""
    end = {k: v for k, v in value.items() if k not in ("default", "title")}
    return {**SCHEDULE, "properties": {**SCHEDULE["properties"], "start": end, "end": end}}


def explain(kind: str = "train", key: str | None = None) -> str:
    """Every key of a ``kind`` config (or those under ``key``): type, default and help."""
    schema = json_schema(kind)
    listings = DIFFUSION_LISTINGS if kind.startswith("diffusion") else LISTINGS
    rows = list(_rows(schema, schema, "", listings))
    if key:
        chosen = [row for row in rows if row[0] == key or row[0].startswith(key + ".")]
        if not chosen:
            close = difflib.get_close_matches(key, [row[0] for row in rows], n=1)
            hint = f" Did you mean {close[0]}?" if close else ""
            if key.partition(".")[0] in listings and "." in key:
                hint = (f" Its parameters depend on the {key.partition('.')[0]}'s name: "
                        f"`{listings[key.partition('.')[0]][1]}` lists each one's, with "
                        "defaults.")
            raise ConfigError(f"no key {key!r} in a {kind} config.{hint} Run `preftune config "
                              f"explain --kind {kind}` for the full list.")
        rows = chosen
    blocks = []
    for dotted, kind_of, default, text in rows:
        block = f"{dotted}: {kind_of}" + (f" = {default}" if default is not None else "")
        if text:
            block += "\n" + textwrap.fill(" ".join(text.split()), width=96,
                                          initial_indent="    ", subsequent_indent="    ")
        blocks.append(block)
    return "\n".join(blocks)


def _rows(node: dict, root: dict, prefix: str, listings: dict):
    """(dotted key, type, default, help) of every leaf key under ``node``."""
    for name, field in node.get("properties", {}).items():
        dotted = prefix + name
        section = _section(field, root)
        if section is not None:
            yield from _rows(section, root, dotted + ".", listings)
            continue
        default = json.dumps(field["default"]) if "default" in field else None
        text = field.get("description", "")
        if dotted in listings:
            kind, command = listings[dotted]
            yield dotted, kind, default, f"{text} The names and their parameters: `{command}`."
        else:
            yield dotted, _type(field, root), default, text


def _section(field: dict, root: dict) -> dict | None:
    """The config section a field holds (possibly optional), else None."""
    for option in [field, *field.get("anyOf", [])]:
        if "$ref" in option:
            target = _resolve(option, root)
            if "properties" in target and target.get("additionalProperties") is False:
                return target
    return None


def _resolve(node: dict, root: dict) -> dict:
    return root["$defs"][node["$ref"].rsplit("/", 1)[-1]] if "$ref" in node else node


def _type(node: dict, root: dict) -> str:
    node = _resolve(node, root)
    if "anyOf" in node:
        return " | ".join(_type(option, root) for option in node["anyOf"])
    if "enum" in node:
        return " | ".join(str(value) for value in node["enum"])
    kind = node.get("type", "any")
    if kind == "array":
        return f"list of {_type(node.get('items', {}), root)}"
    if kind == "object":
        values = node.get("additionalProperties", {})
        return f"mapping of {_type(values, root) if isinstance(values, dict) else 'any'}"
    bounds = [f"{sign} {node[bound]}" for bound, sign in (
        ("minimum", ">="), ("exclusiveMinimum", ">"), ("maximum", "<="), ("exclusiveMaximum", "<"))
        if bound in node]
    name = {"number": "float", "integer": "int", "string": "str", "boolean": "bool"}.get(kind, kind)
    return f"{name} {', '.join(bounds)}" if bounds else name
