"""Flux (``FluxTransformer2DModel``): what sets it apart from SD3's flow matching.

Flux denoises the same straight path x_t = (1 - sigma) x_0 + sigma eps toward the velocity
eps - x_0, but its transformer reads the latents as a sequence of 2x2 patches (16 channels ->
64 per token) with (row, column) position ids, conditions on T5's hidden states plus the CLIP
encoder's pooled embedding (``text_encoder/`` is CLIP, ``text_encoder_2/`` T5), takes the
timestep as sigma (t / 1000), and, when distilled for guidance (Flux.1-dev, ``guidance_embeds``),
takes the guidance scale as an input instead of running classifier-free guidance. Its
sampler divides [1, 1/n] evenly and shifts it by the image's token count, as ``FluxPipeline``.

preftune keeps Flux's latents unpacked, [E, C, H, W] like every other denoiser's, so noise,
targets and denoising errors are computed the same way (packing only reorders the elements
the error averages over): ``predict`` packs on the way in and unpacks the output.
"""

from __future__ import annotations

import numpy as np
import torch

from ..config import ConfigError

T5_TOKENS = 512  # FluxPipeline's default max_sequence_length
DEFAULT_SAMPLE_SIDE = 128  # FluxPipeline's default: 1024 pixels through its 8x VAE
DEFAULT_TRAIN_GUIDANCE = 3.5  # diffusers' Flux training scripts' --guidance_scale


def pack(x: torch.Tensor) -> torch.Tensor:
    """[E, C, H, W] -> [E, (H/2)(W/2), 4C]: each 2x2 patch one token, row-major."""
    e, c, h, w = x.shape
    return x.reshape(e, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(
        e, (h // 2) * (w // 2), 4 * c)


def unpack(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of ``pack`` for a [E, C, height, width] grid."""
    e, _, channels = tokens.shape
    c = channels // 4
    return tokens.reshape(e, height // 2, width // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(
        e, c, height, width)


def position_ids(height: int, width: int) -> torch.Tensor:
    """[(H/2)(W/2), 3] ids of the patch tokens: (0, row, column)."""
    rows, columns = torch.meshgrid(torch.arange(height // 2), torch.arange(width // 2),
                                   indexing="ij")
    return torch.stack([torch.zeros_like(rows), rows, columns], dim=-1).reshape(-1, 3).float()


def encode(model, prompts: list[str]):
    """CLIP's pooled embedding [E, 768] and T5's hidden states [E, 512, D] (FluxPipeline's
    ``encode_prompt``)."""
    from .model import Conditioning

    def ids(tokenizer, length):
        return tokenizer(list(prompts), padding="max_length", max_length=length,
                         truncation=True, return_tensors="pt").input_ids.to(model.device)

    pooled = model.text_encoder(ids(model.tokenizer, model.tokenizer.model_max_length),
                                output_hidden_states=False).pooler_output
    hidden = model.text_encoder_2(ids(model.tokenizer_2, T5_TOKENS),
                                  output_hidden_states=False)[0]
    return Conditioning(hidden, pooled)


def predict(model, denoiser, x_t, timesteps, conditioning, guidance: float) -> torch.Tensor:
    """The velocity for ``x_t`` [E, C, H, W] at scheduler timesteps [E] (0..1000), unpacked;
    ``guidance`` is fed to a guidance-distilled transformer and unused by others."""
    height, width = x_t.shape[-2:]
    ids = model.on_device(("flux_ids", height, width, x_t.dtype), x_t.device,
                          lambda: position_ids(height, width).to(x_t.dtype))
    text_ids = model.on_device(("flux_text_ids", conditioning.hidden.shape[1], x_t.dtype),
                               x_t.device, lambda: torch.zeros(conditioning.hidden.shape[1], 3,
                                                               dtype=x_t.dtype))
    extra = {}
    if denoiser.config.guidance_embeds:
        extra["guidance"] = torch.full((len(x_t),), float(guidance), device=x_t.device)
    output = denoiser(hidden_states=pack(x_t), timestep=timesteps.to(x_t.dtype) / 1000,
                      pooled_projections=conditioning.pooled,
                      encoder_hidden_states=conditioning.hidden, txt_ids=text_ids, img_ids=ids,
                      **extra).sample
    return unpack(output, height, width)


def set_sampling_timesteps(scheduler, steps: int, side: int) -> None:
    """FluxPipeline's schedule: sigmas 1 .. 1/steps evenly, shifted by mu, which grows with
    the image's token count ((side/2)^2)."""
    tokens = (side // 2) ** 2
    base, top = (scheduler.config.get(key, default) for key, default in (
        ("base_image_seq_len", 256), ("max_image_seq_len", 4096)))
    low, high = (scheduler.config.get(key, default) for key, default in (
        ("base_shift", 0.5), ("max_shift", 1.15)))
    mu = low + (high - low) * (tokens - base) / (top - base)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)


def check_resolution(model, resolution: int, key: str) -> None:
    """Flux packs 2x2 latent patches: ``resolution`` must give an even latent side."""
    step = 2 * model.pixels_per_sample
    if resolution % step:
        raise ConfigError(f"{key} {resolution}: a Flux transformer packs 2x2 patches of "
                          f"{step // 2}x{step // 2}-pixel samples, so the side must be a multiple "
                          f"of {step} (e.g. {max(step, resolution // step * step)}).")


def configure(model, config) -> None:
    """A run's Flux settings, checked before anything is written: the guidance given while
    training (``model.guidance``, only for a guidance-distilled transformer) and resolutions
    that 2x2 packing takes."""
    distilled = model.family == "flux" and model.denoiser.config.guidance_embeds
    guidance = config.model.guidance
    if guidance is not None and not distilled:
        raise ConfigError(f"model.guidance {guidance}: {config.model.path}'s denoiser takes no "
                          "guidance input (only a guidance-distilled Flux transformer, "
                          "guidance_embeds: true, does); remove it.")
    if model.family != "flux":
        return
    model.train_guidance = DEFAULT_TRAIN_GUIDANCE if guidance is None else guidance
    check_resolution(model, config.data.resolution, "data.resolution")
    samples = config.samples
    if samples.prompts and samples.resolution is not None:
        check_resolution(model, samples.resolution, "samples.resolution")
    if samples.prompts:
        check_sampling_guidance(model.denoiser, samples.guidance_scale,
                                "samples.guidance_scale")


def check_sampling_guidance(transformer, scale: float, key: str) -> None:
    """Flux samples without classifier-free guidance: a scale other than 1 needs a
    guidance-distilled transformer, which takes it as an input."""
    if scale != 1.0 and not transformer.config.guidance_embeds:
        raise ConfigError(f"{key} {scale}: this Flux transformer has no guidance input "
                          "(guidance_embeds false, as Flux.1-schnell) and Flux samples without "
                          "classifier-free guidance; use 1.")
