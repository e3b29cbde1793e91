"""The optimizer a run steps (``train.optimizer``): AdamW, its moments held in full or in 8 bits.

AdamW keeps two moments for every trained weight. In full fine-tuning they are the largest
item of memory after the activations: 8 bytes per weight in fp32, twice the weights. 8-bit
AdamW (Dettmers et al. 2022, "8-bit Optimizers via Block-wise Quantization") stores each moment
in one byte per weight, on a non-linear ("dynamic") grid of 256 values scaled per block of 256
weights, and dequantizes it for each update: about 2 bytes per weight for both moments instead
of 8. The update is AdamW's; only the moments are rounded. Two kinds of tensors keep fp32
moments: those under 4096 weights (norms, biases: bitsandbytes' default), and embeddings, as the
paper prescribes and transformers' Trainer does: a token's row gets gradients only in the steps
it occurs in, and its rare, small moments round badly in blocks shared with frequent tokens (on
the tiny test model, an embedding weight strayed from AdamW's path by 31% of its movement in 4
steps; 0.15% with fp32 moments there). The paged variant (the optimizer of QLoRA's recipe)
allocates the moments in CUDA unified memory, which the driver moves to host memory when the
GPU runs short instead of failing; on a CPU it is the plain 8-bit optimizer.

bitsandbytes does the work; its kernels wait for the GPU after each tensor's update, so 8-bit
AdamW buys memory with some speed on a GPU.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch

from ..config import TrainConfig
from ..model.lora import lr_scale
from .in_backward import AdamWInBackward

EIGHT_BIT = ("adamw_8bit", "paged_adamw_8bit")
SMALLEST_8BIT = 4096  # bitsandbytes' min_8bit_size: fewer weights keep fp32 moments
BLOCK = 256  # weights per scale of an 8-bit moment


def make_optimizer(cfg: TrainConfig, params: list[torch.nn.Parameter],
                   embeddings: Iterable[torch.nn.Parameter] = ()) -> torch.optim.Optimizer:
    """``train.optimizer`` (or ``train.optimizer_in_backward``) over ``params``; the 8-bit
    ones keep fp32 moments for those of ``params`` that are ``embeddings``. A parameter marked
    with a learning-rate scale (LoRA+'s B matrices) gets ``learning_rate`` times it, in a group
    after the unscaled one (whose rate the metrics log)."""
    settings = {"weight_decay": cfg.weight_decay, "betas": tuple(cfg.adam_betas),
                "eps": cfg.adam_epsilon}
    if cfg.optimizer_in_backward:  # each weight updated as its gradient completes
        return AdamWInBackward(params, cfg.learning_rate, [lr_scale(p) for p in params],
                               **settings)
    groups = learning_rate_groups(params, cfg.learning_rate)
    if cfg.optimizer in EIGHT_BIT:
        from bitsandbytes.optim import AdamW8bit, PagedAdamW8bit

        kind = PagedAdamW8bit if cfg.optimizer == "paged_adamw_8bit" else AdamW8bit
        optimizer = kind(groups, lr=cfg.learning_rate, min_8bit_size=SMALLEST_8BIT, **settings)
        full = {id(p) for p in embeddings}
        optimizer.get_config = _fp32_moments_for(full, optimizer.get_config)
        return optimizer
    # fused: one kernel for all weights (the per-tensor loop was ~30% of a small step)
    fused = all(p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, fused=fused or None, **settings)


def learning_rate_groups(params: list[torch.nn.Parameter], learning_rate: float) -> list[dict]:
    """One optimizer group per learning-rate scale of ``params``, the unscaled one first."""
    by_scale: dict[float, list] = {}
    for param in params:
        by_scale.setdefault(lr_scale(param), []).append(param)
    return [{"params": group, "lr": learning_rate * scale}
            for scale, group in sorted(by_scale.items(), key=lambda item: item[0] != 1.0)]


def _fp32_moments_for(full: set[int], get_config: Callable) -> Callable:
    """bitsandbytes' per-tensor settings, with 32-bit moments for the tensors whose ids are in
    ``full`` (read when a tensor's moments are made, and at each update)."""
    def config_of(gindex: int, pindex: int, group: dict) -> dict:
        config = get_config(gindex, pindex, group)
        if id(group["params"][pindex]) in full:
            config["optim_bits"] = 32
        return config
    return config_of


def embedding_weights(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The weights of ``module``'s token embeddings (a tied output layer shares one)."""
    return [m.weight for m in module.modules() if isinstance(m, torch.nn.Embedding)]


def step_temporaries(optimizer: str, params: list[torch.nn.Parameter],
                     embeddings: Iterable[torch.nn.Parameter], device: torch.device) -> int:
    """Bytes the optimizer step allocates beyond the moments: bitsandbytes' step on a CPU
    updates tensor by tensor through fp32 temporaries, 5 times the fp32 size of a tensor with
    8-bit moments and 3 times that of one with fp32 moments (measured: 312.5 MiB for a 32000 x
    512 weight); the largest tensor's count. Its CUDA kernels are fused: none."""
    if optimizer not in EIGHT_BIT or device.type != "cpu":
        return 0
    full = {id(p) for p in embeddings}
    return max((4 * p.numel() * (5 if p.numel() >= SMALLEST_8BIT and id(p) not in full else 3)
                for p in params), default=0)


def moment_bytes(optimizer: str, params: list[torch.nn.Parameter],
                 embeddings: Iterable[torch.nn.Parameter] = ()) -> int:
    """Bytes AdamW's two moments take for ``params``: torch's AdamW holds them in each
    parameter's dtype; the 8-bit ones hold a byte per weight and a fp32 scale per block
    (fp32 moments for tensors under 4096 weights and for ``embeddings``)."""
    full = {id(p) for p in embeddings}
    total = 0
    for param in params:
        n = param.numel()
        if optimizer not in EIGHT_BIT:
            total += 2 * n * param.element_size()
        elif n < SMALLEST_8BIT or id(param) in full:
            total += 2 * n * 4
        else:
            total += 2 * (n + 4 * math.ceil(n / BLOCK))
    return total
