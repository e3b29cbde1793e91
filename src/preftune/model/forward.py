"""Batch -> SequenceStats: summed response log-probs, token counts, optional per-token log-probs."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..data.layout import Batch
from .chunked_logps import chunked_token_logps


@dataclass
class SequenceStats:
    """Per-response statistics, shaped [num_examples, responses_per_example].

    ``logps`` is the sum over response tokens of log pi(y_t | x, y_<t) in fp32. ``token_logps``
    (only when asked for) is [E, R, longest response] with zeros past each response's end;
    ``token_mask`` marks the real entries.
    """

    logps: torch.Tensor
    token_counts: torch.Tensor
    token_logps: torch.Tensor | None = None
    token_mask: torch.Tensor | None = None

    @property
    def mean_logps(self) -> torch.Tensor:
        """Length-normalised log-probability, log pi(y|x) / |y|."""
        return self.logps / self.token_counts

    def detach(self) -> "SequenceStats":
        return SequenceStats(
            *(None if t is None else t.detach() for t in
              (self.logps, self.token_counts, self.token_logps, self.token_mask))
        )


def causal_lm_of(model: nn.Module) -> nn.Module:
    """The transformers causal LM inside a PEFT wrapper (LoRA layers stay injected)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


class LogpModel(nn.Module):
    """Wraps a causal LM so one ``forward`` returns log-probs of the batch's response tokens.

    It runs the decoder to its final hidden states and applies the output projection only at
    response positions, in chunks (see ``chunked_token_logps``). Wrapping the whole computation
    in one module keeps DDP/FSDP hooks intact under accelerate.
    """

    def __init__(self, model: nn.Module, chunk_tokens: int = 256):
        super().__init__()
        self.model = model
        self.chunk_tokens = chunk_tokens
        lm = causal_lm_of(model)
        if getattr(lm.config, "final_logit_softcapping", None):
            raise NotImplementedError(
                f"{type(lm).__name__} uses final_logit_softcapping, which preftune's chunked "
                "log-probs do not support yet."
            )
        if getattr(lm.get_output_embeddings(), "bias", None) is not None:
            raise NotImplementedError("output projections with a bias are not supported yet.")

    def forward(self, batch: Batch) -> torch.Tensor:
        lm = causal_lm_of(self.model)
        if batch.unit_ids is None:
            mask, positions = batch.attention_mask, None
        else:  # prefix-shared or packed rows: per-token visibility, positions restart
            mask, positions = batch.attention_bias(lm.dtype), batch.position_ids
        hidden = lm.get_decoder()(
            input_ids=batch.input_ids, attention_mask=mask, position_ids=positions,
            use_cache=False,
        ).last_hidden_state
        hidden = hidden.reshape(-1, hidden.shape[-1])[batch.logit_positions]
        weight = lm.get_output_embeddings().weight
        return chunked_token_logps(hidden, weight, batch.target_tokens, self.chunk_tokens)


def sequence_stats(token_logps: torch.Tensor, batch: Batch, per_token: bool = False) -> SequenceStats:
    """Sum flat response-token log-probs into per-response stats."""
    shape = (batch.num_examples, batch.responses_per_example)
    owner = batch.target_response
    logps = token_logps.new_zeros(batch.num_responses).index_add(0, owner, token_logps)
    counts = torch.bincount(owner, minlength=batch.num_responses).to(token_logps.dtype)
    stats = SequenceStats(logps.view(shape), counts.view(shape))
    if per_token:
        width = int(batch.target_offset.max()) + 1 if owner.numel() else 0
        grid = token_logps.new_zeros(batch.num_responses, width)
        mask = torch.zeros(batch.num_responses, width, dtype=torch.bool, device=grid.device)
        grid = grid.index_put((owner, batch.target_offset), token_logps)
        mask[owner, batch.target_offset] = True
        stats.token_logps = grid.view(*shape, width)
        stats.token_mask = mask.view(*shape, width)
    return stats
