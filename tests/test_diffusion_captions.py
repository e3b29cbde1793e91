"""DCPO's captions (`preftune diffusion caption`): DCPO-c captions each image with a
vision-language model told the prompt, DCPO-p perturbs the prompt with a language model for the
rejected image, DCPO-h perturbs the rejected image's caption; each text is the model's greedy
answer to the instruction, the written file trains `dcpo`, and bad input is refused by name."""

import json

import pytest

pytest.importorskip("diffusers")

from diffusion_fixtures import (config_tree, one_thread, tiny_pipeline,  # noqa: E402, F401
                                write_pairs)
from preftune.cli import main  # noqa: E402
from preftune.config import ConfigError  # noqa: E402
from preftune.data.images import ImageRef  # noqa: E402
from preftune.data.records import DataError  # noqa: E402
from preftune.data.tokenize import TokenizeSettings  # noqa: E402
from preftune.diffusion.captions import (CAPTION_INSTRUCTION, PERTURB_INSTRUCTION,  # noqa: E402
                                         caption_pairs)
from preftune.generation import greedy_texts, prompt_ids  # noqa: E402
from preftune.model.load import load_model_and_tokenizer  # noqa: E402
from tiny_models import save_tiny_model_dir  # noqa: E402
from tiny_vlms import save_tiny_vlm_dir  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("captions")
    return {"vlm": save_tiny_vlm_dir(root / "vlm", "llava"),
            "lm": save_tiny_model_dir(root / "lm"),
            "pairs": write_pairs(root / "data", count=3), "root": root}


def greedy(path, instructions, images=None):
    """The model's greedy answers, first line, computed here from the generation helpers."""
    model, tokenizer = load_model_and_tokenizer(str(path))
    ids = prompt_ids(instructions, tokenizer, TokenizeSettings(4096, 4096 - 8), images)
    answers = greedy_texts(model.eval(), tokenizer, ids, 8, images=images)
    return [a.strip().splitlines()[0].strip() if a.strip() else "" for a in answers]


def rows(path):
    return [json.loads(line) for line in open(path)]


@pytest.mark.parametrize("method", ["dcpo-c", "dcpo-p", "dcpo-h"])
def test_each_method_writes_the_models_answers(parts, tmp_path, method):
    captioner = str(parts["vlm"]) if method in ("dcpo-c", "dcpo-h") else None
    perturber = str(parts["lm"]) if method in ("dcpo-p", "dcpo-h") else None
    out = tmp_path / "sub" / "captioned.jsonl"
    result = caption_pairs(str(parts["pairs"]), str(out), captioner, perturber,
                           max_new_tokens=8)
    assert result == {"pairs": 3, "method": method, "output": str(out)}
    written, original = rows(out), rows(parts["pairs"])
    folder = parts["pairs"].parent
    images = [(ImageRef(path=str(folder / row[side])),) for row in original
              for side in ("chosen", "rejected")]
    prompts = [row["prompt"] for row in original]
    if captioner:
        captions = greedy(captioner, [CAPTION_INSTRUCTION.replace("{prompt}", p)
                                      for p in prompts for _ in range(2)], images)
        chosen, rejected = captions[0::2], captions[1::2]
    else:
        chosen, rejected = prompts, prompts
    if perturber:
        rejected = greedy(perturber, [PERTURB_INSTRUCTION.replace("{text}", t)
                                      for t in rejected])
    assert [row["chosen_caption"] for row in written] == chosen
    assert [row["rejected_caption"] for row in written] == rejected
    for row, before in zip(written, original):  # image paths now start at the output's folder
        assert (out.parent / row["chosen"]).resolve() == (folder / before["chosen"]).resolve()
        assert row["prompt"] == before["prompt"] and row["chosen_score"] == 1.0


def test_the_captioned_file_trains_dcpo(parts, tmp_path):
    from preftune.diffusion.config import DiffusionConfig
    from preftune.diffusion.train import train_diffusion

    out = tmp_path / "captioned.jsonl"
    assert main(["diffusion", "caption", "--data", str(parts["pairs"]), "--output", str(out),
                 "--perturber", str(parts["lm"]), "--max-new-tokens", "6"]) == 0
    tree = config_tree(tiny_pipeline(tmp_path / "pipe"), out, tmp_path / "run",
                       objective={"name": "dcpo"}, train={"max_steps": 1, "batch_size": 3})
    run = train_diffusion(DiffusionConfig.from_dict(tree), show_progress=False)
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").open()] == [1]


@pytest.mark.parametrize("flag", ["--column", "--field"])  # --field: the flag's first name
def test_a_renamed_prompt_column_is_read_with_column(parts, tmp_path, flag):
    renamed = parts["pairs"].parent / f"renamed{flag}.jsonl"
    renamed.write_text("".join(json.dumps({("text" if k == "prompt" else k): v
                                           for k, v in row.items()}) + "\n"
                               for row in rows(parts["pairs"])))
    out = tmp_path / "captioned.jsonl"
    assert main(["diffusion", "caption", "--data", str(renamed), "--output", str(out),
                 "--perturber", str(parts["lm"]), "--max-new-tokens", "4",
                 flag, "prompt=text"]) == 0
    written = rows(out)
    prompts = [row["prompt"] for row in rows(parts["pairs"])]
    assert [row["text"] for row in written] == prompts  # the row keeps its own column names
    assert [row["chosen_caption"] for row in written] == prompts  # DCPO-p: chosen keeps it


def test_bad_input_is_refused_by_name(parts, tmp_path):
    data = str(parts["pairs"])
    with pytest.raises(ConfigError, match="needs --captioner .DCPO-c., --perturber"):
        caption_pairs(data, str(tmp_path / "a.jsonl"))
    with pytest.raises(ConfigError, match="--captioner .*: a text-only model"):
        caption_pairs(data, str(tmp_path / "b.jsonl"), captioner=str(parts["lm"]))
    with pytest.raises(ConfigError, match="--perturb-instruction must contain"):
        caption_pairs(data, str(tmp_path / "c.jsonl"), perturber=str(parts["lm"]),
                      perturb_instruction="Rewrite it.")
    with pytest.raises(DataError, match="is the input file"):
        caption_pairs(data, data, perturber=str(parts["lm"]))
    done = tmp_path / "done.jsonl"
    caption_pairs(data, str(done), perturber=str(parts["lm"]), max_new_tokens=4)
    before = done.read_text()
    with pytest.raises(DataError, match="field 'chosen_caption' already holds a caption; pass "
                       "--overwrite"):
        caption_pairs(str(done), str(tmp_path / "again.jsonl"), perturber=str(parts["lm"]))
    assert done.read_text() == before and not (tmp_path / "again.jsonl").exists()
    with pytest.raises(DataError, match="--output .*done.jsonl already exists; choose another "
                                        "file, or pass --overwrite"):
        caption_pairs(data, str(done), perturber=str(parts["lm"]))
    assert done.read_text() == before
