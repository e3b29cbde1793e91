import json
import random

import pytest

from preftune.data.convert import (CONVERSIONS, convert, curriculum_order, pairs_to_unpaired,
                                   ranked_to_pairs)
from preftune.data.records import DataError, Pair, Ranked, Unpaired

# scores: best is slot 1, worst slot 3; slots 0 and 2 tie
LIST = Ranked("p", ("a", "b", "c", "d"), (2, 5, 2, 0), origin="f:3", scores={"group": 1})
TIED = Ranked("q", ("x", "y"), (1, 1), origin="f:4")
TWO_BEST = Ranked("r", ("u", "v", "w"), (3, 3, 1), origin="f:5")


def pair(chosen, rejected, cs, rs, origin, prompt="p", extra=None):
    return Pair(prompt, chosen, rejected, origin=origin,
                scores={**(extra or {}), "chosen_score": float(cs), "rejected_score": float(rs)})


def test_best_vs_worst():
    assert ranked_to_pairs([LIST, TIED, TWO_BEST], "best_vs_worst") == [
        pair("b", "d", 5, 0, "f:3 [1>3]", extra={"group": 1}),
        # all-equal list gives nothing; tied best resolves to the earliest slot
        pair("u", "w", 3, 1, "f:5 [0>2]", prompt="r"),
    ]
    assert ranked_to_pairs([LIST]) == ranked_to_pairs([LIST], "best_vs_worst")


def test_all_pairs_skips_ties():
    g = {"group": 1}
    assert ranked_to_pairs([LIST, TIED], "all_pairs") == [
        pair("a", "d", 2, 0, "f:3 [0>3]", extra=g),
        pair("b", "a", 5, 2, "f:3 [1>0]", extra=g),
        pair("b", "c", 5, 2, "f:3 [1>2]", extra=g),
        pair("b", "d", 5, 0, "f:3 [1>3]", extra=g),
        pair("c", "d", 2, 0, "f:3 [2>3]", extra=g),
    ]
    # tied best responses are not paired with each other
    assert [p.origin for p in ranked_to_pairs([TWO_BEST], "all_pairs")] == [
        "f:5 [0>2]", "f:5 [1>2]"]


def test_best_vs_each():
    g = {"group": 1}
    assert ranked_to_pairs([LIST, TIED, TWO_BEST], "best_vs_each") == [
        pair("b", "a", 5, 2, "f:3 [1>0]", extra=g),
        pair("b", "c", 5, 2, "f:3 [1>2]", extra=g),
        pair("b", "d", 5, 0, "f:3 [1>3]", extra=g),
        pair("u", "w", 3, 1, "f:5 [0>2]", prompt="r"),  # v ties the best: skipped
    ]


def test_ranked_to_pairs_rejects_other_shapes_and_modes():
    with pytest.raises(DataError, match=r"f:9: ranked_to_pairs takes ranked records, got pairs"):
        ranked_to_pairs([LIST, Pair("p", "a", "b", origin="f:9")])
    with pytest.raises(ValueError, match="unknown ranked-to-pairs mode 'best'"):
        ranked_to_pairs([LIST], "best")


def test_pairs_to_unpaired():
    pairs = [Pair("p", "a", "b", origin="f:1",
                  scores={"chosen_score": 3, "rejected_score": 1, "weight": 2}, gold="g"),
             Pair([{"role": "user", "content": "q"}], "c", "d", origin="f:2")]
    assert pairs_to_unpaired(pairs) == [
        Unpaired("p", "a", True, origin="f:1 [chosen]", scores={"weight": 2, "score": 3}),
        Unpaired("p", "b", False, origin="f:1 [rejected]", scores={"weight": 2, "score": 1}),
        Unpaired([{"role": "user", "content": "q"}], "c", True, origin="f:2 [chosen]"),
        Unpaired([{"role": "user", "content": "q"}], "d", False, origin="f:2 [rejected]"),
    ]
    with pytest.raises(DataError, match=r"f:3: pairs_to_unpaired takes pairs records, got ranked"):
        pairs_to_unpaired([Ranked("p", ("a", "b"), (1, 0), origin="f:3")])


def test_curriculum_order_easy_first_stable_for_equal_gaps():
    pairs = [pair("a", "b", 1, 0, "f:1"), pair("a", "b", 5, 1, "f:2"),
             pair("a", "b", 2, 1, "f:3"), pair("a", "b", 9, 5, "f:4"),
             pair("a", "b", 0.5, 0.5, "f:5")]
    ordered = curriculum_order(pairs)
    assert [p.origin for p in ordered] == ["f:2", "f:4", "f:1", "f:3", "f:5"]
    assert ordered[0] is pairs[1]  # records are not copied or changed
    custom = [Pair("p", "a", "b", origin=f"g:{i}", scores={"good": g, "bad": 0})
              for i, g in enumerate([1, 3, 2])]
    assert [p.origin for p in curriculum_order(custom, "good", "bad")] == ["g:1", "g:2", "g:0"]


def test_curriculum_order_pipeline_from_ranked():
    ordered = curriculum_order(ranked_to_pairs([LIST], "best_vs_each"))
    assert [p.origin for p in ordered] == ["f:3 [1>3]", "f:3 [1>0]", "f:3 [1>2]"]


def test_curriculum_order_needs_scores():
    pairs = [pair("a", "b", 1, 0, "f:1"), Pair("p", "a", "b", origin="f:2",
                                                 scores={"chosen_score": 1})]
    with pytest.raises(DataError) as error:
        curriculum_order(pairs)
    message = str(error.value)
    assert "f:2" in message and "'rejected_score' is missing" in message
    assert "scores present: chosen_score" in message
    with pytest.raises(DataError, match=r"record 0: .*'chosen_score' is missing"):
        curriculum_order([Pair("p", "a", "b")])


def test_convert_dispatch():
    assert CONVERSIONS == ("pairs:best_vs_worst", "pairs:all_pairs", "pairs:best_vs_each",
                           "unpaired", "images:corrupt", "images:corrupt:crop",
                           "images:corrupt:mask", "images:corrupt:noise", "images:corrupt:blur",
                           "images:mia_sequence", "images:mia_grid", "images:mia_pip",
                           "pairs:povid")
    for mode in ("best_vs_worst", "all_pairs", "best_vs_each"):
        assert convert([LIST, TIED], f"pairs:{mode}") == ranked_to_pairs([LIST, TIED], mode)
    pairs = ranked_to_pairs([LIST])
    assert convert(pairs, "unpaired") == pairs_to_unpaired(pairs)
    assert convert([], "unpaired") == []


@pytest.mark.parametrize("records,to,expected", [
    ([Pair("p", "a", "b", origin="f:1")], "pairs:all_pairs", "already pairs"),
    ([LIST], "unpaired", "'pairs:<mode>'"),
    ([Unpaired("p", "a", True, origin="f:1")], "pairs:best_vs_worst", "only to ranked"),
    ([Unpaired("p", "a", True, origin="f:1")], "unpaired", "already unpaired"),
])
def test_convert_rejects_wrong_shape(records, to, expected):
    with pytest.raises(DataError) as error:
        convert(records, to)
    message = str(error.value)
    assert message.startswith(records[0].origin) and "cannot convert" in message
    assert expected in message


def test_convert_unknown_target_and_mixed_shapes():
    with pytest.raises(ValueError, match="unknown conversion 'pairs'.*pairs:best_vs_worst"):
        convert([LIST], "pairs")
    with pytest.raises(DataError, match=r"f:7: record is pairs but the first record \(f:3\) is "
                                        r"ranked"):
        convert([LIST, Pair("p", "a", "b", origin="f:7")], "pairs:all_pairs")


def _ranked_file(path, lists):
    import json

    path.write_text("".join(json.dumps({"prompt": prompt, "responses": ["a", "bb", "ccc"],
                                        "scores": scores}) + "\n" for prompt, scores in lists))
    return str(path)


def test_the_held_out_split_is_drawn_before_conversion(tmp_path, tiny_tokenizer):
    """data.eval_fraction holds out source records: the pairs a list makes all land on the
    same side, so no held-out prompt is also trained on."""
    from preftune.config import build_config
    from preftune.data.prepare import prepare_examples

    data = _ranked_file(tmp_path / "lists.jsonl", [(f"q{k}", [3, 2, 1]) for k in range(6)])
    config = build_config({"data": {"train": data, "convert": "pairs:all_pairs",
                                    "eval_fraction": 0.34, "max_length": 32}})
    train, held_out, _, shape = prepare_examples(config.data, tiny_tokenizer, seed=0)
    prompts = [{ex.origin.split(" ")[0] for ex in part} for part in (train, held_out)]
    assert shape == "pairs" and (len(train), len(held_out)) == (12, 6)  # 4 and 2 lists x 3
    assert len(prompts[0]) == 4 and len(prompts[1]) == 2 and not prompts[0] & prompts[1]


def test_each_files_layout_is_said_once_per_announced_reading(tmp_path, tiny_tokenizer,
                                                               capsys):
    """A run says how it read each data file; a second, quiet reading of the same data (the
    demo's held-out examples, before the training run reads them) repeats nothing."""
    from preftune.config import build_config
    from preftune.data.prepare import prepare_examples

    data = _ranked_file(tmp_path / "lists.jsonl", [(f"q{k}", [3, 2, 1]) for k in range(4)])
    config = build_config({"data": {"train": data, "eval": data, "max_length": 32}})
    prepare_examples(config.data, tiny_tokenizer, seed=0)
    said = [line for line in capsys.readouterr().out.splitlines() if line.startswith("data: ")]
    assert len(said) == 2 and all(line.startswith(f"data: {data}: ranked") for line in said)
    prepare_examples(config.data, tiny_tokenizer, seed=0, announce=False)
    assert "data: " not in capsys.readouterr().out


def test_lists_that_all_tie_make_no_pairs_and_say_so(tmp_path, tiny_tokenizer):
    from preftune.config import build_config
    from preftune.data.prepare import prepare_examples

    data = _ranked_file(tmp_path / "ties.jsonl", [("q0", [1, 1, 1]), ("q1", [2, 2, 2])])
    config = build_config({"data": {"train": data, "convert": "pairs:best_vs_worst",
                                    "max_length": 32}})
    with pytest.raises(DataError, match=r"data.train: data.convert pairs:best_vs_worst made no "
                                        r"records from the 2 read \(.*ties.jsonl:1, .*ties.jsonl"
                                        r":2\): ranked lists whose scores all tie make no pair."):
        prepare_examples(config.data, tiny_tokenizer, seed=0)
    # a held-out share that drew only tied lists: said as such (the user set no data.eval)
    data = _ranked_file(tmp_path / "one_tie.jsonl", [("q0", [1, 1, 1])] + [
        (f"q{k}", [3, 2, 1]) for k in range(1, 10)])
    config = build_config({"data": {"train": data, "convert": "pairs:best_vs_worst",
                                    "eval_fraction": 0.1, "max_length": 32}})
    def held_out(seed):  # the record prepare_examples holds out (its shuffle of the order)
        order = list(range(10))
        random.Random(seed).shuffle(order)
        return order[0]

    seed = next(seed for seed in range(100) if held_out(seed) == 0)  # the tied list
    with pytest.raises(DataError, match=r"made no records from the 1 records data.eval_fraction "
                                        r"held out of data.train .* Raise data.eval_fraction, "
                                        r"or give data.eval."):
        prepare_examples(config.data, tiny_tokenizer, seed=seed)


def test_held_out_data_of_another_shape_or_a_split_that_leaves_nothing_is_refused(
        tmp_path, tiny_tokenizer):
    """data.eval is measured as training data is trained on: ranked lists beside pairs (which
    a pair objective would read as a pair of the list's first two responses) are refused by
    name, as lists are beside the pairs data.convert makes of training lists; an
    eval_fraction that holds every record out leaves nothing to train on."""
    from preftune.config import build_config
    from preftune.data.prepare import prepare_examples

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"q{k}", "chosen": "a", "rejected": "bb"})
                             + "\n" for k in range(3)))
    lists = _ranked_file(tmp_path / "lists.jsonl", [("q0", [1, 2, 3])])
    config = build_config({"data": {"train": str(pairs), "eval": lists, "max_length": 32}})
    with pytest.raises(DataError, match=r"data.eval holds ranked records \(\S*lists.jsonl:1\) "
                                        r"and data.train pairs records; .* give data.eval pairs "
                                        r"records.$"):
        prepare_examples(config.data, tiny_tokenizer, seed=0)
    both = build_config({"data": {"train": lists, "eval": lists, "max_length": 32,
                                  "convert": "pairs:best_vs_worst"}})
    train, held_out, _, shape = prepare_examples(both.data, tiny_tokenizer, seed=0)
    assert shape == "pairs" and len(train) == len(held_out) == 1
    assert [len(ids) for ids in held_out[0].response_ids] == [4, 2]  # "ccc" over "a", + EOS
    greedy = build_config({"data": {"train": str(pairs), "eval_fraction": 0.9,
                                    "max_length": 32}})
    with pytest.raises(DataError, match=r"data.eval_fraction 0.9 of the 3 records of data.train "
                                        "holds them all out, leaving none to train on"):
        prepare_examples(greedy.data, tiny_tokenizer, seed=0)


def test_records_left_out_by_tokenization_are_said(tmp_path, tiny_tokenizer, capsys):
    """(They were counted in data_report.json only: a run on 1 of 2 records said nothing.)"""
    from preftune.config import build_config
    from preftune.data.prepare import prepare_examples

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "a", "chosen": " ", "rejected": "c"}) + "\n"
                     + json.dumps({"prompt": "b", "chosen": "x", "rejected": "y"}) + "\n")
    config = build_config({"data": {"train": str(pairs), "eval": str(pairs), "max_length": 32}})
    train, held_out, report, _ = prepare_examples(config.data, tiny_tokenizer, seed=0)
    assert len(train) == len(held_out) == 1 and report["train"]["empty_responses"] == 1
    assert report["train"]["origins"] == {"empty_responses": [f"{pairs}:1"]}  # which one
    printed = capsys.readouterr().out.splitlines()
    for split in ("train", "eval"):
        assert f"data: data.{split}: 1 of 2 records left out: 1 have an empty response " \
            f"(e.g. {pairs}:1)" in printed


def test_ranked_lists_that_all_tie_are_warned_of(tmp_path, tiny_tokenizer, capsys):
    from preftune.config import build_config
    from preftune.data.prepare import prepare_examples

    data = _ranked_file(tmp_path / "lists.jsonl", [("q0", [2, 2, 2]), ("q1", [3, 2, 1])])
    config = build_config({"data": {"train": data, "max_length": 32}})
    train, _, _, shape = prepare_examples(config.data, tiny_tokenizer, seed=0)
    assert shape == "ranked" and len(train) == 2  # kept: an objective may read ties
    assert (f"warning: data.train: 1 of 2 ranked lists give every response the same score "
            f"(e.g. {data}:1); they order nothing") in capsys.readouterr().out


def test_the_data_report_says_how_many_records_a_conversion_was_made_from(tmp_path,
                                                                           tiny_tokenizer):
    from preftune.config import build_config
    from preftune.data.prepare import prepare_examples

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"p{k}", "chosen": "x", "rejected": "y"})
                             + "\n" for k in range(3)))
    config = build_config({"data": {"train": str(pairs), "max_length": 32,
                                    "convert": "unpaired"}})
    _, _, report, shape = prepare_examples(config.data, tiny_tokenizer, seed=0)
    assert (shape, report["train"]["records"]) == ("unpaired", 6)
    assert report["convert"] == {"conversions": "unpaired", "read": {"train": 3, "eval": 0}}
