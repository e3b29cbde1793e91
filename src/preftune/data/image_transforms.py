"""Vision preference data made from existing pairs: corrupted images (mDPO), multi-image
augmentation (MIA-DPO) and hallucination-injected rejected answers (POVID, in ``povid.py``).

Pure functions on records. Each returns new records whose ``origin`` extends the source's
(``file.jsonl:3 [corrupt:mask]``), and draws its randomness from the run seed plus the record's
origin, so a rerun gives identical images and texts and two records get different ones.
"""

from __future__ import annotations

import math
import random
from dataclasses import replace
from typing import Sequence

from .images import PLACEHOLDER, ImageRef, with_placeholders
from .records import DataError

CORRUPTIONS = ("crop", "mask", "noise", "blur")
CROP_MAX_SHARE = 0.2  # mDPO: the corrupted image keeps less than 20% of the original
NOISE_ALPHA_BAR = 0.3  # share of signal variance kept, as in forward diffusion q(x_t | x_0)
MIA_LAYOUTS = {"sequence": 3, "grid": 4, "pip": 2}  # layout -> images shown (k)
GRID_NAMES = ("top-left", "top-right", "bottom-left", "bottom-right")


def record_rng(record, position: int, seed: int, tag: str) -> random.Random:
    """A random stream fixed by the seed, the transform and the record's origin (its position
    when it has none). String seeds hash with SHA-512, so streams agree across runs."""
    return random.Random(f"{seed}|{tag}|{record_name(record, position)}")


def record_name(record, position: int) -> str:
    return getattr(record, "origin", "") or f"record {position}"


def _images(record, position: int, conversion: str) -> tuple:
    images = getattr(record, "images", ())
    if not images:
        raise DataError(f"{record_name(record, position)}: conversion {conversion!r} needs a "
                        "record with images (field 'images' or 'image'), and this one has none. "
                        "Give the data an images column, or drop the conversion for text-only "
                        "data.")
    return images


# ----------------------------------------------------------------------------- corruptions


def corrupt_image(image, kind: str, rng: random.Random):
    """A corrupted copy of a PIL image, under which the chosen answer should be less likely
    (mDPO, arXiv:2406.11839; POVID's noised image, arXiv:2405.17220).

    ``crop``: a random rectangle with the image's aspect ratio and 5-20% of its area (mDPO's
    "less than 20%"), scaled back to the image's size (bicubic), so the negative image gives
    as many image tokens as the image it stands in for (dynamic-resolution processors such as
    Qwen2-VL's would give a small crop fewer). ``mask``: a
    random black rectangle covering 60-90% of each side. ``noise``: forward-diffusion noise
    ``sqrt(a) x + sqrt(1 - a) eps`` on pixels in [-1, 1], ``a = NOISE_ALPHA_BAR``. ``blur``: a
    Gaussian blur of radius max(width, height) / 16 (no randomness).
    """
    image = image.convert("RGB")
    width, height = image.size
    if kind == "crop":
        side = math.sqrt(rng.uniform(0.05, CROP_MAX_SHARE))
        w, h = max(1, int(width * side)), max(1, int(height * side))
        x, y = rng.randint(0, width - w), rng.randint(0, height - h)
        from PIL import Image

        return image.crop((x, y, x + w, y + h)).resize((width, height), Image.Resampling.BICUBIC)
    if kind == "mask":
        w, h = round(width * rng.uniform(0.6, 0.9)), round(height * rng.uniform(0.6, 0.9))
        x, y = rng.randint(0, width - w), rng.randint(0, height - h)
        masked = image.copy()
        masked.paste((0, 0, 0), (x, y, x + w, y + h))
        return masked
    if kind == "noise":
        return _noised(image, rng)
    if kind == "blur":
        from PIL import ImageFilter

        return image.filter(ImageFilter.GaussianBlur(radius=max(width, height) / 16))
    raise ValueError(f"unknown image corruption {kind!r}; expected one of "
                     f"{', '.join(CORRUPTIONS)}.")


def _noised(image, rng: random.Random):
    import numpy as np
    from PIL import Image

    pixels = np.asarray(image, dtype=np.float64) / 127.5 - 1.0
    eps = np.random.default_rng(rng.getrandbits(64)).standard_normal(pixels.shape)
    noised = math.sqrt(NOISE_ALPHA_BAR) * pixels + math.sqrt(1 - NOISE_ALPHA_BAR) * eps
    return Image.fromarray(np.clip((noised + 1.0) * 127.5, 0, 255).round().astype(np.uint8))


def corrupt_pairs(records: Sequence, kind: str = "crop", seed: int = 0) -> list:
    """Pairs with ``negative_images``: a ``kind`` corruption of each of the record's images
    (mDPO's conditional preference, arXiv:2406.11839: chosen under the image beats chosen under
    the corrupted one). Existing negative images are replaced."""
    if kind not in CORRUPTIONS:
        raise ValueError(f"unknown image corruption {kind!r}; expected one of "
                         f"{', '.join(CORRUPTIONS)}.")
    out = []
    for position, record in enumerate(records):
        images = _images(record, position, f"images:corrupt:{kind}")
        rng = record_rng(record, position, seed, f"corrupt:{kind}")
        origin = f"{record.origin} [corrupt:{kind}]"
        negative = tuple(
            ImageRef(pil=corrupt_image(ref.load(), kind, rng), origin=origin,
                     where=f"field 'negative_images', item {k} ({kind} of images item {k})")
            for k, ref in enumerate(images))
        out.append(replace(record, origin=origin, negative_images=negative))
    return out


# ----------------------------------------------------------------------------- MIA-DPO


def mia_pairs(records: Sequence, layout: str, seed: int = 0) -> list:
    """Multi-image augmented pairs (MIA-DPO, arXiv:2410.17637).

    Each single-image pair is shown with ``k - 1`` distractor images drawn (seeded) from other
    records, from those with the same prompt when there are enough (so the distractor's chosen
    answers the same question), else from all: ``sequence`` (k=3 images, k placeholders),
    ``grid`` (a 2x2 collage, one image) or ``pip`` (one image with another inset at a third of
    its size; the record's image is the inset or the background). The prompt names which image
    to answer about ("In image 2, ...", "In the top-right image of the grid, ...", "In the
    small inset image, ..."). The rejected answer becomes the first distractor record's chosen
    answer that differs from this record's chosen (an answer about the wrong image, the
    hallucination MIA-DPO targets), else the original rejected. MIA-DPO picks that rejected
    answer by the model's attention on the wrong image; here it is the distractor's own
    reference answer, with no model involved.
    """
    if layout not in MIA_LAYOUTS:
        raise ValueError(f"unknown MIA-DPO layout {layout!r}; expected one of "
                         f"{', '.join(MIA_LAYOUTS)}.")
    k, conversion = MIA_LAYOUTS[layout], f"images:mia_{layout}"
    for position, record in enumerate(records):
        if len(_images(record, position, conversion)) != 1:
            raise DataError(f"{record_name(record, position)}: conversion {conversion!r} "
                            f"combines one image per record with others; this record has "
                            f"{len(record.images)}. Use single-image records.")
    if len(records) < k:
        raise DataError(f"conversion {conversion!r} shows {k} images from different records "
                        f"but the data has {len(records)} record(s); give it at least {k}.")
    same: dict[str, list[int]] = {}
    for position, record in enumerate(records):
        same.setdefault(repr(record.prompt), []).append(position)
    return [_mia_one(records, position, layout, k, seed, same[repr(records[position].prompt)])
            for position in range(len(records))]


def _mia_one(records: Sequence, position: int, layout: str, k: int, seed: int,
             same_prompt: list[int]):
    record = records[position]
    rng = record_rng(record, position, seed, f"mia_{layout}")
    pool = same_prompt if len(same_prompt) >= k else range(len(records))
    others: list[int] = []
    while len(others) < k - 1:
        pick = pool[rng.randrange(len(pool))]
        if pick != position and pick not in others:
            others.append(pick)
    target = rng.randrange(k)
    shown = [records[j].images[0] for j in others]
    shown.insert(target, record.images[0])
    origin = f"{record.origin} [mia_{layout}]"
    if layout == "sequence":
        images, reference = tuple(shown), f"In image {target + 1},"
    elif layout == "grid":  # (each cell the size of the record's own image)
        images = (ImageRef(pil=grid_image([ref.load() for ref in shown],
                                          record.images[0].load().size), origin=origin,
                           where="field 'images', item 0 (2x2 grid)"),)
        reference = f"In the {GRID_NAMES[target]} image of the grid,"
    else:
        corner = rng.randrange(4)
        composed = pip_image(shown[0].load().resize(record.images[0].load().size),
                             shown[1].load(), corner)  # (as large as the record's image)
        images = (ImageRef(pil=composed, origin=origin,
                           where="field 'images', item 0 (pic-in-pic)"),)
        reference = "In the large background image," if target == 0 else "In the small inset image,"
    prompt = refer(expand(with_placeholders(record.prompt, 1), len(images)), reference)
    other = next((j for j in others if records[j].chosen != record.chosen), None)
    rejected, unfinished = record.rejected, record.unfinished
    if other is not None:  # another image's answer, cut off where it was
        rejected = records[other].chosen
        unfinished = tuple(k for k in unfinished if k != 1) + (
            (1,) if 0 in records[other].unfinished else ())
    return replace(record, prompt=prompt, rejected=rejected, images=images, negative_images=(),
                   origin=origin, unfinished=tuple(sorted(unfinished)))


def grid_image(images: Sequence, cell: tuple[int, int]):
    """Four images in a 2x2 collage (row-major: top-left, top-right, bottom-left,
    bottom-right), each resized to ``cell`` (width, height)."""
    from PIL import Image

    width, height = cell
    canvas = Image.new("RGB", (2 * width, 2 * height))
    for k, image in enumerate(images):
        canvas.paste(image.convert("RGB").resize((width, height)),
                     ((k % 2) * width, (k // 2) * height))
    return canvas


def pip_image(background, inset, corner: int):
    """``inset`` at a third of ``background``'s size in one corner (0 top-left, 1 top-right,
    2 bottom-left, 3 bottom-right), a 1/20 margin from the edges."""
    width, height = background.size
    small = inset.convert("RGB").resize((max(1, width // 3), max(1, height // 3)))
    mx, my = width // 20, height // 20
    x = mx if corner % 2 == 0 else width - small.size[0] - mx
    y = my if corner < 2 else height - small.size[1] - my
    composed = background.convert("RGB").copy()
    composed.paste(small, (x, y))
    return composed


# ----------------------------------------------------------------------------- prompt edits


def expand(prompt, count: int):
    """The prompt with its one image placeholder (``<image>`` or an image part) repeated
    ``count`` times in place."""
    if count == 1:
        return prompt
    if isinstance(prompt, str):
        return prompt.replace(PLACEHOLDER, PLACEHOLDER * count, 1)
    messages, done = [], False
    for message in prompt:
        content = message.get("content")
        if not done and isinstance(content, str) and PLACEHOLDER in content:
            content, done = content.replace(PLACEHOLDER, PLACEHOLDER * count, 1), True
        elif not done and isinstance(content, list):
            at = next((i for i, p in enumerate(content)
                       if isinstance(p, dict) and p.get("type") == "image"), None)
            if at is not None:
                content, done = content[:at] + [{"type": "image"}] * count + content[at + 1:], True
        messages.append({**message, "content": content})
    return messages


def refer(prompt, reference: str):
    """The prompt's question prefixed with ``reference`` ("In image 2," + " what colour ...").
    A string prompt's question is its text after the last placeholder (before it, when nothing
    follows); a message list's is the first user message's first text."""
    if isinstance(prompt, str):
        return _refer_text(prompt, reference)
    messages = [dict(m) for m in prompt]
    first = next((i for i, m in enumerate(messages) if m.get("role") == "user"), 0)
    content = messages[first].get("content")
    if isinstance(content, str):
        messages[first]["content"] = _refer_text(content, reference)
        return messages
    parts = list(content or [])
    at = next((i for i, p in enumerate(parts) if isinstance(p, dict) and p.get("type") == "text"),
              None)
    if at is None:
        parts.append({"type": "text", "text": reference.rstrip(",") + "."})
    else:
        parts[at] = {**parts[at], "text": _refer_text(parts[at].get("text", ""), reference)}
    messages[first]["content"] = parts
    return messages


def _refer_text(text: str, reference: str) -> str:
    head, mark, tail = text.rpartition(PLACEHOLDER)
    if tail.strip():
        lead = tail[:len(tail) - len(tail.lstrip())]
        return head + mark + lead + _prefixed(tail.lstrip(), reference)
    if not mark:
        return _prefixed(text, reference)
    lead = head[:len(head) - len(head.lstrip())]
    return lead + _prefixed(head.lstrip(), reference) + mark + tail


def _prefixed(question: str, reference: str) -> str:
    """"In image 2," + "What colour?" -> "In image 2, what colour?" (a capital is lowered only
    when the next letter is lower case, so "I" and acronyms stay)."""
    if len(question) > 1 and question[0].isupper() and question[1].islower():
        question = question[0].lower() + question[1:]
    return f"{reference} {question}" if question else reference
