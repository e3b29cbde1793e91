"""train.eval_generations: greedy answers to held-out prompts at every evaluation, written per
step, scored, in the eval metrics and the report; the answers are the saved model's own greedy
answers; training is the same with or without them; a resumed run rewrites what it redoes."""

import json

import pytest
import torch
from test_train_loop import (assert_same_weights, crashed_run, losses, resume, run,  # noqa: F401
                             workspace)
from transformers import AutoModelForCausalLM

from preftune.api import write_report
from preftune.config import ConfigError, build_config
from preftune.model.load import load_tokenizer
from preftune.online.config import OnlineConfig
from preftune.train import loop
from preftune.train.logging import read_metrics

pytestmark = pytest.mark.filterwarnings("ignore")
# SFT at a high rate: the tiny model's greedy answers change between the two evaluations
# (a run of digits at step 4, at once EOS at step 8)
ANSWERS = dict(objective={"name": "sft"}, train__learning_rate=2e-2, train__max_steps=8,
               train__eval_every=4, train__eval_generations=3, train__eval_max_new_tokens=8,
               train__eval_scorer="test_eval_generations:digits")


def digits(prompt, response) -> float:
    """A scorer: how many digits the answer has (the data asks for sums)."""
    return float(sum(character.isdigit() for character in response))


def rows_of(output) -> list[dict]:
    path = output / "eval_generations.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def plain_greedy(model, tokenizer, prompt, max_new_tokens) -> tuple[str, int, bool]:
    """transformers' own greedy answer to a chat prompt: (text, tokens up to and with EOS,
    whether it ended with EOS)."""
    ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, return_dict=False)
    out = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id)[0, len(ids):].tolist()
    ended = tokenizer.eos_token_id in out
    if ended:
        out = out[:out.index(tokenizer.eos_token_id) + 1]
    return tokenizer.decode(out, skip_special_tokens=True), len(out), ended


def test_answers_are_the_models_own_greedy_answers_scored_and_logged(workspace):
    output = run(workspace, "answers", **ANSWERS)
    rows = rows_of(output)
    assert [row["step"] for row in rows] == [4, 4, 4, 8, 8, 8]
    assert len({row["origin"] for row in rows}) == 3  # the same three prompts each time
    assert [(r["tokens"], r["ended"]) for r in rows] == [(8, False)] * 3 + [(1, True)] * 3
    model = AutoModelForCausalLM.from_pretrained(output / "model").eval()  # after step 8
    tokenizer = load_tokenizer(str(output / "model"))
    for row in rows[3:]:  # the last evaluation's answers are the saved model's
        assert (row["answer"], row["tokens"], row["ended"]) == plain_greedy(
            model, tokenizer, row["prompt"], 8)
        assert row["score"] == digits(None, row["answer"])
    evaluated = [r for r in read_metrics(output / "metrics.jsonl") if "eval/loss" in r]
    assert [r["step"] for r in evaluated] == [4, 8]
    for record in evaluated:
        mine = [row for row in rows if row["step"] == record["step"]]
        assert record["eval/answer_tokens"] == pytest.approx(sum(r["tokens"] for r in mine) / 3)
        assert record["eval/answer_score"] == pytest.approx(sum(r["score"] for r in mine) / 3)
        assert record["eval/answers_ended"] == pytest.approx(sum(r["ended"] for r in mine) / 3)
    assert evaluated[-1]["eval/answers_empty"] == 1.0  # SFT this hard: every answer is EOS
    alarm = json.loads((output / "alarms.jsonl").read_text().splitlines()[0])
    assert (alarm["kind"], alarm["step"]) == ("answers_empty", 8)
    page = write_report(output).read_text()
    assert "Answers to held-out prompts" in page and "<th>step 4</th><th>step 8</th>" in page
    assert "Greedy answers to held-out prompts: mean length" in page


@pytest.mark.parametrize("setting", [
    {}, {"model__lora": {"r": 4, "alpha": 8}, "train__gradient_checkpointing": True},
    {"train__compile": True}])  # compiled layers: answered eagerly, no recompiles
def test_training_is_the_same_with_or_without_answers(workspace, setting):
    name = "-".join(key.split("__")[-1] for key in setting) or "plain"
    plain = run(workspace, f"no-answers-{name}", objective={"name": "sft"},
                train__learning_rate=2e-2, train__max_steps=8, train__eval_every=4, **setting)
    answered = run(workspace, f"with-answers-{name}", **ANSWERS, **setting)
    assert losses(answered) == losses(plain)
    assert_same_weights(plain, answered, atol=0)


def test_a_resumed_run_rewrites_the_answers_it_redoes(workspace, monkeypatch):
    settings = dict(ANSWERS, train__save_every=4)
    straight = run(workspace, "answers-straight", **settings)
    interrupted = crashed_run(workspace, "answers-interrupted", monkeypatch, 4, **settings)
    stale = {**rows_of(interrupted)[0], "step": 8, "answer": "written after the checkpoint"}
    with (interrupted / "eval_generations.jsonl").open("a") as handle:
        handle.write(json.dumps(stale) + "\n" + json.dumps(stale)[:30])  # and a line cut off
    resume(interrupted)
    assert rows_of(interrupted) == rows_of(straight)


def _tree(workspace, **train):
    return {"output_dir": str(workspace / "runs" / "refused"),
            "model": {"path": str(workspace / "model")},
            "data": {"train": str(workspace / "pairs.jsonl"), "eval_fraction": 0.25},
            "train": train}


@pytest.mark.parametrize("train,message", [
    ({"eval_scorer": "synthetic"}, "train.eval_scorer does nothing without "
                                   "train.eval_generations"),
    ({"eval_max_new_tokens": 32}, "train.eval_max_new_tokens does nothing without"),
    ({"eval_generations": 4}, "train.eval_generations answers held-out prompts at each "
                              "evaluation, and train.eval_every is not set"),
])
def test_settings_that_would_do_nothing_are_refused(workspace, train, message):
    with pytest.raises(ConfigError, match=message):
        build_config(_tree(workspace, **train))


def test_a_scorer_that_cannot_load_stops_the_run_before_training(workspace):
    tree = _tree(workspace, eval_every=2, eval_generations=2, eval_scorer="no_such_module:f")
    tree["output_dir"] = str(workspace / "runs" / "bad-scorer")
    with pytest.raises(ConfigError, match="train.eval_scorer: "):
        loop.train(build_config(tree), show_progress=False)
    assert not (workspace / "runs" / "bad-scorer" / "metrics.jsonl").exists()


def test_online_runs_refuse_them(workspace):
    tree = {**_tree(workspace, eval_every=2, eval_generations=2),
            "online": {"rounds": 1, "scorer": "test_eval_generations:digits"}}
    with pytest.raises(ConfigError, match="train.eval_generations does nothing in an online"):
        build_config(tree, schema=OnlineConfig)
