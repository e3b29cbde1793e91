"""``model.chat_template``: conversational data on a model whose tokenizer has no template (a
base model), through training, reward models, online rounds, ``eval`` and ``data inspect``."""

import json
import re

import pytest
import yaml
from transformers import AutoTokenizer

from preftune.api import Config, RewardConfig, evaluate, run_online, train, train_reward_model
from preftune.cli import main
from preftune.config import ConfigError
from preftune.data.records import DataError
from preftune.data.sources import load_records
from preftune.data.tokenize import TokenizeSettings, tokenize_records
from preftune.model.load import load_tokenizer
from tiny_models import char_tokenizer, tiny_llama

TEMPLATE = ("{% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}### assistant: {% endif %}")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A model directory whose tokenizer has no chat template, conversational pairs, prompts,
    and the template as a .jinja file."""
    root = tmp_path_factory.mktemp("base")
    tokenizer = char_tokenizer()
    tokenizer.chat_template = None
    tiny_llama(vocab_size=len(tokenizer)).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    pairs = [{"prompt": [{"role": "user", "content": f"Q{i}: say yes."}],
              "chosen": [{"role": "assistant", "content": "yes"}],
              "rejected": [{"role": "assistant", "content": "no thanks"}]} for i in range(8)]
    (root / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    (root / "prompts.jsonl").write_text("".join(
        json.dumps({"prompt": p["prompt"]}) + "\n" for p in pairs))
    (root / "template.jinja").write_text(TEMPLATE)
    return root


def checksum(prompt, response):
    """A scorer that tells almost any two samples apart."""
    return float(sum(map(ord, response)) % 101)


def run_tree(base, output_dir, **model):
    return {"output_dir": str(output_dir), "model": {"path": str(base / "model"), **model},
            "data": {"train": str(base / "pairs.jsonl")},
            "reference": {"cache_dir": str(output_dir.parent / "cache")},
            "train": {"batch_size": 4, "max_steps": 2, "learning_rate": 1e-3}}


def char_ids(tokenizer, text):
    return [tokenizer.convert_tokens_to_ids(c) for c in text]  # one token per character


def test_the_template_renders_the_prompts_and_is_saved_with_the_trained_model(base, tmp_path):
    run = train(Config.from_dict(run_tree(base, tmp_path / "run",
                                          chat_template=str(base / "template.jinja"))),
                show_progress=False)
    assert yaml.safe_load((run / "config.yaml").read_text())["model"]["chat_template"] == TEMPLATE
    assert AutoTokenizer.from_pretrained(run / "model").chat_template == TEMPLATE
    # what training tokenized: the prompt as the template writes it, by hand
    tokenizer = load_tokenizer(str(base / "model"), chat_template=TEMPLATE)
    examples, _ = tokenize_records(load_records(str(base / "pairs.jsonl")), tokenizer,
                                   TokenizeSettings(256, 128))
    assert examples[3].prompt_ids == char_ids(tokenizer, "### user: Q3: say yes.\n### assistant: ")
    assert examples[3].response_ids[0] == char_ids(tokenizer, "yes") + [tokenizer.eos_token_id]


def test_without_a_template_the_run_names_the_record_and_the_key(base, tmp_path, capsys):
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(run_tree(base, tmp_path / "run")))
    assert main(["train", str(tmp_path / "c.yaml")]) == 2
    error = capsys.readouterr().err
    assert f"{base / 'pairs.jsonl'}:1: conversational record, but the tokenizer has no chat " \
           "template. Set model.chat_template" in error
    assert not (tmp_path / "run").exists()  # made for the run, nothing written: removed


def test_a_bad_template_or_path_stops_before_anything_runs(base, tmp_path):
    with pytest.raises(ConfigError, match=r"model\.chat_template: nope\.jinja is neither a "
                                          r"file .*nor Jinja template text"):
        Config.from_dict(run_tree(base, tmp_path / "run", chat_template="nope.jinja"))
    config = Config.from_dict(run_tree(base, tmp_path / "run",
                                       chat_template="{% for m in messages %}{{ m.content }}"))
    with pytest.raises(ConfigError, match="model.chat_template: the template does not render a "
                                          "one-turn conversation .TemplateSyntaxError"):
        train(config, show_progress=False)
    assert not (tmp_path / "run").exists()


def test_a_reward_model_on_a_base_backbone_uses_and_saves_the_template(base, tmp_path):
    tree = run_tree(base, tmp_path / "rm", chat_template=TEMPLATE)
    del tree["reference"]
    run = train_reward_model(RewardConfig.from_dict(tree), show_progress=False)
    assert AutoTokenizer.from_pretrained(run / "model").chat_template == TEMPLATE


def online_tree(base, output_dir, scorer, samples, max_new_tokens):
    """One online round on the base model with the template."""
    return {"output_dir": str(output_dir),
            "model": {"path": str(base / "model"), "chat_template": TEMPLATE},
            "data": {"train": str(base / "prompts.jsonl"), "max_length": 64,
                     "max_prompt_length": 32},
            "train": {"batch_size": 2, "max_steps": 1, "learning_rate": 1e-3},
            "online": {"rounds": 1, "scorer": scorer,
                       "sampling": {"samples": samples, "max_new_tokens": max_new_tokens}}}


def test_online_rounds_sample_with_the_template(base, tmp_path):
    tree = online_tree(base, tmp_path / "online", "test_chat_template:checksum", 4, 6)
    out = run_online(tree)
    assert AutoTokenizer.from_pretrained(out / "round-1" / "model").chat_template == TEMPLATE
    del tree["model"]["chat_template"]
    tree["output_dir"] = str(tmp_path / "without")
    with pytest.raises(DataError, match="no chat template. Set model.chat_template"):
        run_online(tree)


def test_the_policy_as_judge_reads_its_questions_through_the_template(base, tmp_path):
    from preftune.model.load import load_model_and_tokenizer
    from preftune.score.judge import LLMJudge

    out = run_online(online_tree(base, tmp_path / "online", "judge:policy", 2, 4))
    row = json.loads((out / "round-1" / "scored.jsonl").read_text().splitlines()[0])
    judges = {template: LLMJudge(*load_model_and_tokenizer(str(base / "model"),
                                                           chat_template=template), "judge")
              for template in (TEMPLATE, None)}
    scores = {template: judge.score([row["prompt"]] * 2, row["responses"])
              for template, judge in judges.items()}
    assert row["scores"] == pytest.approx(scores[TEMPLATE], abs=1e-6)
    assert row["scores"] != pytest.approx(scores[None], abs=1e-6)  # plain text judges otherwise


def test_eval_and_data_inspect_take_the_template(base, tmp_path, capsys):
    template = str(base / "template.jinja")
    assert main(["data", "inspect", str(base / "pairs.jsonl"), "--model", str(base / "model"),
                 "--chat-template", template, "--example", "0"]) == 0
    shown = re.findall(r"^ +\d+ +\d+  '(.*)'", capsys.readouterr().out, re.MULTILINE)
    assert "".join(shown[:38]) == r"### user: Q0: say yes.\n### assistant: "  # the prompt
    results = evaluate(str(base / "model"), str(base / "pairs.jsonl"),
                       reference=str(base / "model"), samples=0, chat_template=template,
                       output=str(tmp_path / "eval"))
    assert results["rewards/accuracy"] == 0.0  # the model is its own reference: no margins
    with pytest.raises(DataError, match="no chat template. Set model.chat_template"):
        evaluate(str(base / "model"), str(base / "pairs.jsonl"), reference=str(base / "model"),
                 samples=0, output=str(tmp_path / "eval"))
    with pytest.raises(ConfigError, match="--chat-template: nope is neither a file"):
        evaluate(str(base / "model"), str(base / "pairs.jsonl"), samples=0,
                 chat_template="nope", output=str(tmp_path / "eval"))
    with pytest.raises(ConfigError, match="--chat-template: the template does not render"):
        evaluate(str(base / "model"), str(base / "pairs.jsonl"), samples=0,
                 chat_template="{% if %}", output=str(tmp_path / "eval"))


def test_a_vision_language_model_saves_the_template_with_its_processor(tmp_path):
    from transformers import AutoProcessor

    from tiny_vlms import save_tiny_vlm_dir

    tokenizer = load_tokenizer(str(save_tiny_vlm_dir(tmp_path / "vlm", "llava")),
                               chat_template=TEMPLATE)
    assert tokenizer.chat_template == TEMPLATE
    tokenizer.image_inputs.processor.save_pretrained(tmp_path / "saved")  # as training saves it
    assert AutoProcessor.from_pretrained(tmp_path / "saved").chat_template == TEMPLATE


def test_the_readme_base_model_template_renders_plain_turns(base):
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    block = re.search(r"```yaml\n(model:\n  path: /models/my-base-model\n.*?)```", readme,
                      re.DOTALL).group(1)
    tree = yaml.safe_load(block)
    tree["model"]["path"] = str(base / "model")
    config = Config.from_dict(tree)
    tokenizer = load_tokenizer(config.model.path, chat_template=config.model.chat_template)
    assert tokenizer.apply_chat_template(
        [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"},
         {"role": "user", "content": "R"}], tokenize=False, add_generation_prompt=True) == \
        "User: Q\n\nAssistant: A\n\nUser: R\n\nAssistant:"
