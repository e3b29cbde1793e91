import copy

import pytest

from preftune.data.inspect import BOUNDARY, inspect_report, render_example
from preftune.data.records import DataError, Pair, Ranked, Unpaired
from preftune.data.tokenize import TokenizeSettings, tokenize_records

WIDE = TokenizeSettings(max_length=1000, max_prompt_length=None)


def encode(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_string_prompt_gets_bos_and_responses_end_with_eos(tiny_tokenizer):
    tok = tiny_tokenizer
    pair = Pair("say hello", " world", " there", origin="f.jsonl:3", scores={"chosen_score": 1.5})
    (example,), report = tokenize_records([pair], tok, WIDE)
    assert example.prompt_ids == [tok.bos_token_id] + encode(tok, "say hello")
    assert example.response_ids == [encode(tok, " world") + [tok.eos_token_id],
                                    encode(tok, " there") + [tok.eos_token_id]]
    assert (example.index, example.origin, example.scores) == (0, "f.jsonl:3", {"chosen_score": 1.5})
    assert not example.prompt_truncated and not example.response_truncated
    assert report.as_dict() == {
        "records": 1, "kept": 1, "dropped_too_long": 0, "empty_responses": 0, "empty_prompts": 0,
        "prompt_truncated": 0, "response_truncated": 0, "identical_responses": 0,
        "boundary_merges": 0, "joint_pairs": 0, "images": 0, "dropped_image_cut": 0,
        "masked_tokens": 0,
    }


def test_no_merge_across_boundary_even_where_joint_tokenization_would(tiny_tokenizer):
    tok = tiny_tokenizer
    # "hel" + "lo" tokenized as one text becomes the single token "hello"
    assert encode(tok, "say hello") != encode(tok, "say hel") + encode(tok, "lo")
    pair = Pair("say hel", "lo", " world")
    (example,), report = tokenize_records([pair], tok, WIDE)
    assert report.boundary_merges == 1
    assert example.prompt_ids == [tok.bos_token_id] + encode(tok, "say hel")
    assert example.response_ids[0] == encode(tok, "lo") + [tok.eos_token_id]


def test_conversational_prompt_rendered_once_through_chat_template(tiny_tokenizer):
    tok = tiny_tokenizer
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    pair = Pair(messages, [{"role": "assistant", "content": "Paris"}], "Rome<|im_end|>")
    (example,), _ = tokenize_records([pair], tok, WIDE)
    rendered = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert example.prompt_ids == encode(tok, rendered)  # no extra BOS: the template owns it
    assert example.response_ids[0] == encode(tok, "Paris") + [tok.eos_token_id]
    # a response that already ends with eos gets no second one
    assert example.response_ids[1] == encode(tok, "Rome") + [tok.eos_token_id]
    for response in example.response_ids:
        sequence = example.prompt_ids + response
        assert sequence[: len(example.prompt_ids)] == example.prompt_ids


def test_multi_turn_response_is_the_template_continuation(tiny_tokenizer):
    tok = tiny_tokenizer
    prompt = [{"role": "user", "content": "hello"}]
    continuation = [{"role": "assistant", "content": "hello there"},
                    {"role": "user", "content": "say hello"},
                    {"role": "assistant", "content": "hello world"}]
    pair = Pair(prompt, continuation, [{"role": "assistant", "content": "hello"}])
    (example,), _ = tokenize_records([pair], tok, WIDE)
    expected_text = ("hello there<|im_end|>\n<|im_start|>user\nsay hello<|im_end|>\n"
                     "<|im_start|>assistant\nhello world<|im_end|>")
    assert example.response_ids[0] == encode(tok, expected_text)
    assert example.response_ids[0][-1] == tok.eos_token_id


def test_prompt_keeps_end_and_response_keeps_start(tiny_tokenizer):
    tok = tiny_tokenizer
    prompt = "a b c d e f g h i j"
    response = "k l m n o p"
    full_prompt = [tok.bos_token_id] + encode(tok, prompt)
    full_response = encode(tok, response) + [tok.eos_token_id]
    settings = TokenizeSettings(max_length=12, max_prompt_length=8)
    (example,), report = tokenize_records([Pair(prompt, response, "z")], tok, settings)
    assert example.prompt_ids == full_prompt[-8:]
    assert example.response_ids[0] == full_response[:4]
    assert example.response_ids[0][-1] != tok.eos_token_id
    assert example.response_ids[1] == encode(tok, "z") + [tok.eos_token_id]  # fits: untouched
    assert example.prompt_truncated and example.response_truncated
    assert (report.prompt_truncated, report.response_truncated, report.kept) == (1, 1, 1)


def test_prompt_cut_further_so_every_response_keeps_a_token(tiny_tokenizer):
    tok = tiny_tokenizer
    prompt = "a b c d e f g h i j"
    full_prompt = [tok.bos_token_id] + encode(tok, prompt)
    settings = TokenizeSettings(max_length=5, max_prompt_length=None)
    (example,), report = tokenize_records([Pair(prompt, "k l", "m")], tok, settings)
    assert example.prompt_ids == full_prompt[-4:]
    assert example.response_ids == [encode(tok, "k l")[:1], encode(tok, "m")[:1]]
    assert report.prompt_truncated == 1 and report.response_truncated == 1


def test_rows_without_room_are_dropped_and_indices_stay_stable(tiny_tokenizer):
    tok = tiny_tokenizer
    records = [Pair("a", "b", "c"), Pair("d", "e", "f")]
    examples, report = tokenize_records(records, tok, TokenizeSettings(max_length=1,
                                                                       max_prompt_length=None))
    assert examples == [] and report.dropped_too_long == 2 and report.kept == 0

    records = [Pair("a", "b", "   "), Pair("a", "same", "same"), Pair("", "b", "c"),
               Pair("d", "e", "f")]
    records[2] = Pair([{"role": "user", "content": "x"}], "", "y")
    examples, report = tokenize_records(records, tok, WIDE)
    assert [ex.index for ex in examples] == [1, 3]
    assert (report.records, report.kept, report.empty_responses) == (4, 2, 2)
    assert report.identical_responses == 1
    assert examples[0].response_ids[0] == examples[0].response_ids[1]


def test_empty_prompt_without_bos_is_dropped(tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    tok._tokenizer.post_processor = None  # a tokenizer that adds no BOS
    examples, report = tokenize_records([Pair("", "b", "c"), Pair("a", "b", "c")], tok, WIDE)
    assert [ex.index for ex in examples] == [1] and report.empty_prompts == 1
    assert examples[0].prompt_ids == encode(tok, "a")


def test_tokenizer_without_eos_or_template_gives_clear_errors(tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = None
    with pytest.raises(DataError, match=r"f\.jsonl:1: conversational record.*no chat "
                       r"template\. Set model\.chat_template"):
        tokenize_records([Pair([{"role": "user", "content": "x"}], "y", "z", origin="f.jsonl:1")],
                         tok, WIDE)
    tok.eos_token = None
    with pytest.raises(DataError, match="no eos token"):
        tokenize_records([Pair("x", "y", "z")], tok, WIDE)


def test_many_records_cross_encode_chunks(tiny_tokenizer):
    records = [Pair(f"say {i}", f" {i % 7}", "hello") for i in range(2500)]
    examples, report = tokenize_records(records, tiny_tokenizer, WIDE)
    assert report.kept == 2500 and [ex.index for ex in examples] == list(range(2500))
    assert examples[2100].prompt_ids[1:] == encode(tiny_tokenizer, "say 2100")


def test_inspect_report_and_render_example(tiny_tokenizer):
    tok = tiny_tokenizer
    records = [Pair("say hel", "lo", " world", origin="d.jsonl:1"), Pair("a", " ", "c")]
    examples, report = tokenize_records(records, tok, WIDE)
    summary = inspect_report(records, examples, report)
    assert "records read        2" in summary and "empty response    1" in summary
    assert "boundary merges     1" in summary
    text = render_example(examples[0], tok, records[0])
    assert text.count(BOUNDARY) == 2
    assert text.startswith("example 0 (d.jsonl:1)")
    prompt_length = len(examples[0].prompt_ids)
    assert f"chosen: {prompt_length} prompt + 3 response tokens" in text
    assert "'<|im_end|>'  <- eos" in text and "' world'" in text
    # each response is named as its record holds it, not by how many there are
    named = [Ranked("q", ("bad", "good"), (0.0, 1.0)), Pair("q", "a", "b", gold="g"),
             Unpaired("q", "a", False)]
    examples, _ = tokenize_records(named, tok, WIDE)
    shown = [[line.split(":")[0] for line in render_example(ex, tok, record).splitlines()
              if " prompt + " in line] for ex, record in zip(examples, named)]
    assert shown == [["response 0 (score 0)", "response 1 (score 1)"],
                     ["chosen", "rejected", "gold"], ["completion (undesirable)"]]


def test_pairs_that_truncation_makes_identical_are_counted(tiny_tokenizer):
    """(Only texts equal as written were: responses that differ past max_length trained as
    no signal, with identical_responses 0 in data_report.json.)"""
    long = Pair("q", " " + "a " * 40 + "X", " " + "a " * 40 + "Y", origin="f.jsonl:1")
    short = Pair("q", " a", " b", origin="f.jsonl:2")
    examples, report = tokenize_records([long, short], tiny_tokenizer,
                                        TokenizeSettings(max_length=16, max_prompt_length=8))
    assert report.kept == 2 and report.response_truncated == 1
    assert report.identical_responses == 1
    assert report.origins["identical_responses"] == ["f.jsonl:1"]

