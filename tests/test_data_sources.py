import csv
import json

import pytest

from preftune.data.records import DataError, Pair
from preftune.data.rows import read_rows
from preftune.data.sources import load_records

STANDARD = [
    {"prompt": "What is 2+2?", "chosen": "4", "rejected": "5", "chosen_score": 9.0,
     "rejected_score": 2, "note": "text columns are not scores"},
    {"prompt": "Capital of France?", "chosen": "Paris", "rejected": "Rome", "chosen_score": 8.5,
     "rejected_score": 1, "note": ""},
]
CONVERSATIONAL = [
    {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
     "chosen": [{"role": "assistant", "content": "Hello!"}],
     "rejected": [{"role": "assistant", "content": "Go away."}]},
    {"prompt": [{"role": "user", "content": "2+2?"}], "chosen": "4", "rejected": "22"},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def check_standard(pairs, second_origin):
    assert [p.prompt for p in pairs] == ["What is 2+2?", "Capital of France?"]
    assert [p.chosen for p in pairs] == ["4", "Paris"]
    assert [p.rejected for p in pairs] == ["5", "Rome"]
    assert pairs[0].scores == {"chosen_score": 9.0, "rejected_score": 2}
    assert all(isinstance(p, Pair) and not p.is_conversational for p in pairs)
    assert pairs[1].origin == second_origin


# ---- file kinds ----


def test_jsonl_standard_with_scores_and_blank_lines(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(STANDARD[0]) + "\n\n   \n" + json.dumps(STANDARD[1]) + "\n")
    pairs = load_records(str(path))
    assert pairs[0].origin == f"{path}:1"
    assert pairs[1].origin == f"{path}:4"  # blank lines skipped, line numbers kept
    assert pairs[1].scores == {"chosen_score": 8.5, "rejected_score": 1}


@pytest.mark.parametrize("wrapped", [False, True])
def test_json_list_or_data_object(tmp_path, wrapped):
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"data": STANDARD} if wrapped else STANDARD))
    check_standard(load_records(str(path)), f"{path}:record 1")


def test_json_lines_saved_as_json_are_read_as_lines(tmp_path):
    """datasets' Dataset.to_json writes one object per line, whatever the file is named."""
    path = tmp_path / "d.json"
    path.write_text("".join(json.dumps(row) + "\n" for row in STANDARD))
    check_standard(load_records(str(path)), f"{path}:2")
    path.write_text(path.read_text() + '{"prompt": "cut\n')
    with pytest.raises(DataError, match=rf"{path}:3: malformed JSON \(Unterminated string"):
        load_records(str(path))


def test_a_key_given_twice_is_refused_not_read_as_its_last_value(tmp_path):
    """json keeps the last of two values of one key, so a generator's slip (two "chosen") would
    train on whichever came last; the file, line and key are named instead."""
    good = json.dumps(STANDARD[0])
    twice = '{"prompt": "p", "chosen": "a", "rejected": "b", "chosen": "c"}'
    lines = tmp_path / "d.jsonl"
    lines.write_text(f"{good}\n{twice}\n")
    with pytest.raises(DataError, match=rf"^{lines}:2: the key 'chosen' is given twice in one "
                       r"object \(prompt, chosen, rejected, chosen\); keep the one meant"):
        load_records(str(lines))
    nested = tmp_path / "d.json"  # (inside a message too)
    nested.write_text(json.dumps([STANDARD[0]])[:-1] + ', {"prompt": [{"role": "user", '
                      '"content": "q", "role": "system"}], "chosen": "a", "rejected": "b"}]')
    with pytest.raises(DataError, match=rf"^{nested}:record 1: the key 'role' is given twice"):
        load_records(str(nested))
    skipped = []  # data.on_error: skip leaves the record out, as any malformed one
    assert [origin for origin, _ in read_rows(str(nested), {}, skipped)] == [f"{nested}:record 0"]
    assert skipped == [f"{nested}:record 1: the key 'role' is given twice in one object (role, "
                       "content, role); keep the one meant and remove the other."]
    table = tmp_path / "d.csv"
    table.write_text("prompt,chosen,rejected,chosen\np,a,b,c\n")
    with pytest.raises(DataError, match=rf"^{table}:1: the header names column\(s\) chosen "
                       r"twice \(prompt, chosen, rejected, chosen\)"):
        load_records(str(table))
    table.write_text("prompt,chosen,rejected,,\np,a,b,,\n")  # (a spreadsheet's trailing commas)
    assert [r.chosen for r in load_records(str(table))] == ["a"]


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(STANDARD), path)
    check_standard(load_records(str(path)), f"{path}:record 1")


def test_csv_numbers_only_in_extra_columns(tmp_path):
    path = tmp_path / "d.csv"
    rows = STANDARD + [{"prompt": "7", "chosen": "8", "rejected": "9, or 10",
                        "chosen_score": "", "rejected_score": "3", "note": "x"}]
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(STANDARD[0]))
        writer.writeheader()
        writer.writerows(rows)
    pairs = load_records(str(path))
    check_standard(pairs[:2], f"{path}:3")  # named by line, as JSONL: line 1 is the header
    assert (pairs[2].prompt, pairs[2].chosen, pairs[2].rejected) == ("7", "8", "9, or 10")
    assert pairs[2].scores == {"rejected_score": 3.0}


@pytest.mark.parametrize("rows", [
    [{"prompt": "q1", "chosen": "a", "rejected": "b", "gold": None, "tie": True},
     {"prompt": "q2", "chosen": "c", "rejected": "", "gold": None, "tie": False}],
    [{"chosen_prompt": "x", "rejected_prompt": "y", "prompt": None, "chosen": "a",
      "rejected": "b"},
     {"chosen_prompt": None, "rejected_prompt": None, "prompt": "q", "chosen": "c",
      "rejected": "d"}],
    [{"prompt": "", "completion": "a", "label": True, "tools": None},
     {"prompt": "q", "completion": "b", "label": False, "tools": None}]],
    ids=["gold-and-tie", "joint-and-plain", "unpaired"])
def test_a_csv_reads_as_the_same_rows_with_nulls_and_booleans(tmp_path, rows):
    """CSV has no null and no boolean: an empty cell is a missing value (an empty text where a
    prompt or response belongs, as "" in JSONL), and True/False (as pandas writes them) are
    booleans, so a CSV gives the records its JSONL twin gives."""
    path = tmp_path / "d.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows([{k: "" if v is None else v for k, v in row.items()} for row in rows])
    twin = load_records(write_jsonl(tmp_path / "d.jsonl", rows))
    read = load_records(str(path))
    assert [vars(r) | {"origin": None} for r in read] == [
        vars(r) | {"origin": None} for r in twin]


def test_csv_records_and_errors_name_the_line_a_row_starts_on(tmp_path):
    """A quoted cell may hold newlines and blank lines are skipped: the origin is still the
    row's first line in the file, as an editor shows it."""
    path = tmp_path / "d.csv"
    path.write_text('prompt,chosen,rejected\n"two\nlines",yes,no\n\nq,"a\n\nb",no\n'
                    'q,yes\n')
    with pytest.raises(DataError, match=rf"{path}:8: row has fewer cells than the header"):
        load_records(str(path))
    path.write_text(path.read_text().replace("q,yes\n", "q,yes,no\n"))
    assert [p.origin for p in load_records(str(path))] == [f"{path}:{n}" for n in (2, 5, 8)]


def test_hf_saved_dataset_and_split(tmp_path):
    datasets = pytest.importorskip("datasets")
    single = tmp_path / "single"
    datasets.Dataset.from_list(CONVERSATIONAL[:1] * 2).save_to_disk(str(single))
    pairs = load_records(str(single))
    assert len(pairs) == 2 and pairs[0].is_conversational
    assert pairs[1].origin == f"{single}:record 1"
    assert pairs[0].chosen == [{"role": "assistant", "content": "Hello!"}]

    both = tmp_path / "dict"
    datasets.DatasetDict({
        "train": datasets.Dataset.from_list(STANDARD),
        "test": datasets.Dataset.from_list(STANDARD[:1]),
    }).save_to_disk(str(both))
    check_standard(load_records(str(both)), f"{both}:train:record 1")
    assert len(load_records(f"{both}:test")) == 1
    with pytest.raises(DataError, match="no split 'valid'.*train"):
        load_records(f"{both}:valid")


# ---- formats ----


def test_conversational_messages_or_strings(tmp_path):
    pairs = load_records(write_jsonl(tmp_path / "c.jsonl", CONVERSATIONAL))
    assert pairs[0].prompt[1] == {"role": "user", "content": "Hi"}
    assert pairs[0].rejected == [{"role": "assistant", "content": "Go away."}]
    assert (pairs[1].chosen, pairs[1].rejected) == ("4", "22")
    assert all(p.is_conversational for p in pairs)


def test_field_renaming(tmp_path):
    rows = [{"question": "q", "good": "g", "bad": "b", "score_chosen": 3}]
    pairs = load_records(write_jsonl(tmp_path / "r.jsonl", rows),
                         fields={"prompt": "question", "chosen": "good", "rejected": "bad"})
    assert (pairs[0].prompt, pairs[0].chosen, pairs[0].rejected) == ("q", "g", "b")
    assert pairs[0].scores == {"score_chosen": 3}
    with pytest.raises(DataError, match="unknown key 'answer'"):
        load_records(str(tmp_path / "r.jsonl"), fields={"answer": "good"})


def test_implicit_strings_split_at_last_shared_assistant_turn(tmp_path):
    shared = "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: How are you?\n\nAssistant:"
    rows = [
        {"chosen": shared + " Fine, thanks.", "rejected": shared + " Bad."},
        # responses that share their first words: the prompt still ends at the marker
        {"chosen": shared + " Fine.", "rejected": shared + " Fine?"},
    ]
    pairs = load_records(write_jsonl(tmp_path / "i.jsonl", rows))
    assert pairs[0].prompt == shared
    assert (pairs[0].chosen, pairs[0].rejected) == (" Fine, thanks.", " Bad.")
    assert (pairs[1].prompt, pairs[1].chosen, pairs[1].rejected) == (shared, " Fine.", " Fine?")
    assert load_records(str(tmp_path / "i.jsonl"), format="implicit")[0].prompt == shared


def test_implicit_messages_split_before_differing_assistant_turn(tmp_path):
    opening = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
               {"role": "user", "content": "Joke?"}]
    rows = [
        {"chosen": opening + [{"role": "assistant", "content": "Knock knock."}],
         "rejected": opening + [{"role": "assistant", "content": "No."}]},
        # identical dialogues: the final assistant turn is still the response
        {"chosen": opening + [{"role": "assistant", "content": "Same"}],
         "rejected": opening + [{"role": "assistant", "content": "Same"}]},
    ]
    pairs = load_records(write_jsonl(tmp_path / "m.jsonl", rows))
    assert pairs[0].prompt == opening and pairs[1].prompt == opening
    assert pairs[0].chosen == [{"role": "assistant", "content": "Knock knock."}]
    assert pairs[1].rejected == [{"role": "assistant", "content": "Same"}]


def test_implicit_without_turn_boundary_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "n.jsonl", [{"chosen": "Good answer", "rejected": "Bad answer"}])
    with pytest.raises(DataError, match=r"n\.jsonl:1.*share no turn boundary"):
        load_records(path)
    rows = [{"chosen": [{"role": "assistant", "content": "a"}],
             "rejected": [{"role": "assistant", "content": "b"}]}]
    with pytest.raises(DataError, match="share no turn boundary"):
        load_records(write_jsonl(tmp_path / "nm.jsonl", rows))


def test_auto_format_requires_every_record_to_match(tmp_path):
    rows = [STANDARD[0], CONVERSATIONAL[0]]
    with pytest.raises(DataError, match=r"m\.jsonl:2.*first record.*same format"):
        load_records(write_jsonl(tmp_path / "m.jsonl", rows))
    with pytest.raises(DataError, match=r"s\.jsonl:1.*'prompt'.*expects a string"):
        load_records(write_jsonl(tmp_path / "s.jsonl", CONVERSATIONAL), format="standard")


# ---- malformed input ----


def test_missing_file_and_unknown_extension(tmp_path):
    with pytest.raises(DataError, match="nope.jsonl: file not found"):
        load_records(str(tmp_path / "nope.jsonl"))
    path = tmp_path / "d.txt"
    path.write_text("x")
    with pytest.raises(DataError, match=r"d\.txt: unknown file kind '\.txt'.*\.jsonl"):
        load_records(str(path))


@pytest.mark.parametrize("name,text", [("e.jsonl", ""), ("b.jsonl", "\n  \n"), ("e.json", "[]"),
                                       ("e.csv", "prompt,chosen,rejected\n")])
def test_empty_file(tmp_path, name, text):
    (tmp_path / name).write_text(text)
    with pytest.raises(DataError, match=rf"{name}: no records found"):
        load_records(str(tmp_path / name))


def test_malformed_json_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(STANDARD[0]) + '\n{"prompt": "x", "chosen": \n')
    with pytest.raises(DataError) as error:
        load_records(str(path))
    message = str(error.value)
    # the line is cut after 26 characters: the value is missing at column 27, on that line
    assert message.startswith(f"{path}:2: malformed JSON (Expecting value at column 27)")


def test_missing_field_lists_present_fields_and_suggests_mapping(tmp_path):
    path = write_jsonl(tmp_path / "f.jsonl", [STANDARD[0], {"prompt": "p", "good": "g", "bad": "b"}])
    with pytest.raises(DataError) as error:
        load_records(path)
    message = str(error.value)
    assert f"{path}:2" in message and "'chosen'" in message and "missing" in message
    assert "'good', 'bad'" in message and "data.fields: {chosen: <column>}" in message
    assert ("(--set data.fields.KEY=COLUMN with a training command, --column KEY=COLUMN with "
            "eval, data inspect and the rm commands), or fields={...} in Python") in message


def test_a_right_field_map_is_not_blamed_for_another_problem(tmp_path):
    """A map to a key inside the completions (UltraFeedback's fine-grained_score) is present;
    the first record's real problem, a null score, is the error."""
    row = {"instruction": "2+2?", "completions": [
        {"response": "4", "fine-grained_score": 5.0},
        {"response": "5", "fine-grained_score": None}]}
    path = write_jsonl(tmp_path / "uf.jsonl", [row])
    with pytest.raises(DataError, match=r"uf\.jsonl:1: field 'completions', item 1: score "
                                        r"'fine-grained_score' is NoneType None"):
        load_records(path, fields={"scores": "fine-grained_score"})


def test_a_misspelt_column_in_fields_is_named(tmp_path):
    path = write_jsonl(tmp_path / "f.jsonl", [{"question": "p", "good": "g", "bad": "b"}])
    with pytest.raises(DataError, match=r"f\.jsonl:1: the field map \(data.fields, --column\) maps "
                                        r"'prompt' to column "
                                        r"'questoin', which the record lacks; its fields are "
                                        r"'question', 'good', 'bad'"):
        load_records(path, fields={"prompt": "questoin", "chosen": "good", "rejected": "bad"})
    (record,) = load_records(path, fields={"prompt": "question", "chosen": "good",
                                           "rejected": "bad"})
    assert (record.prompt, record.chosen, record.rejected) == ("p", "g", "b")
    # an optional field's column (the record reads without it) no record has: named too
    path = write_jsonl(tmp_path / "s.jsonl", [{"question": "p", "chosen": "g", "rejected": "b",
                                               "system": "Be brief."}, {"question": "q",
                                               "chosen": "g", "rejected": "b", "sytem": "x"}])
    with pytest.raises(DataError, match=r"s\.jsonl: the field map \(data.fields, --column\) "
                                        r"maps 'system' to column 'sys', which no record has"):
        load_records(path, fields={"prompt": "question", "system": "sys"})


@pytest.mark.parametrize("row,field,expected", [
    ({"prompt": "p", "chosen": 42, "rejected": "r"}, "'chosen'", "expects a string"),
    ({"prompt": [{"role": "user"}], "chosen": "c", "rejected": "r"}, "'prompt', message 0",
     "missing 'content'"),
    # (a null content read "missing 'content' (keys present: 'role', 'content')")
    ({"prompt": [{"role": "user", "content": None}], "chosen": "c", "rejected": "r"},
     "'prompt', message 0", "'content' is null. Messages must look like"),
    ({"prompt": [{"role": 1, "content": "x"}], "chosen": "c", "rejected": "r"},
     "'prompt', message 0", "'role' must be a string"),
    ({"prompt": [{"role": "user", "content": "x"}], "chosen": 3.5, "rejected": "r"}, "'chosen'",
     "expected a string or a list"),
    ({"prompt": [{"role": "user", "content": "x"}], "chosen": ["hi"], "rejected": "r"},
     "'chosen', message 0", "expected an object"),
    ({"prompt": [{"role": "usr", "content": "x"}], "chosen": "c", "rejected": "r"},
     "'prompt', message 0", "role 'usr' is not one chat templates read; did you mean 'user'?"),
    ({"prompt": [{"role": "user", "content": "x"}, {"role": "Assistant", "content": "y"},
                 {"role": "user", "content": "z"}], "chosen": "c", "rejected": "r"},
     "'prompt', message 1", "did you mean 'assistant'?"),
])
def test_wrong_types_name_file_record_and_field(tmp_path, row, field, expected):
    path = tmp_path / "t.json"
    path.write_text(json.dumps([row]))
    with pytest.raises(DataError) as error:
        load_records(str(path))
    message = str(error.value)
    assert f"{path}:record 0" in message and field in message and expected in message


def test_roles_far_from_the_usual_ones_pass_for_a_models_own_template(tmp_path):
    path = tmp_path / "t.json"
    path.write_text(json.dumps([{"prompt": [{"role": "user", "content": "x"},
                                            {"role": "environment", "content": "y"}],
                                 "chosen": "c", "rejected": "r"}]))
    (record,) = load_records(str(path))
    assert [m["role"] for m in record.prompt] == ["user", "environment"]


def test_non_object_line(tmp_path):
    path = tmp_path / "l.jsonl"
    path.write_text("[1, 2]\n")
    with pytest.raises(DataError, match=r"l\.jsonl:1: expected an object"):
        load_records(str(path))


def test_unknown_format_name(tmp_path):
    with pytest.raises(DataError, match="unknown format 'chat'"):
        load_records(write_jsonl(tmp_path / "x.jsonl", STANDARD), format="chat")


def test_numeric_fields_objectives_read_can_come_from_other_columns(tmp_path):
    """UltraFeedback-binarized's score_chosen/score_rejected are odpo's chosen_score and
    rejected_score when data.fields names them; every declared field is a mappable one."""
    from preftune.data.shapes import NUMERIC_FIELDS
    from preftune.objectives import REGISTRY

    declared = {key for spec in REGISTRY.values() for key in spec.scores}
    assert declared == set(NUMERIC_FIELDS)
    path = write_jsonl(tmp_path / "ufb.jsonl", [{"prompt": "p", "chosen": "c", "rejected": "r",
                                                  "score_chosen": 8.0, "score_rejected": 3.5}])
    (record,) = load_records(path, fields={"chosen_score": "score_chosen",
                                           "rejected_score": "score_rejected"})
    assert (record.scores["chosen_score"], record.scores["rejected_score"]) == (8.0, 3.5)
    with pytest.raises(DataError, match="unknown key 'chosen_scor'; keys are canonical names"):
        load_records(path, fields={"chosen_scor": "score_chosen"})


def test_an_objectives_numeric_fields_are_checked_before_the_weights_load(tmp_path):
    """odpo on pairs without scores: refused by record as the data is read (it crashed at step
    1, after the reference pass)."""
    from tiny_models import save_tiny_model_dir

    from preftune.config import build_config
    from preftune.train import loop

    save_tiny_model_dir(tmp_path / "model")
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": f"q{i}", "chosen": "yes",
                                                     "rejected": "no"} for i in range(4)])
    tree = {"output_dir": str(tmp_path / "run"), "model": {"path": str(tmp_path / "model")},
            "data": {"train": pairs}, "objective": {"name": "odpo"}}
    with pytest.raises(DataError, match=r"pairs.jsonl:1: objective odpo needs the numeric fields "
                                        r"chosen_score and rejected_score in every record"):
        loop.train(build_config(tree), show_progress=False)
    assert not (tmp_path / "run" / "config.yaml").exists()  # before anything was written
    # a mapped column that is there but not a number: the message says why it does not count
    scored = write_jsonl(tmp_path / "scored.jsonl", [
        {"prompt": "q", "chosen": "yes", "rejected": "no", "score_chosen": 8, "score_rejected": s}
        for s in (3, "x")])
    tree["data"] = {"train": scored, "fields": {"chosen_score": "score_chosen",
                                                "rejected_score": "score_rejected"}}
    with pytest.raises(DataError, match=r"scored.jsonl:2: objective odpo needs the numeric field "
                                        r"rejected_score in every record \(this one's numeric "
                                        r"fields: chosen_score, score_chosen; a column that holds "
                                        r"text other than a number, or null, counts as missing\)"):
        loop.train(build_config(tree), show_progress=False)


def test_an_objectives_numeric_fields_may_be_written_as_text(tmp_path):
    """"4.5" (as spreadsheets export) is a number for the fields objectives read; other text
    stays out of the scores."""
    path = write_jsonl(tmp_path / "s.jsonl", [{"prompt": "p", "chosen": "c", "rejected": "r",
                                               "chosen_score": "4.5", "rejected_score": "1",
                                               "note": "7", "tie": "n/a"}])
    (record,) = load_records(path)
    assert record.scores == {"chosen_score": 4.5, "rejected_score": 1.0}
