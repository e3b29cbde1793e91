import csv
import json

import pytest

from preftune.data.records import DataError, Pair, Ranked, Unpaired
from preftune.data.sources import load_records
from preftune.data.tokenize import TokenizeSettings, tokenize_records

WIDE = TokenizeSettings(max_length=1000, max_prompt_length=None)
USER = [{"role": "user", "content": "Hi"}]

UNPAIRED = [
    {"prompt": "2+2?", "completion": "4", "label": True, "weight": 0.5},
    {"prompt": "2+3?", "completion": "6", "label": 0, "weight": 2},
]
RANKED = [
    {"prompt": "Name a colour", "responses": ["red", "blue", "dog"], "scores": [2, 3.5, -1],
     "group": 1},
    {"prompt": "Name a fruit", "responses": ["pear", "car"], "scores": [1, 0], "group": 2},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def write_json(path, rows):
    path.write_text(json.dumps(rows))
    return str(path)


def write_parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


def write_csv(path, rows):
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return str(path)


def load_error(path, **kwargs) -> str:
    with pytest.raises(DataError) as error:
        load_records(path, **kwargs)
    return str(error.value)


# ---- unpaired ----


@pytest.mark.parametrize("suffix,origin", [("jsonl", ":2"), ("parquet", ":record 1")])
def test_unpaired_from_jsonl_and_parquet(tmp_path, suffix, origin):
    if suffix == "jsonl":
        path = write_jsonl(tmp_path / "u.jsonl", UNPAIRED)  # label True and 0
    else:  # a Parquet column has one type
        path = write_parquet(tmp_path / "u.parquet", [{**UNPAIRED[1], "label": False},
                                                      UNPAIRED[0]][::-1])
    records = load_records(path)
    assert records == [
        Unpaired("2+2?", "4", True, origin=records[0].origin, scores={"weight": 0.5}),
        Unpaired("2+3?", "6", False, origin=path + origin, scores={"weight": 2}),
    ]
    assert records[1].responses == ("6",) and records[1].shape == "unpaired"
    assert records[0].side_data() == {"weight": 0.5, "label": 1.0}
    assert records[1].side_data() == {"weight": 2, "label": 0.0}


def test_unpaired_csv_labels_as_strings_or_numbers(tmp_path):
    rows = [{"prompt": "a", "completion": "b", "label": value, "w": 1}
            for value in ("true", "False", " TRUE ", "0", "1")]
    records = load_records(write_csv(tmp_path / "u.csv", rows))
    assert [r.label for r in records] == [True, False, True, False, True]
    assert all(r.completion == "b" and r.scores == {"w": 1.0} for r in records)


def test_unpaired_conversational(tmp_path):
    rows = [{"prompt": USER, "completion": [{"role": "assistant", "content": "Hello"}],
             "label": False},
            {"prompt": USER, "completion": "Hey", "label": True}]
    records = load_records(write_json(tmp_path / "c.json", rows))
    assert records[0].prompt == USER and records[0].is_conversational
    assert records[0].completion == [{"role": "assistant", "content": "Hello"}]
    assert records[1].completion == "Hey"


@pytest.mark.parametrize("label", ["yes", 2, 0.5, "", [1]])
def test_bad_label_names_file_record_and_field(tmp_path, label):
    path = write_json(tmp_path / "b.json", [UNPAIRED[0], {**UNPAIRED[1], "label": label}])
    message = load_error(path)
    assert f"{path}:record 1" in message and "'label'" in message
    assert "expected true or false" in message


def test_unpaired_field_renaming(tmp_path):
    rows = [{"q": "p", "answer": "a", "thumbs_up": 1, "kl": 0.1}]
    path = write_jsonl(tmp_path / "r.jsonl", rows)
    (record,) = load_records(path, fields={"prompt": "q", "completion": "answer",
                                           "label": "thumbs_up"})
    assert record == Unpaired("p", "a", True, origin=f"{path}:1", scores={"kl": 0.1})


# ---- ranked ----


@pytest.mark.parametrize("suffix", ["jsonl", "parquet"])
def test_ranked_from_jsonl_and_parquet_keeps_order(tmp_path, suffix):
    writer = write_jsonl if suffix == "jsonl" else write_parquet
    path = writer(tmp_path / f"r.{suffix}", RANKED)
    first, second = load_records(path)
    assert isinstance(first, Ranked) and first.shape == "ranked"
    assert first.responses == ("red", "blue", "dog")  # not sorted
    assert first.response_scores == (2.0, 3.5, -1.0)
    assert first.scores == {"group": 1}
    assert first.side_data() == {"group": 1, "response_scores": [2.0, 3.5, -1.0]}
    assert (second.responses, second.response_scores) == (("pear", "car"), (1.0, 0.0))


def test_ranked_from_ranks_and_conversational_responses(tmp_path):
    rows = [{"prompt": USER, "ranks": [2, 1, 3],
             "responses": [[{"role": "assistant", "content": "a"}], "b",
                           [{"role": "assistant", "content": "c"}]]}]
    (record,) = load_records(write_jsonl(tmp_path / "k.jsonl", rows))
    assert record.response_scores == (2.0, 3.0, 1.0)  # rank 1 of 3 scores 3
    assert record.responses[0] == [{"role": "assistant", "content": "a"}]
    assert record.responses[1] == "b"


def test_ranked_field_renaming(tmp_path):
    rows = [{"question": "q", "answers": ["x", "y"], "ratings": [0, 5]}]
    (record,) = load_records(write_jsonl(tmp_path / "f.jsonl", rows), fields={
        "prompt": "question", "responses": "answers", "scores": "ratings"})
    assert record.prompt == "q" and record.response_scores == (0.0, 5.0)
    assert record.scores == {}


@pytest.mark.parametrize("row,fields,expected", [
    ({"prompt": "p", "responses": ["a", "b", "c"], "scores": [1, 2]},
     ("'responses'", "'scores'"), "3 responses but 2 scores"),
    ({"prompt": "p", "responses": ["a", "b"], "ranks": [1, 2, 3]},
     ("'responses'", "'ranks'"), "2 responses but 3 ranks"),
    ({"prompt": "p", "responses": ["a", "b"]}, ("'scores'", "'ranks'"), "both are missing"),
    ({"prompt": "p", "responses": ["a", "b"], "scores": [1, 2], "ranks": [1, 2]},
     ("'scores'",), "both are set"),
    ({"prompt": "p", "responses": ["a"], "scores": [1]}, ("'responses'",), "at least 2"),
    ({"prompt": "p", "responses": "a|b", "scores": [1, 2]}, ("'responses'",), "expected a list"),
    ({"prompt": "p", "responses": ["a", "b"], "scores": [1, "high"]}, ("'scores'", "item 1"),
     "finite number"),
    ({"prompt": "p", "responses": ["a", "b"], "ranks": [1, 3]}, ("'ranks'", "item 1"),
     "from 1 (best) to 2"),
    ({"prompt": "p", "responses": ["a", 7], "scores": [1, 2]}, ("'responses'", "item 1"),
     "expects a string"),
    ({"responses": ["a", "b"], "scores": [1, 2]}, ("'prompt'",), "is missing"),
])
def test_ranked_errors_name_file_record_and_field(tmp_path, row, fields, expected):
    path = write_json(tmp_path / "e.json", [RANKED[0], row])
    message = load_error(path)
    assert f"{path}:record 1" in message and expected in message
    assert all(field in message for field in fields), message


# ---- pairs with extras ----


def test_pair_with_gold_and_extra_columns(tmp_path):
    rows = [{"prompt": "p", "chosen": "c", "rejected": "r", "gold": "g", "chosen_score": 3,
             "rejected_score": 1, "group": 2, "weight": 0.5, "tie": 0}]
    path = write_jsonl(tmp_path / "g.jsonl", rows)
    (pair,) = load_records(path)
    assert pair.gold == "g" and pair.responses == ("c", "r", "g") and pair.shape == "pairs"
    assert pair.side_data() == {"chosen_score": 3, "rejected_score": 1, "group": 2,
                                "weight": 0.5, "tie": 0}
    (renamed,) = load_records(write_jsonl(tmp_path / "h.jsonl", [
        {"prompt": "p", "chosen": "c", "rejected": "r", "reference": "g"}]),
        fields={"gold": "reference"})
    assert renamed.responses == ("c", "r", "g")


def test_pair_without_gold_has_two_responses(tmp_path):
    (pair,) = load_records(write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "p", "chosen": "c", "rejected": "r"}]))
    assert pair.gold is None and pair.responses == ("c", "r")


def test_gold_with_implicit_prompt_is_cut_after_the_prompt(tmp_path):
    shared = "\n\nHuman: Hi\n\nAssistant:"
    rows = [{"chosen": shared + " Hello.", "rejected": shared + " Go.", "gold": shared + " Hey!"}]
    (pair,) = load_records(write_jsonl(tmp_path / "i.jsonl", rows))
    assert (pair.prompt, pair.gold) == (shared, " Hey!")


def test_gold_on_some_pairs_only_is_an_error(tmp_path):
    base = {"prompt": "p", "chosen": "c", "rejected": "r"}
    path = write_jsonl(tmp_path / "g.jsonl", [{**base, "gold": "g"}, base])
    message = load_error(path)
    assert f"{path}:2" in message and "'gold'" in message and "first record" in message
    path = write_jsonl(tmp_path / "h.jsonl", [base, {**base, "gold": "g"}])
    assert f"{path}:2" in load_error(path)


# ---- shape detection ----


def test_shape_detection_and_explicit_shape(tmp_path):
    pairs = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "p", "chosen": "c", "rejected": "r"}])
    unpaired = write_jsonl(tmp_path / "u.jsonl", UNPAIRED)
    ranked = write_jsonl(tmp_path / "r.jsonl", RANKED)
    assert [type(load_records(p)[0]) for p in (pairs, unpaired, ranked)] == [
        Pair, Unpaired, Ranked]
    assert isinstance(load_records(ranked, shape="ranked")[0], Ranked)
    message = load_error(unpaired, shape="pairs")
    assert f"{unpaired}:1" in message and "'chosen'" in message and "missing" in message
    assert "unknown shape 'lists'" in load_error(ranked, shape="lists")
    assert "applies to pairs only" in load_error(ranked, shape="ranked", format="implicit")


@pytest.mark.parametrize("second,found", [
    ({"prompt": "p", "completion": "c", "label": True}, "unpaired"),
    ({"prompt": "p", "responses": ["a", "b"], "scores": [1, 2]}, "ranked"),
])
def test_mixed_shapes_name_the_record(tmp_path, second, found):
    path = write_jsonl(tmp_path / "m.jsonl", [{"prompt": "p", "chosen": "c", "rejected": "r"},
                                              second])
    message = load_error(path)
    assert f"{path}:2" in message and "first record made it pairs" in message
    assert f"({found})" in message and "same shape" in message


def test_unknown_or_ambiguous_shape(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"prompt": "p", "answer": "a"}])
    message = load_error(path)
    assert f"{path}:1" in message and "cannot tell the record's shape" in message
    assert "'answer'" in message and "fields=" in message
    path = write_jsonl(tmp_path / "y.jsonl", [{"prompt": "p", "chosen": "c", "rejected": "r",
                                               "completion": "c", "label": 1}])
    message = load_error(path)
    assert "pairs" in message and "unpaired" in message and "shape=" in message
    assert load_records(path, shape="unpaired")[0].completion == "c"


def test_pairs_with_numeric_label_column_stay_pairs(tmp_path):
    path = write_csv(tmp_path / "l.csv", [{"prompt": "p", "chosen": "c", "rejected": "r",
                                          "label": "1", "scores": "2"}])
    (pair,) = load_records(path)
    assert isinstance(pair, Pair) and pair.scores == {"label": 1.0, "scores": 2.0}


# ---- tokenization ----


def test_tokenize_unpaired_and_ranked_side_data(tiny_tokenizer, tmp_path):
    tok = tiny_tokenizer
    unpaired = load_records(write_jsonl(tmp_path / "u.jsonl", UNPAIRED))
    examples, report = tokenize_records(unpaired, tok, WIDE)
    assert report.kept == 2 and all(len(ex.response_ids) == 1 for ex in examples)
    assert examples[0].response_ids[0] == tok("4", add_special_tokens=False)["input_ids"] + [
        tok.eos_token_id]
    assert [ex.scores for ex in examples] == [{"weight": 0.5, "label": 1.0},
                                              {"weight": 2, "label": 0.0}]
    ranked = load_records(write_jsonl(tmp_path / "r.jsonl", RANKED))
    examples, _ = tokenize_records(ranked, tok, WIDE)
    assert [len(ex.response_ids) for ex in examples] == [3, 2]
    assert examples[0].response_ids[1] == tok("blue", add_special_tokens=False)["input_ids"] + [
        tok.eos_token_id]
    assert examples[0].scores == {"group": 1, "response_scores": [2.0, 3.5, -1.0]}
    assert examples[1].origin == f"{tmp_path / 'r.jsonl'}:2"


def test_tokenize_pair_with_gold_has_three_responses(tiny_tokenizer):
    pair = Pair("say", " a", " b", scores={"weight": 2.0}, gold=" c")
    (example,), _ = tokenize_records([pair], tiny_tokenizer, WIDE)
    assert len(example.response_ids) == 3 and example.scores == {"weight": 2.0}


def test_tokenize_conversational_unpaired(tiny_tokenizer):
    record = Unpaired(USER, [{"role": "assistant", "content": "Yo"}], True, origin="f:1")
    (example,), _ = tokenize_records([record], tiny_tokenizer, WIDE)
    rendered = tiny_tokenizer.apply_chat_template(USER, add_generation_prompt=True,
                                                  tokenize=False)
    assert example.prompt_ids == tiny_tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert example.scores == {"label": 1.0}
