"""The benchmarks' cases (model x data) and how one is prepared: the synthetic data, the random
models built from a config (tiny, the 1B shapes, SmolLM2's architecture without its weights),
the step order, and the trained tokens counted from one tokenization. ``common.py`` drives the
runs; ``dpo_vs_trl.py``, ``rm_vs_trl.py`` and ``profile_step.py`` name cases from here.
"""

from __future__ import annotations

import json
import random
import statistics
from pathlib import Path

# name -> model ("default" = bundled SmolLM2-135M-Instruct, "tiny" = small random Llama,
# "llama1b" = Llama-3.2-1B's architecture, random weights, SmolLM2's tokenizer) and data
CASES = {
    "smollm2-long": {"model": "default", "data": "long"},
    "smollm2-short": {"model": "default", "data": "short"},
    "tiny-long": {"model": "tiny", "data": "long"},
    "tiny-short": {"model": "tiny", "data": "short"},
    "llama1b-long": {"model": "llama1b", "data": "long"},
    "llama1b-short": {"model": "llama1b", "data": "short"},
}
DATA = {  # data kind -> max_length, max_prompt_length (preftune; TRL has max_length only)
    "long": {"max_length": 640, "max_prompt_length": 560},
    "short": {"max_length": 256, "max_prompt_length": 160},
}


# ---------------------------------------------------------------------------------------------
# synthetic data: multi-turn dialogue with long prompts, or single questions; short responses

_WORDS = {
    "subject": ["the engineer", "my neighbour", "a small team", "the teacher", "our client",
                "the committee", "a student", "the pilot", "my sister", "the old farmer",
                "the new manager", "a traveller", "the chef", "the doctor", "a volunteer"],
    "verb": ["checked", "repaired", "described", "ordered", "planted", "measured", "painted",
             "cleaned", "explained", "moved", "tested", "counted", "delivered", "compared"],
    "object": ["the garden fence", "three wooden chairs", "a broken radio", "the weekly report",
               "two bags of rice", "the kitchen window", "an old bicycle", "the river map",
               "a box of letters", "the training plan", "the spare tyres", "a long cable"],
    "tail": ["before lunch", "after the storm", "on Tuesday morning", "in the north field",
             "without any help", "for the second time", "near the station", "late at night",
             "with great care", "as quickly as possible", "during the holiday", "at the market"],
    "topic": ["the weather", "cooking rice", "fixing a bicycle", "saving money", "learning French",
              "growing tomatoes", "planning a trip", "writing a letter", "training a dog",
              "painting a room", "buying a laptop", "running a meeting", "keeping bees"],
}


def _sentence(rng: random.Random) -> str:
    w = {k: rng.choice(v) for k, v in _WORDS.items()}
    return f"{w['subject'].capitalize()} {w['verb']} {w['object']} {w['tail']}."


def _text(rng: random.Random, sentences: int) -> str:
    return " ".join(_sentence(rng) for _ in range(sentences))


def _question(rng: random.Random) -> str:
    return f"What should I know about {rng.choice(_WORDS['topic'])}? {_sentence(rng)}"


def make_records(kind: str, count: int, seed: int) -> list[dict]:
    """Conversational preference records. long: 3-4 earlier exchanges (prompt ~250-400 tokens
    with the template), responses ~10-40 tokens; short: one question, responses ~10-40 tokens."""
    rng = random.Random(seed)
    records = []
    for _ in range(count):
        prompt = []
        if kind == "long":
            for _turn in range(rng.randint(3, 4)):
                prompt.append({"role": "user", "content": _question(rng) + " " + _text(rng, rng.randint(1, 2))})
                prompt.append({"role": "assistant", "content": _text(rng, rng.randint(2, 4))})
        prompt.append({"role": "user", "content": _question(rng)})
        chosen = _text(rng, rng.randint(1, 3))
        rejected = _text(rng, rng.randint(1, 3))
        records.append({"prompt": prompt,
                        "chosen": [{"role": "assistant", "content": chosen}],
                        "rejected": [{"role": "assistant", "content": rejected}]})
    return records


# ---------------------------------------------------------------------------------------------
# case preparation (parent process)


def save_random_model(target: Path, config, tokenizer_source: str) -> str:
    """Random weights (seed 0) for ``config`` with ``tokenizer_source``'s tokenizer, saved once."""
    if (target / "config.json").exists():
        return str(target)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(target)
    AutoTokenizer.from_pretrained(tokenizer_source).save_pretrained(target)
    return str(target)


def tiny_model_dir(root: Path, default_dir: str) -> str:
    """A small random Llama with SmolLM2's tokenizer (and vocabulary)."""
    from transformers import AutoTokenizer, LlamaConfig

    tokenizer = AutoTokenizer.from_pretrained(default_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=512, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    return save_random_model(root / "tiny-llama", config, default_dir)


def llama1b_model_dir(root: Path, default_dir: str) -> str:
    """Llama-3.2-1B's shapes (16 layers, hidden 2048, 32 heads / 8 KV heads, MLP 8192, tied
    embeddings) with random weights and SmolLM2's tokenizer: 49,152 tokens instead of Llama's
    128,256 (no Llama tokenizer can be installed here), so 1.07B parameters instead of 1.24B. A
    model where arithmetic, not kernel launches, takes most of a GPU step."""
    from transformers import AutoTokenizer, LlamaConfig

    tokenizer = AutoTokenizer.from_pretrained(default_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=2048, intermediate_size=8192,
        num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
        max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    return save_random_model(root / "llama-3.2-1b-shapes", config, default_dir)


def random_init_dir(root: Path, source: str) -> str:
    """The architecture of ``source`` (its config.json and tokenizer, no weights needed) with
    random weights. Speed and memory depend on the shapes only, so this stands in for the real
    checkpoint where its weights cannot be installed."""
    from transformers import AutoConfig

    return save_random_model(root / f"{Path(source).name}-random-init",
                             AutoConfig.from_pretrained(source), source)


def example_order(num_examples: int, batch_size: int, steps: int, seed: int) -> list[int]:
    from preftune.train.schedule import example_stream

    return example_stream(num_examples, batch_size, steps, seed)[: steps * batch_size]


def prepare_case(name: str, root: Path, run_size: dict, steps: int | None,
                 batch_size: int | None, seed: int, default_model: str | None = None) -> dict:
    """Write the case's data and count its trained tokens. ``run_size`` maps the case's name or,
    failing that, its model kind ("default", "tiny") to the (steps, batch size) used when
    ``steps``/``batch_size`` are None. Trained tokens: real prompt+response tokens of every
    pair, from preftune's tokenization (the same number for every tool), summed per step in
    preftune's step order."""
    from preftune.data.sources import load_records
    from preftune.data.tokenize import TokenizeSettings, tokenize_records
    from preftune.model.load import load_tokenizer, resolve_model_dir

    spec = CASES[name]
    default_steps, default_batch = run_size.get(name) or run_size[spec["model"]]
    steps, batch_size = steps or default_steps, batch_size or default_batch
    default_dir = resolve_model_dir(default_model or "default")
    if not any(Path(default_dir).glob("*.safetensors")) and not any(Path(default_dir).glob("*.bin")):
        default_dir = random_init_dir(root, default_dir)
    model_dir = {"default": lambda: default_dir,
                 "tiny": lambda: tiny_model_dir(root, default_dir),
                 "llama1b": lambda: llama1b_model_dir(root, default_dir)}[spec["model"]]()
    limits = DATA[spec["data"]]
    case_dir = root / name
    case_dir.mkdir(parents=True, exist_ok=True)
    data_path = case_dir / "pairs.jsonl"
    records = make_records(spec["data"], steps * batch_size, seed)
    data_path.write_text("".join(json.dumps(r) + "\n" for r in records))

    tokenizer = load_tokenizer(model_dir)
    examples, report = tokenize_records(load_records(str(data_path)), tokenizer,
                                        TokenizeSettings(**limits))
    if report.kept != len(records) or report.prompt_truncated or report.response_truncated:
        raise SystemExit(f"{name}: data does not fit the limits {limits}: {report.as_dict()}")
    tokens = {ex.index: sum(len(ex.prompt_ids) + len(r) for r in ex.response_ids) for ex in examples}
    order = example_order(len(records), batch_size, steps, seed)
    step_tokens = [sum(tokens[i] for i in order[s * batch_size:(s + 1) * batch_size])
                   for s in range(steps)]
    prompt_mean = statistics.mean(len(ex.prompt_ids) for ex in examples)
    response_mean = statistics.mean(len(r) for ex in examples for r in ex.response_ids)
    longest = max(len(ex.prompt_ids) + max(len(r) for r in ex.response_ids) for ex in examples)
    return {
        "name": name, "model_dir": model_dir, "data_path": str(data_path), "steps": steps,
        "batch_size": batch_size, "seed": seed, "order": order, "step_tokens": step_tokens,
        "timed_tokens": sum(step_tokens[1:]), **limits,
        "data_summary": f"{len(records)} pairs, prompt {prompt_mean:.0f} tok, response "
                        f"{response_mean:.0f} tok (mean), longest sequence {longest} tok",
    }
