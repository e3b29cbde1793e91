"""The vLLM backend: settings mapping and output handling against a stand-in ``vllm`` module
(everywhere), and greedy answers equal to transformers' where vLLM and CUDA exist."""

import importlib.util
import sys
import types

import pytest
import torch

from preftune.config import ConfigError
from preftune.generation import HFGenerator, SamplingSettings
from preftune.generation_vllm import VLLMGenerator
from tiny_models import char_tokenizer, save_tiny_model_dir, tiny_llama


class FakeLLM:
    """Answers every prompt with its scripted token ids; records what it was asked."""

    def __init__(self, answers):
        self.answers, self.calls = answers, []

    def generate(self, prompts, params, use_tqdm=True):
        self.calls.append((prompts, params))
        return [types.SimpleNamespace(outputs=[types.SimpleNamespace(token_ids=ids)
                                               for ids in self.answers[i]])
                for i in range(len(prompts))]


@pytest.fixture
def fake_vllm(monkeypatch):
    module = types.ModuleType("vllm")
    module.SamplingParams = lambda **kwargs: kwargs
    monkeypatch.setitem(sys.modules, "vllm", module)
    return module


def test_settings_reach_vllm_and_outputs_are_cut_like_hf(fake_vllm):
    tokenizer = char_tokenizer()
    eos = tokenizer.eos_token_id
    say = tokenizer.convert_tokens_to_ids
    answers = [[[say("a"), say("b"), eos, say("z")], [say("c"), say("!"), say("d")]],
               [[say("e")], [say("f"), say("g")]]]
    llm = FakeLLM(answers)
    settings = SamplingSettings(samples=2, temperature=0.7, top_p=0.9, top_k=0,
                                max_new_tokens=4, stop=("!",), seed=5)
    out = VLLMGenerator(llm, tokenizer).generate([[3, 4], [5]], settings)
    prompts, params = llm.calls[0]
    assert prompts == [{"prompt_token_ids": [3, 4]}, {"prompt_token_ids": [5]}]
    assert params == {"n": 2, "temperature": 0.7, "top_p": 0.9, "top_k": -1, "max_tokens": 4,
                      "seed": 5, "stop_token_ids": [eos]}  # (and a chat template's turn end)
    assert out.texts == [["ab", "c"], ["e", "fg"]]  # cut after EOS, and before the stop string
    assert out.token_ids[0] == [[say("a"), say("b"), eos], [say("c"), say("!")]]


def test_vllm_backend_says_what_is_missing(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # not installed
    with pytest.raises(ConfigError, match="needs vLLM installed"):
        VLLMGenerator.from_pretrained(str(tmp_path), char_tokenizer())


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None or not torch.cuda.is_available(),
                    reason="vLLM and a CUDA GPU are needed")
def test_vllm_greedy_answers_equal_transformers(tmp_path):
    directory = str(save_tiny_model_dir(tmp_path / "tiny", seed=2))
    tokenizer = char_tokenizer()
    prompts = [tokenizer.encode(p, add_special_tokens=False) for p in ("hello", "the fox", "ab")]
    settings = SamplingSettings(temperature=0.0, max_new_tokens=8)
    hf = HFGenerator(tiny_llama(vocab_size=len(tokenizer), seed=2), tokenizer)
    vllm = VLLMGenerator.from_pretrained(directory, tokenizer)
    assert vllm.generate(prompts, settings).token_ids == hf.generate(prompts, settings).token_ids
    vllm.close()


@pytest.mark.parametrize("pairs", [{}, {"builder": "divpo"}], ids=["best_vs_worst", "divpo"])
def test_an_online_round_samples_with_the_vllm_backend(fake_vllm, monkeypatch, tmp_path, pairs):
    import json

    from preftune import generation_vllm
    from preftune.config import build_config
    from preftune.online.config import OnlineConfig
    from preftune.online.loop import run_online

    directory = str(save_tiny_model_dir(tmp_path / "tiny", seed=2))
    tokenizer = char_tokenizer()
    loaded = []

    def llm(model, **options):  # answers "a", "aa", "aaa", ... so the verifier orders them
        loaded.append((model, options))
        a = tokenizer.convert_tokens_to_ids("a")
        return FakeLLM([[[a] * (k + 1) for k in range(3)]] * 4)

    fake_vllm.LLM = llm
    monkeypatch.setattr(generation_vllm, "_cuda", lambda: True)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"p{k}"}) + "\n" for k in range(4)))
    config = build_config({
        "output_dir": str(tmp_path / "run"), "model": {"path": directory},
        "data": {"train": str(prompts), "max_length": 32, "max_prompt_length": 16},
        "train": {"max_steps": 1, "batch_size": 2, "learning_rate": 1e-3},
        "online": {"rounds": 1, "scorer": "test_online_loop:count_a",
                   "sampling": {"samples": 3, "backend": "vllm", "vllm_memory": 0.2},
                   "pairs": pairs},
    }, schema=OnlineConfig)
    run_online(config)
    assert loaded == [(directory, {"dtype": "float32", "seed": 42 * 1000 + 1,
                                    "gpu_memory_utilization": 0.2})]
    rows = [json.loads(line) for line in
            (tmp_path / "run" / "round-1" / "pairs.jsonl").read_text().splitlines()]
    assert [(r["chosen"], r["rejected"]) for r in rows] == [("aaa", "a")] * 4
    samples = (tmp_path / "run" / "round-1" / "samples.jsonl").read_text()
    assert '"backend": "vllm"' in samples
    if pairs:  # divpo's surprisal: vLLM's samples scored by the policy loaded with transformers
        for row in map(json.loads, samples.splitlines()):
            assert len(row["surprisal"]) == 3 and min(row["surprisal"]) > 0
