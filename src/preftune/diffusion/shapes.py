"""Generated images with a checkable answer: a coloured shape on a white background, and the
program checker that rates an image for a prompt like "a red circle" (the demo's scorer).

The checker implements the ``Scorer`` interface (``score/base.py``) with images as responses,
so win rates compare diffusion runs the way they compare text runs.
"""

from __future__ import annotations

import random
from typing import Sequence

import torch

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220),
           "yellow": (235, 200, 20)}
SHAPES = ("circle", "square", "triangle")
BACKGROUND = (255, 255, 255)
FOREGROUND_DISTANCE = 90.0  # RGB distance from the background that counts as painted
COLOUR_DISTANCE = 80.0  # RGB distance to a palette colour that counts as that colour


def prompt_of(colour: str, shape: str) -> str:
    return f"a {colour} {shape}"


def parse_prompt(prompt: str) -> tuple[str | None, str | None]:
    words = prompt.lower().split()
    return (next((w for w in words if w in COLOURS), None),
            next((w for w in words if w in SHAPES), None))


def draw_shape(colour: str, shape: str, size: int = 16, rng: random.Random | None = None):
    """A PIL image: ``shape`` in ``colour`` on white, with random position and size."""
    from PIL import Image, ImageDraw

    rng = rng or random.Random(0)
    image = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    extent = rng.randint(size // 2, size - 4)
    left, top = rng.randint(1, size - extent - 1), rng.randint(1, size - extent - 1)
    box = (left, top, left + extent, top + extent)
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(left + extent / 2, top), (left, top + extent),
                      (left + extent, top + extent)], fill=fill)
    return image


def _pixels(image) -> torch.Tensor:
    """[N, 3] float RGB in 0..255 of a PIL image, a path, or a [3, H, W] tensor in [-1, 1]."""
    if isinstance(image, torch.Tensor):
        return ((image.float().clamp(-1, 1) + 1) * 127.5).reshape(3, -1).T
    from .data import open_image

    image = open_image(image)
    data = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    return data.reshape(-1, 3).float()


def colour_shares(image) -> dict[str, float]:
    """For each palette colour, the share of the painted pixels (far from white) that are
    close to it (within ``COLOUR_DISTANCE``); all 0 for a blank image. Noise, muddy or mixed
    pixels count for no colour, so a collapsed model cannot score by painting everything."""
    pixels = _pixels(image)
    painted = pixels[(pixels - torch.tensor(BACKGROUND)).norm(dim=1) > FOREGROUND_DISTANCE]
    if len(painted) == 0:
        return {name: 0.0 for name in COLOURS}
    palette = torch.tensor(list(COLOURS.values()), dtype=torch.float32)
    close = torch.cdist(painted, palette) < COLOUR_DISTANCE
    return {name: float(close[:, k].float().mean()) for k, name in enumerate(COLOURS)}


def colour_score(prompt: str, image) -> float:
    """Share of the painted pixels that are close to the prompt's colour (0 when nothing is
    painted or the prompt names no colour)."""
    colour, _ = parse_prompt(prompt)
    return colour_shares(image).get(colour, 0.0) if colour else 0.0


def right_colour(prompt: str, image) -> bool:
    """At least half of the painted pixels are close to the prompt's colour."""
    return colour_score(prompt, image) >= 0.5


class ColourScorer:
    """Scorer: how much of an image is painted in the colour its prompt asks for (0..1)."""

    name = "shape_colour"
    pairwise = False

    def score(self, prompts: Sequence, responses: Sequence) -> list[float]:
        return [colour_score(p, image) for p, image in zip(prompts, responses)]

    def prefer(self, prompts, first, second) -> list[float]:
        from ..score.base import prefer_by_scores

        return prefer_by_scores(self, prompts, first, second)
