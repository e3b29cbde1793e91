"""Preference data -> canonical records (``Pair``/``JointPair``, ``Unpaired``, ``Ranked``,
``Rated``).

Reads JSONL, JSON, Parquet and CSV files, and dataset directories (``save_to_disk``, data files
as on the Hugging Face hub, hub-cache folders; ``dir:split``; see ``hub.py``), row by row
(``rows.py``). The first record decides the shape and format (``detect.py``, which also says
why); ``shapes.py`` parses each row.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import replace

from .detect import check_shape, detect
from .hub import locate
from .images import attach_images
from .records import SHAPES, DataError
from .rows import csv_text_columns, source_rows
from .shapes import CANONICAL_FIELDS, NUMERIC_FIELDS, describe, parse_row
from .system import attach_system, check_same_system
from .tools import attach_tools

FORMATS = ("auto", "standard", "conversational", "implicit")


def load_records(path: str, format: str = "auto", fields: dict | None = None,
                 shape: str = "auto", skipped: list | None = None,
                 detected: list | None = None, unscored_lists: bool = False) -> list:
    """Read a preference file into ``Pair``, ``JointPair``, ``Unpaired`` or ``Ranked`` records.

    ``shape`` is "auto" (decided by the first record's fields; every record must then match),
    "pairs", "unpaired", "ranked" or "rated". ``format`` is "auto" (decided by the first record),
    "standard", "conversational" or "implicit" (pairs only: chosen/rejected are whole dialogues;
    the prompt is their shared opening, and a prompt column is checked against it and stripped
    from them, as in UltraFeedback-binarized). A pairs record with
    ``chosen_prompt`` and ``rejected_prompt`` (and no ``prompt``) becomes a ``JointPair``; a file
    may mix these with ordinary pairs. ``fields`` maps canonical names (prompt, chosen, rejected,
    gold, chosen_prompt, rejected_prompt, completion, label, responses, scores, ranks, response)
    to the
    file's column names, e.g. ``{"prompt": "question"}``. Numeric extra columns go to
    ``record.scores``. ``origin`` is ``path:LINE`` (1-based; a CSV row's first line) for JSONL
    and CSV, and ``path:record I`` (0-based) otherwise. With a ``skipped`` list, a malformed
    record is left out and its error
    message appended there instead of raised (``data.on_error: skip``); problems with the file
    itself (missing, unreadable, no valid record at all) still raise. With a ``detected`` list,
    ``{source, layout, why}`` is appended: where the rows came from, the layout found and why.
    With ``unscored_lists`` a list may carry neither scores nor ranks (``rm score`` computes
    them); its scores are zeros.
    """
    if format not in FORMATS:
        raise DataError(f"{path}: unknown format {format!r}; expected one of {', '.join(FORMATS)}.")
    if shape != "auto" and shape not in SHAPES:
        raise DataError(f"{path}: unknown shape {shape!r}; expected auto, {', '.join(SHAPES)}.")
    if format == "implicit" and shape not in ("auto", "pairs"):
        raise DataError(f"{path}: format 'implicit' (no prompt field) applies to pairs only; "
                        f"{shape} records need a prompt field.")
    columns = _column_map(path, fields)
    source = locate(path)
    records: list = []
    detection, first_row = None, {}
    seen: set = set()  # the columns the rows have (a mapped one none has is misspelt)
    for folder, origin, row in source_rows(source, csv_text_columns(fields), skipped):
        if isinstance(row, dict):
            seen.update(row)
        try:
            if not isinstance(row, dict):
                raise DataError(
                    f"{origin}: expected an object with preference fields (e.g. prompt, chosen, "
                    f"rejected), got {describe(row)}. Each record must be a JSON object (one per "
                    f"line in JSONL)."
                )
            with _misspelt_columns(row, fields, origin, first=detection is None):
                found = detection or detect(row, columns, origin, shape, format)
                if detection is not None and shape == "auto":
                    check_shape(row, found.columns, found.shape, origin)
                # in auto mode a later record of another valid format is a mixed file, not a
                # bad value
                mixed = format == "auto" and bool(records)
                record = parse_row(found.shape, row, found.columns, found.format, origin, mixed,
                                   unscored_lists)
            record = attach_images(record, row, found.columns, origin, folder)
            record = attach_system(record, row, found.columns, origin,
                                   found.format == "implicit")
            record = attach_tools(record, row, found.columns, origin)
            record = attach_unfinished(record, row, origin)
            if records:
                _check_consistent(record, records[0], found.columns)
                check_same_system(row, first_row, found.columns, origin)
        except DataError as error:
            if skipped is None:
                raise
            skipped.append(str(error))
            continue
        if detection is None and detected is not None:
            system = (f"; {found.columns['system']!r} opens each prompt as its system message "
                      "(the prompt is a conversation)" if found.columns["system"] in row else "")
            detected.append({"source": source.description, "layout": found.layout,
                             "why": found.reason + system})
        if not records:
            first_row = row
        detection = found
        records.append(record)
    _check_mapped_columns(path, fields, seen, first_row)
    if not records and skipped:
        raise DataError(f"{path}: none of its {len(skipped)} records is valid; the first "
                        f"problem: {skipped[0]}")
    if not records:
        raise DataError(
            f"{path}: no records found (the file is empty). Expected preference records "
            f"(prompt + chosen + rejected, prompt + completion + label, or prompt + responses + "
            f"scores); check the path or the file's contents."
        )
    return records


# ---------------------------------------------------------------------------------------------
# field names


def _column_map(path: str, fields: dict | None) -> dict:
    columns = {name: name for name in CANONICAL_FIELDS + NUMERIC_FIELDS}
    for canonical, column in (fields or {}).items():
        if canonical not in columns:
            raise DataError(
                f"{path}: the field map (data.fields, --column) has unknown key {canonical!r}; "
                f"keys are canonical names ({', '.join(CANONICAL_FIELDS)}) or numeric fields "
                f"({', '.join(NUMERIC_FIELDS)}), and values the file's column names."
            )
        if not isinstance(column, str):
            raise DataError(f"{path}: fields[{canonical!r}] must be a column name (a string).")
        columns[canonical] = column
    return columns


@contextmanager
def _misspelt_columns(row: dict, fields: dict | None, origin: str, first: bool):
    """When a file's first record cannot be read and a column that ``fields`` (data.fields)
    names is not in it, that misspelt name is the error (not the layout it led to)."""
    try:
        yield
    except DataError:
        present = _keys(row)  # a completion's keys too (response, scores inside completions)
        missing = [(k, c) for k, c in (fields or {}).items() if first and c not in present]
        if missing:
            canonical, column = missing[0]
            raise DataError(f"{origin}: the field map (data.fields, --column) maps "
                            f"{canonical!r} to column {column!r}, which the record lacks; its "
                            f"fields are {', '.join(map(repr, row))}. Fix the column name.") \
                from None
        raise


def _check_mapped_columns(path: str, fields: dict | None, seen: set, first_row: dict) -> None:
    """Every column the field map names is in some record of ``path`` (nested ones, such as a
    completion's response, in the first): an optional field's misspelt column would otherwise
    be read as absent, silently."""
    for canonical, column in (fields or {}).items():
        if column not in seen and column not in _keys(first_row):
            raise DataError(f"{path}: the field map (data.fields, --column) maps {canonical!r} "
                            f"to column {column!r}, which no record has (the first has "
                            f"{', '.join(map(repr, first_row))}). Fix the column name, or "
                            "remove the mapping.")


def _keys(value) -> set:
    """Every key of ``value`` and of the objects nested in it."""
    if isinstance(value, dict):
        return set(value).union(*(_keys(v) for v in value.values()))
    if isinstance(value, list):
        return set().union(*(_keys(v) for v in value))
    return set()


# ---------------------------------------------------------------------------------------------
# records of one file


def _check_consistent(record, first, columns: dict) -> None:
    """Pairs of one file either all have a gold response or none does (it is a response slot).

    Joint pairs have no gold slot, so they count as pairs without one.
    """
    gold, first_gold = getattr(record, "gold", None), getattr(first, "gold", None)
    if record.shape != "pairs" or (gold is None) == (first_gold is None):
        return
    column = columns["gold"]
    state = ("is missing or null, but the first record has a gold response"
             if gold is None else "is set, but the first record has no gold response")
    raise DataError(
        f"{record.origin}: field {column!r} (gold) {state}. Either every pair of a file has a "
        f"gold response or none does (it sets the number of responses per example); fix the "
        f"record or split the file."
    )


def attach_unfinished(record, row: dict, origin: str):
    """``record`` with the row's ``unfinished``: the positions of its responses (chosen 0,
    rejected 1, gold 2; a list's own order; an unpaired completion 0) that a length limit cut
    off, as online rounds write them for samples that reached max_new_tokens. They are trained
    as they are, with no end of turn after them (the model did not end them)."""
    value = row.get("unfinished")
    if value is None:
        return record
    count = len(getattr(record, "responses", ()))
    if not hasattr(record, "unfinished"):
        raise DataError(f"{origin}: field 'unfinished' is read for pairs, ranked lists and "
                        f"unpaired records, not {record.shape} records; remove it.")
    if not isinstance(value, list) or not all(
            isinstance(k, int) and not isinstance(k, bool) and 0 <= k < count for k in value):
        raise DataError(f"{origin}: field 'unfinished' is {describe(value)}; it lists the "
                        f"positions (0 to {count - 1}) of the responses cut off at a length "
                        "limit, e.g. [1].")
    return replace(record, unfinished=tuple(sorted(set(value))))
