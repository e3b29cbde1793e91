"""Vision-language models on the spine: image records through the model's own processor, every
layout against plain HF forwards, mDPO's negative-image slot, training, reload, bad input."""

import json
from pathlib import Path

import pytest
import torch

from preftune.data.layout import LAYOUTS, collate
from preftune.data.prepare import with_negative_image_slot
from preftune.data.records import DataError
from preftune.data.sources import load_records
from preftune.data.tokenize import TokenizeSettings, tokenize_records
from preftune.model.forward import LogpModel, sequence_stats
from preftune.model.load import load_model_and_tokenizer
from preftune.model.reference import reference_cache_key
from tiny_vlms import save_tiny_vlm_dir, solid_image

RED, BLUE, GREY = (200, 30, 30), (30, 30, 200), (120, 120, 120)


@pytest.fixture(scope="module", params=["llava", "idefics3", "qwen2_vl", "qwen2_5_vl", "qwen3_vl",
                                        "qwen3_vl_moe", "glm4v", "glm4v_moe", "gemma3"])
def vlm(request, tmp_path_factory):
    """(model, tokenizer, data folder) for each tiny VLM family."""
    root = tmp_path_factory.mktemp(request.param)
    model, tokenizer = load_model_and_tokenizer(str(save_tiny_vlm_dir(root / "model",
                                                                      request.param)))
    for name, colour in (("red", RED), ("blue", BLUE), ("grey", GREY)):
        solid_image(root / f"{name}.png", colour)
    return model, tokenizer, root


def write_rows(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def image_examples(tokenizer, root, negatives=False):
    """Two pairs: a plain-string prompt with an <image> placeholder, and a message-list prompt
    with an image part (image given in the 'images' column)."""
    extra = {"negative_images": ["grey.png"]} if negatives else {}
    first = write_rows(root / "a.jsonl", [{"prompt": "Colour? <image>", "images": ["red.png"],
                                           "chosen": "red", "rejected": "blue!", **extra}])
    second = write_rows(root / "b.jsonl", [{
        "prompt": [{"role": "user", "content": [{"type": "image"},
                                                {"type": "text", "text": "which?"}]}],
        "images": ["blue.png"], "chosen": "blue", "rejected": "no", **extra}])
    records = load_records(first) + load_records(second)
    examples, report = tokenize_records(records, tokenizer, TokenizeSettings(128, 96))
    assert report.kept == 2 and report.images == 2
    return examples


def plain_logps(model, tokenizer, example, slot):
    """log pi(response | prompt, images) from the HF model's own forward on one sequence."""
    response = example.response_ids[slot]
    ids = torch.tensor([example.prompt_ids + response])
    pixels = tokenizer.image_inputs.pixels(list(example.images_of_slot(slot)))
    image_tokens = (ids == tokenizer.image_inputs.image_token_id).int()
    if tokenizer.image_inputs.mrope:  # Qwen2-VL, GLM-4.1V: their 3-D positions from these
        pixels["mm_token_type_ids"] = image_tokens
    if model.config.model_type == "gemma3":  # its image tokens attend both ways, from these
        pixels["token_type_ids"] = image_tokens
    logits = model(input_ids=ids, **pixels).logits[0].float().log_softmax(-1)
    start = len(example.prompt_ids) - 1
    return sum(logits[start + j, token] for j, token in enumerate(response))


def test_image_tokens_come_from_the_processor(vlm):
    model, tokenizer, root = vlm
    examples = image_examples(tokenizer, root)
    images = tokenizer.image_inputs
    per_image = {"LlavaForConditionalGeneration": 16, "Idefics3ForConditionalGeneration": 4,
                 "Qwen2VLForConditionalGeneration": 4, "Qwen2_5_VLForConditionalGeneration": 4,
                 "Qwen3VLForConditionalGeneration": 4, "Qwen3VLMoeForConditionalGeneration": 4,
                 "Glm4vForConditionalGeneration": 4, "Glm4vMoeForConditionalGeneration": 4,
                 "Gemma3ForConditionalGeneration": 4}
    expected = per_image[type(model).__name__]
    for example in examples:
        assert example.image_token_counts == (expected,)
        assert example.prompt_ids.count(images.image_token_id) == expected
        assert images.image_token_id not in sum(example.response_ids, [])


def test_every_layout_equals_plain_forwards(vlm):
    model, tokenizer, root = vlm
    examples = with_negative_image_slot(image_examples(tokenizer, root, negatives=True))
    logp_model = LogpModel(model)
    with torch.no_grad():
        plain = torch.tensor([[float(plain_logps(model, tokenizer, ex, r)) for r in range(3)]
                              for ex in examples])
    grads = {}
    for layout in LAYOUTS:
        model.zero_grad()
        batch = collate(examples, tokenizer.pad_token_id, layout, images=tokenizer.image_inputs)
        # three distinct images (red, blue, grey): each encoded once whatever the layout
        pixels = batch.image_inputs  # Qwen2-VL: flattened patches, one grid row per image
        assert len(pixels.get("image_grid_thw", pixels["pixel_values"])) == 3
        logps = sequence_stats(logp_model(batch), batch).logps
        torch.testing.assert_close(logps, plain, rtol=1e-5, atol=1e-4)
        logps.sum().backward()
        grads[layout] = {name: p.grad.clone() for name, p in model.named_parameters()
                         if p.grad is not None}
    vision_grads = [n for n in grads["padded"] if "vision" in n or "visual" in n]
    assert vision_grads, "the vision tower takes part in the gradient"
    for layout in LAYOUTS[1:]:
        assert grads[layout].keys() == grads["padded"].keys()
        for name, value in grads["padded"].items():  # float noise grows with the gradients
            scale = max(1.0, value.abs().max().item())  # (Gemma 3's reach the thousands)
            torch.testing.assert_close(grads[layout][name], value, rtol=1e-4, atol=1e-5 * scale)


def test_gemma3_image_tokens_see_each_other_both_ways_in_every_layout(vlm):
    """The mask adds to each layout's causal rule exactly the pairs (query, key) of one image's
    tokens with the key after the query, with and without an 8-token sliding window (which
    limits how far back a query looks, not forward)."""
    model, tokenizer, root = vlm
    if model.config.model_type != "gemma3":
        pytest.skip("Gemma 3's rule")
    token = tokenizer.image_inputs.image_token_id
    examples = image_examples(tokenizer, root)
    for layout in LAYOUTS:
        batch = collate(examples, tokenizer.pad_token_id, layout, images=tokenizer.image_inputs)
        expected, images = set(), 0
        for row, ids in enumerate(batch.input_ids.tolist()):
            at = 0
            while at < len(ids):
                if ids[at] != token:
                    at += 1
                    continue
                start = at  # a run of image tokens: one image
                while at < len(ids) and ids[at] == token:
                    at += 1
                images += 1
                expected |= {(row, q, k) for q in range(start, at) for k in range(q + 1, at)}
        # 2 pairs, each image once per prompt when shared, else once per response
        assert images == (2 if "shared" in layout else 4)
        assert len(expected) == 6 * images  # 4 tokens an image: 6 pairs
        for window in (None, 8):
            causal = batch.attention_bias(torch.float32, window)[:, 0] == 0
            both = batch.attention_bias(torch.float32, window, token)[:, 0] == 0
            assert not (causal & ~both).any()
            assert set(map(tuple, (both & ~causal).nonzero().tolist())) == expected


def test_prefix_sharing_runs_the_image_prompt_once_per_pair(vlm):
    model, tokenizer, root = vlm
    examples = image_examples(tokenizer, root)
    padded = collate(examples, tokenizer.pad_token_id, "padded", images=tokenizer.image_inputs)
    shared = collate(examples, tokenizer.pad_token_id, "prefix_shared",
                     images=tokenizer.image_inputs)
    tokens = sum(examples[0].image_token_counts) + sum(examples[1].image_token_counts)
    assert padded.image_positions.numel() == 2 * tokens  # a row per response
    assert shared.image_positions.numel() == tokens  # the prompt once per pair
    # mDPO's negative-image slot cannot share the prompt: it gets a unit of its own
    negatives = with_negative_image_slot(image_examples(tokenizer, root, negatives=True))
    with_slot = collate(negatives, tokenizer.pad_token_id, "prefix_shared",
                        images=tokenizer.image_inputs)
    assert with_slot.image_positions.numel() == 2 * tokens
    assert with_slot.input_ids.shape[0] == 4  # per pair: [prompt | y_w | y_l], [prompt' | y_w]


def test_reference_cache_key_sees_image_content(vlm, tmp_path):
    model, tokenizer, root = vlm
    examples = image_examples(tokenizer, root)
    key = reference_cache_key(model, examples, {})
    solid_image(root / "red.png", (201, 30, 30))  # same size, same tokens, other pixels
    changed = image_examples(tokenizer, root)
    changed_key = reference_cache_key(model, changed, {})
    solid_image(root / "red.png", RED)
    assert [e.prompt_ids for e in changed] == [e.prompt_ids for e in examples]
    assert changed_key != key
    assert reference_cache_key(model, image_examples(tokenizer, root), {}) == key


def test_mdpo_slot_is_chosen_under_the_negative_image(vlm):
    model, tokenizer, root = vlm
    examples = with_negative_image_slot(image_examples(tokenizer, root, negatives=True))
    for example in examples:
        assert example.response_ids[2] == example.response_ids[0]
        assert [i.path.endswith("grey.png") for i in example.images_of_slot(2)] == [True]
        assert example.images_of_slot(0) == example.images_of_slot(1) == example.images
    with pytest.raises(DataError, match=r"a\.jsonl:1: .*no 'negative_images'.*images:corrupt"):
        with_negative_image_slot(image_examples(tokenizer, root))


# --------------------------------------------------------------------------------------------
# bad input names the record and the field


def test_missing_image_file(tmp_path):
    path = write_rows(tmp_path / "d.jsonl", [{"prompt": "<image>?", "images": ["nope.png"],
                                              "chosen": "a", "rejected": "b"}])
    with pytest.raises(DataError, match=r"d\.jsonl:1: field 'images', item 0: image file "
                                        r"'nope.png' does not exist"):
        load_records(path)


def test_each_file_of_a_dataset_folder_finds_its_images_beside_it(tmp_path):
    """A dataset directory whose split spans files in several folders: each file's relative
    image paths start at its own folder (not the first file's)."""
    for part, colour in (("aaa", RED), ("bbb", BLUE)):
        (tmp_path / "hub" / part / "img").mkdir(parents=True)
        solid_image(tmp_path / "hub" / part / "img" / "x.png", colour)
        write_rows(tmp_path / "hub" / part / "train.jsonl", [
            {"prompt": "<image>?", "images": ["img/x.png"], "chosen": part, "rejected": "b"}])
    records = load_records(str(tmp_path / "hub"))
    assert {r.chosen: r.images[0].path for r in records} == {
        part: str(tmp_path / "hub" / part / "img" / "x.png") for part in ("aaa", "bbb")}


def test_image_bytes_as_text_are_refused_by_record(tmp_path):
    """JSON holds no bytes: a base64 string under 'bytes' is named, not a TypeError."""
    base64_png = {"bytes": "iVBORw0KGgo=", "path": None}
    path = write_rows(tmp_path / "d.jsonl", [{"prompt": "<image>?", "images": [base64_png],
                                              "chosen": "a", "rejected": "b"}])
    with pytest.raises(DataError, match=r"d\.jsonl:1: field 'images', item 0: 'bytes' holds a "
                                        r"str, not encoded image bytes"):
        load_records(path)


def test_unreadable_image_bytes(vlm, tmp_path):
    model, tokenizer, root = vlm
    (tmp_path / "broken.png").write_bytes(b"not an image at all")
    path = write_rows(tmp_path / "d.jsonl", [{"prompt": "<image>?", "images": ["broken.png"],
                                              "chosen": "a", "rejected": "b"}])
    records = load_records(path)
    with pytest.raises(DataError, match=r"d\.jsonl:1: field 'images', item 0: file .*broken.png"
                                        r"' is not a readable image"):
        tokenize_records(records, tokenizer, TokenizeSettings(128, 96))


def test_an_image_past_pils_size_guard_is_named(tmp_path, monkeypatch):
    """PIL refuses images above twice MAX_IMAGE_PIXELS (a decompression bomb, or a big scan)
    with an error of its own, which was a traceback."""
    from PIL import Image

    solid_image(tmp_path / "big.png", RED)  # 20 x 20 = 400 pixels against a limit of 2 x 100
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    path = write_rows(tmp_path / "d.jsonl", [{"prompt": "<image>?", "images": ["big.png"],
                                              "chosen": "a", "rejected": "b"}])
    with pytest.raises(DataError, match=r"d\.jsonl:1: field 'images', item 0: file .*big.png' "
                                        r"is larger than PIL opens .*downscale the image"):
        load_records(path)[0].images[0].load()


def test_wrong_placeholder_count(tmp_path):
    solid_image(tmp_path / "x.png", RED)
    path = write_rows(tmp_path / "d.jsonl", [{"prompt": "<image> and <image>?",
                                              "images": ["x.png"], "chosen": "a",
                                              "rejected": "b"}])
    with pytest.raises(DataError, match=r"d\.jsonl:1: field 'prompt' has 2 image placeholder"
                                        r".* 1 image\(s\) in field 'images'"):
        load_records(path)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_the_image_token_without_an_image_is_refused(tmp_path, family):
    """A string prompt holding the image placeholder and no images: refused by record, not left
    for the forward to fail on (a shape mismatch; LLaVA's token is the placeholder) or trained
    as text (Qwen2-VL's token is another)."""
    model_dir = save_tiny_vlm_dir(tmp_path / "model", family)
    _, tokenizer = load_model_and_tokenizer(str(model_dir))
    path = write_rows(tmp_path / "d.jsonl", [
        {"prompt": "Colour?", "chosen": "red", "rejected": "blue"},
        {"prompt": "What colour is the shape? <image>", "chosen": "red", "rejected": "blue"}])
    with pytest.raises(DataError, match=r"d\.jsonl:2: field 'prompt' holds an image placeholder "
                                        r"but the record has no images"):
        tokenize_records(load_records(path), tokenizer, TokenizeSettings(128, 96))


def test_a_placeholder_in_a_messages_text_is_an_image_part(tmp_path):
    """``<image>`` written in a message's text is where its image goes, as an image part
    there: Qwen2-VL's template writes its image tokens for a part, not for the text."""
    model_dir = save_tiny_vlm_dir(tmp_path / "model", "qwen2_vl")
    _, tokenizer = load_model_and_tokenizer(str(model_dir))
    solid_image(tmp_path / "x.png", RED)
    parts = [{"type": "text", "text": "What colour? "}, {"type": "image"},
             {"type": "text", "text": " Say."}]
    path = write_rows(tmp_path / "d.jsonl", [
        {"prompt": [{"role": "user", "content": "What colour? <image> Say."}],
         "images": ["x.png"], "chosen": "red", "rejected": "blue"},
        {"prompt": [{"role": "user", "content": parts}], "images": ["x.png"], "chosen": "red",
         "rejected": "blue"}])
    records = load_records(path)
    assert records[0].prompt == records[1].prompt == [{"role": "user", "content": parts}]
    examples, report = tokenize_records(records, tokenizer, TokenizeSettings(128, 96))
    assert report.kept == 2 and examples[0].prompt_ids == examples[1].prompt_ids


def test_negative_images_without_images_are_refused(tmp_path):
    solid_image(tmp_path / "x.png", RED)
    path = write_rows(tmp_path / "d.jsonl", [{"prompt": "Colour?", "negative_images": ["x.png"],
                                              "chosen": "a", "rejected": "b"}])
    with pytest.raises(DataError, match=r"d\.jsonl:1: field 'negative_images' gives negative "
                                        r"images, but the prompt shows no image"):
        load_records(path)


def test_an_image_in_a_response_is_refused(tmp_path):
    """Images go in the prompt only: a response's image part was dropped without a word, and
    '<image>' in a response's text trained LLaVA's image token with no image behind it."""
    model_dir = save_tiny_vlm_dir(tmp_path / "model", "llava")
    _, tokenizer = load_model_and_tokenizer(str(model_dir))
    solid_image(tmp_path / "x.png", RED)
    part = [{"role": "assistant", "content": [{"type": "image", "image": "x.png"},
                                              {"type": "text", "text": "red"}]}]
    path = write_rows(tmp_path / "d.jsonl", [
        {"prompt": "Colour? <image>", "images": ["x.png"], "chosen": "red", "rejected": "blue"},
        {"prompt": "Colour? <image>", "images": ["x.png"], "chosen": "red <image>",
         "rejected": "blue"}])
    with pytest.raises(DataError, match=r"d\.jsonl:2: a response holds the model's image token "
                                        r"'<image>'; images go in the prompt only"):
        tokenize_records(load_records(path), tokenizer, TokenizeSettings(128, 96))
    path = write_rows(tmp_path / "m.jsonl", [{
        "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "?"}]}],
        "images": ["x.png"], "chosen": part, "rejected": [{"role": "assistant", "content": "b"}]}])
    with pytest.raises(DataError, match=r"m\.jsonl:1: a response holds an image part; images "
                                        r"go in the prompt only"):
        tokenize_records(load_records(path), tokenizer, TokenizeSettings(128, 96))


def test_prompt_without_placeholder_gets_the_image_first(tmp_path):
    solid_image(tmp_path / "x.png", RED)
    path = write_rows(tmp_path / "d.jsonl", [{"prompt": "What colour?", "image": "x.png",
                                              "chosen": "red", "rejected": "blue"}])
    (record,) = load_records(path)
    assert record.prompt == "<image>What colour?"
    assert [image.path for image in record.images] == [str(tmp_path / "x.png")]


def test_images_given_as_data_uris_are_read_as_their_bytes(tmp_path):
    """(A data URI was looked for as a file; diffusion data took them already.)"""
    import base64

    from preftune.data.images import ImageRef

    solid_image(tmp_path / "x.png", RED)
    encoded = base64.b64encode((tmp_path / "x.png").read_bytes()).decode()
    path = write_rows(tmp_path / "d.jsonl", [
        {"prompt": "<image>?", "images": [f"data:image/png;base64,{encoded}"], "chosen": "a",
         "rejected": "b"}])
    (record,) = load_records(path)
    (image,) = record.images
    assert image.data == (tmp_path / "x.png").read_bytes()
    assert image.load().tobytes() == ImageRef(path=str(tmp_path / "x.png")).load().tobytes()
    Path(path).write_text(json.dumps({"prompt": "<image>?", "images": ["data:image/png,%89PNG"],
                                      "chosen": "a", "rejected": "b"}) + "\n")
    with pytest.raises(DataError, match=r"d\.jsonl:1: field 'images', item 0: a data URI that "
                                        r"is not base64 image data"):
        load_records(path)


def test_an_image_and_an_images_field_together_are_refused(tmp_path):
    """(The single image was dropped without a word.)"""
    solid_image(tmp_path / "x.png", RED)
    path = write_rows(tmp_path / "d.jsonl", [{"prompt": "<image><image>?", "image": "x.png",
                                              "images": ["x.png"], "chosen": "a",
                                              "rejected": "b"}])
    with pytest.raises(DataError, match=r"d\.jsonl:1: fields 'images' and 'image' both give the "
                                        r"record's images; give them all in 'images'"):
        load_records(path)


def test_images_for_a_text_only_model(tmp_path, tiny_tokenizer):
    solid_image(tmp_path / "x.png", RED)
    path = write_rows(tmp_path / "d.jsonl", [{"prompt": "<image>?", "images": ["x.png"],
                                              "chosen": "a", "rejected": "b"}])
    with pytest.raises(DataError, match=r"d\.jsonl:1: the record has images but the model is "
                                        r"text-only"):
        tokenize_records(load_records(path), tiny_tokenizer, TokenizeSettings(128, 96))


def test_negative_images_one_per_image(tmp_path):
    solid_image(tmp_path / "x.png", RED)
    path = write_rows(tmp_path / "d.jsonl", [{"prompt": "<image>?", "images": ["x.png"],
                                              "negative_images": ["x.png", "x.png"],
                                              "chosen": "a", "rejected": "b"}])
    with pytest.raises(DataError, match=r"d\.jsonl:1: field 'negative_images' has 2 image\(s\) "
                                        r"but the prompt shows 1"):
        load_records(path)


def test_other_mrope_models_are_refused_by_name(tmp_path):
    """M-RoPE models other than Qwen2-VL / Qwen2.5-VL / Qwen3-VL (-MoE) / GLM-4.1V / GLM-4.5V
    (here ERNIE 4.5-VL) were not checked against the layouts: a clear refusal, not silently
    wrong positions."""
    from preftune.config import ConfigError

    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "ernie4_5_vl_moe", "vision_config": {"depth": 1},
        "text_config": {"rope_scaling": {"type": "mrope", "mrope_section": [2, 1, 1]}}}))
    with pytest.raises(ConfigError, match=r"ernie4_5_vl_moe model with multimodal rotary "
                                          r"positions \(M-RoPE\).*Qwen2-VL, Qwen2.5-VL, "
                                          r"Qwen3-VL \(-MoE\), GLM-4.1V and GLM-4.5V only"):
        load_model_and_tokenizer(str(tmp_path))


def test_an_unknown_mrope_image_token_is_named():
    """A processor that does not name the tokens around its image token gets them from the
    known M-RoPE families (Qwen2-VL's, GLM-4.1V's); any other image token is refused by name."""
    from types import SimpleNamespace

    from preftune.data.vision import ImageInputs
    from tiny_models import char_tokenizer

    tokenizer = char_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": [
        "<|image|>", "<|begin_of_image|>", "<|end_of_image|>", "<|img|>"]})
    glm = ImageInputs(SimpleNamespace(tokenizer=tokenizer, image_token="<|image|>"), mrope=True)
    assert glm.image_text == "<|begin_of_image|><|image|><|end_of_image|>"
    with pytest.raises(ValueError, match=r"image token '<\|img\|>' is none of the M-RoPE image "
                                         r"tokens preftune knows"):
        ImageInputs(SimpleNamespace(tokenizer=tokenizer, image_token="<|img|>"), mrope=True)


def test_a_row_with_images_reads_back_the_same_written_elsewhere(tmp_path):
    """rm score / rm strength write each input row with its scores: a relative path then
    pointed nowhere, and bytes were written as their Python repr. portable_row lists every image
    (a column, inline parts, bytes, negatives) by absolute path."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from preftune.data.images import portable_row
    from preftune.data.rows import read_rows

    data = tmp_path / "data"
    data.mkdir()
    solid_image(data / "red.png", RED)
    solid_image(data / "blue.png", BLUE)
    png = (data / "blue.png").read_bytes()
    rows = [{"prompt": "<image> colour?", "images": ["red.png"], "chosen": "red",
             "rejected": "blue", "negative_images": [{"bytes": png, "path": None}]},
            {"prompt": "no image", "chosen": "a", "rejected": "b", "negative_images": [],
             "images": None}]
    pq.write_table(pa.Table.from_pylist(rows), data / "pairs.parquet")
    inline = {"prompt": [{"role": "user", "content": [{"type": "image", "image": "red.png"},
                                                       {"type": "text", "text": "colour?"}]}],
              "chosen": "red", "rejected": "blue"}
    (data / "chat.jsonl").write_text(json.dumps(inline) + "\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    records, written, again = [], [], []
    for source in (data / "pairs.parquet", data / "chat.jsonl"):
        records += load_records(str(source))
        rows_out = [portable_row(row, record, {}, elsewhere / "scored_images")
                    for (_, row), record in zip(read_rows(str(source), {}),
                                                records[len(written):])]
        out = elsewhere / f"{source.stem}.jsonl"
        out.write_text("".join(json.dumps(row) + "\n" for row in rows_out))
        written += rows_out
        again += load_records(str(out))
    for before, after in zip(records, again, strict=True):
        assert [i.key for i in after.images] == [i.key for i in before.images]
        assert [i.key for i in after.negative_images] == \
            [i.key for i in before.negative_images]
        assert after.prompt == before.prompt
    assert [len(r.images) for r in again] == [1, 0, 1] and len(again[0].negative_images) == 1
    assert written[1] == rows[1]  # (no image: as it was)
    assert written[0]["images"] == [str(data / "red.png")]
    assert written[0]["negative_images"][0].startswith(str(elsewhere / "scored_images"))
    assert written[2]["images"] == [str(data / "red.png")]  # (the inline part's image)
    assert written[2]["prompt"][0]["content"][0] == {"type": "image"}
