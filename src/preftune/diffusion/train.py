"""``preftune diffusion train``: a denoiser trained under a diffusion preference objective by
the shared ``Trainer`` (optimizer, schedule, accumulation, alarms, checkpoints, metrics.jsonl).

Noise and timestep are drawn per example from a generator seeded by (train.seed, step,
example index): shared by the chosen and rejected image and by policy and reference, the same
on a resumed run, and fixed per example for evaluation (so eval numbers compare across steps).
"""

from __future__ import annotations

import copy
import random
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed

from ..config import ConfigError
from ..model.load import without_dropout
from ..train.loop import write_run_header
from ..train.output import check_same_data, start_run
from ..train.run_lock import holding_output_dirs
from ..train.schedule import count_steps
from ..train.trainer import Trainer, add_metrics, means
from . import segments
from .config import DiffusionConfig
from .data import DenoiserBatch, ImagePair, image_tensor
from .flux import configure as configure_flux
from .losses import (DenoisingErrors, RankedErrors, denoising_error, get_diffusion_loss,
                     preference_metrics, ranked_metrics)
from .model import (Conditioning, DiffusionModel, attach_lora, load_diffusion_model,
                    shard_the_denoiser_only)
from .ranked import RankedBatch, collate_ranked
from .sample import check_negative_prompt
from .splits import read_pairs

EVAL_STEP = -1  # the noise "step" of evaluation: the same noise at every evaluation


@dataclass
class ImageBatch(DenoiserBatch):
    """A micro-batch of pairs: pixels [E, 3, R, R] in [-1, 1] per side, the conditioning text
    per side, and the examples' indices (which seed their noise)."""

    chosen: torch.Tensor
    rejected: torch.Tensor | None  # None: not read (plain denoising)
    chosen_text: list[str]
    rejected_text: list[str]
    indices: list[int]

    def _map(self, function) -> "ImageBatch":
        return ImageBatch(function(self.chosen), None if self.rejected is None
                          else function(self.rejected), self.chosen_text,
                          self.rejected_text, self.indices)

    @property
    def one_image(self) -> torch.Tensor:
        return self.chosen[:1]

    def without_prompts(self, rows: set[int]) -> "ImageBatch":
        """The batch with the empty prompt (both sides) for the examples at ``rows``."""
        return replace(self, chosen_text=_emptied(self.chosen_text, rows),
                       rejected_text=_emptied(self.rejected_text, rows))

    @property
    def real_tokens(self) -> int:
        return (1 if self.rejected is None else 2) * self.num_examples


def collate(pairs: list[ImagePair], resolution: int, captions: bool = False) -> ImageBatch:
    """Pixels of both sides (the rejected side None when the records have none); the text of
    each side is its own caption with ``captions`` (DCPO), else the shared prompt."""
    def side(name):
        if getattr(pairs[0], name) is None:
            return None
        return torch.stack([image_tensor(getattr(p, name), p.base_dir, resolution)
                            for p in pairs])

    def text(name):
        return [p.caption(name) if captions else p.prompt for p in pairs]

    return ImageBatch(side("chosen"), side("rejected"), text("chosen"), text("rejected"),
                      [p.index for p in pairs])


def _emptied(texts: list[str], rows: set[int]) -> list[str]:
    return ["" if row in rows else text for row, text in enumerate(texts)]


def dropped_prompts(indices: list[int], seed: int, step: int, share: float) -> set[int]:
    """Positions of the examples whose prompt is dropped at ``step``: each with probability
    ``share``, seeded by (seed, step, example index), so the same however batched."""
    return {row for row, index in enumerate(indices)
            if random.Random(f"prompt dropout {seed} {step} {index}").random() < share}


def example_generator(seed: int, step: int, index: int) -> torch.Generator:
    """The CPU generator of one example at one step (``EVAL_STEP`` for evaluation)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + (step + 2) * 7_919 + index) % 2**63)


def shared_noise(shape: tuple, indices: list[int], seed: int, step: int,
                 num_train_timesteps: int, logit_normal: tuple[float, float] | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(noise [E, *shape], timesteps [E]) from one generator per example seeded by (seed,
    step, index): the same however the examples are batched. Timesteps are uniform on
    [0, T), or with ``logit_normal`` = (mean, std) floor(T sigmoid(mean + std z))."""
    noise, timesteps = [], []
    for index in indices:
        generator = example_generator(seed, step, index)
        if logit_normal is None:
            timesteps.append(torch.randint(0, num_train_timesteps, (1,), generator=generator))
        else:
            mean, std = logit_normal
            u = torch.sigmoid(mean + std * torch.randn(1, generator=generator, dtype=torch.float64))
            timesteps.append((u * num_train_timesteps).long().clamp(max=num_train_timesteps - 1))
        noise.append(torch.randn(shape, generator=generator))
    return torch.stack(noise), torch.cat(timesteps)


class DiffusionTask:
    """A denoiser under a diffusion objective: what ``Trainer`` needs."""

    def __init__(self, config: DiffusionConfig, model: DiffusionModel, splits: dict,
                 reference_strategy: str):
        self.config, self.module = config, model
        self.spec = get_diffusion_loss(config.objective.name)
        self.params = config.objective.params()
        self.train_examples, self.eval_examples = splits["train"], splits.get("eval", [])
        self.reference_strategy = reference_strategy
        self.reference = None
        if reference_strategy == "live":
            self.reference = copy.deepcopy(model.denoiser).requires_grad_(False).eval()
        self.name = f"diffusion {self.spec.name}"
        self.needs_reference = self.spec.needs_reference
        self.batches_ahead = True
        self.sample_shape = None  # the denoiser's [C, H, W] at data.resolution, found once

    def make_batch(self, records: list) -> ImageBatch | RankedBatch:
        if self.spec.ranked:
            return collate_ranked(records, self.config.data.resolution)
        return collate(records, self.config.data.resolution, self.spec.captions)

    def losses(self, module, batch: ImageBatch, step: int):
        """Per-example losses [E] and metrics, with this step's shared noise and timesteps;
        at a training step, a seeded ``data.prompt_dropout`` share of the examples get the
        empty prompt."""
        share = self.config.data.prompt_dropout
        if share and step != EVAL_STEP:
            batch = batch.without_prompts(dropped_prompts(batch.indices, self.config.train.seed,
                                                          step, share))
        return self.losses_with(module, batch, *self.noise_for(batch, step))

    def noise_for(self, batch: ImageBatch | RankedBatch, step: int):
        if self.sample_shape is None:  # one VAE encode for the run, not one per step
            self.sample_shape = tuple(self.module.to_model_space(batch.one_image).shape[1:])
        train = self.config.train
        noise, timesteps = shared_noise(
            self.sample_shape, batch.indices, train.seed, step, self.module.num_train_timesteps,
            (train.logit_mean, train.logit_std) if train.timestep_sampling == "logit_normal"
            else None)
        return noise.to(batch.one_image.device), timesteps.to(batch.one_image.device)

    def losses_with(self, module, batch: ImageBatch | RankedBatch, noise, timesteps):
        """Losses and metrics for given noise [E, ...] and timesteps [E] (tests pass their
        own, to compare with a hand-written computation). ``module`` is the task's
        ``DiffusionModel`` or the DDP wrapper around it: only the trained denoiser's call goes
        through it (``module(x_t, t, c)``), so that DDP averages its gradients."""
        if self.spec.ranked:
            return self._ranked_losses(module, batch, noise, timesteps)
        model = self.module
        sides = ("chosen", "rejected") if self.spec.uses_rejected else ("chosen",)
        noisy, targets, conditions = [], [], []
        for side in sides:
            x_t, target = model.noisy_and_target(
                model.to_model_space(getattr(batch, side)), noise, timesteps)
            noisy.append(x_t)
            targets.append(target)
            conditions.append(model.encode_prompts(getattr(batch, f"{side}_text")))
        policy, reference = self._errors(module, torch.cat(noisy), timesteps.repeat(len(sides)),
                                         Conditioning.cat(conditions), torch.cat(targets))
        errors = DenoisingErrors(*policy.chunk(len(sides)),
                                 *(reference.chunk(2) if reference is not None else ()),
                                 num_train_timesteps=model.num_train_timesteps)
        output = self.spec.fn(errors, self.params)
        return output.losses, preference_metrics(output, errors)

    def _ranked_losses(self, module, batch: RankedBatch, noise, timesteps):
        """Every image of a list shares its list's noise and timestep (as both images of a
        pair do); the errors go back to [E, K] by list and slot."""
        model, steps = self.module, timesteps[batch.owner]
        x_t, target = model.noisy_and_target(model.to_model_space(batch.images),
                                             noise[batch.owner], steps)
        policy, reference = self._errors(module, x_t, steps,
                                         model.encode_prompts(batch.texts)[batch.owner], target)
        errors = RankedErrors(batch.grid(policy), batch.grid(reference), batch.scores,
                              batch.present)
        output = self.spec.fn(errors, self.params)
        return output.losses, ranked_metrics(output, errors)

    def _errors(self, module, x_t, steps, condition, target):
        """The policy's denoising errors (through ``module``, the DDP wrapper when there is
        one) and the reference's (None without one), at training steps ``steps``."""
        steps = self.module.denoiser_timesteps(steps)
        policy = denoising_error(module(x_t, steps, condition), target)
        if not self.spec.needs_reference:
            return policy, None
        return policy, self._reference_errors(module, x_t, steps, condition, target)

    @torch.no_grad()
    def _reference_errors(self, module, x_t, steps, condition, target) -> torch.Tensor:
        model = self.module
        if self.reference_strategy == "live":
            return denoising_error(model.predict(self.reference, x_t, steps, condition), target)
        model.denoiser.disable_adapters()  # adapter-off: the base denoiser is the reference,
        try:  # called through the wrapper too (under FSDP only its forward gathers weights)
            return denoising_error(module(x_t, steps, condition), target)
        finally:
            model.denoiser.enable_adapters()

    @torch.no_grad()
    def evaluate(self, module, step: int) -> dict:
        """Mean metrics over the held-out pairs, each with its fixed evaluation noise."""
        was_training = module.training
        module.eval()
        totals: dict = {}
        size = self.config.train.batch_size
        for start in range(0, len(self.eval_examples), size):
            batch = self.make_batch(self.eval_examples[start : start + size]).to(
                self.module.device)
            add_metrics(totals, self.losses(module, batch, EVAL_STEP)[1])
        module.train(was_training)
        return means(totals)

    def unsharded(self, state: dict) -> DiffusionModel:
        """A plain copy of the pipeline holding ``state``, the gathered weights of an FSDP
        run: the pipeline of model.path, LoRA attached as in training."""
        model = load_diffusion_model(self.config.model.path, self.module.compute_dtype)
        if self.config.model.lora is not None:
            attach_lora(model, self.config.model.lora)
        segments.configure(model, self.config.model.segment_tokens)
        missing = model.load_state_dict(state, strict=False).missing_keys
        if any(name.startswith("denoiser.") for name in missing):
            raise RuntimeError(f"the gathered state lacks denoiser weights: {missing[:3]}")
        return model

    def save(self, module: DiffusionModel, output_dir: Path) -> None:
        module.save(Path(output_dir) / "model")

    def run_info(self) -> dict:
        return {"objective": self.spec.name, "params": {self.spec.name: asdict(self.params)},
                "reference": self.reference_strategy, "model_kind": "diffusion",
                "layout": f"images {self.config.data.resolution}x{self.config.data.resolution}",
                "dtype": self.config.model.dtype, "paper": self.spec.paper}


def diffusion_task(config: DiffusionConfig, accelerator: Accelerator, plan_only: bool = False):
    """Load the pipeline and the data, attach LoRA; returns (task, total_steps), or (None, 0)
    after printing the plan when ``plan_only``."""
    spec = get_diffusion_loss(config.objective.name)
    if spec.online and accelerator.distributed_type == DistributedType.FSDP:
        raise ConfigError(f"objective {spec.name} samples with the whole denoiser at every step, "
                          "outside the trained forward: it runs in one process, under DDP or "
                          "DeepSpeed ZeRO-1/2 (whole weights on every process), not FSDP.")
    if spec.online and config.train.timestep_sampling != "uniform":
        raise ConfigError(f"train.timestep_sampling: {config.train.timestep_sampling} draws "
                          f"the noise level of pairs and lists; objective {spec.name} samples "
                          "its own trajectories. Remove it.")
    if accelerator.distributed_type == DistributedType.DEEPSPEED and \
            accelerator.state.deepspeed_plugin.zero_stage >= 3:
        raise ConfigError("preftune diffusion train runs under DDP, FSDP2 or DeepSpeed ZeRO-1/2, "
                          "not ZeRO-3 (it would partition the frozen text encoders and VAE, "
                          "which run outside the denoiser's forward): use FSDP2 to split the "
                          "denoiser.")
    strategy = config.reference_strategy
    kept, report = read_pairs(config)  # (a bad record stops the run before the pipeline loads)
    if report.get("identical_images"):
        print(f"warning: {report['identical_images']} of {len(kept['train'])} training records "
              "show the same image twice (chosen == rejected, by content); they carry no "
              "preference signal (data_report.json: identical_images)")
    if not plan_only:
        check_same_data(config.output_dir, report)
    model = load_diffusion_model(config.model.path, getattr(torch, config.model.dtype))
    if not config.train.keep_dropout:  # the policy against its reference on equal terms
        without_dropout(model.denoiser)  # (before LoRA: its own dropout is kept)
    if config.model.lora is not None:
        attach_lora(model, config.model.lora)
    if model.flow and spec.online:
        raise ConfigError(f"objective {spec.name} samples DDIM transitions; "
                          f"{config.model.path} is a flow-matching pipeline ({model.family}), "
                          "which it does not support: use diffusion_dpo, dcpo, mapo, rank_dpo "
                          "or denoising.")
    configure_flux(model, config)
    segments.configure(model, config.model.segment_tokens)
    samples = config.samples
    if samples.prompts:
        check_negative_prompt(model.family, samples.negative_prompt, samples.guidance_scale,
                              samples.true_cfg_scale,
                              ("samples.negative_prompt", "samples.true_cfg_scale"))
    if config.train.gradient_checkpointing:
        model.denoiser.enable_gradient_checkpointing()
    splits = {name: records for name, records in kept.items() if records}
    if accelerator.is_main_process and not plan_only:  # a plan writes nothing
        write_run_header(Path(config.output_dir), config, report)
    model.to(accelerator.device)
    model.denoiser.train()
    if accelerator.distributed_type == DistributedType.FSDP:
        shard_the_denoiser_only(accelerator, model)
    if spec.online:  # SPO, LongAlign: sample from prompts at each step
        from .longalign import LongAlignTask
        from .spo import SPOTask

        task = {"transitions": SPOTask, "reward": LongAlignTask}[spec.online](
            config, model, splits, strategy)
    else:
        task = DiffusionTask(config, model, splits, strategy)
    if plan_only:
        from .plan import diffusion_plan

        print(diffusion_plan(config, task, accelerator.device))
        return None, 0
    return task, count_steps(config.train, len(splits["train"]), accelerator.num_processes)


@holding_output_dirs
def train_diffusion(config: DiffusionConfig, resume: bool = False, show_progress: bool = True,
                    overwrite: bool = False, plan_only: bool = False) -> Path:
    """Train according to ``config``; sample the fixed prompts before and after (when
    ``samples.prompts`` is set). Returns the output directory. ``plan_only`` prints the plan
    (objective, images, the memory of a step) and stops before training."""
    from .sample import write_samples

    accelerator = Accelerator(gradient_accumulation_steps=1)
    if plan_only and accelerator.num_processes > 1:
        raise ConfigError("preftune diffusion train --plan measures a step in one process; "
                          "start it without torch.distributed.run or accelerate launch.")
    if not plan_only and start_run(config, accelerator, resume, overwrite):
        # --resume of a finished run: nothing to train, if it trained on this data
        check_same_data(config.output_dir, read_pairs(config)[1], finished=True)
        return Path(config.output_dir)
    started = time.perf_counter()  # setup counts in the run's train_seconds
    set_seed(config.train.seed)
    task, total_steps = diffusion_task(config, accelerator, plan_only)
    output_dir = Path(config.output_dir)
    if task is None:
        return output_dir
    sampling = config.samples.prompts and accelerator.is_main_process
    if sampling and not resume:
        write_samples(task.module, config.samples, output_dir, "before",
                      batch_size=config.samples.batch_size)
    Trainer(task, config.train, output_dir, accelerator, total_steps, resume=resume,
            show_progress=show_progress, started=started).run()
    if sampling:
        trained = task.module
        if accelerator.distributed_type == DistributedType.FSDP:  # whole only when saved
            trained = load_diffusion_model(output_dir / "model", trained.compute_dtype)
            trained.to(accelerator.device)
        write_samples(trained, config.samples, output_dir, "after",
                      batch_size=config.samples.batch_size)
    return output_dir

