"""What each optimizer step trains on and at what rate: the number of steps, the example
order (exact on resume), and the learning-rate schedule."""

from __future__ import annotations

import math

import torch

from ..config_train import TrainConfig


def lr_lambda(total_steps: int, warmup_steps: int, schedule: str):
    """Multiplier of the peak learning rate at each step: linear warmup, then decay."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if schedule == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return max(0.0, 1.0 - progress)

    return factor


def example_stream(num_examples: int, examples_per_step: int, total_steps: int, seed: int,
                   shuffle: bool = True):
    """Example order for the whole run: a fresh permutation per epoch, fixed by the seed (or the
    data's own order, for curricula). Step k always trains on the same examples, which is what
    makes resuming exact.
    """
    needed, order, epoch = total_steps * examples_per_step, [], 0
    while len(order) < needed:
        generator = torch.Generator().manual_seed(seed * 1000 + epoch)
        order += (torch.randperm(num_examples, generator=generator).tolist() if shuffle
                  else list(range(num_examples)))
        epoch += 1
    return order


def count_steps(cfg: TrainConfig, num_examples: int, processes: int = 1) -> int:
    """Optimizer steps of a run: ``max_steps``, else enough for ``epochs`` over the data (a
    step takes batch_size x accumulation examples on each of ``processes``)."""
    examples_per_step = cfg.batch_size * cfg.gradient_accumulation_steps * processes
    return cfg.max_steps or max(1, math.ceil(cfg.epochs * num_examples / examples_per_step))
