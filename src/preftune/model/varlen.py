"""``model.attn_implementation: varlen``: padded and packed rows with no attention mask.

Each sequence (a padded row's tokens, each unit of a packed row, the padding after them) is
its own causal attention problem. The rows are flattened and the sequence boundaries
(``Batch.cu_seqlens``, built on the host in ``collate``) go to torch's variable-length
attention (FlashAttention on CUDA), so no [T, T] mask is built and no attention is computed
across units or into padding; positions restart in each unit as before. On CPU each sequence
runs through SDPA in turn: the same numbers, no speed gain. Calls without boundaries (text
generation, prefix-shared rows are refused earlier) run SDPA with transformers' usual mask.
"""

from __future__ import annotations

import functools
import inspect

import torch
import torch.nn.functional as F

NAME = "preftune_varlen"  # the name transformers knows the attention function by


def transformers_name(choice: str | None) -> str | None:
    """``model.attn_implementation`` as transformers knows it (registering varlen's)."""
    return register() if choice == "varlen" else choice


def register() -> str:
    """Make the attention function (and its mask rule: SDPA's) known to transformers."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    AttentionInterface.register(NAME, attention)
    AttentionMaskInterface.register(NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    return NAME


def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
              cu_seqlens=None, max_seqlen=None, **kwargs):
    """transformers' attention-function signature: query [rows, heads, T, dim], key and value
    [rows, kv heads, T, dim] -> ([rows, T, heads, dim], None)."""
    if cu_seqlens is None:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask,
                                               scaling=scaling, dropout=dropout, **kwargs)
    rows, heads, width, dim = query.shape

    def flat(t):
        return t.transpose(1, 2).reshape(rows * width, t.shape[1], dim)

    kernel = sequences_cuda if query.is_cuda else sequences_one_by_one
    out = kernel(flat(query), flat(key), flat(value), cu_seqlens, max_seqlen, scaling)
    return out.view(rows, width, heads, dim), None


def sequences_cuda(query, key, value, cu_seqlens, max_seqlen, scale):
    """torch's varlen attention over [tokens, heads, dim], causal inside each sequence."""
    from torch.nn.attention.varlen import varlen_attn

    extra = {}
    if key.shape[1] != query.shape[1]:  # grouped-query attention
        if _varlen_takes_gqa():
            extra["enable_gqa"] = True
        else:  # torch < 2.13: each kv head repeated for its group of query heads
            key, value = repeat_kv_heads(key, value, query.shape[1])
    return varlen_attn(query, key, value, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                       scale=scale, window_size=(-1, 0), **extra)


@functools.cache
def _varlen_takes_gqa() -> bool:
    """Whether this torch's ``varlen_attn`` serves grouped-query attention itself (asked once)."""
    from torch.nn.attention.varlen import varlen_attn

    return "enable_gqa" in inspect.signature(varlen_attn).parameters


def repeat_kv_heads(key, value, heads: int):
    """[tokens, kv heads, dim] -> [tokens, heads, dim]: each kv head serves a group of heads."""
    group = heads // key.shape[1]
    return key.repeat_interleave(group, dim=1), value.repeat_interleave(group, dim=1)


@torch.compiler.disable  # a loop over each batch's own lengths: eager (compiled, it would
def sequences_one_by_one(query, key, value, cu_seqlens, max_seqlen, scale):  # recompile)
    """The same, one sequence at a time through SDPA (CPU; and the reference in tests)."""
    if key.shape[1] != query.shape[1]:
        key, value = repeat_kv_heads(key, value, query.shape[1])
    bounds = cu_seqlens.tolist()
    parts = [F.scaled_dot_product_attention(
        query[s:e].transpose(0, 1), key[s:e].transpose(0, 1), value[s:e].transpose(0, 1),
        is_causal=True, scale=scale).transpose(0, 1) for s, e in zip(bounds, bounds[1:])]
    return torch.cat(parts)
