"""Source rows -> canonical records, one parser per shape: pairs, unpaired, ranked.

How a file's shape and format are decided is in ``sources.py``; this module parses one row.

``columns`` maps canonical field names to the file's column names. ``format`` is "standard"
(strings), "conversational" (message-list prompts) or "implicit" (pairs only: no prompt, chosen
and rejected share a prefix). A pairs row with ``chosen_prompt`` and ``rejected_prompt`` instead
of ``prompt`` is a joint pair (one prompt per side, DOVE); a file may mix both kinds. ``mixed`` is
True for a later record of an auto-detected file, so a record of another valid format is reported
as a mixed file rather than a bad value.
"""

from __future__ import annotations

import math
import os
from typing import Any

from .records import DataError, JointPair, Pair, Ranked, Rated, Unpaired

JOINT_PROMPT_FIELDS = ("chosen_prompt", "rejected_prompt")  # a joint pair's prompt per side
SHAPE_FIELDS = {
    "pairs": ("prompt", "chosen", "rejected", "gold", *JOINT_PROMPT_FIELDS),
    "unpaired": ("prompt", "completion", "label"),
    "ranked": ("prompt", "responses", "scores", "ranks"),
    "rated": ("prompt", "response"),
}
CANONICAL_FIELDS = tuple(dict.fromkeys(n for names in SHAPE_FIELDS.values() for n in names))
TEXT_FIELDS = ("prompt", "chosen", "rejected", "gold", "completion", "responses", "response",
               *JOINT_PROMPT_FIELDS)
# the fields that identify a shape; "responses" must also hold a list
SIGNATURES = {"pairs": ("chosen", "rejected"), "unpaired": ("completion", "label"),
              "ranked": ("responses",), "rated": ("response",)}
LABEL_STRINGS = {"true": True, "false": False, "1": True, "0": False}
ASSISTANT_MARKER = "\n\nAssistant:"
FIELDS_HINT = "map column names with fields={...} (config key data.fields)"


# ---------------------------------------------------------------------------------------------
# one parser per shape


def parse_row(shape: str, row: dict, columns: dict, format: str, origin: str, mixed: bool):
    """One source row -> a ``Pair``, ``JointPair``, ``Unpaired``, ``Ranked`` or ``Rated`` record."""
    return PARSERS[shape](row, columns, format, origin, mixed)


def _to_pair(row: dict, columns: dict, format: str, origin: str, mixed: bool) -> Pair | JointPair:
    if _is_joint(row, columns, origin):
        return _to_joint_pair(row, columns, format, origin, mixed)
    chosen = _get(row, columns, "chosen", origin)
    rejected = _get(row, columns, "rejected", origin)
    gold = row.get(columns["gold"])
    if format == "implicit":
        if mixed and row.get(columns["prompt"]) is not None:
            _mismatch(origin, "implicit (no prompt field)", f"field {columns['prompt']!r}")
        prompt, chosen, rejected = _split_implicit(chosen, rejected, columns, origin)
        if gold is not None:
            gold = _strip_prompt(gold, prompt, columns["gold"], origin)
    else:
        prompt = _prompt(row, columns, format, origin, mixed)
        chosen = _reply(chosen, columns, "chosen", format, origin, mixed)
        rejected = _reply(rejected, columns, "rejected", format, origin, mixed)
        if gold is not None:
            gold = _reply(gold, columns, "gold", format, origin, mixed)
    scores = _extras(row, columns, "pairs")
    return Pair(prompt, chosen, rejected, origin=origin, scores=scores, gold=gold)


def _is_joint(row: dict, columns: dict, origin: str) -> bool:
    """Whether a pairs row gives one prompt per side (a joint pair) rather than one shared prompt.

    Null counts as absent, so columnar files can mix both kinds. Half a joint pair, or a joint
    pair that also has a shared prompt, is an error.
    """
    given = [name for name in JOINT_PROMPT_FIELDS if row.get(columns[name]) is not None]
    if not given:
        return False
    if len(given) == 1:
        present, absent = given[0], next(n for n in JOINT_PROMPT_FIELDS if n not in given)
        state = "is empty (null)" if columns[absent] in row else "is missing"
        raise DataError(
            f"{origin}: field {columns[absent]!r} ({absent}) {state}, but {columns[present]!r} "
            f"({present}) is set. A joint pair needs both: the prompt each response answers. "
            f"For one shared prompt use {columns['prompt']!r} alone."
        )
    if row.get(columns["prompt"]) is not None:
        raise DataError(
            f"{origin}: fields {columns['prompt']!r} (prompt) and {columns['chosen_prompt']!r}/"
            f"{columns['rejected_prompt']!r} (chosen_prompt/rejected_prompt) are all set. Give "
            f"one shared prompt (a conditional pair) or one per side (a joint pair), not both."
        )
    return True


def _to_joint_pair(row: dict, columns: dict, format: str, origin: str, mixed: bool) -> JointPair:
    fields = f"fields {columns['chosen_prompt']!r} and {columns['rejected_prompt']!r}"
    if format == "implicit":
        if mixed:
            _mismatch(origin, "implicit (no prompt field)", fields)
        raise DataError(f"{origin}: format 'implicit' splits the prompt off 'chosen' and "
                        f"'rejected', but this record is a joint pair ({fields}). Use format "
                        f"'standard', 'conversational' or 'auto'.")
    if row.get(columns["gold"]) is not None:
        raise DataError(f"{origin}: field {columns['gold']!r} (gold) is set on a joint pair "
                        f"({fields}); a gold response would need a prompt of its own. Drop it.")
    prompts = [_prompt(row, columns, format, origin, mixed, canonical=name)
               for name in JOINT_PROMPT_FIELDS]
    chosen = _reply(_get(row, columns, "chosen", origin), columns, "chosen", format, origin, mixed)
    rejected = _reply(_get(row, columns, "rejected", origin), columns, "rejected", format, origin,
                      mixed)
    return JointPair(*prompts, chosen, rejected, origin=origin,
                     scores=_extras(row, columns, "pairs"))


def _to_unpaired(row: dict, columns: dict, format: str, origin: str, mixed: bool) -> Unpaired:
    completion = _get(row, columns, "completion", origin)
    label = _label(_get(row, columns, "label", origin), columns["label"], origin)
    prompt = _prompt(row, columns, format, origin, mixed)
    completion = _reply(completion, columns, "completion", format, origin, mixed)
    return Unpaired(prompt, completion, label, origin=origin,
                    scores=_extras(row, columns, "unpaired"))


def _to_ranked(row: dict, columns: dict, format: str, origin: str, mixed: bool) -> Ranked:
    column = columns["responses"]
    items = _get(row, columns, "responses", origin)
    if not isinstance(items, list):
        raise DataError(
            f"{origin}: field {column!r} (responses): expected a list of responses (strings or "
            f"assistant message lists), got {describe(items)}. CSV cells cannot hold lists: "
            f"use JSONL, JSON or Parquet for ranked data."
        )
    if len(items) < 2:
        raise DataError(
            f"{origin}: field {column!r} (responses): a ranked record needs at least 2 "
            f"responses, got {len(items)}. For one response with a thumbs-up/down use the "
            f"unpaired shape (completion + label)."
        )
    prompt = _prompt(row, columns, format, origin, mixed)
    responses = tuple(
        _reply(item, columns, "responses", format, origin, mixed, item=k)
        for k, item in enumerate(items)
    )
    return Ranked(prompt, responses, _response_scores(row, columns, len(items), origin),
                  origin=origin, scores=_extras(row, columns, "ranked"))


def _to_rated(row: dict, columns: dict, format: str, origin: str, mixed: bool) -> Rated:
    response = _get(row, columns, "response", origin)
    prompt = _prompt(row, columns, format, origin, mixed)
    response = _reply(response, columns, "response", format, origin, mixed)
    return Rated(prompt, response, origin=origin, scores=_extras(row, columns, "rated"))


PARSERS = {"pairs": _to_pair, "unpaired": _to_unpaired, "ranked": _to_ranked, "rated": _to_rated}


# ---------------------------------------------------------------------------------------------
# fields


def _get(row: dict, columns: dict, canonical: str, origin: str) -> Any:
    column = columns[canonical]
    value = row.get(column)
    if value is None:
        state = "is empty (null)" if column in row else "is missing"
        raise DataError(
            f"{origin}: field {column!r} ({canonical}) {state}; fields present: "
            f"{present_fields(row)}. If the {canonical} is under another name, {FIELDS_HINT}, "
            f"e.g. fields={{'{canonical}': '<column>'}}."
        )
    return value


def _prompt(row: dict, columns: dict, format: str, origin: str, mixed: bool,
            canonical: str = "prompt") -> Any:
    """A prompt field (``prompt``, or a joint pair's ``chosen_prompt``/``rejected_prompt``)."""
    prompt = _get(row, columns, canonical, origin)
    column = columns[canonical]
    if format == "standard":
        _expect_string(prompt, f"field {column!r} ({canonical})", origin, mixed)
        return prompt
    if not isinstance(prompt, list):
        if mixed and isinstance(prompt, str):
            _mismatch(origin, "conversational", f"a string in {column!r}")
        raise DataError(
            f"{origin}: field {column!r} ({canonical}): format 'conversational' "
            f"expects a list of {{role, content}} messages, got {describe(prompt)}. "
            f"Use format='standard' for plain-string prompts."
        )
    return _messages(prompt, column, origin)


def _reply(value: Any, columns: dict, canonical: str, format: str, origin: str, mixed: bool,
           item: int | None = None) -> Any:
    """A response field: a string, or (conversational) a string or an assistant message list."""
    column = columns[canonical] if item is None else f"{columns[canonical]}[{item}]"
    if format == "standard":
        where = f"field {columns[canonical]!r} ({canonical})"
        _expect_string(value, where if item is None else f"{where}, item {item}", origin, mixed)
        return value
    return _response(value, column, origin)


def _label(value: Any, column: str, origin: str) -> bool:
    if isinstance(value, bool):
        return value
    if _is_number(value) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in LABEL_STRINGS:
        return LABEL_STRINGS[value.strip().lower()]
    raise DataError(
        f"{origin}: field {column!r} (label): expected true or false (a boolean, 0/1, or the "
        f"strings \"true\"/\"false\"), got {describe(value)}. The label says whether the "
        f"completion is desirable; fix the record."
    )


def _response_scores(row: dict, columns: dict, count: int, origin: str) -> tuple:
    """The list's scores (higher = better), from ``scores`` or from ``ranks`` (1 = best)."""
    given = [name for name in ("scores", "ranks") if row.get(columns[name]) is not None]
    if len(given) != 1:
        names = f"{columns['scores']!r} (scores) and {columns['ranks']!r} (ranks)"
        raise DataError(
            f"{origin}: fields {names}: " + (
                "both are set; give one of them." if given else
                f"both are missing (fields present: {present_fields(row)}). A ranked record needs "
                f"one score per response (higher = better) or one rank per response (1 = best); "
                f"if they are under another name, {FIELDS_HINT}."
            )
        )
    canonical = given[0]
    column, values = columns[canonical], row[columns[canonical]]
    singular = canonical[:-1]
    if not isinstance(values, list):
        raise DataError(f"{origin}: field {column!r} ({canonical}): expected a list of numbers, "
                        f"one per response, got {describe(values)}.")
    if len(values) != count:
        raise DataError(
            f"{origin}: fields {columns['responses']!r} and {column!r}: {count} responses but "
            f"{len(values)} {canonical}; give one {singular} per response, in the same order."
        )
    for k, value in enumerate(values):
        if canonical == "scores":
            ok = _is_number(value) and math.isfinite(value)
            expected = "a finite number"
        else:
            ok = _is_number(value) and float(value).is_integer() and 1 <= value <= count
            expected = f"a whole number from 1 (best) to {count}"
        if not ok:
            raise DataError(f"{origin}: field {column!r} ({canonical}), item {k}: expected "
                            f"{expected}, got {describe(value)}. Fix the record.")
    if canonical == "ranks":
        return tuple(float(count + 1 - rank) for rank in values)  # rank 1 of K scores K
    return tuple(float(value) for value in values)


def _extras(row: dict, columns: dict, shape: str) -> dict:
    """Numeric side columns for the batch; true/false become 1.0/0.0 (e.g. TODO's ``tie``)."""
    used = {columns[name] for name in SHAPE_FIELDS[shape]}
    return {name: float(value) if isinstance(value, bool) else value
            for name, value in row.items()
            if name not in used and (_is_number(value) or isinstance(value, bool))}


def _expect_string(value, where: str, origin: str, mixed: bool) -> None:
    if isinstance(value, str):
        return
    if mixed and isinstance(value, list):
        _mismatch(origin, "standard (strings)", f"a message list in {where}")
    raise DataError(
        f"{origin}: {where}: format 'standard' expects a string, got {describe(value)}. "
        f"Fix the record or pick the matching format."
    )


def _mismatch(origin: str, expected: str, found: str) -> None:
    raise DataError(
        f"{origin}: record does not match the file's format: the first record made it "
        f"{expected}, but this one has {found}. Every record in a file must use the same format."
    )


def _messages(value: list, column: str, origin: str) -> list:
    if not value:
        raise DataError(f"{origin}: field {column!r}: empty message list; expected at least one "
                        f"{{role, content}} message.")
    messages = []
    for position, message in enumerate(value):
        where = f"{origin}: field {column!r}, message {position}"
        if not isinstance(message, dict):
            raise DataError(f"{where}: expected an object with 'role' and 'content', got "
                            f"{describe(message)}.")
        for key in ("role", "content"):
            if key not in message or message[key] is None:
                raise DataError(
                    f"{where}: missing {key!r} (keys present: "
                    f"{', '.join(repr(k) for k in message) or 'none'}). Messages must look like "
                    f"{{\"role\": \"user\", \"content\": \"...\"}}."
                )
            if not isinstance(message[key], str):
                raise DataError(f"{where}: {key!r} must be a string, got "
                                f"{describe(message[key])}.")
        # keep every key (some chat templates read e.g. "name"); drop nulls that columnar
        # formats add for keys other rows have
        messages.append({k: v for k, v in message.items() if v is not None})
    return messages


def _response(value: Any, column: str, origin: str) -> str | list:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return _messages(value, column, origin)
    raise DataError(
        f"{origin}: field {column!r}: expected a string or a list of {{role, content}} messages, "
        f"got {describe(value)}. Fix the record."
    )


# ---------------------------------------------------------------------------------------------
# implicit prompts (pairs only)


def _split_implicit(chosen: Any, rejected: Any, columns: dict, origin: str) -> tuple:
    if isinstance(chosen, str) and isinstance(rejected, str):
        return _split_implicit_text(chosen, rejected, origin)
    if isinstance(chosen, list) and isinstance(rejected, list):
        chosen = _messages(chosen, columns["chosen"], origin)
        rejected = _messages(rejected, columns["rejected"], origin)
        return _split_implicit_messages(chosen, rejected, origin)
    for canonical, value in (("chosen", chosen), ("rejected", rejected)):
        if not isinstance(value, (str, list)):
            raise DataError(
                f"{origin}: field {columns[canonical]!r} ({canonical}): expected a whole "
                f"dialogue as a string or a list of messages, got {describe(value)}."
            )
    raise DataError(
        f"{origin}: fields {columns['chosen']!r} and {columns['rejected']!r}: one is a string "
        f"and the other a message list; both must have the same type."
    )


def _split_implicit_text(chosen: str, rejected: str, origin: str) -> tuple[str, str, str]:
    shared = os.path.commonprefix([chosen, rejected])
    cut = shared.rfind(ASSISTANT_MARKER)
    if cut < 0:
        raise DataError(
            f"{origin}: fields 'chosen' and 'rejected' share no turn boundary: no "
            f"{ASSISTANT_MARKER!r} lies in their common prefix, so the prompt cannot be found. "
            f"Implicit-prompt text must follow the '\\n\\nHuman: ...\\n\\nAssistant: ...' layout; "
            f"otherwise add a prompt field or, if it has another name, {FIELDS_HINT}."
        )
    end = cut + len(ASSISTANT_MARKER)
    return chosen[:end], chosen[end:], rejected[end:]


def _split_implicit_messages(chosen: list, rejected: list, origin: str) -> tuple:
    shared = 0
    # each side keeps at least one message as its response
    limit = min(len(chosen), len(rejected)) - 1
    while shared < limit and chosen[shared] == rejected[shared]:
        shared += 1
    # the responses start at an assistant turn; back off to the last one inside the shared part
    while shared > 0 and not (chosen[shared]["role"] == rejected[shared]["role"] == "assistant"):
        shared -= 1
    if shared == 0:
        raise DataError(
            f"{origin}: fields 'chosen' and 'rejected' share no turn boundary: they need a "
            f"common opening (at least one message) followed by an assistant turn where they "
            f"differ. Add a prompt field or, if it has another name, {FIELDS_HINT}."
        )
    return chosen[:shared], chosen[shared:], rejected[shared:]


def _strip_prompt(gold: Any, prompt: Any, column: str, origin: str) -> Any:
    """An implicit-prompt gold dialogue minus the prompt found from chosen and rejected."""
    if isinstance(gold, str) and isinstance(prompt, str) and gold.startswith(prompt):
        return gold[len(prompt):]
    if isinstance(gold, list) and isinstance(prompt, list):
        gold = _messages(gold, column, origin)
        if gold[: len(prompt)] == prompt and len(gold) > len(prompt):
            return gold[len(prompt):]
    raise DataError(
        f"{origin}: field {column!r} (gold): with an implicit prompt the gold response must be "
        f"the whole dialogue, starting with the prompt that 'chosen' and 'rejected' share; it "
        f"does not. Fix the record or add a prompt field."
    )


# ---------------------------------------------------------------------------------------------
# small helpers


def signature(shape: str, columns: dict) -> str:
    return " + ".join(repr(columns[name]) for name in SIGNATURES[shape])


def present_fields(row: dict) -> str:
    return ", ".join(repr(name) for name in row) or "none"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def describe(value: Any) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}"
