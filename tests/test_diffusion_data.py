"""Image preference records: the forms an image may take, and errors that name the file, the
record and the field; the diffusion config's checks."""

import base64
import io
import json
import re

import pytest
import torch

pytest.importorskip("diffusers")

from diffusion_fixtures import one_thread, config_tree, write_pairs  # noqa: E402, F401
from preftune.config import ConfigError  # noqa: E402
from preftune.data.records import DataError  # noqa: E402
from preftune.diffusion.config import DiffusionConfig  # noqa: E402
from preftune.diffusion.data import image_tensor, inspect_pairs, load_pairs  # noqa: E402
from preftune.diffusion.shapes import colour_score, draw_shape, right_colour  # noqa: E402


def rewrite(path, change):
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    change(rows)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def test_records_read_with_scores_and_captions(tmp_path):
    pairs = load_pairs(str(write_pairs(tmp_path, count=2, captions=True)))
    assert [p.prompt for p in pairs] == ["a red circle", "a green square"]
    assert pairs[1].scores == {"chosen_score": 1.0, "rejected_score": 0.0}
    assert (pairs[1].caption("chosen"), pairs[1].caption("rejected")) == (
        "a green square", "a blue square")
    pixels = image_tensor(pairs[0].chosen, pairs[0].base_dir, 16)
    assert pixels.shape == (3, 16, 16) and pixels.max() == 1.0  # white background


@pytest.mark.parametrize("value", ["0.9", True, float("nan"), [1]])
def test_a_score_that_is_no_number_is_refused_not_dropped(tmp_path, value):
    """A tie's label is read from chosen_score == rejected_score (the step model): a score
    written as text used to be dropped silently, and the tie trained as a preference."""
    path = write_pairs(tmp_path, count=2)
    rewrite(path, lambda rows: rows[1].update(chosen_score=value, rejected_score=0.9))
    with pytest.raises(DataError, match=rf"^{path}:2: field 'chosen_score' must be a finite "
                                        r"number, got .*; write it as a number \(or remove it\)"):
        load_pairs(str(path))


def test_images_as_bytes_data_uri_and_hf_dicts_equal_the_file(tmp_path):
    path = write_pairs(tmp_path, count=1)
    png = (tmp_path / "images/0_w.png").read_bytes()
    uri = "data:image/png;base64," + base64.b64encode(png).decode()
    rewrite(path, lambda rows: rows[0].update(chosen=uri, rejected={"bytes": None,
                                                                   "path": "images/0_w.png"}))
    (pair,) = load_pairs(str(path))
    from_file = image_tensor("images/0_w.png", pair.base_dir, 16)
    torch.testing.assert_close(image_tensor(pair.chosen, pair.base_dir, 16), from_file)
    torch.testing.assert_close(image_tensor(pair.rejected, pair.base_dir, 16), from_file)
    torch.testing.assert_close(image_tensor(png, ".", 16), from_file)


def test_missing_image_file_names_file_record_and_field(tmp_path):
    path = write_pairs(tmp_path, count=2)
    (tmp_path / "images/1_l.png").unlink()
    with pytest.raises(DataError) as error:
        load_pairs(str(path))
    message = str(error.value)
    assert f"{path}:2" in message and "'rejected'" in message and "1_l.png" in message
    (tmp_path / "images/1_l.png").mkdir()  # a folder where the image should be
    with pytest.raises(DataError, match="1_l.png is a directory, not an image file"):
        load_pairs(str(path))


def test_unreadable_image_bytes_name_record_and_field(tmp_path):
    path = write_pairs(tmp_path, count=2)
    (tmp_path / "images/0_w.png").write_bytes(b"not a png at all")
    with pytest.raises(DataError) as error:
        load_pairs(str(path))
    message = str(error.value)
    assert f"{path}:1" in message and "'chosen'" in message and "cannot read the image" in message


def test_missing_field_is_named_with_the_mapping_to_fix_it(tmp_path):
    path = write_pairs(tmp_path, count=2)
    rewrite(path, lambda rows: rows[1].pop("rejected"))
    with pytest.raises(DataError) as error:
        load_pairs(str(path))
    assert str(error.value).startswith(f"{path}:2: field 'rejected' (rejected) is missing")
    # how to map it from a config, `diffusion train --set` and the commands with --column
    assert str(error.value).endswith(
        "map the column with data.fields.rejected (--set data.fields.rejected=COLUMN with a "
        "training command, --column rejected=COLUMN with eval, data inspect and the rm "
        "commands).")
    rewrite(path, lambda rows: [row.update(jpg_1=f"images/{k}_l.png", rejected=None)
                                for k, row in enumerate(rows)])
    assert len(load_pairs(str(path), fields={"rejected": "jpg_1"})) == 2


def test_dcpo_needs_captions(tmp_path):
    path = write_pairs(tmp_path, count=1)
    with pytest.raises(DataError, match="'chosen_caption'.*dcpo"):
        load_pairs(str(path), captions=True)
    rows = [json.loads(line) for line in path.open()]
    path.write_text(json.dumps({**rows[0], "chosen_caption": 5, "rejected_caption": "x"}) + "\n")
    with pytest.raises(DataError, match=r":1: field 'chosen_caption' \(chosen_caption\) must be "
                                        r"text, got int"):
        load_pairs(str(path), captions=True)


def test_inspect_shows_prompt_images_sizes_and_scores(tmp_path):
    text = inspect_pairs(str(write_pairs(tmp_path, count=2, captions=True)), example=1)
    assert "2 image preference pairs" in text
    assert "prompt:   a green square" in text
    assert "chosen:   images/1_w.png (16x16)  caption: a green square" in text
    assert "scores:   chosen_score=1, rejected_score=0" in text
    # captioned images without a rejected one (what plain denoising reads)
    captioned = tmp_path / "captioned.jsonl"
    captioned.write_text(json.dumps({"prompt": "a red circle", "chosen": "images/0_w.png"}) + "\n")
    text = inspect_pairs(str(captioned))
    assert "1 captioned images (prompt, chosen image; no rejected image: for denoising)" in text
    assert "chosen:   images/0_w.png (16x16)" in text and "rejected:" not in text


def test_image_data_is_told_from_text_for_any_image_file_type_and_saved_datasets(tmp_path):
    """(.tiff or .gif paths, and a saved dataset's decoded Image columns, were read as text
    pairs by data inspect, though training read them.)"""
    from PIL import Image

    from preftune.diffusion.data import image_data_kind

    path = write_pairs(tmp_path, count=2)
    for png in (tmp_path / "images").glob("*.png"):
        Image.open(png).save(png.with_suffix(".tiff"))
    tiff = tmp_path / "tiff.jsonl"
    tiff.write_text(path.read_text().replace(".png", ".tiff"))
    assert image_data_kind(str(tiff)) == "pairs"
    assert "chosen:   images/0_w.tiff (16x16)" in inspect_pairs(str(tiff))
    datasets = pytest.importorskip("datasets")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    saved = datasets.Dataset.from_dict({key: [row[key] if key == "prompt" else
                                              str(tmp_path / row[key]) for row in rows]
                                        for key in ("prompt", "chosen", "rejected")})
    saved = saved.cast_column("chosen", datasets.Image()).cast_column("rejected", datasets.Image())
    saved.save_to_disk(str(tmp_path / "saved"))
    assert image_data_kind(str(tmp_path / "saved")) == "pairs"
    text = json.dumps({"prompt": "q", "chosen": "The answer.", "rejected": "No."})
    (tmp_path / "text.jsonl").write_text(text + "\n")
    assert image_data_kind(str(tmp_path / "text.jsonl")) is None


def test_config_rejects_unknown_and_useless_keys(tmp_path):
    tree = config_tree(tmp_path / "pipe", tmp_path / "pairs.jsonl", tmp_path / "run")
    with pytest.raises(ConfigError, match="unknown key 'objective.bta'.*Did you mean.*beta"):
        DiffusionConfig.from_dict(tree, ["objective.bta=3"])
    with pytest.raises(ConfigError, match="unknown key 'data.resolutin'"):
        DiffusionConfig.from_dict(tree, ["data.resolutin=3"])
    with pytest.raises(ConfigError, match="train.layout applies to language models only"):
        DiffusionConfig.from_dict(tree, ["train.layout=packed"])
    with pytest.raises(ConfigError, match="train.lean_activations applies to language models"):
        DiffusionConfig.from_dict(tree, ["train.lean_activations=false"])
    with pytest.raises(ConfigError, match="train.checkpoint_every applies to language models"):
        DiffusionConfig.from_dict(tree, ["train.gradient_checkpointing=true",
                                         "train.checkpoint_every=2"])
    with pytest.raises(ConfigError, match="model.lora.save_merged: false leaves a pipeline "
                                          "without its unet/"):
        DiffusionConfig.from_dict(tree, ["model.lora={r: 4, save_merged: false}"])
    with pytest.raises(ConfigError, match="reference.strategy: precomputed is not available"):
        DiffusionConfig.from_dict(tree, ["reference.strategy=precomputed"])
    with pytest.raises(ConfigError, match="adapter-off needs model.lora"):
        DiffusionConfig.from_dict(tree, ["reference.strategy=adapter-off"])
    with pytest.raises(ConfigError, match="live does nothing for mapo"):
        DiffusionConfig.from_dict(tree, ["objective.name=mapo", "reference.strategy=live"])
    config = DiffusionConfig.from_dict(tree, ["objective.name=mapo", "objective.snr_value=0.25"])
    assert config.reference_strategy == "none" and config.objective.params().snr_value == 0.25


def test_a_setting_the_rest_of_the_config_keeps_unread_is_refused(tmp_path):
    tree = {**config_tree(tmp_path / "pipe", tmp_path / "pairs.jsonl", tmp_path / "run"),
            "samples": {}}
    with pytest.raises(ConfigError, match="samples.steps does nothing without samples.prompts"):
        DiffusionConfig.from_dict(tree, ["samples.steps=5"])
    assert DiffusionConfig.from_dict(tree, ["samples.steps=5", "samples.prompts=[a]"]) \
        .samples.steps == 5
    with pytest.raises(ConfigError, match="train.logit_std does nothing under "
                                          "train.timestep_sampling: uniform"):
        DiffusionConfig.from_dict(tree, ["train.logit_std=2"])
    assert DiffusionConfig.from_dict(tree, ["train.logit_std=2",
                                            "train.timestep_sampling=logit_normal"]) \
        .train.logit_std == 2


def test_colour_checker(tmp_path):
    red = draw_shape("red", "circle")
    assert colour_score("a red circle", red) == 1.0 and right_colour("a red circle", red)
    assert colour_score("a blue circle", red) == 0.0 and not right_colour("a blue circle", red)
    blank = draw_shape("red", "circle").point(lambda _: 255)
    assert colour_score("a red circle", blank) == 0.0 and not right_colour("a red circle", blank)
    buffer = io.BytesIO()
    red.save(buffer, "PNG")
    assert colour_score("a red circle", buffer.getvalue()) == 1.0
    # a collapsed model's noise: about an 80-radius ball of the RGB cube per colour, ~10%
    noise = torch.rand((3, 16, 16), generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert colour_score("a red circle", noise) < 0.25 and not right_colour("a red circle", noise)


def test_a_misspelt_image_scorer_lists_the_image_scorers():
    from preftune.config import ConfigError
    from preftune.diffusion.evaluate import image_scorer

    with pytest.raises(ConfigError, match=r"^scorer 'shape_color': expected shape_colour \(the "
                                          r"demo's checker\), spm:PATH .* Did you mean "
                                          r"'shape_colour'\?$"):
        image_scorer("shape_color")


def test_text_scorers_are_refused_for_images_before_anything_loads(tmp_path):
    """A reward model, an LLM judge, follow-up likelihood, the synthetic checkers and files of
    them rate text: on images a reward model failed after sampling (with a traceback) and a
    judge rated nothing meaningful; they are refused by kind, as is a combination with such
    a term, or one that names itself."""
    import yaml

    from preftune.config import ConfigError
    from preftune.diffusion.evaluate import check_image_scorer

    files = {"follow.yaml": {"follow_up": {"model": "default"}},
             "render.yaml": {"render": {"pipeline": "p", "scorer": "shape_colour"}},
             "mixed.yaml": {"terms": [{"scorer": "preftune.diffusion.shapes:colour_score"},
                                      {"scorer": "judge:default", "weight": 0.5}]},
             "loop.yaml": {"terms": [{"scorer": str(tmp_path / "loop.yaml")}]}}
    for name, tree in files.items():
        (tmp_path / name).write_text(yaml.safe_dump(tree))
    (tmp_path / "rm").mkdir()
    for spec, kind in [("rm:runs/rm", "a reward model"), ("judge:default", "an LLM judge"),
                       ("judge-pair:policy", "a pairwise LLM judge"),
                       ("follow-up:default", "follow-up likelihood"),
                       ("synthetic", "the synthetic checkers"),
                       (str(tmp_path / "rm"), "a reward model"),
                       (str(tmp_path / "follow.yaml"), "follow-up likelihood"),
                       (str(tmp_path / "render.yaml"), "a render scorer"),
                       (str(tmp_path / "mixed.yaml"), "an LLM judge")]:
        with pytest.raises(ConfigError, match=f"scorer '{re.escape(spec)}' is {kind}.* which "
                                              "rates text, not images; for images give "
                                              r"shape_colour \(the demo.s checker\), spm:PATH"):
            check_image_scorer(spec)
    with pytest.raises(ConfigError, match="a combination that names itself among its terms"):
        check_image_scorer(str(tmp_path / "loop.yaml"))
    with pytest.raises(ConfigError, match=r"scorer 'spm:nowhere': nowhere is not a directory"):
        check_image_scorer("spm:nowhere")
    for spec in ("shape_colour", "preftune.diffusion.shapes:colour_score"):
        check_image_scorer(spec)  # image scorers pass


@pytest.mark.parametrize("path", sorted(
    (__import__("pathlib").Path(__file__).parents[1] / "examples/diffusion").glob("*.yaml")),
    ids=lambda p: p.name)
def test_example_configs_are_valid(path):
    if path.stem == "spm":  # the step-aware preference model of SPO, not a denoiser run
        from preftune.diffusion.step_model_train import StepModelConfig

        assert StepModelConfig.from_yaml(path).pipeline.guidance_scale == 5.0
        return
    if path.stem.startswith("online_"):  # rounds of sample -> rank -> train
        from preftune.diffusion.online import DiffusionOnlineConfig

        config = DiffusionOnlineConfig.from_yaml(path)
        assert config.online.rounds > 1
    else:
        config = DiffusionConfig.from_yaml(path)
    name = path.stem.removeprefix("online_").removesuffix("_lora")
    assert name.startswith(config.objective.name)


def test_resume_names_only_the_settings_a_diffusion_run_reads_as_ones_that_may_change(tmp_path):
    import yaml

    from preftune.train.output import check_resume
    tree = config_tree(tmp_path / "pipe", tmp_path / "pairs.jsonl", tmp_path / "run")
    config = DiffusionConfig.from_dict(tree)
    (tmp_path / "run").mkdir()
    (tmp_path / "run/config.yaml").write_text(yaml.safe_dump(config.model_dump()))
    check_resume(config)
    with pytest.raises(ConfigError) as refused:
        check_resume(DiffusionConfig.from_dict(tree, ["train.learning_rate=0.5"]))
    may_change = re.search(r"only (.*) may change", str(refused.value)).group(1).split(", ")
    assert may_change == ["output_dir", "train.eval_every", "train.gradient_checkpointing",
                          "train.keep_checkpoints", "train.log_every", "train.report_to",
                          "train.run_name", "train.save_every", "train.tracking_dir"]



def test_pairs_showing_one_picture_twice_are_counted(tmp_path):
    import shutil

    from preftune.diffusion.splits import read_pairs
    pairs = write_pairs(tmp_path, count=3)
    rows = [json.loads(line) for line in pairs.read_text().splitlines()]
    rows[0]["rejected"] = rows[0]["chosen"]  # the same file
    shutil.copy(tmp_path / rows[2]["chosen"], tmp_path / "images/copy.png")
    rows[2]["rejected"] = "images/copy.png"  # the same picture in another file
    pairs.write_text("".join(json.dumps(row) + "\n" for row in rows))
    config = DiffusionConfig.from_dict(config_tree(tmp_path / "pipe", pairs, tmp_path / "run"))
    assert read_pairs(config)[1]["identical_images"] == 2
