"""LongAlign's decomposed preference optimization (Liu et al. 2024, arXiv:2410.11817): a
denoiser fine-tuned from prompts alone by backpropagating a CLIP-based preference score of its
own samples; the loss is ``reward_loss.longalign``.

For each prompt the policy samples a deterministic DDIM trajectory (eta 0, classifier-free
guidance) from noise x_T drawn by a CPU generator seeded by (train.seed, step, record index).
``grad_steps`` of its steps, one every ``sampling_steps // grad_steps`` from a phase seeded by
(train.seed, step), call the denoiser with gradients, through the trained forward (the DDP
wrapper under several processes), on a detached x_t (the repo's choice: gradients flow through
the DDIM updates that follow, not back through the denoiser's input); the others without. The
last step's predicted x̂_0 is decoded by the VAE with gradients and scored by the frozen
preference model.

The text side, as the repo's dense_score: a prompt is split into sentences (at . ! ? ;), each
sentence is embedded (unit length, CLIP's 77 tokens each) and the prompt's embedding is their
mean, so long prompts are read whole. The text-irrelevant direction v is the unit mean text
embedding of the training prompts, computed once before training (the repo takes the mean over
each step's batch, gathered over processes; over the whole prompt set it does not depend on
the batch size, and the paper defines it as the direction shared by all text embeddings).
"""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F

from ..config import ConfigError
from ..objectives.metrics import sum_count
from .reward_loss import RewardEmbeddings
from .segments import sentences
from .spo import DDIMTransition, PromptBatch, PromptTask
from .train import example_generator

DIRECTION_BATCH = 64  # prompts per text forward while finding the direction


class CLIPPreference:
    """A frozen CLIP-based preference model (PickScore, Denscore, a CLIP; or a step-aware
    model of ``preftune diffusion spm`` read at t = 0)."""

    def __init__(self, path: str, device):
        from ..model.load import given_as
        from .step_model import StepAwarePreferenceModel

        with given_as("objective.reward_model"):
            self.model = StepAwarePreferenceModel.from_pretrained(path).to(device).eval()
        self.model.requires_grad_(False)
        self.device, self.setting = device, "objective.reward_model"  # (what named it)

    @torch.no_grad()
    def text(self, prompts: list[str]) -> torch.Tensor:
        """[E, P]: each prompt's mean unit sentence embedding (not renormalised)."""
        split = [sentences(prompt) for prompt in prompts]
        owner = torch.tensor([e for e, parts in enumerate(split) for _ in parts],
                             device=self.device)
        embeddings = self.model.text_embeddings([s for parts in split for s in parts])
        sums = torch.zeros(len(prompts), embeddings.shape[1], device=self.device)
        counts = torch.tensor([len(parts) for parts in split], device=self.device)
        return sums.index_add(0, owner, embeddings) / counts[:, None]

    def image(self, images: torch.Tensor) -> torch.Tensor:
        """[E, P] unit embeddings of images [E, 3, H, W] in [-1, 1], differentiable."""
        return self.model.image_embeddings(images, torch.zeros(len(images)))

    def direction(self, prompts: list[str]) -> torch.Tensor:
        """The unit mean text embedding of ``prompts``."""
        total = sum(self.text(prompts[start : start + DIRECTION_BATCH]).sum(0)
                    for start in range(0, len(prompts), DIRECTION_BATCH))
        return F.normalize(total, dim=0)


class LongAlignTask(PromptTask):
    """LongAlign: each ``losses`` call samples the batch's images with gradients and scores
    them with the decomposed preference score."""

    def __init__(self, config, model, splits: dict, reference_strategy: str):
        super().__init__(config, model, splits, reference_strategy)
        p = self.params
        if not p.reward_model:
            raise ConfigError("objective.reward_model is required for longalign: a CLIP "
                              "preference model directory (model, tokenizer, "
                              "preprocessor_config.json), e.g. PickScore or Denscore.")
        if p.grad_steps > p.sampling_steps:
            raise ConfigError(f"objective.grad_steps {p.grad_steps} exceeds "
                              f"objective.sampling_steps {p.sampling_steps}; lower it.")
        self.transition = DDIMTransition(model.scheduler.config, p.sampling_steps, eta=0.0)
        self.reward = CLIPPreference(p.reward_model, model.device)
        self.direction = self.reward.direction([r.prompt for r in self.train_examples])

    def grad_plan(self, step: int) -> set[int]:
        """Indices of the steps with gradients at training step ``step``: a phase seeded by
        (train.seed, step), then every stride-th step; one plan for the whole step, as the
        repo's, so every process calls the trained forward equally often (DDP needs that)."""
        stride = self.params.sampling_steps // self.params.grad_steps
        phase = random.Random(f"longalign {self.config.train.seed} {step}").randrange(stride)
        return {phase + k * stride for k in range(self.params.grad_steps)}

    def sample(self, module, batch: PromptBatch, step: int, cond, uncond) -> torch.Tensor:
        """The batch's predicted clean samples x̂_0 [E, ...] of the last step, with gradients
        through its planned steps (``module``: the task's model or its wrapper)."""
        model, size = self.module, batch.num_examples
        generators = [example_generator(self.config.train.seed, step, index)
                      for index in batch.indices]
        shape = model.sample_shape()
        x = torch.stack([torch.randn(shape, generator=g) for g in generators]).to(model.device)
        plan, policy = self.grad_plan(step), self.sampler()
        for i, t in enumerate(self.transition.timesteps):
            if i in plan:  # through the trained forward, on a detached x_t
                prediction = self.predict(module, x.detach(), t, cond, uncond)
            else:
                with torch.no_grad():
                    prediction = self.predict(policy, x, t, cond, uncond)
            x, _, x0 = self.transition(prediction, [t] * size, x)
        return x0

    def losses(self, module, batch: PromptBatch, step: int):
        """Per-prompt losses [E] and metrics: the decomposed score and its two parts."""
        model = self.module
        cond, uncond = self.conditions(batch.prompts)
        x0 = self.sample(module, batch, step, cond, uncond)
        if model.vae is not None:
            x0 = x0.to(model.vae.dtype)
        images = model.to_pixels(x0).float()
        embeddings = RewardEmbeddings(self.reward.text(batch.prompts), self.reward.image(images),
                                      self.direction)
        output = self.spec.fn(embeddings, self.params)
        relevant, irrelevant = embeddings.parts()
        return output.losses, {"loss": sum_count(output.losses),
                               "reward/score": sum_count(output.chosen_rewards),
                               "reward/text_relevant": sum_count(relevant),
                               "reward/text_irrelevant": sum_count(irrelevant)}
