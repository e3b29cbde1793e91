"""A text-to-image denoiser with its frozen conditioning, loaded from a diffusers pipeline
directory: ``unet/`` (or ``transformer/``), ``text_encoder/``, ``tokenizer/``, ``scheduler/``
and, when present, ``vae/`` (images are then encoded to latents; without it the denoiser works
in pixel space, as the tiny demo model does) and SDXL's ``text_encoder_2/`` + ``tokenizer_2/``
(the two encoders' penultimate hidden states side by side, plus the second one's pooled
embedding and the image size, which an SDXL UNet's time embedding takes). A flow-matching
pipeline (SD3: ``SD3Transformer2DModel`` in ``transformer/``, a ``FlowMatchEulerDiscreteScheduler``,
two CLIP encoders and an optional T5 in ``text_encoder_3/``; Flux: ``FluxTransformer2DModel``,
CLIP in ``text_encoder/`` and T5 in ``text_encoder_2/``, see ``flux.py``) is noised along the
straight path x_t = (1 - sigma) x_0 + sigma eps and regresses the velocity eps - x_0.

Only the denoiser trains; the text encoder and the VAE are frozen. ``tiny.py`` writes small
random pipeline directories of the same layout (no downloads), for tests and the demo.
"""

from __future__ import annotations

import copy
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import ConfigError
from ..model.lora import check_target_modules, mark_lora_plus, peft_lora_config
from . import flux, segments
from .pipeline_files import (checked_pipeline, component_class, denoiser_folder,
                             drop_absent_components, local_pipeline, saved_denoiser_dtype)

FLOW_SCHEDULER = "FlowMatchEulerDiscreteScheduler"
SD3_T5_TOKENS = 256  # StableDiffusion3Pipeline's default max_sequence_length
FAMILIES = {"SD3Transformer2DModel": "sd3", "FluxTransformer2DModel": "flux"}  # else a UNet
LORA_FOLDER = "unet_lora"


@dataclass
class Conditioning:
    """What the denoiser is conditioned on, a row per image: the text encoders' hidden states
    [E, S, D] and, for SDXL (a UNet with ``addition_embed_type: text_time``), the pooled text
    embedding [E, P] its time embedding also takes."""

    hidden: torch.Tensor
    pooled: torch.Tensor | None = None

    def __getitem__(self, rows) -> "Conditioning":
        return Conditioning(self.hidden[rows], None if self.pooled is None else self.pooled[rows])

    def to(self, dtype: torch.dtype) -> "Conditioning":
        return Conditioning(self.hidden.to(dtype),
                            None if self.pooled is None else self.pooled.to(dtype))

    @staticmethod
    def cat(parts: list["Conditioning"]) -> "Conditioning":
        pooled = [part.pooled for part in parts]
        return Conditioning(torch.cat([part.hidden for part in parts]),
                            None if pooled[0] is None else torch.cat(pooled))


class DiffusionModel(torch.nn.Module):
    """The denoiser (trainable) plus text encoder(s), tokenizer(s), noise scheduler and
    optional VAE (frozen). ``source`` is the pipeline directory it was loaded from; with
    ``zero_empty_prompt`` (SDXL's ``force_zeros_for_empty_prompt``) guidance's unconditional
    input is zeros instead of the empty prompt's encoding. ``family`` is ``unet`` (SD 1.x/2.x,
    SDXL), ``sd3`` or ``flux``; ``train_guidance`` is the guidance a guidance-distilled Flux
    transformer is given while training."""

    def __init__(self, denoiser, text_encoder, tokenizer, scheduler, vae=None, source=None,
                 text_encoder_2=None, tokenizer_2=None, zero_empty_prompt: bool = False,
                 text_encoder_3=None, tokenizer_3=None):
        super().__init__()
        self.denoiser, self.text_encoder, self.vae = denoiser, text_encoder, vae
        self.tokenizer, self.scheduler, self.source = tokenizer, scheduler, source
        self.text_encoder_2, self.tokenizer_2 = text_encoder_2, tokenizer_2
        self.text_encoder_3, self.tokenizer_3 = text_encoder_3, tokenizer_3
        self.zero_empty_prompt = zero_empty_prompt
        # what the denoiser computes in (model.dtype): inputs are cast to it, errors are fp32
        self.compute_dtype = next(denoiser.parameters()).dtype
        self._constants: dict = {}  # small fixed tensors, copied to a device once (on_device)
        self.family = FAMILIES.get(type(denoiser).__name__, "unet")
        self.train_guidance = flux.DEFAULT_TRAIN_GUIDANCE
        self.segment_tokens = None  # LongAlign's segment-level encoding into so many tokens
        for frozen in (text_encoder, vae, text_encoder_2, text_encoder_3):
            if frozen is not None:
                frozen.requires_grad_(False).eval()
        second = {"sd3": "the second CLIP", "flux": "T5"}.get(self.family)
        if second and (text_encoder_2 is None or not self.flow):
            raise ConfigError(f"{source}: a {type(denoiser).__name__} needs text_encoder_2/ "
                              f"and tokenizer_2/ ({second}) and a {FLOW_SCHEDULER} in "
                              "scheduler/.")
        if self.flow and not second:
            raise ConfigError(f"{source}: a {FLOW_SCHEDULER} with a "
                              f"{type(denoiser).__name__}: flow matching is supported for SD3 "
                              "(SD3Transformer2DModel) and Flux (FluxTransformer2DModel).")
        if getattr(denoiser.config, "addition_embed_type", None) == "text_time" \
                and text_encoder_2 is None:
            raise ConfigError(f"{source}: the UNet is SDXL-style (addition_embed_type "
                              "text_time) but the pipeline has no text_encoder_2/ and "
                              "tokenizer_2/ for its pooled text embedding.")

    @property
    def num_train_timesteps(self) -> int:
        return self.scheduler.config.num_train_timesteps

    @property
    def flow(self) -> bool:
        """A flow-matching model (SD3, Flux): straight-path noise, velocity targets, Euler
        sampling."""
        return type(self.scheduler).__name__ == FLOW_SCHEDULER

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        """The text encoder's last hidden states (as SD pipelines); with a second encoder
        (SDXL) both encoders' penultimate hidden states side by side and the second's pooled
        (projected) embedding, as diffusers' SDXL pipeline encodes a prompt; SD3's and
        Flux's as their pipelines do."""
        if self.family == "flux":
            return flux.encode(self, prompts)
        if self.segment_tokens:
            return Conditioning(segments.encode(self, prompts, self.segment_tokens))

        def ids(tokenizer):
            return tokenizer(list(prompts), padding="max_length", truncation=True,
                             max_length=tokenizer.model_max_length,
                             return_tensors="pt").input_ids.to(self.device)

        if self.text_encoder_2 is None:
            return Conditioning(self.text_encoder(ids(self.tokenizer))[0])
        hidden, pooled = [], []
        for tokenizer, encoder in ((self.tokenizer, self.text_encoder),
                                   (self.tokenizer_2, self.text_encoder_2)):
            output = encoder(ids(tokenizer), output_hidden_states=True)
            hidden.append(output.hidden_states[-2])
            pooled.append(output[0])  # CLIPTextModelWithProjection: the pooled projection
        clip = torch.cat(hidden, dim=-1)
        if self.family != "sd3":  # SDXL: the second encoder's pooled embedding
            return Conditioning(clip, pooled[-1])
        # SD3: both CLIPs' states padded to T5's width, then T5's states after them
        t5 = self._t5_states(prompts, clip.dtype)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return Conditioning(torch.cat([clip, t5], dim=-2), torch.cat(pooled, dim=-1))

    def _t5_states(self, prompts: list[str], dtype) -> torch.Tensor:
        """SD3's T5 hidden states [E, 256, D], or zeros without ``text_encoder_3/`` (as the
        SD3 pipeline does when T5 is left out)."""
        if self.text_encoder_3 is None:
            return torch.zeros((len(prompts), SD3_T5_TOKENS,
                                self.denoiser.config.joint_attention_dim),
                               dtype=dtype, device=self.device)
        ids = self.tokenizer_3(list(prompts), padding="max_length", max_length=SD3_T5_TOKENS,
                               truncation=True, add_special_tokens=True,
                               return_tensors="pt").input_ids.to(self.device)
        return self.text_encoder_3(ids)[0]

    def unconditional(self, count: int) -> Conditioning:
        """Guidance's unconditional input for ``count`` rows: the empty prompt encoded, or
        zeros of its shape (``zero_empty_prompt``, as SDXL's pipeline does)."""
        empty = self.encode_prompts([""] * count)
        if not self.zero_empty_prompt:
            return empty
        return Conditioning(torch.zeros_like(empty.hidden), None if empty.pooled is None
                            else torch.zeros_like(empty.pooled))

    @torch.no_grad()
    def to_model_space(self, pixels: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> what the denoiser denoises: VAE latents (mean of the posterior,
        less the VAE's shift factor (SD3), times its scaling factor) when there is a VAE, else
        the pixels themselves."""
        if self.vae is None:
            return pixels
        latents = self.vae.encode(pixels.to(self.vae.dtype)).latent_dist.mean
        return (latents - self._vae_shift) * self.vae.config.scaling_factor

    def to_pixels(self, x0: torch.Tensor) -> torch.Tensor:
        """Samples in the denoiser's space -> images in about [-1, 1]: the VAE's decoding, or
        the samples themselves; differentiable (LongAlign backpropagates through it)."""
        if self.vae is None:
            return x0
        latents = x0 / self.vae.config.scaling_factor + self._vae_shift
        return self.vae.decode(latents.to(self.vae.dtype)).sample

    @property
    def _vae_shift(self) -> float:
        """SD3's VAE centres its latents (``shift_factor``); SD's and SDXL's do not."""
        return getattr(self.vae.config, "shift_factor", None) or 0.0

    def noisy_and_target(self, x0, noise, timesteps) -> tuple[torch.Tensor, torch.Tensor]:
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, and the regression target of the
        scheduler's prediction type (eps, or the velocity); for flow matching, training step
        k in [0, T) has the scheduler's sigma_k: x_t = (1 - sigma) x_0 + sigma eps, target
        eps - x_0 (as diffusers' SD3 training script, with k drawn uniformly)."""
        if self.flow:
            sigmas = self.on_device("sigmas", x0.device, lambda: self.scheduler.sigmas)
            sigma = sigmas[timesteps].view(-1, *[1] * (x0.dim() - 1))
            return (1 - sigma) * x0 + sigma * noise, noise - x0
        x_t = self.scheduler.add_noise(x0, noise, timesteps)
        kind = self.scheduler.config.prediction_type
        if kind == "epsilon":
            return x_t, noise
        if kind == "v_prediction":
            return x_t, self.scheduler.get_velocity(x0, noise, timesteps)
        raise ConfigError(f"scheduler prediction_type {kind!r} is not supported (epsilon or "
                          "v_prediction).")

    def predict(self, denoiser, x_t, timesteps, conditioning: Conditioning,
                guidance: float | None = None) -> torch.Tensor:
        """The denoiser's output on ``x_t``; an SDXL UNet also gets the pooled text embedding
        and the time ids (original size, crop corner, target size) of a whole square image of
        ``x_t``'s size (data images are resized, never cropped); a guidance-distilled Flux
        transformer gets ``guidance`` (default: ``train_guidance``). Inputs are cast to the
        denoiser's dtype (the noise and the targets stay fp32)."""
        x_t, conditioning = x_t.to(self.compute_dtype), conditioning.to(self.compute_dtype)
        if self.family == "flux":
            return flux.predict(self, denoiser, x_t, timesteps, conditioning,
                                self.train_guidance if guidance is None else guidance)
        if self.family == "sd3":
            return denoiser(hidden_states=x_t, timestep=timesteps,
                            encoder_hidden_states=conditioning.hidden,
                            pooled_projections=conditioning.pooled).sample
        extra = {}
        if conditioning.pooled is not None:
            height, width = (side * self.pixels_per_sample for side in x_t.shape[-2:])
            time_ids = self.on_device(("time_ids", height, width, x_t.dtype), x_t.device,
                                      lambda: torch.tensor([height, width, 0, 0, height, width],
                                                           dtype=x_t.dtype))
            extra["added_cond_kwargs"] = {"text_embeds": conditioning.pooled,
                                          "time_ids": time_ids.expand(len(x_t), 6)}
        return denoiser(x_t, timestep=timesteps, encoder_hidden_states=conditioning.hidden,
                        **extra).sample

    def sample_shape(self, resolution: int | None = None) -> tuple[int, int, int]:
        """[C, H, W] of one sample in the denoiser's space for ``resolution``-pixel images;
        None: the denoiser's own size (its ``sample_size``; Flux: FluxPipeline's 1024 pixels)."""
        config = self.denoiser.config
        channels = config.in_channels // 4 if self.family == "flux" else config.in_channels
        if resolution is not None:
            if self.family == "flux":
                flux.check_resolution(self, resolution, "resolution")
            side = resolution // self.pixels_per_sample
        else:
            side = flux.DEFAULT_SAMPLE_SIDE if self.family == "flux" else config.sample_size
        return channels, side, side

    @property
    def pixels_per_sample(self) -> int:
        """Image pixels per denoiser sample along a side: the VAE's downscaling, else 1."""
        if self.vae is None:
            return 1
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def denoiser_timesteps(self, steps: torch.Tensor) -> torch.Tensor:
        """What the denoiser is called with at training step k: k itself, or for flow
        matching the scheduler's timestep k (1000 sigma_k)."""
        if not self.flow:
            return steps
        return self.on_device("timesteps", steps.device, lambda: self.scheduler.timesteps)[steps]

    def on_device(self, key, device, make):
        """The tensor ``make()`` on ``device``, made and copied once per key and device (the
        training scheduler's schedule, SDXL's time ids): no host copy on every step."""
        if (key, device) not in self._constants:
            self._constants[(key, device)] = make().to(device)
        return self._constants[(key, device)]

    def forward(self, x_t, timesteps, conditioning) -> torch.Tensor:
        """The trained denoiser's prediction: the call that goes through DDP's wrapper, so
        its gradients are averaged over processes."""
        return self.predict(self.denoiser, x_t, timesteps, conditioning)

    def save(self, directory: Path) -> Path:
        """The pipeline directory again, with the trained denoiser: frozen parts copied from
        ``source``; with LoRA the adapter goes to ``unet_lora/`` and the merged denoiser to
        ``unet/``."""
        directory = Path(directory)
        folder = denoiser_folder(Path(self.source))
        shutil.copytree(self.source, directory, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns(folder, LORA_FOLDER))
        if getattr(self.denoiser, "peft_config", None):
            self.denoiser.save_lora_adapter(str(directory / LORA_FOLDER))
            merged = copy.deepcopy(self.denoiser)
            merged.fuse_lora()
            merged.unload_lora()
            merged.save_pretrained(directory / folder)
        else:
            self.denoiser.save_pretrained(directory / folder)
        if self.segment_tokens:
            segments.record(directory, self.segment_tokens)
        drop_absent_components(directory)
        return directory


def shard_the_denoiser_only(accelerator, model: DiffusionModel) -> None:
    """Under FSDP2: the frozen text encoders and VAE stay whole on every process (they run
    outside the trained module's forward), and the denoiser is split block by block (its
    ``_no_split_modules``, which accelerate's transformer wrap policy reads off the model)."""
    frozen = (model.text_encoder, model.text_encoder_2, model.text_encoder_3, model.vae)
    accelerator.state.fsdp_plugin.ignored_modules = [m for m in frozen if m is not None]
    model._no_split_modules = list(getattr(model.denoiser, "_no_split_modules", None) or [])


def pipeline_family(path: str | Path, key: str = "model.path") -> str | None:
    """The family (``FAMILIES``, else ``unet``) of the pipeline ``path``, read from its
    denoiser's config.json without loading any weights (of a Hub id, only the small files are
    fetched); None when ``path`` is not a pipeline (loading it says why)."""
    path = local_pipeline(path, key, weights=False)
    try:
        folder = denoiser_folder(path)
    except ConfigError:
        return None
    config = json.loads((path / folder / "config.json").read_text())
    return FAMILIES.get(config.get("_class_name"), "unet")


def load_diffusion_model(path: str | Path, dtype: torch.dtype = torch.float32,
                         key: str = "model.path", device=None) -> DiffusionModel:
    """The pipeline directory ``path``, or a Hugging Face Hub pipeline id (the components
    loaded here, fetched once into the HF cache), as a ``DiffusionModel`` on ``device`` (the
    host when None); errors name ``key``, the config key or flag that gave ``path``."""
    import diffusers
    from transformers import AutoTokenizer

    path, folder = checked_pipeline(path, key)
    denoiser = component_class(path / folder, "diffusers").from_pretrained(
        path / folder, torch_dtype=dtype)
    text_encoder = component_class(path / "text_encoder", "transformers").from_pretrained(
        path / "text_encoder", dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(path / "tokenizer")
    scheduler_class = json.loads((path / "scheduler" / "scheduler_config.json").read_text()) \
        .get("_class_name")
    scheduler = (diffusers.FlowMatchEulerDiscreteScheduler if scheduler_class == FLOW_SCHEDULER
                 else diffusers.DDPMScheduler).from_pretrained(path / "scheduler")
    vae = (diffusers.AutoencoderKL.from_pretrained(path / "vae", torch_dtype=dtype)
           if (path / "vae").is_dir() else None)
    extra = {}  # SDXL's second encoder; SD3's second and third (T5, optional)
    for suffix in ("_2", "_3"):
        if (path / f"text_encoder{suffix}").is_dir():
            if not (path / f"tokenizer{suffix}").is_dir():
                raise ConfigError(f"{key} {path}: text_encoder{suffix}/ without "
                                  f"tokenizer{suffix}/.")
            extra[f"text_encoder{suffix}"] = component_class(
                path / f"text_encoder{suffix}", "transformers").from_pretrained(
                path / f"text_encoder{suffix}", dtype=dtype)
            extra[f"tokenizer{suffix}"] = AutoTokenizer.from_pretrained(path / f"tokenizer{suffix}")
    index = path / "model_index.json"
    zero_empty = bool(index.is_file() and json.loads(index.read_text()).get(
        "force_zeros_for_empty_prompt", False))
    model = DiffusionModel(denoiser, text_encoder, tokenizer, scheduler, vae, source=str(path),
                           zero_empty_prompt=zero_empty, **extra)
    segments.configure(model, None)  # as the pipeline was trained (prompt_encoding.json)
    return model if device is None else model.to(device)


def load_for_sampling(path: str | Path, key: str, dtype: str = "auto") -> DiffusionModel:
    """The pipeline at ``path`` on the process's device (the GPU when there is one) in
    ``dtype`` ('auto': its denoiser's saved dtype), for what only samples from it; ``key``
    names the flag or config key that gave it."""
    from accelerate import PartialState

    local = local_pipeline(path, key)
    if dtype == "auto":  # (a path that is no pipeline is named by load_diffusion_model)
        dtype = saved_denoiser_dtype(local, key) if local.is_dir() else "float32"
    return load_diffusion_model(local, getattr(torch, dtype), key, PartialState().device)


def attach_lora(model: DiffusionModel, lora) -> None:
    """LoRA adapters on the denoiser (diffusers' PEFT integration); only they train."""
    check_target_modules(model.denoiser, lora.target_modules)  # (peft: a traceback)
    model.denoiser.requires_grad_(False)
    model.denoiser.add_adapter(peft_lora_config(lora, init_lora_weights="gaussian"))
    mark_lora_plus(model.denoiser, lora.lr_ratio)
