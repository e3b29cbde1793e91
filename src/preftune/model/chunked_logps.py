"""Token log-probabilities from hidden states without ever building [tokens x vocab] logits.

The output projection is applied to a few hundred positions at a time; in backward each chunk's
logits are recomputed, so peak memory holds one chunk's logits instead of the whole batch's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint


@dataclass(frozen=True)
class Head:
    """What a model does to ``hidden @ weight.T`` before its softmax: multiply by ``scale``
    (Cohere's ``logit_scale``, Granite's ``1 / logits_scaling``, Falcon-H1's
    ``lm_head_multiplier``), then cap softly, ``softcap * tanh(logits / softcap)`` (Gemma 2's
    ``final_logit_softcapping``). ``forward.output_head`` reads it from a model's config."""

    scale: float = 1.0
    softcap: float | None = None

    @property
    def plain(self) -> bool:
        return self.scale == 1.0 and not self.softcap

    def logits(self, hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The fp32 logits of ``hidden`` [n, d] under output embedding ``weight`` [vocab, d]."""
        logits = (hidden @ weight.T).float()
        if self.scale != 1.0:
            logits = logits * self.scale
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def backward(self, hidden, weight, targets, grad_logps) -> torch.Tensor:
        """d (grad_logps . log softmax(logits)[targets]) / d (hidden @ weight.T), in fp32."""
        raw, capped = hidden @ weight.T, None
        if self.plain:  # the softmax straight from the model-dtype logits: no fp32 copy besides
            grad = torch.softmax(raw, dim=-1, dtype=torch.float32).neg_()
        else:
            raw = raw.float() * self.scale
            capped = torch.tanh(raw / self.softcap) if self.softcap else None
            grad = torch.softmax(raw if capped is None else capped * self.softcap, dim=-1).neg_()
        # d logp[target] / d logits = onehot(target) - softmax(logits)
        grad.scatter_add_(1, targets[:, None], torch.ones_like(grad[:, :1]))
        grad *= grad_logps[:, None]
        if capped is not None:  # d cap tanh(z / cap) / dz = 1 - tanh^2
            grad *= 1 - capped * capped
        if self.scale != 1.0:
            grad *= self.scale
        return grad


PLAIN = Head()


def log_collision(log_probs: torch.Tensor) -> torch.Tensor:
    """log sum_v pi(v)^2 per row of full log-probabilities [n, vocab]: the log-probability
    that two draws from the distribution agree (WPO's weight alignment)."""
    return torch.logsumexp(2 * log_probs, dim=-1)


class _ChunkedTokenLogps(torch.autograd.Function):
    """log softmax(head(h @ W^T))[target] per row of ``hidden``, chunk by chunk in fp32; with
    ``collisions`` also each row's ``log_collision`` (no gradient; else an empty tensor)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_tokens, head, collisions):
        logps = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        collision = torch.empty(hidden.shape[0] if collisions else 0, dtype=torch.float32,
                                device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_tokens):
            stop = start + chunk_tokens
            logits = head.logits(hidden[start:stop], weight)
            picked = logits.gather(1, targets[start:stop, None]).squeeze(1)
            normaliser = torch.logsumexp(logits, dim=-1)
            logps[start:stop] = picked - normaliser
            if collisions:  # the chunk's log-probabilities, in place of its logits
                collision[start:stop] = log_collision(logits.sub_(normaliser[:, None]))
            del logits  # before the next chunk's, not after
        ctx.save_for_backward(hidden, weight, targets)
        ctx.chunk_tokens, ctx.head = chunk_tokens, head
        ctx.mark_non_differentiable(collision)
        return logps, collision

    @staticmethod
    def backward(ctx, grad_logps, _grad_collision):
        hidden, weight, targets = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_weight else None
        for start in range(0, hidden.shape[0], ctx.chunk_tokens):
            stop = start + ctx.chunk_tokens
            h = hidden[start:stop]
            grad_logits = ctx.head.backward(h, weight, targets[start:stop],
                                            grad_logps[start:stop])
            if need_weight:  # accumulated in fp32 from the fp32 chunk, in place: no [vocab, d]
                grad_weight.addmm_(grad_logits.T, h.float())  # product to round or cast
            if need_hidden:
                grad_hidden[start:stop] = grad_logits.to(weight.dtype) @ weight
            del grad_logits  # before the next chunk's, not after
        if need_weight:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None


def chunked_token_logps(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_tokens: int = 256,
    head: Head = PLAIN, collisions: bool = False,
):
    """Log-probability of ``targets[i]`` under ``softmax(head(hidden[i] @ weight.T))``, in fp32.

    hidden: [n, d] final hidden states at the positions that predict each target token.
    weight: [vocab, d] output embedding. targets: [n] token ids. Returns [n] fp32 log-probs;
    with ``collisions``, ``(log-probs, log_collision per row)``, the second without gradient.
    """
    logps, collision = _ChunkedTokenLogps.apply(hidden, weight, targets, int(chunk_tokens), head,
                                                collisions)
    return (logps, collision) if collisions else logps


def _logps_and_kl(hidden, weight, targets, ref_hidden, ref_weight, head, collisions):
    """One chunk: log pi(target) and KL(pi_ref || pi) over the vocabulary, and with
    ``collisions`` log_collision of pi (no gradient), all in fp32."""
    log_pi = torch.log_softmax(head.logits(hidden, weight), dim=-1)
    with torch.no_grad():
        log_ref = torch.log_softmax(head.logits(ref_hidden, ref_weight), dim=-1)
        extra = (log_collision(log_pi),) if collisions else ()
    kl = (log_ref.exp() * (log_ref - log_pi)).sum(-1)
    return log_pi.gather(1, targets[:, None]).squeeze(1), kl, *extra


def chunked_token_logps_and_kl(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
    ref_hidden: torch.Tensor, ref_weight: torch.Tensor, chunk_tokens: int = 256,
    head: Head = PLAIN, collisions: bool = False,
) -> tuple:
    """Token log-probs plus the forward KL from the reference's next-token distribution (and
    with ``collisions`` each position's ``log_collision``, a third result).

    At each position, KL(pi_ref || pi_theta) = sum_v pi_ref(v) (log pi_ref(v) - log pi_theta(v)),
    with pi_ref = softmax(head(ref_hidden @ ref_weight^T)) (no gradient; the reference is the
    same architecture) and pi_theta as in ``chunked_token_logps``. Each chunk is
    checkpointed: only one chunk's [tokens x vocab] logits of either model exist at a time, in
    forward and in backward.
    """
    parts = [checkpoint(_logps_and_kl, hidden[start:start + chunk_tokens], weight,
                        targets[start:start + chunk_tokens], ref_hidden[start:start + chunk_tokens],
                        ref_weight, head, collisions, use_reentrant=False)
             for start in range(0, hidden.shape[0], chunk_tokens)]
    if not parts:
        return (hidden.new_zeros(0, dtype=torch.float32),) * (3 if collisions else 2)
    return tuple(torch.cat(column) for column in zip(*parts))
