from collections import Counter

import pytest

from preftune.data.records import Pair
from preftune.data.sources import load_records
from preftune.data.synthetic_vision import (COLOURS, FAMILIES, QUESTIONS, SHAPES, VisionTask,
                                            check, generate_split, generate_tasks, to_records,
                                            write_jsonl)


def test_tasks_per_family_answers_and_determinism():
    tasks = generate_tasks(30, seed=1)
    assert Counter(t.family for t in tasks) == {"colour": 10, "shape": 10, "count": 10}
    assert [t.family for t in tasks[:3]] == list(FAMILIES)
    for task in tasks:
        if task.family == "colour":
            assert task.answer == task.shapes[0][1] and task.answer in COLOURS
        elif task.family == "shape":
            assert task.answer == task.shapes[0][0] and task.answer in SHAPES
        else:
            assert task.answer == str(len(task.shapes)) and 1 <= len(task.shapes) <= 3
        assert not check(task, task.rejected) and check(task, task.answer)
    assert len({t.key for t in tasks}) == 30
    again = generate_tasks(30, seed=1)
    assert [t.image().tobytes() for t in again] == [t.image().tobytes() for t in tasks]
    assert generate_tasks(30, seed=2)[0].key != tasks[0].key
    assert Counter(t.family for t in generate_tasks(4, families=["count"])) == {"count": 4}
    with pytest.raises(ValueError, match="unknown vision task families \\['size'\\]"):
        generate_tasks(3, families=["size"])


def test_images_show_the_answer():
    task = next(t for t in generate_tasks(10, seed=0) if t.family == "colour")
    image = task.image()
    assert image.size == (32, 32) and image.getpixel((0, 0)) == (255, 255, 255)
    x0, y0, x1, y1 = task.shapes[0][2]
    pixels = {image.getpixel((x, y)) for x in range(x0, x1 + 1) for y in range(y0, y1 + 1)}
    assert COLOURS[task.answer] in pixels


def test_checker_is_case_and_punctuation_tolerant():
    red = VisionTask("colour", (), "red", "blue", key="k")
    assert check(red, "Red.") and check(red, " **red** it is") and check(red, "RED!")
    assert not check(red, "blue") and not check(red, "The shape is red.") and not check(red, "")
    two = VisionTask("count", (), "2", "3", key="k")
    assert check(two, "2") and check(two, "Two.") and not check(two, "3")
    assert check(Pair("<image>Q", "circle", "square"), "Circle")
    assert check(Pair("<image>Q", [{"role": "assistant", "content": "3"}], "1"), "three")


def test_split_holds_out_eval_images():
    train, evals = generate_split(40, 12, seed=0)
    assert len(train) == 40 and len(evals) == 12
    assert not {t.key for t in train} & {t.key for t in evals}


def test_records_and_jsonl_round_trip(tmp_path):
    tasks = generate_tasks(6, seed=3)
    records = to_records(tasks, tmp_path / "images", prefix="train")
    assert records[0].prompt == "<image>" + QUESTIONS["colour"]
    assert records[0].chosen == tasks[0].answer and records[0].rejected == tasks[0].rejected
    assert records[0].images[0].path.endswith("images/train-00000.png")
    assert records[0].images[0].load().tobytes() == tasks[0].image().tobytes()
    path = write_jsonl(records, tmp_path / "train.jsonl", families=[t.family for t in tasks])
    assert '"images": ["images/train-00000.png"]' in (tmp_path / "train.jsonl").read_text()
    loaded = load_records(path)
    assert [r.images[0].key for r in loaded] == [r.images[0].key for r in records]
    assert [(r.prompt, r.chosen, r.rejected) for r in loaded] == \
        [(r.prompt, r.chosen, r.rejected) for r in records]
    chat = to_records(tasks[:2], tmp_path / "chat", conversational=True)
    write_jsonl(chat, tmp_path / "chat.jsonl")
    back = load_records(str(tmp_path / "chat.jsonl"))
    assert back[0].prompt[0]["content"][0] == {"type": "image"}
    assert back[0].images[0].key == chat[0].images[0].key
