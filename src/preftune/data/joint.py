"""Per-side prompts in tokens: a shared prefix, then each side's own part (joint pairs).

A joint pair (DOVE, arXiv:2404.00530) prefers (x_w, y_w) to (x_l, y_l), where the prompts may
differ, and scores each side by the joint log-probability of its prompt and response. Each side's
prompt is rendered and encoded exactly as an ordinary prompt. The example's ``prompt_ids`` are the
longest token prefix the sides share; each response slot holds the rest of its own prompt, then
its response. Nothing is re-encoded: the two pieces are the side's own ids, cut in two, so no
token spans a boundary.

Why this gives DOVE's loss exactly: log pi(x, y) = log pi(shared) + log pi(rest of x, y | shared),
and log pi(shared) is the same for both sides, so it cancels in the difference
rho(x_w, y_w) - rho(x_l, y_l) of reference-normalised log-probs (policy and reference alike).
Scoring only what follows the shared prefix is therefore enough, and prefix sharing, packing and
the reference cache work unchanged. The first token has no context to be predicted from (DOVE's
code scores each sequence after BOS), so the sides must share at least that token.

Ordinary records are the case where every slot has the same prompt: the shared prefix is the
whole prompt, the own parts are empty, and these functions reduce to the plain rules.
"""

from __future__ import annotations

from .records import DataError


def split_shared_prefix(side_prompts: list[list[int]], origin: str) -> tuple[list, list]:
    """(shared prefix, each side's own part): the longest common prefix of the sides' prompt
    ids and what follows it on each side. Every side's prompt must be non-empty."""
    first = side_prompts[0]
    shared = len(first)
    for ids in side_prompts[1:]:
        shared = min(shared, len(ids))
        if ids[:shared] != first[:shared]:  # compared in C; only joint pairs reach the loop
            shared = next(i for i in range(shared) if ids[i] != first[i])
    if shared == 0:
        raise DataError(
            f"{origin}: the chosen and rejected prompts share no first token. A joint pair is "
            f"scored from the second token on (the first has nothing to be predicted from), so "
            f"both sides must start with the same token, such as BOS or the chat template's "
            f"opening. This tokenizer adds none to plain-string prompts: give the prompts as "
            f"message lists (conversational), use a tokenizer that adds BOS, or start both "
            f"prompts with the same text."
        )
    return first[:shared], [ids[shared:] for ids in side_prompts]


def cut_prompts(shared: list, own: list[list], limit: int) -> tuple[list, list[list], bool]:
    """Fit every side's prompt (shared prefix + own part) in ``limit`` >= 1 tokens, keeping its
    end; returns (shared, own, whether anything was cut).

    A side's prompt loses tokens from its start, as an ordinary prompt does. Both sides lose the
    same number from the shared prefix (as many as the side that needs fewer cuts, but never its
    last token), so they still begin alike and the shared part still cancels; a side that must lose
    more loses it from the start of its own part, right after the shared prefix. With no own parts
    this is the plain rule: the prompt keeps its last ``limit`` tokens.
    """
    excess = [max(0, len(shared) + len(part) - limit) for part in own]
    from_shared = min(min(excess), len(shared) - 1)
    own = [part[cut - from_shared :] for part, cut in zip(own, excess)]
    return shared[from_shared:], own, max(excess) > 0
