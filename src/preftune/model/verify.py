"""Checks, on the user's own model, that preftune's forward computes what the model computes.

preftune never asks a model for its logits: it runs the decoder on its own layouts and applies
the output head itself (``forward.py``). Both rest on assumptions about the architecture, and
transformers has hundreds; so before a model trains or is evaluated, two small probes on the
model itself check them, and two checks of its config refuse what preftune cannot reproduce:

- ``check_head``: the log-probs of one plain row, computed preftune's way, equal the model's
  own ``forward`` logits' (a head that scales, caps or otherwise changes its logits in a way
  ``forward.output_head`` does not know is refused by name, rather than trained wrong);
- ``layout_holds``: the prefix-shared and packed layouts rely on the attention mask to keep
  responses and packed sequences apart. Layers that mix tokens outside attention (state-space
  layers, short convolutions, linear attention: Mamba hybrids such as Jamba, Bamba, Granite 4,
  Falcon-H1, or LFM2 and Qwen3-Next) ignore it. The probe changes tokens a response must not
  see and checks that its hidden states stay exactly as they were;
- ``check_windows``: sliding windows are built into the dense masks (``forward.py``); the
  attention kernels that cannot have them, and Llama 4's chunks, are refused where they bind;
- ``check_image_attention``: image data for models whose image tokens attend both ways by a
  rule the masks do not reproduce (Gemma 3's they do, on sdpa and eager attention).

``check_model`` runs the first and the last two for a causal LM; ``verified_layout`` acts on
the second.

Each probe is one forward or two of a dozen tokens, without gradients; results are kept per
model.
"""

from __future__ import annotations

import contextlib
import warnings
import weakref

import torch
from torch import nn

from ..config_tree import ConfigError
from ..data.layout import collate
from ..data.tokenize import TokenizedExample
from .forward import LogpModel, binding_windows, causal_lm_of, image_block_token, run_decoder

_LEAKS: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()
_SAID: set = set()  # (architecture, layout) already said in this process
_CHECKED: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()
# per-token log-prob differences allowed between preftune's head and the model's own: the
# same matmul in both; only the rounding of a factor or cap differs (a wrong head is off by
# nats on a trained model)
HEAD_TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 0.25, torch.float16: 0.25}


GROUPED_EXPERTS = ("eager", "grouped_mm")  # transformers' experts kernels over token groups


@contextlib.contextmanager
def _probe(module: nn.Module):
    """Eval mode, no gradients and deterministic kernels (warn-only) while a probe runs.

    Mixture-of-experts layers compute each token's experts one token at a time (transformers'
    "batched_mm") meanwhile: grouped kernels round a token's result differently as the other
    tokens routed to its expert change, which the probe would take for a leak."""
    training = module.training
    deterministic = (torch.are_deterministic_algorithms_enabled(),
                     torch.is_deterministic_algorithms_warn_only_enabled())
    experts = getattr(getattr(module, "config", None), "_experts_implementation", None)
    per_token = experts in GROUPED_EXPERTS and hasattr(module, "set_experts_implementation")
    module.eval()
    torch.use_deterministic_algorithms(True, warn_only=True)
    if per_token:
        module.set_experts_implementation("batched_mm")
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "no deterministic implementation" notices
            yield
    finally:
        if per_token:
            module.set_experts_implementation(experts)
        torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])
        module.train(training)


def _sharded(module: nn.Module) -> bool:
    """Parameters partitioned at load (DeepSpeed ZeRO-3): no forward outside its engine."""
    return any(hasattr(p, "ds_id") for p in module.parameters())


def _ids(generator: torch.Generator, vocab: int, n: int) -> list[int]:
    return torch.randint(vocab, (n,), generator=generator).tolist()


def check_head(model: nn.Module, key: str = "model.path") -> None:
    """Refuse a causal LM whose logits preftune's head does not reproduce (see the module
    docstring): one row of 12 tokens, preftune's token log-probs against the model's
    ``forward``."""
    lm = causal_lm_of(model)
    if lm in _CHECKED or _sharded(lm):
        return
    device = next(lm.parameters()).device
    ids = _ids(torch.Generator().manual_seed(0), lm.get_input_embeddings().num_embeddings, 12)
    batch = collate([TokenizedExample(prompt_ids=ids[:4], response_ids=[ids[4:]], index=0)],
                    pad_token_id=0).to(device)
    with _probe(lm):
        ours = LogpModel(lm)(batch)
        logits = lm(input_ids=torch.tensor([ids], device=device), use_cache=False).logits
        theirs = logits[0, 3:-1].float().log_softmax(-1).gather(
            1, torch.tensor(ids[4:], device=device)[:, None]).squeeze(1)
    if not torch.isfinite(theirs).all():
        raise ConfigError(_non_finite(lm, key))
    gap = (ours - theirs).abs().max().item()
    dtype = next(lm.parameters()).dtype
    if not gap <= HEAD_TOLERANCE.get(dtype, 0.25):
        raise ConfigError(
            f"{key}: {type(lm).__name__} computes its logits in a way preftune's log-probs do "
            f"not reproduce (they differ from the model's own by up to {gap:.3g} nats per "
            "token on a probe): its output head changes the logits beyond the factors and "
            "soft caps preftune knows. Training it would optimise the wrong numbers; please "
            "report the architecture.")
    _CHECKED.add(lm)


def _non_finite(lm: nn.Module, key: str) -> str:
    """Why a model's own log-probs are NaN or inf: its weights, or its arithmetic."""
    bad = [name for name, p in lm.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        return (f"{key}: {len(bad)} of the model's weight tensors hold NaN or inf values (e.g. "
                f"{bad[0]}): a training run that diverged saved them? Train it again with a "
                "lower learning rate; nothing can be measured or trained from these weights.")
    return (f"{key}: the model's own log-probs are NaN or inf on a probe though its weights are "
            "finite: its arithmetic overflows in this dtype. Load it in float32 "
            "(model.dtype / --dtype).")


def _leak_examples(seed: int, vocab: int) -> list[TokenizedExample]:
    """Two examples. What a seed changes: all of the first, and the second's first response;
    the second's second response, kept the same, follows the first example in a packed row
    and the first response in a prefix-shared one."""
    generator = torch.Generator().manual_seed(seed)
    keep = torch.Generator().manual_seed(1234)
    prompt, second = _ids(keep, vocab, 3), _ids(keep, vocab, 4)
    return [TokenizedExample(prompt_ids=_ids(generator, vocab, 5),
                             response_ids=[_ids(generator, vocab, 4), _ids(generator, vocab, 3)],
                             index=0),
            TokenizedExample(prompt_ids=prompt, response_ids=[_ids(generator, vocab, 3), second],
                             index=1)]


def mask_leak(decoder: nn.Module, config, layout: str) -> float:
    """How far the final hidden states of a response move when tokens ``layout``'s mask hides
    from it change: 0.0 exactly when the mask holds."""
    device = next(decoder.parameters()).device
    vocab = min(64, decoder.get_input_embeddings().num_embeddings)
    states = []
    with _probe(decoder):
        for seed in (0, 1):
            batch = collate(_leak_examples(seed, vocab), pad_token_id=0, layout=layout,
                            max_row_tokens=64).to(device)
            hidden = run_decoder(decoder, batch, config).last_hidden_state
            hidden = hidden.reshape(-1, hidden.shape[-1])
            kept = batch.logit_positions[batch.target_response == 3]  # example 1, response 1
            states.append(hidden[kept].float())
    return (states[0] - states[1]).abs().max().item()


def layout_holds(decoder: nn.Module, config, layout: str) -> tuple[bool, float | str]:
    """(whether ``layout`` keeps every response to what it may see in this model, the probe's
    measure, or the error the model raised on the layout's mask). Padded rows always do: the
    padding comes after every real token."""
    if layout == "padded" or _sharded(decoder):
        return True, 0.0
    known = _LEAKS.setdefault(decoder, {})
    if layout not in known:
        try:
            known[layout] = mask_leak(decoder, config, layout)
        except RuntimeError as error:  # e.g. a state-space layer that cannot take the mask
            known[layout] = f"{type(error).__name__}: {error}".splitlines()[0]
    return known[layout] == 0.0, known[layout]


def decoder_of(model: nn.Module) -> tuple[nn.Module, object]:
    """(decoder stack, its config) of a causal LM, as ``LogpModel`` runs it."""
    decoder = causal_lm_of(model).get_decoder()
    return decoder, decoder.config


def verified_layout(decoder: nn.Module, config, layout: str, configured: str = "auto",
                    key: str = "train.layout") -> str:
    """``layout`` when the model keeps to its mask there; else padded rows if the layout was
    chosen automatically (``configured`` auto, said once), or an error naming ``key``."""
    holds, leak = layout_holds(decoder, config, layout)
    if holds:
        return layout
    why = (f"{type(decoder).__name__} cannot run the {layout} layout's mask ({leak})"
           if isinstance(leak, str) else
           f"{type(decoder).__name__} mixes tokens outside attention (state-space, convolution "
           f"or linear-attention layers ignore the attention mask), so in the {layout} layout a "
           f"response sees tokens hidden from it (its hidden states moved by {leak:.3g} on a "
           "probe)")
    if configured != "auto":
        raise ConfigError(f"{key}: {layout}: {why}. Use layout padded (or auto).")
    if (type(decoder).__name__, layout) not in _SAID:
        print(f"layout: padded, not {layout}: {why}.")
        _SAID.add((type(decoder).__name__, layout))
    return "padded"


def layout_setting(decoder: nn.Module, config, configured: str,
                   attn_implementation: str | None = None) -> str:
    """``train.layout`` for batches laid out one at a time (``auto`` chooses per batch):
    ``configured``, or padded where the layout auto would choose does not hold in this model
    (said once); an explicit layout that does not hold is an error."""
    if configured == "padded":
        return configured
    chosen = configured if configured != "auto" else (
        "packed" if attn_implementation == "varlen" else "prefix_shared")
    return configured if verified_layout(decoder, config, chosen, configured) == chosen \
        else "padded"


def check_attention_device(model_config, device: torch.device) -> None:
    """Attention kernels that cannot run a training step on ``device`` in ``model.dtype``,
    refused before any work: FlexAttention off CUDA (torch has no backward for it on CPU), and
    varlen attention in float32 on CUDA (FlashAttention's kernel takes bf16 and fp16 only)."""
    attention = model_config.attn_implementation
    if attention == "flex_attention" and device.type != "cuda":
        raise ConfigError("model.attn_implementation 'flex_attention' trains on CUDA only (torch "
                          "has no FlexAttention backward on CPU); remove it or use 'sdpa'.")
    if attention == "varlen" and device.type == "cuda" and model_config.dtype == "float32":
        raise ConfigError("model.attn_implementation 'varlen' runs FlashAttention's "
                          "variable-length kernel on CUDA, which takes bfloat16 or float16, "
                          "and model.dtype is float32: set model.dtype: bfloat16, or use "
                          "'flex_attention' or 'sdpa' for float32.")


def check_windows(config, max_length: int, attn_implementation: str | None) -> None:
    """Sliding windows that bind on sequences of ``max_length`` tokens are built into the
    dense masks of sdpa and eager attention (``forward.run_decoder``); refuse what cannot
    have them, before anything runs."""
    try:
        windows = binding_windows(config, max_length)
    except ValueError as error:  # chunked attention
        raise ConfigError(f"data.max_length: {error}") from None
    if windows is None:
        return
    shortest = min(w for w in windows.values() if w)
    if attn_implementation in ("flex_attention", "varlen"):
        raise ConfigError(f"model.attn_implementation: {attn_implementation} has no sliding "
                          f"window, and this model's layers look back {shortest} tokens, fewer "
                          f"than data.max_length ({max_length}): use sdpa or eager, or set "
                          f"data.max_length to at most {shortest}.")


# vision-language families whose forward lets image (or prompt) tokens attend both ways by
# rules preftune's masks do not reproduce: Gemma 4 on its sliding layers only, PaliGemma over
# the whole prompt, ... (Gemma 3's rule they do: forward.IMAGE_BLOCKS); Gemma 3n's image path
# is not verified
IMAGES_BOTH_WAYS = ("gemma3n", "gemma4", "paligemma", "molmo2")


def check_image_attention(model: nn.Module, examples, key: str = "model.path",
                          attn_implementation: str | None = None) -> None:
    """Refuse image data for a model whose image tokens attend both ways by a rule the masks
    do not reproduce, or under an attention kernel that cannot take the rule they do (text
    alone trains either way)."""
    lm = causal_lm_of(model)
    model_type = getattr(lm.config, "model_type", None)
    if not any(example.images for example in examples):
        return
    if model_type in IMAGES_BOTH_WAYS:
        raise ConfigError(f"{key}: a {model_type} model lets image tokens attend both ways "
                          "by a rule preftune's attention masks do not reproduce yet; train it "
                          "on text alone, or use a Gemma 3-, LLaVA-, Idefics3- or Qwen2-VL-"
                          "style model for image data.")
    if image_block_token(lm) is not None and attn_implementation in ("flex_attention",
                                                                     "varlen"):
        raise ConfigError(f"model.attn_implementation: {attn_implementation} cannot let an "
                          f"image's tokens attend both ways, as a {model_type} model's do: "
                          "use sdpa (the default) or eager for its image data.")


def check_model(model: nn.Module, examples=(), max_length: int | None = None,
                attn_implementation: str | None = None, key: str = "model.path") -> None:
    """A causal LM's checks before it trains or is evaluated: its head, image data it cannot
    reproduce, and (given the run's ``max_length``) its sliding windows."""
    check_head(model, key)
    check_image_attention(model, examples, key, attn_implementation)
    if max_length is not None:
        check_windows(decoder_of(model)[1], max_length, attn_implementation)
