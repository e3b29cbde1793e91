"""Synthetic checkable tasks: determinism, disjoint splits, checker correctness, JSONL round trip."""

from __future__ import annotations

import json
import pickle
import random

import pytest

from preftune.data import synthetic as S

ALL = sorted(S.FAMILIES)


def _sig(tasks):
    return [(t.family, t.prompt_text, t.chosen, t.rejected) for t in tasks]


def test_deterministic_for_seed():
    assert _sig(S.generate_tasks(60, seed=3)) == _sig(S.generate_tasks(60, seed=3))
    assert _sig(S.generate_tasks(60, seed=3)) != _sig(S.generate_tasks(60, seed=4))
    a, b = S.generate_split(40, 20, seed=5), S.generate_split(40, 20, seed=5)
    assert _sig(a[0]) == _sig(b[0]) and _sig(a[1]) == _sig(b[1])


def test_generate_tasks_counts_and_distinct_prompts():
    tasks = S.generate_tasks(100, seed=0)
    assert len(tasks) == 100
    assert len({t.prompt_text for t in tasks}) == 100
    assert {t.family for t in tasks} == set(S.DEFAULT_FAMILIES)
    only = S.generate_tasks(10, seed=0, families=["capital"])
    assert {t.family for t in only} == {"capital"}


def test_prompt_is_single_user_message():
    for t in S.generate_tasks(30, seed=1, families=ALL):
        assert t.prompt == [{"role": "user", "content": t.prompt_text}]
        chosen, rejected = S.answer_text(t.chosen), S.answer_text(t.rejected)
        assert chosen.strip() and rejected.strip() and chosen != rejected


@pytest.mark.parametrize("seed", range(6))
def test_split_disjoint(seed):
    train, evals = S.generate_split(300, 60, seed=seed)
    assert len(train) == 300 and len(evals) == 60
    assert not {t.prompt_text for t in train} & {t.prompt_text for t in evals}
    assert not {t.key for t in train} & {t.key for t in evals}  # held-out items, not just wordings
    assert len({t.prompt_text for t in train}) == 300
    assert {t.family for t in evals} == set(S.DEFAULT_FAMILIES)


@pytest.mark.parametrize("family", ALL)
def test_chosen_passes_rejected_fails(family):
    for seed in range(15):
        for t in S.generate_tasks(20, seed=seed, families=[family]):
            for answer, passes in ((t.chosen, True), (t.rejected, False),
                                   (t.bare_wrong, False)):
                assert S.check_response(t, S.answer_text(answer)) == passes, (t.prompt_text,
                                                                               answer)


def test_chosen_is_short():
    for t in S.generate_tasks(200, seed=2, families=S.DEFAULT_FAMILIES):
        assert len(t.chosen.split()) <= 12


def test_jsonl_round_trip(tmp_path):
    tasks = S.generate_tasks(40, seed=7, families=ALL)
    path = tmp_path / "pairs.jsonl"
    S.write_jsonl(tasks, path)
    lines = path.read_text().splitlines()
    assert len(lines) == len(tasks)
    for line, t in zip(lines, tasks):
        rec = json.loads(line)
        assert rec["prompt"] == t.prompt and rec["family"] == t.family
        assert rec.get("tools", []) == t.tools
        if t.tools:  # the answer is a call
            assert rec["chosen"] == [{"role": "assistant", "tool_calls": [
                {"type": "function", "function": t.chosen}]}]
        else:
            assert rec["chosen"] == [{"role": "assistant", "content": t.chosen}]
            assert rec["rejected"] == [{"role": "assistant", "content": t.rejected}]
        check = S.load_checker(rec)
        chosen, rejected = S.answer_text(t.chosen), S.answer_text(t.rejected)
        assert check(chosen) and not check(rejected)
        for probe in ["", "yes", "12", chosen.upper(), chosen + " and more words"]:
            assert check(probe) == t.check(probe)


def test_tasks_and_checkers_pickle():
    for t in S.generate_tasks(12, seed=0, families=ALL):
        t2 = pickle.loads(pickle.dumps(t))
        assert t2.check(S.answer_text(t.chosen)) and not t2.check(S.answer_text(t.rejected))


def test_load_checker_rejects_unknown_type():
    with pytest.raises(ValueError):
        S.load_checker({"check": {"type": "nope"}})


def test_unknown_family():
    with pytest.raises(ValueError):
        S.generate_tasks(3, seed=0, families=["nope"])


# ----------------------------------------------------------------------------- checker edge cases

def _exact(answer):
    return S.Checker({"type": "exact", "answer": answer})


def test_exact_number_edges():
    c = _exact("12")
    for ok in ["12", " 12", "12\n", "12.", "**12**", '"12"', "12!"]:
        assert c(ok), ok
    for bad in ["", "13", "112", "12 apples", "The answer is 12.", "5 + 7 = 12", "1 2"]:
        assert not c(bad), bad


def test_exact_word_edges():
    c = _exact("Paris")
    assert c("Paris") and c("paris") and c(" Paris.\n") and c("PARIS")
    assert not c("The capital of France is Paris.") and not c("Paris, France") and not c("Lyon")
    multi = _exact("Buenos Aires")
    assert multi("Buenos Aires.") and not multi("BuenosAires")


def test_caps_edges():
    c = S.Checker({"type": "all_caps", "word": "rocket"})
    assert c("ROCKET") and c("ROCKET!") and c(" ROCKET ")
    assert not c("Rocket") and not c("rocket") and not c("ROCKET is cool") and not c("123") and not c("")
    assert not c("ROCKETS")


def test_keyword_edges():
    c = S.Checker({"type": "keyword", "word": "snow"})
    assert c("Winter brings snow.") and c("SNOW falls.") and c('"Snow" is white')
    assert not c("Snowy days are fun.") and not c("Winter is cold.")


def test_json_edges():
    c = S.Checker({"type": "json_answer", "answer": "blue"})
    assert c('{"answer": "blue"}') and c('  {"answer":"Blue"}\n') and c('```json\n{"answer": "blue"}\n```')
    assert not c('{"answer": "blue", "why": "sky"}') and not c('{"answer": "red"}')
    assert not c("blue") and not c('{"answer": "blue"') and not c('["blue"]')
    n = S.Checker({"type": "json_answer", "answer": 12})
    assert n('{"answer": 12}') and n('{"answer": "12"}') and not n('{"answer": true}') and not n('{"answer": 13}')


def test_hard_negatives_are_bare_wrong_answers_of_the_same_tasks():
    plain_train, plain_eval = S.generate_split(60, 30, seed=3)
    train, evals = S.generate_split(60, 30, seed=3, hard_negatives=0.5)
    for plain, hard in zip(plain_train + plain_eval, train + evals):
        assert hard.prompt == plain.prompt and hard.chosen == plain.chosen  # same tasks
        assert hard.negative in ("bare", "chatty")
        assert not hard.check(hard.rejected) and hard.check(hard.chosen)
        if hard.negative == "chatty":
            assert hard.rejected == plain.rejected
        else:
            assert hard.rejected == plain.bare_wrong and len(hard.rejected) < len(plain.rejected)
    # each task is a bare negative with probability 0.5, from a stream of its own
    draws = random.Random("hard-negatives-3")
    assert [t.negative == "bare" for t in train + evals] == [draws.random() < 0.5
                                                              for _ in range(90)]
    assert S.to_record(train[0])["negative"] == train[0].negative
    assert "negative" not in S.to_record(plain_train[0])  # default data is unchanged


def test_every_family_has_a_bare_wrong_answer_that_fails():
    rng = random.Random(5)
    for family in S.FAMILIES:
        for _ in range(20):
            task = S._make(family, rng)
            wrong = S.answer_text(task.bare_wrong)
            assert wrong and not task.check(wrong), (family, wrong)
