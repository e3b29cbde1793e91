"""Vision-language runs as a user makes them: `preftune train` (mDPO, LoRA, references),
reload with the HF class, `preftune eval`, the report, generation with images."""

import json

import pytest
import torch
from transformers import AutoProcessor, Idefics3ForConditionalGeneration

from preftune import api
from preftune.cli import main
from preftune.data.records import DataError
from preftune.data.sources import load_records
from preftune.data.tokenize import TokenizeSettings
from preftune.generation import greedy_texts, prompt_ids
from preftune.model.load import load_model_and_tokenizer
from preftune.train.logging import read_metrics
from tiny_vlms import save_tiny_vlm_dir, solid_image

pytestmark = pytest.mark.filterwarnings("ignore")
COLOURS = {"red": (200, 30, 30), "blue": (30, 30, 200), "green": (30, 200, 30)}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """An Idefics3-style model dir and colour-question pairs with grey negative images."""
    root = tmp_path_factory.mktemp("vision_runs")
    save_tiny_vlm_dir(root / "model", "idefics3")
    names = list(COLOURS)
    for name, colour in COLOURS.items():
        solid_image(root / f"{name}.png", colour)
    solid_image(root / "grey.png", (120, 120, 120))
    rows = [{"prompt": "What colour? <image>", "images": [f"{names[i % 3]}.png"],
             "negative_images": ["grey.png"], "chosen": names[i % 3],
             "rejected": names[(i + 1) % 3]} for i in range(12)]
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def config(root, name, objective="mdpo", **train):
    return {"output_dir": str(root / name), "model": {"path": str(root / "model")},
            "data": {"train": str(root / "pairs.jsonl"), "eval": str(root / "pairs.jsonl"),
                     "max_length": 48, "max_prompt_length": 32},
            "objective": {"name": objective},
            "train": {"batch_size": 4, "max_steps": 2, "learning_rate": 5e-3, "eval_every": 2,
                      "layout": "prefix_shared", **train}}


def plain_chosen_logps(model, processor, root):
    """Mean log pi(chosen | prompt, image) over the pairs, from the HF model's own forward."""
    total, rows = 0.0, [json.loads(line) for line in open(root / "pairs.jsonl")]
    from PIL import Image

    for row in rows:
        text = "What colour? <image>"
        inputs = processor(text=[text], images=[[Image.open(root / row["images"][0])]],
                           add_special_tokens=False, return_tensors="pt")
        answer = processor.tokenizer(row["chosen"], add_special_tokens=False)["input_ids"]
        answer = answer + [processor.tokenizer.eos_token_id]
        ids = torch.cat([inputs["input_ids"], torch.tensor([answer])], 1)
        with torch.no_grad():
            logits = model(input_ids=ids, pixel_values=inputs["pixel_values"],
                           pixel_attention_mask=inputs["pixel_attention_mask"]).logits[0]
        logps = logits.float().log_softmax(-1)
        start = inputs["input_ids"].shape[1] - 1
        total += sum(logps[start + j, t].item() for j, t in enumerate(answer))
    return total / len(rows)


def test_mdpo_trains_saves_and_reloads_with_its_hf_class(workspace):
    out = api.train(config(workspace, "mdpo"))
    last = read_metrics(out / "metrics.jsonl")[-1]
    assert last["step"] == 2 and "eval/loss" in last
    # the saved directory is an ordinary HF VLM directory: its own class and processor load it
    model = Idefics3ForConditionalGeneration.from_pretrained(out / "model").eval()
    processor = AutoProcessor.from_pretrained(out / "model")
    # eval/logps/chosen is the mean over the eval pairs after the last update
    assert plain_chosen_logps(model, processor, workspace) == pytest.approx(
        last["eval/logps/chosen"], abs=1e-4)
    card = (out / "model" / "README.md").read_text()
    assert "mdpo" in card and "\npipeline_tag: image-text-to-text\n" in card  # (not text-only)
    assert json.loads((out / "run.json").read_text())["model_kind"] == "vision-language"


def test_resume_refuses_images_edited_in_place_and_other_negative_images(workspace, tmp_path):
    """The data fingerprint held the images' paths only: a resumed run went on with other
    pixels, and with other negative images not even the paths were compared."""
    import shutil

    for name in (*COLOURS, "grey"):
        shutil.copy(workspace / f"{name}.png", tmp_path / f"{name}.png")
    rows = (workspace / "pairs.jsonl").read_text()
    (tmp_path / "pairs.jsonl").write_text(rows)
    tree = config(tmp_path, "run", max_steps=1, eval_every=None)
    tree["model"]["path"], tree["data"]["eval"] = str(workspace / "model"), None
    out = api.train(tree, show_progress=False)
    changed = r"\(12 examples then, 12 now, other image content\); its finished model"
    red = (tmp_path / "red.png").read_bytes()
    solid_image(tmp_path / "red.png", (250, 0, 0))
    with pytest.raises(api.ConfigError, match=changed):
        api.train(tree, resume=True, show_progress=False)
    (tmp_path / "red.png").write_bytes(red)
    solid_image(tmp_path / "black.png", (0, 0, 0))
    (tmp_path / "pairs.jsonl").write_text(rows.replace("grey.png", "black.png"))
    with pytest.raises(api.ConfigError, match=changed):
        api.train(tree, resume=True, show_progress=False)
    (tmp_path / "pairs.jsonl").write_text(rows)
    assert api.train(tree, resume=True, show_progress=False) == out  # the same data: kept


@pytest.mark.parametrize("strategy", ["adapter-off", "live"])
def test_reference_strategies_and_lora(workspace, strategy):
    lora = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    tree = config(workspace, f"dpo-{strategy}", objective="dpo", layout="packed")
    tree["reference"] = {"strategy": strategy}
    if strategy == "adapter-off":
        tree["model"]["lora"] = lora
    out = api.train(tree)
    first = read_metrics(out / "metrics.jsonl")[0]
    # step 0: the policy is the reference, so every implied reward is 0
    assert first["rewards/chosen"] == pytest.approx(0.0, abs=1e-6)
    assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    if strategy == "adapter-off":
        assert (out / "adapter" / "adapter_config.json").exists()


@pytest.mark.parametrize("lora", [None, {"r": 4, "alpha": 8, "target_modules": ["q_proj"]}])
def test_a_tr_dpo_reference_synced_every_step_gives_a_loss_of_log_2(workspace, lora):
    """reference.sync_every on a VLM: the vision tower and language model are mixed in by
    name like a text model's (LoRA merged), so a hard sync leaves no log-ratio behind."""
    tree = config(workspace, f"tr-dpo-{bool(lora)}", objective="dpo", max_steps=3, eval_every=3)
    tree["reference"] = {"sync_every": 1, "sync_mix": 1.0}
    if lora:
        tree["model"]["lora"] = lora
    out = api.train(tree)
    losses = [record["loss"] for record in read_metrics(out / "metrics.jsonl")]
    assert losses == pytest.approx([0.6931472] * 3, abs=1e-6)


def test_held_out_answers_of_a_vision_run_see_the_images(workspace):
    """train.eval_generations on a VLM: each prompt is answered with its image, as the saved
    model answers it."""
    tree = config(workspace, "answers", objective="dpo", eval_generations=3,
                  eval_max_new_tokens=5)
    out = api.train(tree)
    rows = [json.loads(line) for line in (out / "eval_generations.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [2, 2, 2]
    model, tokenizer = load_model_and_tokenizer(str(out / "model"))
    records = {r.origin: r for r in load_records(str(workspace / "pairs.jsonl"))}
    shown = [records[row["origin"]].images for row in rows]
    ids = prompt_ids([row["prompt"] for row in rows], tokenizer, TokenizeSettings(48, 32), shown)
    assert [row["answer"] for row in rows] == greedy_texts(model, tokenizer, ids, 5,
                                                           images=shown)
    assert len({image.key for images in shown for image in images}) == 3  # three colours


def test_eval_and_report_on_a_vision_run(workspace, capsys):
    out = api.train(config(workspace, "for-eval", objective="dpo"))
    assert main(["eval", "--model", str(out), "--data", str(workspace / "pairs.jsonl"),
                 "--reference", str(workspace / "model")]) in (0, None)
    results = json.loads((out / "eval.json").read_text())
    assert results["pairs"] == 12
    assert main(["report", str(out)]) in (0, None)
    assert (out / "report.html").exists()


@pytest.mark.parametrize("kind", ["idefics3", "gemma3"])
def test_greedy_generation_with_images_matches_one_prompt_at_a_time(workspace, tmp_path, kind):
    path = workspace / "model" if kind == "idefics3" else save_tiny_vlm_dir(tmp_path / kind, kind)
    model, tokenizer = load_model_and_tokenizer(str(path))
    records = load_records(str(workspace / "pairs.jsonl"))[:3]
    records[1] = type(records[1])("What colour is this? <image>", "x", "y",
                                  images=records[1].images)
    shown = [r.images for r in records]
    ids = prompt_ids([r.prompt for r in records], tokenizer, TokenizeSettings(48, 32), shown)
    assert len({len(i) for i in ids}) == 2  # different lengths: the batch is left-padded
    together = greedy_texts(model, tokenizer, ids, 5, images=shown)
    alone = [greedy_texts(model, tokenizer, [i], 5, images=[s])[0] for i, s in zip(ids, shown)]
    assert together == alone
    if kind == "gemma3":  # as its own generate draws with its image rule switched on
        one = torch.tensor([ids[0]])
        drawn = model.generate(input_ids=one, **tokenizer.image_inputs.pixels(list(shown[0])),
                               token_type_ids=(one == tokenizer.image_inputs.image_token_id).long(),
                               max_new_tokens=5, do_sample=False,
                               pad_token_id=tokenizer.pad_token_id)[0, one.shape[1]:]
        assert tokenizer.decode(drawn, skip_special_tokens=True) == alone[0]


def test_data_inspect_shows_image_prompt_and_response_tokens(workspace, capsys):
    assert main(["data", "inspect", str(workspace / "pairs.jsonl"), "--model",
                 str(workspace / "model"), "--example", "0"]) in (0, None)
    out = capsys.readouterr().out
    assert "images              12 in kept prompts" in out
    assert "image 0: " + str(workspace / "red.png") + "  (4 image tokens)" in out
    assert "negative image 0: " + str(workspace / "grey.png") in out
    # the four image tokens as one line naming the image, then the text, then the boundary
    lines = out.splitlines()
    image_line = next(line for line in lines if line.endswith("<- image 0"))
    assert "'<image>' x4" in image_line
    assert lines.index(image_line) < lines.index("──── prompt | response ────")
    # the rejected answer repeats the prompt's end from the image's first token: the count of
    # tokens left out ends where the image's line starts (13 characters, two markers before it)
    skipped = lines.index("  ... 15 prompt tokens as above")
    assert lines[skipped + 1].split()[:2] == ["15-18", "104"]


def test_a_prompt_limit_that_cuts_every_image_says_what_to_raise(workspace):
    tree = config(workspace, "cut")
    tree["data"]["max_prompt_length"] = 4  # the prompt's last 4 tokens: 3 of its 4 image tokens
    with pytest.raises(DataError, match=r"^data\.train: none of its 12 records survived "
                                        r"tokenization: 12 would have an image's tokens cut by "
                                        r"data\.max_prompt_length \(raise it"):
        api.train(tree)


def test_per_pair_weights_scale_each_pairs_loss(workspace, tmp_path):
    """MMedPO's clinical-relevance weights are the existing example weights: a weight field
    multiplies each pair's loss (weight 0 removes a pair from the step's loss)."""
    rows = [json.loads(line) for line in open(workspace / "pairs.jsonl")]
    weighted = tmp_path / "weighted.jsonl"
    weighted.write_text("".join(json.dumps({**row, "images": [str(workspace / row["images"][0])],
                                            "negative_images": [str(workspace / "grey.png")],
                                            "relevance": 0.0 if i % 2 else 3.0}) + "\n"
                                for i, row in enumerate(rows)))
    tree = config(workspace, "weighted", objective="dpo", example_weight_field="relevance",
                  max_steps=1, batch_size=12)
    tree["data"] = {**tree["data"], "train": str(weighted), "eval": None}
    tree["train"]["eval_every"] = None
    first = read_metrics(api.train(tree) / "metrics.jsonl")[0]
    # step 0 holds all 12 pairs: every DPO loss is log 2 and the weights 3, 0, 3, 0, ...
    # average 1.5 (unweighted, the loss would be log 2)
    assert first["loss"] == pytest.approx(1.5 * 0.6931472, abs=1e-6)


def test_plan_of_a_vision_run(workspace, capsys):
    api.train(config(workspace, "plan"), plan_only=True)
    out = capsys.readouterr().out
    assert "layout             prefix_shared" in out
    # [prompt with its 4 image tokens | y_w | y_l] rows; nothing trained, nothing written
    assert not (workspace / "plan" / "metrics.jsonl").exists()


def test_gemma3_trains_on_images_and_its_own_forward_agrees_after(workspace, tmp_path):
    """A Gemma 3-style model (image tokens attending both ways, a sliding layer) trains on the
    image pairs in the prefix-shared layout from log 2; the saved model's own forward, given
    the token types that switch its image rule on, reproduces the run's last eval log-probs."""
    from PIL import Image
    from transformers import Gemma3ForConditionalGeneration

    save_tiny_vlm_dir(tmp_path / "gemma3", "gemma3")
    tree = config(workspace, "gemma3-dpo", objective="dpo")
    tree["model"]["path"] = str(tmp_path / "gemma3")
    out = api.train(tree)
    log = read_metrics(out / "metrics.jsonl")
    assert json.loads((out / "run.json").read_text())["layout"] == "prefix_shared"
    assert log[0]["loss"] == pytest.approx(0.6931472, abs=1e-6)
    assert log[-1]["loss"] != pytest.approx(log[0]["loss"], abs=1e-4)
    model = Gemma3ForConditionalGeneration.from_pretrained(out / "model").eval()
    processor = AutoProcessor.from_pretrained(out / "model")
    rows = [json.loads(line) for line in open(workspace / "pairs.jsonl")]
    total = 0.0
    for row in rows:
        inputs = processor(text=["What colour? <start_of_image>"],
                           images=[[Image.open(workspace / row["images"][0])]],
                           add_special_tokens=False, return_tensors="pt")
        answer = processor.tokenizer(row["chosen"], add_special_tokens=False)["input_ids"]
        ids = torch.cat([inputs["input_ids"],
                         torch.tensor([answer + [processor.tokenizer.eos_token_id]])], 1)
        types = (ids == processor.tokenizer.image_token_id).long()
        with torch.no_grad():
            logps = model(input_ids=ids, pixel_values=inputs["pixel_values"],
                          token_type_ids=types).logits[0].float().log_softmax(-1)
        start = inputs["input_ids"].shape[1] - 1
        total += sum(logps[start + j, t].item() for j, t in enumerate(ids[0, start + 1:]))
    assert total / len(rows) == pytest.approx(log[-1]["eval/logps/chosen"], abs=1e-4)


def test_top_layers_train_and_the_vision_tower_stays_as_loaded(workspace):
    """model.train_layers counts the language model's layers; the vision tower, its connector
    and the embeddings stay frozen unless named."""
    from safetensors.torch import load_file

    tree = config(workspace, "top-layer", objective="dpo")
    tree["model"]["train_layers"] = 1
    out = api.train(tree)
    start = load_file(workspace / "model" / "model.safetensors")
    end = load_file(out / "model" / "model.safetensors")
    moved = {name for name in start if not torch.equal(start[name], end[name])}
    assert moved and all(name.startswith("model.text_model.layers.1.") for name in moved)
    assert len(moved) == sum(1 for name in start if name.startswith("model.text_model.layers.1."))
