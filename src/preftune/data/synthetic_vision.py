"""Synthetic, program-checkable vision preference tasks (the data of the CPU vision demo).

Each task is a tiny RGB image (32x32, white background) of coloured shapes and a question a
program can check: the shape's colour ("red"), the shape's name ("circle") or how many shapes
there are ("2"). ``chosen`` is the bare correct answer; ``rejected`` is a plausible wrong one,
either bare ("blue") or chatty ("The shape is blue."), as in the text demo (``synthetic.py``).
Images are PNG files; ``write_jsonl`` writes rows that ``sources.load_records`` reads back.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field
from typing import Sequence

from .checks import check_spec
from .images import PLACEHOLDER, ImageRef
from .records import Pair

SIZE = 32
COLOURS = {"red": (220, 30, 30), "green": (30, 160, 50), "blue": (30, 60, 220),
           "yellow": (235, 200, 20)}
SHAPES = ("circle", "square", "triangle")
COUNTS = (1, 2, 3)
FAMILIES = ("colour", "shape", "count")
# short: the demo's character-level model reads every character as a token
QUESTIONS = {
    "colour": "What colour is the shape?",
    "shape": "Which shape is it?",
    "count": "How many shapes are there?",
}
_CHATTY = {"colour": "The shape is {}.", "shape": "It is a {}.", "count": "There are {} shapes."}


@dataclass(frozen=True)
class VisionTask:
    """One image question: ``family``, what is drawn (``shapes``: (shape, colour, box) each),
    the correct ``answer`` and the ``rejected`` reply. ``key`` is the drawing's identity (the
    same key, the same pixels), whatever the question."""

    family: str
    shapes: tuple
    answer: str
    rejected: str
    key: str = field(compare=False)

    @property
    def question(self) -> str:
        return QUESTIONS[self.family]

    def image(self):
        """The task's image (a new PIL image)."""
        from PIL import Image, ImageDraw

        image = Image.new("RGB", (SIZE, SIZE), (255, 255, 255))
        draw = ImageDraw.Draw(image)
        for shape, colour, (x0, y0, x1, y1) in self.shapes:
            fill = COLOURS[colour]
            if shape == "circle":
                draw.ellipse((x0, y0, x1, y1), fill=fill)
            elif shape == "square":
                draw.rectangle((x0, y0, x1, y1), fill=fill)
            else:
                draw.polygon([((x0 + x1) / 2, y0), (x0, y1), (x1, y1)], fill=fill)
        return image


def _one_shape(rng: random.Random) -> tuple:
    size = rng.randint(14, 20)
    x, y = rng.randint(2, SIZE - size - 2), rng.randint(2, SIZE - size - 2)
    return (rng.choice(SHAPES), rng.choice(sorted(COLOURS)), (x, y, x + size - 1, y + size - 1))


def _several(rng: random.Random, count: int) -> tuple:
    """``count`` shapes of one kind and colour in distinct cells of a 3x3 grid (no overlap)."""
    shape, colour = rng.choice(SHAPES), rng.choice(sorted(COLOURS))
    shapes = []
    for cell in sorted(rng.sample(range(9), count)):
        x, y = 1 + (cell % 3) * 10 + rng.randint(0, 2), 1 + (cell // 3) * 10 + rng.randint(0, 2)
        shapes.append((shape, colour, (x, y, x + 7, y + 7)))
    return tuple(shapes)


def _task(family: str, rng: random.Random, chatty: float) -> VisionTask:
    if family == "count":
        count = rng.choice(COUNTS)
        shapes, answer = _several(rng, count), str(count)
        wrong = str(rng.choice([c for c in COUNTS if c != count]))
    else:
        shapes = (_one_shape(rng),)
        vocabulary = SHAPES if family == "shape" else sorted(COLOURS)
        answer = shapes[0][0] if family == "shape" else shapes[0][1]
        wrong = rng.choice([w for w in vocabulary if w != answer])
    rejected = _CHATTY[family].format(wrong) if rng.random() < chatty else wrong
    return VisionTask(family, shapes, answer, rejected, key=repr(shapes))


def generate_tasks(n: int, seed: int = 0, families: Sequence[str] = FAMILIES,
                   chatty: float = 0.5, exclude: frozenset = frozenset()) -> list[VisionTask]:
    """``n`` tasks, families in turn, distinct drawings, none whose key is in ``exclude``;
    deterministic for ``seed``. ``chatty`` is the share of rejected replies that are a wrong
    sentence rather than a bare wrong word."""
    unknown = [f for f in families if f not in FAMILIES]
    if unknown or not families:
        raise ValueError(f"unknown vision task families {unknown}; known: {', '.join(FAMILIES)}")
    rng, tasks, seen = random.Random(f"synthetic-vision-{seed}"), [], set(exclude)
    for _ in range(200 * (n + 10)):
        if len(tasks) == n:
            return tasks
        task = _task(families[len(tasks) % len(families)], rng, chatty)
        if task.key not in seen:
            seen.add(task.key)
            tasks.append(task)
    raise ValueError(f"cannot draw {n} distinct vision tasks from families {list(families)}")


def generate_split(n_train: int, n_eval: int, seed: int = 0,
                   families: Sequence[str] = FAMILIES, chatty: float = 0.5):
    """``(train, eval)`` task lists; no eval drawing appears in train (held-out images)."""
    evals = generate_tasks(n_eval, seed * 2 + 1, families, chatty)
    train = generate_tasks(n_train, seed * 2, families, chatty,
                           exclude=frozenset(task.key for task in evals))
    return train, evals


def to_records(tasks: Sequence[VisionTask], folder, prefix: str = "task",
               conversational: bool = False, image_last: bool = False) -> list[Pair]:
    """Write each task's image to ``folder/PREFIX-NNNNN.png`` and return pairs: the prompt is
    ``<image>QUESTION`` (or one user message with an image part and a text part);
    ``image_last`` puts the image after the question, right before the answer."""
    os.makedirs(folder, exist_ok=True)
    records = []
    for k, task in enumerate(tasks):
        path = os.path.join(os.fspath(folder), f"{prefix}-{k:05d}.png")
        task.image().save(path)
        if conversational:
            prompt = [{"role": "user", "content": [{"type": "image"},
                                                   {"type": "text", "text": task.question}]}]
        elif image_last:
            prompt = task.question + PLACEHOLDER
        else:
            prompt = PLACEHOLDER + task.question
        records.append(Pair(prompt, task.answer, task.rejected, origin=f"{prefix} {k}",
                            images=(ImageRef(path=path, origin=f"{prefix} {k}",
                                             where="field 'images', item 0"),)))
    return records


def write_jsonl(records: Sequence[Pair], path, families: Sequence[str] = ()) -> str:
    """One row per pair (prompt, chosen, rejected, ``images`` as paths relative to the file's
    folder, and ``family`` when given); returns the path."""
    path = os.fspath(path)
    base = os.path.dirname(os.path.abspath(path))
    with open(path, "w", encoding="utf-8") as handle:
        for k, record in enumerate(records):
            row = {"prompt": record.prompt, "chosen": record.chosen, "rejected": record.rejected,
                   "images": [os.path.relpath(os.path.abspath(ref.path), base)
                              for ref in record.images]}
            row["check"] = {"type": "first_word", "answer": record.chosen}  # the scorer's
            if families:
                row["family"] = families[k]
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def check(record_or_task, text: str) -> bool:
    """Whether ``text`` answers the task: its first word, case and punctuation ignored, is the
    correct answer ("Red." passes for red, "blue" fails; "two" passes for 2). A pair's correct
    answer is its chosen reply."""
    if isinstance(record_or_task, VisionTask):
        answer = record_or_task.answer
    else:
        chosen = record_or_task.chosen
        answer = chosen if isinstance(chosen, str) else chosen[-1]["content"]
    return check_spec({"type": "first_word", "answer": answer}, text)
