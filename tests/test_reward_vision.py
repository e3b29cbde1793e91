"""Reward models on vision-language backbones (LLaVA-, Qwen2-VL-, Qwen3-VL-, GLM-4.1V- and Gemma
3-style: plain positions, M-RoPE, DeepStack features, image tokens that attend both ways): every
layout's rewards and gradients equal the VLM's own forward read at each response's last token,
`preftune rm train` trains and saves a directory the VLM's class loads, `rm score`, `rm eval`
and the scorer read the saved head (an online round on image prompts too), LoRA merges, and a
4-bit backbone trains as LoRA on its dequantized weights."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText

from preftune import api
from preftune.cli import main
from preftune.data.layout import LAYOUTS, collate
from preftune.data.sources import load_records
from preftune.data.tokenize import TokenizeSettings, tokenize_records
from preftune.reward.cli import done_line
from preftune.reward.model import RewardModel, load_backbone
from preftune.reward.heads import Head
from preftune.reward.vision import SCORE_FILE, VisionRewardModel
from preftune.score import load_scorer
from preftune.score.base import scorer_prompt
from preftune.train.plan import _millions
from test_vision import write_rows
from tiny_vlms import save_tiny_vlm_dir, solid_image

pytestmark = pytest.mark.filterwarnings("ignore")
COLOURS = {"red": (200, 30, 30), "blue": (30, 30, 200), "green": (30, 200, 30)}


@pytest.fixture(scope="module", params=["llava", "qwen2_vl", "qwen3_vl", "glm4v", "gemma3"])
def root(request, tmp_path_factory):
    """A tiny VLM dir of one family, coloured images and pairs: the image's colour over
    another."""
    root = tmp_path_factory.mktemp(f"rm-{request.param}")
    save_tiny_vlm_dir(root / "vlm", request.param)
    for name, colour in COLOURS.items():
        solid_image(root / f"{name}.png", colour)
    names = list(COLOURS)
    rows = [{"prompt": "What colour? <image>", "images": [f"{names[i % 3]}.png"],
             "chosen": names[i % 3], "rejected": names[(i + 1) % 3]} for i in range(8)]
    write_rows(root / "pairs.jsonl", rows)
    return root


def plain_reward(model: VisionRewardModel, tokenizer, prompt_ids, response_ids, images):
    """The head on the VLM's own forward of one sequence, read at its last token."""
    ids = torch.tensor([prompt_ids + response_ids])
    inputs = tokenizer.image_inputs.pixels(list(images))
    image_tokens = (ids == tokenizer.image_inputs.image_token_id).int()
    if tokenizer.image_inputs.mrope:
        inputs["mm_token_type_ids"] = image_tokens
    if model.config.model_type == "gemma3":
        inputs["token_type_ids"] = image_tokens
    hidden = model.vlm.model(input_ids=ids, **inputs).last_hidden_state[0, -1]
    return model.score.weight.float() @ hidden.float()


def examples_of(root, tokenizer):
    records = load_records(str(root / "pairs.jsonl"))[:3]
    examples, report = tokenize_records(records, tokenizer, TokenizeSettings(96, 64))
    assert report.kept == 3 and report.images == 3
    return examples


def test_every_layout_equals_the_vlms_own_forward(root):
    head = Head()
    model, tokenizer = load_backbone(str(root / "vlm"), head)
    assert isinstance(model, VisionRewardModel)
    reward_model = RewardModel(model, head)
    assert reward_model.last_token
    examples = examples_of(root, tokenizer)
    with torch.no_grad():
        plain = torch.stack([torch.stack([
            plain_reward(model, tokenizer, ex.prompt_ids, ex.response_ids[slot], ex.images)
            for slot in range(2)]) for ex in examples])
    grads = {}
    for layout in LAYOUTS:
        model.zero_grad()
        batch = collate(examples, tokenizer.pad_token_id, layout,
                        images=tokenizer.image_inputs)
        outputs = reward_model(batch)
        assert outputs.shape == (3, 2, 1)
        torch.testing.assert_close(outputs, plain, rtol=1e-5, atol=1e-5)
        (outputs[:, 0] - outputs[:, 1]).sum().backward()
        grads[layout] = {name: p.grad.clone() for name, p in model.named_parameters()
                         if p.grad is not None}
    assert "score.weight" in grads["padded"]
    assert any(".vision" in name or "visual" in name for name in grads["padded"])
    for layout in LAYOUTS[1:]:
        for name, value in grads["padded"].items():
            scale = float(value.abs().max())
            torch.testing.assert_close(grads[layout][name], value, rtol=1e-4,
                                       atol=max(1e-5, 1e-6 * scale),
                                       msg=lambda text, name=name: f"{name}: {text}")


@pytest.mark.parametrize("lora", [False, True])
def test_rm_train_saves_a_vlm_directory_that_scores_as_it_trained(root, tmp_path, lora):
    out = api.train_reward_model({
        "output_dir": str(tmp_path / "rm"),
        "model": {"path": str(root / "vlm"),
                  **({"lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}}
                     if lora else {})},
        "data": {"train": str(root / "pairs.jsonl"), "eval": str(root / "pairs.jsonl"),
                 "max_length": 96, "max_prompt_length": 64},
        "train": {"batch_size": 4, "max_steps": 3, "learning_rate": 5e-3, "eval_every": 3}})
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").open()]
    assert metrics[-1]["step"] == 3 and "eval/rewards/accuracies" in metrics[-1]
    saved = out / "model"
    assert (saved / SCORE_FILE).is_file() and (saved / "preftune_reward.json").is_file()
    assert (out / "adapter").is_dir() == lora
    assert done_line(out) == (f"done: reward model in {saved} (AutoModelForImageTextToText "
                              f"loads the model, {SCORE_FILE} holds its head), metrics in "
                              f"{out / 'metrics.jsonl'}")
    vlm = AutoModelForImageTextToText.from_pretrained(saved)  # the VLM's class loads it
    assert type(vlm).__name__ == json.loads((root / "vlm" / "config.json").read_text())[
        "architectures"][0]

    reloaded, tokenizer = RewardModel.from_pretrained(str(out))
    assert torch.equal(reloaded.model.score.weight, load_file(saved / SCORE_FILE)["weight"])
    initial = load_backbone(str(root / "vlm"), Head(), announce=False)[0]
    assert not torch.equal(reloaded.model.score.weight, initial.score.weight)  # it trained
    examples = examples_of(root, tokenizer)

    # `preftune rm score` writes what the saved VLM and head give on each record
    target = tmp_path / "scored.jsonl"
    assert main(["rm", "score", "--model", str(out), "--data", str(root / "pairs.jsonl"),
                 "--output", str(target)]) == 0
    rows = [json.loads(line) for line in target.open()]
    with torch.no_grad():
        for row, example in zip(rows, examples):
            expected = [plain_reward(reloaded.model, tokenizer, example.prompt_ids,
                                     example.response_ids[slot], example.images).item()
                        for slot in range(2)]
            assert [row["chosen_score"], row["rejected_score"]] == pytest.approx(
                expected, abs=1e-4)
    # the saved (with LoRA: merged) model scores the eval pairs as the trained one did
    for side in ("chosen", "rejected"):
        mean = sum(row[f"{side}_score"] for row in rows) / len(rows)
        assert mean == pytest.approx(metrics[-1][f"eval/rewards/{side}"], abs=1e-4)

    # `preftune rm eval`: its accuracy is the share of pairs scored chosen over rejected
    assert main(["rm", "eval", "--model", str(out), "--data", str(root / "pairs.jsonl"),
                 "--output", str(tmp_path / "eval")]) == 0
    report = json.loads((tmp_path / "eval" / "rm_eval.json").read_text())
    assert report["pairs"] == 8
    assert report["accuracy"] == sum(r["chosen_score"] > r["rejected_score"] for r in rows) / 8

    # the scorer of online runs sees each prompt's images
    scorer = load_scorer(f"rm:{out}")
    record = load_records(str(root / "pairs.jsonl"))[0]
    prompt = scorer_prompt(record.prompt, record.images)
    scores = scorer.score([prompt, prompt], [record.chosen, record.rejected])
    assert scores == pytest.approx([rows[0]["chosen_score"], rows[0]["rejected_score"]],
                                   abs=1e-4)


def test_a_4_bit_backbone_trains_as_lora_on_its_dequantized_weights(tmp_path):
    """QLoRA on a VLM reward model (LLaVA-style: language and vision layers in 4 bits, the head
    in model.dtype) trains exactly as LoRA on the dequantized weights; model/ is the adapter
    merged into the unquantized backbone."""
    import shutil

    bnb = pytest.importorskip("bitsandbytes")
    from preftune.model.quantize import loading_arguments
    from preftune.train.logging import read_metrics

    source = save_tiny_vlm_dir(tmp_path / "vlm", "llava")
    quantized = AutoModelForImageTextToText.from_pretrained(
        source, **loading_arguments("nf4", torch.float32, "cpu"))
    plain = AutoModelForImageTextToText.from_pretrained(source)
    with torch.no_grad():
        for name, module in quantized.named_modules():
            if isinstance(module, bnb.nn.Linear4bit):
                plain.get_submodule(name).weight.copy_(bnb.functional.dequantize_4bit(
                    module.weight.data, module.weight.quant_state))
    shutil.copytree(source, tmp_path / "twin")
    plain.save_pretrained(tmp_path / "twin")
    for name, colour in COLOURS.items():
        solid_image(tmp_path / f"{name}.png", colour)
    write_rows(tmp_path / "pairs.jsonl", [
        {"prompt": "What colour? <image>", "images": [f"{name}.png"], "chosen": name,
         "rejected": "no"} for name in [*COLOURS, *COLOURS]])

    def train(name, path, **model):
        return api.train_reward_model({
            "output_dir": str(tmp_path / name),
            "model": {"path": str(path), "lora": {"r": 4, "alpha": 8}, **model},
            "data": {"train": str(tmp_path / "pairs.jsonl"), "max_length": 96,
                     "max_prompt_length": 64},
            "train": {"batch_size": 3, "max_steps": 2, "learning_rate": 3e-3, "seed": 0}})

    four_bit, twin = train("nf4", source, quantize="nf4"), train("twin", tmp_path / "twin")
    logs = [read_metrics(run / "metrics.jsonl") for run in (four_bit, twin)]
    for key in ("loss", "grad_norm", "rewards/margins"):
        assert [r[key] for r in logs[0]] == pytest.approx([r[key] for r in logs[1]],
                                                          rel=1e-5, abs=1e-6), key
    assert json.loads((four_bit / "run.json").read_text())["quantize"] == "nf4"
    original = read_metrics(train("original", source) / "metrics.jsonl")  # 4 bits change them
    assert original[1]["loss"] != pytest.approx(logs[0][1]["loss"], rel=1e-4)
    assert "quantization_config" not in json.loads((four_bit / "model/config.json").read_text())
    heads = [load_file(run / "model" / SCORE_FILE)["weight"] for run in (four_bit, twin)]
    torch.testing.assert_close(heads[0], heads[1], rtol=1e-5, atol=1e-6)
    AutoModelForImageTextToText.from_pretrained(four_bit / "model")  # a plain VLM again


def test_an_online_round_on_image_prompts_is_scored_by_a_vlm_reward_model(tmp_path):
    from preftune.online.config import OnlineConfig
    from preftune.online.loop import run_online

    save_tiny_vlm_dir(tmp_path / "vlm", "llava")
    for name, colour in COLOURS.items():
        solid_image(tmp_path / f"{name}.png", colour)
    write_rows(tmp_path / "pairs.jsonl", [
        {"prompt": "What colour? <image>", "images": [f"{name}.png"], "chosen": name,
         "rejected": "no"} for name in COLOURS])
    rm = api.train_reward_model({
        "output_dir": str(tmp_path / "rm"), "model": {"path": str(tmp_path / "vlm")},
        "data": {"train": str(tmp_path / "pairs.jsonl"), "max_length": 96,
                 "max_prompt_length": 64},
        "train": {"batch_size": 3, "max_steps": 1}})
    write_rows(tmp_path / "prompts.jsonl", [{"prompt": "What colour? <image>",
                                             "images": [name]} for name in ("red.png",
                                                                            "blue.png")])
    out = run_online(OnlineConfig.from_dict({
        "output_dir": str(tmp_path / "online"), "model": {"path": str(tmp_path / "vlm")},
        "data": {"train": str(tmp_path / "prompts.jsonl"), "max_length": 96,
                 "max_prompt_length": 64},
        "objective": {"name": "dpo"},
        "train": {"batch_size": 2, "max_steps": 1, "learning_rate": 1e-3},
        "online": {"rounds": 1, "scorer": f"rm:{rm}",
                   "sampling": {"samples": 3, "max_new_tokens": 4, "temperature": 1.5}}}))
    scored = [json.loads(line) for line in (out / "round-1" / "scored.jsonl").open()]
    scorer = load_scorer(f"rm:{rm}")
    shown = {record.images[0].path.rsplit("/", 1)[-1]: record  # the same prompt per image
             for record in load_records(str(tmp_path / "pairs.jsonl"))}
    for row in scored:  # each sample scored under its own prompt's image
        name = row["images"][0].rsplit("/", 1)[-1]
        here = scorer_prompt(shown[name].prompt, shown[name].images)
        assert row["scores"] == pytest.approx(
            scorer.score([here] * len(row["responses"]), row["responses"]), abs=1e-5)
        other = shown["green.png"]
        elsewhere = scorer.score([scorer_prompt(other.prompt, other.images)] *
                                 len(row["responses"]), row["responses"])
        assert row["scores"] != pytest.approx(elsewhere, abs=1e-6)  # the image matters


def test_lora_all_linear_adapts_every_linear_layer_but_the_lm_head_and_the_score(root):
    """peft finds the output layer of transformers models only; a VLM reward model (preftune's
    module around the VLM) names its linear layers itself, leaving the unused language-model
    head and the reward head (trained in full) out."""
    from torch import nn

    from preftune.config import LoraConfig
    from preftune.reward.model import attach_reward_lora

    model = load_backbone(str(root / "vlm"), Head(), announce=False)[0]
    linear = {name for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    assert {"vlm.lm_head", "score"} <= linear
    wrapped = attach_reward_lora(model, LoraConfig(r=4, alpha=8))
    adapted = {name.removeprefix("base_model.model.") for name, module in wrapped.named_modules()
               if hasattr(module, "lora_A")}
    assert adapted == linear - {"vlm.lm_head", "score"}


def test_rm_plan_of_a_vlm_counts_the_whole_model_and_writes_nothing(root, tmp_path, capsys):
    api.train_reward_model({"output_dir": str(tmp_path / "plan"),
                            "model": {"path": str(root / "vlm")},
                            "data": {"train": str(root / "pairs.jsonl"), "max_length": 96}},
                           plan_only=True)
    printed = capsys.readouterr().out
    model = load_backbone(str(root / "vlm"), Head(), announce=False)[0]  # vision tower and head
    count = _millions(sum(p.numel() for p in model.parameters()))
    assert f"parameters         {count}, trainable {count}" in printed
    assert "layout             prefix_shared (chosen automatically)" in printed
    assert "activations" in printed and not (tmp_path / "plan").exists()
