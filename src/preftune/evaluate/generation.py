"""Greedy generations on held-out prompts, scored by a program checker."""

from __future__ import annotations

from typing import Callable

import torch


@torch.no_grad()
def greedy_generations(model, tokenizer, prompts: list[list[dict]], max_new_tokens: int = 32,
                       batch_size: int = 16) -> list[str]:
    """Greedy completions of chat prompts (left-padded batches), decoded without specials."""
    model.eval()
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    texts = [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False)
             for p in prompts]
    outputs = []
    try:
        for start in range(0, len(texts), batch_size):
            encoded = tokenizer(texts[start : start + batch_size], return_tensors="pt",
                                padding=True, add_special_tokens=False).to(model.device)
            generated = model.generate(
                **encoded, max_new_tokens=max_new_tokens, do_sample=False,
                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
            )
            new_tokens = generated[:, encoded["input_ids"].shape[1]:]
            outputs += tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return outputs


def pass_rate(texts: list[str], checks: list[Callable[[str], bool]]) -> float:
    return sum(bool(check(text)) for text, check in zip(texts, checks, strict=True)) / len(texts)
