"""Batch -> SequenceStats: summed response log-probs, token counts, optional per-token log-probs."""

from __future__ import annotations

import contextvars
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, fields, replace

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..data.layout import Batch
from .chunked_logps import Head, chunked_token_logps, chunked_token_logps_and_kl
from .router import RouterBalance
from .varlen import NAME as VARLEN


@dataclass
class SequenceStats:
    """Per-response statistics, shaped [num_examples, responses_per_example].

    ``logps`` is the sum over response tokens of log pi(y_t | x, y_<t) in fp32. ``token_logps``
    (only when asked for) is [E, R, longest response] with zeros past each response's end;
    ``token_mask`` marks the real entries. ``kl`` (objectives that declare
    reference_distributions) is the sequential forward KL sum_t KL(pi_ref || pi)(. | x, y_<t)
    of each response, and ``token_kl`` its per-token terms laid out like ``token_logps``.
    """

    logps: torch.Tensor
    token_counts: torch.Tensor
    token_logps: torch.Tensor | None = None
    token_mask: torch.Tensor | None = None
    kl: torch.Tensor | None = None
    token_kl: torch.Tensor | None = None
    token_activation: torch.Tensor | None = None  # reference only: SparsePO's activation mask
    token_log_sum_sq_probs: torch.Tensor | None = None  # log sum_v pi(v)^2 per token (WPO)

    @property
    def mean_logps(self) -> torch.Tensor:
        """Length-normalised log-probability, log pi(y|x) / |y|."""
        return self.logps / self.token_counts

    def first_slots(self, count: int) -> "SequenceStats":
        """The stats of the first ``count`` responses of each example."""
        return replace(self, **{f.name: getattr(self, f.name)[:, :count] for f in fields(self)
                                if getattr(self, f.name) is not None})

    def detach(self) -> "SequenceStats":
        return replace(self, **{f.name: getattr(self, f.name).detach() for f in fields(self)
                                if getattr(self, f.name) is not None})


def causal_lm_of(model: nn.Module) -> nn.Module:
    """The transformers causal LM inside a PEFT wrapper (LoRA layers stay injected)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The language model's stack of layers, first to last (a vision tower's are not in it;
    an encoder's, with no decoder of its own, are)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    lm = causal_lm_of(model)
    stack = (lm.get_decoder() if hasattr(lm, "get_decoder") else None) or lm
    return [m for m in stack.modules() if isinstance(m, GradientCheckpointingLayer)]


def embed_with_images(vlm: nn.Module, decoder: nn.Module, batch: Batch) -> dict:
    """The decoder's inputs for a batch with images: token embeddings with the image features
    of the batch's distinct images written onto every image-token position (a row per
    response in the padded layout, once per prompt when prefix-shared), each image through the
    vision tower once per batch. Qwen3-VL's tower also gives DeepStack features, which its
    decoder adds to the image positions of its first layers: those go along as the decoder's
    ``visual_pos_masks`` and ``deepstack_visual_embeds``, in the same positions' order."""
    embeds = decoder.get_input_embeddings()(batch.input_ids)
    output = vlm.get_image_features(**batch.image_inputs, return_dict=True)
    features = flat_features(output.pooler_output, embeds.shape[-1])
    expected = batch.image_feature_rows  # counted on the host when the batch was built
    if features.shape[0] != expected:
        raise ValueError(f"the model made {features.shape[0]} image features for the batch's "
                         f"images but their prompts hold {expected} image tokens: the processor "
                         "files do not belong to this model.")
    positions, index = batch.image_positions, batch.image_features_index
    flat = embeds.reshape(-1, embeds.shape[-1]).index_put(
        (positions,), features[index].to(embeds.dtype))
    inputs = {"inputs_embeds": flat.view_as(embeds)}
    deepstack = getattr(output, "deepstack_features", None)
    if deepstack:
        # the decoder reads the masked positions in row-major order
        rows = index[positions.argsort()]
        mask = torch.zeros(embeds.shape[:2].numel(), dtype=torch.bool, device=embeds.device)
        inputs["visual_pos_masks"] = mask.index_fill(0, positions, True).view(embeds.shape[:2])
        inputs["deepstack_visual_embeds"] = [
            flat_features(layer, embeds.shape[-1])[rows].to(embeds.dtype) for layer in deepstack]
    return inputs


def flat_features(features, width: int) -> torch.Tensor:
    """Image features [rows, width], from a tensor or one tensor per image."""
    if isinstance(features, (list, tuple)):
        features = torch.cat(list(features))
    return features.reshape(-1, width)


# Set while a forward's layers hand out tensors beside their outputs (a mixture of experts'
# router logits, through transformers' hooks): checkpointed layers then keep their gradients
# (model/checkpointing.py)
SIDE_OUTPUTS = contextvars.ContextVar("preftune_side_outputs", default=False)


@contextmanager
def side_outputs():
    token = SIDE_OUTPUTS.set(True)
    try:
        yield
    finally:
        SIDE_OUTPUTS.reset(token)


# The SDPA kernels torch may choose from: all but cuDNN's, its first choice on Hopper GPUs,
# which spent about 2.5 ms of host time per call with preftune's masks on an H200 (150 ms of a
# 0.4 s SmolLM2-135M step whose kernels ran for 27 ms), where the others take tens of us.
SDPA_KERNELS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def attention_kernels():
    """The context of every decoder forward, and of its recomputation under activation
    checkpointing (which must choose the same kernels, or its saved tensors differ)."""
    return sdpa_kernel(SDPA_KERNELS)


def run_decoder(decoder: nn.Module, batch: Batch, config, vlm: nn.Module | None = None,
                **kwargs):
    """The decoder stack on a batch in any layout: the one forward every model path uses.

    Prefix-shared and packed rows get their visibility rule (each response sees its prompt and
    itself; units never see each other) with positions that restart after the prompt, as a
    FlexAttention block mask when the model runs flex_attention, else as a dense additive mask.
    M-RoPE models (Qwen2-VL, GLM-4.1V) get their 3-D positions in every layout (from ``collate``).
    Under ``varlen`` attention (``model/varlen.py``) padded and packed rows get no mask, only
    their sequence boundaries. Padded rows without padding need no mask; with padding, SDPA
    and eager attention get the [rows, 1, T, T] mask built here, because transformers would
    otherwise test the 2-D mask for padding on every forward (a read of device memory per
    call); other attention kernels (flash) take the 2-D padding mask. Batches with images need
    the vision-language model ``vlm`` for their image features (``embed_with_images``); for a
    model in ``IMAGE_BLOCKS`` they get the dense mask in every layout, in which each image's
    tokens also see each other. SDPA chooses its kernel within ``attention_kernels``.
    """
    implementation = config._attn_implementation
    positions = batch.position_ids  # None for padded rows, unless 3-D (M-RoPE models)
    blocks = image_block_token(vlm) if batch.image_positions is not None else None
    if blocks is not None and implementation not in ("sdpa", "eager"):
        raise ValueError(f"{implementation} attention cannot let an image's tokens attend both "
                         "ways, as this model's do: use sdpa or eager")
    if implementation == VARLEN:  # no mask: the sequence boundaries instead
        if not batch.sequence_lengths:
            raise ValueError("varlen attention runs padded and packed rows, not prefix-shared "
                             "ones (their responses share a prompt): use sdpa or flex_attention")
        mask = None
        kwargs.update(cu_seqlens=batch.cu_seqlens(), max_seqlen=batch.max_seqlen)
    elif (windows := binding_windows(config, batch.longest_sequence)) is not None \
            or blocks is not None:
        if implementation not in ("sdpa", "eager"):
            raise ValueError(f"{implementation} attention has no sliding window; this model's "
                             f"layers look back {min(w for w in windows.values() if w)} tokens "
                             "at most, and its rows are longer: use sdpa or eager")
        masks = {kind: batch.attention_bias(decoder.dtype, window, blocks)
                 for kind, window in (windows or {None: None}).items()}
        mask = masks.pop(None) if None in masks else masks
    elif batch.unit_ids is not None:
        mask = batch.block_mask() if implementation == "flex_attention" \
            else batch.attention_bias(decoder.dtype)
    else:
        if batch.real_tokens == batch.attention_mask.numel():
            mask = None
        elif implementation in ("sdpa", "eager"):
            mask = batch.attention_bias(decoder.dtype)
        else:
            mask = batch.attention_mask
    if positions is None and (isinstance(mask, dict) or mask is not None and mask.dim() == 4):
        # models that count positions from the 2-D mask (OPT) cannot read them from ours
        positions = batch.column_positions()
    if batch.image_positions is not None:
        kwargs.update(embed_with_images(vlm, decoder, batch))
    else:
        kwargs["input_ids"] = batch.input_ids
    with attention_kernels():
        return decoder(attention_mask=mask, position_ids=positions, use_cache=False, **kwargs)


# vision-language families whose image tokens attend to each other both ways, in every layer
# (transformers builds that from token_type_ids), which ``Batch.attention_bias`` reproduces
IMAGE_BLOCKS = ("gemma3",)


def image_block_token(vlm: nn.Module | None) -> int | None:
    """The image token of a model in ``IMAGE_BLOCKS`` (each run of it attends both ways)."""
    config = getattr(vlm, "config", None)
    return config.image_token_id if getattr(config, "model_type", None) in IMAGE_BLOCKS \
        else None


def attention_windows(config) -> dict | None:
    """The sliding windows of a decoder's attention, by the layer types transformers indexes
    its masks with (``{"sliding_attention": 512, "full_attention": None}``, Gemma 3), or
    ``{None: window}`` when every layer slides (Mistral, Phi-3); None when no layer does.
    Chunked attention (Llama 4) is refused by ``run_decoder`` where its chunks would bind."""
    def positive(name):
        value = getattr(config, name, None)
        return value if isinstance(value, int) and value > 0 else None

    window, chunk = positive("sliding_window"), positive("attention_chunk_size")
    kinds = set(getattr(config, "layer_types", None) or ())
    spans = {"sliding_attention": window, "chunked_attention": chunk}
    if kinds:
        windows = {kind: spans.get(kind) for kind in kinds}
        return windows if any(windows.values()) else None
    return {None: window} if window else None


def binding_windows(config, longest: int) -> dict | None:
    """``attention_windows`` when one of them is shorter than the ``longest`` sequence (it
    then changes what a token sees); None otherwise: no mask needs a window."""
    windows = attention_windows(config)
    if windows is None or min(w for w in windows.values() if w) >= longest:
        return None
    if windows.get("chunked_attention"):
        raise ValueError(f"{longest} tokens are more than this model's attention chunks "
                         f"({windows['chunked_attention']}), which preftune does not support; "
                         "set data.max_length to at most the chunk size.")
    return windows


class LogpModel(nn.Module):
    """Wraps a causal LM so one ``forward`` returns log-probs of the batch's response tokens.

    It runs the decoder to its final hidden states and applies the output projection only at
    response positions, in chunks (see ``chunked_token_logps``). Wrapping the whole computation
    in one module keeps DDP/FSDP hooks intact under accelerate.
    """

    def __init__(self, model: nn.Module, chunk_tokens: int = 256,
                 router: RouterBalance | None = None):
        super().__init__()
        self.model = model
        self.chunk_tokens = chunk_tokens
        self.head = output_head(causal_lm_of(model))
        self.router = router  # mixture of experts: the load-balancing loss (model/router.py)

    def external_weights(self) -> list:
        """Weights used outside their module's forward: the output projection (ZeRO-3 must
        gather it for this module's forward)."""
        head = causal_lm_of(self.model).get_output_embeddings()
        return [head.weight] + ([head.bias] if head.bias is not None else [])

    @property
    def _no_split_modules(self):  # FSDP's default wrapping: the decoder layers of the model
        return getattr(causal_lm_of(self.model), "_no_split_modules", None)

    def forward(self, batch: Batch, reference: tuple | None = None, hidden: bool = False,
                layer_means: bool = False, balance: bool = False, collisions: bool = False):
        """Log-probs of the batch's response tokens, [response tokens] in fp32.

        With ``reference = (ref_hidden, ref_weight)`` (see ``hidden_and_weight``) it returns
        ``(token_logps, token_kl)``, adding each position's KL(pi_ref || pi_theta); with
        ``collisions`` each position's log sum_v pi(v)^2 comes last (without gradient). With
        ``hidden`` it returns ``hidden_and_weight(batch, layer_means)`` instead (through
        ``forward``, so FSDP gathers the weights it needs). With ``balance`` (a model with a
        ``router``) it returns ``(that result, the routers' load-balancing loss)``.
        """
        if hidden:
            return self.hidden_and_weight(batch, layer_means)
        hidden, weight, *balancing = self.hidden_and_weight(batch, balance=balance)
        if reference is None:
            result = chunked_token_logps(hidden, weight, batch.target_tokens, self.chunk_tokens,
                                         self.head, collisions)
        else:
            result = chunked_token_logps_and_kl(hidden, weight, batch.target_tokens, *reference,
                                                self.chunk_tokens, self.head, collisions)
        return (result, *balancing) if balance else result

    def token_logps(self, hidden: torch.Tensor, weight: torch.Tensor,
                    targets: torch.Tensor) -> torch.Tensor:
        """log pi(target) at each row of ``hidden`` (``hidden_and_weight``'s), through the
        model's own head, in chunks."""
        return chunked_token_logps(hidden, weight, targets, self.chunk_tokens, self.head)

    def hidden_and_weight(self, batch: Batch, layer_means: bool = False,
                          balance: bool = False):
        """Final hidden states at the positions that predict response tokens, [n, d], and the
        output embedding [vocab, d]. An output layer with a bias (Phi-1/2) has it folded in:
        a feature of 1 appended to the hidden states, the bias as the weight's last column
        ([n, d + 1], [vocab, d + 1]), so the chunked head needs nothing else. ``layer_means``
        adds, per decoder layer, the mean over features of its output at those positions,
        [layers, n] (SparsePO's activation masks); ``balance`` adds the routers'
        load-balancing loss (``self.router``).
        """
        lm = causal_lm_of(self.model)
        decoder = lm.get_decoder()
        routed = {"output_router_logits": True} if balance else {}
        with side_outputs() if balance else nullcontext():
            out = run_decoder(decoder, batch, decoder.config, vlm=lm,
                              output_hidden_states=layer_means, **routed)
        hidden = out.last_hidden_state.reshape(-1, out.last_hidden_state.shape[-1])
        hidden, weight = _fold_bias(hidden[batch.logit_positions], lm.get_output_embeddings())
        extra = []
        if layer_means:
            extra.append(torch.stack([h.float().mean(-1).reshape(-1)[batch.logit_positions]
                                      for h in out.hidden_states[1:]]))
        if balance:
            extra.append(self.router.loss(out.router_logits, batch))
        return hidden, weight, *extra


def _fold_bias(hidden: torch.Tensor, head: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden, head weight), the head's bias folded in as ``hidden_and_weight`` says: a copy
    of the weight with one more column per forward (autograd splits its gradient back)."""
    if getattr(head, "bias", None) is None:
        return hidden, head.weight
    ones = hidden.new_ones(hidden.shape[0], 1)
    bias = head.bias.to(head.weight.dtype)[:, None]
    return torch.cat([hidden, ones], dim=1), torch.cat([head.weight, bias], dim=1)


def output_head(lm: nn.Module) -> Head:
    """How ``lm`` turns ``hidden @ weight.T`` into the logits of its softmax, from its config:
    the factors and the soft cap transformers' heads apply (``chunked_logps.Head``). A head
    that does something else is caught by ``verify.check_head`` on the model itself."""
    config = lm.config.get_text_config()
    scale = 1.0
    for name in ("logit_scale", "lm_head_multiplier"):  # Cohere; Falcon-H1
        if isinstance(getattr(config, name, None), (int, float)):
            scale *= getattr(config, name)
    if isinstance(getattr(config, "logits_scaling", None), (int, float)):  # Granite
        scale /= config.logits_scaling
    return Head(float(scale), getattr(config, "final_logit_softcapping", None) or None)


def token_grid(values: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Flat per-response-token values -> [E, R, longest response], zeros past each end."""
    grid = values.new_zeros(batch.num_responses, batch.longest_response)
    grid = grid.index_put((batch.target_response, batch.target_offset), values)
    return grid.view(batch.num_examples, batch.responses_per_example, batch.longest_response)


def sequence_stats(token_logps: torch.Tensor, batch: Batch, per_token: bool = False,
                   token_kl: torch.Tensor | None = None,
                   token_collisions: torch.Tensor | None = None) -> SequenceStats:
    """Sum flat response-token log-probs (and per-token KLs, if given) into per-response stats;
    per-token collisions (``LogpModel``'s) are laid out as ``token_logps``."""
    shape = (batch.num_examples, batch.responses_per_example)
    owner = batch.target_response

    def per_response(values):
        return values.new_zeros(batch.num_responses).index_add(0, owner, values).view(shape)

    counts = batch.response_lengths.to(token_logps.dtype).view(shape)  # counted in collate
    stats = SequenceStats(per_response(token_logps), counts)
    if token_kl is not None:
        stats.kl = per_response(token_kl)
    if per_token:
        stats.token_logps = token_grid(token_logps, batch)
        stats.token_mask = token_grid(torch.ones_like(token_logps), batch) > 0
        if token_kl is not None:
            stats.token_kl = token_grid(token_kl, batch)
        if token_collisions is not None:
            stats.token_log_sum_sq_probs = token_grid(token_collisions, batch)
    return stats
