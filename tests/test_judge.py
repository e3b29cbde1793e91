"""The LLM judge against independent single-sequence forwards: expected rating, order-swap
debiased pairwise preference, and its use as an online scorer (self-rewarding)."""

import pytest
import torch

from preftune.config import ConfigError
from preftune.score import load_scorer
from preftune.data.records import plain_text
from preftune.score.judge import PAIRWISE, POINTWISE, LLMJudge
from tiny_models import char_tokenizer, save_tiny_model_dir, tiny_llama

PROMPTS = ["say hi", [{"role": "user", "content": "2+2?"}], "name a color"]
FIRST = ["hi", "4", "blue"]
SECOND = ["hello there", "five", "b"]


@pytest.fixture(scope="module")
def judge_parts():
    tokenizer = char_tokenizer()
    return tiny_llama(vocab_size=len(tokenizer), seed=5), tokenizer


def next_token_probs(model, tokenizer, question, labels):
    text = tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                         add_generation_prompt=True, tokenize=False)
    ids = torch.tensor([tokenizer.encode(text, add_special_tokens=False)])
    with torch.no_grad():
        logits = model(ids).logits[0, -1]
    chosen = logits[[tokenizer.convert_tokens_to_ids(label) for label in labels]]
    return chosen.softmax(-1)


def test_pointwise_score_is_the_expected_rating(judge_parts):
    model, tokenizer = judge_parts
    judge = LLMJudge(model, tokenizer, "judge:tiny", scale=5, batch_size=2)
    scores = judge.score(PROMPTS, FIRST)
    for prompt, response, score in zip(PROMPTS, FIRST, scores):
        question = POINTWISE.format(prompt=plain_text(prompt), response=response, scale=5)
        probs = next_token_probs(model, tokenizer, question, list("12345"))
        assert score == pytest.approx(float(probs @ torch.arange(1.0, 6.0)), abs=1e-5)
    assert plain_text(PROMPTS[1]) == "user: 2+2?"


def test_pairwise_preference_averages_both_orders(judge_parts):
    model, tokenizer = judge_parts
    judge = LLMJudge(model, tokenizer, "judge-pair:tiny", pairwise=True, batch_size=4)
    forward = judge.prefer(PROMPTS, FIRST, SECOND)
    backward = judge.prefer(PROMPTS, SECOND, FIRST)
    for k, (prompt, a, b) in enumerate(zip(PROMPTS, FIRST, SECOND)):
        text = plain_text(prompt)
        p_ab = next_token_probs(model, tokenizer, PAIRWISE.format(prompt=text, first=a, second=b),
                                ["A", "B"])[0]
        p_ba = next_token_probs(model, tokenizer, PAIRWISE.format(prompt=text, first=b, second=a),
                                ["A", "B"])[0]
        assert forward[k] == pytest.approx(float(p_ab + 1 - p_ba) / 2, abs=1e-5)
        assert forward[k] + backward[k] == pytest.approx(1.0, abs=1e-6)  # no position bias left
    with pytest.raises(ConfigError, match="gives no score of one"):
        judge.score(PROMPTS, FIRST)


def test_load_scorer_names_judges_and_multi_token_answers_are_refused(tmp_path, judge_parts):
    directory = str(save_tiny_model_dir(tmp_path / "judge"))
    assert not load_scorer(f"judge:{directory}").pairwise
    assert load_scorer(f"judge-pair:{directory}").pairwise
    model, tokenizer = judge_parts
    with pytest.raises(ConfigError, match="'10' is 2 tokens"):
        LLMJudge(model, tokenizer, "judge:tiny", scale=10)


def test_the_judge_projects_only_the_last_position_to_the_vocabulary():
    """A batch of judge questions (hundreds of tokens each) allocates logits of one position,
    not [questions, T, vocab]: what the forward allocates stays under one question's logits
    (it was the whole batch's and their fp32 copy: 80 MB here)."""
    from common import PhaseMemory

    tokenizer = char_tokenizer()
    model = tiny_llama(vocab_size=20000, seed=5)
    judge = LLMJudge(model, tokenizer, "judge:tiny", scale=5, batch_size=4)
    questions = [f"question {i}: " + "is this answer right? " * 10 for i in range(4)]
    memory = PhaseMemory("tensors")
    probs = judge.label_probs(questions)
    peak = memory.stop()["setup"] * 2**20
    longest = max(len(tokenizer.encode(tokenizer.apply_chat_template(
        [{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False),
        add_special_tokens=False)) for q in questions)
    assert probs.shape == (4, 5)
    assert peak < longest * 20000 * 4


def test_the_judge_keeps_no_key_value_cache():
    """One forward per batch of questions needs no cache: with a deep model whose cache of the
    batch (every layer's keys and values) outweighs one layer's working tensors, the peak
    stays under that cache's size (it was above it before the judge passed use_cache=False)."""
    from common import PhaseMemory
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = char_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=256, intermediate_size=256,
        num_hidden_layers=24, num_attention_heads=8, num_key_value_heads=8,
        bos_token_id=1, eos_token_id=2, pad_token_id=0)).eval()
    judge = LLMJudge(model, tokenizer, "judge:deep", scale=5, batch_size=4)
    questions = [f"question {i}: " + "is this answer right? " * 10 for i in range(4)]
    tokens = max(len(tokenizer.encode(tokenizer.apply_chat_template(
        [{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False),
        add_special_tokens=False)) for q in questions)
    cache = 4 * tokens * 24 * 2 * 256 * 4  # questions x tokens x layers x (keys, values) x fp32
    memory = PhaseMemory("tensors")
    judge.label_probs(questions)
    assert memory.stop()["setup"] * 2**20 < cache
