"""Typed configuration of ``preftune diffusion train``: the policy config's sections where they
mean the same thing (train, LoRA), plus image data, the diffusion objective and sampling.
Unknown keys, and language-model settings that would do nothing here, are errors."""

from __future__ import annotations

import dataclasses
from typing import Annotated, ClassVar, Literal, get_type_hints

from pydantic import (Field, TypeAdapter, ValidationError,
                      model_validator)

from ..config import (Count, Fraction, LoraConfig, NonNegative, RunConfig, Section,
                      TrainConfig)
from ..config_errors import unknown_key
from ..config_model import Term, params_problem, refuse_bools
from .losses import get_diffusion_loss

# TrainConfig keys about token layouts and log-prob chunks: no meaning for a denoiser
LANGUAGE_MODEL_ONLY = ("logps_chunk_tokens", "example_weight_field", "layout", "max_row_tokens",
                       "compile", "compile_mode", "pad_to_multiple_of", "checkpoint_every",
                       "lean_activations")


def refuse_language_model_keys(train: TrainConfig, what: str) -> None:
    """A ValueError naming the first ``LANGUAGE_MODEL_ONLY`` key set in ``train``."""
    defaults = TrainConfig()
    for key in LANGUAGE_MODEL_ONLY:
        if getattr(train, key) != getattr(defaults, key):
            raise ValueError(f"train.{key} applies to language models only and does nothing "
                             f"for {what}; remove it.")


class DiffusionLoraConfig(LoraConfig):
    target_modules: list[str] | str = ["to_q", "to_k", "to_v", "to_out.0"]
    """Denoiser modules to adapt (default: the attention projections, as diffusers' LoRA
    scripts)."""


class DiffusionModelConfig(Section):
    path: str = ""
    """A diffusers pipeline directory: unet/ (or transformer/), text_encoder/, tokenizer/,
    scheduler/, optional vae/; or a Hugging Face Hub pipeline id (fetched once)."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Weights' dtype; denoising errors are computed in float32 whatever it is."""
    lora: DiffusionLoraConfig | None = None
    """Train LoRA adapters on the denoiser instead of every weight (null: full fine-tuning)."""
    segment_tokens: Count | None = None
    """LongAlign's segment-level encoding (SD 1.x/2.x): prompts encoded sentence by sentence
    into this many conditioning tokens (the paper: 240), so prompts past CLIP's 77 tokens
    count whole; null: the text encoder's own window, or what the pipeline was trained with
    (its prompt_encoding.json)."""
    guidance: NonNegative | None = None
    """The guidance value a guidance-distilled Flux transformer (Flux.1-dev, guidance_embeds)
    is given while training, policy and reference alike; null: 3.5, diffusers' Flux training
    scripts' default. Refused for other denoisers."""


class DiffusionDataConfig(Section):
    train: str | list[str] = ""
    """Image preference records (prompt, chosen, rejected), or only prompts for an online
    objective (spo): JSONL, JSON, Parquet, CSV or a saved HF dataset."""
    eval: str | list[str] | None = None
    """Held-out records, same format."""
    eval_fraction: Fraction = 0.0
    """Split this share off train when no eval file is given."""
    fields: dict[str, str] = {}
    """Rename columns, e.g. {chosen: jpg_0, rejected: jpg_1, prompt: caption}."""
    resolution: Count = 512
    """Images are resized to resolution x resolution (the denoiser's sample size, or the VAE
    input size)."""
    prompt_dropout: Fraction = 0.0
    """Share of training examples whose prompt is replaced by the empty one (seeded per example
    and step), so classifier-free guidance keeps working after fine-tuning (diffusers' scripts'
    --proportion_empty_prompts; LongAlign's first stage: 0.1). Evaluation keeps every prompt."""
    convert: Literal["pairs:best_vs_worst", "pairs:all_pairs"] | None = None
    """How a pair objective reads ranked image lists: each list's best image over its worst,
    or every (higher, lower) pair of it. Ranked objectives (rank_dpo) read the lists as they
    are and online ones (spo) their prompts, so one config compares them all."""


class DiffusionObjectiveConfig(Term):
    """``name`` plus its parameters, e.g. ``{name: diffusion_dpo, beta: 5000}``."""

    registry = staticmethod(get_diffusion_loss)
    name: str = "diffusion_dpo"
    """A diffusion objective (`preftune diffusion objectives`)."""

    @model_validator(mode="after")
    def _known_params(self):
        try:
            spec = get_diffusion_loss(self.name)
        except KeyError as error:
            raise ValueError(error.args[0]) from None
        known = {f.name for f in dataclasses.fields(spec.params)}
        for key in self.model_extra or {}:
            if key not in known:
                raise ValueError(unknown_key(f"objective.{key}", key, known,
                                          f"diffusion objective {self.name}", ("name",)))
        refuse_bools(self.model_extra or {}, get_type_hints(spec.params, include_extras=True),
                     "objective.")
        try:
            self.params()
        except ValidationError as error:
            raise ValueError(params_problem(error, "objective", self.name)) from None
        return self

    def params(self):
        return TypeAdapter(get_diffusion_loss(self.name).params).validate_python(
            self.model_extra or {})


class DiffusionReferenceConfig(Section):
    strategy: Literal["auto", "live", "adapter-off", "none", "precomputed"] = "auto"
    """auto: adapter-off with LoRA, live (a frozen copy) otherwise, none for reference-free
    objectives. precomputed is refused: its errors would need fixed noise per example."""


class SamplesConfig(Section):
    prompts: list[str] = []
    """Fixed prompts sampled before and after training (an image grid in the report); empty:
    none."""
    seeds: list[int] = [0, 1]
    """One image per prompt and seed."""
    steps: Count = 25
    """DDIM steps per sample."""
    guidance_scale: NonNegative = 1.0
    """Classifier-free guidance; 1 = none (one denoiser call per step). Flux: the guidance
    input of a guidance-distilled transformer (Flux.1-dev; 3.5 is FluxPipeline's default)."""
    resolution: Count | None = None
    """Pixels per side of the samples; null: the denoiser's own size (its sample_size,
    1024 for Flux)."""
    negative_prompt: str = ""
    """What classifier-free guidance steers away from (default: the empty prompt); needs a
    guidance scale other than 1 (Flux: true_cfg_scale above 1)."""
    true_cfg_scale: NonNegative = 1.0
    """Flux only: classifier-free guidance away from negative_prompt, beside the guidance
    input (FluxPipeline's true_cfg_scale; 1: none)."""
    batch_size: Count = 8
    """Images sampled at a time (each image's noise comes from its seed alone, so the images
    do not depend on it)."""


class DiffusionTrainConfig(TrainConfig):
    learning_rate: NonNegative = 1e-5
    """Peak AdamW learning rate."""
    batch_size: Count = 4
    """Pairs per micro-batch (per process)."""
    timestep_sampling: Literal["uniform", "logit_normal"] = "uniform"
    """How each example's training step k in [0, T) is drawn: uniformly (DDPM, Diffusion-DPO),
    or k = floor(T sigmoid(n)), n ~ N(logit_mean, logit_std^2), which favours the middle
    noise levels (SD3's training default; diffusers' --weighting_scheme logit_normal)."""
    logit_mean: float = 0.0
    """Mean of the logit-normal draw."""
    logit_std: Annotated[float, Field(gt=0)] = 1.0
    """Standard deviation of the logit-normal draw."""


class DiffusionConfig(RunConfig):
    """A ``preftune diffusion train`` run."""

    INERT_KEYS: ClassVar[frozenset] = frozenset(f"train.{key}" for key in LANGUAGE_MODEL_ONLY)

    output_dir: str = "runs/diffusion"
    """Where the pipeline directory (model/), metrics, samples and checkpoints are written."""
    model: DiffusionModelConfig = DiffusionModelConfig()
    """The pipeline directory and LoRA."""
    data: DiffusionDataConfig = DiffusionDataConfig()
    """Image preference records."""
    objective: DiffusionObjectiveConfig = DiffusionObjectiveConfig()
    """The diffusion objective and its parameters."""
    reference: DiffusionReferenceConfig = DiffusionReferenceConfig()
    """How the reference denoiser is had."""
    samples: SamplesConfig = SamplesConfig()
    """Before/after samples for the report."""
    train: DiffusionTrainConfig = DiffusionTrainConfig()
    """Optimizer, schedule, batching, logging and checkpoints."""

    @model_validator(mode="after")
    def _consistent(self):
        refuse_language_model_keys(self.train, "a denoiser")
        lora = self.model.lora
        if lora is not None and lora.init != "default":
            raise ValueError(f"model.lora.init: {lora.init} is for language models; a "
                             "denoiser's adapters start gaussian (B = 0): remove it.")
        if lora is not None and lora.modules_to_save:
            raise ValueError("model.lora.modules_to_save is for language models; a denoiser "
                             "trains its adapters only: remove it.")
        if lora is not None and not lora.save_merged:
            raise ValueError("model.lora.save_merged: false leaves a pipeline without its "
                             "unet/ (or transformer/), which nothing here loads; remove it (the "
                             "adapter is saved in unet_lora/ beside the merged denoiser).")
        self._no_dead_settings()
        if self.train.eval_every and self.data.eval is None and not self.data.eval_fraction:
            raise ValueError("train.eval_every does nothing without data.eval or "
                             "data.eval_fraction.")
        if self.data.eval is not None and self.data.eval_fraction > 0:
            raise ValueError("set data.eval or data.eval_fraction, not both.")
        spec = get_diffusion_loss(self.objective.name)
        if spec.online and self.data.prompt_dropout:
            raise ValueError(f"data.prompt_dropout does nothing for {spec.name}: it samples "
                             "its own images from the prompts; remove it.")
        if spec.online:
            for key in sorted(set(self.data.fields) - {"prompt"}):
                raise ValueError(f"data.fields.{key} does nothing for {spec.name}: it samples "
                                 "its own images and reads only each record's prompt (map it "
                                 "with data.fields.prompt); remove it.")
        self.reference_strategy  # raises on a strategy that cannot work
        return self

    def _no_dead_settings(self) -> None:
        """A setting that the rest of the config keeps from being read is refused by name."""
        samples, defaults = self.samples, SamplesConfig()
        for key in type(samples).model_fields:
            if not samples.prompts and getattr(samples, key) != getattr(defaults, key):
                raise ValueError(f"samples.{key} does nothing without samples.prompts (the "
                                 "prompts sampled before and after training); set them, or "
                                 "remove it.")
        train, plain = self.train, DiffusionTrainConfig()
        uniform = train.timestep_sampling == "uniform"
        for key in ("logit_mean", "logit_std"):
            if uniform and getattr(train, key) != getattr(plain, key):
                raise ValueError(f"train.{key} does nothing under train.timestep_sampling: "
                                 "uniform; set timestep_sampling: logit_normal, or remove it.")

    @property
    def reference_strategy(self) -> str:
        """The strategy in effect, or a ValueError naming ``reference.strategy``."""
        spec, chosen = get_diffusion_loss(self.objective.name), self.reference.strategy
        if chosen == "precomputed":
            raise ValueError(
                "reference.strategy: precomputed is not available for diffusion objectives: "
                "the reference's denoising errors depend on the noise and timestep drawn at "
                "each step, so they cannot be computed once. Use live (a frozen copy) or, with "
                "model.lora, adapter-off.")
        if not spec.needs_reference:
            if chosen not in ("auto", "none"):
                raise ValueError(f"reference.strategy: {chosen} does nothing for "
                                 f"{spec.name}, which uses no reference; remove it.")
            return "none"
        if chosen == "none":
            raise ValueError(f"reference.strategy: none, but {spec.name} needs a reference "
                             "denoiser; use live or adapter-off (with model.lora).")
        if chosen == "adapter-off" and self.model.lora is None:
            raise ValueError("reference.strategy: adapter-off needs model.lora (the reference "
                             "is the denoiser with its adapters disabled).")
        if chosen == "auto":
            return "adapter-off" if self.model.lora is not None else "live"
        return chosen

