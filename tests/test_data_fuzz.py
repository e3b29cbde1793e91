"""Fuzzed data files: reading never raises anything but ``DataError``, and with
``data.on_error: skip`` every valid record is kept (JSONL, JSON, CSV, Parquet)."""

import csv
import json

import pyarrow as pa
import pyarrow.parquet as pq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from preftune.data.records import DataError
from preftune.data.sources import load_records

KEYS = ["prompt", "chosen", "rejected", "completion", "label", "responses", "scores", "response",
        "chosen_prompt", "rejected_prompt", "ranks", "score"]
scalars = st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.floats(allow_nan=True),
                    st.text(max_size=6))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.sampled_from(["role", "content", "x"]), inner,
                                                 max_size=3)), max_leaves=6)
rows = st.one_of(st.dictionaries(st.sampled_from(KEYS), values, max_size=5), values)
flat_rows = st.dictionaries(st.sampled_from(["prompt", "chosen", "rejected", "label"]),
                            st.one_of(st.none(), st.text(max_size=5)), max_size=4)
VALID = [{"prompt": f"q{k}", "chosen": f"good {k}", "rejected": f"bad {k}"} for k in range(3)]
FUZZ = settings(max_examples=60, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


def read(path, skip: bool):
    skipped = [] if skip else None
    try:
        return load_records(str(path), skipped=skipped), skipped
    except DataError:
        return None, skipped


@FUZZ
@given(junk=st.lists(rows, max_size=6))
def test_jsonl_and_json_never_raise_anything_but_data_errors(tmp_path, junk):
    lines = [json.dumps(row) for row in junk] + ["{not json", ""]
    (tmp_path / "f.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "f.json").write_text(json.dumps(junk))
    for name in ("f.jsonl", "f.json"):
        for skip in (False, True):
            read(tmp_path / name, skip)  # anything but DataError fails the test


@FUZZ
@given(junk=st.lists(rows, max_size=6), at=st.lists(st.integers(0, 8), min_size=3, max_size=3))
def test_skip_keeps_every_valid_record(tmp_path, junk, at):
    mixed = list(junk)
    for row, position in zip(VALID, sorted(at)):  # valid rows among the junk, first one first
        mixed.insert(min(position, len(mixed)), row)
    mixed.remove(VALID[0])
    mixed.insert(0, VALID[0])
    (tmp_path / "f.jsonl").write_text("".join(json.dumps(row) + "\n" for row in mixed))
    records, skipped = read(tmp_path / "f.jsonl", skip=True)
    kept = {(r.prompt, r.chosen, r.rejected) for r in records}
    assert {(v["prompt"], v["chosen"], v["rejected"]) for v in VALID} <= kept
    assert len(records) + len(skipped) == len(mixed)


@FUZZ
@given(table=st.lists(flat_rows, min_size=1, max_size=6))
def test_csv_and_parquet_never_raise_anything_but_data_errors(tmp_path, table):
    columns = sorted({key for row in table for key in row}) or ["prompt"]
    with open(tmp_path / "f.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(table)
    pq.write_table(pa.Table.from_pylist([{c: row.get(c) for c in columns} for row in table],
                                        schema=pa.schema([(c, pa.string()) for c in columns])),
                   tmp_path / "f.parquet")
    for name in ("f.csv", "f.parquet"):
        for skip in (False, True):
            read(tmp_path / name, skip)
