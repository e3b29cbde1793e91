"""Joint preference pairs (chosen_prompt / rejected_prompt) and the DOVE objective.

Reading (both text formats, files that mix joint and conditional pairs, errors), tokenization
(shared token prefix, each side's own prompt scored with its response, truncation), and the loss:
preftune's path through every layout against the paper's formula on whole sequences, computed
here with plain transformers forwards; then three real training steps.
"""

import json
import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from preftune.config import build_config
from preftune.data.convert import pairs_to_unpaired
from preftune.data.inspect import BOUNDARY, OWN_PROMPT, inspect_report, render_example
from preftune.data.layout import LAYOUTS, collate
from preftune.data.records import DataError, JointPair, Pair
from preftune.data.sources import load_records
from preftune.data.tokenize import TokenizeSettings, tokenize_records
from preftune.model.forward import LogpModel, sequence_stats
from preftune.objectives import ObjectiveInputs, get_objective
from preftune.objectives.joint import DOVEParams
from preftune.train import loop
from preftune.train.logging import read_metrics
from tiny_models import char_tokenizer, save_tiny_model_dir, tiny_llama

WIDE = TokenizeSettings(max_length=1000, max_prompt_length=None)


def user(text):
    return [{"role": "user", "content": text}]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def encode(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def load_error(path, **kwargs) -> str:
    with pytest.raises(DataError) as error:
        load_records(path, **kwargs)
    return str(error.value)


# ---- reading ----


def test_standard_joint_pair_with_scores(tmp_path):
    path = write_jsonl(tmp_path / "j.jsonl", [
        {"chosen_prompt": "Name a fruit", "rejected_prompt": "Name a car", "chosen": "pear",
         "rejected": "dog", "weight": 2.0, "note": "text is not a score"},
    ])
    (record,) = load_records(path)
    assert isinstance(record, JointPair) and record.shape == "pairs"
    assert record.prompts == ("Name a fruit", "Name a car")
    assert record.responses == ("pear", "dog")
    assert (record.origin, record.scores) == (f"{path}:1", {"weight": 2.0})
    assert not record.is_conversational


def test_conversational_joint_pair(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [
        {"chosen_prompt": user("2+2?"), "rejected_prompt": user("Capital of France?"),
         "chosen": [{"role": "assistant", "content": "4"}], "rejected": "Rome"},
    ])
    (record,) = load_records(path)
    assert record.is_conversational
    assert record.prompts == (user("2+2?"), user("Capital of France?"))
    assert record.responses == ([{"role": "assistant", "content": "4"}], "Rome")


def test_file_mixes_joint_and_conditional_pairs(tmp_path):
    rows = [{"prompt": "2+2?", "chosen": "4", "rejected": "5"},
            {"chosen_prompt": "2+2?", "rejected_prompt": "3+3?", "chosen": "4", "rejected": "7"},
            {"prompt": "1+1?", "chosen": "2", "rejected": "3"}]
    records = load_records(write_jsonl(tmp_path / "m.jsonl", rows))
    assert [type(r) for r in records] == [Pair, JointPair, Pair]
    joint_first = load_records(write_jsonl(tmp_path / "f.jsonl", rows[1:]))  # format from it
    assert [type(r) for r in joint_first] == [JointPair, Pair]
    # a columnar file has every column on every row: null means absent
    columns = ("prompt", "chosen_prompt", "rejected_prompt", "chosen", "rejected")
    table = pa.Table.from_pylist([{name: row.get(name) for name in columns} for row in rows])
    pq.write_table(table, tmp_path / "m.parquet")
    assert load_records(str(tmp_path / "m.parquet")) == [
        Pair("2+2?", "4", "5", origin=f"{tmp_path / 'm.parquet'}:record 0"),
        JointPair("2+2?", "3+3?", "4", "7", origin=f"{tmp_path / 'm.parquet'}:record 1"),
        Pair("1+1?", "2", "3", origin=f"{tmp_path / 'm.parquet'}:record 2"),
    ]


def test_joint_prompt_columns_can_be_renamed_and_stay_text_in_csv(tmp_path):
    path = tmp_path / "r.csv"
    path.write_text("good_q,bad_q,good,bad,weight\n12,13,yes,no,0.5\n")
    (record,) = load_records(str(path), fields={"chosen_prompt": "good_q",
                                                "rejected_prompt": "bad_q",
                                                "chosen": "good", "rejected": "bad"})
    assert record == JointPair("12", "13", "yes", "no", origin=f"{path}:2",
                               scores={"weight": 0.5})


@pytest.mark.parametrize("rows,fields,expected", [
    ([{"chosen_prompt": "a", "chosen": "c", "rejected": "r"}],
     "'rejected_prompt' (rejected_prompt) is missing, but 'chosen_prompt'", "needs both"),
    ([{"chosen_prompt": None, "rejected_prompt": "b", "chosen": "c", "rejected": "r"}],
     "'chosen_prompt' (chosen_prompt) is empty (null), but 'rejected_prompt'", "needs both"),
    ([{"prompt": "p", "chosen_prompt": "a", "rejected_prompt": "b", "chosen": "c",
       "rejected": "r"}], "'prompt' (prompt) and 'chosen_prompt'/'rejected_prompt'", "not both"),
    ([{"chosen_prompt": "a", "rejected_prompt": "b", "chosen": "c", "rejected": "r",
       "gold": "g"}], "'gold' (gold) is set on a joint pair", "prompt of its own"),
    ([{"chosen_prompt": "a", "rejected_prompt": 7, "chosen": "c", "rejected": "r"}],
     "field 'rejected_prompt' (rejected_prompt)", "expects a string"),
    ([{"chosen_prompt": user("a"), "rejected_prompt": user("b"), "chosen": "c", "rejected": "r"},
      {"chosen_prompt": user("a"), "rejected_prompt": "b", "chosen": "c", "rejected": "r"}],
     "a string in 'rejected_prompt'", "same format"),
    ([{"chosen": "H: a\n\nAssistant: c", "rejected": "H: a\n\nAssistant: r"},
      {"chosen_prompt": "a", "rejected_prompt": "b", "chosen": "c", "rejected": "r"}],
     "fields 'chosen_prompt' and 'rejected_prompt'", "implicit"),
])
def test_errors_name_file_record_and_field(tmp_path, rows, fields, expected):
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    message = load_error(path)
    assert f"{path}:{len(rows)}:" in message and fields in message and expected in message


def test_errors_use_the_files_column_names(tmp_path):
    path = write_jsonl(tmp_path / "n.jsonl", [{"q_good": "a", "c": "x", "r": "y"}])
    message = load_error(path, fields={"chosen_prompt": "q_good", "rejected_prompt": "q_bad",
                                       "chosen": "c", "rejected": "r"})
    assert message == (f"{path}:1: the field map (data.fields, --column) maps 'rejected_prompt' "
                       "to column 'q_bad', which the record lacks; its fields are 'q_good', 'c', "
                       "'r'. Fix the column name.")


def test_explicit_implicit_format_rejects_joint_pairs(tmp_path):
    path = write_jsonl(tmp_path / "i.jsonl", [
        {"chosen_prompt": "a", "rejected_prompt": "b", "chosen": "c", "rejected": "r"}])
    assert "format 'implicit'" in load_error(path, format="implicit")


def test_joint_pair_prompts_must_have_one_kind():
    with pytest.raises(DataError, match="x.jsonl:4: chosen_prompt and rejected_prompt must both"):
        JointPair(user("a"), "b", "c", "d", origin="x.jsonl:4")


def test_unpaired_conversion_keeps_each_sides_prompt():
    chosen, rejected = pairs_to_unpaired([JointPair("p1", "p2", "c", "r", origin="f:1")])
    assert (chosen.prompt, chosen.completion, chosen.label) == ("p1", "c", True)
    assert (rejected.prompt, rejected.completion, rejected.label) == ("p2", "r", False)


# ---- tokenization ----


def prompt_ids(tokenizer, prompt) -> list[int]:
    """A prompt as a plain pipeline renders it: BOS + text, or the chat template's rendering."""
    if isinstance(prompt, list):
        text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
        return encode(tokenizer, text)
    return tokenizer(prompt)["input_ids"]  # the tiny BPE tokenizer adds BOS here


def full_sequence(tokenizer, prompt, response) -> list[int]:
    """One side's whole sequence: its prompt, then its response, then EOS."""
    if isinstance(response, list):
        response = response[0]["content"]
    return prompt_ids(tokenizer, prompt) + encode(tokenizer, response) + [tokenizer.eos_token_id]


def common_prefix_length(a, b) -> int:
    length = 0
    while length < min(len(a), len(b)) and a[length] == b[length]:
        length += 1
    return length


@pytest.mark.parametrize("record", [
    JointPair("What is the capital of France?", "say hello", " Paris", " hello there"),
    JointPair(user("What is the capital of France?"), user("say hello"), "Paris", "hello"),
    JointPair("hello world", "hello there", " a", " b"),
])
def test_shared_prefix_then_each_sides_own_prompt_and_response(tiny_tokenizer, record):
    tok = tiny_tokenizer
    (example,), report = tokenize_records([record], tok, WIDE)
    sides = [full_sequence(tok, p, r) for p, r in zip(record.prompts, record.responses)]
    shared = common_prefix_length(*sides)
    assert shared >= 1 and example.prompt_ids == sides[0][:shared]
    for side, response_ids in zip(sides, example.response_ids):
        assert example.prompt_ids + response_ids == side  # each response continues its own prompt
        assert response_ids[-1] == tok.eos_token_id
    assert example.own_prompt_lengths == [len(prompt_ids(tok, p)) - shared for p in record.prompts]
    assert report.joint_pairs == 1 and report.boundary_merges == 0


@pytest.mark.parametrize("prompt", ["say hello", user("say hello")])
@pytest.mark.parametrize("settings", [WIDE, TokenizeSettings(max_length=6, max_prompt_length=4)])
def test_identical_prompts_give_the_ordinary_pair(tiny_tokenizer, prompt, settings):
    joint, report = tokenize_records([JointPair(prompt, prompt, " world", " there here")],
                                     tiny_tokenizer, settings)
    plain, _ = tokenize_records([Pair(prompt, " world", " there here")], tiny_tokenizer, settings)
    assert joint == plain and joint[0].own_prompt_lengths == [] and report.joint_pairs == 0


def test_prompts_without_a_shared_first_token_are_an_error():
    tok = char_tokenizer()  # adds no BOS to plain strings
    record = JointPair("abc", "xyz", "1", "2", origin="p.jsonl:7")
    with pytest.raises(DataError, match=r"p\.jsonl:7: the chosen and rejected prompts share no "
                                        r"first token.*BOS or the chat template"):
        tokenize_records([record], tok, WIDE)
    (example,), _ = tokenize_records([JointPair(user("abc"), user("xyz"), "1", "2")], tok, WIDE)
    assert tok.decode(example.prompt_ids) == "<|im_start|>user\n"  # the template's opening


@pytest.mark.parametrize("settings,chosen,rejected,shared", [
    # each prompt keeps its end; the shared prefix stays whole while one side (rejected) fits
    (TokenizeSettings(max_length=100, max_prompt_length=5), "Q: ef12", "Q: xy345", "Q: "),
    # both sides over the limit: the shared prefix loses its start, down to its last token
    (TokenizeSettings(max_length=100, max_prompt_length=2), " f12", " y345", " "),
    # max_length cuts prompts to max_length - 1 and each response to what is left of its side
    (TokenizeSettings(max_length=6, max_prompt_length=None), "Q: ef1", "Q: xy3", "Q: "),
])
def test_truncation_keeps_a_shared_start_and_each_prompts_end(settings, chosen, rejected, shared):
    tok = char_tokenizer()
    record = JointPair("Q: abcdef", "Q: xy", "12", "345")
    (example,), report = tokenize_records([record], tok, settings)
    assert tok.decode(example.prompt_ids) == shared
    sides = [tok.decode(example.prompt_ids + ids) for ids in example.response_ids]
    assert [side.replace("<|im_end|>", "") for side in sides] == [chosen, rejected]
    assert all(len(example.prompt_ids) + len(ids) <= settings.max_length
               for ids in example.response_ids)
    assert report.prompt_truncated == 1


def test_inspect_shows_shared_prompt_own_prompt_and_response(tiny_tokenizer):
    records = [JointPair("say hello", "What is the capital of France?", " a", " b",
                         origin="j.jsonl:1")]
    examples, report = tokenize_records(records, tiny_tokenizer, WIDE)
    summary = inspect_report(records, examples, report)
    assert "joint pairs         1" in summary and "plain text" in summary
    text = render_example(examples[0], tiny_tokenizer, records[0])
    assert text.count(OWN_PROMPT) == 2 and text.count(BOUNDARY) == 2
    own = examples[0].own_prompt_lengths
    for name, prompt, response, length in zip(("chosen", "rejected"), records[0].prompts,
                                              records[0].responses, own):
        assert length == len(prompt_ids(tiny_tokenizer, prompt)) - 1
        assert (f"{name}: 1 shared prompt + {length} own prompt + "
                f"{len(encode(tiny_tokenizer, response)) + 1} response tokens") in text


# ---- the loss: preftune's path against the formula on whole sequences ----

EQUIVALENCE_RECORDS = [
    JointPair("What is the capital of France?", "say hello", " Paris", " hello there world"),
    JointPair(user("the quick brown fox"), user("What is 2+2? Answer with a number."),
              "jumps", "4"),
    JointPair("hello world", "hello there", " a b c", " lazy dog"),  # share more than BOS
    JointPair("say hello", "say hello there", " x", " y z"),  # one prompt extends the other
    Pair("say hello", " world", " there"),  # a conditional pair in the same batch
]


def sequence_logp(model, ids) -> float:
    """log pi of every token after the first, from a plain forward (labels-style shift)."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1].double()
    targets = torch.tensor(ids[1:])
    return logits.log_softmax(-1).gather(-1, targets[:, None]).sum().item()


def paper_loss(policy, reference, tokenizer, records, beta):
    """DOVE's loss per record: -log sigmoid(beta [log pi/pi_ref (x_w, y_w) - (x_l, y_l)])."""
    losses, margins = [], []
    for record in records:
        rho = [sequence_logp(policy, ids) - sequence_logp(reference, ids)
               for ids in (full_sequence(tokenizer, p, r)
                           for p, r in zip(record.prompts, record.responses))]
        margins.append(beta * (rho[0] - rho[1]))
        losses.append(-math.log(1.0 / (1.0 + math.exp(-margins[-1]))))
    return torch.tensor(losses, dtype=torch.float64), torch.tensor(margins, dtype=torch.float64)


@pytest.fixture(scope="module")
def models(tiny_tokenizer):
    """Policy and reference: differently initialised, with embeddings (tied to the output)
    scaled up so their distributions are far from uniform and far from each other."""
    pair = [tiny_llama(vocab_size=len(tiny_tokenizer), seed=seed) for seed in (0, 1)]
    for model in pair:
        with torch.no_grad():
            model.get_input_embeddings().weight.mul_(10.0)
    return pair


@pytest.mark.parametrize("layout", LAYOUTS)
def test_dove_loss_equals_the_paper_formula_on_whole_sequences(tiny_tokenizer, models, layout):
    policy, reference = models
    params = DOVEParams(beta=0.5)
    examples, _ = tokenize_records(EQUIVALENCE_RECORDS, tiny_tokenizer, WIDE)
    batch = collate(examples, tiny_tokenizer.pad_token_id, layout, max_row_tokens=64)
    with torch.no_grad():
        stats = [sequence_stats(LogpModel(model, chunk_tokens=7)(batch), batch)
                 for model in (policy, reference)]
    output = get_objective("dove")(ObjectiveInputs(*stats), params)
    expected_losses, expected_margins = paper_loss(policy, reference, tiny_tokenizer,
                                                   EQUIVALENCE_RECORDS, params.beta)
    margins = output.rewards[:, 0] - output.rewards[:, 1]
    torch.testing.assert_close(margins.double(), expected_margins, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(output.losses.double(), expected_losses, atol=1e-5, rtol=1e-5)
    # the check has teeth: the margins are far from zero, and scoring the responses alone (the
    # conditional DPO margin) gives other values on every joint pair
    assert expected_margins[:4].abs().min() > 0.5
    response_only = []
    for record in EQUIVALENCE_RECORDS[:4]:
        (example,), _ = tokenize_records([Pair(record.prompts[0], *record.responses)],
                                         tiny_tokenizer, WIDE)
        plain = collate([example], tiny_tokenizer.pad_token_id)
        with torch.no_grad():
            logps = [sequence_stats(LogpModel(m)(plain), plain).logps[0] for m in models]
        rho = logps[0] - logps[1]
        response_only.append(params.beta * (rho[0] - rho[1]).item())
    assert all(abs(a - b) > 1e-3 for a, b in zip(response_only, expected_margins[:4].tolist()))


# ---- training ----


def test_dove_trains_three_steps_on_mixed_joint_and_conditional_pairs(tmp_path):
    save_tiny_model_dir(tmp_path / "model")
    rows = []
    for i in range(12):
        a, b = i + 2, 2 * i + 1
        if i % 3:
            rows.append({"chosen_prompt": user(f"{a}+{b}="), "rejected_prompt": user(f"{b}*{a}="),
                         "chosen": f"{a + b}", "rejected": f"{a * b + 1} maybe"})
        else:
            rows.append({"prompt": user(f"{a}+{b}="), "chosen": f"{a + b}",
                         "rejected": f"{a + b + 3} or so"})
    data = write_jsonl(tmp_path / "mixed.jsonl", rows)
    output = loop.train(build_config({
        "output_dir": str(tmp_path / "run"),
        "model": {"path": str(tmp_path / "model")},
        "data": {"train": data},
        "objective": {"name": "dove"},
        "reference": {"cache_dir": str(tmp_path / "cache")},
        "train": {"learning_rate": 1e-2, "batch_size": 4, "max_steps": 3},
    }), show_progress=False)
    log = read_metrics(output / "metrics.jsonl")
    assert len(log) == 3
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in log)
    report = json.loads((output / "data_report.json").read_text())
    assert report["train"]["joint_pairs"] == 8
    before = load_file(tmp_path / "model" / "model.safetensors")
    after = load_file(output / "model" / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before), "weights did not change"
