"""``preftune online --plan``: what the rounds will do and the memory of their phases, before
anything is sampled or written. Sampling: the policy's weights, the KV cache of one generate
call of the longest prompts grown to ``max_new_tokens``, and the logits of a step. Scoring: the
scorer's models and a batch (``score/memory.py``). Training: ``preftune train --plan`` of
round 1 on worst-case rows, the longest prompts each with responses of ``max_new_tokens`` (the
most a sample can hold), as many per row as the pair builder makes. Evaluation (with
``data.eval``): the scorer, one model and the largest of its generate calls, a scorer batch
and the forward that gives its KL samples' log-probs."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from accelerate import Accelerator

from ..data.layout import choose_layout, collate
from ..evaluate.sampling import CHUNK_TOKENS
from ..model.forward import causal_lm_of, decoder_layers
from ..model.load import load_tokenizer
from ..model.verify import decoder_of, verified_layout
from ..objectives.compose import Objective
from ..score.memory import POLICY_KINDS, forward_bytes, scorer_memory
from ..train.engines import shards
from ..train.loop import load_policy, prepared, with_objective_slots
from ..train.schedule import count_steps
from ..train.plan import (BYTES, MIB, device_fit, gated_mlp, kv_bytes_per_token, mlp_width,
                          plan, weight_bytes)
from .build import LIST_BUILDERS
from .common import prompts_to_examples
from .loop import round_config

WORST_ROWS = 64  # the longest prompts the training plan lays out


def online_plan(config, prompts: list, eval_prompts: list) -> str:
    """The plan of ``preftune online`` for ``config`` over its distinct ``prompts`` (and
    held-out ``eval_prompts``)."""
    online, sampling = config.online, config.online.sampling
    trained = round_config(config, 1, config.model.path, Path(config.output_dir) / "round-1")
    tokenizer = load_tokenizer(config.model.path, config.model.trust_remote_code,
                               config.model.chat_template)
    examples = sorted(prompts_to_examples(prompts, tokenizer, config),
                      key=lambda ex: -len(ex.prompt_ids))
    accelerator = Accelerator()
    model = load_policy(trained, tokenizer, accelerator)
    drawn = f"{sampling.samples} samples of up to {sampling.max_new_tokens} tokens"
    if online.mode == "per_step":  # each micro-batch samples for its own prompts
        steps = count_steps(config.train, len(prompts), accelerator.num_processes)
        per_call = min(sampling.batch_size, config.train.batch_size, len(prompts))
        what = (f"steps              {steps} (per_step), each on {config.train.batch_size} "
                f"prompts x {drawn}")
    else:
        per_round = min(online.prompts_per_round or len(prompts), len(prompts))
        per_call = min(sampling.batch_size, per_round)
        what = (f"rounds             {online.rounds}, {per_round} of {len(prompts)} prompts "
                f"each x {drawn}")
    count = responses_per_row(config, trained)
    lines = [what, f"pairs              {online.pairs.builder}, scored by {online.scorer}",
             *sampling_lines(sampling, model, [len(ex.prompt_ids) for ex in examples],
                             BYTES[config.model.dtype], per_call),
             *(["  (per_step: each step samples with the optimizer's moments and a live "
                "reference in memory, on top of this)"] if online.mode == "per_step" else []),
             *scoring_lines(config, model, tokenizer, len(examples[0].prompt_ids)),
             *evaluation_lines(config, model, tokenizer, eval_prompts),
             f"training ({'each step' if online.mode == 'per_step' else 'round 1'}, on the "
             f"{min(WORST_ROWS, len(examples))} longest prompts with "
             f"{count} response{'s' if count > 1 else ''} of {sampling.max_new_tokens} "
             "tokens each):"]
    rows = worst_rows(config, examples[:WORST_ROWS], count, tokenizer.eos_token_id,
                      sampling.max_new_tokens)
    attention = trained.model.attn_implementation
    layout = verified_layout(*decoder_of(model), choose_layout(rows, trained.train.layout,
                                                               attention), trained.train.layout)
    objective = Objective.from_config(trained.objective, total_steps=1)
    rows = with_objective_slots(objective, rows, trained.data.max_length)
    return "\n".join(lines + [plan(trained, prepared(model, trained), rows, layout,
                                   tokenizer.pad_token_id, shards(accelerator),
                                   getattr(tokenizer, "image_inputs", None))])


def responses_per_row(config, trained) -> int:
    """How many responses a training row of the rounds holds: the samples in a list (D2O's
    with the data's negative), SELM's three, one where the round's config ``trained``
    converts the pairs for an unpaired objective, else two."""
    builder = config.online.pairs.builder
    if builder in LIST_BUILDERS:
        return config.online.sampling.samples + (builder == "d2o")
    if builder == "selm":
        return 3
    return 1 if trained.data.convert == "unpaired" else 2


def worst_rows(config, examples: list, count: int, eos_token_id: int, new: int) -> list:
    """``examples`` (tokenized prompts) with ``count`` responses of ``new`` tokens and the EOS
    training appends, cut to ``data.max_length``."""
    rows = []
    for index, example in enumerate(examples):
        length = max(1, min(new + 1, config.data.max_length - len(example.prompt_ids)))
        rows.append(replace(example, response_ids=[[eos_token_id] * length] * count,
                            index=index))
    return rows


def scoring_lines(config, policy, policy_tokenizer, longest_prompt: int) -> list[str]:
    """The scoring phase's memory (MiB): the scorer's models and a batch of the longest prompt
    with a ``max_new_tokens`` sample (``score/memory.py``), or a line saying why it has none;
    ``policy`` is the loaded policy (the model of ``judge:policy`` and its kin). Sampling's
    models are released before the scorer loads; in ``per_step`` mode the scorer is loaded
    once and held while the policy trains, so its models' memory adds to training's."""
    online = config.online
    found = scorer_memory(online.scorer, config.model.dtype, policy, policy_tokenizer,
                          longest_prompt, online.sampling.max_new_tokens)
    if isinstance(found, str):
        return [f"scoring            {online.scorer}: {found}"]
    when = ("held through training, on top of its memory" if online.mode == "per_step"
            else "after sampling releases the policy")
    lines = [f"scoring memory (MiB, {online.scorer} in {config.model.dtype}, {when}):"]
    # per_step: judge:policy and its kin judge with the policy in training, whose weights
    # training holds already
    own = online.mode == "per_step" and online.scorer in POLICY_KINDS
    weights = [0 if own else model.weights for model in found]
    for model, held in zip(found, weights):
        name = f"{model.name}: training holds them" if own else model.name
        lines.append(f"  weights          {held / MIB:10.0f}  ({name})")
        lines.append(f"  working          {model.working / MIB:10.0f}  ({model.batch})")
    total = sum(weights) + max(m.working for m in found)
    return lines + [f"  total            {total / MIB:10.0f}",
                    *device_fit(total, None, device_of(policy), "a smaller scorer")]


def evaluation_lines(config, model, tokenizer, eval_prompts: list) -> list[str]:
    """The memory of the held-out evaluation after each round (``measure.evaluate_model``):
    the scorer, one policy-sized model (the round's, released before the initial one loads
    for the KL), and the largest of its generate calls (greedy answers, ``eval_kl_samples``
    or ``eval_best_of`` samples of each prompt), one scorer batch of the answers and the
    forward that gives the KL samples' log-probs (a batch of prompts with their samples, laid
    out as scoring lays them out, and a chunk of their logits)."""
    if not eval_prompts:
        return []
    online = config.online
    examples = sorted(prompts_to_examples(eval_prompts, tokenizer, config),
                      key=lambda ex: -len(ex.prompt_ids))
    lengths = [len(ex.prompt_ids) for ex in examples]
    samples = max(1, online.eval_kl_samples, online.eval_best_of)
    per_call = min(online.sampling.batch_size, len(eval_prompts))
    dtype_bytes = BYTES[config.model.dtype]
    cache, logits, prefill = generation_bytes(model, per_call, samples, max(lengths),
                                              online.eval_max_new_tokens, dtype_bytes)
    generate = max(prefill, cache + logits)
    found = scorer_memory(online.scorer, config.model.dtype, model, tokenizer, max(lengths),
                          online.eval_max_new_tokens)
    scorer, scoring = (0, 0) if isinstance(found, str) else (
        sum(m.weights for m in found), max(m.working for m in found))
    kl = kl_forward_bytes(model, worst_rows(config, examples[:per_call], online.eval_kl_samples,
                                            tokenizer.eos_token_id, online.eval_max_new_tokens),
                          tokenizer.pad_token_id, dtype_bytes) if online.eval_kl_samples else 0
    weights, working = weight_bytes(model), max(generate, scoring, kl)
    return [f"evaluation memory (MiB, after each round, {len(eval_prompts)} held-out prompts; "
            "the scorer and one model at a time):",
            f"  scorer           {scorer / MIB:10.0f}  ({online.scorer})",
            f"  model            {weights / MIB:10.0f}  (the round's, or the initial one for "
            "the KL)",
            f"  answers          {generate / MIB:10.0f}  (a generate call of {per_call} prompts "
            f"x {samples} samples, {max(lengths)} + {online.eval_max_new_tokens} tokens)",
            f"  scoring          {scoring / MIB:10.0f}  (a scorer batch of the answers)",
            *([f"  KL log-probs     {kl / MIB:10.0f}  (a forward of {per_call} prompts x "
               f"{online.eval_kl_samples} samples)"] if kl else []),
            f"  total            {(scorer + weights + working) / MIB:10.0f}",
            *device_fit(scorer + weights + working, None, device_of(model),
                        "fewer online.eval_kl_samples or eval_best_of, a smaller "
                        "online.sampling.batch_size")]


def kl_forward_bytes(model, examples: list, pad_token_id: int, dtype_bytes: int) -> float:
    """The log-probs of a batch of ``examples`` (prompts with their samples) under ``model``
    (``measure.samples_under``), laid out as ``score_responses`` lays them out: the larger of
    the forward's working tensors and the final hidden states of every token with one chunk
    of their logits and its fp32 log-softmax."""
    layout = verified_layout(*decoder_of(model), choose_layout(examples))
    rows, width = collate(examples, pad_token_id, layout).input_ids.shape
    text = causal_lm_of(model).config.get_text_config()
    layers = decoder_layers(model)
    forward = forward_bytes(text, rows, width, dtype_bytes,
                            not layers or gated_mlp(layers[0], text))
    hidden = rows * width * text.hidden_size * dtype_bytes
    chunk = min(CHUNK_TOKENS, rows * width) * text.vocab_size * (dtype_bytes + 8)
    return max(forward, hidden + chunk)


def device_of(model):
    return next(model.parameters()).device


def generation_bytes(model, prompts: int, samples: int, longest: int, new_tokens: int,
                     dtype_bytes: int) -> tuple[float, float, float]:
    """(KV cache, a step's logits, prefill) bytes of one generate call of ``prompts`` prompts
    of up to ``longest`` tokens, each with ``samples`` samples of ``new_tokens``
    (``sampling_lines``); the call peaks at the larger of the prefill and the cache with the
    logits."""
    text = causal_lm_of(model).config.get_text_config()
    sequences, tokens = prompts * samples, longest + new_tokens
    per_token = kv_bytes_per_token(text, dtype_bytes)
    cache = sequences * tokens * per_token * (1 + 1 / (2 * text.num_hidden_layers))
    logits = 3 * sequences * text.vocab_size * 4
    prefill = prompts * longest * (per_token + 4 * mlp_width(text) * dtype_bytes)
    return cache, logits, prefill


def sampling_lines(sampling, model, prompt_lengths: list[int], dtype_bytes: int,
                   per_call: int) -> list[str]:
    """The memory of one generate call of the ``per_call`` longest prompts, each with its
    samples (as the CPU allocator counts the peak in tests/test_online_plan.py): the weights,
    and the larger of the prefill (the prompts' cache and four MLP-width tensors of their
    tokens) and the last step (the KV cache grown to ``max_new_tokens`` on prompts
    left-padded to the longest, one layer's keys or values copied as it grows, and about
    three fp32 tensors of a step's logits, their softmax and what sampling draws from them)."""
    if sampling.backend == "vllm":
        return [f"sampling           vLLM, holding {sampling.vllm_memory:.0%} of the GPU's "
                "memory (its weights and KV cache) while it samples"]
    text = causal_lm_of(model).config.get_text_config()
    prompts, longest = per_call, max(prompt_lengths)
    sequences, tokens = prompts * sampling.samples, longest + sampling.max_new_tokens
    cache, logits, prefill = generation_bytes(model, prompts, sampling.samples, longest,
                                              sampling.max_new_tokens, dtype_bytes)
    weights = weight_bytes(model)
    peak = "the prompts' prefill" if prefill > cache + logits else "the last step"
    return [f"sampling memory (MiB, one generate call of {prompts} prompts x "
            f"{sampling.samples} samples, {longest} + {sampling.max_new_tokens} tokens, "
            "transformers):",
            f"  weights          {weights / MIB:10.0f}",
            f"  KV cache         {cache / MIB:10.0f}  (keys and values of "
            f"{text.num_hidden_layers} layers, "
            f"{sequences} sequences x {tokens} tokens)",
            f"  logits           {logits / MIB:10.0f}  (fp32, a step's, {sequences} x "
            f"{text.vocab_size})",
            f"  prefill          {prefill / MIB:10.0f}  (the prompts' cache and MLP tensors)",
            f"  total            {(weights + max(prefill, cache + logits)) / MIB:10.0f}  "
            f"(at {peak})",
            *device_fit(weights + max(prefill, cache + logits), None, device_of(model),
                        "a smaller online.sampling.batch_size, or max_new_tokens")]
