"""Model passes for evaluation: score given responses (generation is ``preftune.generation``).

``score_responses`` runs the decoder once per batch of tokenized examples and reads, at the
hidden state that predicts each response token, the token's log-probability (chunked, as in
training), and optionally the sum of those hidden states per response (CHES) and the policy's
top-k entropy and mass there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..data.layout import choose_layout, collate
from ..data.tokenize import TokenizedExample
from ..model.forward import LogpModel, causal_lm_of, sequence_stats
from ..model.verify import check_model, decoder_of, verified_layout
from ..train.logging import progress
from .diagnostics import topk_entropy_and_mass

CHUNK_TOKENS = 256  # the tokens whose logits are built at once


@dataclass
class ResponseScores:
    """Per-response results in the order of the examples given, shaped [E, R, ...].

    ``topk_entropy``/``topk_mass`` are per response token, flattened over all responses (in
    no particular order).
    """

    logps: torch.Tensor  # [E, R] summed log pi(y|x), fp32
    token_counts: torch.Tensor  # [E, R]
    hidden_sums: torch.Tensor | None = None  # [E, R, d] fp32
    topk_entropy: torch.Tensor | None = None  # [tokens]
    topk_mass: torch.Tensor | None = None  # [tokens]


@torch.no_grad()
def score_responses(model, examples: list[TokenizedExample], pad_token_id: int,
                    batch_size: int = 16, hidden_sums: bool = False, top_k: int | None = None,
                    chunk_tokens: int = CHUNK_TOKENS, description: str | None = None,
                    images=None) -> ResponseScores:
    """Log-probs (and optionally CHES hidden sums, top-k stats) of every response of ``examples``.

    Examples are batched by length (less padding), laid out as training would (prefix sharing
    when prompts are longer than responses; every layout gives the same numbers), and the
    results put back in input order. A progress bar named ``description`` when given.
    Examples with images need the model's ``images`` (``tokenizer.image_inputs``).
    """
    logp_model = LogpModel(causal_lm_of(model), chunk_tokens).eval()
    width = causal_lm_of(model).get_output_embeddings().weight.shape[1]
    device = next(model.parameters()).device
    check_model(model, examples)
    layout = verified_layout(*decoder_of(model), choose_layout(examples))
    order = sorted(range(len(examples)), key=lambda i: _size(examples[i]))
    logps, counts, sums, entropies, masses = [], [], [], [], []
    with progress(description, len(examples), "example") as update:
        for start in range(0, len(order), batch_size):
            batch = collate([examples[i] for i in order[start : start + batch_size]],
                            pad_token_id, layout, images=images).to(device)
            hidden, weight = logp_model.hidden_and_weight(batch)  # the training forward pass
            stats = sequence_stats(
                logp_model.token_logps(hidden, weight, batch.target_tokens), batch)
            logps.append(stats.logps)
            counts.append(stats.token_counts)
            if hidden_sums:  # (the model's features only: not a folded-in bias's constant)
                features = hidden[:, :width]
                total = features.new_zeros(batch.num_responses, width, dtype=torch.float32)
                total.index_add_(0, batch.target_response, features.float())
                sums.append(total.view(batch.num_examples, batch.responses_per_example, -1))
            for chunk in hidden.split(chunk_tokens) if top_k else ():
                entropy, mass = topk_entropy_and_mass(logp_model.head.logits(chunk, weight),
                                                      top_k)
                entropies.append(entropy)
                masses.append(mass)
            update(batch.num_examples)
    back = torch.tensor(order).argsort()  # input position -> row in the sorted results
    return ResponseScores(
        logps=torch.cat(logps)[back].cpu(), token_counts=torch.cat(counts)[back].cpu(),
        hidden_sums=torch.cat(sums)[back].cpu() if hidden_sums else None,
        topk_entropy=torch.cat(entropies).cpu() if top_k else None,
        topk_mass=torch.cat(masses).cpu() if top_k else None,
    )


def _size(example: TokenizedExample) -> int:
    return len(example.prompt_ids) + sum(len(ids) for ids in example.response_ids)
