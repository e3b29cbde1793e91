"""LongAlign's segment-level text encoding: the conditioning against a hand computation from
the text encoder, the guidance input, a run that trains with it and records it in the saved
pipeline, which every later load applies, and refusals that name the key."""

import json

import pytest
import torch

pytest.importorskip("diffusers")

from tokenizers.processors import TemplateProcessing  # noqa: E402
from transformers import AutoTokenizer, CLIPTextModel  # noqa: E402

from diffusion_fixtures import (WORDS, config_tree, one_thread,  # noqa: E402, F401
                                tiny_pipeline, tiny_sdxl_pipeline, write_pairs)
from preftune.config import ConfigError  # noqa: E402
from preftune.diffusion.config import DiffusionConfig  # noqa: E402
from preftune.diffusion.model import load_diffusion_model  # noqa: E402
from preftune.diffusion.segments import FILE, sentences  # noqa: E402
from preftune.diffusion.tiny import word_tokenizer  # noqa: E402
from preftune.diffusion.train import train_diffusion  # noqa: E402

LONG = "a red circle. a blue square; a green triangle"


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    """The tiny pipeline with a CLIP-like tokenizer: a start token, an end token, padded
    with the end token (as SD 1.5's), 8 positions."""
    path = tiny_pipeline(tmp_path_factory.mktemp("segments") / "pipe")
    tokenizer = word_tokenizer(WORDS)
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", tokenizer.bos_token_id),
                                              ("</s>", tokenizer.eos_token_id)])
    tokenizer.pad_token = "</s>"
    tokenizer.save_pretrained(path / "tokenizer")
    return path


def by_hand(pipe, prompt, tokens):
    """Each sentence encoded alone; its tokens other than end and padding, in order; cut or
    filled with the mean of the empty prompt's states after its end token."""
    tokenizer = AutoTokenizer.from_pretrained(pipe / "tokenizer")
    encoder = CLIPTextModel.from_pretrained(pipe / "text_encoder")
    rows = []
    with torch.no_grad():
        for sentence in sentences(prompt):
            ids = tokenizer(sentence, padding="max_length", max_length=8,
                            truncation=True).input_ids
            states = encoder(torch.tensor([ids]))[0][0]
            rows += [states[k] for k, token in enumerate(ids)
                     if token != tokenizer.eos_token_id]
        empty = tokenizer("", padding="max_length", max_length=8).input_ids
        assert empty[:2] == [tokenizer.bos_token_id, tokenizer.eos_token_id]
        filler = encoder(torch.tensor([empty]))[0][0, 2:].mean(0)
    rows = rows[:tokens]
    return torch.stack(rows + [filler] * (tokens - len(rows)))


def test_encoding_is_the_sentences_states_joined_and_filled(pipe):
    model = load_diffusion_model(pipe)
    model.segment_tokens = 16
    ours = model.encode_prompts([LONG, "a blue circle", ""]).hidden
    assert ours.shape == (3, 16, 32)
    # three sentences of 5 kept tokens each (<s>, a, colour, shape, the full stop): 15 + 1
    torch.testing.assert_close(ours[0], by_hand(pipe, LONG, 16))
    torch.testing.assert_close(ours[1], by_hand(pipe, "a blue circle", 16))
    torch.testing.assert_close(ours[2], by_hand(pipe, "", 16))  # <s> and the filler
    model.segment_tokens = 12  # cut: the third sentence loses its last three tokens
    torch.testing.assert_close(model.encode_prompts([LONG]).hidden[0], by_hand(pipe, LONG, 12))
    torch.testing.assert_close(model.unconditional(2).hidden[1], by_hand(pipe, "", 12))


def captioned_images(tmp_path):
    """LongAlign's first-stage data: long captions and one image each, no rejected image
    (columns mapped with data.fields)."""
    pairs = write_pairs(tmp_path / "data", count=4)
    rows = [json.loads(line) for line in pairs.read_text().splitlines()]
    path = pairs.parent / "captions.jsonl"
    path.write_text("".join(json.dumps({"caption": f"{row['prompt']}. a blue square",
                                        "image": row["chosen"]}) + "\n" for row in rows))
    return path


def test_a_run_trains_with_it_and_the_saved_pipeline_keeps_it(pipe, tmp_path):
    pairs = write_pairs(tmp_path / "pairs", count=4)
    tree = config_tree(pipe, captioned_images(tmp_path), tmp_path / "run",
                       objective={"name": "denoising"}, model={"segment_tokens": 16})
    tree["data"]["fields"] = {"prompt": "caption", "chosen": "image"}
    train_diffusion(DiffusionConfig.from_dict(tree), show_progress=False)
    saved = tmp_path / "run" / "model"
    assert json.loads((saved / FILE).read_text())["segment_tokens"] == 16
    reloaded = load_diffusion_model(saved)
    assert reloaded.segment_tokens == 16
    assert reloaded.encode_prompts([LONG]).hidden.shape == (1, 16, 32)
    assert load_diffusion_model(pipe).segment_tokens is None  # the source is untouched
    # training further from it: the same setting, given or not; another one is refused
    again = config_tree(saved, pairs, tmp_path / "again", objective={"name": "denoising"},
                        train={"max_steps": 1})
    train_diffusion(DiffusionConfig.from_dict(again), show_progress=False)
    assert json.loads((tmp_path / "again" / "model" / FILE).read_text())["segment_tokens"] == 16
    other = config_tree(saved, pairs, tmp_path / "other", model={"segment_tokens": 20})
    with pytest.raises(ConfigError, match=r"model.segment_tokens 20: .* was trained with "
                                          r"segment-level encoding into 16 tokens"):
        train_diffusion(DiffusionConfig.from_dict(other), show_progress=False)


def test_other_denoisers_are_refused(tmp_path):
    pipe = tiny_sdxl_pipeline(tmp_path / "sdxl")
    tree = config_tree(pipe, write_pairs(tmp_path / "data", count=2), tmp_path / "run",
                       model={"segment_tokens": 16})
    with pytest.raises(ConfigError, match="model.segment_tokens 16: segment-level encoding is "
                                          "for SD 1.x/2.x UNets .* two text encoders"):
        train_diffusion(DiffusionConfig.from_dict(tree), show_progress=False)
