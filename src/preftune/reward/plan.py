"""``preftune rm train --plan``: a reward model's layout and memory estimate before any
training step, on the policy plan's terms (``train/plan.py``): weights, gradients and AdamW's
moments from the parameters as they will train, what the layers keep for backward measured on
the backbone (``train/kept.py``) through the reward model's own forward and batches."""

from __future__ import annotations

from ..model.forward import causal_lm_of
from ..train.kept import measure_kept
from ..train.plan import (BYTES, batch_lines, dense_masks, memory_lines, tensor_bytes,
                          vision_kept, worst_and_sample)
from .model import REWARD_HEADS


def reward_plan(config, reward_model, train_examples, layout: str, make_batch,
                pad_token_id: int, sharding: tuple[str, dict] = ("", {}),
                with_images=None) -> str:
    """The plan of ``preftune rm train`` for ``reward_model`` (set up as it will train: LoRA,
    frozen weights, lean layers, dropout off, no checkpointing), the run's ``make_batch`` of
    token layouts and, for a vision-language backbone, ``with_images``, its batches with
    their images."""
    cfg = config.train
    backbone = causal_lm_of(reward_model.model)
    layer_config = backbone.base_model.config
    worst, sample, longest = worst_and_sample(train_examples, cfg.batch_size, make_batch)
    vision = vision_kept(reward_model.model, getattr(backbone, "vlm", None), longest,
                         with_images) if with_images is not None else 0
    rows, width = worst.input_ids.shape
    dtype_bytes = BYTES[config.model.dtype]
    if reward_model.last_token:  # preftune's forward and masks, as for a policy
        masks = dense_masks(layer_config, backbone, worst, config.model.attn_implementation,
                            train_examples)
        padded_rows = masks > 0
        reads = "the last token of each response (decoder)"
    else:  # an encoder builds its own mask, which the probe measures
        masks = 0
        padded_rows = worst.real_tokens < worst.attention_mask.numel()
        reads = "its own pooling of each padded (prompt, response) row (encoder)"
    measured = measure_kept(reward_model.model, layout, padded_rows, pad_token_id,
                            forward=reward_model, make_batch=make_batch)
    head_grads = tensor_bytes(p for name in REWARD_HEADS if hasattr(backbone, name)
                              for p in getattr(backbone, name).parameters() if p.requires_grad)
    lines = [f"reward loss        {config.loss.name} ({reward_model.head.kind} head)",
             f"reward read at     {reads}",
             f"layout             {layout}"
             + (" (chosen automatically)" if cfg.layout == "auto" and reward_model.last_token
                else ""),
             *batch_lines(sample, worst, reward_model.model, config.model.quantize)]
    return "\n".join(lines + memory_lines(
        cfg, reward_model.model, layer_config, dtype_bytes, measured, (rows, width), masks,
        sharding, head_grads, vision=vision))
