"""``preftune diffusion train --plan``: the objective, the images and the memory of a step
before training, per process. Weights (the whole pipeline, and a live reference's copy of the
denoiser) and AdamW's moments are counted from the parameters; what a training step adds on top
(activations, gradients, backward's working tensors, and for SPO and LongAlign the sampling
inside the step) is measured: the plan runs the step's forward and backward, without an
update, on micro-batches of the largest example and the two largest of the run's data at its
resolution, and extends the line through the two to the ``train.batch_size`` largest (every
term but the gradients grows with the images). A denoiser's step at full resolution takes a
while on a CPU."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ..model.load import released
from ..train.optimizers import EIGHT_BIT, embedding_weights, moment_bytes
from ..train.peak import peak_allocated
from ..train.plan import MIB, device_fit, tensor_bytes
from .data import tensor_image

PROBE_STEP = 0  # the noise and timesteps of the first training step


def diffusion_plan(config, task, device) -> str:
    """The plan of ``task`` (set up as it will train: LoRA, checkpointing, on ``device``)."""
    module, cfg = task.module, config.train
    denoiser = module.denoiser
    trained = [p for p in module.parameters() if p.requires_grad]
    weights = tensor_bytes(module.parameters()) + tensor_bytes(module.buffers())
    reference = tensor_bytes(task.reference.parameters()) if task.reference is not None else 0
    moments = moment_bytes(cfg.optimizer, trained, embedding_weights(module))
    frozen = held_weights(task)
    checkpointing = cfg.gradient_checkpointing
    step = measured_step(task, device, cfg.batch_size)
    other = not checkpointing and hasattr(denoiser, "enable_gradient_checkpointing")
    if other:  # what checkpointing would bring it to, measured the same way
        denoiser.enable_gradient_checkpointing()
        try:
            checkpointed = measured_step(task, device, cfg.batch_size)
        finally:
            denoiser.disable_gradient_checkpointing()
    spec = task.spec
    shape = ("prompts, sampled in each step" if spec.online else "ranked image lists"
             if spec.ranked else "image pairs")
    count = sum(p.numel() for p in module.parameters())
    denoised = sum(p.numel() for p in denoiser.parameters())
    base = weights + reference + moments + frozen
    lines = [
        f"objective          {spec.name} ({shape}, "
        f"{'needs reference' if spec.needs_reference else 'reference-free'})",
        f"reference          {task.reference_strategy if spec.needs_reference else 'none'}",
        f"images             {config.data.resolution} x {config.data.resolution}, "
        f"{cfg.batch_size} examples a micro-batch, the largest ({module.family} denoiser)",
        f"parameters         denoiser {denoised / 1e6:.1f}M, trainable "
        f"{sum(p.numel() for p in trained) / 1e6:.1f}M; the rest of the pipeline "
        f"{(count - denoised) / 1e6:.1f}M (text encoders, VAE), frozen",
        "memory estimate (MiB per process, peak of one micro-batch):",
        f"  weights          {weights / MIB:10.0f}  (the whole pipeline)",
        f"  reference        {reference / MIB:10.0f}  ({task.reference_strategy})"
        if spec.needs_reference else None,
        f"  scorer           {frozen / MIB:10.0f}  (frozen, on the device: "
        f"{_held_settings(task)})" if frozen else None,
        f"  optimizer        {moments / MIB:10.0f}  (AdamW, "
        + ("8-bit moments)" if cfg.optimizer in EIGHT_BIT else "moments in the weights' dtype)"),
        f"  step             {step / MIB:10.0f}  (activations, gradients and backward's working "
        "tensors: measured on 1 and 2 examples"
        + (", gradient checkpointing)" if checkpointing else ")"),
        f"  total            {(base + step) / MIB:10.0f}",
    ]
    if other:
        lines.append(f"  with checkpointing {(base + checkpointed) / MIB:8.0f}  "
                     "(train.gradient_checkpointing: true)")
    lines += device_fit(base + step, base + checkpointed if other else None, device)
    return "\n".join(line for line in lines if line is not None)


def held_weights(task) -> int:
    """Bytes of the models the task keeps beside the pipeline and the reference, which stay
    on the device for the run: LongAlign's reward model, SPO's step-aware scorer. Found as the
    modules its attributes hold; a tensor the pipeline or the reference has is not counted
    again."""
    counted = {id(t) for m in (task.module, task.reference) if m is not None
               for t in (*m.parameters(), *m.buffers())}
    tensors = {id(t): t for module in held_modules(_holders(task))
               for t in (*module.parameters(), *module.buffers()) if id(t) not in counted}
    return tensor_bytes(tensors.values())


def _holders(task) -> list:
    """The objects the task keeps as attributes (a scorer, a reward model), not its modules."""
    return [value for value in vars(task).values()
            if hasattr(value, "__dict__") and not isinstance(value, nn.Module)]


def _held_settings(task) -> str:
    """The config keys that named the models ``held_weights`` counts (each holder says its
    own: ``setting``)."""
    return ", ".join(holder.setting for holder in _holders(task)
                     if getattr(holder, "setting", None) and held_modules([holder]))


def held_modules(holders) -> list[nn.Module]:
    """The networks that objects such as scorers keep as attributes."""
    return [module for holder in holders for module in vars(holder).values()
            if isinstance(module, nn.Module)]


def measured_step(task, device, batch_size: int) -> float:
    """What a training step of the ``batch_size`` largest examples (lists with the most images
    first) allocates at its peak beyond the weights: measured on the largest one and the two
    largest, extended linearly in the images (or prompts) a micro-batch holds."""
    ordered = sorted(task.train_examples, key=lambda record: -_size(record))
    largest = (ordered * batch_size)[:batch_size]  # (data smaller than a batch repeats)
    probes = largest[:2]
    peaks = [_step_peak(task, probes[:count], device) for count in range(1, len(probes) + 1)]
    sizes = [sum(map(_size, probes[:count])) for count in range(1, len(probes) + 1)]
    per_size = (peaks[1] - peaks[0]) / (sizes[1] - sizes[0]) if len(peaks) == 2 else \
        peaks[0] / sizes[0]
    return peaks[0] + per_size * (sum(map(_size, largest)) - sizes[0])


def _size(record) -> int:
    """What a record adds to a step: its images for a ranked list, else one pair or prompt."""
    return len(getattr(record, "images", ())) or 1


def _step_peak(task, examples: list, device) -> int:
    module = task.module
    batch = task.make_batch(examples).to(device)

    def step():
        losses, _ = task.losses(module, batch, PROBE_STEP)
        losses.mean().backward()

    try:
        return peak_allocated(step, device)
    finally:
        module.zero_grad(set_to_none=True)


def ranking_lines(config, prompts: list[str]) -> list[str]:
    """The memory of a round's sampling and ranking, which hold the pipeline in model.dtype
    without gradients and every scorer: their weights, and one batch's peak, measured on the
    device: ``online.batch_size`` images sampled (one denoising step, guidance and decoding as
    the round does them; more steps hold no more) and scored by each scorer. A round's
    evaluation holds one pipeline at a time and the first scorer: no more."""
    from .evaluate import image_scorer
    from .model import load_for_sampling
    from .pipeline_files import pipeline_dir
    from .sample import sample_images

    online = config.online
    model = load_for_sampling(pipeline_dir(config.model.path), "model.path", config.model.dtype)
    scorers = [image_scorer(spec) for spec in online.scorers]
    held = held_modules(scorers)
    weights = tensor_bytes(model.parameters()) + tensor_bytes(model.buffers())
    scorer_weights = sum(tensor_bytes(module.parameters()) for module in held)
    count = min(online.batch_size, len(prompts) * len(online.seeds))
    rows = [prompts[k % len(prompts)] for k in range(count)]
    pixels = []

    def sample():
        pixels.append(sample_images(model, rows, [online.seeds[0]], 1, online.guidance_scale,
                                    resolution=online.resolution,
                                    negative_prompt=online.negative_prompt,
                                    true_cfg_scale=online.true_cfg_scale, batch_size=count))

    device = model.device
    sampling = peak_allocated(sample, device)
    images = [tensor_image(x) for x in pixels[0]]
    scoring = max(peak_allocated(lambda s=s: s.score(rows, images), device) for s in scorers)
    total = weights + scorer_weights + max(sampling, scoring)
    resolution = online.resolution or model.sample_shape(None)[-1] * model.pixels_per_sample
    return [f"ranking memory (MiB, each round; the pipeline in {config.model.dtype} without "
            "gradients, and the scorers):",
            f"  pipeline         {weights / MIB:10.0f}",
            f"  scorers          {scorer_weights / MIB:10.0f}  ({', '.join(online.scorers)})",
            f"  sampling         {sampling / MIB:10.0f}  ({count} images at {resolution} px a "
            "batch, online.batch_size; measured)",
            f"  scoring          {scoring / MIB:10.0f}  (a batch's images, measured)",
            f"  total            {total / MIB:10.0f}",
            *device_fit(total, None, device, "a smaller online.batch_size")]


def print_rounds_plan(config, prompts: list[str]) -> None:
    """``preftune diffusion online --plan``: prints the memory of a round's sampling and
    ranking (``ranking_lines``), then round 1's ``diffusion train --plan`` on lists like the
    ones its sampling makes, each prompt's samples (``list_size``, default one per seed) as
    blank images at data.resolution with distinct scores, written to a temporary folder."""
    import json
    import tempfile

    from PIL import Image

    from .config import DiffusionConfig
    from .online import round_tree
    from .ranking import list_members
    from .train import train_diffusion

    online, size = config.online, config.data.resolution
    images = max(len(members) for _, members in list_members([""], ["policy"], online.seeds,
                                                          online.list_size))
    print(f"rounds             {online.rounds}, {len(prompts)} prompts x {len(online.seeds)} "
          f"samples ({online.steps} steps) ranked by {', '.join(online.scorers)}")
    print("\n".join(released(lambda: ranking_lines(config, prompts))))
    print(f"training (round 1, on lists of {images} images):")
    with tempfile.TemporaryDirectory() as folder:
        Image.new("RGB", (size, size), (127, 127, 127)).save(Path(folder) / "blank.png")
        rows = [{"prompt": prompt, "images": ["blank.png"] * images,
                 "image_scores": [k / images for k in range(images)]}
                for prompt in prompts[: config.train.batch_size]]
        ranked = Path(folder) / "ranked.jsonl"
        ranked.write_text("".join(json.dumps(row) + "\n" for row in rows))
        tree = round_tree(config, config.model.path, str(ranked), Path(config.output_dir))
        train_diffusion(DiffusionConfig.from_dict(tree), plan_only=True)
