"""Tool results inside a multi-turn response (call, result, answer) are context the model did
not write: they stay in the sequence but their tokens are left out of log-probs, in every
layout; ``data.mask_roles: []`` scores them as before."""

import json

import pytest
import torch

from preftune.data.layout import collate
from preftune.data.records import DataError, Pair
from preftune.data.tokenize import TokenizeSettings, tokenize_records
from preftune.model.forward import LogpModel, sequence_stats
from preftune.model.reference import reference_cache_key
from test_tool_data import CALL, TOOL_TEMPLATE, WEATHER, tool_tokenizer
from tiny_models import tiny_llama

RESULT = {"role": "tool", "content": "18C and rain"}


def multi_turn_pair(city="Paris"):
    call = {"role": "assistant", "tool_calls": [
        {**CALL, "function": {**CALL["function"], "arguments": {"city": city}}}]}
    return Pair([{"role": "user", "content": f"Weather in {city}?"}],
                [call, RESULT, {"role": "assistant", "content": "Rainy, 18C."}],
                [{"role": "assistant", "content": "Sunny."}], origin=f"{city} pair",
                tools=(WEATHER,))


def tokenized(roles=("tool",), records=None):
    tokenizer = tool_tokenizer()
    records = records or [multi_turn_pair(), multi_turn_pair("Rome")]
    examples, _ = tokenize_records(records, tokenizer, TokenizeSettings(512, 256, roles))
    return examples, tokenizer


def test_the_tool_results_tokens_and_only_they_are_masked():
    (example, _), tokenizer = tokenized()
    chosen, mask = example.response_ids[0], example.response_masks[0]
    left_out = tokenizer.decode([t for t, keep in zip(chosen, mask) if not keep])
    assert left_out == "<|im_start|>tool\n18C and rain<|im_end|>\n"  # the tool turn, whole
    kept = tokenizer.decode([t for t, keep in zip(chosen, mask) if keep])
    assert kept.startswith("<call>") and kept.endswith("<|im_start|>assistant\nRainy, 18C.<|im_end|>")
    assert example.response_masks[1] == (True,) * len(example.response_ids[1])  # one turn
    unmasked, _ = tokenized(roles=())
    assert unmasked[0].response_masks == () and unmasked[0].response_ids == example.response_ids


def test_a_users_turns_inside_a_response_are_left_out_with_user_in_mask_roles():
    follow_up = Pair([{"role": "user", "content": "2+2?"}],
                     [{"role": "assistant", "content": "4"}, {"role": "user", "content": "x2?"},
                      {"role": "assistant", "content": "8"}], "5", origin="dialogue")
    (example,), tokenizer = tokenized(roles=("tool", "user"), records=[follow_up])
    chosen, mask = example.response_ids[0], example.response_masks[0]
    assert tokenizer.decode([t for t, keep in zip(chosen, mask) if not keep]) == (
        "<|im_start|>user\nx2?<|im_end|>\n")
    (scored,), _ = tokenized(records=[follow_up])  # by default a user's turn is scored
    assert scored.response_masks == () and scored.response_ids == example.response_ids


# Qwen2.5's way with parallel calls: consecutive tool results share one user turn
GROUPED_RESULTS = (
    "{% for m in messages %}{% if m['role'] == 'tool' %}"
    "{% if loop.first or messages[loop.index0 - 1]['role'] != 'tool' %}<|im_start|>user"
    "{% endif %}{{ '\\n' }}<result>{{ m['content'] }}</result>"
    "{% if loop.last or messages[loop.index0 + 1]['role'] != 'tool' %}<|im_end|>\n{% endif %}"
    "{% elif m.tool_calls is defined and m.tool_calls %}<|im_start|>assistant\n"
    "{% for c in m.tool_calls %}<call>{{ c['function']['arguments']['city'] }}</call>"
    "{% endfor %}<|im_end|>\n"
    "{% else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def parallel_pair():
    calls = {"role": "assistant", "tool_calls": [
        {**CALL, "function": {**CALL["function"], "arguments": {"city": city}}}
        for city in ("Paris", "Rome")]}
    return Pair([{"role": "user", "content": "Weather in Paris and Rome?"}],
                [calls, {"role": "tool", "content": "rain"}, {"role": "tool", "content": "sun"},
                 {"role": "assistant", "content": "Rain, then sun."}],
                [{"role": "assistant", "content": "Sunny."}], origin="parallel pair")


def test_parallel_tool_results_written_as_one_turn_are_left_out_whole():
    tokenizer = tool_tokenizer(GROUPED_RESULTS)
    (example,), _ = tokenize_records([parallel_pair()], tokenizer,
                                     TokenizeSettings(512, 256, ("tool",)))
    chosen, mask = example.response_ids[0], example.response_masks[0]
    assert tokenizer.decode([t for t, keep in zip(chosen, mask) if not keep]) == (
        "<|im_start|>user\n<result>rain</result>\n<result>sun</result><|im_end|>\n")
    assert tokenizer.decode([t for t, keep in zip(chosen, mask) if keep]) == (
        "<call>Paris</call><call>Rome</call><|im_end|>\n<|im_start|>assistant\n"
        "Rain, then sun.<|im_end|>")


def test_a_template_that_rewrites_an_answer_once_a_result_follows_is_refused():
    # as Qwen3 does: the last answer gets a reasoning block, so the call renders otherwise
    # while it is the last message than once its result follows
    rewrites = GROUPED_RESULTS.replace(
        "<|im_start|>assistant\n{% for c", "<|im_start|>assistant\n"
        "{% if loop.last %}<think></think>{% endif %}{% for c")
    with pytest.raises(DataError, match="parallel pair: the chat template renders the dialogue "
                                        "before the 'tool' message of a response differently"):
        tokenize_records([parallel_pair()], tool_tokenizer(rewrites),
                         TokenizeSettings(512, 256, ("tool",)))


@pytest.mark.parametrize("layout", ["padded", "prefix_shared", "packed", "packed_prefix_shared"])
def test_masked_tokens_are_left_out_of_the_log_probs_in_every_layout(layout):
    """Each response's log-prob is the sum over its scored tokens of log p(token | everything
    before it, tool result included), computed here by a plain forward of each sequence."""
    examples, tokenizer = tokenized()
    model = tiny_llama(vocab_size=len(tokenizer), seed=1).eval()
    batch = collate(examples, tokenizer.pad_token_id, layout)
    with torch.no_grad():
        stats = sequence_stats(LogpModel(model)(batch), batch, per_token=True)
    for e, example in enumerate(examples):
        for r, response in enumerate(example.response_ids):
            ids = torch.tensor([example.prompt_ids + response])
            with torch.no_grad():
                logps = model(ids).logits.log_softmax(-1)[0, :-1].gather(
                    1, ids[0, 1:, None])[:, 0][len(example.prompt_ids) - 1:]
            mask = torch.tensor(example.response_masks[r])
            torch.testing.assert_close(stats.logps[e, r], logps[mask].sum(), rtol=1e-5,
                                       atol=1e-5)
            assert stats.token_counts[e, r].item() == mask.sum().item()
            count = int(mask.sum())
            torch.testing.assert_close(stats.token_logps[e, r, :count], logps[mask],
                                       rtol=1e-5, atol=1e-5)
    assert batch.response_lengths.tolist()[0] < len(examples[0].response_ids[0])


def test_the_reference_cache_key_changes_with_the_masks():
    masked, _ = tokenized()
    plain, _ = tokenized(roles=())
    model = tiny_llama(vocab_size=120)
    assert reference_cache_key(model, masked, {}) != reference_cache_key(model, plain, {})


def test_a_run_trains_with_masked_tool_results(tmp_path):
    from test_tool_data import write
    from test_train_loop import run
    from tiny_models import save_tiny_model_dir

    save_tiny_model_dir(tmp_path / "model")
    rows = []
    for city in ("Paris", "Rome", "Oslo", "Lima"):
        pair = multi_turn_pair(city)
        rows.append({"prompt": pair.prompt, "chosen": pair.chosen, "rejected": pair.rejected,
                     "tools": [WEATHER]})
    write(tmp_path / "pairs.jsonl", rows * 2)
    template = tmp_path / "tools.jinja"
    template.write_text(TOOL_TEMPLATE)
    output = run(tmp_path, "masked", data__eval_fraction=0.0, train__batch_size=4,
                 model__chat_template=str(template), train__max_steps=2)
    assert json.loads((output / "run.json").read_text())["steps"] == 2
    tool_turn = len(tool_tokenizer().encode("<|im_start|>tool\n18C and rain<|im_end|>\n",
                                            add_special_tokens=False))  # 20 tokens
    report = json.loads((output / "data_report.json").read_text())["train"]
    assert report["masked_tokens"] == 8 * tool_turn  # each of the 8 chosen responses
    # eval scores the tokens each run trained on: its data.mask_roles (it took the default)
    from preftune.cli import main

    unmasked = run(tmp_path, "unmasked", data__eval_fraction=0.0, train__batch_size=4,
                   model__chat_template=str(template), train__max_steps=1,
                   data__mask_roles=[])
    counted = {}
    for name in ("masked", "unmasked"):
        assert main(["eval", "--model", str(tmp_path / "runs" / name), "--data",
                     str(tmp_path / "pairs.jsonl"), "--samples", "0", "--output",
                     str(tmp_path / f"eval-{name}")]) == 0
        rows = (tmp_path / f"eval-{name}" / "eval_pairs.jsonl").read_text().splitlines()
        counted[name] = json.loads(rows[0])["tokens_chosen"]
    assert unmasked.name == "unmasked" and counted["unmasked"] == counted["masked"] + tool_turn


def test_data_inspect_marks_the_tokens_left_out():
    from preftune.data.inspect import render_example

    (example, _), tokenizer = tokenized()
    lines = render_example(example, tokenizer, multi_turn_pair()).splitlines()
    left_out = sum(not keep for keep in example.response_masks[0])
    assert left_out == 20
    assert sum(line.endswith("  (not scored)") for line in lines) == left_out
    assert (f"  ({left_out} of them tool output, marked '(not scored)': context, left out of "
            "the loss; data.mask_roles)") in lines


@pytest.mark.parametrize("roles, near", [("[tools]", "tool"), ("[Function]", "function")])
def test_a_misspelt_masked_role_is_refused_with_the_one_meant(roles, near):
    from preftune.config import ConfigError, load_config
    with pytest.raises(ConfigError, match=rf"data.mask_roles: .* did you mean {near!r}"):
        load_config(None, [f"data.mask_roles={roles}"])
    assert load_config(None, ["data.mask_roles=[tool, user]"]).data.mask_roles == ["tool", "user"]
