"""``preftune diffusion spm``: train SPO's step-aware preference model (``step_model.py``) on
image preference pairs, through the shared ``Trainer``.

Each step noises both images of a pair to one timestep t with one noise (drawn per pair and
step from the run's seed, as Diffusion-DPO's are), lets the frozen pipeline's denoiser predict
each clean image x̂_0 with classifier-free guidance (SPO's code uses scale 5), decodes it, and
trains the scorer to prefer the chosen x̂_0 at t with PickScore's loss. Evaluation reports the
held-out accuracy at fixed timesteps (0, 250, 500, 750, 950 of 1000), so a run shows where
along the trajectory the scorer can still tell the images apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from pydantic import Field, model_validator

from ..config import ConfigError, NonNegative, RunConfig, Section
from ..objectives.metrics import sum_count
from ..train.engines import SHARDED
from ..train.loop import write_run_header
from ..train.output import start_run
from ..train.run_lock import holding_output_dirs
from ..train.schedule import count_steps
from ..train.trainer import Trainer, add_metrics, means
from .config import DiffusionDataConfig, DiffusionTrainConfig, refuse_language_model_keys
from .data import DenoiserBatch
from .losses import get_diffusion_loss
from .model import DiffusionModel, load_diffusion_model
from .spo import DDIMTransition
from .step_model import StepAwarePreferenceModel
from .splits import split_pairs
from .train import EVAL_STEP, ImageBatch, collate, shared_noise

EVAL_FRACTIONS = (0.0, 0.25, 0.5, 0.75, 0.95)  # of T: the timesteps evaluation reports


class StepModelSection(Section):
    path: str = ""
    """The CLIP directory to start from (model, tokenizer, preprocessor_config.json), e.g.
    PickScore; or a step-aware model trained before."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """The scorer's weights' dtype."""


class PipelineSection(Section):
    path: str = ""
    """The diffusers pipeline SPO will train (DDPM-style noise schedule): its frozen denoiser
    predicts each x̂_0 the scorer learns from."""
    guidance_scale: NonNegative = 5.0
    """Classifier-free guidance of those predictions (SPO's code: 5)."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """The pipeline's weights' dtype."""


class StepModelConfig(RunConfig):
    """A ``preftune diffusion spm`` run."""

    output_dir: str = "runs/spm"
    """Where model/ (the step-aware preference model), metrics and checkpoints are written."""
    model: StepModelSection = StepModelSection()
    """The CLIP scorer that trains."""
    pipeline: PipelineSection = PipelineSection()
    """The frozen pipeline whose predictions it learns to rate."""
    data: DiffusionDataConfig = DiffusionDataConfig()
    """Image preference pairs (prompt, chosen, rejected; a tie when chosen_score equals
    rejected_score). data.resolution: the side the images are noised at."""
    train: DiffusionTrainConfig = Field(default_factory=lambda: DiffusionTrainConfig(
        learning_rate=3e-6))
    """Optimizer, schedule, batching, logging and checkpoints (PickScore's rate: 3e-6)."""

    @model_validator(mode="after")
    def _consistent(self):
        refuse_language_model_keys(self.train, "a step-aware preference model")
        if not self.model.path or not self.pipeline.path:
            raise ValueError("model.path (a CLIP directory) and pipeline.path (a diffusers "
                             "pipeline directory) are both needed.")
        return self


@dataclass
class StepPairBatch(DenoiserBatch):
    """Image pairs and, per pair, the chosen image's label: 1, or 1/2 for a tie."""

    pairs: ImageBatch
    labels: torch.Tensor

    def _map(self, function) -> "StepPairBatch":
        return StepPairBatch(self.pairs._map(function), function(self.labels))

    @property
    def indices(self) -> list[int]:
        return self.pairs.indices

    @property
    def real_tokens(self) -> int:
        return self.pairs.real_tokens


def tie_label(pair) -> float:
    """1 for a preference, 1/2 when the record scores both images the same."""
    chosen, rejected = pair.scores.get("chosen_score"), pair.scores.get("rejected_score")
    return 0.5 if chosen is not None and chosen == rejected else 1.0


def pickscore_loss(chosen: torch.Tensor, rejected: torch.Tensor,
                   labels: torch.Tensor) -> torch.Tensor:
    """-[y log p_w + (1 - y) log p_l], p = softmax(s_w, s_l): PickScore's loss per pair."""
    log_p = torch.stack([chosen, rejected], dim=-1).log_softmax(dim=-1)
    return -(labels * log_p[:, 0] + (1 - labels) * log_p[:, 1])


class StepModelTask:
    """The scorer under PickScore's loss on x̂_0 the frozen pipeline predicts."""

    name = "diffusion spm"
    needs_reference = False
    batches_ahead = True

    def __init__(self, config: StepModelConfig, scorer: StepAwarePreferenceModel,
                 pipeline: DiffusionModel, splits: dict):
        self.config, self.module, self.pipeline = config, scorer, pipeline
        self.train_examples, self.eval_examples = splits["train"], splits.get("eval", [])
        self.x0 = DDIMTransition(pipeline.scheduler.config, pipeline.num_train_timesteps, 0.0)
        self.sample_shape = None

    def make_batch(self, records) -> StepPairBatch:
        return StepPairBatch(collate(records, self.config.data.resolution),
                             torch.tensor([tie_label(r) for r in records]))

    @torch.no_grad()
    def predicted_images(self, batch: StepPairBatch, step: int, timesteps=None):
        """(x̂_0 of chosen, of rejected) as images in [-1, 1], and the timesteps: each pair
        noised with its own noise at its own t (``timesteps`` overrides t)."""
        pipeline, pairs = self.pipeline, batch.pairs
        if self.sample_shape is None:
            self.sample_shape = tuple(pipeline.to_model_space(pairs.one_image).shape[1:])
        noise, drawn = shared_noise(self.sample_shape, pairs.indices, self.config.train.seed,
                                    step, pipeline.num_train_timesteps)
        device = pairs.chosen.device
        t_host = drawn if timesteps is None else timesteps  # (x̂_0's schedule lookup: no read)
        t, noise = t_host.to(device), noise.to(device)
        condition = pipeline.encode_prompts(pairs.chosen_text)
        guidance = self.config.pipeline.guidance_scale
        unconditional = pipeline.unconditional(len(t)) if guidance != 1 else None
        images = []
        for pixels in (pairs.chosen, pairs.rejected):
            x_t, _ = pipeline.noisy_and_target(pipeline.to_model_space(pixels), noise, t)
            prediction = pipeline.predict(pipeline.denoiser, x_t, t, condition).float()
            if unconditional is not None:  # (two calls, as the paper's code makes them)
                free = pipeline.predict(pipeline.denoiser, x_t, t, unconditional).float()
                prediction = free + guidance * (prediction - free)
            x0 = self.x0.predicted_x0(prediction, t_host, x_t.float())
            images.append(pipeline.to_pixels(x0.to(pipeline.compute_dtype)).float().clamp(-1, 1))
        return images[0], images[1], t

    def losses(self, module, batch: StepPairBatch, step: int, timesteps=None):
        chosen, rejected, t = self.predicted_images(batch, step, timesteps)
        prompts = batch.pairs.chosen_text
        # one forward for both sides (through DDP's wrapper when there is one)
        score_w, score_l = module(prompts * 2, torch.cat([chosen, rejected]),
                                  torch.cat([t, t])).chunk(2)
        losses = pickscore_loss(score_w, score_l, batch.labels.to(score_w))
        margin = (score_w - score_l).detach()
        decided = batch.labels != 0.5
        return losses, {"loss": sum_count(losses.detach()),
                        "rewards/accuracies": sum_count((margin > 0).float(), decided),
                        "rewards/margins": sum_count(margin, decided),
                        "rewards/chosen": sum_count(score_w.detach()),
                        "rewards/rejected": sum_count(score_l.detach())}

    @torch.no_grad()
    def evaluate(self, module, step: int) -> dict:
        """Held-out accuracy (and loss) at each timestep of ``EVAL_FRACTIONS``, same noise at
        every evaluation."""
        was_training = module.training
        module.eval()
        results, size = {}, self.config.train.batch_size
        for fraction in EVAL_FRACTIONS:
            t = int(fraction * self.pipeline.num_train_timesteps)
            totals: dict = {}
            for start in range(0, len(self.eval_examples), size):
                batch = self.make_batch(self.eval_examples[start : start + size]).to(
                    self.pipeline.device)
                fixed = torch.full((batch.num_examples,), t, dtype=torch.long)
                add_metrics(totals, self.losses(module, batch, EVAL_STEP, fixed)[1])
            for name, value in means(totals).items():
                results[name if fraction == 0.5 else f"{name}@t{t}"] = value
        module.train(was_training)
        return results

    def save(self, module: StepAwarePreferenceModel, output_dir: Path) -> None:
        module.save_pretrained(Path(output_dir) / "model")

    def run_info(self) -> dict:
        return {"objective": "spm", "model_kind": "step-aware preference model",
                "pipeline": self.config.pipeline.path,
                "guidance_scale": self.config.pipeline.guidance_scale,
                "layout": f"image pairs {self.config.data.resolution}x"
                          f"{self.config.data.resolution}",
                "dtype": self.config.model.dtype, "paper": "SPO, arXiv:2406.04314"}


def step_model_task(config: StepModelConfig, accelerator: Accelerator):
    """Load the scorer, the pipeline and the pairs; returns (task, total_steps)."""
    if accelerator.distributed_type in SHARDED:
        raise ConfigError("preftune diffusion spm runs under DDP or in one process, not FSDP "
                          "or DeepSpeed.")
    splits = split_pairs(config, get_diffusion_loss("diffusion_dpo"))  # pairs, as it reads them
    pipeline = load_diffusion_model(config.pipeline.path, getattr(torch, config.pipeline.dtype),
                                    key="pipeline.path")
    if pipeline.flow:
        raise ConfigError(f"pipeline.path {config.pipeline.path}: a flow-matching pipeline "
                          f"({pipeline.family}); SPO, which the step-aware model serves, runs "
                          "on DDPM-style pipelines (SD 1.x/2.x, SDXL).")
    pipeline.requires_grad_(False).eval().to(accelerator.device)
    scorer = StepAwarePreferenceModel.from_pretrained(config.model.path,
                                                      getattr(torch, config.model.dtype))
    if accelerator.is_main_process:
        write_run_header(Path(config.output_dir), config, {
            "shape": "image pairs", **{name: {"records": len(records)}
                                       for name, records in splits.items()}})
    scorer.to(accelerator.device).train()
    task = StepModelTask(config, scorer, pipeline, splits)
    return task, count_steps(config.train, len(splits["train"]), accelerator.num_processes)


@holding_output_dirs
def train_step_model(config: StepModelConfig, resume: bool = False, show_progress: bool = True,
                     overwrite: bool = False) -> Path:
    """Train a step-aware preference model according to ``config``; returns the output
    directory (the model in ``model/``)."""
    accelerator = Accelerator(gradient_accumulation_steps=1)
    if start_run(config, accelerator, resume, overwrite):
        return Path(config.output_dir)  # --resume of a finished run: nothing to train
    set_seed(config.train.seed)
    task, total_steps = step_model_task(config, accelerator)
    return Trainer(task, config.train, Path(config.output_dir), accelerator, total_steps,
                   resume=resume, show_progress=show_progress).run()

