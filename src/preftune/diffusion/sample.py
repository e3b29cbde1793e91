"""Fixed-seed sampling (DDIM) and image grids: the before/after samples of a run's report.

Sample k of prompt p starts from noise drawn from a generator seeded by its seed alone, so the
same (prompt, seed) starts from the same noise before and after training, and in any batch.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..config import ConfigError
from .data import tensor_image
from .flux import check_sampling_guidance, set_sampling_timesteps
from .model import Conditioning, DiffusionModel

SAMPLES_DIR = "samples"


def guided(call, x_t, timesteps, conditioning: Conditioning,
           unconditional: Conditioning | None, scale: float) -> torch.Tensor:
    """A prediction with classifier-free guidance, in float32: unconditional + scale
    (conditional - unconditional), both from one batched ``call(x_t, timesteps,
    conditioning)``; without ``unconditional``, the plain prediction. ``call`` is a
    ``DiffusionModel`` (or the DDP wrapper around it: its trained denoiser, with gradients
    averaged over processes) or ``partial(model.predict, denoiser)`` for another denoiser."""
    if unconditional is None:
        return call(x_t, timesteps, conditioning).float()
    both = call(torch.cat([x_t, x_t]), torch.cat([timesteps, timesteps]),
                Conditioning.cat([unconditional, conditioning])).float()
    free, conditional = both.chunk(2)
    return free + scale * (conditional - free)


def sample_images(model: DiffusionModel, prompts: list[str], seeds: list[int], steps: int = 25,
                  guidance_scale: float = 1.0, denoiser=None,
                  resolution: int | None = None, negative_prompt: str = "",
                  true_cfg_scale: float = 1.0, batch_size: int | None = None) -> torch.Tensor:
    """[len(prompts) * len(seeds), 3, H, W] images in [-1, 1], prompt-major, by DDIM (eta 0)
    with the model's noise schedule, or by the flow-matching Euler sampler of an SD3 or Flux
    model; ``denoiser`` defaults to the model's own, ``resolution`` (pixels per side) to the
    denoiser's own size. Guidance is classifier-free, away from ``negative_prompt`` (default:
    the empty prompt, or SDXL's zeros), except for Flux, which (as FluxPipeline) gives a
    guidance-distilled transformer the scale as an input and refuses it otherwise; Flux takes
    classifier-free guidance away from ``negative_prompt`` with ``true_cfg_scale`` > 1 (its
    pipeline's "true CFG"). ``batch_size`` images go through the denoiser at once (default:
    all); each image's noise comes from its seed alone, so batching does not change them."""
    return torch.cat(list(image_batches(model, prompts, seeds, steps, guidance_scale, denoiser,
                                        resolution, negative_prompt, true_cfg_scale,
                                        batch_size)))


@torch.no_grad()  # (torch applies it to each resumption of the generator, not between them)
def image_batches(model: DiffusionModel, prompts: list[str], seeds: list[int], steps: int = 25,
                  guidance_scale: float = 1.0, denoiser=None, resolution: int | None = None,
                  negative_prompt: str = "", true_cfg_scale: float = 1.0,
                  batch_size: int | None = None):
    """``sample_images``'s images a batch at a time, each [b, 3, H, W] on the host as it is
    sampled, so a caller can save and score them before the next (thousands of fp32 images
    held at once are gigabytes)."""
    denoiser = denoiser if denoiser is not None else model.denoiser
    check_negative_prompt(model.family, negative_prompt, guidance_scale, true_cfg_scale)
    if model.family == "flux":
        check_sampling_guidance(denoiser, guidance_scale, "guidance scale")
    rows = [(prompt, seed) for prompt in prompts for seed in seeds]
    size = batch_size or len(rows)
    was_training = denoiser.training
    denoiser.eval()
    try:
        for start in range(0, len(rows), size):
            yield _denoised(model, denoiser, rows[start : start + size], steps, guidance_scale,
                            resolution, negative_prompt, true_cfg_scale)
    finally:
        denoiser.train(was_training)


def _denoised(model: DiffusionModel, denoiser, rows: list[tuple[str, int]], steps: int,
              guidance_scale: float, resolution: int | None, negative_prompt: str,
              true_cfg_scale: float) -> torch.Tensor:
    """The images of ``rows`` ((prompt, seed) each), sampled together (``sample_images``),
    with a scheduler of their own (the flow-matching one counts its steps)."""
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

    flux = model.family == "flux"
    scheduler = (FlowMatchEulerDiscreteScheduler if model.flow else DDIMScheduler).from_config(
        model.scheduler.config)
    shape = model.sample_shape(resolution)
    if flux:
        set_sampling_timesteps(scheduler, steps, shape[-1])
    elif model.flow and scheduler.config.get("use_dynamic_shifting"):  # SD3.5: as its pipeline
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import \
            calculate_shift

        patches = (shape[-1] // denoiser.config.patch_size) ** 2
        scheduler.set_timesteps(steps, mu=calculate_shift(
            patches, *(scheduler.config.get(key, default) for key, default in (
                ("base_image_seq_len", 256), ("max_image_seq_len", 4096),
                ("base_shift", 0.5), ("max_shift", 1.16)))))
    else:
        scheduler.set_timesteps(steps)
    scale = (lambda x, t: x) if model.flow else scheduler.scale_model_input
    x = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(seed))
                     for _, seed in rows]).to(model.device) * getattr(scheduler,
                                                                    "init_noise_sigma", 1.0)
    condition = model.encode_prompts([prompt for prompt, _ in rows])
    free_scale = true_cfg_scale if flux else guidance_scale  # the classifier-free scale
    unconditional = None
    if free_scale != 1.0:
        unconditional = (model.encode_prompts([negative_prompt] * len(rows)) if negative_prompt
                         else model.unconditional(len(rows)))
    for t in scheduler.timesteps:
        def call(x_in, steps, c):
            return model.predict(denoiser, scale(x_in, t), steps, c, guidance=guidance_scale)

        prediction = guided(call, x, t.expand(len(x)).to(model.device), condition,
                            unconditional, free_scale)
        x = scheduler.step(prediction, t, x).prev_sample
    return model.to_pixels(x).float().clamp(-1, 1).cpu()


# what the sample, eval and rank commands call the model, the negative prompt and the true-CFG
# scale in their errors
SAMPLING_FLAGS = ("--model", "--negative-prompt", "--true-cfg-scale")


def check_negative_prompt(family: str, negative_prompt: str, guidance_scale: float,
                          true_cfg_scale: float,
                          keys: tuple = ("negative prompt", "true CFG scale")) -> None:
    """Settings that would do nothing are refused (``keys`` name them): a negative prompt
    without classifier-free guidance, and a true-CFG scale on a denoiser other than Flux
    (``family``: a ``DiffusionModel``'s)."""
    if family != "flux" and true_cfg_scale != 1.0:
        raise ConfigError(f"{keys[1]} {true_cfg_scale}: only Flux takes it (its "
                          "classifier-free guidance beside the guidance input); other "
                          "denoisers' guidance scale is classifier-free already.")
    free = true_cfg_scale > 1.0 if family == "flux" else guidance_scale != 1.0
    if negative_prompt and not free:
        raise ConfigError(f"{keys[0]} {negative_prompt!r} does nothing without "
                          "classifier-free guidance: set a guidance scale other than 1"
                          + (" (Flux: a true CFG scale above 1)." if family == "flux"
                             else "."))


def image_grid(images: list, columns: int, scale: int = 1, gap: int = 2):
    """PIL images (same size) in a grid with white gaps, each enlarged ``scale`` times."""
    from PIL import Image

    width, height = images[0].size
    width, height = width * scale, height * scale
    rows = -(-len(images) // columns)
    grid = Image.new("RGB", (columns * (width + gap) + gap, rows * (height + gap) + gap), "white")
    for k, image in enumerate(images):
        row, column = divmod(k, columns)
        grid.paste(image.resize((width, height), Image.NEAREST),
                   (gap + column * (width + gap), gap + row * (height + gap)))
    return grid


def write_samples(model: DiffusionModel, samples, output_dir: Path, label: str,
                  denoiser=None, batch_size: int | None = None) -> Path:
    """Sample ``samples.prompts`` x ``samples.seeds`` (``batch_size`` images at a time); write
    each image, a grid (a row per prompt, a column per seed) as ``samples/<label>.png``, and
    record it in ``samples/samples.json`` (which the report reads)."""
    directory = Path(output_dir) / SAMPLES_DIR
    (directory / label).mkdir(parents=True, exist_ok=True)
    pixels = sample_images(model, samples.prompts, samples.seeds, samples.steps,
                           samples.guidance_scale, denoiser, samples.resolution,
                           samples.negative_prompt, samples.true_cfg_scale, batch_size)
    images = [tensor_image(p) for p in pixels]
    for k, image in enumerate(images):
        prompt, seed = divmod(k, len(samples.seeds))
        image.save(directory / label / f"p{prompt:02d}_s{samples.seeds[seed]}.png")
    scale = max(1, 96 // images[0].size[0])
    image_grid(images, len(samples.seeds), scale).save(directory / f"{label}.png")
    index_path = directory / "samples.json"
    index = json.loads(index_path.read_text()) if index_path.is_file() else {}
    index.update({"prompts": samples.prompts, "seeds": samples.seeds, "steps": samples.steps,
                  "guidance_scale": samples.guidance_scale, "resolution": samples.resolution,
                  "negative_prompt": samples.negative_prompt,
                  "true_cfg_scale": samples.true_cfg_scale})
    index.setdefault("grids", {})[label] = f"{label}.png"
    index_path.write_text(json.dumps(index, indent=2))
    return directory / f"{label}.png"
