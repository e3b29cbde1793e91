"""``preftune online`` rounds on image prompts: each prompt is sampled, scored and trained with
the images it shows (a scorer sees them), the round files name the images, and the held-out
measurement (answers, best-of-n, KL to the initial model) runs under them too."""

import json

import pytest

from preftune.config import ConfigError
from preftune.model.load import load_tokenizer
from preftune.online.config import OnlineConfig
from preftune.online.common import prompts_to_ids
from preftune.online.loop import _prompts, run_online
from tiny_vlms import save_tiny_vlm_dir, solid_image

pytestmark = pytest.mark.filterwarnings("ignore")
LETTER = {(200, 30, 30): "r", (30, 30, 200): "b"}  # the colour of an image -> the letter it wants
SCORED = []


def colour_letter(prompt, response):
    """A scorer that needs the image: how often the response has the letter of the colour of
    the image the prompt shows (its top-right pixel)."""
    (image,) = prompt.images
    letter = LETTER[image.load().getpixel((19, 0))]
    SCORED.append((str(prompt), image.path, response))
    return float(response.count(letter))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("online_vision")
    save_tiny_vlm_dir(root / "model", "idefics3")
    solid_image(root / "red.png", (200, 30, 30))
    solid_image(root / "blue.png", (30, 30, 200))
    # the same question about two images: two prompts
    rows = [{"prompt": "What colour? <image>", "images": [name]}
            for name in ("red.png", "blue.png", "red.png")]
    (root / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def tree(root, name, **online):
    return {"output_dir": str(root / name), "model": {"path": str(root / "model")},
            "data": {"train": str(root / "prompts.jsonl"), "eval": str(root / "prompts.jsonl"),
                     "max_length": 48, "max_prompt_length": 32},
            "objective": {"name": "dpo", "beta": 0.1},
            "train": {"learning_rate": 5e-3, "batch_size": 2, "max_steps": 2, "seed": 0,
                      "warmup_ratio": 0.0},
            "online": {"rounds": 1, "scorer": "test_online_vision:colour_letter",
                       "eval_max_new_tokens": 6, "eval_best_of": 2, "eval_kl_samples": 2,
                       "sampling": {"samples": 4, "max_new_tokens": 8, "batch_size": 4,
                                    "temperature": 1.5},
                       **online}}


def test_a_round_samples_scores_and_trains_on_image_prompts(workspace):
    config = OnlineConfig.from_dict(tree(workspace, "run"))
    prompts = _prompts(config.data.train, config)
    assert [p.images[0].path for p in prompts] == [str(workspace / "red.png"),
                                                   str(workspace / "blue.png")]
    tokenizer = load_tokenizer(str(workspace / "model"))
    image_token = tokenizer.image_inputs.image_token_id
    assert all(ids.count(image_token) > 0 for ids in prompts_to_ids(prompts, tokenizer, config))

    SCORED.clear()
    out = run_online(config)
    here = out / "round-1"
    samples = [json.loads(line) for line in (here / "samples.jsonl").open()]
    assert [row["images"] for row in samples] == [[str(workspace / "red.png")],
                                                  [str(workspace / "blue.png")]]
    scored = [json.loads(line) for line in (here / "scored.jsonl").open()]
    for row in scored:  # the scorer saw each sample with its own prompt's image
        letter = "r" if row["images"][0].endswith("red.png") else "b"
        assert row["scores"] == [float(text.count(letter)) for text in row["responses"]]
    assert {(prompt, path) for prompt, path, _ in SCORED} == {
        ("What colour? <image>", str(workspace / "red.png")),
        ("What colour? <image>", str(workspace / "blue.png"))}
    pairs = [json.loads(line) for line in (here / "pairs.jsonl").open()]
    assert pairs and all(len(pair["images"]) == 1 for pair in pairs)
    assert (here / "metrics.jsonl").is_file() and (here / "model").is_dir()
    trained = json.loads((here / "data_report.json").read_text())["train"]
    assert trained["images"] == trained["kept"] == len(pairs)  # each pair under its image
    evaluation = json.loads((here / "eval.json").read_text())
    assert evaluation["prompts"] == 2 and "kl_to_initial" in evaluation
    initial = json.loads((out / "initial" / "eval.json").read_text())
    assert initial["best_of_n"]["n"] == 2
    answers = [json.loads(line) for line in (here / "eval_answers.jsonl").open()]
    assert [a["images"] for a in answers] == [[str(workspace / "red.png")],
                                              [str(workspace / "blue.png")]]


def test_online_dpo_steps_sample_and_train_under_each_prompts_image(workspace, monkeypatch):
    from preftune.online import per_step

    collated = []  # the image paths of every trained example, as the step's batch is laid out

    def collate(examples, *args, **kwargs):
        collated.extend(tuple(image.path for image in ex.images) for ex in examples)
        assert kwargs["images"] is not None  # the processor's image inputs
        return plain_collate(examples, *args, **kwargs)

    plain_collate = per_step.collate
    monkeypatch.setattr(per_step, "collate", collate)
    settings = tree(workspace, "per_step", mode="per_step", eval_best_of=0, eval_kl_samples=0)
    del settings["online"]["rounds"]  # one run of train.max_steps steps
    SCORED.clear()
    out = run_online(OnlineConfig.from_dict(settings)) / "round-1"
    samples = [json.loads(line) for line in (out / "samples.jsonl").open()]
    assert {row["step"] for row in samples} == {1, 2}
    for row in samples:
        letter = "r" if row["images"][0].endswith("red.png") else "b"
        assert row["scores"] == [float(text.count(letter)) for text in row["responses"]]
    pairs = [json.loads(line) for line in (out / "pairs.jsonl").open()]
    assert pairs and all(len(pair["images"]) == 1 for pair in pairs)
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").open()] == [1, 2]
    assert collated == [tuple(pair["images"]) for pair in pairs]
    assert {path for _, path, _ in SCORED} == {str(workspace / "red.png"),
                                               str(workspace / "blue.png")}


def test_vllm_sampling_refuses_image_prompts(workspace):
    settings = tree(workspace, "refused")
    settings["online"]["sampling"]["backend"] = "vllm"
    with pytest.raises(ConfigError, match="online.sampling.backend: vllm does not take image"):
        run_online(OnlineConfig.from_dict(settings))


def test_text_only_scorers_and_negative_image_objectives_are_refused_before_anything(
        workspace, tmp_path):
    """A judge or follow-up scorer rated image prompts without seeing the images (judge:policy
    on a VLM ran every round); mDPO failed after round 1 had sampled and scored, suggesting a
    data.convert that online runs refuse."""
    from preftune.data.images import ImageRef
    from preftune.score import load_scorer
    from preftune.score.base import scorer_prompt
    from tiny_models import save_tiny_model_dir

    (tmp_path / "mixed.yaml").write_text(
        "terms: [{scorer: test_online_vision:colour_letter}, {scorer: 'judge:policy'}]\n")
    for scorer, named in (("judge:policy", "judge:policy"), ("follow-up:policy",
                                                             "follow-up:policy"),
                          (str(tmp_path / "mixed.yaml"), "judge:policy")):
        with pytest.raises(ConfigError, match=rf"^online.scorer: {named} reads prompts as text, "
                                              r"and \S*prompts.jsonl:1's prompt shows images"):
            run_online(OnlineConfig.from_dict(tree(workspace, "blind", scorer=scorer)))
    assert not (workspace / "blind").exists()
    judge = load_scorer(f"judge:{save_tiny_model_dir(tmp_path / 'judge')}")
    shown = scorer_prompt("What colour? <image>",
                          images=(ImageRef(path=str(workspace / "red.png")),))
    with pytest.raises(ConfigError, match=r"reads prompts as text, and these show images"):
        judge.score([shown], ["red"])
    assert len(judge.score(["What colour is red?"], ["red"])) == 1
    settings = tree(workspace, "mdpo")
    settings["objective"] = {"name": "mdpo"}
    with pytest.raises(ConfigError, match=r"objective mdpo compares the chosen answer under each "
                                          r"record's image and under a negative image; the "
                                          r"pairs of online rounds are built from samples"):
        OnlineConfig.from_dict(settings)


def test_image_prompts_on_a_text_only_model_name_the_prompt_before_anything_is_written(
        workspace, tmp_path):
    """(The error named no record, and came once round 1 had made its folder.)"""
    from preftune.data.records import DataError
    from tiny_models import save_tiny_model_dir

    settings = tree(workspace, "text-only")
    settings["model"]["path"] = str(save_tiny_model_dir(tmp_path / "text"))
    settings["data"]["eval"] = None
    settings["online"]["eval_best_of"] = 0
    with pytest.raises(DataError, match=r"prompts.jsonl:1: the prompt shows images, and "
                                        r"model.path \S*text is a text-only model"):
        run_online(OnlineConfig.from_dict(settings))
    assert not (workspace / "text-only").exists()


def test_image_prompts_without_images_on_disk_name_the_record(workspace, tmp_path):
    (tmp_path / "prompts.jsonl").write_text(json.dumps(
        {"prompt": "What colour? <image>", "images": ["missing.png"]}) + "\n")
    settings = tree(workspace, "missing")
    settings["data"]["train"] = settings["data"]["eval"] = str(tmp_path / "prompts.jsonl")
    with pytest.raises(Exception, match="prompts.jsonl:1: field 'images', item 0: image file "
                       "'missing.png' does not exist"):
        run_online(OnlineConfig.from_dict(settings))
    # a URL, a folder, and (only the training prompts) an unreadable file: each named, before
    # anything is written (the unreadable one was met after the initial evaluation)
    (tmp_path / "folder").mkdir()
    (tmp_path / "broken.png").write_bytes(b"not a png")
    settings["data"]["eval"] = str(workspace / "prompts.jsonl")
    for value, says in (("https://example.com/cat.png", "'https://example.com/cat.png' is a "
                                                        "URL; images are read from files"),
                        ("folder", r"'folder' is a folder \(\S+\), not an image file"),
                        ("broken.png", r"file '\S+broken.png' is not a readable image")):
        (tmp_path / "prompts.jsonl").write_text(json.dumps(
            {"prompt": "What colour? <image>", "images": [value]}) + "\n")
        with pytest.raises(Exception, match=rf"prompts.jsonl:1: field 'images', item 0: {says}"):
            run_online(OnlineConfig.from_dict(settings))
        assert not (workspace / "missing").exists()


def test_images_given_as_bytes_are_written_once_under_their_content_key(workspace, tmp_path):
    from preftune.data.images import ImageRef
    from preftune.data.images import stored_images

    data = (workspace / "red.png").read_bytes()
    on_disk = ImageRef(path=str(workspace / "blue.png"))
    paths = stored_images((ImageRef(data=data), on_disk, ImageRef(data=data)), tmp_path / "im")
    key = ImageRef(data=data).key
    assert paths == [str((tmp_path / "im" / f"{key}.png").resolve()),
                     str(workspace / "blue.png"), str((tmp_path / "im" / f"{key}.png").resolve())]
    assert [p.name for p in (tmp_path / "im").iterdir()] == [f"{key}.png"]
    assert ImageRef(path=paths[0]).load().getpixel((19, 0)) == (200, 30, 30)
