"""``preftune train --plan``: what a run will do and roughly how much memory it needs, before
any training step. Estimates are upper-bound style (the peak of a micro-batch of the longest
examples), in MiB, and count the tensors themselves, as torch.cuda.max_memory_allocated does:
within a few percent of the CPU allocator's peak for a run (tests/test_plan.py). What the
layers keep for backward is measured on the model itself (``kept.py``)."""

from __future__ import annotations

import functools
from dataclasses import replace

from ..data.layout import collate
from ..model.forward import (attention_windows, binding_windows, causal_lm_of, decoder_layers,
                             image_block_token, output_head)
from ..model.lean import kept_for_backward
from ..model.quantize import four_bit_storage
from ..model.reference_sync import DEFAULT_MIX
from ..objectives.compose import Objective
from .kept import KeptBytes, measure_kept
from .optimizers import EIGHT_BIT, embedding_weights, moment_bytes, step_temporaries

BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
MIB = 2**20


def tensor_bytes(tensors) -> int:
    """The bytes ``tensors`` (parameters, buffers) hold."""
    return sum(t.numel() * t.element_size() for t in tensors)


def weight_bytes(model) -> int:
    """The bytes of ``model``'s weights as they are held, 4-bit ones with their scales."""
    return tensor_bytes(model.parameters()) + four_bit_storage(model)[1]


def _routed(config) -> tuple[int, int, int] | None:
    """A mixture of experts' (experts, experts per token, each one's MLP width); None for a
    dense model."""
    experts = getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None)
    top_k = getattr(config, "num_experts_per_tok", None)
    if not (isinstance(experts, int) and isinstance(top_k, int) and experts > 1):
        return None
    width = getattr(config, "moe_intermediate_size", None) or config.intermediate_size
    return experts, top_k, width


def _layer_backward_bytes(config, tokens: int, dtype_bytes: int, gated: bool = True) -> int:
    """Working tensors of one layer's backward beyond what it kept, as the CPU allocator counts
    the peak in tests/test_plan.py and tests/test_rm_plan.py: for a gated MLP three MLP-width
    tensors (the gradient of its product, and of gate and up, or silu recomputed in the lean
    MLP); for a plain one (BERT's, GPT-2's) two, between the 0.8 of BERT's fused GELU in fp32
    and the 2.2 of GPT-2's composed tanh GELU in bf16."""
    return tokens * (3 if gated else 2) * mlp_width(config) * dtype_bytes


def gated_mlp(layer, config) -> bool:
    """Whether ``layer``'s MLP is gated (``gated_shapes`` of its 2-D weights)."""
    return gated_shapes([tuple(p.shape) for p in layer.parameters() if p.dim() == 2], config)


def gated_shapes(shapes: list[tuple], config) -> bool:
    """Whether a layer whose 2-D weights have ``shapes`` has a gated MLP (Llama's gate and up
    projections, or one fused weight of both): three hidden-by-MLP-width weights, where a
    plain MLP has two. A mixture of experts, whose experts are 3-D weights, counts as gated."""
    hidden, width = config.hidden_size, mlp_width(config)
    pieces = sum(1 if set(shape) == {hidden, width} else 2 if set(shape) == {hidden, 2 * width}
                 else 0 for shape in shapes)
    return pieces != 2


def kv_bytes_per_token(config, dtype_bytes: int) -> int:
    """A token's keys and values in a cache of every layer."""
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return config.num_hidden_layers * 2 * heads * head_width(config) * dtype_bytes


def head_width(config) -> int:
    """An attention head's width: the config's head_dim, else the hidden size split over the
    heads."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _output_backward_bytes(vocab: int, hidden: int, chunk_tokens: int, dtype_bytes: int,
                           trainable: bool) -> int:
    """The chunked log-probs' backward (model/chunked_logps.py): the output weight's gradient
    accumulated in fp32 when that weight trains, and one chunk's logits in the model's dtype,
    their softmax in fp32 with the CPU's fp32 copy of the logits, and its cast back."""
    return (4 * vocab * hidden if trainable else 0) + chunk_tokens * vocab * (2 * dtype_bytes + 8)


def mlp_width(config) -> int:
    """The MLP's width per token: a mixture of experts' k experts' (and a shared one's)."""
    routed = _routed(config)
    if routed is None:
        return getattr(config, "intermediate_size", 4 * config.hidden_size)
    return routed[1] * routed[2] + (getattr(config, "shared_expert_intermediate_size", 0) or 0)


def _activation_bytes(kept: KeptBytes, rows: int, width: int, input_bytes: int,
                      checkpoint_every: int | None = None, mask_bytes: int = 0,
                      frozen_below: int = 0) -> float:
    """Saved activations of one micro-batch for backward: what each layer keeps (measured,
    ``kept``), what is kept outside the layers, and the layout's dense mask (``mask_bytes``,
    one tensor alive for the whole step). A checkpointed layer keeps only its input
    (``input_bytes`` a slot). Every ``checkpoint_every``-th layer is checkpointed (None: none);
    backward runs from the last layer down, so the peak is either its start or the
    recomputation of the highest checkpointed layer, when the layers above it are freed. The
    ``frozen_below`` lowest layers keep nothing: no weight at or under them trains."""
    layers = kept.layers(rows, width)
    shared = kept.shared(rows, width) + mask_bytes
    if checkpoint_every is None or not layers:  # (layers it cannot find count as outside)
        return sum(layers) + shared
    kept_now = [0 if i < frozen_below else rows * width * input_bytes
                if i % checkpoint_every == 0 else layer for i, layer in enumerate(layers)]
    highest = (len(layers) - 1) // checkpoint_every * checkpoint_every
    return shared + max(sum(kept_now), sum(kept_now[: highest + 1]) + layers[highest])


def frozen_layers_below(model) -> int:
    """How many of the lowest decoder layers have no trained weight at or under them."""
    if causal_lm_of(model).get_input_embeddings().weight.requires_grad:
        return 0
    layers = decoder_layers(model)
    return next((i for i, layer in enumerate(layers)
                 if any(p.requires_grad for p in layer.parameters())), len(layers))


def _model_lines(lm, decoder_config, max_length: int) -> list[str]:
    """What preftune reproduces of this model beyond a plain decoder (``model/verify.py``):
    a head that scales or caps its logits, sliding attention windows."""
    lines = []
    head = output_head(lm)
    if not head.plain:
        lines.append(f"output head        logits x {head.scale:g}"
                     + (f", capped at {head.softcap:g}" if head.softcap else ""))
    windows = {kind: w for kind, w in (attention_windows(decoder_config) or {}).items() if w}
    if windows:
        spans = ", ".join(f"{kind or 'every layer'} {w}" for kind, w in windows.items())
        binds = max_length > min(windows.values())
        lines.append(f"attention windows  {spans} tokens ("
                     + ("built into the masks: data.max_length is longer)" if binds else
                        f"never reached at data.max_length {max_length})"))
    return lines


def plan(config, model, train_examples, layout: str, pad_token_id: int,
         sharding: tuple[str, dict] = ("", {}), images=None) -> str:
    """A human-readable plan: layout, reference strategy, padding, memory estimate (per
    process: ``sharding`` = (engine, {state kind: parts}) divides what the engine splits);
    ``images``: a vision-language model's ``tokenizer.image_inputs``."""
    lm = causal_lm_of(model)
    model_config = lm.get_decoder().config
    objective = Objective.from_config(config.objective, total_steps=1)
    cfg = config.train
    dtype_bytes = BYTES[config.model.dtype]
    max_row = cfg.max_row_tokens or config.data.max_length
    make_batch = functools.partial(collate, pad_token_id=pad_token_id, layout=layout,
                                   max_row_tokens=max_row)
    worst, sample, longest = worst_and_sample(train_examples, cfg.batch_size, make_batch)
    vision = vision_kept(model, lm, longest, functools.partial(make_batch, images=images))
    rows, width = worst.input_ids.shape
    masks = dense_masks(model_config, lm, worst, config.model.attn_implementation,
                        train_examples)
    strategy = config.reference_strategy
    head = lm.get_output_embeddings().weight
    output = _output_backward_bytes(model_config.vocab_size, model_config.hidden_size,
                                    cfg.logps_chunk_tokens, dtype_bytes, head.requires_grad)
    # (padded probe rows get padding, and so a dense mask, where the run's rows get one)
    measured = measure_kept(model, layout, masks > 0, pad_token_id)
    lines = [
        f"objective          {objective.name} ({objective.data}, "
        f"{'needs reference' if objective.needs_reference else 'reference-free'})",
        f"reference          {strategy}" + (
            f", moved toward the policy every {config.reference.sync_every} steps (mix "
            f"{config.reference.sync_mix or DEFAULT_MIX})" if config.reference.sync_every else ""),
        f"layout             {layout}"
        + (" (chosen automatically)" if cfg.layout == "auto" else ""),
        *_model_lines(lm, model_config, config.data.max_length),
        *batch_lines(sample, worst, model, config.model.quantize),
    ]
    head_grads = tensor_bytes([head]) if head.requires_grad else 0
    return "\n".join(lines + memory_lines(
        cfg, model, model_config, dtype_bytes, measured, (rows, width), masks, sharding,
        head_grads, vision=vision,
        output=(output, f"{cfg.logps_chunk_tokens}-token chunks of logits"
                + (", fp32 gradient of the output weight" if head.requires_grad else "")),
        reference=(weight_bytes(model) if strategy == "live" else 0, strategy),
        scorer=eval_scorer(cfg, config.model.dtype)))


def eval_scorer(cfg, dtype: str) -> tuple[int, str] | None:
    """(bytes, spec) of ``train.eval_scorer``'s models, loaded before training and held
    through it to score held-out answers; None without one."""
    if cfg.eval_generations is None or cfg.eval_scorer is None:
        return None
    from ..score.memory import scorer_weights

    return scorer_weights(cfg.eval_scorer, dtype), cfg.eval_scorer


def worst_and_sample(examples, batch_size: int, make_batch):
    """(the micro-batch of the ``batch_size`` longest examples, a batch of the first 64, those
    longest examples): the token layout is what counts in the batches, so images (their
    tokens are in the prompts) are left out of them."""
    def tokens_only(chosen):
        return [replace(ex, images=(), slot_images=()) for ex in chosen]

    longest = sorted(examples, key=lambda ex: -(len(ex.prompt_ids)
                     + sum(len(r) for r in ex.response_ids)))[:batch_size]
    return make_batch(tokens_only(longest)), make_batch(tokens_only(examples[:64])), longest


def vision_kept(model, vlm, examples: list, make_batch) -> int:
    """What a vision-language model's vision tower (and projector) keeps for backward over
    ``examples``' images, each distinct image once, as a micro-batch of them runs it
    (``make_batch`` with the model's image inputs): measured. 0 without images, or when no
    weight of the tower trains."""
    if not any(ex.images or ex.slot_images for ex in examples):
        return 0
    batch = make_batch(examples).to(next(model.parameters()).device)
    if batch.image_positions is None:
        return 0
    return kept_for_backward(lambda: vlm.get_image_features(**batch.image_inputs,
                                                            return_dict=True),
                             leave_out=list(model.parameters()))


def dense_masks(model_config, lm, worst, attention: str | None, examples) -> int:
    """How many dense [rows, W, W] masks preftune's forward builds for ``worst`` (as
    model/forward.py does): one for packed or prefix-shared rows outside FlexAttention and
    varlen, or for padded rows under sdpa or eager, or for Gemma 3's image blocks; one per
    distinct attention window that the rows reach."""
    windows = binding_windows(model_config, worst.longest_sequence)
    if windows is not None:
        return len(set(windows.values()))
    attention = attention or "sdpa"
    padding = worst.unit_ids is None and worst.real_tokens < worst.attention_mask.numel()
    dense = (worst.unit_ids is not None and attention not in ("flex_attention", "varlen")
             or padding and attention in ("sdpa", "eager"))
    image_blocks = image_block_token(lm) is not None and any(ex.images for ex in examples)
    return int(dense or image_blocks)


def batch_lines(sample, worst, model, quantize: str | None) -> list[str]:
    """The plan's lines on padding, the worst micro-batch and the parameters."""
    four_bit = four_bit_storage(model)[0]
    total = sum(p.numel() for p in model.parameters()) + four_bit // 2
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    rows, width = worst.input_ids.shape
    return [f"padding fraction   {sample.padding_fraction:.1%} (first 64 examples)",
            f"worst micro-batch  {rows} rows x {width} tokens",
            f"parameters         {_millions(total)}, trainable {_millions(trainable)}"
            + (f", {_millions(four_bit)} in 4 bits ({quantize})" if four_bit else "")]


def memory_lines(cfg, model, layer_config, dtype_bytes: int, measured: KeptBytes,
                 shape: tuple[int, int], masks: int, sharding: tuple[str, dict],
                 head_grads: int,
                 output: tuple[int, str] | None = None,
                 reference: tuple[int, str] | None = None, vision: int = 0,
                 scorer: tuple[int, str] | None = None) -> list[str]:
    """The memory estimate of one micro-batch of ``shape`` (rows, width) with ``masks`` dense
    masks (``dense_masks``), per process.
    Weights, gradients and AdamW's moments are counted from ``model``'s parameters as they are
    (LoRA adapters may be fp32 on a bf16 model); torch's AdamW keeps its two moments in each
    parameter's dtype, DeepSpeed's in fp32, the 8-bit ones in a byte (``moment_bytes``).
    ``head_grads``: the bytes of the output layer's gradient; ``output``: (bytes, what) of
    its backward beyond one layer's; ``reference``: (bytes, strategy) of a reference model
    held in memory;
    ``vision``: what a vision tower keeps for backward (``vision_kept``); ``scorer``: (bytes,
    spec) of an evaluation scorer's models, held through training by the main process."""
    rows, width = shape
    mask_bytes = masks * rows * width * width * dtype_bytes
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, parts = sharding
    weights = weight_bytes(model) / parts.get("weights", 1)
    # in-backward updates free each gradient at once: about one parameter's worth is held
    grads = 0 if cfg.optimizer_in_backward else \
        tensor_bytes(trainable) / parts.get("gradients", 1)
    fp32_moments = engine.startswith("ZeRO")
    moments = 2 * sum(p.numel() for p in trainable) * 4 if fp32_moments else moment_bytes(
        cfg.optimizer, trainable, embedding_weights(model))
    optimizer = moments / parts.get("optimizer", 1)
    held = (reference[0] if reference else 0) + (scorer[0] if scorer else 0)
    device = next(model.parameters()).device
    stepping = step_temporaries(cfg.optimizer, trainable, embedding_weights(model), device)
    output_bytes = output[0] if output else 0
    every = cfg.checkpoint_every if cfg.gradient_checkpointing else None
    layers = decoder_layers(model)
    layer = _layer_backward_bytes(layer_config, rows * width, dtype_bytes,
                                  not layers or gated_mlp(layers[0], layer_config))
    frozen_below = frozen_layers_below(model)
    bottom = measured.layer(min(frozen_below, len(measured.per_slot) - 1), rows, width) \
        if measured.per_slot else 0

    def activations_and_total(checkpoint_every):
        kept = vision + _activation_bytes(measured, rows, width,
                                          layer_config.hidden_size * dtype_bytes,
                                          checkpoint_every, mask_bytes, frozen_below)
        # backward's three candidate peaks: the output layer's, with every activation still
        # kept; the top layer's; and the bottom layer's, with (nearly) every gradient made
        largest = max(kept + output_bytes, kept + head_grads + layer, grads + bottom + layer,
                      grads + stepping)  # (or the optimizer step's, after backward)
        return kept, weights + optimizer + held + largest

    def split(kind):
        return f"  (1/{parts[kind]} per process: {engine})" if parts.get(kind, 1) > 1 else ""

    activations, total = activations_and_total(every)
    lines = [
        "memory estimate (MiB per process, peak of one micro-batch):",
        f"  weights          {weights / MIB:10.0f}" + split("weights"),
        f"  gradients        {grads / MIB:10.0f}"
        + ("  (optimizer in backward: freed as applied)" if cfg.optimizer_in_backward
           else split("gradients")),
        f"  optimizer        {optimizer / MIB:10.0f}  (AdamW, "
        + ("fp32 moments)" if fp32_moments else "8-bit moments)" if cfg.optimizer in EIGHT_BIT
           else "moments in the weights' dtype)")
        + split("optimizer"),
        *([f"  reference        {reference[0] / MIB:10.0f}  ({reference[1]})"]
          if reference else []),
        *([f"  eval scorer      {scorer[0] / MIB:10.0f}  ({scorer[1]}, train.eval_scorer: "
           "held by the main process)"] if scorer else []),
        f"  activations      {activations / MIB:10.0f}"
        + ("" if every is None else "  (gradient checkpointing"
           + (")" if every == 1 else f", every {every} layers)")),
        *([f"    vision tower   {vision / MIB:10.0f}  (of the activations: the worst "
           "micro-batch's images)"] if vision else []),
        *([f"  output backward  {output_bytes / MIB:10.0f}  ({output[1]})"] if output else []),
        f"  layer backward   {layer / MIB:10.0f}  (one layer's working tensors)",
        *([f"  optimizer step   {stepping / MIB:10.0f}  (bitsandbytes' 8-bit step on a CPU: "
           "fp32 temporaries, 5x a tensor with 8-bit moments, 3x one with fp32 ones; after "
           "backward, with the gradients)"]
          if stepping else []),
        f"  total            {total / MIB:10.0f}  (the largest moment of backward: activations "
        + ("with the output's or top layer's" if output else "with the top layer's")
        + ", or gradients with the bottom layer's"
        + (", or with the optimizer step's)" if stepping else ")"),
    ]
    checkpointed = None
    if every is None:  # what the memory-saving settings would bring it to
        checkpointed = activations_and_total(1)[1]
        lines.append(f"  with checkpointing {checkpointed / MIB:8.0f}  "
                     "(train.gradient_checkpointing: true; with checkpoint_every: 2, "
                     f"{activations_and_total(2)[1] / MIB:.0f})")
    return lines + device_fit(total, checkpointed, device)


def device_fit(total: float, checkpointed: float | None, device,
               advice: str = "see train.gradient_checkpointing, a smaller batch with "
                             "accumulation, LoRA, 8-bit AdamW") -> list[str]:
    """On a GPU, whether the plan's ``total`` fits in what the run could have there: the
    device's free memory and what this process holds already (the model the plan loaded,
    which ``total`` counts, and the allocator's cache); CUDA's context and the allocator's
    fragmentation come on top. And whether ``checkpointed``, the total with gradient
    checkpointing, would fit; else ``advice``."""
    if device.type != "cuda":
        return []
    import torch

    free, whole = torch.cuda.mem_get_info(device)
    available = free + torch.cuda.memory_reserved(device)
    verdict = "fits" if total < available else \
        f"short by {(total - available) / MIB:.0f} MiB" + (
            "; with gradient checkpointing it fits" if checkpointed and checkpointed < available
            else f": {advice}")
    return [f"  this GPU         {available / MIB:10.0f}  free or held by this process, of "
            f"{whole / MIB:.0f}: {verdict}"]


def _millions(count: int) -> str:
    """A parameter count in millions, with the decimals a small one needs (0.02M, 135.3M)."""
    return f"{count / 1e6:.{1 if count >= 1e7 else 2 if count >= 1e4 else 4}f}M"
