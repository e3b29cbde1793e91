"""The ``train`` section: what every trainer shares (``TrainConfig``: optimizer, schedule,
batching, logging, checkpoints, speed settings), and what only a policy's has
(``PolicyTrainConfig``: greedy answers to held-out prompts at each evaluation, the routers'
load-balancing loss of a mixture of experts)."""

from __future__ import annotations

import importlib.util
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from .config_model import Count, Fraction, NonNegative, Positive, Section, refuse_unused


class TrainConfig(Section):
    learning_rate: NonNegative = 1e-6
    """Peak AdamW learning rate; 0 trains nothing (the policy_not_moving alarm says so)."""
    batch_size: Count = 8
    """Examples per micro-batch (per process)."""
    gradient_accumulation_steps: Count = 1
    """Micro-batches per optimizer step."""
    epochs: Positive = 1.0
    """Passes over the training data (fractions allowed)."""
    max_steps: Count | None = None
    """Optimizer steps; overrides epochs."""
    warmup_ratio: Fraction = 0.1
    """Share of the steps spent warming the learning rate up from 0."""
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    """Learning-rate decay after warmup."""
    weight_decay: NonNegative = 0.0
    """AdamW weight decay."""
    adam_betas: Annotated[list[Fraction], Field(json_schema_extra={"minItems": 2,
                                                                   "maxItems": 2})] = [0.9, 0.999]
    """AdamW's decay rates of its two moments, [beta1, beta2] (each in [0, 1))."""
    adam_epsilon: Positive = 1e-8
    """AdamW's epsilon, added to the root of the second moment."""
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw_8bit"] = "adamw"
    """AdamW's two moments per weight held in the weights' dtype (torch's fused AdamW), or in
    8 bits (bitsandbytes: about a quarter of fp32 moments' memory); paged_adamw_8bit also lets
    CUDA move them to host memory when the GPU runs short (train/optimizers.py)."""
    max_grad_norm: Positive | None = 1.0
    """Clip the global gradient norm to this; null: no clipping."""
    seed: int = 42
    """Seed of initialisation, shuffling and sampling."""
    log_every: Count = 1
    """Write metrics every this many steps."""
    eval_every: Count | None = None
    """Evaluate on the held-out data (data.eval or data.eval_fraction) every this many
    steps; the last step is evaluated whenever there is held-out data."""
    save_every: Count | None = None
    """Write a checkpoint every this many steps (for --resume)."""
    keep_checkpoints: Count = 2
    """How many of the newest checkpoints to keep."""
    logps_chunk_tokens: Count = 256
    """Tokens per chunk when log-probs are computed from hidden states (memory vs speed)."""
    example_weight_field: str | None = None
    """Numeric record field that scales each example's loss."""
    gradient_checkpointing: bool = False
    """Recompute layer activations in backward: less memory, more time."""
    lean_activations: bool = True
    """Llama-style RMSNorms and SiLU-gated MLPs keep less for backward and recompute the rest
    (same forward, bit for bit; model/lean.py); false: transformers' own layers."""
    keep_dropout: bool = False
    """Train with the model's own dropout rates; false (the default) sets them all to 0, so the
    policy is compared with its reference on equal terms (LoRA's dropout is kept either way)."""
    checkpoint_every: Count = 1
    """With gradient_checkpointing: checkpoint every N-th decoder layer (1: each). The others
    keep their activations: more memory than checkpointing all, less recomputation."""
    optimizer_in_backward: bool = False
    """AdamW applied to each weight as soon as its gradient is complete, which frees it at once:
    no full set of gradients in memory. Needs gradient_accumulation_steps 1, max_grad_norm
    null."""
    layout: Literal["auto", "padded", "prefix_shared", "packed", "packed_prefix_shared"] = "auto"
    """How examples become rows: auto picks prefix sharing when prompts are long."""
    max_row_tokens: Count | None = None
    """Packed layouts: tokens per row (default: data.max_length)."""
    compile: bool = False
    """torch.compile each decoder layer; row widths are then rounded up to
    pad_to_multiple_of."""
    compile_mode: Literal["default", "reduce-overhead", "max-autotune"] = "default"
    """torch.compile mode; reduce-overhead adds CUDA graphs on a GPU."""
    pad_to_multiple_of: Count | None = None
    """Round row widths up to this (default: 64 with compile, 128 under flex_attention, else 1)."""
    report_to: list[Literal["tensorboard", "mlflow", "wandb"]] = Field(
        [], json_schema_extra=lambda schema: one_or_many(schema))
    """Experiment trackers that get every metrics.jsonl record and the config (extras)."""
    tracking_dir: str | None = None
    """Where offline trackers write (default: output_dir/tracking)."""
    run_name: str | None = None
    """The run's name in the trackers (default: the name of output_dir)."""

    @field_validator("adam_betas")
    @classmethod
    def _two_betas(cls, value: list[float]) -> list[float]:
        if len(value) != 2:
            raise ValueError(f"train.adam_betas takes two numbers, [beta1, beta2] (got {value}), "
                             "e.g. [0.9, 0.95].")
        return value

    @model_validator(mode="after")
    def _settings_of_what_is_off(self):
        if not self.compile:
            refuse_unused(self, ("compile_mode",), "train", "without train.compile: true")
        if not self.report_to:
            refuse_unused(self, ("tracking_dir", "run_name"), "train",
                          "without a tracker in train.report_to")
        return self

    @model_validator(mode="after")
    def _checkpointing_is_on(self):
        if self.checkpoint_every > 1 and not self.gradient_checkpointing:
            raise ValueError(f"train.checkpoint_every: {self.checkpoint_every} does nothing "
                             "without train.gradient_checkpointing: true; set both or remove it.")
        return self

    @model_validator(mode="after")
    def _cuda_graphs_without_recomputation(self):
        if self.compile and self.compile_mode == "reduce-overhead" and self.gradient_checkpointing:
            raise ValueError(
                "train.compile_mode: reduce-overhead (CUDA graphs) does not combine with "
                "train.gradient_checkpointing: a checkpointed layer runs without gradients in "
                "forward, and CUDA graphs start a new iteration at each such call, reusing the "
                "memory of the previous layer's output that backward still needs. Use "
                "compile_mode: default (the layers are still compiled) or turn checkpointing "
                "off.")
        return self

    @model_validator(mode="after")
    def _eight_bit_optimizer_available(self):
        if self.optimizer == "adamw":
            return self
        if self.optimizer_in_backward:
            raise ValueError(f"train.optimizer: {self.optimizer} and train.optimizer_in_backward "
                             "do not combine (the in-backward updates are torch's AdamW); "
                             "choose one.")
        if importlib.util.find_spec("bitsandbytes") is None:
            raise ValueError(f"train.optimizer: {self.optimizer} needs the bitsandbytes "
                             "package: pip install 'bitsandbytes>=0.46.1'")
        return self

    @field_validator("report_to", mode="before")
    @classmethod
    def _one_or_many_trackers(cls, value):
        return [value] if isinstance(value, str) else value

    @field_validator("report_to")
    @classmethod
    def _trackers_installed(cls, value):
        from .train.tracking import check_installed

        check_installed(value)
        return value


def one_or_many(schema: dict) -> None:
    """A list field's schema that also takes one item alone, as its validator does, and no
    item twice."""
    item = schema.pop("items")
    schema.pop("type")
    schema["anyOf"] = [item, {"type": "array", "items": item, "uniqueItems": True}]


class PolicyTrainConfig(TrainConfig):
    """The ``train`` section of ``preftune train``."""

    eval_generations: Count | None = None
    """At every evaluation (train.eval_every) the policy answers this many held-out prompts
    greedily; the answers go to eval_generations.jsonl, their mean length (and score, with
    train.eval_scorer) to the eval metrics (eval/answer_tokens, eval/answer_score). null: no
    answers."""
    eval_max_new_tokens: Count | None = None
    """Tokens each of those answers may have (default 64)."""
    eval_scorer: str | None = None
    """What scores those answers, as `preftune eval --scorer`: synthetic, module:function,
    rm:DIR, judge:MODEL or a .yaml combination; its mean is eval/answer_score."""
    router_aux_loss_coef: NonNegative | None = None
    """Mixture-of-experts models (Mixtral, Qwen-MoE, OLMoE, GPT-OSS ...): the weight of the
    routers' load-balancing loss added to the preference loss (logged as router_aux_loss).
    null: as the model's config says (its router_aux_loss_coef when it sets
    output_router_logits, else off); 0: off."""

    @model_validator(mode="after")
    def _generation_settings_need_generations(self):
        unused = [key for key in ("eval_max_new_tokens", "eval_scorer")
                  if getattr(self, key) is not None]
        if unused and self.eval_generations is None:
            raise ValueError(f"train.{unused[0]} does nothing without train.eval_generations "
                             "(how many held-out prompts to answer); set it, or remove "
                             f"{unused[0]}.")
        if self.eval_generations is not None and self.eval_every is None:
            raise ValueError("train.eval_generations answers held-out prompts at each "
                             "evaluation, and train.eval_every is not set; set it.")
        return self
