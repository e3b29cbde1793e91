"""Policy training, top to bottom: model, data, reference, objective; the shared ``Trainer``
does the steps (see ``trainer.py``)."""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import set_seed

from ..config import Config
from ..data.convert import conversions
from ..data.layout import choose_layout, collate
from ..data.prepare import (check_example_weights, check_objective_scores, check_train_named,
                            prepare_examples, with_mismatched_completions,
                            with_negative_image_slot)
from ..data.records import DataError
from ..evaluate.diagnostics import cheap_signals
from ..model.checkpointing import enable_checkpointing
from ..model.forward import LogpModel, causal_lm_of, sequence_stats
from ..model.freeze import train_only_part
from ..model.lean import use_lean_layers
from ..model.compile import compile_layers
from ..model.load import (load_model, load_model_and_tokenizer, load_tokenizer,
                          without_dropout)
from ..model.lora import add_lora
from ..model.verify import check_attention_device, check_model, decoder_of, verified_layout
from ..model.reference import AdapterOffReference
from ..model.router import router_balance
from ..objectives import ObjectiveInputs, get_objective
from ..objectives.compose import Objective
from ..objectives.metrics import metric_sums
from .checkpoint import save_final_model
from .logging import progress
from .output import check_same_data, on_main_process, start_run
from .plan import plan
from .generations import eval_generations
from .engines import (check_engine, refuse_sharding, refuse_split_weights, shards,
                      whole_models)
from .references import build_extra_references, build_reference, reference_from, reference_sync
from .run_lock import holding_output_dirs
from .schedule import count_steps
from .trainer import Trainer, add_metrics, means


def objective_inputs(logp_model, reference, extras, batch, objective, step,
                     training: bool = True, balance: bool = False):
    """Policy and reference stats of one batch, with what the objective declared it needs
    (``training`` False: an objective's state is read, not updated), and with ``balance`` the
    routers' load-balancing loss of a mixture-of-experts policy (else None)."""
    wanted = {"balance": balance, "collisions": objective.policy_collisions}
    if objective.reference_distributions:  # TDPO-style: KL to the reference's full distribution
        reference_stats, reference_hidden = reference.stats_with_hidden(batch)
        output = logp_model(batch, reference_hidden, **wanted)
    else:
        reference_stats = reference.stats(batch)
        output = logp_model(batch, **wanted)
    tokens, balancing = output if balance else (output, None)
    # token log-probs, then the KL to the reference and WPO's collisions when asked for
    token_logps, *rest = tokens if isinstance(tokens, tuple) else (tokens,)
    token_kl = rest.pop(0) if objective.reference_distributions else None
    policy = sequence_stats(token_logps, batch, objective.per_token, token_kl, *rest)
    inputs = ObjectiveInputs(policy, reference_stats, batch.scores, step,
                             [extra.stats(batch) for extra in extras], training=training)
    return inputs, balancing


@torch.no_grad()
def evaluate(logp_model, reference, extras, examples, objective, make_batch, batch_size, device,
             step=0):
    """Mean loss and preference metrics of the current policy over ``examples``, plus for pairs
    with a reference the cheap diagnostics of ``preftune eval`` (ranking accuracy, likelihood
    displacement) as ``diag/...``."""
    was_training = logp_model.training
    logp_model.eval()
    totals: dict = {}
    with progress("eval", len(examples), "example", leave=False) as update:
        for start in range(0, len(examples), batch_size):
            batch = make_batch(examples[start : start + batch_size]).to(device)
            inputs, _ = objective_inputs(logp_model, reference, extras, batch, objective, step,
                                         training=False)
            add_metrics(totals, metric_sums(objective.data, inputs, objective(inputs)[0]))
            n = batch.num_examples
            if objective.data == "pairs" and inputs.reference is not None:
                # each signal is a mean over the batch's pairs
                add_metrics(totals, {f"diag/{name}": (value * n, n) for name, value in
                                     cheap_signals(inputs.policy, inputs.reference, 1.0).items()
                                     if not name.startswith("rewards/")})
            update(n)
    logp_model.train(was_training)
    return means(totals)


class PolicyTask:
    """A policy trained under a preference objective: what ``Trainer`` needs from
    ``preftune train`` (built by ``policy_task``)."""

    def __init__(self, config: Config, logp_model: LogpModel, tokenizer, objective: Objective,
                 splits: dict, references: dict, extras: dict, make_batch, layout: str, device,
                 generations=None):
        self.config, self.module, self.tokenizer = config, logp_model, tokenizer
        self.generations = generations  # train.eval_generations (main process only)
        self.objective, self.references, self.extras = objective, references, extras
        self.train_examples, self.eval_examples = splits["train"], splits.get("eval", [])
        self.make_batch, self.layout, self.device = make_batch, layout, device
        self.reference_strategy = config.reference_strategy  # what run.json records
        self.name = objective.name
        self.needs_reference = objective.needs_reference
        self.batches_ahead = True  # batches depend on their examples only
        self.reference_sync = reference_sync(config, references, logp_model.model)
        self.objective_state = objective if objective.has_state else None

    def losses(self, module, batch, step):
        router = self.module.router  # a mixture of experts' load balancing, or None
        inputs, balancing = objective_inputs(module, self.references["train"],
                                             self.extras["train"], batch, self.objective, step,
                                             balance=router is not None)
        output, parts = self.objective(inputs)
        metrics = metric_sums(self.objective.data, inputs, output)
        add_metrics(metrics, {name: (value, batch.num_examples) for name, value in parts.items()})
        if balancing is None:
            return output.losses, metrics
        # the batch's loss, on each of its examples: their mean gets it once
        add_metrics(metrics, {"router_aux_loss": (balancing.detach() * batch.num_examples,
                                                  batch.num_examples)})
        return output.losses + router.coefficient * balancing, metrics

    def evaluate(self, module, step):
        metrics = evaluate(module, self.references["eval"], self.extras["eval"],
                           self.eval_examples, self.objective, self.make_batch,
                           self.config.train.batch_size, self.device, step)
        if self.generations is not None:  # the LogpModel's transformers model answers
            metrics.update(self.generations(getattr(module, "module", module).model, step))
        return metrics

    def unsharded(self, state: dict) -> LogpModel:
        """A plain (unsharded) copy of the policy holding ``state``, the gathered weights of a
        sharded run: the model of model.path, LoRA attached as in training."""
        model = load_model_and_tokenizer(
            self.config.model.path, self.config.model.dtype, self.config.model.trust_remote_code,
            allow_pickle=self.config.model.allow_pickle)[0]
        if self.config.model.lora is not None:
            model = add_lora(model, self.config.model.lora)
        copy = LogpModel(model, self.config.train.logps_chunk_tokens)
        copy.load_state_dict(state)
        return copy

    def save(self, module, output_dir: Path):
        save_merged = self.config.model.lora.save_merged if self.config.model.lora else True
        model = self.config.model
        # QLoRA: the adapter merges into the base's own weights, not their 4-bit copies
        unquantized = (lambda: load_model(model.path, self.tokenizer, model.dtype,
                                          model.trust_remote_code,
                                          allow_pickle=model.allow_pickle)) \
            if model.quantize else None
        save_final_model(module.model, self.tokenizer, output_dir, save_merged, unquantized)

    def run_info(self) -> dict:
        return {"objective": self.objective.name,
                "params": self.objective.recorded_params(),
                "reference": self.reference_strategy, "layout": self.layout,
                **({"reference_sync": {"every": self.reference_sync.every,
                                       "mix": self.reference_sync.mix}}
                   if self.reference_sync else {}),
                **precision(self.config.model),
                **({"model_kind": "vision-language"} if getattr(
                    self.tokenizer, "image_inputs", None) else {})}


def shape_mismatch(objective, shape: str, data) -> str:
    """Why ``data`` (its records of ``shape``, converted by ``data.convert``) cannot train
    ``objective``, and the ``data.convert`` values that would make its shape."""
    given = [data.convert] if isinstance(data.convert, str) else list(data.convert or [])
    source = f"{data.train} gives {shape} after data.convert [{', '.join(given)}]" if given else \
        f"{data.train} holds {shape}"
    ways = [f"[{', '.join([*given, way.strip('[]')])}]" if given else way
            for way in conversions(shape, objective.data)]
    convert_it = (f"Convert it with data.convert: {' or '.join(ways)}, or pick" if ways else
                  f"No data.convert turns {shape} into {objective.data}: pick")
    return (f"{objective.name} trains on {objective.data} data, but {source}. {convert_it} an "
            f"objective for {shape} (`preftune objectives`).")


def _say_split(objective: Objective, accumulation: int, processes: int) -> None:
    """A note where splitting a step into micro-batches changes it: a loss over the
    micro-batch as a whole (over processes too), a state updated on each micro-batch."""
    names = objective.split_by(accumulation > 1, processes > 1)
    if names:
        print(f"note: {' and '.join(names)} reads each micro-batch as a whole (a statistic "
              f"over its examples, or a state it updates), so a step split into {accumulation} "
              f"micro-batches on {processes} processes differs from one batch of the same "
              "examples (README: Objectives).")


def policy_task(config: Config, accelerator: Accelerator, plan_only: bool = False):
    """Load the model and data, build the objective and the reference, attach LoRA. Returns
    (task, total_steps), or (None, 0) after printing the plan when ``plan_only``."""
    output_dir = Path(config.output_dir)
    cfg = config.train
    device = accelerator.device
    strategy = config.reference_strategy
    check_attention_device(config.model, device)
    check_train_named(config.data)
    tokenizer = load_tokenizer(config.model.path, config.model.trust_remote_code,
                               config.model.chat_template)
    # the data is read and checked before the weights load (or download): a bad record stops
    # the run early
    train_examples, eval_examples, data_report, shape = read_data(config, tokenizer)
    if not plan_only:
        check_same_data(output_dir, data_report)
    if cfg.example_weight_field:
        check_example_weights(train_examples + eval_examples, cfg.example_weight_field)
    total_steps = count_steps(cfg, len(train_examples), accelerator.num_processes)
    objective = Objective.from_config(config.objective, total_steps, cfg.example_weight_field,
                                      train_examples)
    check_objective_scores(train_examples + eval_examples, objective)
    if accelerator.is_main_process:
        _say_split(objective, cfg.gradient_accumulation_steps, accelerator.num_processes)
    if not plan_only and objective.data == shape:  # (what objectives that prepare need)
        data_report.update(objective.prepare(train_examples, eval_examples, cfg.seed, device))
    model = load_policy(config, tokenizer, accelerator)
    if not plan_only and accelerator.is_main_process:  # a plan writes nothing
        write_run_header(output_dir, config, data_report)
    check_model(model, [*train_examples, *(eval_examples or [])], config.data.max_length,
                config.model.attn_implementation)
    layout = verified_layout(*decoder_of(model), choose_layout(
        train_examples, cfg.layout, config.model.attn_implementation), cfg.layout)
    make_batch = functools.partial(collate, pad_token_id=tokenizer.pad_token_id, layout=layout,
                                   max_row_tokens=cfg.max_row_tokens or config.data.max_length,
                                   pad_to_multiple_of=row_multiple(config),
                                   images=getattr(tokenizer, "image_inputs", None))
    train_examples, eval_examples = (with_objective_slots(objective, split,
                                                          config.data.max_length)
                                     for split in (train_examples, eval_examples))
    splits = {"train": train_examples, **({"eval": eval_examples} if eval_examples else {})}
    if objective.data != shape:
        raise DataError(shape_mismatch(objective, shape, config.data))

    if plan_only:  # (the plan measures what the model keeps, set up as it will train)
        print(plan(config, prepared(model, config), train_examples, layout,
                   tokenizer.pad_token_id, shards(accelerator),
                   getattr(tokenizer, "image_inputs", None)))
        return None, 0
    # the scorer of held-out answers is loaded before any long pass: a bad one stops here
    generations = on_main_process(accelerator, lambda: eval_generations(
        config, splits.get("eval", []), tokenizer, output_dir))

    # Reference (before LoRA: the reference is the initial model, unless reference.model names
    # another), then adapters.
    # (several processes: each computes its share of the precomputed table; the main one
    # writes the cache; further reference models are computed by the main one, then read)
    if config.reference.model is not None:
        with accelerator.main_process_first():
            references = reference_from(config.reference.model, "reference.model", config,
                                        tokenizer, splits, make_batch, objective, device,
                                        strategy)
    else:
        references = build_reference(strategy, config, model, splits, make_batch, objective,
                                     device, accelerator)
    with accelerator.main_process_first():
        extras = build_extra_references(config, tokenizer, splits, make_batch, objective,
                                        device)
    logp_model = trainable(model, config)
    if strategy == "adapter-off":
        adapter_off = AdapterOffReference(logp_model, objective.per_token)
        references = {split: adapter_off for split in splits}
    task = PolicyTask(config, logp_model, tokenizer, objective, splits, references, extras,
                      make_batch, layout, device, generations)
    return task, total_steps


def read_data(config: Config, tokenizer, announce: bool = True):
    """``prepare_examples`` of the run's data, as its objective reads it (prompts kept for
    an objective that prepares the data; gold responses for those that read them)."""
    specs = [get_objective(item.name) for item in config.objective]
    return prepare_examples(config.data, tokenizer, config.train.seed,
                            keep_prompts=any(spec.prepare for spec in specs), announce=announce,
                            gold=tuple(spec.name for spec in specs if spec.gold))


def with_objective_slots(objective: Objective, examples: list, max_length: int) -> list:
    """``examples`` with the responses the objective adds to each: KTO's mismatched
    completions, mDPO's image negatives."""
    if objective.kl_completions:
        examples = with_mismatched_completions(examples, max_length)
    if objective.image_negatives:
        examples = with_negative_image_slot(examples)
    return examples


def load_policy(config: Config, tokenizer, accelerator: Accelerator):
    """The causal LM of model.path to train, on the accelerator's device; its linear layers in
    4 bits under model.quantize (not under a sharding engine, which cannot split them)."""
    model = config.model
    if model.quantize:
        refuse_sharding(accelerator, "model.quantize")
    return load_model(model.path, tokenizer, model.dtype, model.trust_remote_code,
                      model.attn_implementation, model.allow_pickle, model.quantize,
                      accelerator.device)


def precision(model) -> dict:
    """What ``run.json`` says of a config's ``model`` numbers: its dtype, and its 4-bit type
    under model.quantize."""
    return {"dtype": model.dtype, **({"quantize": model.quantize} if model.quantize else {})}


def write_run_header(output_dir: Path, config, data_report: dict) -> None:
    """The resolved config and the data report, written before anything trains."""
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "config.yaml").write_text(yaml.safe_dump(config.model_dump(), sort_keys=False))
    (output_dir / "data_report.json").write_text(json.dumps(data_report, indent=2))


@holding_output_dirs
def train(config: Config, resume: bool = False, show_progress: bool = True,
          plan_only: bool = False, overwrite: bool = False) -> Path:
    """Train according to ``config``; returns the output directory. ``plan_only`` prints the
    plan (layout, reference, memory estimate) and stops before the reference pass. An
    output_dir holding a run needs ``resume`` (same settings) or ``overwrite`` (moved aside)."""
    accelerator = Accelerator(gradient_accumulation_steps=1)
    check_engine(accelerator, config.train)
    if config.train.eval_generations is not None:
        refuse_split_weights(accelerator, "train.eval_generations",
                             "answers with the policy's whole weights on the main process")
    if not plan_only and start_run(config, accelerator, resume, overwrite):
        # --resume of a finished run: nothing to train, if it trained on this data
        tokenizer = load_tokenizer(config.model.path, config.model.trust_remote_code,
                                   config.model.chat_template)
        check_same_data(config.output_dir, read_data(config, tokenizer, announce=False)[2],
                        finished=True)
        return Path(config.output_dir)
    started = time.perf_counter()  # setup counts in the run's train_seconds
    set_seed(config.train.seed)
    with whole_models(accelerator):
        task, total_steps = policy_task(config, accelerator, plan_only)
    if task is None:
        return Path(config.output_dir)
    return Trainer(task, config.train, Path(config.output_dir), accelerator, total_steps,
                   resume=resume, show_progress=show_progress,
                   shuffle=not config.data.curriculum, started=started).run()


def prepared(model, config: Config):
    """``model`` with dropout off (unless kept), what trains chosen (LoRA or part of the
    weights, if configured) and lean norms and MLPs (if configured), in train mode."""
    if not config.train.keep_dropout:
        without_dropout(model)
    model = trained_part(model, config)
    if config.train.lean_activations:
        use_lean_layers(model)
    return model.train()


def trainable(model, config: Config) -> LogpModel:
    """The model made ready to train (``prepared``), with activation checkpointing and
    compiled layers (if configured), wrapped for log-probs."""
    model = prepared(model, config)
    if config.train.gradient_checkpointing:
        enable_checkpointing(causal_lm_of(model), config.train.checkpoint_every)
    if config.train.compile:
        compile_layers(model, config.train.compile_mode)
    return LogpModel(model, config.train.logps_chunk_tokens,
                     router_balance(causal_lm_of(model), config.train.router_aux_loss_coef))


def row_multiple(config: Config) -> int:
    """Row widths are rounded up to a multiple of this: a few repeating shapes for compiled
    layers, whole 128-token blocks for FlexAttention's block mask."""
    if config.train.pad_to_multiple_of:
        return config.train.pad_to_multiple_of
    if config.model.attn_implementation == "flex_attention":
        return 128
    return 64 if config.train.compile else 1


def trained_part(model, config: Config):
    """``model`` with what trains chosen: LoRA adapters (model.lora), some layers or weights
    (model.train_layers / train_params, the rest frozen), or everything."""
    settings = config.model
    if settings.lora is not None:
        return add_lora(model, settings.lora)
    if settings.trains_part:
        print(train_only_part(model, settings))
    return model
