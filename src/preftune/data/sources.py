"""Preference data files -> canonical ``Pair`` records.

Reads JSONL, JSON, Parquet, CSV and Hugging Face datasets saved with ``save_to_disk``, in the
standard (prompt/chosen/rejected strings), conversational (message lists) or implicit (no prompt:
chosen and rejected share a prefix) format.
"""

from __future__ import annotations

import csv
import json
import math
import os
from typing import Any, Iterator

from .records import DataError, Pair

FORMATS = ("auto", "standard", "conversational", "implicit")
CANONICAL_FIELDS = ("prompt", "chosen", "rejected")
EXTENSIONS = (".jsonl", ".json", ".parquet", ".csv")
ASSISTANT_MARKER = "\n\nAssistant:"
FIELDS_HINT = "map column names with fields={...} (config key data.fields)"


def load_records(path: str, format: str = "auto", fields: dict | None = None) -> list[Pair]:
    """Read a preference file into ``Pair`` records.

    ``format`` is "auto" (decided by the first record; every record must then match),
    "standard", "conversational" or "implicit". ``fields`` maps canonical names to the file's
    column names, e.g. ``{"prompt": "question"}``. Numeric extra columns go to ``Pair.scores``.
    ``origin`` is ``path:LINE`` (1-based) for JSONL and ``path:record I`` (0-based) otherwise.
    """
    if format not in FORMATS:
        raise DataError(f"{path}: unknown format {format!r}; expected one of {', '.join(FORMATS)}.")
    columns = _column_map(path, fields)
    records: list[Pair] = []
    detected = None if format == "auto" else format
    for origin, row in _read_rows(path, set(columns.values())):
        if not isinstance(row, dict):
            raise DataError(
                f"{origin}: expected an object with fields {', '.join(CANONICAL_FIELDS)}, "
                f"got {_describe(row)}. Each record must be a JSON object (one per line in JSONL)."
            )
        if detected is None:
            detected = _detect_format(row, columns, origin)
        # in auto mode a later record of another valid shape is a mixed file, not a bad value
        mixed = format == "auto" and bool(records)
        records.append(_to_pair(row, columns, detected, origin, mixed))
    if not records:
        raise DataError(
            f"{path}: no records found (the file is empty). Expected preference records with "
            f"fields {', '.join(CANONICAL_FIELDS)}; check the path or the file's contents."
        )
    return records


# ---------------------------------------------------------------------------------------------
# reading files into (origin, row dict)


def _read_rows(path: str, text_columns: set) -> Iterator[tuple[str, Any]]:
    split = None
    if not os.path.exists(path):
        # "dir:split" selects a split of a saved DatasetDict
        base, _, maybe_split = path.rpartition(":")
        if base and os.path.isdir(base) and maybe_split:
            path, split = base, maybe_split
        else:
            raise DataError(f"{path}: file not found. Check the path (relative paths start at "
                            f"{os.getcwd()}).")
    if os.path.isdir(path):
        yield from _read_saved_dataset(path, split)
        return
    extension = os.path.splitext(path)[1].lower()
    if extension == ".jsonl":
        yield from _read_jsonl(path)
    elif extension == ".json":
        yield from _read_json(path)
    elif extension == ".parquet":
        yield from _read_parquet(path)
    elif extension == ".csv":
        yield from _read_csv(path, text_columns)
    else:
        raise DataError(
            f"{path}: unknown file kind {extension or '(no extension)'!r}; expected one of "
            f"{', '.join(EXTENSIONS)} or a directory written by datasets.Dataset.save_to_disk. "
            f"Rename the file or convert it."
        )


def _open_text(path: str):
    # utf-8-sig tolerates the byte-order mark some editors write
    return open(path, encoding="utf-8-sig", newline="")


def _read_jsonl(path: str) -> Iterator[tuple[str, Any]]:
    # bytes, decoded line by line, so a decoding error can name its line
    with open(path, "rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8-sig" if line_number == 1 else "utf-8")
            except UnicodeDecodeError as error:
                raise DataError(f"{path}:{line_number}: not valid UTF-8 ({error.reason} at "
                                f"byte {error.start}). Re-save the file as UTF-8.") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(
                    f"{path}:{line_number}: malformed JSON ({error.msg} at column {error.colno}). "
                    f"Each line must be one complete JSON object; fix or remove this line."
                ) from None
            yield f"{path}:{line_number}", row


def _read_json(path: str) -> Iterator[tuple[str, Any]]:
    try:
        with _open_text(path) as handle:
            text = handle.read()
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not valid UTF-8 ({error}). Re-save the file as UTF-8.") from None
    if not text.strip():
        return
    try:
        document = json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(
            f"{path}: malformed JSON ({error.msg} at line {error.lineno}, column {error.colno}). "
            f"A .json file must hold one JSON list of records (or {{\"data\": [...]}}); "
            f"for one object per line name the file .jsonl."
        ) from None
    if isinstance(document, dict) and isinstance(document.get("data"), list):
        document = document["data"]
    if not isinstance(document, list):
        raise DataError(
            f"{path}: expected a JSON list of records or an object with a \"data\" list, got "
            f"{_describe(document)}. Wrap the records in a list."
        )
    for index, row in enumerate(document):
        yield f"{path}:record {index}", row


def _read_parquet(path: str) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as parquet

    try:
        table = parquet.read_table(path)
    except Exception as error:  # pyarrow raises several types for unreadable files
        raise DataError(f"{path}: cannot read as Parquet ({error}). Check that the file is "
                        f"a complete Parquet file.") from None
    for index, row in enumerate(table.to_pylist()):
        yield f"{path}:record {index}", row


def _read_csv(path: str, text_columns: set) -> Iterator[tuple[str, Any]]:
    with _open_text(path) as handle:
        try:
            reader = csv.DictReader(handle)
            for index, row in enumerate(reader):
                # DictReader puts surplus cells under None; a short row gives None values
                if None in row or any(value is None for value in row.values()):
                    raise DataError(
                        f"{path}:record {index}: row has {'more' if None in row else 'fewer'} "
                        f"cells than the header ({', '.join(reader.fieldnames or [])}). "
                        f"Quote cells that contain commas or newlines."
                    )
                yield f"{path}:record {index}", {
                    k: v if k in text_columns else _csv_number(v) for k, v in row.items()
                }
        except csv.Error as error:
            raise DataError(f"{path}: malformed CSV ({error}).") from None
        except UnicodeDecodeError as error:
            raise DataError(f"{path}: not valid UTF-8 ({error}). Re-save as UTF-8.") from None


def _csv_number(value: str) -> Any:
    # CSV has no types: extra columns that hold numbers become numbers so scores survive
    try:
        number = float(value)
    except ValueError:
        return value
    return number if math.isfinite(number) else value


def _read_saved_dataset(path: str, split: str | None) -> Iterator[tuple[str, Any]]:
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"{path}: reading a saved Hugging Face dataset needs the `datasets` package; "
            f"install it with `pip install datasets` (or `pip install preftune[datasets]`)."
        ) from None
    try:
        loaded = datasets.load_from_disk(path)
    except FileNotFoundError as error:
        raise DataError(
            f"{path}: a directory, but not a dataset saved with Dataset.save_to_disk ({error}). "
            f"Point at a data file or at the directory save_to_disk wrote."
        ) from None
    where = path
    if isinstance(loaded, datasets.DatasetDict):
        wanted = split or "train"
        if wanted not in loaded:
            raise DataError(
                f"{path}: the saved dataset has no split {wanted!r} (splits: "
                f"{', '.join(loaded.keys())}). Choose one with '{path}:SPLIT'."
            )
        loaded, where = loaded[wanted], f"{path}:{wanted}"
    elif split is not None:
        raise DataError(f"{path}: a single dataset with no splits; drop the ':{split}' suffix.")
    for index, row in enumerate(loaded):
        yield f"{where}:record {index}", row


# ---------------------------------------------------------------------------------------------
# rows -> Pair


def _column_map(path: str, fields: dict | None) -> dict:
    columns = {name: name for name in CANONICAL_FIELDS}
    for canonical, column in (fields or {}).items():
        if canonical not in CANONICAL_FIELDS:
            raise DataError(
                f"{path}: fields= has unknown key {canonical!r}; keys are canonical names "
                f"({', '.join(CANONICAL_FIELDS)}) and values the file's column names."
            )
        if not isinstance(column, str):
            raise DataError(f"{path}: fields[{canonical!r}] must be a column name (a string).")
        columns[canonical] = column
    return columns


def _detect_format(row: dict, columns: dict, origin: str) -> str:
    prompt = row.get(columns["prompt"])
    if prompt is None:
        return "implicit"
    if isinstance(prompt, list):
        return "conversational"
    if isinstance(prompt, str):
        return "standard"
    raise DataError(
        f"{origin}: field {columns['prompt']!r} (prompt): expected a string or a list of "
        f"{{role, content}} messages, got {_describe(prompt)}. Fix the record."
    )


def _to_pair(row: dict, columns: dict, format: str, origin: str, mixed: bool) -> Pair:
    used = {columns["chosen"], columns["rejected"]}
    chosen = _get(row, columns, "chosen", origin)
    rejected = _get(row, columns, "rejected", origin)
    if format == "implicit":
        if mixed and row.get(columns["prompt"]) is not None:
            _mismatch(origin, "implicit (no prompt field)", f"field {columns['prompt']!r}")
        prompt, chosen, rejected = _split_implicit(chosen, rejected, columns, origin)
    else:
        used.add(columns["prompt"])
        prompt = _get(row, columns, "prompt", origin)
        if format == "standard":
            for canonical, value in (("prompt", prompt), ("chosen", chosen),
                                     ("rejected", rejected)):
                _expect_string(value, columns, canonical, origin, mixed)
        else:
            if not isinstance(prompt, list):
                if mixed and isinstance(prompt, str):
                    _mismatch(origin, "conversational", f"a string in {columns['prompt']!r}")
                raise DataError(
                    f"{origin}: field {columns['prompt']!r} (prompt): format 'conversational' "
                    f"expects a list of {{role, content}} messages, got {_describe(prompt)}. "
                    f"Use format='standard' for plain-string prompts."
                )
            prompt = _messages(prompt, columns["prompt"], origin)
            chosen = _response(chosen, columns["chosen"], origin)
            rejected = _response(rejected, columns["rejected"], origin)
    scores = {
        name: value for name, value in row.items()
        if name not in used and name != columns["prompt"] and _is_number(value)
    }
    return Pair(prompt=prompt, chosen=chosen, rejected=rejected, origin=origin, scores=scores)


def _get(row: dict, columns: dict, canonical: str, origin: str) -> Any:
    column = columns[canonical]
    value = row.get(column)
    if value is None:
        present = ", ".join(repr(name) for name in row) or "none"
        state = "is empty (null)" if column in row else "is missing"
        raise DataError(
            f"{origin}: field {column!r} ({canonical}) {state}; fields present: {present}. "
            f"If the {canonical} is under another name, {FIELDS_HINT}, "
            f"e.g. fields={{'{canonical}': '<column>'}}."
        )
    return value


def _expect_string(value, columns: dict, canonical: str, origin: str, mixed: bool) -> None:
    if isinstance(value, str):
        return
    if mixed and isinstance(value, list):
        _mismatch(origin, "standard (strings)", f"a message list in {columns[canonical]!r}")
    raise DataError(
        f"{origin}: field {columns[canonical]!r} ({canonical}): format 'standard' expects a "
        f"string, got {_describe(value)}. Fix the record or pick the matching format."
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
                            f"{_describe(message)}.")
        for key in ("role", "content"):
            if key not in message or message[key] is None:
                raise DataError(
                    f"{where}: missing {key!r} (keys present: "
                    f"{', '.join(repr(k) for k in message) or 'none'}). Messages must look like "
                    f"{{\"role\": \"user\", \"content\": \"...\"}}."
                )
            if not isinstance(message[key], str):
                raise DataError(f"{where}: {key!r} must be a string, got "
                                f"{_describe(message[key])}.")
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
        f"got {_describe(value)}. Fix the record."
    )


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
                f"dialogue as a string or a list of messages, got {_describe(value)}."
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


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _describe(value: Any) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}"
