"""What ``preftune eval`` measures on text the models write: statistics of the policy's samples
(KL to the reference, top-k entropy and mass, lengths), and the greedy answers of policy and
reference, which a scorer then compares (the win rate), once the models are released."""

from __future__ import annotations

import contextlib

import torch

from ..data.tokenize import TokenizedExample
from ..generation import HFGenerator, SamplingSettings, greedy_texts
from ..score.base import paired_scores, scored_in_chunks, scorer_prompt
from . import diagnostics as D
from .sampling import score_responses


def sampled_metrics(policy, reference, tokenizer, prompts, options, as_reference) -> dict:
    """KL, top-k entropy/mass, length statistics on ``--samples`` policy samples per prompt;
    the reference computes under ``as_reference()``.

    A response's length counts its tokens including the closing EOS when one was generated.
    """
    settings = SamplingSettings(samples=options.samples, max_new_tokens=options.max_new_tokens,
                                batch_size=options.batch_size, seed=options.seed)
    drawn = HFGenerator(policy, tokenizer).generate([p.prompt_ids for p in prompts], settings,
                                                     "samples: generating",
                                                     prompt_images(prompts)).token_ids
    examples = [TokenizedExample(p.prompt_ids, responses, index=n, images=p.images,
                                 image_token_counts=p.image_token_counts)
                for n, (p, responses) in enumerate(zip(prompts, drawn))]
    images = getattr(tokenizer, "image_inputs", None)
    on_policy = score_responses(policy, examples, tokenizer.pad_token_id, options.batch_size,
                                top_k=options.top_k, description="samples: policy", images=images)
    with as_reference():
        on_reference = score_responses(reference, examples, tokenizer.pad_token_id,
                                       options.batch_size, description="samples: reference",
                                       images=images)
    logps, ref_logps = on_policy.logps.flatten(), on_reference.logps.flatten()
    lengths = on_policy.token_counts.flatten()
    rewards = D.implied_rewards(logps, ref_logps, options.beta)
    stats = D.length_stats(lengths)
    return {
        "sampled/responses": lengths.numel(),
        "sampled/kl": D.sampled_kl(logps, ref_logps),
        "sampled/topk_entropy": on_policy.topk_entropy.mean().item(),
        "sampled/topk_mass": on_policy.topk_mass.mean().item(),
        **{f"sampled/length_{name}": value for name, value in stats.items()},
        "sampled/length_reward_corr": D.pearson(lengths, rewards),
    }


def greedy_answers(policy, reference, as_reference, tokenizer, prompts,
                   options) -> list[list[str]]:
    """[policy's, reference's] greedy answer to each prompt (the reference under
    ``as_reference()``)."""
    texts = []
    for model, who, scope in ((policy, "policy", contextlib.nullcontext),
                              (reference, "reference", as_reference)):
        with scope():
            texts.append(greedy_texts(model, tokenizer, [p.prompt_ids for p in prompts],
                                      options.max_new_tokens, options.batch_size,
                                      f"win rate: {who} answers", prompt_images(prompts)))
    return texts


def win_rate(scorer, texts: list[list[str]], prompts, records) -> tuple[dict, list[dict]]:
    """Win rate of the policy's greedy answers over the reference's (``texts``, from
    ``greedy_answers``) under ``scorer``: by their scores, or, for a pairwise scorer, by its
    P(policy answer > reference answer). Identical answers tie exactly (a model scoring them
    in different batches may differ by rounding). Returns the metrics and one row per prompt
    (origin, both answers, their scores)."""
    same = torch.tensor([a == b for a, b in zip(*texts)])
    questions = [scorer_prompt(records[p.index].prompt, p.images,
                               getattr(records[p.index], "tools", ())) for p in prompts]
    rows = [{"origin": records[p.index].origin, "policy_answer": a, "reference_answer": b}
            for p, a, b in zip(prompts, *texts)]
    result = {"win_rate/prompts": len(prompts), "win_rate/same_answer": same.double().mean().item()}
    if scorer.pairwise:
        preference = torch.tensor(scored_in_chunks(scorer.prefer, "win rate: judging",
                                                   questions, *texts), dtype=torch.float64)
        preference[same] = 0.5
        for row, value in zip(rows, preference.tolist()):
            row["p_policy_better"] = value
        return {**result, "win_rate": D.preference_win_rate(preference),
                "win_rate/preference_mean": preference.mean().item()}, rows
    if getattr(scorer, "whole_set", False):  # a maxmin: one call, so one term, for both sides
        scores = [torch.tensor(part, dtype=torch.float64)
                  for part in paired_scores(scorer, questions, *texts)]
    else:
        scores = [torch.tensor(scored_in_chunks(scorer.score,
                                                f"win rate: scoring {who} answers",
                                                questions, answers), dtype=torch.float64)
                  for answers, who in zip(texts, ("policy", "reference"))]
    scores[1][same] = scores[0][same]
    for row, mine, theirs in zip(rows, scores[0].tolist(), scores[1].tolist()):
        row.update(policy_score=mine, reference_score=theirs)
    return {**result, "win_rate": D.win_rate(*scores),
            "win_rate/policy_score": scores[0].mean().item(),
            "win_rate/reference_score": scores[1].mean().item()}, rows


def prompt_images(prompts) -> list | None:
    """Each prompt's images for generation; None for text-only prompts."""
    return [p.images for p in prompts] if any(p.images for p in prompts) else None
