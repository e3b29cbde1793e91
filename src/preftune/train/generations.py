"""Greedy answers of the policy to a fixed set of held-out prompts at every evaluation
(``train.eval_generations``): what the model now writes, step by step, next to the loss.

Each evaluation appends one row per prompt to ``eval_generations.jsonl`` ({step, origin,
prompt, answer, tokens, ended, score}) and returns means for the eval metrics:
``answer_tokens`` (length), ``answers_ended`` (the share that ended with EOS within
``eval_max_new_tokens``), ``answers_empty`` (the share with no text) and, with a scorer,
``answer_score``; the alarms read the last two. Generation draws no training randomness (``HFGenerator`` forks the RNG) and runs
without compiled graphs, so a run trains the same with or without it.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import torch

from ..config import ConfigError
from ..data.tokenize import distinct_prompts
from ..data.turn_end import stop_ids
from ..generation import HFGenerator, SamplingSettings
from ..score import load_scorer
from ..score.base import checked
from .logging import keep_through

DEFAULT_MAX_NEW_TOKENS = 64
FILE = "eval_generations.jsonl"


class EvalGenerations:
    """The first ``count`` distinct held-out prompts of ``examples`` (tokenized, with their
    records' prompts), answered by the policy at every evaluation."""

    def __init__(self, examples: list, tokenizer, count: int, max_new_tokens: int | None,
                 scorer, output_dir: Path, batch_size: int):
        self.prompts = distinct_prompts(examples)[:count]
        self.tokenizer, self.scorer = tokenizer, scorer
        self.settings = SamplingSettings(temperature=0.0, batch_size=batch_size,
                                         max_new_tokens=max_new_tokens or DEFAULT_MAX_NEW_TOKENS)
        self.path = Path(output_dir) / FILE
        self.trimmed = False  # whether this process dropped the later steps of a resumed run

    @torch.no_grad()
    def __call__(self, model, step: int) -> dict:
        """Answer, score, write the rows of optimizer step ``step`` (0-based); the means."""
        images = [p.images for p in self.prompts] if any(p.images for p in self.prompts) \
            else None
        with _eager():
            drawn = HFGenerator(model, self.tokenizer).generate(
                [p.prompt_ids for p in self.prompts], self.settings, "eval generations", images)
        answers = [texts[0] for texts in drawn.texts]
        lengths = [len(ids[0]) for ids in drawn.token_ids]
        stops = stop_ids(self.tokenizer)
        ended = [bool(ids[0]) and ids[0][-1] in stops for ids in drawn.token_ids]
        rows = [{"step": step + 1, "origin": p.origin, "prompt": p.prompt, "answer": answer,
                 "tokens": n, "ended": end}
                for p, answer, n, end in zip(self.prompts, answers, lengths, ended)]
        empty = [not answer.strip() for answer in answers]
        metrics = {"answer_tokens": sum(lengths) / len(lengths),
                   "answers_ended": sum(ended) / len(ended),
                   "answers_empty": sum(empty) / len(empty)}
        if self.scorer is not None:
            questions = [p.prompt for p in self.prompts]  # with its images and tools
            scores = checked(self.scorer.score(questions, answers), self.scorer.name,
                             len(answers))
            for row, score in zip(rows, scores):
                row["score"] = score
            metrics["answer_score"] = sum(scores) / len(scores)
        self._write(rows, step + 1)
        return metrics

    def _write(self, rows: list[dict], step: int) -> None:
        """Append ``rows``; before the first, drop any of this step or later (a resumed run's,
        written after the checkpoint it continues from)."""
        if not self.trimmed:
            keep_through(self.path, step - 1)
            self.trimmed = True
        with self.path.open("a", encoding="utf-8") as handle:
            handle.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def eval_generations(config, examples: list, tokenizer, output_dir: Path):
    """``EvalGenerations`` for a ``preftune train`` config (None without
    train.eval_generations); the scorer is loaded now, so a bad one stops the run before
    training."""
    cfg = config.train
    if cfg.eval_generations is None:
        return None
    scorer = None
    if cfg.eval_scorer is not None:
        data = config.data.eval or config.data.train
        try:
            scorer = load_scorer(cfg.eval_scorer, data, config.model.dtype)
        except ConfigError as error:
            raise ConfigError(f"train.eval_scorer: {error}") from None
        if scorer.pairwise:
            raise ConfigError(f"train.eval_scorer: {cfg.eval_scorer} compares two answers; "
                              "the answers at an evaluation are scored one by one: use a "
                              "pointwise scorer (judge:MODEL, rm:DIR, a function).")
    return EvalGenerations(examples, tokenizer, cfg.eval_generations, cfg.eval_max_new_tokens,
                           scorer, output_dir, cfg.batch_size)


@contextmanager
def _eager():
    """Compiled layers run eagerly inside: generation's growing shapes would recompile them."""
    set_stance = getattr(torch.compiler, "set_stance", None)  # torch >= 2.6
    if set_stance is None:
        yield
        return
    set_stance("force_eager")
    try:
        yield
    finally:
        set_stance("default")
