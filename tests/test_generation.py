"""The generation backend: seeded, batched like one-by-one, K samples, stop strings."""

import pytest
import torch

from preftune.generation import GREEDY, HFGenerator, SamplingSettings, greedy_texts
from tiny_models import char_tokenizer, tiny_llama

PROMPTS = ["hello", "the quick brown fox", "ab", "What is the capital of France?"]


@pytest.fixture(scope="module")
def generator():
    tokenizer = char_tokenizer()
    model = tiny_llama(vocab_size=len(tokenizer), seed=3)
    return HFGenerator(model, tokenizer)


def ids(generator):
    return [generator.tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]


def test_batched_greedy_equals_one_prompt_at_a_time(generator):
    settings = SamplingSettings(temperature=0.0, max_new_tokens=12, batch_size=4)
    batched = generator.generate(ids(generator), settings)
    single = [generator.generate([p], settings).token_ids[0] for p in ids(generator)]
    assert batched.token_ids == single
    assert [len(s) for s in batched.token_ids] == [1, 1, 1, 1]
    eos = generator.tokenizer.eos_token_id
    for (response,) in batched.token_ids:  # cut right after the first EOS, else at the limit
        assert eos not in response[:-1] and (len(response) == 12 or response[-1] == eos)


def test_sampling_is_fixed_by_the_seed_and_changes_with_it(generator):
    settings = SamplingSettings(samples=3, temperature=1.0, max_new_tokens=10, seed=7)
    first = generator.generate(ids(generator), settings)
    again = generator.generate(ids(generator), settings)
    other = generator.generate(ids(generator), SamplingSettings(
        samples=3, temperature=1.0, max_new_tokens=10, seed=8))
    assert first.token_ids == again.token_ids
    assert first.token_ids != other.token_ids
    assert [len(s) for s in first.token_ids] == [3, 3, 3, 3]
    assert len({tuple(x) for x in first.token_ids[0]}) > 1  # K different draws of one prompt
    # the global RNG is left as it was
    state = torch.random.get_rng_state()
    generator.generate(ids(generator), settings)
    assert torch.equal(state, torch.random.get_rng_state())


def test_texts_decode_the_ids_and_tokens_are_counted(generator):
    out = generator.generate(ids(generator), SamplingSettings(samples=2, max_new_tokens=8))
    tokenizer = generator.tokenizer
    assert out.texts == [[tokenizer.decode(x, skip_special_tokens=True) for x in s]
                         for s in out.token_ids]
    assert out.new_tokens == sum(len(x) for s in out.token_ids for x in s)
    assert out.tokens_per_second == pytest.approx(out.new_tokens / out.seconds)


def test_stop_strings_cut_the_text_before_them(generator):
    settings = SamplingSettings(max_new_tokens=16, seed=1)
    plain = generator.generate(ids(generator), settings)
    text = plain.texts[1][0]
    stop = text[3:5]  # a string the sampled answer contains
    assert len(text) >= 6 and text.index(stop) <= 3
    cut = generator.generate(ids(generator), SamplingSettings(max_new_tokens=16, seed=1,
                                                              stop=("@@@", stop)))
    at = text.index(stop)
    assert cut.texts[1][0] == text[:at]
    # the ids end at the token that completes the stop string (one char = one token here)
    assert cut.token_ids[1][0] == plain.token_ids[1][0][: at + len(stop)]


def test_greedy_texts_is_the_greedy_setting(generator):
    texts = greedy_texts(generator.model, generator.tokenizer, ids(generator), 6, batch_size=2)
    expected = generator.generate(ids(generator), SamplingSettings(temperature=0.0,
                                                                    max_new_tokens=6))
    assert texts == [s[0] for s in expected.texts]
    assert GREEDY.greedy


def test_bad_settings_name_the_setting():
    with pytest.raises(ValueError, match="samples 2 with temperature 0"):
        SamplingSettings(samples=2, temperature=0.0)
    with pytest.raises(ValueError, match="top_p 1.5"):
        SamplingSettings(top_p=1.5)


def test_shared_prompt_cache_draws_the_same_samples_as_k_prompt_copies(generator, monkeypatch):
    """The fast path (each prompt encoded once, its KV cache repeated K times) against HF
    generate on K copies of each prompt: same seed, same draws, token for token."""
    from preftune import generation

    settings = SamplingSettings(samples=3, max_new_tokens=10, seed=4, batch_size=4)
    calls = []
    real = generation.shared_prefix_cache
    monkeypatch.setattr(generation, "shared_prefix_cache",
                        lambda *a: calls.append(1) or real(*a))
    shared = generator.generate(ids(generator), settings)
    assert calls == [1]  # the fast path ran
    monkeypatch.setattr(generation, "shared_prefix_cache", lambda *a: None)
    plain = generator.generate(ids(generator), settings)
    assert shared.token_ids == plain.token_ids
    assert sum(len(x) for s in shared.token_ids for x in s) > 12 * 3  # not all cut at once


def test_sampling_attention_leaves_cudnn_out_and_restores_the_setting(generator):
    """Every attention call while sampling (the shared prompt prefill and each decoded token)
    runs with cuDNN's SDPA kernel disallowed, as training does (``attention_kernels``); the
    caller's setting is back afterwards."""
    seen = []
    attention = generator.model.model.layers[0].self_attn
    handle = attention.register_forward_pre_hook(lambda module, args: seen.append(
        (torch.backends.cuda.cudnn_sdp_enabled(), torch.backends.cuda.mem_efficient_sdp_enabled())))
    try:
        out = generator.generate(ids(generator)[:2], SamplingSettings(samples=2, max_new_tokens=5))
    finally:
        handle.remove()
    longest = max(len(x) for s in out.token_ids for x in s)
    assert len(seen) >= 1 + longest  # the prefill and one call per decoded position at least
    assert set(seen) == {(False, True)}
    assert torch.backends.cuda.cudnn_sdp_enabled()


def test_shared_prompt_prefill_holds_no_logits_of_the_prompts():
    """Encoding the prompts once for K samples keeps their KV cache, not [prompts, P, vocab]
    fp32 logits (SmolLM2's vocabulary, 16 prompts of 512 tokens: 1.6 GB on a GPU): what the
    prefill allocates peaks at the cache and its K copies plus less than one prompt's logits
    (it was every prompt's logits: 64 MB here, against 2 MB of cache)."""
    from common import PhaseMemory
    from transformers import LlamaConfig, LlamaForCausalLM

    from preftune.generation import shared_prefix_cache

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=20000, hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2)).eval()
    prompts, width, k = 8, 100, 4
    input_ids = torch.randint(3, 20000, (prompts, width))
    memory = PhaseMemory("tensors")
    with torch.no_grad():
        cache = shared_prefix_cache(model, input_ids, torch.ones_like(input_ids), k)
    peak = memory.stop()["setup"] * 2**20
    cached = sum(t.numel() * t.element_size() for layer in cache.layers
                 for t in (layer.keys, layer.values))
    assert cached == prompts * k * (width - 1) * 2 * 2 * 2 * 16 * 4  # layers, K and V, heads
    logits_of_a_prompt = (width - 1) * 20000 * 4
    assert cached + cached / k < peak < cached + cached / k + logits_of_a_prompt
