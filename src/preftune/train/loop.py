"""The training loop, top to bottom: model, data, reference, optimizer, steps, checkpoints."""

from __future__ import annotations

import functools
import json
import math
import time
from dataclasses import asdict
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import set_seed

from ..config import Config, ConfigError
from ..data.layout import choose_layout, collate
from ..data.prepare import prepare_examples, with_mismatched_completions
from ..data.records import DataError
from ..evaluate.diagnostics import cheap_signals
from ..model.forward import LogpModel, causal_lm_of, sequence_stats
from ..model.load import add_lora, cache_root, load_model_and_tokenizer
from ..model.reference import (
    AdapterOffReference, LiveReference, NoReference, precomputed_reference,
)
from ..objectives import ObjectiveInputs
from ..objectives.compose import Objective
from ..objectives.metrics import metric_sums
from .alarms import Alarms, WeightProbe
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint, save_final_model
from .in_backward import AdamWInBackward
from .logging import MetricsLog, progress_bar
from .memory import return_freed_tensors_to_the_os
from .plan import plan


def lr_lambda(total_steps: int, warmup_steps: int, schedule: str):
    """Multiplier of the peak learning rate at each step: linear warmup, then decay."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if schedule == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return max(0.0, 1.0 - progress)

    return factor


def example_stream(num_examples: int, examples_per_step: int, total_steps: int, seed: int,
                   shuffle: bool = True):
    """Example order for the whole run: a fresh permutation per epoch, fixed by the seed (or the
    data's own order, for curricula). Step k always trains on the same examples, which is what
    makes resuming exact.
    """
    needed, order, epoch = total_steps * examples_per_step, [], 0
    while len(order) < needed:
        generator = torch.Generator().manual_seed(seed * 1000 + epoch)
        order += (torch.randperm(num_examples, generator=generator).tolist() if shuffle
                  else list(range(num_examples)))
        epoch += 1
    return order


def add_metrics(totals: dict, new: dict) -> None:
    for name, (value, count) in new.items():
        old_value, old_count = totals.get(name, (0.0, 0.0))
        totals[name] = (old_value + value, old_count + count)


def means(totals: dict) -> dict:
    return {name: value / count for name, (value, count) in totals.items() if count}


def build_reference(strategy, config, model, examples_by_split, make_batch, objective, device):
    """One reference per data split (the precomputed one is a table per split)."""
    chunk = config.train.logps_chunk_tokens
    if strategy == "none":
        return {split: NoReference() for split in examples_by_split}
    if strategy == "live":
        live = LiveReference(model, chunk, objective.per_token)
        return {split: live for split in examples_by_split}
    if strategy == "adapter-off":
        return None  # built after LoRA is attached
    cache_dir = Path(config.reference.cache_dir or cache_root() / "reference")
    references = {}
    for split, examples in examples_by_split.items():
        bar = progress_bar(len(examples), f"reference logps ({split})")
        reference, hit = precomputed_reference(
            model, examples, make_batch=make_batch,
            batch_size=config.train.batch_size, chunk_tokens=chunk, per_token=objective.per_token,
            device=device, cache_dir=cache_dir, progress=bar.update,
            settings={"max_length": config.data.max_length,
                      "max_prompt_length": config.data.max_prompt_length},
        )
        bar.close()
        if hit:
            print(f"reference logps ({split}): loaded from cache {cache_dir}")
        references[split] = reference
    return references


def build_extra_references(config, tokenizer, examples_by_split, make_batch, objective, device):
    """MRPO's further references: each model of reference.extra_models is loaded, run once over
    the data (cached like the precomputed reference) and freed, so only tables stay in memory."""
    extras = {split: [] for split in examples_by_split}
    for path in config.reference.extra_models:
        model, other = load_model_and_tokenizer(path, config.model.dtype,
                                                config.model.trust_remote_code)
        if other.get_vocab() != tokenizer.get_vocab():
            raise DataError(f"reference.extra_models: {path} has a different tokenizer from "
                            f"model.path {config.model.path}; extra references must share it "
                            "(re-tokenising for another vocabulary is not supported).")
        one = build_reference("precomputed", config, model.to(device), examples_by_split,
                              make_batch, objective, device)
        for split in extras:
            extras[split].append(one[split])
        del model
    return extras


def objective_inputs(logp_model, reference, extras, batch, objective, step) -> ObjectiveInputs:
    """Policy and reference stats of one batch, with what the objective declared it needs."""
    if objective.reference_distributions:  # TDPO-style: KL to the reference's full distribution
        reference_stats, reference_hidden = reference.stats_with_hidden(batch)
        token_logps, token_kl = logp_model(batch, reference_hidden)
        policy = sequence_stats(token_logps, batch, objective.per_token, token_kl)
    else:
        reference_stats = reference.stats(batch)
        policy = sequence_stats(logp_model(batch), batch, objective.per_token)
    return ObjectiveInputs(policy, reference_stats, batch.scores, step,
                           [extra.stats(batch) for extra in extras])


@torch.no_grad()
def evaluate(logp_model, reference, extras, examples, objective, make_batch, batch_size, device,
             step=0):
    """Mean loss and preference metrics of the current policy over ``examples``, plus for pairs
    with a reference the cheap diagnostics of ``preftune eval`` (ranking accuracy, likelihood
    displacement) as ``diag/...``."""
    was_training = logp_model.training
    logp_model.eval()
    totals: dict = {}
    for start in range(0, len(examples), batch_size):
        batch = make_batch(examples[start : start + batch_size]).to(device)
        inputs = objective_inputs(logp_model, reference, extras, batch, objective, step)
        add_metrics(totals, metric_sums(objective.data, inputs, objective(inputs)[0]))
        if objective.data == "pairs" and inputs.reference is not None:
            n = batch.num_examples  # each signal is a mean over the batch's pairs
            add_metrics(totals, {f"diag/{name}": (value * n, n) for name, value in
                                 cheap_signals(inputs.policy, inputs.reference, 1.0).items()
                                 if not name.startswith("rewards/")})
    logp_model.train(was_training)
    return means(totals)


def train(config: Config, resume: bool = False, show_progress: bool = True,
          plan_only: bool = False) -> Path:
    """Train according to ``config``; returns the output directory. ``plan_only`` prints the
    plan (layout, reference, memory estimate) and stops before the reference pass."""
    output_dir = Path(config.output_dir)
    cfg = config.train
    accelerator = Accelerator(gradient_accumulation_steps=1)
    device = accelerator.device
    if device.type == "cpu" and cfg.optimizer_in_backward:  # let freed gradients leave the process
        return_freed_tensors_to_the_os()
    set_seed(cfg.seed)
    strategy = config.reference_strategy

    # Model and data.
    if config.model.attn_implementation == "flex_attention" and device.type != "cuda":
        raise ConfigError("model.attn_implementation 'flex_attention' trains on CUDA only (torch "
                          "has no FlexAttention backward on CPU); remove it or use 'sdpa'.")
    model, tokenizer = load_model_and_tokenizer(
        config.model.path, config.model.dtype, config.model.trust_remote_code,
        config.model.attn_implementation,
    )
    model.to(device)
    train_examples, eval_examples, data_report, shape = prepare_examples(
        config.data, tokenizer, cfg.seed)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "config.yaml").write_text(yaml.safe_dump(config.model_dump(), sort_keys=False))
    (output_dir / "data_report.json").write_text(json.dumps(data_report, indent=2))
    splits = {"train": train_examples, **({"eval": eval_examples} if eval_examples else {})}
    layout = choose_layout(train_examples) if cfg.layout == "auto" else cfg.layout
    make_batch = functools.partial(collate, pad_token_id=tokenizer.pad_token_id, layout=layout,
                                   max_row_tokens=cfg.max_row_tokens or config.data.max_length)
    examples_per_step = cfg.batch_size * cfg.gradient_accumulation_steps
    total_steps = cfg.max_steps or max(
        1, math.ceil(cfg.epochs * len(train_examples) / examples_per_step)
    )
    objective = Objective.from_config(config.objective, total_steps, cfg.example_weight_field)
    if objective.kl_completions:
        train_examples = with_mismatched_completions(train_examples, config.data.max_length)
        eval_examples = with_mismatched_completions(eval_examples, config.data.max_length)
        splits = {"train": train_examples, **({"eval": eval_examples} if eval_examples else {})}
    if objective.data != shape:
        raise DataError(
            f"{objective.name} trains on {objective.data} data, but {config.data.train} holds "
            f"{shape}. Convert it with data.convert (one of: pairs:best_vs_worst, "
            "pairs:all_pairs, pairs:best_vs_each, unpaired) or pick an objective for "
            f"{shape} (`preftune objectives`).")

    if plan_only:
        model = _attach_lora(model, config)
        trainable_count = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print(plan(config, causal_lm_of(model).config, sum(p.numel() for p in model.parameters()),
                   trainable_count, train_examples, layout, tokenizer.pad_token_id))
        return output_dir

    # Reference (before LoRA: the reference is the initial model), then adapters.
    references = build_reference(strategy, config, model, splits, make_batch, objective, device)
    extras = build_extra_references(config, tokenizer, splits, make_batch, objective, device)
    model = _attach_lora(model, config)
    if cfg.gradient_checkpointing:
        causal_lm_of(model).gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    logp_model = LogpModel(model, cfg.logps_chunk_tokens)
    if strategy == "adapter-off":
        adapter_off = AdapterOffReference(logp_model, objective.per_token)
        references = {split: adapter_off for split in splits}

    # Optimizer and schedule.
    warmup_steps = int(cfg.warmup_ratio * total_steps)
    trainable = [p for p in logp_model.parameters() if p.requires_grad]
    if cfg.optimizer_in_backward:  # each weight updated as its gradient completes: less memory
        optimizer = in_backward = AdamWInBackward(trainable, cfg.learning_rate, cfg.weight_decay)
    else:
        optimizer = torch.optim.AdamW(trainable, lr=cfg.learning_rate,
                                      weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(total_steps, warmup_steps, cfg.schedule)
    )
    logp_model, optimizer = accelerator.prepare(logp_model, optimizer)

    start_step = 0
    checkpoint_dir = output_dir / "checkpoints"
    if resume:
        checkpoint = latest_checkpoint(checkpoint_dir)
        if checkpoint is None:
            raise FileNotFoundError(f"--resume: no checkpoint under {checkpoint_dir}")
        start_step = load_checkpoint(checkpoint, accelerator.unwrap_model(logp_model),
                                     optimizer, scheduler)
        print(f"resumed from {checkpoint} (step {start_step})")
    log = MetricsLog(output_dir / "metrics.jsonl", keep_through_step=start_step)
    alarms = Alarms(output_dir / "alarms.jsonl", objective.needs_reference, WeightProbe(trainable))
    order = example_stream(len(train_examples), examples_per_step, total_steps, cfg.seed,
                           shuffle=not config.data.curriculum)

    bar = progress_bar(total_steps, f"train {objective.name}", initial=start_step,
                       disable=not show_progress)
    for step in range(start_step, total_steps):
        started = time.perf_counter()
        step_indices = order[step * examples_per_step : (step + 1) * examples_per_step]
        sums: dict = {}
        real_tokens = slots = 0
        for micro in range(cfg.gradient_accumulation_steps):
            chunk = step_indices[micro * cfg.batch_size : (micro + 1) * cfg.batch_size]
            batch = make_batch([train_examples[i] for i in chunk]).to(device)
            inputs = objective_inputs(logp_model, references["train"], extras["train"], batch,
                                      objective, step)
            output, parts = objective(inputs)
            # Sum over examples / examples per optimizer step: the step's gradient is the mean
            # over all its examples however they are split into micro-batches.
            accelerator.backward(output.losses.sum() / examples_per_step)
            add_metrics(sums, metric_sums(objective.data, inputs, output))
            add_metrics(sums, {name: (value, len(chunk)) for name, value in parts.items()})
            real_tokens += batch.real_tokens
            slots += batch.attention_mask.numel()
        if cfg.optimizer_in_backward:
            grad_norm = in_backward.grad_norm()  # its updates already ran (no clipping)
        else:
            grad_norm = (accelerator.clip_grad_norm_(trainable, cfg.max_grad_norm)
                         if cfg.max_grad_norm else _grad_norm(trainable))
        learning_rate = scheduler.get_last_lr()[0]
        if math.isfinite(sums["loss"][0]):  # a non-finite loss would poison the weights
            optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - started

        record = {"step": step + 1, **means(sums),
                  "lr": learning_rate, "grad_norm": float(grad_norm),
                  "tokens_per_second": real_tokens / seconds,
                  "padding_fraction": 1.0 - real_tokens / slots, "step_seconds": seconds}
        raised = alarms.check(record, [train_examples[i].origin for i in step_indices])
        if raised:
            record["alarms"] = [alarm["kind"] for alarm in raised]
        if cfg.eval_every and (step + 1) % cfg.eval_every == 0:
            metrics = evaluate(logp_model, references["eval"], extras["eval"], eval_examples,
                               objective, make_batch, cfg.batch_size, device, step)
            record.update({f"eval/{k}": v for k, v in metrics.items()})
        if (step + 1) % cfg.log_every == 0 or "eval/loss" in record or raised:
            log.write(record)
        bar.update(1)
        bar.set_postfix(loss=f"{record['loss']:.4f}",
                        **({"acc": f"{record['rewards/accuracies']:.2f}"}
                           if "rewards/accuracies" in record else {}))
        if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < total_steps:
            save_checkpoint(checkpoint_dir, step + 1, accelerator.unwrap_model(logp_model),
                            optimizer, scheduler, cfg.keep_checkpoints)
    bar.close()

    final = accelerator.unwrap_model(logp_model).model
    save_merged = config.model.lora.save_merged if config.model.lora else True
    save_final_model(final, tokenizer, output_dir, save_merged)
    (output_dir / "run.json").write_text(json.dumps(
        {"objective": objective.name, "params": {name: asdict(p) for name, p in
                                                  objective.params_at(0).items()},
         "reference": strategy, "layout": layout, "device": device.type,
         "dtype": config.model.dtype, "steps": total_steps, "train_examples": len(train_examples),
         "eval_examples": len(eval_examples)}, indent=2))
    return output_dir


def _attach_lora(model, config: Config):
    lora = config.model.lora
    if lora is None:
        return model
    return add_lora(model, lora.r, lora.alpha, lora.dropout, lora.target_modules)


def _grad_norm(parameters) -> torch.Tensor:
    grads = [p.grad.norm() for p in parameters if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(grads)) if grads else torch.tensor(0.0)
