"""The held-out measurement after each online round: greedy answers scored, the diversity of
the model's samples and the KL of the round's model to the initial one on them, and the initial
model's best-of-n baseline."""

from __future__ import annotations

import gc
import statistics
from pathlib import Path

from ..config import ConfigError
from ..data.rows import write_rows
from ..data.tokenize import TokenizedExample
from ..evaluate.diagnostics import sampled_kl
from ..evaluate.sampling import score_responses
from ..generation import HFGenerator, SamplingSettings, greedy_texts
from ..score.base import score_samples
from ..train.output import write_json
from .common import (load_on_device, online_scorer, prompt_images, prompts_to_examples,
                     prompts_to_ids, read_jsonl)
from .config import OnlineConfig
from .diversity import sample_diversity


def evaluate_model(config: OnlineConfig, model_path: str, prompts: list, here: Path) -> dict:
    """Greedy answers to the held-out prompts, scored (the round's headline number; for a
    pairwise scorer, the win rate against the initial model's answers), and the KL of the
    round's model to the initial one on its own samples of those prompts. Besides the scorer,
    one model is held at a time: the round's is released before the initial one loads."""
    # a self-rewarding run's held-out answers are judged by the initial model: a fixed yardstick
    # (loaded first: a scorer that cannot load stops the run before any answer is generated)
    scorer = online_scorer(config, config.model.path, config.data.eval)
    online = config.online
    if online.eval_best_of and model_path == config.model.path and scorer.pairwise:
        raise ConfigError(f"online.eval_best_of keeps each prompt's best-scored sample, but "
                          f"{scorer.name} is pairwise (it only compares two answers); set "
                          "online.eval_best_of: 0, or score with a scorer that rates one answer.")
    model, tokenizer = load_on_device(model_path, config)
    ids = prompts_to_ids(prompts, tokenizer, config)
    images = prompt_images(prompts)
    texts = greedy_texts(model, tokenizer, ids, online.eval_max_new_tokens,
                         online.sampling.batch_size, f"{here.name}: held-out answers", images)
    questions = [p.question for p in prompts]
    if scorer.pairwise:  # no score of one answer: P(this answer > the initial model's answer)
        initial = texts if model_path == config.model.path else [
            row["response"] for row in read_jsonl(here.parent / "initial" / "eval_answers.jsonl")]
        scores = [0.5 if a == b else p
                  for a, b, p in zip(texts, initial, scorer.prefer(questions, texts, initial))]
    else:
        scores = scorer.score(questions, texts)
    here.mkdir(parents=True, exist_ok=True)
    write_rows(here / "eval_answers.jsonl",
               [{"prompt": p.prompt, "response": t, "score": s, "origin": p.origin,
                 **({"images": [i.describe() for i in p.images]} if p.images else {})}
                for p, t, s in zip(prompts, texts, scores)])
    result = {"prompts": len(texts), "mean_score": statistics.fmean(scores)}
    if getattr(scorer, "pass_fail", False):  # checkers, unit tests (not 0/1 by chance)
        result["pass_rate"] = result["mean_score"]
    if online.eval_kl_samples:
        drawn = _held_out_samples(config, model, tokenizer, ids, prompts)
        rows = [{"prompt": p.prompt, "responses": texts, "origin": p.origin}
                for p, texts in zip(prompts, drawn.texts)]
        if not scorer.pairwise:  # how good the samples are whose diversity is measured
            for row, scores in zip(rows, score_samples(scorer, questions, drawn.texts)):
                row["scores"] = scores
            result["sample_mean_score"] = statistics.fmean(s for row in rows
                                                           for s in row["scores"])
        write_rows(here / "eval_samples.jsonl", rows)
        if online.eval_kl_samples >= 2:
            result["sample_diversity"] = sample_diversity(drawn.texts)
    if online.eval_best_of and model_path == config.model.path:
        result["best_of_n"] = _best_of_n(config, model, tokenizer, ids, questions, scorer,
                                         images)
    if online.eval_kl_samples and model_path != config.model.path:
        # the round's log-probs first, then its model goes before the initial one loads
        policy = samples_under(model, tokenizer, prompts, drawn.token_ids, config,
                               "KL: round's model").logps
        del model
        gc.collect()
        result["kl_to_initial"] = _kl_to_initial(config, policy, tokenizer, prompts,
                                                 drawn.token_ids)
    write_json(here / "eval.json", result)
    return result


def _best_of_n(config: OnlineConfig, model, tokenizer, ids: list, questions: list,
               scorer, images: list | None) -> dict:
    """The best-of-n baseline: n samples per held-out prompt (online.sampling's temperature,
    top-p, top-k), each prompt scored by its best sample."""
    online = config.online
    settings = online.sampling.settings(config.train.seed + 1, samples=online.eval_best_of,
                                        max_new_tokens=online.eval_max_new_tokens)
    drawn = HFGenerator(model, tokenizer).generate(ids, settings, "best-of-n: sampling",
                                                   images).texts
    grouped = score_samples(scorer, questions, drawn)
    scores = [s for group in grouped for s in group]
    result = {"n": online.eval_best_of,
              "mean_score": statistics.fmean(max(group) for group in grouped),
              "mean_score_of_samples": statistics.fmean(scores)}
    if getattr(scorer, "pass_fail", False):
        result["pass_rate"] = result["mean_score"]
    return result


def _held_out_samples(config: OnlineConfig, model, tokenizer, ids: list, prompts: list):
    """``eval_kl_samples`` samples of each held-out prompt (seeded: every model draws with the
    same seed), for the diversity of a model's answers and its KL to the initial model."""
    settings = SamplingSettings(samples=config.online.eval_kl_samples,
                                max_new_tokens=config.online.eval_max_new_tokens,
                                batch_size=config.online.sampling.batch_size,
                                seed=config.train.seed)
    return HFGenerator(model, tokenizer).generate(ids, settings, "held-out samples",
                                                  prompt_images(prompts))


def _kl_to_initial(config: OnlineConfig, policy, tokenizer, prompts: list, drawn: list) -> float:
    """KL(pi_round || pi_initial) estimated on the round's model's samples of the held-out
    prompts, whose log-probs under it are ``policy``: the mean of log pi_round(y|x) -
    log pi_initial(y|x), the estimate ``preftune eval`` reports as sampled/kl, from the same
    scoring pass."""
    initial, _ = load_on_device(config.model.path, config)
    reference = samples_under(initial, tokenizer, prompts, drawn, config,
                              "KL: initial model").logps
    return sampled_kl(policy.flatten(), reference.flatten())


def samples_under(model, tokenizer, prompts: list, token_ids: list, config: OnlineConfig,
                  description: str):
    """Log-probs and token counts ([prompts, samples] each) of sampled ``token_ids`` (sample k
    of prompt p: ``token_ids[p][k]``) under ``model``, by the training forward pass."""
    examples = [TokenizedExample(p.prompt_ids, responses, index=n, images=p.images,
                                 image_token_counts=p.image_token_counts)
                for n, (p, responses) in enumerate(zip(
                    prompts_to_examples(prompts, tokenizer, config), token_ids))]
    return score_responses(model, examples, tokenizer.pad_token_id,
                           config.online.sampling.batch_size, description=description,
                           images=getattr(tokenizer, "image_inputs", None))
