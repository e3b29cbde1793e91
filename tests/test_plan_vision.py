"""``--plan`` of a vision-language model: what the vision tower keeps for backward over the
worst micro-batch's images is in the activations, and the total stays within 5% of the tensor
bytes a real two-step bf16 run peaks at (tests/test_plan.py's measure), with the tower trained
and frozen."""

import json

import pytest
import torch
from common import PhaseMemory
from transformers import (CLIPImageProcessorPil, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                          LlavaForConditionalGeneration, LlavaProcessor)

import preftune.train.loop as loop
from preftune.config import build_config
from test_plan import measured_name, measured_peak, planned_total
from tiny_vlms import VLM_TEMPLATE, _tokenizer, solid_image

SIZE, PATCH = 64, 8  # 64 patches an image


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A LLaVA (CLIP tower: 2 layers of width 256; Llama: 4 of width 256) saved in fp32 and
    pairs, each about an image of its own."""
    root = tmp_path_factory.mktemp("plan-vision")
    tokenizer = _tokenizer([])
    torch.manual_seed(0)
    vision = CLIPVisionConfig(hidden_size=256, image_size=SIZE, patch_size=PATCH,
                              num_hidden_layers=2, num_attention_heads=4, intermediate_size=704)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=704,
                       num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=1024, bos_token_id=1, eos_token_id=2,
                       pad_token_id=0)
    LlavaForConditionalGeneration(LlavaConfig(
        vision_config=vision, text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default", vision_feature_layer=-1)).save_pretrained(
        root / "model")
    LlavaProcessor(image_processor=CLIPImageProcessorPil(
        size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE}),
        tokenizer=tokenizer, patch_size=PATCH, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, image_token="<image>",
        chat_template=VLM_TEMPLATE).save_pretrained(root / "model")
    rows = []
    for i in range(8):
        solid_image(root / f"{i}.png", (30 * i, 200 - 20 * i, 90), size=SIZE)
        rows.append({"prompt": f"Question {i}: what colour is it? <image>",
                     "images": [f"{i}.png"], "chosen": "yes " * 6, "rejected": "nope " * 5})
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def config_of(root, name: str, **model):
    return build_config({"output_dir": str(root / name),
                         "model": {"path": str(root / "model"), "dtype": "bfloat16", **model},
                         "data": {"train": str(root / "pairs.jsonl")},
                         "reference": {"cache_dir": str(root / "cache")},
                         "train": {"batch_size": 4, "max_steps": 2, "seed": 0}})


@pytest.mark.parametrize("model", [
    pytest.param({}, id="tower-trained"),
    pytest.param({"train_layers": 2}, id="tower-frozen"),
])
def test_plan_counts_the_vision_towers_activations(workspace, model, capsys, monkeypatch):
    monkeypatch.setenv("HF_DEACTIVATE_ASYNC_LOAD", "1")  # weights load on this thread: counted
    loop.train(config_of(workspace, "planned", **model), plan_only=True, show_progress=False)
    printed = capsys.readouterr().out
    tower = [line for line in printed.splitlines() if "vision tower" in line]
    if model:  # nothing under the top two language layers trains: the tower keeps nothing
        assert tower == []
    else:  # what the tower keeps over the worst micro-batch's four images, counted apart
        assert float(tower[0].split()[2]) == round(tower_keeps(workspace, range(4)) / 2**20)
    measured = measured_peak(config_of(workspace, measured_name(model), **model),
                             PhaseMemory("tensors"), monkeypatch)
    assert planned_total(printed) == pytest.approx(measured, rel=0.05)


def tower_keeps(root, images) -> int:
    """Bytes autograd keeps over the bf16 tower's forward of ``images``, from the processor's
    pixels and transformers' own image features."""
    from PIL import Image

    from preftune.model.lean import kept_for_backward

    model = LlavaForConditionalGeneration.from_pretrained(root / "model",
                                                          dtype=torch.bfloat16).train()
    processor = LlavaProcessor.from_pretrained(root / "model")
    pixels = processor.image_processor([Image.open(root / f"{i}.png") for i in images],
                                       return_tensors="pt")["pixel_values"].to(torch.bfloat16)
    return kept_for_backward(lambda: model.get_image_features(pixel_values=pixels),
                             leave_out=list(model.parameters()))
