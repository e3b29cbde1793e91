"""Tool-use records: a record's ``tools`` (function schemas given to the chat template) and
assistant messages with ``tool_calls``: read, checked, rendered by the template exactly as
transformers renders them, trained through the loop; templates that drop them are refused."""

import json
import re
from pathlib import Path

import pytest
from test_train_loop import run

from preftune.config import build_config
from preftune.data.checks import answer_text, load_checker, write_jsonl
from preftune.data.convert import pairs_to_unpaired, ranked_to_pairs
from preftune.data.records import DataError
from preftune.data.sources import load_records
from preftune.data.synthetic import generate_split
from preftune.data.tokenize import TokenizeSettings, tokenize_records
from preftune.online.config import OnlineConfig
from preftune.model.load import load_tokenizer
from preftune.online.common import prompts_to_ids
from preftune.online.loop import _prompts, run_online
from preftune.train.logging import read_metrics
from tiny_models import CHATML_TEMPLATE, char_tokenizer, save_tiny_model_dir

# ChatML that lists the tools in a system turn and writes each call as <call>{function}</call>
TOOL_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTools:{% for t in tools %} {{ t['function']['name'] }}"
    "{% endfor %}<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m.tool_calls is defined and m.tool_calls %}{% for c in m.tool_calls %}"
    "<call>{{ c['function'] | tojson }}</call>{% endfor %}{% else %}{{ m['content'] }}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "today's weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}


def tool_row(city="Paris", tools=(WEATHER,)):
    return {"prompt": [{"role": "user", "content": f"Weather in {city}?"}],
            "chosen": [{"role": "assistant", "tool_calls": [
                {**CALL, "function": {**CALL["function"], "arguments": {"city": city}}}]}],
            "rejected": [{"role": "assistant", "content": "Sunny."}],
            "tools": list(tools)}


def write(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def tool_tokenizer(template=TOOL_TEMPLATE):
    tokenizer = char_tokenizer()
    tokenizer.chat_template = template
    return tokenizer


def test_tools_and_tool_calls_are_read_from_lists_and_json_strings(tmp_path):
    as_string = {**tool_row("Rome"), "tools": json.dumps([WEATHER])}
    records = load_records(write(tmp_path / "tools.jsonl", [tool_row(), as_string]))
    assert [record.tools for record in records] == [(WEATHER,), (WEATHER,)]
    assert records[0].chosen == [{"role": "assistant", "tool_calls": [CALL]}]  # no content
    ranked = {"prompt": tool_row()["prompt"], "tools": [WEATHER],
              "responses": [tool_row()["chosen"], tool_row()["rejected"]], "scores": [1, 0]}
    (pair,) = ranked_to_pairs(load_records(write(tmp_path / "ranked.jsonl", [ranked])),
                              "best_vs_worst")
    assert pair.tools == (WEATHER,)  # conversions keep them
    assert [r.tools for r in pairs_to_unpaired(records[:1])] == [(WEATHER,), (WEATHER,)]


def test_parquet_struct_nulls_do_not_become_arguments_or_schema_keys(tmp_path):
    """Arrow gives a struct column the union of every row's keys: one row's call would carry
    another function's arguments as null. Those nested nulls are dropped; rows read back as
    the JSONL they were written from."""
    pyarrow = pytest.importorskip("pyarrow")
    from pyarrow import parquet

    convert = {"type": "function", "function": {
        "name": "convert", "description": "an amount in another currency",
        "parameters": {"type": "object", "properties": {"amount": {"type": "number"},
                                                        "currency": {"type": "string"}},
                       "required": ["amount"]}}}
    rows = [tool_row("Paris"), {**tool_row(), "tools": [convert], "chosen": [
        {"role": "assistant", "tool_calls": [{"type": "function", "function": {
            "name": "convert", "arguments": {"amount": 3.0, "currency": "EUR"}}}]}]}]
    parquet.write_table(pyarrow.Table.from_pylist(rows), tmp_path / "tools.parquet")
    from_parquet = load_records(str(tmp_path / "tools.parquet"))
    from_jsonl = load_records(write(tmp_path / "tools.jsonl", rows))
    assert [(r.chosen, r.tools) for r in from_parquet] == [(r.chosen, r.tools) for r in from_jsonl]
    assert from_parquet[0].chosen[0]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}


def test_whole_dialogues_whose_prompt_holds_a_tool_call_are_stripped_of_it(tmp_path):
    """format implicit with a prompt column: the dialogues repeat a prompt in which the
    assistant called a tool (a message with no text); it is checked and stripped like any."""
    asked = [{"role": "user", "content": "Weather in Paris?"},
             {"role": "assistant", "tool_calls": [CALL]},
             {"role": "tool", "content": "18C"}]
    row = {"prompt": asked, "tools": [WEATHER],
           "chosen": [*asked, {"role": "assistant", "content": "Mild."}],
           "rejected": [*asked, {"role": "assistant", "content": "Cold."}]}
    (pair,) = load_records(write(tmp_path / "d.jsonl", [row]), format="implicit")
    assert (pair.prompt, pair.chosen, pair.rejected) == (
        asked, [{"role": "assistant", "content": "Mild."}],
        [{"role": "assistant", "content": "Cold."}])
    other = {**CALL, "function": {**CALL["function"], "arguments": {"city": "Rome"}}}
    row["rejected"][1] = {"role": "assistant", "tool_calls": [other]}  # not the prompt's call
    with pytest.raises(DataError, match=r"d\.jsonl:1: field 'rejected' should repeat the prompt "
                                        r"\(a whole dialogue\), but its message 1 has assistant: "
                                        r'calls get_weather\(\{"city": "Rome"\}\) where \'prompt\' '
                                        r'has assistant: calls get_weather\(\{"city": "Paris"'):
        load_records(write(tmp_path / "d.jsonl", [row]), format="implicit")


@pytest.mark.parametrize("change,message", [
    ({"tools": "[{not json"}, "tools.jsonl:1: field 'tools' (tools): a string that is not JSON"),
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]},
     "tools.jsonl:1: field 'tools' (tools), item 0: expected {\"type\": \"function\""),
    ({"tools": []}, "field 'tools' (tools): expected a non-empty list of function schemas"),
    ({"chosen": [{"role": "assistant", "tool_calls": [{"function": {"arguments": {}}}]}]},
     "tools.jsonl:1: field 'chosen', message 0: tool call 0: expected"),
    ({"chosen": [{"role": "assistant", "tool_calls": "get_weather(Paris)"}]},
     "field 'chosen', message 0: 'tool_calls' must be a non-empty list of calls"),
    ({"prompt": "Weather in Paris?", "chosen": "call it", "rejected": "Sunny."},
     "tools are written into the prompt by the chat template, which needs a message-list"),
])
def test_bad_tools_name_the_file_record_and_field(tmp_path, change, message):
    with pytest.raises(DataError, match=_literal(message)):
        load_records(write(tmp_path / "tools.jsonl", [{**tool_row(), **change}]))


def _literal(text):
    return re.escape(text)


def test_the_template_writes_the_tools_into_the_prompt_and_the_call_is_the_response(tmp_path):
    tokenizer = tool_tokenizer()
    records = load_records(write(tmp_path / "tools.jsonl", [tool_row()]))
    (example,), _ = tokenize_records(records, tokenizer, TokenizeSettings(512, 256))
    row = tool_row()
    prompt_text = tokenizer.apply_chat_template(row["prompt"], tools=[WEATHER], tokenize=False,
                                                add_generation_prompt=True)
    full = tokenizer.apply_chat_template(row["prompt"] + row["chosen"], tools=[WEATHER],
                                         tokenize=False)
    assert prompt_text.startswith("<|im_start|>system\nTools: get_weather<|im_end|>\n")
    assert example.prompt_ids == tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    call = ('<call>{"name": "get_weather", "arguments": {"city": "Paris"}}</call><|im_end|>')
    assert full[len(prompt_text):] == call + "\n"
    assert tokenizer.decode(example.response_ids[0]) == call  # ends at the end of the turn
    assert tokenizer.decode(example.response_ids[1]) == "Sunny.<|im_end|>"


@pytest.mark.parametrize("template,message", [
    (CHATML_TEMPLATE, "field 'tools': the chat template writes the same prompt with and "
                      "without them"),
    (TOOL_TEMPLATE.replace("{% if tools %}", "{% if false %}"),
     "field 'tools': the chat template writes the same prompt"),
    (TOOL_TEMPLATE.replace("m.tool_calls is defined and m.tool_calls", "false"),
     "the chat template leaves out the tool call to 'get_weather'"),
])
def test_templates_that_drop_tools_or_calls_are_refused(tmp_path, template, message):
    records = load_records(write(tmp_path / "tools.jsonl", [tool_row()]))
    with pytest.raises(DataError, match=_literal("tools.jsonl:1: ") + ".*" + _literal(message)):
        tokenize_records(records, tool_tokenizer(template), TokenizeSettings(512, 256))


def test_a_template_that_leaves_out_tool_results_is_refused(tmp_path):
    """(The answer after a dropped tool result trained without what it answers, unnamed.)"""
    row = tool_row()
    row["chosen"] = row["chosen"] + [{"role": "tool", "content": "18C and rain"},
                                     {"role": "assistant", "content": "Rainy."}]
    records = load_records(write(tmp_path / "results.jsonl", [row]))
    dropping = TOOL_TEMPLATE.replace("{% for m in messages %}",
                                     "{% for m in messages if m['role'] != 'tool' %}")
    with pytest.raises(DataError, match=_literal("results.jsonl:1: the chat template leaves out "
                                                 "the 'tool' message's content (a tool's "
                                                 "result)")):
        tokenize_records(records, tool_tokenizer(dropping), TokenizeSettings(512, 256))
    examples, _ = tokenize_records(records, tool_tokenizer(), TokenizeSettings(512, 256))
    assert len(examples) == 1


def test_on_error_skip_leaves_out_what_the_chat_template_refuses(tmp_path):
    """data.on_error: skip covers records refused as they are rendered too (a tools record
    whose template ignores the tools), not only records refused as they are read."""
    from preftune.config import DataConfig
    from preftune.data.prepare import prepare_examples

    plain = [{"prompt": [{"role": "user", "content": f"Hi {i}"}],
              "chosen": [{"role": "assistant", "content": "Hello"}],
              "rejected": [{"role": "assistant", "content": "Go"}]} for i in range(4)]
    path = write(tmp_path / "mixed.jsonl", [*plain[:3], tool_row(), plain[3]])
    tokenizer = tool_tokenizer(CHATML_TEMPLATE)  # writes no tools
    config = DataConfig(train=path, max_length=256, max_prompt_length=128)
    with pytest.raises(DataError, match=_literal(f"{path}:4: field 'tools'")):
        prepare_examples(config, tokenizer, seed=0)
    train, _, report, _ = prepare_examples(config.model_copy(update={"on_error": "skip"}),
                                           tokenizer, seed=0)
    assert [example.index for example in train] == [0, 1, 2, 4]  # record 3 left out
    assert report["skipped_rows"]["count"] == 1
    assert report["skipped_rows"]["reasons"][0].startswith(f"{path}:4: field 'tools'")


def test_tool_use_pairs_train_through_the_loop(tmp_path):
    save_tiny_model_dir(tmp_path / "model")  # the layout run() expects: model/, pairs.jsonl
    write(tmp_path / "pairs.jsonl", [tool_row(city) for city in ("Paris", "Rome", "Oslo",
                                                                 "Lima")] * 2)
    template = tmp_path / "tools.jinja"
    template.write_text(TOOL_TEMPLATE)
    output = run(tmp_path, "tool-pairs", data__eval_fraction=0.0,
                 model__chat_template=str(template), train__batch_size=4, train__max_steps=2)
    values = [r["loss"] for r in read_metrics(output / "metrics.jsonl")]
    assert values[0] == pytest.approx(0.6931472, abs=1e-6) and len(values) == 2
    assert values[1] != pytest.approx(values[0], abs=1e-4)  # it learns from the calls


OFFERED = []  # the tools each call of offered_a gets with its prompt


def offered_a(prompt, response):
    """``test_online_loop:count_a`` that also records the tools its prompt offers."""
    OFFERED.append(tuple(getattr(prompt, "tools", ())))
    return float(response.count("a"))


@pytest.mark.parametrize("mode", ["rounds", "per_step"])
def test_online_runs_sample_with_the_tools_and_train_on_them(tmp_path, mode):
    """Online prompts with tools: sampled from the prompt as the template writes it with its
    tools, scored with the tools at hand (``prompt.tools``), and the pairs built keep the tools
    for training."""
    save_tiny_model_dir(tmp_path / "model", seed=1)
    rows = [{"prompt": tool_row(city)["prompt"], "tools": [WEATHER]}
            for city in ("Paris", "Rome", "Oslo", "Lima")]
    data = write(tmp_path / "prompts.jsonl", rows)
    template = tmp_path / "tools.jinja"
    template.write_text(TOOL_TEMPLATE)
    online = {"scorer": "test_tool_data:offered_a", "eval_max_new_tokens": 8,
              "sampling": {"samples": 4, "max_new_tokens": 10, "batch_size": 4}}
    online.update({"rounds": 1} if mode == "rounds" else {"mode": "per_step"})
    config = build_config({
        "output_dir": str(tmp_path / "run"),
        "model": {"path": str(tmp_path / "model"), "chat_template": str(template)},
        "data": {"train": data, "eval": data, "max_length": 96, "max_prompt_length": 64},
        "objective": {"name": "dpo"},
        "train": {"learning_rate": 1e-3, "batch_size": 2, "max_steps": 2, "seed": 0,
                  "warmup_ratio": 0.0},
        "online": online}, schema=OnlineConfig)
    tokenizer = load_tokenizer(str(tmp_path / "model"), chat_template=TOOL_TEMPLATE)
    (prompt,) = _prompts(data, config)[:1]
    assert prompt.tools == (WEATHER,)
    expected = tokenizer.apply_chat_template(rows[0]["prompt"], tools=[WEATHER],
                                             add_generation_prompt=True, return_dict=False)
    assert prompts_to_ids([prompt], tokenizer, config) == [expected]
    OFFERED.clear()
    run_online(config)
    # every sample and every held-out answer was scored with the prompt's tools at hand
    assert OFFERED and all(tools == (WEATHER,) for tools in OFFERED)
    here = tmp_path / "run" / "round-1"
    samples = [json.loads(line) for line in (here / "samples.jsonl").read_text().splitlines()]
    pairs = [json.loads(line) for line in (here / "pairs.jsonl").read_text().splitlines()]
    assert samples and all(row["tools"] == [WEATHER] for row in samples)
    assert pairs and all(row["tools"] == [WEATHER] for row in pairs)
    assert len(read_metrics(here / "metrics.jsonl")) == 2


def test_the_shipped_tools_template_writes_calls_the_tool_call_checker_reads(tmp_path):
    """examples/chat_templates/chatml_tools.jinja and `preftune data synthetic --families
    tool_call`: every chosen call, as the template writes it, passes its record's checker, and
    every rejected answer (prose, or the wrong call) fails it; without tools the template
    writes what SmolLM2's own does (a system turn, then ChatML)."""
    template = (Path(__file__).parents[1] / "examples" / "chat_templates" /
                "chatml_tools.jinja").read_text()
    tokenizer = tool_tokenizer(template)
    train, _ = generate_split(24, 6, seed=3, families=["tool_call"], hard_negatives=0.5)
    records = load_records(write_jsonl(train, tmp_path / "calls.jsonl"))
    examples, _ = tokenize_records(records, tokenizer, TokenizeSettings(4096, 3000))
    assert len(examples) == 24 and {task.negative for task in train} == {"bare", "chatty"}
    rows = [json.loads(line) for line in (tmp_path / "calls.jsonl").read_text().splitlines()]
    for example, row, task in zip(examples, rows, train):
        check = load_checker(row)
        chosen, rejected = (tokenizer.decode(ids, skip_special_tokens=True)
                            for ids in example.response_ids)
        assert chosen == answer_text(task.chosen) and check(chosen)
        assert rejected == answer_text(task.rejected) and not check(rejected)
    plain = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    assert tokenizer.apply_chat_template(plain, tokenize=False) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
        "Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello"
        "<|im_end|>\n")
    # a message with text and a call keeps both (the text was dropped)
    both = [{"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": "Let me look.", "tool_calls": [CALL]}]
    assert tokenizer.apply_chat_template(both, tokenize=False).endswith(
        '<|im_start|>assistant\nLet me look.\n<tool_call>{"name": "get_weather", "arguments": '
        '{"city": "Paris"}}</tool_call><|im_end|>\n')


def test_preftune_eval_scores_answers_with_the_prompts_tools_at_hand(tmp_path):
    from preftune.api import evaluate

    save_tiny_model_dir(tmp_path / "model")
    data = write(tmp_path / "pairs.jsonl", [tool_row(city) for city in ("Paris", "Rome")])
    template = tmp_path / "tools.jinja"
    template.write_text(TOOL_TEMPLATE)
    OFFERED.clear()
    evaluate(str(tmp_path / "model"), data, reference=str(tmp_path / "model"), samples=0,
             scorer="test_tool_data:offered_a", chat_template=str(template), max_new_tokens=4,
             output=str(tmp_path / "eval"))
    assert OFFERED and all(tools == (WEATHER,) for tools in OFFERED)


def test_answers_during_training_are_scored_with_the_prompts_tools_at_hand(tmp_path):
    save_tiny_model_dir(tmp_path / "model")
    write(tmp_path / "pairs.jsonl", [tool_row(city) for city in ("Paris", "Rome", "Oslo",
                                                                 "Lima")])
    template = tmp_path / "tools.jinja"
    template.write_text(TOOL_TEMPLATE)
    OFFERED.clear()
    run(tmp_path, "answers", data__eval_fraction=0.5, model__chat_template=str(template),
        train__batch_size=2, train__max_steps=1, train__eval_every=1,
        train__eval_generations=2, train__eval_max_new_tokens=4,
        train__eval_scorer="test_tool_data:offered_a")
    assert len(OFFERED) == 2 and all(tools == (WEATHER,) for tools in OFFERED)


def test_a_reward_model_scorer_is_handed_the_prompts_tools():
    """(rm: built its records without the tools, so the model scored a prompt it was never
    trained on: the template wrote no tools.)"""
    from types import SimpleNamespace

    import torch

    from preftune.score.base import scorer_prompt
    from preftune.score.reward_model import RewardModelScorer

    seen = []

    def outputs(records):
        seen.extend(records)
        return [torch.zeros(2, 1) for _ in records]

    head = SimpleNamespace(has_reward=True, reward=lambda o: o.sum(),
                           preference_logit=lambda a, b: (a - b).sum())
    scorer = RewardModelScorer(SimpleNamespace(head=head, outputs=outputs,
                                               tokenizer=SimpleNamespace()), "rm:x")
    prompt = scorer_prompt([{"role": "user", "content": "Weather in Paris?"}], tools=(WEATHER,))
    scorer.score([prompt], ["Sunny."])
    scorer.prefer([prompt], ["Sunny."], ["Rainy."])
    assert [record.tools for record in seen] == [(WEATHER,), (WEATHER,)]
