"""LongAlign's segment-level text encoding (Liu et al. 2024, arXiv:2410.11817, section 3): a
prompt longer than CLIP's 77 tokens conditions the denoiser whole.

The prompt is split into sentences; each is encoded by the CLIP text encoder on its own (its
77-token window); the hidden states of every sentence's tokens, its start token included and
its end and padding tokens left out, are concatenated in order, then cut to ``tokens`` or
filled up to it with one padding embedding: the mean of the empty prompt's states at its
padding positions. Cross-attention takes any length, so an SD 1.x/2.x UNet reads the longer
sequence; it learns to (plain ``denoising`` on long-caption images, as LongAlign's first stage)
before a preference stage (``longalign``) or any other objective, all with the same setting.

A pipeline trained this way records it in ``prompt_encoding.json``, so that every preftune
command that loads it (sample, eval, rank, online, further training) encodes prompts the same
way; diffusers' pipelines take the embeddings as ``prompt_embeds`` (README).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from ..config import ConfigError

FILE = "prompt_encoding.json"
SENTENCE_END = re.compile(r"[.!?;]")


def sentences(prompt: str) -> list[str]:
    """The prompt's sentences (split at . ! ? ;), each ending in a full stop; the prompt
    itself when it has no text between separators (e.g. the empty prompt)."""
    parts = [part.strip() for part in SENTENCE_END.split(prompt)]
    return [f"{part}." for part in parts if part] or [prompt]


@torch.no_grad()
def encode(model, prompts: list[str], tokens: int) -> torch.Tensor:
    """Hidden states [E, tokens, D] of ``prompts`` by segment-level encoding."""
    tokenizer, encoder = model.tokenizer, model.text_encoder
    split = [sentences(prompt) for prompt in prompts]
    ids = tokenizer([s for parts in split for s in parts], padding="max_length",
                    truncation=True, max_length=tokenizer.model_max_length,
                    return_tensors="pt").input_ids.to(model.device)
    states = encoder(ids)[0]
    kept = (ids != _pad_id(tokenizer)) & (ids != tokenizer.eos_token_id)
    filler = model.on_device("segment_padding", model.device, lambda: padding(model))
    rows, start = [], 0
    for parts in split:
        end = start + len(parts)
        joined = states[start:end][kept[start:end]][:tokens]
        rows.append(torch.cat([joined, filler.to(joined.dtype).expand(
            tokens - len(joined), -1)]))
        start = end
    return torch.stack(rows)


@torch.no_grad()
def padding(model) -> torch.Tensor:
    """[D]: the mean of the empty prompt's hidden states at its padding, the positions after
    its end token (the repo: the last 60 of its 77 positions, all of them padding)."""
    tokenizer = model.tokenizer
    ids = tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length,
                    return_tensors="pt").input_ids[0]
    stops = ((ids == tokenizer.eos_token_id) | (ids == _pad_id(tokenizer))).nonzero().flatten()
    if not len(stops):
        raise ConfigError(f"{model.source}: the tokenizer pads the empty prompt with nothing, "
                          "so segment-level encoding has no padding embedding.")
    start = int(stops[0]) + int(ids[stops[0]] == tokenizer.eos_token_id)  # past the end token
    if start >= len(ids):
        raise ConfigError(f"{model.source}: the tokenizer leaves no padding after the empty "
                          "prompt's end token, so segment-level encoding has no padding "
                          "embedding.")
    return model.text_encoder(ids[None].to(model.device))[0][0, start:].mean(dim=0)


def _pad_id(tokenizer) -> int:
    return tokenizer.eos_token_id if tokenizer.pad_token_id is None else tokenizer.pad_token_id


def configure(model, tokens: int | None, key: str = "model.segment_tokens") -> None:
    """Apply ``tokens`` (a config's setting) or the pipeline's recorded one; refuse a
    conflict and denoisers other than SD 1.x/2.x UNets."""
    recorded = recorded_tokens(model.source)
    if tokens is not None and recorded is not None and tokens != recorded:
        raise ConfigError(f"{key} {tokens}: {model.source} was trained with segment-level "
                          f"encoding into {recorded} tokens ({FILE}); use {recorded} or "
                          "remove the setting.")
    tokens = tokens if tokens is not None else recorded
    if tokens is None:
        return
    if model.family != "unet" or model.text_encoder_2 is not None:
        encoders = "two text encoders" if model.text_encoder_2 is not None else "one"
        raise ConfigError(f"{key} {tokens}: segment-level encoding is for SD 1.x/2.x UNets "
                          f"(one CLIP text encoder); {model.source} has "
                          f"{type(model.denoiser).__name__} with {encoders}.")
    model.segment_tokens = tokens


def recorded_tokens(source) -> int | None:
    path = Path(str(source)) / FILE
    if not path.is_file():
        return None
    return int(json.loads(path.read_text())["segment_tokens"])


def record(directory: Path, tokens: int) -> None:
    (Path(directory) / FILE).write_text(json.dumps(
        {"segment_tokens": tokens, "method": "segment-level encoding (LongAlign, "
                                             "arXiv:2410.11817)"}, indent=2) + "\n")
