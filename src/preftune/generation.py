"""Generation: a model's responses to prompts, in batches, for ``eval``, the demo and online rounds.

One interface: ``Generator.generate(prompt_ids, settings) -> Generations``. The backend here is
Hugging Face ``generate`` (left-padded batches, the KV cache, K samples per prompt in one call),
given the prompt token ids that training used, so generations see exactly the training
rendering. ``SamplingSettings`` are recorded with every sample an online round writes.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass, field

import torch

from .data.turn_end import stop_ids
from .model.forward import attention_kernels, image_block_token
from .train.logging import progress


@dataclass(frozen=True)
class SamplingSettings:
    """How responses are drawn. ``temperature: 0`` is greedy (then ``samples`` must be 1).

    ``top_k: 0`` and ``top_p: 1`` keep the full distribution (transformers' own default would
    cut to the top 50 tokens). ``stop`` strings end a response early; the text is cut before
    the stop string. ``seed`` fixes the draws for a given ``batch_size``.
    """

    samples: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 64
    stop: tuple[str, ...] = ()
    seed: int = 0
    batch_size: int = 16  # prompts per generate call (each with all its samples)

    def __post_init__(self):
        problems = [
            f"{name} {value!r}: {rule}" for name, value, ok, rule in (
                ("samples", self.samples, self.samples >= 1, "at least 1"),
                ("temperature", self.temperature, self.temperature >= 0, "0 (greedy) or more"),
                ("top_p", self.top_p, 0 < self.top_p <= 1, "in (0, 1]"),
                ("top_k", self.top_k, self.top_k >= 0, "0 (off) or more"),
                ("max_new_tokens", self.max_new_tokens, self.max_new_tokens >= 1, "at least 1"),
                ("batch_size", self.batch_size, self.batch_size >= 1, "at least 1"),
            ) if not ok]
        if self.temperature == 0 and self.samples > 1:
            problems.append(f"samples {self.samples} with temperature 0: greedy decoding gives "
                            "one answer per prompt; set a temperature above 0 to draw several")
        if problems:
            raise ValueError("sampling settings: " + "; ".join(problems) + ".")
        object.__setattr__(self, "stop", tuple(self.stop))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


GREEDY = SamplingSettings(temperature=0.0)


@dataclass
class Generations:
    """``token_ids[p][k]`` and ``texts[p][k]``: sample k of prompt p. Ids end at the first EOS
    (kept) or at the token that completes a stop string; texts are decoded without special
    tokens and end before the stop string. ``ended[p][k]``: whether it ended so, rather than
    being cut off at max_new_tokens."""

    token_ids: list[list[list[int]]]
    texts: list[list[str]]
    seconds: float
    ended: list[list[bool]]
    new_tokens: int = field(init=False)

    def __post_init__(self):
        self.new_tokens = sum(len(ids) for sample in self.token_ids for ids in sample)

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0


class HFGenerator:
    """``model.generate`` of a causal LM with its tokenizer (the pad token must be set). With
    K > 1 samples each prompt is encoded once and its KV cache shared by the K samples
    (``shared_prefill``; tested equal to K copies of the prompt)."""

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer

    @torch.no_grad()
    def generate(self, prompt_ids: list[list[int]], settings: SamplingSettings,
                 description: str | None = None, images: list | None = None) -> Generations:
        """Samples of every prompt; a progress bar named ``description`` when given.
        ``images[p]`` are the images prompt p shows (vision-language models)."""
        model, tokenizer = self.model, self.tokenizer
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        pad, stops = tokenizer.pad_token_id, stop_ids(tokenizer)
        options = dict(do_sample=False) if settings.greedy else dict(
            do_sample=True, temperature=settings.temperature, top_k=settings.top_k,
            top_p=settings.top_p, typical_p=1.0, repetition_penalty=1.0)
        ids_out: list[list[list[int]]] = []
        started = time.perf_counter()
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), \
                attention_kernels(), progress(description, len(prompt_ids), "prompt") as update:
            for start in range(0, len(prompt_ids), settings.batch_size):
                torch.manual_seed(settings.seed * 1_000_003 + start)
                chunk = prompt_ids[start : start + settings.batch_size]
                input_ids, mask = left_padded(chunk, pad, device)
                width = input_ids.shape[1]
                k = settings.samples
                pixels = {}
                shared = None
                if images is not None:  # each prompt and its images, K copies in a row
                    shown = [image for prompt_images in images[start : start + len(chunk)]
                             for _ in range(k) for image in prompt_images]
                    pixels = {name: value.to(device) for name, value in
                              tokenizer.image_inputs.pixels(shown).items()}
                elif k > 1:
                    shared = shared_prefix_cache(model, input_ids, mask, k)
                if pixels or shared is not None:
                    input_ids, mask = input_ids.repeat_interleave(k, 0), mask.repeat_interleave(k, 0)
                    if pixels:
                        pixels |= _token_types(model, tokenizer.image_inputs, input_ids)
                    options_k = dict(options, num_return_sequences=1)
                    if shared is not None:  # each prompt encoded once, its cache copied K times
                        options_k[cache_argument(model)] = shared
                else:
                    options_k = dict(options, num_return_sequences=k)
                generated = model.generate(
                    input_ids=input_ids, attention_mask=mask,
                    max_new_tokens=settings.max_new_tokens, pad_token_id=pad, eos_token_id=stops,
                    **options_k, **pixels,
                )[:, width:].tolist()
                ids_out += [generated[p * k : (p + 1) * k] for p in range(len(chunk))]
                update(len(chunk))
        model.train(was_training)
        return finished(ids_out, settings, tokenizer, time.perf_counter() - started)


def finished(ids_out: list[list[list[int]]], settings: SamplingSettings, tokenizer,
             seconds: float) -> Generations:
    """Generations from every backend's raw ids: cut after the first EOS or end of turn, then
    at the first stop string, and decoded."""
    stops = stop_ids(tokenizer)
    token_ids, texts, ended = [], [], []
    for samples in ids_out:
        cut = [_stop(_cut(list(ids), stops), settings.stop, tokenizer, stops) for ids in samples]
        token_ids.append([ids for ids, _, _ in cut])
        texts.append([text for _, text, _ in cut])
        ended.append([end for _, _, end in cut])
    return Generations(token_ids, texts, seconds, ended)


def left_padded(rows: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id rows padded on the left to one width, and their attention mask."""
    width = max(len(ids) for ids in rows)
    input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in rows], device=device)
    mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in rows],
                        device=device)
    return input_ids, mask


def shared_prefix_cache(model, input_ids, mask, k: int):
    """The KV cache of every prompt but its last token, computed once per prompt and repeated
    K times, so that ``generate`` encodes each prompt once instead of once per sample (prefill
    was ~40% of sampling 4 answers to the demo's prompts on CPU). None when the prompts are one
    token long, or when the model's cache holds more than keys and values (the convolution and
    state layers of hybrid models such as LFM2 or Falcon-H1): ``generate`` then encodes each
    copy."""
    from transformers import DynamicCache, cache_utils

    if input_ids.shape[1] < 2:
        return None
    cache = DynamicCache(config=model.config)
    states = getattr(cache_utils, "LinearAttentionCacheLayerMixin", ())
    if not all(isinstance(layer, cache_utils.DynamicLayer) and not isinstance(layer, states)
               for layer in cache.layers):
        return None
    prefix_mask = mask[:, :-1]
    positions = (prefix_mask.cumsum(-1) - 1).clamp(min=0)
    # only the cache is wanted: logits of one position, not [prompts, P, vocab] in fp32
    model(input_ids=input_ids[:, :-1], attention_mask=prefix_mask, position_ids=positions,
          use_cache=True, **{cache_argument(model): cache}, **last_logits_only(model))
    cache.batch_repeat_interleave(k)
    return cache


def last_logits_only(model) -> dict:
    """The forward argument that makes a causal LM project only the last position to the
    vocabulary (``logits_to_keep``), where it has one: a batch's [rows, T, vocab] logits are
    gigabytes for long rows and a large vocabulary."""
    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(
        model.forward).parameters else {}


def cache_argument(model) -> str:
    """transformers renamed ``past_key_values`` to ``cache`` (5.25); take what this one has."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters \
        else "past_key_values"


def _cut(ids: list[int], stops: list[int]) -> list[int]:
    end = next((position for position, token in enumerate(ids) if token in stops), None)
    return ids if end is None else ids[: end + 1]


def _stop(ids: list[int], stop: tuple[str, ...], tokenizer,
          stops: list[int]) -> tuple[list[int], str, bool]:
    """The ids up to the token that completes the first stop string, the text before it
    (never the closing EOS or end of turn, special token or not), and whether the sample
    ended (at a stop token or string) rather than at the length limit."""
    closed = bool(ids[-1:]) and ids[-1] in stops
    text = tokenizer.decode(ids[:-1] if closed else ids, skip_special_tokens=True)
    hits = [(text.find(s), s) for s in stop if s in text]
    if not hits:
        return ids, text, closed
    at, first = min(hits)
    for end in range(1, len(ids) + 1):  # the shortest prefix whose text holds the stop string
        if len(tokenizer.decode(ids[:end], skip_special_tokens=True)) >= at + len(first):
            return ids[:end], text[:at], True
    return ids, text[:at], True


def _token_types(model, image_inputs, input_ids: torch.Tensor) -> dict:
    """Which prompt tokens are image tokens, for the models that read it from ``generate``'s
    inputs: M-RoPE models (Qwen2-VL, GLM-4.1V) for their rotary positions, Gemma 3 to let an
    image's tokens attend both ways."""
    image_tokens = input_ids == image_inputs.image_token_id
    types = {"mm_token_type_ids": image_tokens.int()} if image_inputs.mrope else {}
    if image_block_token(model) is not None:
        types["token_type_ids"] = image_tokens.long()
    return types


def prompt_ids(prompts: list, tokenizer, settings, images: list | None = None,
               tools: list | None = None) -> list[list[int]]:
    """Each prompt (a string or chat messages) rendered and tokenized exactly as training renders
    it, cut to ``settings`` (``TokenizeSettings``) like a training prompt; ``images[p]`` are the
    images prompt p shows (their tokens are written in), ``tools[p]`` the functions it offers
    (written in by the chat template)."""
    return [example.prompt_ids for example in
            prompt_examples(prompts, tokenizer, settings, images, tools)]


def prompt_examples(prompts: list, tokenizer, settings, images: list | None = None,
                    tools: list | None = None, origins: list | None = None) -> list:
    """``prompt_ids``' prompts as ``TokenizedExample``s (an empty response each), which also
    carry the images and their token counts that scoring a response under them needs;
    ``origins`` (file:line of each prompt) name a prompt in an error."""
    from .data.records import DataError, Unpaired
    from .data.tokenize import tokenize_records

    images = images or [()] * len(prompts)
    tools = tools or [()] * len(prompts)
    origins = origins or [f"prompt {number}" for number in range(len(prompts))]
    records = [Unpaired(prompt, "", True, images=tuple(shown), tools=tuple(offered),
                        origin=origin)
               for prompt, shown, offered, origin in zip(prompts, images, tools, origins)]
    examples, report = tokenize_records(records, tokenizer, settings, keep_empty=True)
    if len(examples) != len(records):  # answers must line up with their prompts
        kept = {example.index for example in examples}
        lost = next(i for i in range(len(records)) if i not in kept)
        raise DataError(f"{origins[lost]} ({str(prompts[lost])[:60]!r}) cannot be rendered within "
                        f"max_length {settings.max_length} / max_prompt_length "
                        f"{settings.max_prompt_length} ({report.as_dict()}); raise the limits.")
    return examples


def greedy_texts(model, tokenizer, prompt_ids: list[list[int]], max_new_tokens: int,
                 batch_size: int = 16, description: str | None = None,
                 images: list | None = None) -> list[str]:
    """The model's greedy answer to each prompt, decoded without special tokens."""
    settings = SamplingSettings(temperature=0.0, max_new_tokens=max_new_tokens,
                                batch_size=batch_size)
    generations = HFGenerator(model, tokenizer).generate(prompt_ids, settings, description,
                                                         images)
    return [texts[0] for texts in generations.texts]
