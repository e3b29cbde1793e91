"""LongAlign's decomposed preference objective (Liu et al. 2024, arXiv:2410.11817, #260): the
loss over a CLIP-based preference model's embeddings of a sampled image and its prompt; the
sampling that makes the image, with gradients, is ``longalign.py``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import torch
from pydantic import Field

from .losses import DiffusionLossOutput, diffusion_loss


@dataclass
class RewardEmbeddings:
    """The preference model's embeddings: ``text`` [E, P] (each prompt's sentence embeddings,
    unit length, averaged), ``image`` [E, P] (unit length, with gradients back to the
    denoiser) and ``direction`` [P] (unit length: the mean text embedding of the training
    prompts, the text-irrelevant direction every prompt shares)."""

    text: torch.Tensor
    image: torch.Tensor
    direction: torch.Tensor

    def parts(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(text-relevant, text-irrelevant) score per example, summing to text . image: the
        irrelevant part is (text . v)(v . image), what any image gains by moving along v."""
        irrelevant = (self.text @ self.direction) * (self.image @ self.direction)
        return (self.text * self.image).sum(-1) - irrelevant, irrelevant


@dataclass
class LongAlignParams:
    reward_model: str = ""
    """The CLIP-based preference model (required): a CLIPModel directory with its tokenizer
    and preprocessor_config.json (PickScore, LongAlign's Denscore, a plain CLIP) or its Hub
    id; frozen, differentiated through."""
    reweight: Annotated[float, Field(ge=0, le=1)] = 0.3
    """omega, the weight kept on the text-irrelevant part of the score (the repo's REWEIGHT,
    0.3); 1: the plain score."""
    sampling_steps: Annotated[int, Field(ge=2)] = 50
    """DDIM steps (eta 0) of each sampled trajectory (the repo: 50)."""
    grad_steps: Annotated[int, Field(ge=1)] = 5
    """Steps whose prediction carries gradients, one every sampling_steps / grad_steps steps
    from a random phase (the repo: 5 of 50); the denoiser's input there is detached."""
    guidance_scale: Annotated[float, Field(ge=1)] = 7.5
    """Classifier-free guidance while sampling (the repo: 7.5); 1: none."""


@diffusion_loss("longalign", params=LongAlignParams, needs_reference=False, online="reward",
                paper="arXiv:2410.11817")
def longalign(embeddings: RewardEmbeddings, params: LongAlignParams) -> DiffusionLossOutput:
    """LongAlign: backpropagate a CLIP preference score, its text-irrelevant part down-weighted.

    s = (t - (1 - omega)(t . v) v) . i  =  s_relevant + omega s_irrelevant;  l = (1 - s) / 2

    t: the prompt's text embedding (the mean of its sentences' unit embeddings), i: the unit
    image embedding of the denoiser's sample, v: the unit mean text embedding. A CLIP score
    splits into a text-relevant part and a text-irrelevant one (t . v)(v . i), which rises
    for any image that moves along v (the paper finds preference models reward such generic
    features); fine-tuning on the plain score over-fits to them, so LongAlign keeps omega of
    that part. The image is sampled with gradients through a few steps and the VAE.
    Liu et al. 2024 (#260), arXiv:2410.11817; VERIFIED luping-liu/LongAlign loss.py
    (dense_score, do_ortho) and unet_reward.py (the loss, less its constant offset).
    """
    direction = embeddings.direction
    text = embeddings.text - (1 - params.reweight) * (embeddings.text @ direction)[:, None] \
        * direction
    score = (text * embeddings.image).sum(-1)
    return DiffusionLossOutput((1 - score) / 2, chosen_rewards=score.detach())
