import random
import re

import pytest
from PIL import Image

from preftune.config import DataConfig
from preftune.data.convert import CONVERSIONS, convert, pairs_to_unpaired, ranked_to_pairs
from preftune.data.image_transforms import (GRID_NAMES, corrupt_image, corrupt_pairs, mia_pairs,
                                            refer)
from preftune.data.images import ImageRef
from preftune.data.povid import VOCABULARIES, hallucinate, povid_pairs
from preftune.data.records import DataError, Pair, Ranked

COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0)}


def solid(colour, size=(32, 32)):
    return Image.new("RGB", size, COLOURS[colour])


def gradient():
    image = Image.new("RGB", (32, 32))
    image.putdata([(8 * x, 8 * y, 0) for y in range(32) for x in range(32)])
    return image


def pairs(n=4, prompt="<image>What colour is it?"):
    colours = [list(COLOURS)[k % 4] for k in range(n)]
    return [Pair(prompt, colour, "purple", origin=f"f:{k + 1}",
                 images=(ImageRef(pil=solid(colour), origin=f"f:{k + 1}"),))
            for k, colour in enumerate(colours)]


def colour_at(image, xy):
    return next(name for name, rgb in COLOURS.items() if image.getpixel(xy) == rgb)


# ----------------------------------------------------------------------------- corruptions


def test_mask_blacks_out_one_large_rectangle_and_nothing_else():
    white = Image.new("RGB", (32, 32), (255, 255, 255))
    masked = corrupt_image(white, "mask", random.Random(3))
    pixels = [masked.getpixel((x, y)) for y in range(32) for x in range(32)]
    black = [k for k, p in enumerate(pixels) if p == (0, 0, 0)]
    x0, y0, x1, y1 = masked.convert("L").point(lambda v: 255 - v).getbbox()
    assert len(black) == (x1 - x0) * (y1 - y0)  # the black pixels fill their bounding box
    assert 19 <= x1 - x0 <= 29 and 19 <= y1 - y0 <= 29  # 60-90% of each side
    assert all(p == (255, 255, 255) for k, p in enumerate(pixels) if k not in set(black))


def test_crop_keeps_a_small_region_of_the_image_at_the_image_size():
    """A region of 5-20% of the area, scaled back up (the negative image must give as many
    image tokens as the image): exactly one such square region of the gradient matches."""
    from PIL import Image

    image = gradient()
    crop = corrupt_image(image, "crop", random.Random(0))
    assert crop.size == image.size
    matches = [(x, y, side) for side in range(7, 15) for x in range(33 - side)
               for y in range(33 - side)
               if image.crop((x, y, x + side, y + side)).resize(
                   (32, 32), Image.Resampling.BICUBIC).tobytes() == crop.tobytes()]
    assert len(matches) == 1 and 0.05 <= matches[0][2] ** 2 / (32 * 32) <= 0.2


def test_noise_and_blur():
    image = gradient()
    noised = corrupt_image(image, "noise", random.Random(1))
    assert noised.size == image.size and noised.tobytes() != image.tobytes()
    assert corrupt_image(image, "noise", random.Random(1)).tobytes() == noised.tobytes()
    assert corrupt_image(image, "noise", random.Random(2)).tobytes() != noised.tobytes()
    flat = solid("red")
    assert corrupt_image(flat, "blur", random.Random(0)).tobytes() == flat.tobytes()
    edge = Image.new("RGB", (32, 32))
    edge.paste((255, 255, 255), (16, 0, 32, 32))
    assert 0 < corrupt_image(edge, "blur", random.Random(0)).getpixel((16, 5))[0] < 255
    with pytest.raises(ValueError, match="unknown image corruption 'rotate'.*crop, mask"):
        corrupt_image(flat, "rotate", random.Random(0))


def test_corrupt_pairs_sets_negative_images_deterministically():
    records = [Pair("<image>Q", "a", "b", origin=f"f:{k}",
                    images=(ImageRef(pil=gradient(), origin=f"f:{k}"),)) for k in (1, 2)]
    out = corrupt_pairs(records, "mask", seed=7)
    assert [r.origin for r in out] == ["f:1 [corrupt:mask]", "f:2 [corrupt:mask]"]
    assert all(len(r.negative_images) == 1 and r.images == s.images for r, s in zip(out, records))
    again = corrupt_pairs(records, "mask", seed=7)
    keys = [r.negative_images[0].key for r in out]
    assert keys == [r.negative_images[0].key for r in again]  # same seed: identical pixels
    assert keys[0] != keys[1]  # same image, different record: a different corruption
    assert corrupt_pairs(records, "mask", seed=8)[0].negative_images[0].key != keys[0]
    default = convert(records, "images:corrupt", seed=7)
    assert default[0].origin == "f:1 [corrupt:crop]"
    assert default[0].negative_images[0].key == corrupt_pairs(records, "crop", seed=7)[
        0].negative_images[0].key  # the default corruption is a crop


def test_image_conversion_on_records_without_images_says_what_to_do():
    for to in ("images:corrupt", "images:mia_grid"):
        with pytest.raises(DataError) as error:
            convert([Pair("p", "a", "b", origin="data.jsonl:3")] * 4, to)
        message = str(error.value)
        assert message.startswith("data.jsonl:3: conversion") and to in message
        assert "has none" in message and "images column" in message


# ----------------------------------------------------------------------------- MIA-DPO


def test_mia_sequence_names_the_records_image_and_rejects_a_distractors_answer():
    records = pairs()
    for record, out in zip(records, mia_pairs(records, "sequence", seed=0)):
        assert out.origin == f"{record.origin} [mia_sequence]"
        assert out.prompt.startswith("<image><image><image>In image ")
        n = int(re.search(r"In image (\d), what colour is it\?$", out.prompt).group(1))
        assert out.images[n - 1] is record.images[0] and len(out.images) == 3
        shown = {colour_at(ref.load(), (0, 0)) for ref in out.images}
        assert out.rejected in shown - {record.chosen}


def test_mia_marks_a_distractors_answer_cut_off_where_it_was():
    from dataclasses import replace
    records = [replace(record, unfinished=(0,) if record.chosen == "green" else (1,))
               for record in pairs()]
    for record, out in zip(records, mia_pairs(records, "sequence", seed=0)):
        own = (0,) if record.chosen == "green" else ()
        assert out.unfinished == own + ((1,) if out.rejected == "green" else ())


def test_mia_grid_names_the_quadrant_of_the_records_image():
    records = pairs()
    targets = set()
    for record, out in zip(records, mia_pairs(records, "grid", seed=0)):
        grid = out.images[0].load()
        assert grid.size == (64, 64) and len(out.images) == 1 and out.prompt.count("<image>") == 1
        where = re.search(r"In the (\S+) image of the grid, what colour", out.prompt).group(1)
        k = GRID_NAMES.index(where)
        targets.add(k)
        assert colour_at(grid, ((k % 2) * 32 + 16, (k // 2) * 32 + 16)) == record.chosen
        assert out.rejected in set(COLOURS) - {record.chosen}
    assert convert(records, "images:mia_grid") == mia_pairs(records, "grid", seed=0)


def test_mia_images_keep_the_records_image_at_its_size_whatever_the_distractors():
    """A grid's cells took the first image shown, a pip's background was the first image: a
    1x1 distractor there shrank the record's image to one pixel (or hid it under the inset)."""
    from dataclasses import replace

    from preftune.data.images import ImageRef
    from PIL import Image

    records = pairs(8)
    tiny = ImageRef(pil=Image.new("RGB", (1, 1), (0, 0, 0)), origin="f:tiny")
    records = [replace(r, images=(tiny,)) if k % 2 else r for k, r in enumerate(records)]
    for layout in ("grid", "pip"):
        for record, out in zip(records, mia_pairs(records, layout, seed=1)):
            width, height = record.images[0].load().size
            assert out.images[0].load().size == ((2 * width, 2 * height) if layout == "grid"
                                                 else (width, height)), (layout, record.origin)


def test_mia_pip_names_inset_or_background():
    seen, records = set(), pairs(12)  # both kinds of target occur
    for record, out in zip(records, mia_pairs(records, "pip", seed=3)):
        image = out.images[0].load()
        corners = {colour_at(image, xy) for xy in ((6, 6), (26, 6), (6, 26), (26, 26))}
        if "small inset image" in out.prompt:
            seen.add("inset")
            assert record.chosen in corners
        else:
            seen.add("background")
            assert "In the large background image, what colour" in out.prompt
            assert colour_at(image, (16, 16)) == record.chosen
    assert seen == {"inset", "background"}


def test_mia_message_prompts_and_fallback_rejected():
    prompt = [{"role": "system", "content": "Be brief."},
              {"role": "user", "content": [{"type": "image"},
                                           {"type": "text", "text": "What colour is it?"}]}]
    same = [Pair(prompt, "red", "blue", origin=f"g:{k}",
                 images=(ImageRef(pil=solid(c)),)) for k, c in enumerate(COLOURS)]
    out = mia_pairs(same, "sequence", seed=0)[0]
    parts = out.prompt[1]["content"]
    assert [p["type"] for p in parts] == ["image", "image", "image", "text"]
    assert re.fullmatch(r"In image [123], what colour is it\?", parts[3]["text"])
    assert out.prompt[0] == prompt[0] and out.rejected == "blue"  # every answer is "red"
    assert refer("Look: <image> Which colour?", "In image 1,") == \
        "Look: <image> In image 1, which colour?"
    assert refer("I see <image>", "In image 2,") == "In image 2, I see <image>"


def test_mia_bad_input():
    two = Pair("<image><image>Q", "a", "b", origin="f:9",
               images=(ImageRef(pil=solid("red")), ImageRef(pil=solid("blue"))))
    with pytest.raises(DataError, match="f:9: conversion 'images:mia_pip'.*has 2. Use single"):
        mia_pairs([two] + pairs(), "pip")
    with pytest.raises(DataError, match="shows 4 images .* has 3 record"):
        mia_pairs(pairs()[:3], "grid")


# ----------------------------------------------------------------------------- POVID


def test_povid_substitutes_exactly_the_vocabulary_words():
    text = hallucinate("A red Car on the left, near 3 trees.", random.Random(0))
    words = re.findall(r"\w+", text)
    assert words[0] == "A" and words[3:5] == ["on", "the"] and words[6:] != []
    changed = [w for w, o in zip(words, ["A", "red", "Car", "on", "the", "left", "near", "3",
                                         "trees"]) if w != o]
    assert 1 <= len(changed) <= 3  # up to three edits among red, Car, left, 3
    assert hallucinate("Yes.", random.Random(0)) == "No."
    assert hallucinate("LEFT", random.Random(0)) == "RIGHT"
    assert hallucinate("Nothing to change here.", random.Random(0)) is None
    small = hallucinate("a red circle", random.Random(5))
    colour, shape = small.split()[1:]
    assert colour in VOCABULARIES["colour"] and colour != "red"
    assert shape in VOCABULARIES["shape"] and shape != "circle"
    assert hallucinate("7", random.Random(1)) in {"5", "6", "8", "9"}
    assert re.fullmatch(r"There are [1245]\.", hallucinate("There are 3.", random.Random(0)))
    assert hallucinate("It is 2.5 cm, the 3rd.", random.Random(0)) is None


def test_povid_pairs_keep_rejected_when_nothing_substitutes():
    records = [Pair("p", "The dog is brown.", "orig", origin="f:1"),
               Pair("p", [{"role": "assistant", "content": "Two cups."}], "orig", origin="f:2"),
               Pair("p", "Hello there.", "orig", origin="f:3")]
    unchanged = []
    out = povid_pairs(records, seed=0, unchanged=unchanged)
    assert unchanged == ["f:3"] and out[2].rejected == "orig"
    assert out[0].rejected != "The dog is brown." and out[0].rejected.endswith(".")
    assert out[1].rejected[0]["content"] != "Two cups."
    assert [r.origin for r in out] == ["f:1 [povid]", "f:2 [povid]", "f:3 [povid]"]
    assert povid_pairs(records, seed=0) == out  # deterministic


# ----------------------------------------------------------------------------- dispatch


def test_conversion_lists_apply_in_order_and_config_accepts_them():
    out = convert(pairs(), ["images:mia_grid", "images:corrupt:mask"], seed=1)
    assert out[0].origin == "f:1 [mia_grid] [corrupt:mask]"
    assert out[0].negative_images[0].load().size == (64, 64)
    assert convert(pairs(), [], seed=1) == pairs()
    assert DataConfig(convert=["images:mia_pip", "pairs:povid"]).convert == [
        "images:mia_pip", "pairs:povid"]
    assert DataConfig(convert="unpaired").convert == "unpaired"
    with pytest.raises(ValueError):
        DataConfig(convert=["images:rotate"])
    with pytest.raises(ValueError, match="unknown conversion 'images:rotate'.*images:mia_grid"):
        convert(pairs(), ["images:corrupt", "images:rotate"])
    for name in ("images:corrupt:noise", "images:mia_sequence", "pairs:povid"):
        assert name in CONVERSIONS


def test_shape_conversions_keep_images():
    image = (ImageRef(pil=solid("red")),)
    ranked = Ranked("<image>Q", ("a", "b"), (2.0, 1.0), origin="f:1", images=image)
    pair = ranked_to_pairs([ranked])[0]
    assert pair.images == image
    assert [u.images for u in pairs_to_unpaired([pair])] == [image, image]
    with pytest.raises(DataError, match="'pairs:<mode>' first"):
        convert([ranked], "images:corrupt")


def test_mia_draws_distractors_with_the_same_prompt_when_it_can():
    shapes = [Pair("<image>Which shape?", shape, "star", origin=f"s:{k}",
                   images=(ImageRef(pil=solid("red")),))
              for k, shape in enumerate(["circle", "square", "triangle", "oval"])]
    for out in mia_pairs(pairs() + shapes, "grid", seed=0):
        if "which shape" in out.prompt:
            assert out.rejected in {"circle", "square", "triangle", "oval"}
        else:
            assert out.rejected in COLOURS
