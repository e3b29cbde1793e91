"""``preftune rm train --plan``: the reward model's memory estimate against the tensor bytes a
real run peaks at (the CPU allocator's count, as in test_plan.py), for a decoder backbone in
its layouts and settings and for an encoder; and a plan writes nothing."""

import json

import pytest
import torch
from common import PhaseMemory
from test_plan import planned_total, save_model
from transformers import (BertConfig, BertModel, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                          LlamaForCausalLM)

import preftune.reward.train as rm_train
from preftune.cli import main
from preftune.reward.config import RewardConfig
from tiny_models import char_tokenizer, save_tiny_encoder_dir


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return rm_plan_workspace(tmp_path_factory.mktemp("rm-plan"))


def rm_plan_workspace(root):
    """A 3M-parameter Llama, a GPT-2 (whose MLP is not gated) and a BERT saved in fp32 (trained
    in bf16, so loading allocates their weights), and 16 pairs of one length, so the plan's
    worst micro-batch is every micro-batch."""
    save_model(root / "decoder", LlamaConfig, LlamaForCausalLM)
    tokenizer = char_tokenizer()
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=256, n_inner=1024, n_layer=4,
                               n_head=4, bos_token_id=1, eos_token_id=2,
                               pad_token_id=0)).save_pretrained(root / "gpt2")
    tokenizer.save_pretrained(root / "gpt2")
    encoder = save_tiny_encoder_dir(root / "encoder")
    config = BertConfig.from_pretrained(encoder)
    config.update({"hidden_size": 256, "intermediate_size": 704, "num_hidden_layers": 4})
    BertModel(config).save_pretrained(encoder)
    rows = [{"prompt": f"question {i:02d} " + "abcd " * 20, "chosen": "yes " * 6,
             "rejected": "no " * 7 + "n"} for i in range(16)]
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def config_of(workspace, name: str, path: str = "decoder", model=None, **train):
    """Two bf16 steps of 8 pairs, with ``train`` (and ``model``) settings on top."""
    return RewardConfig.from_dict({
        "output_dir": str(workspace / name),
        "model": {"path": str(workspace / path), "dtype": "bfloat16", **(model or {})},
        "data": {"train": str(workspace / "pairs.jsonl"), "eval_fraction": 0},
        "train": {"batch_size": 8, "max_steps": 2, "seed": 0, **train}})


def plan_of(workspace, capsys, path="decoder", **train) -> str:
    rm_train.train_reward_model(config_of(workspace, "planned", path, **train), plan_only=True,
                                show_progress=False)
    return capsys.readouterr().out


def test_plan_names_what_the_reward_model_reads_and_writes_nothing(workspace, capsys):
    printed = plan_of(workspace, capsys)
    assert "reward loss        bt (scalar head)" in printed
    assert "the last token of each response (decoder)" in printed
    assert "layout             prefix_shared (chosen automatically)" in printed
    assert "worst micro-batch  8 rows x 160 tokens" in printed
    assert "reference" not in printed and "output backward" not in printed
    assert main(["rm", "train", "--plan", "--set", f"model.path={workspace / 'encoder'}",
                 "--set", f"data.train={workspace / 'pairs.jsonl'}", "--set",
                 f"output_dir={workspace / 'planned'}"]) == 0
    encoder = capsys.readouterr().out
    assert "padded (prompt, response) row (encoder)" in encoder
    assert "worst micro-batch  16 rows x " in encoder  # a row per response
    assert not (workspace / "planned").exists()


@pytest.mark.parametrize("path, train", [
    pytest.param("decoder", {}, id="decoder"),
    pytest.param("decoder", {"gradient_checkpointing": True}, id="decoder-checkpointing"),
    pytest.param("decoder", {"layout": "padded"}, id="decoder-padded"),
    pytest.param("decoder", {"model": {"lora": {"r": 16, "alpha": 32}}}, id="decoder-lora"),
    pytest.param("gpt2", {}, id="gpt2"),
    pytest.param("encoder", {}, id="encoder"),
])
def test_plan_total_is_within_a_few_percent_of_the_measured_peak(workspace, path, train,
                                                                capsys, monkeypatch):
    monkeypatch.setenv("HF_DEACTIVATE_ASYNC_LOAD", "1")  # weights load on this thread: counted
    planned = planned_total(plan_of(workspace, capsys, path, **train))
    measured = measured_peak(workspace, path, train, PhaseMemory("tensors"), monkeypatch)
    assert planned == pytest.approx(measured, rel=0.05)


def measured_peak(workspace, path: str, train: dict, memory, monkeypatch) -> float:
    """The peak (MiB, as ``memory`` counts it) of a real run of the ``path`` backbone with
    ``train`` settings, once it trains."""
    trainer = rm_train.Trainer

    def then_train(*args, **kwargs):
        memory.enter("train")
        return trainer(*args, **kwargs)

    monkeypatch.setattr(rm_train, "Trainer", then_train)
    name = f"measured-{path}-" + "-".join(map(str, train.values())).replace("'", "").replace(
        " ", "")
    rm_train.train_reward_model(config_of(workspace, name, path, **train), show_progress=False)
    return memory.stop()["train"]
