"""Source rows -> canonical records, one parser per shape: pairs, unpaired, ranked, rated.

How a file's shape and format are decided is in ``detect.py``; this module parses one row.

``columns`` maps canonical field names to the file's column names. ``format`` is "standard"
(strings), "conversational" (message-list prompts) or "implicit" (pairs only: chosen and
rejected are whole dialogues, see ``dialogues.py``). A pairs row with ``chosen_prompt`` and ``rejected_prompt`` instead
of ``prompt`` is a joint pair (one prompt per side, DOVE); a file may mix both kinds. ``mixed`` is
True for a later record of an auto-detected file, so a record of another valid format is reported
as a mixed file rather than a bad value.
"""

from __future__ import annotations

import math
from typing import Any

from .dialogues import FIELDS_HINT, map_field, split_dialogues, strip_gold
from .records import DataError, JointPair, Pair, Ranked, Rated, Unpaired, describe
from .messages import read_messages

JOINT_PROMPT_FIELDS = ("chosen_prompt", "rejected_prompt")  # a joint pair's prompt per side
SHAPE_FIELDS = {
    "pairs": ("prompt", "chosen", "rejected", "gold", *JOINT_PROMPT_FIELDS),
    "unpaired": ("prompt", "completion", "label"),
    "ranked": ("prompt", "responses", "scores", "ranks", "completions"),
    "rated": ("prompt", "response"),
}
CANONICAL_FIELDS = tuple(dict.fromkeys(n for names in SHAPE_FIELDS.values() for n in names)) \
    + ("images", "negative_images",  # vision-language records (data/images.py)
       "tools",  # the functions a chat prompt offers (data/tools.py)
       "system",  # the system prompt put in front of the prompt (data/system.py)
       "unfinished")  # responses a length limit cut off (data/sources.py)
TEXT_FIELDS = ("prompt", "chosen", "rejected", "gold", "completion", "responses", "response",
               *JOINT_PROMPT_FIELDS)
# the numeric record fields objectives read (their ``scores`` declarations; a test keeps the
# two in step): data.fields may name the columns that hold them, e.g. UltraFeedback-binarized's
# {chosen_score: score_chosen}
NUMERIC_FIELDS = ("chosen_score", "rejected_score", "chosen_win_prob", "rejected_win_prob",
                  "group", "tie")
# the fields that identify a shape; "responses" must also hold a list (or "completions" be a
# list of objects, UltraFeedback's layout)
SIGNATURES = {"pairs": ("chosen", "rejected"), "unpaired": ("completion", "label"),
              "ranked": ("responses",), "rated": ("response",)}
LABEL_STRINGS = {"true": True, "false": False, "1": True, "0": False}


# ---------------------------------------------------------------------------------------------
# one parser per shape


def parse_row(shape: str, row: dict, columns: dict, format: str, origin: str, mixed: bool,
              unscored: bool = False):
    """One source row -> a ``Pair``, ``JointPair``, ``Unpaired``, ``Ranked`` or ``Rated`` record.
    ``unscored``: a list may carry neither scores nor ranks (they are about to be computed; its
    scores are then zeros)."""
    if shape == "ranked":
        return _to_ranked(row, columns, format, origin, mixed, unscored)
    return PARSERS[shape](row, columns, format, origin, mixed)


def _to_pair(row: dict, columns: dict, format: str, origin: str, mixed: bool) -> Pair | JointPair:
    if _is_joint(row, columns, origin):
        return _to_joint_pair(row, columns, format, origin, mixed)
    chosen = _get(row, columns, "chosen", origin)
    rejected = _get(row, columns, "rejected", origin)
    gold = row.get(columns["gold"])
    if format == "implicit":
        prompt, chosen, rejected = split_dialogues(chosen, rejected, row.get(columns["prompt"]),
                                                   columns, origin, read_messages)
        if gold is not None:
            gold = strip_gold(gold, prompt, columns["gold"], origin, read_messages)
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

    Null counts as absent, so columnar files can mix both kinds (and so does an empty shared
    prompt beside the two: a CSV cell cannot say null). Half a joint pair, or a joint pair
    that also has a shared prompt, is an error.
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
    if row.get(columns["prompt"]) not in (None, ""):
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


def _to_ranked(row: dict, columns: dict, format: str, origin: str, mixed: bool,
               unscored: bool = False) -> Ranked:
    if row.get(columns["responses"]) is None and isinstance(row.get(columns["completions"]), list):
        return _completions_to_ranked(row, columns, format, origin, mixed)
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
    return Ranked(prompt, responses, _response_scores(row, columns, len(items), origin, unscored),
                  origin=origin, scores=_extras(row, columns, "ranked"))


def _completions_to_ranked(row: dict, columns: dict, format: str, origin: str,
                           mixed: bool) -> Ranked:
    """UltraFeedback's layout: ``completions`` objects, each with a response and a score (the
    keys ``columns["response"]`` and ``columns["scores"]``), as one ranked list."""
    column, text_key, score_key = columns["completions"], columns["response"], columns["scores"]
    items = row[column]
    if len(items) < 2:
        raise DataError(f"{origin}: field {column!r} (completions): a ranked record needs at "
                        f"least 2 completions, got {len(items)}.")
    responses, scores = [], []
    for k, item in enumerate(items):
        where = f"{origin}: field {column!r}, item {k}"
        if not isinstance(item, dict) or item.get(text_key) is None:
            keys = ", ".join(repr(key) for key in item) if isinstance(item, dict) else "none"
            raise DataError(f"{where}: expected an object with the response under {text_key!r} "
                            f"(keys present: {keys}); map another key with "
                            f"{map_field('response')}.")
        score = item.get(score_key)
        if not is_number(score) or not math.isfinite(score):
            raise DataError(f"{where}: score {score_key!r} is {describe(score)}, expected a "
                            f"finite number; pick another per-completion score (e.g. "
                            f"fine-grained_score) with {map_field('scores')}.")
        responses.append(_reply(item[text_key], columns, "response", format, origin, mixed))
        scores.append(float(score))
    prompt = _prompt(row, columns, format, origin, mixed)
    return Ranked(prompt, tuple(responses), tuple(scores), origin=origin,
                  scores=_extras(row, columns, "ranked"))


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
            f"e.g. data.fields: {{{canonical}: <column>}}."
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
    return read_messages(prompt, column, origin)


def _reply(value: Any, columns: dict, canonical: str, format: str, origin: str, mixed: bool,
           item: int | None = None) -> Any:
    """A response field: a string, or (conversational) a string or an assistant message list."""
    column = columns[canonical] if item is None else f"{columns[canonical]}[{item}]"
    if format == "standard":
        where = f"field {columns[canonical]!r} ({canonical})"
        _expect_string(value, where if item is None else f"{where}, item {item}", origin, mixed)
        return value
    response = _response(value, column, origin)
    if isinstance(response, list) and response[0]["role"] != "assistant":
        raise DataError(
            f"{origin}: field {column!r}: a message list that starts with a "
            f"{response[0]['role']!r} message, not the assistant's reply: it repeats the prompt "
            f"(a whole dialogue). For pairs use format 'auto' or 'implicit', which check the "
            f"repeated prompt and strip it; otherwise keep only the assistant's messages."
        )
    return response


def _label(value: Any, column: str, origin: str) -> bool:
    if isinstance(value, bool):
        return value
    if is_number(value) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in LABEL_STRINGS:
        return LABEL_STRINGS[value.strip().lower()]
    raise DataError(
        f"{origin}: field {column!r} (label): expected true or false (a boolean, 0/1, or the "
        f"strings \"true\"/\"false\"), got {describe(value)}. The label says whether the "
        f"completion is desirable; fix the record."
    )


def _response_scores(row: dict, columns: dict, count: int, origin: str,
                     unscored: bool = False) -> tuple:
    """The list's scores (higher = better), from ``scores`` or from ``ranks`` (1 = best); zeros
    when it has neither and may be ``unscored``."""
    given = [name for name in ("scores", "ranks") if row.get(columns[name]) is not None]
    if not given and unscored:
        return (0.0,) * count
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
            ok = is_number(value) and math.isfinite(value)
            expected = "a finite number"
        else:
            ok = is_number(value) and float(value).is_integer() and 1 <= value <= count
            expected = f"a whole number from 1 (best) to {count}"
        if not ok:
            raise DataError(f"{origin}: field {column!r} ({canonical}), item {k}: expected "
                            f"{expected}, got {describe(value)}. Fix the record.")
    if canonical == "ranks":
        return tuple(float(count + 1 - rank) for rank in values)  # rank 1 of K scores K
    return tuple(float(value) for value in values)


def _extras(row: dict, columns: dict, shape: str) -> dict:
    """Numeric side columns for the batch; true/false become 1.0/0.0 (e.g. TODO's ``tie``).
    Numbers written as text ("4.5") count for an objective's fields (also under the name the
    map gives them, ``columns``) and for a rated row's columns, which are all its ratings;
    other text stays text."""
    used = {columns[name] for name in SHAPE_FIELDS[shape]}
    extras = {name: number for name, value in row.items()
              if name not in used and (number := side_number(value, shape == "rated"))
              is not None}
    for name in NUMERIC_FIELDS:
        number = side_number(row.get(columns.get(name, name)), text=True)
        if number is not None:
            extras[name] = number
    return extras


def side_number(value, text: bool = True) -> float | None:
    """The number a side column holds: a number, true/false as 1/0, or (``text``) a number
    written as text."""
    if isinstance(value, str):
        return number_in_text(value) if text else None
    return float(value) if is_number(value) or isinstance(value, bool) else None


def number_in_text(text: str) -> float | None:
    """The finite number ``text`` spells ("4.5"), else None."""
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _expect_string(value, where: str, origin: str, mixed: bool) -> None:
    if isinstance(value, str):
        return
    if mixed and isinstance(value, list):
        _mismatch(origin, "standard (strings)", f"a message list in {where}")
    hint = "Fix the record or pick the matching format."
    if isinstance(value, list):
        hint = ("Message-list responses need a message-list prompt ([{\"role\": \"user\", "
                "\"content\": ...}], format 'conversational'); lists that repeat the prompt "
                "before the reply are read with format 'auto' or 'implicit'.")
    raise DataError(f"{origin}: {where}: format 'standard' expects a string, got "
                    f"{describe(value)}. {hint}")


def _mismatch(origin: str, expected: str, found: str) -> None:
    raise DataError(
        f"{origin}: record does not match the file's format: the first record made it "
        f"{expected}, but this one has {found}. Every record in a file must use the same format."
    )


def _response(value: Any, column: str, origin: str) -> str | list:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return read_messages(value, column, origin)
    raise DataError(
        f"{origin}: field {column!r}: expected a string or a list of {{role, content}} messages, "
        f"got {describe(value)}. Fix the record."
    )


# ---------------------------------------------------------------------------------------------
# small helpers


def signature(shape: str, columns: dict) -> str:
    return " + ".join(repr(columns[name]) for name in SIGNATURES[shape])


def present_fields(row: dict) -> str:
    return ", ".join(repr(name) for name in row) or "none"


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
