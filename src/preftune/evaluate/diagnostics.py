"""Preference diagnostics as pure functions on tensors (no model inside).

Pair tensors are ``[E, 2]``: column 0 is the chosen response y_w, column 1 the rejected y_l.
Log-probabilities are sums over response tokens, log pi(y|x) (``SequenceStats.logps``). Every
comparison is strict, so a tie counts as *not* correct.

Sources (arXiv ids):
- implied reward r = beta * (log pi - log pi_ref): DPO, arXiv:2305.18290.
- ranking accuracy, idealized ranking accuracy R*, alignment gap: Chen et al., "Preference
  Learning Algorithms Do Not Learn Preference Rankings", arXiv:2405.19534.
- likelihood displacement and CHES: Razin et al., "Unintentional Unalignment: Likelihood
  Displacement in Direct Preference Optimization", arXiv:2410.08847.
- top-k entropy and top-k probability mass: Shi et al., "Understanding Likelihood
  Over-optimisation in Direct Alignment Algorithms", arXiv:2410.11677.
"""

from __future__ import annotations

import math

import torch


def implied_rewards(policy_logps: torch.Tensor, reference_logps: torch.Tensor,
                    beta: float) -> torch.Tensor:
    """DPO's implied reward r(y) = beta * (log pi(y|x) - log pi_ref(y|x)), elementwise."""
    return beta * (policy_logps - reference_logps)


def reward_accuracy(rewards: torch.Tensor) -> float:
    """Implied-reward accuracy: mean over pairs of 1[r_w > r_l] (ties are not correct)."""
    return (rewards[:, 0] > rewards[:, 1]).float().mean().item()


def reward_margin(rewards: torch.Tensor) -> float:
    """Mean implied-reward margin: mean over pairs of r_w - r_l."""
    return (rewards[:, 0] - rewards[:, 1]).mean().item()


def ranking_correct(logps: torch.Tensor) -> torch.Tensor:
    """Per pair, 1[log pi(y_w|x) > log pi(y_l|x)] (arXiv:2405.19534).

    Pass summed log-probs for the ranking accuracy R(pi), or log pi / |y| for its
    length-normalised variant. Ties count as not correct (the paper's code treats near-ties
    within 5% separately; this library does not).
    """
    return logps[:, 0] > logps[:, 1]


def vote_reward_gap(chosen_votes: torch.Tensor, rejected_votes: torch.Tensor) -> torch.Tensor:
    """The Bradley-Terry true reward gap from vote fractions: r*(y_w) - r*(y_l) = log(a_w / a_l).

    Only the ratio matters, so raw vote counts work as well as fractions (arXiv:2405.19534).
    """
    return torch.log(chosen_votes) - torch.log(rejected_votes)


def idealized_correct(reference_logps: torch.Tensor, true_reward_gap: torch.Tensor,
                      beta: float) -> torch.Tensor:
    """Per pair, whether the optimal DPO/RLHF policy pi* ranks y_w above y_l.

    pi*(y|x) is proportional to pi_ref(y|x) exp(r*(x, y) / beta), so the indicator is
    (r*(y_w) - r*(y_l)) / beta + log pi_ref(y_w|x) - log pi_ref(y_l|x) > 0
    (arXiv:2405.19534). ``true_reward_gap`` is r*(y_w) - r*(y_l): log(a_w / a_l)
    from vote fractions (``vote_reward_gap``) or a score difference taken as the true reward gap.
    """
    return true_reward_gap / beta + reference_logps[:, 0] - reference_logps[:, 1] > 0


def likelihood_displacement(policy_logps: torch.Tensor,
                            reference_logps: torch.Tensor) -> torch.Tensor:
    """Per response, delta = log pi_theta(y|x) - log pi_0(y|x); delta_w < 0 means the chosen
    response lost probability: likelihood displacement (arXiv:2410.08847)."""
    return policy_logps - reference_logps


def ches(chosen_hidden: torch.Tensor, rejected_hidden: torch.Tensor,
         chosen_lengths: torch.Tensor, rejected_lengths: torch.Tensor):
    """CHES and length-normalised CHES per pair (arXiv:2410.08847).

    ``chosen_hidden`` [E, d] is H(y_w) = sum over k of the final hidden state that predicts
    token k of y_w (from the last prompt token to the second-to-last response token); likewise
    for y_l. Returns (CHES, normalised CHES), each [E]:
    CHES = <H_w, H_l> - ||H_w||^2 and <H_w, H_l> / (|y_w| |y_l|) - ||H_w||^2 / |y_w|^2.
    """
    h_w, h_l = chosen_hidden.double(), rejected_hidden.double()
    n_w, n_l = chosen_lengths.double(), rejected_lengths.double()
    cross, own = (h_w * h_l).sum(-1), (h_w * h_w).sum(-1)
    return cross - own, cross / (n_w * n_l) - own / n_w**2


def topk_entropy_and_mass(logits: torch.Tensor, k: int):
    """Top-k entropy H_k and top-k probability mass M_k per position (arXiv:2410.11677).

    ``logits`` [n, V] are the policy's next-token logits at generated positions. With T_k the
    k most probable tokens: M_k = sum over T_k of pi(v), and H_k = -sum over T_k of
    p(v) log p(v), where p = pi restricted to T_k and renormalised (p(v) = pi(v) / M_k), so
    H_k lies in [0, log k]. Returns (H_k [n], M_k [n]).
    """
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    top = log_probs.topk(min(k, log_probs.shape[-1]), dim=-1).values
    log_mass = torch.logsumexp(top, dim=-1)
    renormalised = top - log_mass[:, None]
    entropy = -(renormalised.exp() * renormalised).sum(-1)
    return entropy, log_mass.exp()


def sampled_kl(policy_logps: torch.Tensor, reference_logps: torch.Tensor) -> float:
    """KL(pi || pi_ref) estimated on samples y ~ pi(.|x): mean of log pi(y|x) - log pi_ref(y|x)."""
    return (policy_logps - reference_logps).double().mean().item()


def length_stats(lengths: torch.Tensor) -> dict:
    """Mean, population standard deviation (divides by n), min and max of response lengths."""
    values = lengths.double()
    return {"mean": values.mean().item(), "std": values.std(correction=0).item(),
            "min": values.min().item(), "max": values.max().item()}


def pearson(x: torch.Tensor, y: torch.Tensor) -> float | None:
    """Pearson correlation cov(x, y) / (sd(x) sd(y)); None when either is constant or n < 2."""
    if x.numel() < 2:
        return None
    dx, dy = x.double() - x.double().mean(), y.double() - y.double().mean()
    denominator = math.sqrt((dx * dx).sum().item() * (dy * dy).sum().item())
    if denominator == 0.0:
        return None
    return (dx * dy).sum().item() / denominator


def win_rate(policy_scores: torch.Tensor, reference_scores: torch.Tensor) -> float:
    """Mean over prompts of 1[s_policy > s_ref] + 0.5 * 1[s_policy == s_ref]."""
    wins = (policy_scores > reference_scores).double()
    ties = (policy_scores == reference_scores).double()
    return (wins + 0.5 * ties).mean().item()


def preference_win_rate(preference: torch.Tensor) -> float:
    """Win rate from a pairwise judge's P(policy > reference) per prompt: mean of
    1[P > 1/2] + 0.5 * 1[P == 1/2]."""
    return ((preference > 0.5).double() + 0.5 * (preference == 0.5).double()).mean().item()


def highest_positions(values: torch.Tensor, fraction: float) -> set:
    """Positions of the round(fraction * n) largest values (the pairs ``--filter-top`` drops)."""
    count = round(fraction * values.numel())
    return set(values.argsort(descending=True, stable=True)[:count].tolist())


def cheap_signals(policy_stats, reference_stats, beta: float) -> dict:
    """The diagnostics that need only pair log-probs, for logging at training eval steps.

    ``policy_stats`` and ``reference_stats`` are ``SequenceStats`` of pairs (``logps`` and
    ``token_counts`` [E, R], slot 0 chosen, slot 1 rejected). The reference plays pi_0, the
    initial model, for likelihood displacement. Returns plain floats.
    """
    policy, reference = policy_stats.logps[:, :2], reference_stats.logps[:, :2]
    counts = policy_stats.token_counts[:, :2]
    delta = likelihood_displacement(policy, reference)
    rewards = implied_rewards(policy, reference, beta)
    return {
        "rewards/accuracy": reward_accuracy(rewards),
        "rewards/margin": reward_margin(rewards),
        "ranking/summed": ranking_correct(policy).float().mean().item(),
        "ranking/normalised": ranking_correct(policy / counts).float().mean().item(),
        "displacement/chosen": delta[:, 0].mean().item(),
        "displacement/rejected": delta[:, 1].mean().item(),
        "displacement/chosen_fell": (delta[:, 0] < 0).float().mean().item(),
    }
