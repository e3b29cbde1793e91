"""Rows of data files: reading JSONL (also gzip-compressed), JSON, Parquet, CSV and saved
datasets into ``(origin, row dict)`` with errors that name the line, and writing JSONL whole.
What the rows mean (their shape, their fields) is ``sources.py``'s."""

from __future__ import annotations

import csv
import gzip
import json
import os
from pathlib import Path
from typing import Any, Iterator

from .hub import DATA_EXTENSIONS, Source, locate
from .records import DataError
from .shapes import TEXT_FIELDS, describe, number_in_text


def write_rows(path, rows, default=None) -> None:
    """``rows`` (dicts, or a generator making them) as JSONL at ``path``, written aside and
    renamed into place, so a reader never sees half a file, and a failure leaves none
    behind; ``default`` is json.dumps' (``str``: values JSON has no type for as text)."""
    staging = f"{os.fspath(path)}.partial"
    try:
        with open(staging, "w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False, default=default) + "\n")
    except BaseException:
        Path(staging).unlink(missing_ok=True)  # (an open that failed made none)
        raise
    os.replace(staging, path)


# an empty CSV cell is an empty text in these (an empty response is counted and left out, as
# a JSONL "" is); elsewhere it is a missing value, as a null in JSONL or Parquet
EMPTY_IS_TEXT = ("prompt", "chosen", "rejected", "completion", "responses", "response", "system")


def csv_text_columns(fields: dict | None) -> dict:
    """The columns whose CSV cells stay text ("2" is an answer, not a number), each with
    whether an empty cell is an empty text (True) or a missing value: the text fields under
    their own names and under the names ``fields`` (data.fields, --column) gives them."""
    names = dict.fromkeys((*TEXT_FIELDS, "system"))
    return {column: name in EMPTY_IS_TEXT for name in names
            for column in {name, (fields or {}).get(name, name)}}


def read_rows(path: str, text_columns: dict,
              bad_lines: list | None = None) -> Iterator[tuple[str, Any]]:
    """(origin, row) of every record of a data path (a file, a dataset directory or hub-cache
    dataset, optionally ``:SPLIT``; see ``hub.py``). A JSONL line that is not valid JSON or
    UTF-8 raises, or with a ``bad_lines`` list is described there and passed over."""
    for _, origin, row in source_rows(locate(path), text_columns, bad_lines):
        yield origin, row


def source_rows(source: Source, text_columns: dict,
                bad_lines: list | None = None) -> Iterator[tuple[str, str, Any]]:
    """(folder, origin, row) of every record of a located ``source`` (``read_rows``'s), the
    folder where the row's relative paths (images) start: its file's (each file of a dataset
    directory its own), a saved dataset's own directory."""
    if source.kind == "saved":
        for origin, row in _read_saved_dataset(source.path, source.split):
            yield source.path, origin, row
        return
    for path in source.files or (source.path,):
        for origin, row in _file_rows(path, text_columns, bad_lines):
            yield os.path.dirname(path), origin, row


def _file_rows(path: str, text_columns: dict,
               bad_lines: list | None) -> Iterator[tuple[str, Any]]:
    extension = os.path.splitext(path)[1].lower()
    if path.lower().endswith(".jsonl.gz"):
        try:
            yield from _read_jsonl(path, bad_lines, opener=gzip.open)
        except (OSError, EOFError) as error:  # not gzip, or cut short
            raise DataError(f"{path}: cannot read as gzip-compressed JSONL ({error}); "
                            f"check that the download is complete.") from None
    elif extension == ".jsonl":
        yield from _read_jsonl(path, bad_lines)
    elif extension == ".json":
        yield from _read_json(path, bad_lines)
    elif extension == ".parquet":
        yield from _read_parquet(path)
    elif extension == ".csv":
        yield from _read_csv(path, text_columns)
    else:
        raise DataError(
            f"{path}: unknown file kind {extension or '(no extension)'!r}; expected one of "
            f"{', '.join(DATA_EXTENSIONS)} or a dataset directory (save_to_disk, or data "
            f"files as on the Hugging Face hub). Rename the file or convert it."
        )


def _open_text(path: str):
    # utf-8-sig tolerates the byte-order mark some editors write
    return open(path, encoding="utf-8-sig", newline="")


class _Repeated(dict):
    """A JSON object that names a key twice (``json`` keeps the last value without a word):
    ``problem`` says which."""

    problem = ""


def _object(pairs: list) -> dict:
    row = dict(pairs)
    if len(row) < len(pairs):
        seen = set()
        key = next(k for k, _ in pairs if k in seen or seen.add(k))
        row = _Repeated(row)
        row.problem = (f"the key {key!r} is given twice in one object "
                       f"({', '.join(k for k, _ in pairs)}); keep the one meant and remove the "
                       "other.")
    return row


def _parse(text: str):
    return json.loads(text, object_pairs_hook=_object)


def _repeated(value) -> str | None:
    """The problem of the first object in ``value`` that repeats a key, or None."""
    if isinstance(value, _Repeated):
        return value.problem
    inner = value.values() if isinstance(value, dict) else value if isinstance(value, list) \
        else ()
    return next((found for item in inner if (found := _repeated(item))), None)


def _read_jsonl(path: str, bad_lines: list | None = None,
                opener=open) -> Iterator[tuple[str, Any]]:
    # bytes, decoded line by line, so a decoding error can name its line
    with opener(path, "rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8-sig" if line_number == 1 else "utf-8")
                if not line.strip():
                    continue
                row = _parse(line.rstrip("\r\n"))  # (a cut line's column stays on it)
                repeated = _repeated(row)
            except UnicodeDecodeError as error:
                problem = (f"{path}:{line_number}: not valid UTF-8 ({error.reason} at byte "
                           f"{error.start}). Re-save the file as UTF-8.")
            except json.JSONDecodeError as error:
                problem = (f"{path}:{line_number}: malformed JSON ({error.msg} at column "
                           f"{error.colno}). Each line must be one complete JSON object; fix or "
                           "remove this line.")
            else:
                if not repeated:
                    yield f"{path}:{line_number}", row
                    continue
                problem = f"{path}:{line_number}: {repeated}"
            if bad_lines is None:
                raise DataError(problem)
            bad_lines.append(problem)


def _read_json(path: str, bad_lines: list | None = None) -> Iterator[tuple[str, Any]]:
    try:
        with _open_text(path) as handle:
            text = handle.read()
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not valid UTF-8 ({error}). Re-save the file as UTF-8.") from None
    if not text.strip():
        return
    try:
        document = _parse(text)
    except json.JSONDecodeError as error:
        if error.msg == "Extra data" and _one_object_per_line(text):
            # JSON Lines under a .json name, as datasets' Dataset.to_json writes by default
            yield from _read_jsonl(path, bad_lines)
            return
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
            f"{describe(document)}. Wrap the records in a list."
        )
    for index, row in enumerate(document):
        repeated = _repeated(row)
        if not repeated:
            yield f"{path}:record {index}", row
        elif bad_lines is None:
            raise DataError(f"{path}:record {index}: {repeated}")
        else:
            bad_lines.append(f"{path}:record {index}: {repeated}")


def _one_object_per_line(text: str) -> bool:
    """Whether ``text``'s first line is one whole JSON object (so the file is JSON Lines)."""
    try:
        return isinstance(json.loads(text.lstrip().split("\n", 1)[0]), dict)
    except json.JSONDecodeError:
        return False


def _read_parquet(path: str) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as parquet

    try:
        table = parquet.read_table(path)
    except Exception as error:  # pyarrow raises several types for unreadable files
        raise DataError(f"{path}: cannot read as Parquet ({error}). Check that the file is "
                        f"a complete Parquet file.") from None
    for index, row in enumerate(table.to_pylist()):
        yield f"{path}:record {index}", columnar_row(row)


def _read_csv(path: str, text_columns: dict) -> Iterator[tuple[str, Any]]:
    with _open_text(path) as handle:
        try:
            reader = csv.DictReader(handle)
            header = reader.fieldnames or []
            repeated = sorted({name for name in header  # (blank ones: trailing commas)
                               if name.strip() and header.count(name) > 1})
            if repeated:
                raise DataError(f"{path}:1: the header names column(s) {', '.join(repeated)} "
                                f"twice ({', '.join(header)}); a row would keep only the last "
                                "one's cell. Rename or remove the extra column.")
            for row in reader:
                # the line the row starts on: it ends on line_num, after its cells' newlines
                start = reader.line_num - sum(value.count("\n") for value in row.values()
                                              if isinstance(value, str))
                # DictReader puts surplus cells under None; a short row gives None values
                if None in row or any(value is None for value in row.values()):
                    raise DataError(
                        f"{path}:{start}: row has {'more' if None in row else 'fewer'} "
                        f"cells than the header ({', '.join(reader.fieldnames or [])}). "
                        f"Quote cells that contain commas or newlines."
                    )
                yield f"{path}:{start}", {k: _csv_cell(v, text_columns.get(k))
                                          for k, v in row.items()}
        except csv.Error as error:
            raise DataError(f"{path}: malformed CSV ({error}).") from None
        except UnicodeDecodeError as error:
            raise DataError(f"{path}: not valid UTF-8 ({error}). Re-save as UTF-8.") from None


def _csv_cell(value: str, text: bool | None) -> Any:
    """A CSV cell as JSON would hold it: CSV has no types, so ``text`` columns (None: not one;
    False: an empty cell is missing) stay text, and other cells that spell a number or
    true/false (as pandas writes booleans) become one, so scores and flags survive."""
    if value == "" and not text:
        return None
    if text is not None:
        return value
    if value.lower() in ("true", "false"):
        return value.lower() == "true"
    number = number_in_text(value)
    return value if number is None else number


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
        yield f"{where}:record {index}", columnar_row(row)


def columnar_row(row: dict) -> dict:
    """A Parquet or Arrow row without the nulls Arrow adds: a struct column holds the union of
    every row's keys, so one row's tool call would carry another's arguments as null (and a
    tool schema, another function's parameters). A column's own null stays (a missing field);
    nested ones are dropped, as the format cannot tell them from absent keys."""
    return {key: _without_nulls(value) for key, value in row.items()}


def _without_nulls(value):
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(item) for item in value]
    return value
