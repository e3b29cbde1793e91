"""``preftune train --plan``: what a run will do and roughly how much memory it needs, before
any training step. Estimates are upper-bound style (peak of one micro-batch), in MiB."""

from __future__ import annotations

from dataclasses import replace

from ..data.layout import collate
from ..objectives.compose import Objective

BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
MIB = 2**20


def layer_bytes_per_token(config, dtype_bytes: int, lean: bool) -> int:
    """Bytes a llama-style decoder layer keeps for backward per token, counting tensors
    (``b`` = bytes per element, h hidden, kv the key/value width, i the MLP width):

    - each of the two RMSNorms: transformers' keeps an fp32 copy of its input (4 h) and its
      normalized values (b h), the lean one its input (b h);
    - attention: the normed input of q/k/v (b h), q, k and v (b (h + 2 kv)), its output (b h);
    - MLP: its input (b h), gate, up and their product (3 b i), and transformers' also
      silu(gate) (b i);
    - the attention kernel's log-sum-exp (4 bytes a head).

    Checked against autograd's saved tensors in ``tests/test_train_loop.py``."""
    hidden = config.hidden_size
    mlp = getattr(config, "intermediate_size", 4 * hidden)
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", heads) * _head_dim(config)
    b = dtype_bytes
    return (2 * _norm_bytes(hidden, b, lean) + b * (3 * hidden + 2 * kv) + 4 * heads
            + b * (hidden + (3 if lean else 4) * mlp))


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _norm_bytes(hidden: int, b: int, lean: bool) -> int:
    return b * hidden if lean else 4 * hidden + b * hidden


def _stack_bytes_per_token(config, dtype_bytes: int, lean: bool) -> int:
    """Kept once for the whole stack: the final norm, and the rotary cos and sin (an upper
    bound: they are per position, shared by the rows)."""
    return (_norm_bytes(config.hidden_size, dtype_bytes, lean)
            + 2 * _head_dim(config) * dtype_bytes)


def _activation_bytes(config, rows: int, width: int, custom_mask: bool, dtype_bytes: int,
                      checkpoint_every: int | None, lean: bool = True) -> int:
    """Saved activations of one micro-batch for backward.

    Per token and layer see ``layer_bytes_per_token``; an explicit attention mask adds the
    [heads, T, T] scores. A checkpointed layer keeps only its input. Every
    ``checkpoint_every``-th layer is checkpointed (None: none); backward runs from the last
    layer down, so the peak is either its start or the recomputation of the highest
    checkpointed layer, when the layers above it are freed.
    """
    hidden, layers = config.hidden_size, config.num_hidden_layers
    heads = config.num_attention_heads
    tokens = rows * width
    per_layer = tokens * layer_bytes_per_token(config, dtype_bytes, lean)
    if custom_mask:
        per_layer += rows * heads * width * width * 4 + rows * width * width * dtype_bytes
    stack = tokens * _stack_bytes_per_token(config, dtype_bytes, lean)
    if checkpoint_every is None:
        return layers * per_layer + stack
    kept = [tokens * hidden * dtype_bytes if i % checkpoint_every == 0 else per_layer
            for i in range(layers)]
    highest = (layers - 1) // checkpoint_every * checkpoint_every
    return max(sum(kept) + stack, sum(kept[: highest + 1]) + per_layer)


def plan(config, model_config, n_params: int, trainable_params: int, train_examples, layout: str,
         pad_token_id: int, sharding: tuple[str, dict] = ("", {})) -> str:
    """A human-readable plan: layout, reference strategy, padding, memory estimate (per
    process: ``sharding`` = (engine, {state kind: parts}) divides what the engine splits)."""
    engine, parts = sharding
    objective = Objective.from_config(config.objective, total_steps=1)
    cfg = config.train
    dtype_bytes = BYTES[config.model.dtype]
    longest = sorted(train_examples, key=lambda ex: -(len(ex.prompt_ids)
                     + sum(len(r) for r in ex.response_ids)))[: cfg.batch_size]
    max_row = cfg.max_row_tokens or config.data.max_length
    # the token layout is what counts here; images (their tokens are in the prompts) need no
    # pixels for it
    longest = [replace(ex, images=(), slot_images=()) for ex in longest]
    worst = collate(longest, pad_token_id, layout, max_row)
    rows, width = worst.input_ids.shape
    sample = collate([replace(ex, images=(), slot_images=()) for ex in train_examples[:64]],
                     pad_token_id, layout, max_row)
    strategy = config.reference_strategy

    weights = n_params * dtype_bytes / parts.get("weights", 1)
    # in-backward updates free each gradient at once: about one parameter's worth is held
    grads = 0 if cfg.optimizer_in_backward else \
        trainable_params * dtype_bytes / parts.get("gradients", 1)
    optimizer = 2 * trainable_params * 4 / parts.get("optimizer", 1)
    reference = n_params * dtype_bytes if strategy == "live" else 0  # held whole

    def split(kind):
        return f"  (1/{parts[kind]} per process: {engine})" if parts.get(kind, 1) > 1 else ""

    dense_mask = worst.unit_ids is not None and \
        config.model.attn_implementation not in ("flex_attention", "varlen")
    every = cfg.checkpoint_every if cfg.gradient_checkpointing else None
    activations = _activation_bytes(model_config, rows, width, dense_mask, dtype_bytes, every,
                                    cfg.lean_activations)
    logps = cfg.logps_chunk_tokens * model_config.vocab_size * 4 * 3
    total = weights + grads + optimizer + reference + activations + logps
    lines = [
        f"objective          {objective.name} ({objective.data}, "
        f"{'needs reference' if objective.needs_reference else 'reference-free'})",
        f"reference          {strategy}",
        f"layout             {layout}"
        + (" (chosen automatically)" if cfg.layout == "auto" else ""),
        f"padding fraction   {sample.padding_fraction:.1%} (first 64 examples)",
        f"worst micro-batch  {rows} rows x {width} tokens",
        f"parameters         {n_params / 1e6:.1f}M, trainable {trainable_params / 1e6:.2f}M",
        "memory estimate (MiB per process, peak of one micro-batch):",
        f"  weights          {weights / MIB:10.0f}" + split("weights"),
        f"  gradients        {grads / MIB:10.0f}"
        + ("  (optimizer in backward: freed as applied)" if cfg.optimizer_in_backward
           else split("gradients")),
        f"  optimizer        {optimizer / MIB:10.0f}  (AdamW, fp32 states)" + split("optimizer"),
        f"  reference        {reference / MIB:10.0f}  ({strategy})",
        f"  activations      {activations / MIB:10.0f}"
        + ("" if every is None else "  (gradient checkpointing"
           + (")" if every == 1 else f", every {every} layers)")),
        f"  log-prob chunks  {logps / MIB:10.0f}  ({cfg.logps_chunk_tokens} tokens x vocab)",
        f"  total            {total / MIB:10.0f}",
    ]
    return "\n".join(lines)
