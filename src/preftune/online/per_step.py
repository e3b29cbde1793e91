"""Per-step online training (online DPO, arXiv:2402.04792): every optimizer step samples
responses to its prompts from the current policy, scores them, builds pairs and trains on them
at once, against the initial model as reference.

It is the shared ``Trainer`` with a task whose batches are made from fresh samples: the same
objectives, layouts, alarms, checkpoints and ``--resume``. Every step's samples and pairs are
appended to ``samples.jsonl`` and ``pairs.jsonl`` with the step that drew them.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from accelerate import Accelerator
from accelerate.utils import set_seed

from ..config import ConfigError
from ..data.layout import choose_layout, collate
from ..data.images import stored_images
from ..data.records import DataError, Pair
from ..data.tokenize import TokenizeSettings, tokenize_records
from ..generation import HFGenerator
from ..model.forward import causal_lm_of
from ..model.load import load_tokenizer
from ..model.verify import check_attention_device, check_model, decoder_of, layout_setting
from ..model.reference import AdapterOffReference, LiveReference, NoReference
from ..score.base import preference_matrix, score_samples
from ..objectives.compose import Objective
from ..train.loop import (PolicyTask, load_policy, row_multiple, trainable,
                          write_run_header)
from ..train.schedule import count_steps
from ..train.trainer import Trainer
from .build import build_rows, win_probs
from .common import prompt_images, prompts_to_ids, row_question

RETRIES = 4  # further draws of prompts when a step's samples all tie


class OnlineStepTask(PolicyTask):
    """A policy task whose ``train_examples`` are prompts (``online.common.Prompt``); a batch of them
    becomes pairs of the current policy's own samples. ``start_step`` is called by the
    runner before each step."""

    def __init__(self, config, logp_model, tokenizer, objective, prompts, reference, layout,
                 device, scorer, output_dir: Path):
        super().__init__(config, logp_model, tokenizer, objective, {"train": prompts},
                         {"train": reference}, {"train": []}, self._make_batch, layout, device)
        self.scorer, self.output_dir, self.step, self.micro = scorer, Path(output_dir), 0, 0
        self.batches_ahead = False  # a batch is sampled from the policy as it is at its step
        self.settings = TokenizeSettings(config.data.max_length, config.data.max_prompt_length,
                                         tuple(config.data.mask_roles))

    def start_step(self, step: int) -> None:
        self.step, self.micro = step, 0

    def _make_batch(self, prompts: list):
        """Pairs of the current policy's samples of ``prompts``; each micro-batch of a step
        draws with its own seed."""
        seed = self.config.train.seed
        rng = random.Random(f"{seed}:{self.step}" + (f":{self.micro}" if self.micro else ""))
        draw = seed * 1_000_003 + self.step * 16 + self.micro * 1_000_000_007
        self.micro += 1
        for attempt in range(RETRIES + 1):
            rows, scored = self._pairs(prompts, draw + attempt)
            self._log(scored, rows)
            if rows:
                break
            prompts = rng.sample(self.train_examples, min(len(prompts), len(self.train_examples)))
        else:
            raise DataError(
                f"step {self.step + 1}: the samples of {RETRIES + 1} batches of prompts all tied "
                f"under {self.scorer.name}; draw more samples, or more varied ones "
                "(online.sampling.samples, temperature) or use a finer scorer.")
        records = [Pair(r["prompt"], r["chosen"], r["rejected"], origin=r["source"],
                        scores={"chosen_score": r["chosen_score"],
                                "rejected_score": r["rejected_score"]},
                        tools=tuple(r.get("tools", ())),
                        unfinished=tuple(r.get("unfinished", ())),
                        images=row_question(r).images if r.get("images") else ())
                   for r in rows]
        examples, _ = tokenize_records(records, self.tokenizer, self.settings)
        for index, example in enumerate(examples):
            example.index = index
        layout = choose_layout(examples, self.layout, self.config.model.attn_implementation)
        return collate(examples, self.tokenizer.pad_token_id, layout,
                       pad_to_multiple_of=row_multiple(self.config),
                       images=getattr(self.tokenizer, "image_inputs", None))

    def _pairs(self, prompts: list, seed: int) -> tuple[list, list]:
        online = self.config.online
        settings = online.sampling.settings(seed)
        policy = causal_lm_of(self.module.model)
        ids = prompts_to_ids(prompts, self.tokenizer, self.config)
        drawn = HFGenerator(policy, self.tokenizer).generate(ids, settings, None,
                                                             prompt_images(prompts))
        questions = [p.question for p in prompts]
        if self.scorer.pairwise:  # it ranks by win probability, as in rounds
            scores = [win_probs(preference_matrix(self.scorer, question, samples))
                      for question, samples in zip(questions, drawn.texts)]
        else:
            scores = score_samples(self.scorer, questions, drawn.texts)
        scored = [{"prompt": p.prompt, "responses": samples, "ended": ended,
                   "scores": prompt_scores, "origin": p.origin, "step": self.step + 1,
                   **({"win_probs": prompt_scores} if self.scorer.pairwise else {}),
                   **({"tools": list(p.tools)} if p.tools else {}),
                   **({"images": stored_images(p.images, self.output_dir / "images")}
                      if p.images else {})}
                  for p, samples, ended, prompt_scores in zip(prompts, drawn.texts,
                                                              drawn.ended, scores)]
        rows, _ = build_rows(scored, online.pairs.builder, online.pairs.min_margin,
                             online.pairs.rso_beta, online.pairs.rso_accept, seed=seed,
                             unfinished_penalty=online.pairs.unfinished_penalty,
                             with_win_probs=online.pairs.win_probs)
        return rows, scored

    def _log(self, scored: list, rows: list) -> None:
        for name, items in (("samples.jsonl", scored), ("pairs.jsonl", rows)):
            with open(self.output_dir / name, "a", encoding="utf-8") as handle:
                for item in items:
                    handle.write(json.dumps(item, ensure_ascii=False) + "\n")


def run_per_step(config, prompts: list, scorer_of, resume: bool) -> Path:
    """Train ``config`` in per-step online mode; returns the output directory.
    ``scorer_of((model, tokenizer))`` is the scorer, given the policy (which a judge of the
    policy's kind judges with, as it trains)."""
    out = Path(config.output_dir)
    cfg = config.train
    accelerator = Accelerator(gradient_accumulation_steps=1)
    set_seed(cfg.seed)
    device = accelerator.device
    check_attention_device(config.model, device)
    tokenizer = load_tokenizer(config.model.path, config.model.trust_remote_code,
                               config.model.chat_template)
    model = load_policy(config, tokenizer, accelerator)
    check_model(model, max_length=config.data.max_length,
                attn_implementation=config.model.attn_implementation)
    layout = layout_setting(*decoder_of(model), cfg.layout, config.model.attn_implementation)
    total_steps = count_steps(cfg, len(prompts), accelerator.num_processes)
    objective = Objective.from_config(config.objective, total_steps, cfg.example_weight_field)
    if objective.data != "pairs" or objective.extra_references or objective.kl_completions:
        raise ConfigError(f"online.mode per_step trains pairwise objectives on one reference; "
                          f"{objective.name} needs {objective.data} data or more references. Use "
                          "online.mode: rounds.")
    write_run_header(out, config, {"prompts": len(prompts)})
    strategy = config.reference_strategy
    # a copy of the initial model; with LoRA the adapters switched off, unless asked for a
    # copy (reference.strategy: live, which TR-DPO's syncs need)
    live = objective.needs_reference and (config.model.lora is None or strategy == "live")
    reference = LiveReference(model, cfg.logps_chunk_tokens, objective.per_token) \
        if live else NoReference()
    logp_model = trainable(model, config)
    if objective.needs_reference and not live and strategy != "none":
        reference = AdapterOffReference(logp_model, objective.per_token)
    scorer = scorer_of((causal_lm_of(model), tokenizer))
    task = OnlineStepTask(config, logp_model, tokenizer, objective, prompts, reference,
                          layout, device, scorer, out)  # "auto": chosen per batch
    task.reference_strategy = ("live" if live else "adapter-off"
                               if isinstance(reference, AdapterOffReference) else "none")
    trainer = Trainer(task, cfg, out, accelerator, total_steps, resume=resume)
    _keep_logs_through(out, trainer.start_step)
    return trainer.run(before_step=task.start_step)


def _keep_logs_through(out: Path, step: int) -> None:
    """Drop logged samples and pairs of steps after ``step`` (a resumed run redraws them)."""
    for name in ("samples.jsonl", "pairs.jsonl"):
        path = out / name
        if path.exists():
            kept = [line for line in path.read_text(encoding="utf-8").splitlines()
                    if json.loads(line)["step"] <= step]
            path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
