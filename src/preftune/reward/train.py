"""``preftune rm train``: a reward model trained by the shared ``Trainer`` on the same data
layer and layouts as policies."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from ..data.layout import choose_layout
from ..data.prepare import check_train_named, prepare_examples
from ..data.records import DataError
from ..data.tokenize import tokenize_records
from ..model.checkpointing import enable_checkpointing
from ..model.forward import causal_lm_of
from ..model.freeze import train_only_part
from ..model.load import without_dropout
from ..model.lean import use_lean_layers
from ..model.verify import (check_attention_device, check_image_attention, check_windows,
                            verified_layout)
from ..objectives.metrics import ordered_lists, sum_count, top1_hits
from ..train.logging import progress
from ..train.loop import precision, write_run_header
from ..train.output import check_same_data, start_run
from ..train.run_lock import holding_output_dirs
from ..train.engines import check_engine, refuse_sharding, shards, whole_models
from ..train.schedule import count_steps
from ..train.trainer import Trainer, add_metrics, means
from .config import RewardConfig, detect_attributes
from .encoder import encoder_examples
from .heads import Head
from .losses import RewardInputs, get_reward_loss
from .model import (REWARD_HEADS, RewardModel, attach_reward_lora, backbone_tokenizer,
                    load_backbone, scores_last_token)
from .plan import reward_plan


@torch.no_grad()
def reward_metrics(shape: str, head: Head, outputs: torch.Tensor, scores: dict,
                   losses: torch.Tensor) -> dict:
    """Loss plus how well the head orders the data, as ``{name: (sum, count)}``.

    pairs: accuracy = share with logit P(chosen > rejected) > 0, margin = that logit (the reward
    gap r_w - r_l, or GPM's s / tau); ranked: share of correctly ordered pairs of the list;
    unpaired: share whose reward sign matches the label; rated: mean reward and outputs.
    Sums stay on the device (the trainer reads a step's metrics once).
    """
    metrics = {"loss": sum_count(losses)}
    rewards = head.reward(outputs) if head.has_reward else None
    if shape == "pairs":
        logit = head.preference_logit(outputs[:, 0], outputs[:, 1])
        metrics["rewards/accuracies"] = sum_count((logit > 0).float())
        metrics["rewards/margins"] = sum_count(logit)
        if rewards is not None:
            metrics["rewards/chosen"] = sum_count(rewards[:, 0])
            metrics["rewards/rejected"] = sum_count(rewards[:, 1])
    elif shape == "ranked" and rewards is not None:
        target = scores["response_scores"].to(rewards)
        better = target[:, :, None] > target[:, None, :]
        agree = better & (rewards[:, :, None] > rewards[:, None, :])
        metrics["rewards/accuracies"] = (agree.sum(), better.sum())
        metrics["rewards/top1_accuracy"] = sum_count(top1_hits(rewards, target),
                                                     ordered_lists(target))
    elif shape == "unpaired" and rewards is not None:
        label = scores["label"].to(rewards) > 0.5
        metrics["rewards/accuracies"] = sum_count(((rewards[:, 0] > 0) == label).float())
        metrics["rewards/desirable"] = sum_count(rewards[:, 0], label)
        metrics["rewards/undesirable"] = sum_count(rewards[:, 0], ~label)
    elif rewards is not None:
        metrics["rewards/mean"] = sum_count(rewards)
        if head.kind == "attributes":
            for k, name in enumerate(head.attributes):
                metrics[f"outputs/{name}"] = sum_count(outputs[..., k])
    return metrics


def check_fields(example, needed: list[str], spec, params, head: Head,
                 weight_field: str | None) -> None:
    """Every numeric field the loss (or the example weights) reads, present and finite in the
    record (not negative where the loss says so, and as a weight), or an error that names the
    record, the field and the setting that reads it (``field_setting``)."""
    weights = [weight_field] if weight_field else []
    nonnegative = {*(spec.nonnegative(params) if spec.nonnegative else ()), *weights}
    for name in [*needed, *weights]:
        value = example.scores.get(name)
        if value is None or not math.isfinite(value) or (name in nonnegative and value < 0):
            state = "is missing or not a number" if value is None else f"is {value}"
            setting = ("train.example_weight_field" if name == weight_field else
                       f"the reward loss {spec.name} ({field_setting(name, params, head)})")
            kind = "a finite number, not negative" if name in nonnegative else "a finite number"
            raise DataError(f"{example.origin}: numeric field {name!r} {state}; it is read by "
                            f"{setting}. Every record needs it as {kind}: fix the record, or "
                            "point that setting at the column that holds it.")


def field_setting(name: str, params, head: Head) -> str:
    """The setting that makes the reward loss read the numeric field ``name``: a loss parameter
    that names it (``loss.margin_field``, ``loss.target``), else the head's ratings (a pair's
    ``chosen_``/``rejected_`` prefix left off)."""
    rating = name.removeprefix("chosen_").removeprefix("rejected_")
    for key, value in asdict(params).items():
        if value in (name, rating):
            return f"loss.{key}"
    return "model.head.attributes" if rating in head.attributes else "model.head.target"


class RewardTask:
    """A reward model under a reward loss: what ``Trainer`` needs from ``preftune rm train``."""

    def __init__(self, config: RewardConfig, reward_model: RewardModel, tokenizer, splits: dict,
                 shape: str, make_batch, layout: str):
        self.config, self.module, self.tokenizer = config, reward_model, tokenizer
        self.head, self.shape = reward_model.head, shape
        self.spec, self.params = get_reward_loss(config.loss.name), config.loss.params()
        self.train_examples, self.eval_examples = splits["train"], splits.get("eval", [])
        self.make_batch, self.layout = make_batch, layout
        self.name = f"rm {self.spec.name}"
        self.needs_reference = False
        self.batches_ahead = True

    def losses(self, module, batch, step):
        outputs = module(batch)
        losses = self.spec.fn(RewardInputs(outputs, self.head, batch.scores), self.params)
        weight_field = self.config.train.example_weight_field
        if weight_field is not None:  # present, finite, >= 0 in every record (check_fields)
            losses = losses * batch.scores[weight_field].to(losses)
        return losses, reward_metrics(self.shape, self.head, outputs, batch.scores, losses)

    @torch.no_grad()
    def evaluate(self, module, step):
        was_training = module.training
        module.eval()
        totals: dict = {}
        size = self.config.train.batch_size
        device = next(module.parameters()).device
        with progress("eval", len(self.eval_examples), "example", leave=False) as update:
            for start in range(0, len(self.eval_examples), size):
                batch = self.make_batch(self.eval_examples[start : start + size]).to(device)
                add_metrics(totals, self.losses(module, batch, step)[1])
                update(batch.num_examples)
        module.train(was_training)
        return means(totals)

    def unsharded(self, state: dict) -> RewardModel:
        """A plain (unsharded) copy of the reward model holding ``state``, the gathered weights
        of a sharded run."""
        copy = reward_model_from(self.config, self.head)[0]
        copy.load_state_dict(state)
        return copy

    def save(self, module, output_dir: Path):
        model = self.config.model
        # QLoRA: the adapter merges into the backbone's own weights, not their 4-bit copies
        unquantized = (lambda: load_backbone(model.path, self.head, model.dtype,
                                             model.trust_remote_code, tokenizer=self.tokenizer,
                                             announce=False)[0]) if model.quantize else None
        module.save_pretrained(output_dir, self.tokenizer, self.saved_record(),
                               save_merged=model.lora.save_merged if model.lora else True,
                               unquantized_base=unquantized)

    def saved_record(self) -> dict:
        """What ``preftune_reward.json`` keeps beside the head: how inputs were tokenized."""
        data = self.config.data
        return {"loss": self.spec.name, "params": asdict(self.params),
                "pooling": "last_token" if self.module.last_token else "encoder",
                "max_length": data.max_length, "max_prompt_length": data.max_prompt_length}

    def run_info(self) -> dict:
        return {"reward_loss": self.spec.name, "params": asdict(self.params),
                "head": self.head.to_dict(), "layout": self.layout, "shape": self.shape,
                **precision(self.config.model)}


def reward_model_from(config: RewardConfig, head, lora: bool = True, tokenizer=None,
                      accelerator: Accelerator | None = None):
    """(RewardModel, tokenizer) built from model.path, with LoRA attached if configured; a
    quantized backbone (model.quantize) is built on the ``accelerator``'s device."""
    if config.model.quantize and accelerator is not None:
        refuse_sharding(accelerator, "model.quantize")
    model, tokenizer = load_backbone(config.model.path, head, config.model.dtype,
                                     config.model.trust_remote_code,
                                     config.model.attn_implementation, tokenizer,
                                     config.model.quantize,
                                     accelerator.device if accelerator else None)
    reward_model = RewardModel(model, head)
    if lora and config.model.lora is not None:
        reward_model.model = attach_reward_lora(reward_model.model, config.model.lora)
    return reward_model, tokenizer


def reward_data(config: RewardConfig, announce: bool = True):
    """(backbone source, tokenizer, whether it scores the last token, ``prepare_examples`` of
    the run's data as that backbone reads it)."""
    check_train_named(config.data)
    source, tokenizer = backbone_tokenizer(config.model.path, config.model.trust_remote_code,
                                           config.model.chat_template)
    last_token = scores_last_token(source, config.model.trust_remote_code)
    tokenize = tokenize_records if last_token else encoder_examples
    return source, tokenizer, last_token, prepare_examples(
        config.data, tokenizer, config.train.seed, tokenize=tokenize, announce=announce)


def reward_task(config: RewardConfig, accelerator: Accelerator, plan_only: bool = False):
    """Load the backbone and data, attach LoRA; returns (task, total_steps), or (None, 0) after
    printing the plan when ``plan_only``."""
    cfg = config.train
    check_attention_device(config.model, accelerator.device)
    head, detected_head = detect_attributes(config)
    spec = get_reward_loss(config.loss.name)
    # the data is read and checked before the weights load: a bad record stops the run early
    source, tokenizer, last_token, (train_examples, eval_examples, data_report, shape) = \
        reward_data(config)
    if not plan_only:
        check_same_data(config.output_dir, data_report)
    if shape not in spec.data:
        raise DataError(
            f"reward loss {spec.name} trains on {' or '.join(spec.data)} data, but "
            f"{config.data.train} holds {shape}. Pick a loss for {shape} data ("
            f"`preftune rm losses`) or convert the data with data.convert (ranked lists to "
            "pairs: pairs:best_vs_worst, pairs:all_pairs, pairs:best_vs_each).")
    if shape == "pairs":  # a gold response is not part of any reward loss
        train_examples, eval_examples = ([replace(ex, response_ids=ex.response_ids[:2])
                                          for ex in split]
                                         for split in (train_examples, eval_examples))
    params = config.loss.params()
    for example in [*train_examples, *eval_examples]:
        check_fields(example, spec.record_fields(params, head, len(example.response_ids)), spec,
                     params, head, config.train.example_weight_field)
    if detected_head:
        data_report["head"] = detected_head
        print(f"model.head: {detected_head}")
    reward_model, _ = reward_model_from(config, head, lora=False, tokenizer=tokenizer,
                                        accelerator=accelerator)
    if accelerator.is_main_process and not plan_only:  # a plan writes nothing
        write_run_header(Path(config.output_dir), config, data_report)
    if not cfg.keep_dropout:
        without_dropout(reward_model.model)
    if config.model.lora is not None:  # (after tokenizing: the data errors come first)
        reward_model.model = attach_reward_lora(reward_model.model, config.model.lora)
    elif config.model.trains_part:  # the head always trains
        head = tuple(f"{name}.*" for name in REWARD_HEADS)
        print(train_only_part(reward_model.model, config.model, always=head)
              + ", the head included")
    if cfg.lean_activations:
        use_lean_layers(reward_model.model)
    if cfg.gradient_checkpointing and not plan_only:  # (the plan measures the plain layers)
        enable_checkpointing(causal_lm_of(reward_model.model), cfg.checkpoint_every)
    reward_model.to(accelerator.device).train()
    if not reward_model.last_token:  # encoders: every token sees the response
        layout = "padded"
    else:  # (checked on the model, on its device)
        decoder = causal_lm_of(reward_model.model).base_model
        check_windows(decoder.config, config.data.max_length, config.model.attn_implementation)
        check_image_attention(reward_model.model, [*train_examples, *eval_examples],
                              attn_implementation=config.model.attn_implementation)
        layout = verified_layout(decoder, decoder.config, choose_layout(
            train_examples, cfg.layout, config.model.attn_implementation), cfg.layout)
    max_row = cfg.max_row_tokens or config.data.max_length
    make_batch = reward_model.make_batch(tokenizer.pad_token_id, layout, max_row,
                                         images=getattr(tokenizer, "image_inputs", None))
    if plan_only:  # (the token layouts without the images, and the images' batches)
        tokens_only = reward_model.make_batch(tokenizer.pad_token_id, layout, max_row)
        print(reward_plan(config, reward_model, train_examples, layout, tokens_only,
                          tokenizer.pad_token_id, shards(accelerator),
                          make_batch if hasattr(tokenizer, "image_inputs") else None))
        return None, 0
    splits = {"train": train_examples, **({"eval": eval_examples} if eval_examples else {})}
    task = RewardTask(config, reward_model, tokenizer, splits, shape, make_batch, layout)
    return task, count_steps(cfg, len(train_examples), accelerator.num_processes)


@holding_output_dirs
def train_reward_model(config: RewardConfig, resume: bool = False,
                       show_progress: bool = True, overwrite: bool = False,
                       plan_only: bool = False) -> Path:
    """Train a reward model according to ``config``; returns the output directory.
    ``plan_only`` prints the layout and memory plan and stops before training."""
    accelerator = Accelerator(gradient_accumulation_steps=1)
    check_engine(accelerator, config.train)
    if not plan_only and start_run(config, accelerator, resume, overwrite):
        # --resume of a finished run: nothing to train, if it trained on this data
        check_same_data(config.output_dir, reward_data(config, announce=False)[3][2],
                        finished=True)
        return Path(config.output_dir)
    started = time.perf_counter()  # setup counts in the run's train_seconds
    set_seed(config.train.seed)
    with whole_models(accelerator):
        task, total_steps = reward_task(config, accelerator, plan_only)
    if task is None:
        return Path(config.output_dir)
    return Trainer(task, config.train, Path(config.output_dir), accelerator, total_steps,
                   resume=resume, show_progress=show_progress,
                   shuffle=not config.data.curriculum, started=started).run()
