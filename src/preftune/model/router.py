"""Mixture-of-experts policies: the routers' load-balancing loss, added to the preference loss
as the model's own causal LM adds it to the language-modelling loss.

A router that sends most tokens to a few experts wastes the others, and preference training
(a few thousand steps on narrow data) can push a balanced router there. Switch Transformers'
auxiliary loss (Fedus et al., arXiv:2101.03961, eq. 4-6), which Mixtral, Qwen2/3-MoE, OLMoE,
GPT-OSS, Granite-MoE and others train with, is E sum_e f_e P_e: f_e is the share of the
tokens' top-k choices that go to expert e (counted over every MoE layer's tokens), P_e the
mean probability the routers give e. It is smallest, k, when both are uniform. TRL's trainers
add it when the model's config has ``output_router_logits``; preftune does the same
(``train.router_aux_loss_coef``).

The tokens are those of the batch's sequences, each prompt with each of its responses, as in
a padded batch: a prefix-shared prompt, run once for all its responses, counts once per
response (``sequence_copies``), so every layout gives the padded layout's loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config_tree import ConfigError


@dataclass(frozen=True)
class RouterBalance:
    """The load-balancing term of a policy: its weight and the model's routing shape."""

    coefficient: float
    experts: int
    top_k: int

    def loss(self, router_logits: tuple, batch) -> torch.Tensor:
        """The batch's balancing loss from each MoE layer's router logits [rows * T, E]."""
        return balancing_loss(router_logits, sequence_copies(batch), self.experts, self.top_k)


def sequence_copies(batch) -> torch.Tensor:
    """How many of the batch's sequences (a prompt and one response) each slot of its rows is
    part of, flat [rows * T]: a prompt token once per response that follows it in its unit
    (the distinct response segments there), a response token once, padding 0. Built on the
    batch's device from its unit and segment ids, with no read back to the host."""
    real = batch.attention_mask.reshape(-1).float()
    if batch.segment_ids is None:  # padded rows: one sequence each
        return real
    rows, width = batch.unit_ids.shape
    unit, segment = batch.unit_ids.reshape(-1), batch.segment_ids.reshape(-1)
    row = torch.arange(rows, device=unit.device).repeat_interleave(width)
    key = row * width + unit.clamp(min=0)  # (row, unit): which prompt a slot belongs to
    response = segment >= 0
    responses = batch.responses_per_example
    seen = real.new_zeros(rows * width * responses).scatter_reduce(
        0, key * responses + segment.clamp(min=0), response.float(), reduce="amax")
    per_unit = seen.view(rows * width, responses).sum(1)
    return torch.where(response, real, per_unit[key] * real)


def router_balance(lm, coefficient: float | None) -> RouterBalance | None:
    """What ``train.router_aux_loss_coef`` (``coefficient``) asks of the causal LM ``lm``:
    None follows the model's config (on when it sets ``output_router_logits``, with its
    ``router_aux_loss_coef``), 0 is off, a number is on with that weight."""
    own = getattr(lm, "router_aux_loss_coef", None)
    experts, top_k = (getattr(lm, name, None) for name in ("num_experts", "num_experts_per_tok"))
    routed = own is not None and isinstance(experts, int) and isinstance(top_k, int)
    if coefficient is None:
        if not routed or not getattr(lm.config.get_text_config(), "output_router_logits", False):
            return None
        coefficient = own
    if coefficient == 0:
        return None
    if not routed:
        raise ConfigError(f"train.router_aux_loss_coef: {coefficient} weights the routers' "
                         "load-balancing loss of a mixture-of-experts model, and "
                         f"{type(lm).__name__} trains without one (not a mixture of experts, or "
                         "one balanced another way); remove the key.")
    return RouterBalance(float(coefficient), experts, top_k)


def balancing_loss(router_logits: tuple, weights: torch.Tensor, experts: int,
                   top_k: int) -> torch.Tensor:
    """E sum_e f_e P_e over the tokens of every layer in ``router_logits`` ([tokens, E] each),
    token i counted ``weights[i]`` times (0: padding): f_e = the weighted count of top-k
    choices of e / the weighted number of tokens, P_e = the weighted mean of softmax(logits)_e.
    """
    weights = weights.to(router_logits[0].device, torch.float32)
    chosen = torch.zeros(experts, device=weights.device)
    probability = torch.zeros(experts, device=weights.device)
    for logits in router_logits:
        probs = torch.softmax(logits.float(), dim=-1)
        picks = probs.topk(top_k, dim=-1).indices.reshape(-1)
        chosen = chosen.index_add(0, picks, weights.repeat_interleave(top_k))
        probability = probability + (probs * weights[:, None]).sum(0)
    tokens = weights.sum() * len(router_logits)
    return experts * ((chosen / tokens) * (probability / tokens)).sum()
