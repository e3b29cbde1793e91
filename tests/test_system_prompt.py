"""A ``system`` column opens each prompt as its system message: string and message-list
prompts, every record shape, column maps, the chat template's text, online prompts, and the
records that cannot take one."""

import json

import pytest

from preftune.config import build_config
from preftune.data.records import DataError
from preftune.data.sources import load_records
from preftune.data.tokenize import TokenizeSettings, tokenize_records
from preftune.online.config import OnlineConfig
from preftune.online.loop import _prompts
from tiny_models import char_tokenizer

SYSTEM = {"role": "system", "content": "You are terse."}


def write(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def test_string_and_message_prompts_get_the_system_message_in_front(tmp_path):
    data = write(tmp_path / "pairs.jsonl", [
        {"system": "You are terse.", "prompt": "2+2?", "chosen": "4", "rejected": "five"},
        {"system": "", "prompt": "3+3?", "chosen": "6", "rejected": "six"},
        {"system": None, "prompt": "4+4?", "chosen": "8", "rejected": "nine"},
    ])
    records = load_records(data)
    assert records[0].prompt == [SYSTEM, {"role": "user", "content": "2+2?"}]
    # an empty system prompt adds no message, but the prompt is a conversation all the same
    assert [r.prompt for r in records[1:]] == [[{"role": "user", "content": "3+3?"}],
                                               [{"role": "user", "content": "4+4?"}]]
    assert records[0].chosen == "4" and records[0].is_conversational
    chat = write(tmp_path / "chat.jsonl", [
        {"sys": "You are terse.", "prompt": [{"role": "user", "content": "hi"}],
         "responses": ["a", "b"], "scores": [1, 0]}])
    ranked = load_records(chat, fields={"system": "sys"})[0]
    assert ranked.prompt == [SYSTEM, {"role": "user", "content": "hi"}]
    unpaired = write(tmp_path / "kto.jsonl", [
        {"system": "You are terse.", "prompt": "q", "completion": "a", "label": True}])
    assert load_records(unpaired)[0].prompt == [SYSTEM, {"role": "user", "content": "q"}]
    joint = write(tmp_path / "joint.jsonl", [
        {"system": "You are terse.", "chosen_prompt": "p1", "rejected_prompt": "p2",
         "chosen": "a", "rejected": "b"}])
    record = load_records(joint)[0]
    assert (record.chosen_prompt, record.rejected_prompt) == (
        [SYSTEM, {"role": "user", "content": "p1"}], [SYSTEM, {"role": "user", "content": "p2"}])


def test_the_prompt_is_the_chat_templates_text_of_the_system_and_user_turns(tmp_path):
    tokenizer = char_tokenizer()
    data = write(tmp_path / "pairs.jsonl", [
        {"system": "Be brief.", "prompt": "2+2?", "chosen": "4", "rejected": "five"}])
    examples, _ = tokenize_records(load_records(data), tokenizer, TokenizeSettings(512, 256))
    text = tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}],
        add_generation_prompt=True, tokenize=False)
    assert "Be brief." in text
    assert examples[0].prompt_ids == tokenizer.encode(text, add_special_tokens=False)


@pytest.mark.parametrize("rows, message", [
    ([{"system": 3, "prompt": "q", "chosen": "a", "rejected": "b"}],
     "field 'system' \\(system\\) is int 3; a system prompt is a string"),
    ([{"system": "S", "prompt": [{"role": "system", "content": "T"},
                                 {"role": "user", "content": "q"}],
       "chosen": "a", "rejected": "b"}],
     "and the prompt's own system message both set the system prompt"),
    ([{"system": "S", "prompt": "q", "chosen": "a", "rejected": "b"},
      {"prompt": "q", "chosen": "a", "rejected": "b"}],
     "pairs.jsonl:2: field 'system' \\(system\\) is missing, but the first record has one"),
    ([{"prompt": "q", "chosen": "a", "rejected": "b"},
      {"system": "S", "prompt": "q", "chosen": "a", "rejected": "b"}],
     "pairs.jsonl:2: field 'system' \\(system\\) is set, but the first record has none"),
    ([{"system": "S", "chosen": "\n\nHuman: q\n\nAssistant: a",
       "rejected": "\n\nHuman: q\n\nAssistant: b"}], "Human: ...' dialogues"),
])
def test_records_that_cannot_take_a_system_prompt_are_named(tmp_path, rows, message):
    with pytest.raises(DataError, match=message):
        load_records(write(tmp_path / "pairs.jsonl", rows))


def test_a_csv_system_column_stays_text(tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_text("system,prompt,chosen,rejected\n123,q,a,b\n")
    assert load_records(str(path))[0].prompt[0] == {"role": "system", "content": "123"}


def test_online_prompts_carry_the_system_prompt(tmp_path):
    data = write(tmp_path / "prompts.jsonl", [{"persona": "You are terse.", "prompt": "2+2?"}])
    config = build_config({"model": {"path": "unused"}, "output_dir": str(tmp_path / "run"),
                           "data": {"train": data, "fields": {"system": "persona"}},
                           "online": {"scorer": "synthetic"}}, schema=OnlineConfig)
    assert _prompts(data, config)[0].prompt == [SYSTEM, {"role": "user", "content": "2+2?"}]
