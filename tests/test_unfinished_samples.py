"""A sample cut off at max_new_tokens is not an answer the model ended: sampling says which
samples ended, online rows name the responses a length limit cut off (``unfinished``), and
tokenization puts no end of turn after them (every response used to get one, so rounds taught
the model to end its turn at the length limit)."""

import json

import pytest

from preftune.data.records import DataError, Pair
from preftune.data.sources import load_records
from preftune.data.tokenize import TokenizeSettings, tokenize_records
from preftune.generation import SamplingSettings, finished
from preftune.online.build import build_rows
from tiny_models import char_tokenizer


def test_sampling_says_which_samples_ended():
    tokenizer = char_tokenizer()
    eos = tokenizer.eos_token_id
    ids = [[tokenizer.encode("abc", add_special_tokens=False) + [eos],  # ended at EOS
            tokenizer.encode("abcd", add_special_tokens=False),  # cut at the limit
            tokenizer.encode("ab.cd", add_special_tokens=False)]]  # ended at a stop string
    drawn = finished(ids, SamplingSettings(stop=(".",)), tokenizer, 1.0)
    assert drawn.texts == [["abc", "abcd", "ab"]]
    assert drawn.ended == [[True, False, True]]


def test_online_rows_name_the_cut_off_responses_by_slot():
    item = {"prompt": "q", "responses": ["a", "bb", "ccc"], "ended": [True, False, True],
            "scores": [0.1, 0.9, 0.5], "origin": "f:1"}
    (pair,), _ = build_rows([item], "best_vs_worst")
    assert (pair["chosen"], pair["rejected"], pair["unfinished"]) == ("bb", "a", [0])
    assert "ended" not in pair  # (not carried on as provenance)
    (ranked,), _ = build_rows([item], "list")
    assert ranked["unfinished"] == [1]
    whole = {**item, "negative": "no", "positive": "yes", "data_scores": [1.0, 0.0]}
    (d2o,), _ = build_rows([whole], "d2o")
    assert d2o["unfinished"] == [1]  # the data's negative, last, ended
    ended = {**item, "ended": [True, True, True]}
    assert "unfinished" not in build_rows([ended], "best_vs_worst")[0][0]
    older = {k: v for k, v in item.items() if k != "ended"}  # a run before this field
    assert "unfinished" not in build_rows([older], "best_vs_worst")[0][0]


def test_no_end_of_turn_follows_a_cut_off_response(tmp_path):
    tokenizer = char_tokenizer()
    eos = tokenizer.eos_token_id
    records = [Pair("q?", "yes", "nnnn", origin="f:1", unfinished=(1,)),
               Pair([{"role": "user", "content": "q?"}], [{"role": "assistant", "content": "y"}],
                    [{"role": "assistant", "content": "nnnn"}], origin="f:2", unfinished=(0,))]
    examples, _ = tokenize_records(records, tokenizer, TokenizeSettings(256, 128))
    plain, chat = examples
    assert plain.response_ids[0][-1] == eos and plain.response_ids[1][-1] != eos
    assert tokenizer.decode(plain.response_ids[1]) == "nnnn"
    assert chat.response_ids[0][-1] != eos and chat.response_ids[1][-1] == eos


@pytest.mark.parametrize("value,says", [
    ([2], r"field 'unfinished' is .*; it lists the positions \(0 to 1\) of the responses cut "
          r"off at a length limit"),
    ("1", r"field 'unfinished' is"),
])
def test_the_unfinished_field_is_read_and_checked(tmp_path, value, says):
    path = tmp_path / "pairs.jsonl"
    row = {"prompt": "q", "chosen": "a", "rejected": "b"}
    path.write_text(json.dumps({**row, "unfinished": [1]}) + "\n")
    (record,) = load_records(str(path))
    assert record.unfinished == (1,)
    path.write_text(json.dumps({**row, "unfinished": value}) + "\n")
    with pytest.raises(DataError, match=rf"pairs.jsonl:1: {says}"):
        load_records(str(path))


def test_converted_records_keep_each_cut_off_response_marked():
    from preftune.data.convert import convert
    from preftune.data.records import Ranked
    ranked = Ranked("q", ("a", "bb", "ccc"), (0.1, 0.9, 0.5), origin="f:1", unfinished=(1,))
    pairs = convert([ranked], "pairs:all_pairs")
    assert [(p.chosen, p.rejected, p.unfinished) for p in pairs] == [
        ("bb", "a", (0,)), ("bb", "ccc", (0,)), ("ccc", "a", ())]
    unpaired = convert(pairs[:1], "unpaired")
    assert [(u.completion, u.unfinished) for u in unpaired] == [("bb", (0,)), ("a", ())]
    tokenizer = char_tokenizer()
    examples, _ = tokenize_records(unpaired, tokenizer, TokenizeSettings(64, 32))
    assert [tokenizer.decode(e.response_ids[0]) for e in examples] == ["bb", "a<|im_end|>"]


def test_an_unpaired_file_may_mark_its_completion_cut_off(tmp_path):
    path = tmp_path / "kto.jsonl"
    path.write_text(json.dumps({"prompt": "q", "completion": "abc", "label": True,
                                "unfinished": [0]}) + "\n")
    (record,) = load_records(str(path))
    assert record.unfinished == (0,)


def test_a_rejected_answer_made_from_another_keeps_that_ones_mark():
    from preftune.data.povid import povid_pairs
    cut = Pair("q", "two red cats", "none", origin="f:1", unfinished=(0,))
    (made,) = povid_pairs([cut])
    assert made.rejected != "two red cats" and made.unfinished == (0, 1)
    kept = Pair("q", "two red cats", "none", origin="f:1", unfinished=(1,))
    assert povid_pairs([kept])[0].unfinished == ()  # its own rejected answer is gone


def test_the_unfinished_penalty_lets_an_answer_that_ends_win_a_tie():
    item = {"prompt": "q", "responses": ["aa", "bbbb", "c"], "ended": [True, False, True],
            "scores": [1.0, 1.0, 0.5], "origin": "f:1"}
    (pair,), _ = build_rows([item], "best_vs_worst", unfinished_penalty=0.75)
    assert (pair["chosen"], pair["rejected"]) == ("aa", "bbbb")
    assert (pair["chosen_score"], pair["rejected_score"]) == (1.0, 0.25)
    assert pair["unfinished"] == [1]
    (plain,), _ = build_rows([item], "best_vs_worst")  # without it the earlier sample wins
    assert (plain["chosen"], plain["rejected"], plain["rejected_score"]) == ("aa", "c", 0.5)
    (ranked,), _ = build_rows([item], "list", unfinished_penalty=0.75)
    assert ranked["scores"] == [1.0, 0.25, 0.5]


def test_win_probabilities_are_those_of_the_penalized_scores():
    """(They were computed from the scorer's own scores, so a cut-off sample tied with the
    chosen one still had a win probability of 1/2 against it.)"""
    item = {"prompt": "q", "responses": ["aa", "bbbb", "c"], "ended": [True, False, True],
            "scores": [1.0, 1.0, 0.5], "origin": "f:1"}
    (pair,), _ = build_rows([item], "best_vs_worst", unfinished_penalty=0.75,
                            with_win_probs=True)
    assert (pair["chosen_win_prob"], pair["rejected_win_prob"]) == (1.0, 0.0)
    (plain,), _ = build_rows([item], "best_vs_worst", with_win_probs=True)
    assert (plain["chosen"], plain["chosen_win_prob"], plain["rejected_win_prob"]) == \
        ("aa", 0.75, 0.0)


def test_a_pairwise_scorers_win_probabilities_lose_the_penalty_like_its_scores():
    """A pairwise scorer's scores are its win probabilities; the penalty reordered the scores
    but left the written win probabilities, so the chosen side could read 0.4 against 0.6."""
    item = {"prompt": "q", "responses": ["aa", "bbbb"], "ended": [True, False],
            "scores": [0.4, 0.6], "win_probs": [0.4, 0.6], "origin": "f:1"}
    (pair,), _ = build_rows([item], "best_vs_worst", unfinished_penalty=0.5,
                            with_win_probs=True)
    assert (pair["chosen"], pair["rejected"]) == ("aa", "bbbb")
    assert (pair["chosen_score"], pair["rejected_score"]) == pytest.approx((0.4, 0.1))
    assert (pair["chosen_win_prob"], pair["rejected_win_prob"]) == pytest.approx((0.4, 0.1))
    (floored,), _ = build_rows([item], "best_vs_worst", unfinished_penalty=0.75,
                               with_win_probs=True)  # a probability stops at 0
    assert (floored["rejected_score"], floored["rejected_win_prob"]) == pytest.approx((-0.15, 0))
