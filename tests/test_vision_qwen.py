"""Qwen2-VL, Qwen3-VL, Qwen3-VL-MoE, GLM-4.1V and GLM-4.5V (M-RoPE; Qwen3-VL's interleaved, with
DeepStack features added in its first layer; GLM's on half of each head, its image tokens
<|image|> between <|begin_of_image|> and <|end_of_image|>) on the spine: 3-D positions of every
layout against the model's own rope index and plain HF forwards (non-square images, two images
in a prompt), batched generation with images, a DPO run whose saved model reloads with its HF
class and reproduces the logged eval log-probs, LoRA with the adapters-off reference and a live
reference. (test_vision.py runs its general vision tests on Qwen2-VL, Qwen2.5-VL, Qwen3-VL
(-MoE) and GLM-4.1V / GLM-4.5V too.)
"""

import json
import re

import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText

from preftune import api
from preftune.data.layout import LAYOUTS, collate
from preftune.data.records import DataError
from preftune.data.sources import load_records
from preftune.data.tokenize import TokenizeSettings, tokenize_records
from preftune.data.vision_qwen import mrope_positions, processor_parts
from preftune.generation import greedy_texts, prompt_ids
from preftune.model.forward import LogpModel, sequence_stats
from preftune.model.load import load_model_and_tokenizer
from preftune.train.logging import read_metrics
from test_vision import plain_logps, write_rows
from tiny_vlms import save_tiny_vlm_dir, solid_image

pytestmark = pytest.mark.filterwarnings("ignore")
COLOURS = {"red": (200, 30, 30), "blue": (30, 30, 200), "green": (30, 200, 30)}
# one image in each family's prompt text, written out here (not from preftune's tables)
WRAPS = {"<|image_pad|>": "<|vision_start|><|image_pad|><|vision_end|>",
         "<|image|>": "<|begin_of_image|><|image|><|end_of_image|>"}


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen3_vl", "qwen3_vl_moe", "glm4v",
                                        "glm4v_moe"])
def root(tmp_path_factory, request):
    """A tiny Qwen2-VL, Qwen3-VL or GLM-4.1V dir, square and non-square images, colour pairs."""
    root = tmp_path_factory.mktemp(request.param)
    save_tiny_vlm_dir(root / "model", request.param)
    for name, colour in COLOURS.items():
        solid_image(root / f"{name}.png", colour)
    Image.new("RGB", (32, 16), (200, 200, 30)).save(root / "wide.png")  # 4x2 grid -> 8 tokens
    Image.new("RGB", (16, 32), (30, 200, 200)).save(root / "tall.png")  # 2x4 grid
    names = list(COLOURS)
    rows = [{"prompt": "What colour? <image>", "images": [f"{names[i % 3]}.png"],
             "chosen": names[i % 3], "rejected": names[(i + 1) % 3]} for i in range(8)]
    write_rows(root / "pairs.jsonl", rows)
    return root


@pytest.fixture(scope="module")
def loaded(root):
    return load_model_and_tokenizer(str(root / "model"))


def grid_examples(tokenizer, root):
    """Two pairs: two non-square images in one prompt with text between and after them, and a
    square image in a message-list prompt."""
    first = write_rows(root / "two.jsonl", [{"prompt": "<image> or <image>: which is wide?",
                                             "images": ["wide.png", "tall.png"],
                                             "chosen": "the first", "rejected": "right"}])
    second = write_rows(root / "one.jsonl", [{
        "prompt": [{"role": "user", "content": [{"type": "text", "text": "see"},
                                                {"type": "image"},
                                                {"type": "text", "text": "which?"}]}],
        "images": ["wide.png"], "chosen": "wide", "rejected": "a"}])
    examples, report = tokenize_records(load_records(first) + load_records(second), tokenizer,
                                        TokenizeSettings(128, 96))
    assert report.kept == 2 and report.images == 3
    return examples


def test_mrope_positions_follow_the_grid():
    # text, a 1x2x3 image at 2, text from 2 + max(2, 3)
    positions, after = mrope_positions([5, 5, 9, 9, 9, 9, 9, 9, 5], 9, [(1, 2, 3)])
    assert positions == [[0, 1, 2, 2, 2, 2, 2, 2, 5], [0, 1, 2, 2, 2, 3, 3, 3, 5],
                         [0, 1, 2, 3, 4, 2, 3, 4, 5]]
    assert after == 6


def test_every_layout_gives_the_models_own_positions_and_logps(loaded, root):
    model, tokenizer = loaded
    images = tokenizer.image_inputs
    examples = grid_examples(tokenizer, root)
    assert examples[0].image_token_counts == (8, 8)
    logp_model = LogpModel(model)
    with torch.no_grad():
        plain = torch.tensor([[float(plain_logps(model, tokenizer, ex, r)) for r in range(2)]
                              for ex in examples])
    grads = {}
    for layout in LAYOUTS:
        model.zero_grad()
        batch = collate(examples, tokenizer.pad_token_id, layout, images=images)
        assert batch.position_ids.shape == (3, *batch.input_ids.shape)
        if layout == "padded":  # each row: the model's own rope index of the sequence alone
            for row, ids in enumerate(batch.input_ids):
                real = batch.attention_mask[row].bool()
                ids = ids[real][None]
                pixels = images.pixels(list(examples[row // 2].images))
                own, _ = model.model.get_rope_index(
                    ids, (ids == images.image_token_id).int(), pixels["image_grid_thw"])
                assert torch.equal(batch.position_ids[:, row, real], own[:, 0])
        logps = sequence_stats(logp_model(batch), batch).logps
        torch.testing.assert_close(logps, plain, rtol=1e-5, atol=1e-4)
        logps.sum().backward()
        grads[layout] = {name: p.grad.clone() for name, p in model.named_parameters()
                         if p.grad is not None}
        if layout == "padded":  # 1-D positions would not do: the check is not vacuous
            batch.position_ids = None
            with torch.no_grad():
                flat = sequence_stats(logp_model(batch), batch).logps
            assert (flat - plain).abs().max() > 1e-3, (flat - plain).abs().max()
    assert any("visual" in name for name in grads["padded"])
    for layout in LAYOUTS[1:]:
        for name, value in grads["padded"].items():  # float32 sums in other orders: a
            # weight's gradient agrees to a millionth of its largest element (Qwen3-VL's
            # merger bias reaches 90, and one of its elements differed by 2.4e-5)
            scale = float(value.abs().max())
            torch.testing.assert_close(grads[layout][name], value, rtol=1e-4,
                                       atol=max(1e-5, 1e-6 * scale),
                                       msg=lambda text, name=name: f"{name}: {text}")


def test_recomputed_layers_give_the_plain_gradients_with_images(loaded, root):
    """Activation checkpointing (``recompute``) on the decoder and the vision tower's blocks:
    the plain backward's gradients, images, M-RoPE positions and DeepStack features
    included."""
    import copy

    from preftune.model.checkpointing import enable_checkpointing

    model, tokenizer = loaded
    batch = collate(grid_examples(tokenizer, root), tokenizer.pad_token_id, "prefix_shared",
                    images=tokenizer.image_inputs)
    grads = []
    for checkpointed in (False, True):
        net = copy.deepcopy(model).train()
        if checkpointed:
            enable_checkpointing(net)
        sequence_stats(LogpModel(net)(batch), batch).logps.sum().backward()
        grads.append({name: p.grad for name, p in net.named_parameters() if p.grad is not None})
    assert grads[1].keys() == grads[0].keys()
    assert any("visual" in name for name in grads[0])
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=0, atol=0, msg=name)


def test_greedy_generation_with_images_matches_one_prompt_at_a_time(loaded, root):
    model, tokenizer = loaded
    records = load_records(str(root / "pairs.jsonl"))[:2]
    prompts = [records[0].prompt, "In this image <image>, what colour is the shape?",
               "<image> or <image>?"]
    shown = [records[0].images, records[1].images,
             tuple(load_records(str(root / "two.jsonl"))[0].images)]
    ids = prompt_ids(prompts, tokenizer, TokenizeSettings(96, 80), shown)
    assert len({len(i) for i in ids}) == 3  # different lengths: the batch is left-padded
    together = greedy_texts(model, tokenizer, ids, 6, images=shown)
    alone = [greedy_texts(model, tokenizer, [i], 6, images=[s])[0] for i, s in zip(ids, shown)]
    assert together == alone


def plain_chosen_logps(model, processor, root):
    """Mean log pi(chosen | prompt, image) over the pairs, from the HF model's own forward
    (which computes its own rope index from mm_token_type_ids and image_grid_thw)."""
    total, rows = 0.0, [json.loads(line) for line in open(root / "pairs.jsonl")]
    image_token = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    for row in rows:
        text = f"What colour? {WRAPS[processor.image_token]}"
        inputs = processor(text=[text], images=[Image.open(root / row["images"][0])],
                           add_special_tokens=False, return_tensors="pt")
        answer = processor.tokenizer(row["chosen"], add_special_tokens=False)["input_ids"]
        answer = answer + [processor.tokenizer.eos_token_id]
        prompt = torch.as_tensor(inputs["input_ids"])
        ids = torch.cat([prompt, torch.tensor([answer])], 1)
        with torch.no_grad():
            logits = model(input_ids=ids, pixel_values=inputs["pixel_values"],
                           image_grid_thw=inputs["image_grid_thw"],
                           mm_token_type_ids=(ids == image_token).int()).logits[0]
        logps = logits.float().log_softmax(-1)
        start = prompt.shape[1] - 1
        total += sum(logps[start + j, t].item() for j, t in enumerate(answer))
    return total / len(rows)


@pytest.mark.parametrize("layout", ["prefix_shared", "packed"])
def test_dpo_trains_saves_and_reloads_with_its_hf_class(root, layout):
    out = api.train({
        "output_dir": str(root / f"dpo-{layout}"), "model": {"path": str(root / "model")},
        "data": {"train": str(root / "pairs.jsonl"), "eval": str(root / "pairs.jsonl"),
                 "max_length": 48, "max_prompt_length": 32},
        "objective": {"name": "dpo"},
        "train": {"batch_size": 4, "max_steps": 2, "learning_rate": 5e-3, "eval_every": 2,
                  "layout": layout}})
    first, last = read_metrics(out / "metrics.jsonl")[0], read_metrics(out / "metrics.jsonl")[-1]
    assert last["step"] == 2 and "eval/loss" in last
    model = AutoModelForImageTextToText.from_pretrained(out / "model").eval()
    assert type(model).__name__ == json.loads((root / "model" / "config.json").read_text())[
        "architectures"][0]
    try:  # transformers' processor where torchvision is installed
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(out / "model")
    except Exception:  # its parts without it (Qwen2VLProcessor, Glm4vProcessor need it)
        processor = processor_parts(model.config.model_type).from_pretrained(str(out / "model"))
    reloaded = plain_chosen_logps(model, processor, root)
    assert reloaded == pytest.approx(last["eval/logps/chosen"], abs=1e-4)
    assert abs(reloaded - first["logps/chosen"]) > 1e-3  # training moved it


@pytest.mark.parametrize("strategy", ["adapter-off", "live"])
def test_reference_strategies_and_lora(root, strategy):
    lora = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    out = api.train({
        "output_dir": str(root / f"ref-{strategy}"),
        "model": {"path": str(root / "model"),
                  **({"lora": lora} if strategy == "adapter-off" else {})},
        "data": {"train": str(root / "pairs.jsonl"), "max_length": 48,
                 "max_prompt_length": 32},
        "objective": {"name": "dpo"}, "reference": {"strategy": strategy},
        "train": {"batch_size": 4, "max_steps": 2, "learning_rate": 5e-3,
                  "layout": "packed_prefix_shared"}})
    metrics = read_metrics(out / "metrics.jsonl")
    # step 0: the policy is the reference, so every implied reward is 0
    assert metrics[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    assert metrics[0]["rewards/chosen"] == pytest.approx(0.0, abs=1e-6)
    assert (out / "adapter" / "adapter_config.json").exists() == (strategy == "adapter-off")


def test_an_image_token_typed_into_the_text_is_named_not_blamed_on_the_length(root, loaded,
                                                                               tmp_path):
    """A loose image token (no wrap around it) made the example's image-token count differ,
    which was counted as an image cut by max_prompt_length ("raise it"). The image's whole
    wrap written out is no placeholder (the record's image goes in front): said so."""
    _, tokenizer = loaded
    token = tokenizer.image_inputs.image_token
    settings = TokenizeSettings(1000, 900)
    loose = write_rows(tmp_path / "loose.jsonl", [{
        "prompt": f"{token} colour? <image>", "images": [str(root / "red.png")],
        "chosen": "red", "rejected": "blue"}])
    with pytest.raises(DataError, match=rf"loose\.jsonl:1: field 'prompt': the text holds the "
                                        rf"model's image token '{re.escape(token)}' outside an "
                                        r"image placeholder \(1 time\(s\)\)"):
        tokenize_records(load_records(loose), tokenizer, settings)
    written = write_rows(tmp_path / "written.jsonl", [{
        "prompt": f"{WRAPS[token]} colour?", "images": [str(root / "red.png")],
        "chosen": "red", "rejected": "blue"}])
    with pytest.raises(DataError, match=r"written\.jsonl:1: field 'prompt': the rendered prompt "
                                        r"has more image placeholders than the record's 1 "
                                        r"image\(s\); mark each image with <image>, not the "
                                        rf"model's own '{re.escape(WRAPS[token])}'"):
        tokenize_records(load_records(written), tokenizer, settings)
