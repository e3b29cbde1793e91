"""A file's shape and format, decided by its first record, and a sentence saying why.

The named layouts are the public datasets' own: ``hh-dialogues`` (Anthropic HH: whole
``\\n\\nHuman: ... \\n\\nAssistant: ...`` strings, no prompt), ``ultrafeedback-binarized`` (a
string prompt that chosen/rejected message lists repeat at their start), ``ultrafeedback``
(a prompt or instruction plus ``completions`` with per-completion scores: a ranked list) and
``helpsteer`` (prompt + response + numeric attribute ratings).
"""

from __future__ import annotations

from dataclasses import dataclass

from .records import DataError
from .shapes import (FIELDS_HINT, JOINT_PROMPT_FIELDS, SIGNATURES, describe, side_number,
                     present_fields, signature)

ULTRAFEEDBACK_SCORE = "overall_score"  # the per-completion score read unless data.fields.scores


@dataclass(frozen=True)
class Detection:
    shape: str
    format: str
    columns: dict  # the column map, with what the layout implies (e.g. prompt <- instruction)
    layout: str  # the name shown to the user
    reason: str


def detect(row: dict, columns: dict, origin: str, shape: str, format: str) -> Detection:
    """The shape and format of a file from its first record (``shape``/``format`` "auto" or
    given), with the column map adjusted for the layout and the reason."""
    shape_given, format_given = shape != "auto", format != "auto"
    if not shape_given:
        shape = detect_shape(row, columns, origin)
    columns = dict(columns)
    if shape == "ranked" and _is_completions(row, columns):
        if row.get(columns["prompt"]) is None and columns["prompt"] == "prompt" \
                and row.get("instruction") is not None:
            columns["prompt"] = "instruction"
        if columns["scores"] == "scores":
            columns["scores"] = ULTRAFEEDBACK_SCORE
    if not format_given:
        format = detect_format(row, columns, origin, shape)
    layout, reason = _explain(row, columns, shape, format)
    how = [f"shape {'set' if shape_given else 'detected'}: {shape}"]
    if format_given:
        how.append(f"format set: {format}")
    return Detection(shape, format, columns, layout, f"{reason} ({'; '.join(how)})")


def _is_completions(row: dict, columns: dict) -> bool:
    items = row.get(columns["completions"])
    return (row.get(columns["responses"]) is None and isinstance(items, list)
            and all(isinstance(item, dict) for item in items))


def shapes_of(row: dict, columns: dict) -> list[str]:
    """The shapes whose identifying fields are all present (non-null) in ``row``."""
    found = []
    for shape, names in SIGNATURES.items():
        values = [row.get(columns[name]) for name in names]
        complete = all(value is not None for value in values)
        if shape == "ranked":
            complete = isinstance(values[0], list) or _is_completions(row, columns)
        if complete:
            found.append(shape)
    return found


def detect_shape(row: dict, columns: dict, origin: str) -> str:
    """The shape of a file's first record: the one whose identifying fields it has."""
    full = shapes_of(row, columns)
    if len(full) == 1:
        return full[0]
    if len(full) > 1:
        raise DataError(
            f"{origin}: cannot tell the record's shape: it has the fields of "
            f"{' and '.join(f'{s} ({signature(s, columns)})' for s in full)}. Choose one with "
            f"shape='pairs', 'unpaired', 'ranked' or 'rated'."
        )
    # nothing complete: go by any identifying column, so the parser names the missing one
    partial = [s for s, names in SIGNATURES.items() if any(columns[n] in row for n in names)]
    if len(partial) == 1:
        return partial[0]
    raise DataError(
        f"{origin}: cannot tell the record's shape from its fields ({present_fields(row)}). "
        f"Expected {signature('pairs', columns)} (pairs), {signature('unpaired', columns)} "
        f"(unpaired), {columns['responses']!r} with {columns['scores']!r} or "
        f"{columns['ranks']!r}, or {columns['completions']!r} (ranked) or "
        f"{columns['response']!r} with numeric ratings (rated). If they are under other names, "
        f"{FIELDS_HINT}."
    )


def check_shape(row: dict, columns: dict, shape: str, origin: str) -> None:
    """Error when a later record plainly has another shape than the file's first one."""
    full = shapes_of(row, columns)
    if full and shape not in full:
        raise DataError(
            f"{origin}: record does not match the file's shape: the first record made it "
            f"{shape} ({signature(shape, columns)}), but this one has "
            f"{signature(full[0], columns)} ({full[0]}). Every record in a file must have the "
            f"same shape; put each shape in its own file."
        )


def repeats_prompt(row: dict, columns: dict) -> bool:
    """A pairs row with a prompt whose chosen and rejected are whole dialogues (message lists
    that start with a non-assistant turn), i.e. they repeat the prompt."""
    values = [row.get(columns[name]) for name in ("chosen", "rejected")]
    return row.get(columns["prompt"]) is not None and all(
        isinstance(v, list) and v and isinstance(v[0], dict) and v[0].get("role") != "assistant"
        for v in values)


def detect_format(row: dict, columns: dict, origin: str, shape: str) -> str:
    """The first record's format, from its prompt (or a joint pair's chosen_prompt), and for
    pairs from whether the responses repeat the prompt."""
    if shape == "pairs" and repeats_prompt(row, columns):
        return "implicit"
    names = [n for n in ("prompt", *JOINT_PROMPT_FIELDS) if row.get(columns[n]) is not None]
    if not names:
        return "implicit"
    prompt = row[columns[names[0]]]
    if isinstance(prompt, list):
        return "conversational"
    if isinstance(prompt, str):
        return "standard"
    raise DataError(
        f"{origin}: field {columns[names[0]]!r} ({names[0]}): expected a string or a list of "
        f"{{role, content}} messages, got {describe(prompt)}. Fix the record."
    )


def _explain(row: dict, columns: dict, shape: str, format: str) -> tuple[str, str]:
    """(layout name, why) for a file's first record."""
    prompt = row.get(columns["prompt"])
    text = "message-list" if isinstance(prompt, list) else "string"
    if shape == "pairs" and format == "implicit":
        if prompt is None:
            if isinstance(row.get(columns["chosen"]), str):
                return "hh-dialogues", ("no prompt column; chosen/rejected are whole "
                                        "'\\n\\nHuman: ... \\n\\nAssistant: ...' dialogues, the "
                                        "prompt is their shared text up to the last shared "
                                        "'\\n\\nAssistant:'")
            return "implicit", ("no prompt column; chosen/rejected are whole message lists, the "
                                "prompt is their shared opening messages")
        if isinstance(prompt, str) and isinstance(row.get(columns["chosen"]), list):
            return "ultrafeedback-binarized", (
                f"string {columns['prompt']!r} + chosen/rejected message lists that start with "
                "the prompt; the repeated opening messages become the prompt (checked against "
                f"{columns['prompt']!r}) and are stripped from the responses")
        return f"implicit with a {text} prompt", (
            f"chosen/rejected are whole dialogues that start with {columns['prompt']!r}; it is "
            "checked against their opening and stripped from the responses")
    if shape == "pairs":
        if row.get(columns["chosen_prompt"]) is not None:
            return "joint pairs", ("chosen_prompt/rejected_prompt: each response answers its own "
                                   "prompt (DOVE)")
        kind = "conversational" if format == "conversational" else "standard"
        return f"{kind} pairs", f"{text} {columns['prompt']!r} + {columns['chosen']!r}/" \
                                f"{columns['rejected']!r} responses"
    if shape == "ranked" and _is_completions(row, columns):
        return "ultrafeedback", (
            f"{columns['prompt']!r} + {columns['completions']!r} (a list of objects): each "
            f"completion's {columns['response']!r} is a response, scored by its "
            f"{columns['scores']!r} (other keys: data.fields: {{response: ..., scores: ...}}, or --column); "
            "read as a ranked list")
    if shape == "ranked":
        by = columns["scores"] if row.get(columns["scores"]) is not None else columns["ranks"]
        return "ranked lists", f"{text} prompt + {columns['responses']!r} list + {by!r}"
    if shape == "rated":
        ratings = rating_columns(row, columns)
        return "helpsteer" if ratings else "rated rows", (
            f"{text} prompt + {columns['response']!r} + numeric ratings "
            f"{', '.join(ratings) or '(none yet)'}")
    return "unpaired", f"{text} prompt + {columns['completion']!r} + {columns['label']!r}"


def rating_columns(row: dict, columns: dict) -> list[str]:
    """The numeric columns of a rated row other than its text fields (HelpSteer's ratings;
    numbers written as text count)."""
    used = {columns[name] for name in ("prompt", "response")}
    return [name for name, value in row.items() if name not in used and is_rating(value)]


def is_rating(value) -> bool:
    """A number, or one written as text ("4"); not true/false."""
    return not isinstance(value, bool) and side_number(value) is not None
