"""Every saved model directory carries a Hugging Face model card and keeps the base model's
generation config."""

import hashlib
import json
import sys

import pytest
import torch
import transformers
import yaml
from transformers import GenerationConfig

from preftune.cli import main
from preftune.reward.config import build_reward_config
from preftune.reward.train import train_reward_model
from preftune.train.logging import read_metrics
from preftune.train.model_card import command_line, front_matter
from tiny_models import save_tiny_model_dir

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def policy_run(tmp_path_factory):
    """``preftune train`` from a base whose card says MIT and whose generation config samples."""
    root = tmp_path_factory.mktemp("card")
    base = save_tiny_model_dir(root / "base")
    (base / "README.md").write_text("---\nlicense: mit\n---\n# a tiny base\n")
    GenerationConfig(do_sample=True, temperature=0.3, top_p=0.85, max_new_tokens=77,
                     bos_token_id=1, eos_token_id=2, pad_token_id=0).save_pretrained(base)
    rows = [{"prompt": f"Q{i}: say yes.", "chosen": " yes", "rejected": " no thanks"}
            for i in range(14)]
    rows.append({"prompt": "Q: " + "long " * 80, "chosen": " yes", "rejected": " no"})
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = {"output_dir": str(root / "run"), "model": {"path": str(base)},
              "data": {"train": str(root / "pairs.jsonl"), "eval_fraction": 0.2,
                       "max_length": 64, "max_prompt_length": 32},
              "reference": {"cache_dir": str(root / "cache")},
              "train": {"batch_size": 4, "max_steps": 2, "learning_rate": 1e-3,
                        "eval_every": 2}}
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    argv = ["preftune", "train", str(root / "config.yaml"), "--set", "objective.beta=0.2"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", argv)
        assert main(argv[1:]) == 0
    return root


def test_policy_model_card_lists_base_objective_data_metrics_and_command(policy_run):
    run = policy_run / "run"
    text = (run / "model" / "README.md").read_text()
    meta = front_matter(text)
    assert meta == {"license": "mit", "library_name": "preftune",
                    "pipeline_tag": "text-generation",
                    "tags": ["preftune", "preference-optimization", "dpo"]}
    assert f"from `{policy_run / 'base'}`" in text
    assert '| parameters | {"dpo": {"beta": 0.2' in text
    assert "| reference | precomputed |" in text and "| optimizer steps | 2 |" in text
    assert "| optimizer | adamw, betas [0.9, 0.999], eps 1e-08, weight decay 0 |" in text
    digest = hashlib.sha256((policy_run / "pairs.jsonl").read_bytes()).hexdigest()
    assert f"| train | `{policy_run / 'pairs.jsonl'}` | `{digest}` |" in text
    report = json.loads((run / "data_report.json").read_text())
    assert report["train"]["records"] + report["eval"]["records"] == 15
    assert (f"- train records: records {report['train']['records']}, kept "
            f"{report['train']['kept']}, dropped_too_long {report['train']['dropped_too_long']}"
            in text)
    final = read_metrics(run / "metrics.jsonl")[-1]
    assert final["step"] == 2
    assert f"| train (step 2) | loss | {final['loss']:.6g} |" in text
    assert f"| eval (step 2) | loss | {final['eval/loss']:.6g} |" in text
    command = command_line(["preftune", "train", str(policy_run / "config.yaml"), "--set",
                            "objective.beta=0.2"])
    assert f"```bash\n{command}\n```" in text
    assert f"torch {torch.__version__}, transformers {transformers.__version__}" in text


def test_saved_policy_keeps_the_base_generation_config(policy_run):
    saved = GenerationConfig.from_pretrained(policy_run / "run" / "model")
    assert (saved.do_sample, saved.temperature, saved.top_p, saved.max_new_tokens) == \
        (True, 0.3, 0.85, 77)


def test_reward_model_card_names_the_loss_and_head(policy_run):
    out = train_reward_model(build_reward_config({
        "output_dir": str(policy_run / "rm"), "model": {"path": str(policy_run / "base")},
        "data": {"train": str(policy_run / "pairs.jsonl"), "max_length": 64,
                 "max_prompt_length": 32},
        "train": {"batch_size": 4, "max_steps": 1}}), show_progress=False)
    text = (out / "model" / "README.md").read_text()
    meta = front_matter(text)
    assert meta["pipeline_tag"] == "text-classification"
    assert meta["tags"] == ["preftune", "reward-model", "bt"] and meta["license"] == "mit"
    assert "a reward model (scalar head) trained with the reward loss `bt`" in text
    assert "| train (step 1) | rewards/accuracies |" in text
    # trained from Python under pytest: the command that trains its saved config
    assert f"```bash\npreftune rm train {out / 'config.yaml'}\n```" in text


def test_command_line_reads_as_typed():
    assert command_line(["/venv/bin/preftune", "train", "a b.yaml"]) == "preftune train 'a b.yaml'"
    assert command_line(["scripts/align.py", "--lr", "1e-6"]) == "python scripts/align.py --lr 1e-6"
    assert command_line(["/x/preftune/__main__.py", "rm", "train"]) == \
        "python -m preftune rm train"
    # a resumed run: the command that trains it from the start
    assert command_line(["/venv/bin/preftune", "train", "c.yaml", "--resume"]) == \
        "preftune train c.yaml"
    # a run of several processes: its launcher, which no process's own argv holds
    assert command_line(["/x/preftune/__main__.py", "train", "c.yaml"], processes=2) == \
        "accelerate launch --num_processes 2 -m preftune train c.yaml"
    assert command_line(["/venv/bin/preftune", "train", "c.yaml"], processes=4) == \
        "accelerate launch --num_processes 4 -m preftune train c.yaml"
    assert command_line(["scripts/align.py", "--lr", "1e-6"], processes=2) == \
        "accelerate launch --num_processes 2 scripts/align.py --lr 1e-6"
    # no command to show (python -c, a script on stdin, a notebook kernel, pytest): the one
    # that trains the saved config (the card showed "-c")
    for argv in (["-c"], ["-"], ["/venv/lib/python3.11/site-packages/ipykernel_launcher.py",
                                 "-f", "k.json"], ["/venv/bin/pytest", "-q"],
                 ["/venv/lib/python3.11/site-packages/pytest/__main__.py"]):
        assert command_line(argv, config_run="preftune train run/config.yaml") == \
            "preftune train run/config.yaml", argv


def test_a_tokenizer_without_a_pad_token_is_saved_without_one(tmp_path):
    """Batches pad with EOS, but the saved tokenizer is the base's: a pad token of EOS in it
    would have later tools (a language-modelling collator) mask every EOS as padding."""
    from transformers import AutoTokenizer

    from preftune.api import Config, train

    base = save_tiny_model_dir(tmp_path / "base")
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.pad_token = None
    tokenizer.save_pretrained(base)
    rows = [{"prompt": f"Q{i}: say yes.", "chosen": " yes", "rejected": " no thanks"}
            for i in range(4)]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = train(Config.from_dict({
        "output_dir": str(tmp_path / "run"), "model": {"path": str(base)},
        "data": {"train": str(tmp_path / "pairs.jsonl"), "max_length": 64},
        "reference": {"cache_dir": str(tmp_path / "cache")},
        "train": {"batch_size": 4, "max_steps": 1}}), show_progress=False)
    saved = AutoTokenizer.from_pretrained(run / "model")
    assert (saved.pad_token, saved.eos_token) == (None, "<|im_end|>")
    assert read_metrics(run / "metrics.jsonl")[0]["loss"] == pytest.approx(0.6931, abs=1e-3)
