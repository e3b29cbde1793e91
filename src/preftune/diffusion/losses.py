"""Diffusion preference objectives: each a small pure function over denoising errors,
registered with what it needs (a reference denoiser or not, the rejected image or not, captions
per side or the shared prompt, ranked lists of images instead of pairs (RankDPO), or prompts
only for an online objective that samples its own images: SPO).

Notation (all per example, shape [E]): for an image x_0 with condition c, a timestep t and noise
eps shared by the chosen (w) and rejected (l) image and by policy and reference,
x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, and the denoising error is

    e_theta(x) = mean over dims of || target - model_theta(x_t, c, t) ||^2

(target = eps for epsilon prediction, the velocity for v-prediction). e_ref is the same with the
reference denoiser. A loss returns per-example losses plus the implicit rewards of the chosen
and rejected image; accuracy (chosen > rejected) and margin (chosen - rejected) are derived from
those once, in ``preference_metrics``, not by each loss.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
import math
from typing import Annotated, Callable

import torch
import torch.nn.functional as F
from pydantic import AfterValidator, Field

from ..config_tree import ConfigError
from ..objectives.listwise import lambda_weights, strictly_better
from ..objectives.metrics import sum_count, top1_hits


@dataclass
class DenoisingErrors:
    """e_theta and e_ref of the chosen and rejected image, [E] each, fp32."""

    policy_chosen: torch.Tensor
    policy_rejected: torch.Tensor | None = None
    reference_chosen: torch.Tensor | None = None
    reference_rejected: torch.Tensor | None = None
    num_train_timesteps: int = 1000


@dataclass
class DiffusionLossOutput:
    losses: torch.Tensor  # [E]
    chosen_rewards: torch.Tensor | None = None  # [E] implicit rewards, detached
    rejected_rewards: torch.Tensor | None = None
    list_rewards: torch.Tensor | None = None  # [E, K] of a ranked list, detached


@dataclass(frozen=True)
class DiffusionLossSpec:
    name: str
    fn: Callable[[DenoisingErrors, object], DiffusionLossOutput]
    params: type
    needs_reference: bool
    uses_rejected: bool  # False: only the chosen image is denoised (plain denoising loss)
    captions: bool  # True: each side is conditioned on its own caption (DCPO)
    paper: str
    verified: bool
    # records are prompts only and the objective samples its own images: "transitions" (SPO,
    # fn takes ``TransitionLogps``) or "reward" (LongAlign, fn takes ``RewardEmbeddings``);
    # "": offline, fn takes ``DenoisingErrors``
    online: str = ""
    # True: records are ranked lists of images with a score each, and fn takes ``RankedErrors``
    ranked: bool = False

    @property
    def summary(self) -> str:
        return (self.fn.__doc__ or "").strip().splitlines()[0]

    def defaults(self) -> dict:
        return dataclasses.asdict(self.params())


DIFFUSION_LOSSES: dict[str, DiffusionLossSpec] = {}


def diffusion_loss(name: str, *, params: type, needs_reference: bool, paper: str,
                   uses_rejected: bool = True, captions: bool = False, verified: bool = True,
                   online: str = "", ranked: bool = False):
    """Register ``fn(errors, params) -> DiffusionLossOutput`` as diffusion objective ``name``
    (``online``: trained from prompts only, ``fn(logps: TransitionLogps, params)`` or
    ``fn(embeddings: RewardEmbeddings, params)``, see ``DiffusionLossSpec.online``;
    ``ranked``: ``fn(errors: RankedErrors, params)``, trained on ranked image lists)."""

    def register(fn):
        DIFFUSION_LOSSES[name] = DiffusionLossSpec(name, fn, params, needs_reference,
                                                   uses_rejected, captions, paper, verified,
                                                   online, ranked)
        return fn

    return register


def get_diffusion_loss(name: str) -> DiffusionLossSpec:
    if name not in DIFFUSION_LOSSES:
        raise KeyError(f"unknown diffusion objective {name!r}; known: "
                       f"{', '.join(sorted(DIFFUSION_LOSSES))} (`preftune diffusion objectives`)")
    return DIFFUSION_LOSSES[name]


def denoising_error(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-example mean squared error over every non-batch dim, in fp32: [E, ...] -> [E]."""
    squared = (prediction.float() - target.float()).pow(2)
    return squared.reshape(squared.shape[0], -1).mean(dim=1)


@dataclass
class DiffusionDPOParams:
    beta: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 5000.0
    """beta_DPO; the paper's -beta T omega(lambda_t) folded into one constant (repo default)."""


def _dpo_on_errors(errors: DenoisingErrors, beta: float) -> DiffusionLossOutput:
    chosen = -0.5 * beta * (errors.policy_chosen - errors.reference_chosen)
    rejected = -0.5 * beta * (errors.policy_rejected - errors.reference_rejected)
    return DiffusionLossOutput(-F.logsigmoid(chosen - rejected), chosen.detach(),
                               rejected.detach())


@diffusion_loss("diffusion_dpo", params=DiffusionDPOParams, needs_reference=True,
                paper="arXiv:2311.12908")
def diffusion_dpo(errors: DenoisingErrors, params: DiffusionDPOParams) -> DiffusionLossOutput:
    """Diffusion-DPO: the DPO bound on denoising errors, shared noise and timestep.

    l = -log sigma(-(beta/2) [(e_theta(x_t^w) - e_ref(x_t^w)) - (e_theta(x_t^l) - e_ref(x_t^l))])

    Implicit rewards: r_w = -(beta/2)(e_theta(x_t^w) - e_ref(x_t^w)), r_l likewise, so the loss
    is -log sigma(r_w - r_l). Wallace et al. 2023 (#247), arXiv:2311.12908; defaults from
    SalesforceAIResearch/DiffusionDPO train.py (beta_dpo 5000).
    """
    return _dpo_on_errors(errors, params.beta)


@diffusion_loss("dcpo", params=DiffusionDPOParams, needs_reference=True, captions=True,
                paper="#51 Dual Caption Preference Optimization", verified=False)
def dcpo(errors: DenoisingErrors, params: DiffusionDPOParams) -> DiffusionLossOutput:
    """DCPO: Diffusion-DPO with the chosen image under its caption c_w, the rejected under c_l.

    l = -log sigma(-beta' [(e_theta(x_t^w, c_w) - e_ref(x_t^w, c_w))
                           - (e_theta(x_t^l, c_l) - e_ref(x_t^l, c_l))])

    with beta' = beta/2 as in Diffusion-DPO. The captions enter through the conditioning only
    (records' ``chosen_caption`` / ``rejected_caption``), so the formula is Diffusion-DPO's.
    Dual Caption Preference Optimization (#51 of the seed list); UNVERIFIED: inferred from
    Diffusion-DPO and the abstract (OBJECTIVES.md 4.10).
    """
    return _dpo_on_errors(errors, params.beta)


@dataclass
class RankedErrors:
    """Denoising errors of ranked image lists, [E, K] each (fp32): list e's image k under the
    policy and the reference, its score (higher = better), and whether slot k holds an image
    (lists in a batch may be shorter than K; absent slots hold zeros)."""

    policy: torch.Tensor
    reference: torch.Tensor
    scores: torch.Tensor
    present: torch.Tensor  # bool

    @functools.cached_property
    def ordered_pairs(self) -> torch.Tensor:
        """[E, K, K] bool: images i and j are both present and i is scored above j (the loss
        and the metrics read it; computed once)."""
        return (strictly_better(self.scores) & self.present[:, :, None]
                & self.present[:, None, :])


@diffusion_loss("rank_dpo", params=DiffusionDPOParams, needs_reference=True, ranked=True,
                paper="arXiv:2410.18013", verified=False)
def rank_dpo(errors: RankedErrors, params: DiffusionDPOParams) -> DiffusionLossOutput:
    """RankDPO: Diffusion-DPO over every ordered pair of a ranked list, DCG-weighted.

    r_k = -(beta/2)(e_theta(x_t^k) - e_ref(x_t^k)), one noise and timestep per list;
    l = -sum_{i,j: psi_i > psi_j} dDCG_ij log sigma(r_i - r_j),
    dDCG_ij = |G_i - G_j| |1/D(tau_i) - 1/D(tau_j)|,  G = 2^psi - 1,  D(tau) = log2(1 + tau)

    psi: the images' scores; tau_i: image i's rank in the list by the current r (detached).
    Pairs the model orders badly and whose swap moves the list's DCG most weigh most, so
    training fixes the top of the ranking first. Karthik et al. 2024 (#232), arXiv:2410.18013.
    UNVERIFIED: the spec recalls a LiPO-style weighting (OBJECTIVES.md 4.10) without the
    paper's equations; this follows it with Diffusion-DPO's beta/2 and the same lambda
    weights as ``tree_po``. Scores are expected in [0, 1] (``preftune diffusion rank`` writes
    each image's share of wins); |score| above 60 is refused when the data is read.
    Implicit rewards: r of the best- and the worst-scored image of each list.
    """
    rewards = -0.5 * params.beta * (errors.policy - errors.reference)
    ordering = rewards.detach().masked_fill(~errors.present, -math.inf)
    scores = errors.scores.masked_fill(~errors.present, -math.inf)
    weights = torch.where(errors.ordered_pairs, lambda_weights(scores, ordering), 0.0)
    pair_losses = -F.logsigmoid(rewards[:, :, None] - rewards[:, None, :])
    best, worst = _best_and_worst(errors.scores, errors.present)
    rows = torch.arange(len(rewards), device=rewards.device)
    return DiffusionLossOutput((weights * pair_losses).sum(dim=(1, 2)),
                               rewards[rows, best].detach(), rewards[rows, worst].detach(),
                               rewards.detach())


def _best_and_worst(scores: torch.Tensor, present: torch.Tensor):
    """Slot of the highest and of the lowest score of each list, [E] each (first on ties)."""
    return (scores.masked_fill(~present, -math.inf).argmax(dim=1),
            scores.masked_fill(~present, math.inf).argmin(dim=1))


@dataclass
class MaPOParams:
    beta: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 0.1
    """beta_MaPO, the weight of the margin term (mapo-t2i/mapo args.py default); 0: plain
    denoising on the chosen images."""
    snr_value: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 0.5
    """c of the log-odds surrogate c e / (exp(c e) - 1) (SDXL default)."""


def _mapo_odds(error: torch.Tensor, c: float) -> torch.Tensor:
    """c e / (exp(c e) - 1), the MaPO log-odds surrogate of one side (expm1 for e near 0)."""
    return c * error / torch.expm1(c * error)


@diffusion_loss("mapo", params=MaPOParams, needs_reference=False, paper="arXiv:2406.06424")
def mapo(errors: DenoisingErrors, params: MaPOParams) -> DiffusionLossOutput:
    """MaPO: reference-free margin-aware preference, plus the chosen image's denoising loss.

    L_odds = c e_w / (exp(c e_w) - 1) - c e_l / (exp(c e_l) - 1),  c = snr_value
    l = e_w - beta log sigma(T L_odds),  T = num_train_timesteps

    (the batch mean of l is mean(e_w) - beta mean(log sigma(T L_odds)), the repo's loss).
    Implicit rewards: T c e / (exp(c e) - 1) per side, so the margin is T L_odds. Hong et al.
    2024 (#78), arXiv:2406.06424; VERIFIED mapo-t2i/mapo utils.py compute_loss, args.py.
    """
    steps = errors.num_train_timesteps
    chosen = steps * _mapo_odds(errors.policy_chosen, params.snr_value)
    rejected = steps * _mapo_odds(errors.policy_rejected, params.snr_value)
    losses = errors.policy_chosen - params.beta * F.logsigmoid(chosen - rejected)
    return DiffusionLossOutput(losses, chosen.detach(), rejected.detach())


@dataclass
class DenoisingParams:
    pass


@diffusion_loss("denoising", params=DenoisingParams, needs_reference=False, uses_rejected=False,
                paper="arXiv:2006.11239")
def denoising(errors: DenoisingErrors, params: DenoisingParams) -> DiffusionLossOutput:
    """Plain denoising loss on the chosen image (SFT of a denoiser; pretraining in the demo).

    l = e_theta(x_t^w), the simple epsilon-prediction loss of DDPM (Ho et al. 2020,
    arXiv:2006.11239). Logs no implicit rewards.
    """
    return DiffusionLossOutput(errors.policy_chosen)


def _scorer_spec(spec: str) -> str:
    module, colon, attribute = spec.partition(":")
    if spec == "shape_colour" or (module == "spm" and attribute):
        return spec
    if colon and module and attribute.isidentifier():  # importable, with the right signature
        from .step_scorers import step_scorer

        try:
            step_scorer(spec)
        except ConfigError as error:
            raise ValueError(str(error).removeprefix("objective.scorer ")) from None
        return spec
    raise ValueError(f"unknown scorer {spec!r}: expected shape_colour (the demo's colour "
                     "checker), spm:PATH (a step-aware preference model) or "
                     "module:function(prompts, images, timesteps) -> scores")


@dataclass
class SPOParams:
    beta: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 10.0
    """beta of the log sigma (SPO configs/basic_config.py train.beta)."""
    clip: Annotated[float, Field(gt=0, lt=1)] = 0.1
    """eps: each ratio p_theta / p_ref is clipped to [1 - eps, 1 + eps] (train.eps)."""
    pool_size: Annotated[int, Field(ge=2)] = 4
    """k candidates x_{t-1} drawn from each x_t (sample.num_sample_each_step of the SD 1.5
    config; basic_config has 2)."""
    eta: Annotated[float, Field(gt=0, le=1)] = 1.0
    """DDIM eta of the sampler and of the transition log-probs (sample.eta), in (0, 1]: at 0
    the transition has no density (1 = DDPM's variance)."""
    sampling_steps: Annotated[int, Field(ge=2)] = 20
    """DDIM steps of a trajectory (sample.num_steps)."""
    first_step: Annotated[int, Field(ge=0)] = 4
    """Steps before this index are sampled without a pool or loss (train.divert_start_step)."""
    steps_per_trajectory: Annotated[int, Field(ge=0)] = 0
    """0: train on every step from first_step on (the paper); n: a seeded random n of them
    per trajectory (the rest are plain DDIM steps), to bound the cost."""
    scorer: Annotated[str, AfterValidator(_scorer_spec)] = "shape_colour"
    """The step-aware preference model: shape_colour (the demo's checker on each candidate's
    predicted x_0), spm:PATH (one trained by `preftune diffusion spm`) or
    module:function(prompts, images, timesteps) -> scores."""
    guidance_scale: Annotated[float, Field(ge=1)] = 5.0
    """Classifier-free guidance of the sampler and of both log-probs (sample.guidance_scale,
    train.cfg); 1: none."""
    min_gap: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 0.0
    """A pool trains only when best score - worst score > min_gap (0: ties are skipped). The
    repo keeps softmax(best, worst) gaps > 0.3, i.e. score gaps > 2 atanh(0.3) = 0.619 on its
    preference model's logits."""


@dataclass
class TransitionLogps:
    """log p(x_{t-1} | x_t) of the chosen (w) and rejected (l) candidate under the policy and
    the reference, [N] each: the DDIM transition Gaussian's log-density averaged over dims (as
    the SPO repo's ddim_step_with_logprob)."""

    policy_chosen: torch.Tensor
    policy_rejected: torch.Tensor
    reference_chosen: torch.Tensor
    reference_rejected: torch.Tensor


def clipped_log_ratio(policy: torch.Tensor, reference: torch.Tensor, clip: float):
    """log clip(exp(policy - reference), 1 - clip, 1 + clip), written as a clamp of the log
    ratio (equal values and gradients; no overflow of exp)."""
    return (policy - reference).clamp(math.log1p(-clip), math.log1p(clip))


@diffusion_loss("spo", params=SPOParams, needs_reference=True, online="transitions",
                paper="arXiv:2406.04314")
def spo(logps: TransitionLogps, params: SPOParams) -> DiffusionLossOutput:
    """SPO: step-aware DPO on DDIM transitions, pairs picked from a pool at each step.

    ratio_w = clip(p_theta(x_{t-1}^w | x_t) / p_ref(x_{t-1}^w | x_t), 1 - eps, 1 + eps),
    ratio_l likewise;  l = -log sigma(beta log ratio_w - beta log ratio_l)

    Online: from prompts alone, the policy samples DDIM trajectories (eta > 0); at each trained
    step k candidates x_{t-1} share x_t, the step-aware scorer's best and worst are the pair,
    and the trajectory continues from a random candidate. Implicit rewards: beta log ratio of
    each side. Liang et al. 2024 (#235), arXiv:2406.04314; VERIFIED RockeyCoss/SPO
    train_scripts/train_spo.py (loss), configs/basic_config.py (defaults).
    """
    chosen = params.beta * clipped_log_ratio(logps.policy_chosen, logps.reference_chosen,
                                             params.clip)
    rejected = params.beta * clipped_log_ratio(logps.policy_rejected, logps.reference_rejected,
                                               params.clip)
    return DiffusionLossOutput(-F.logsigmoid(chosen - rejected), chosen.detach(),
                               rejected.detach())


def preference_metrics(output: DiffusionLossOutput, errors: DenoisingErrors) -> dict:
    """``{name: (sum, count)}``: loss, implicit rewards (chosen, rejected, margin = chosen -
    rejected, accuracy = share with margin > 0) and the raw denoising errors."""
    metrics = {"loss": sum_count(output.losses),
               "denoise/policy_chosen": sum_count(errors.policy_chosen)}
    if errors.policy_rejected is not None:
        metrics["denoise/policy_rejected"] = sum_count(errors.policy_rejected)
    if errors.reference_chosen is not None:
        metrics["denoise/reference_chosen"] = sum_count(errors.reference_chosen)
        metrics["denoise/reference_rejected"] = sum_count(errors.reference_rejected)
    if output.chosen_rewards is not None:
        margin = output.chosen_rewards - output.rejected_rewards
        metrics["rewards/chosen"] = sum_count(output.chosen_rewards)
        metrics["rewards/rejected"] = sum_count(output.rejected_rewards)
        metrics["rewards/margins"] = sum_count(margin)
        metrics["rewards/accuracies"] = sum_count((margin > 0).float())
    return metrics


def ranked_metrics(output: DiffusionLossOutput, errors: RankedErrors) -> dict:
    """``{name: (sum, count)}`` of a ranked objective: loss; rewards of the best- and
    worst-scored image (``rewards/chosen``, ``rewards/rejected``, their difference
    ``rewards/margins``); ``rewards/accuracies`` = share of the lists' ordered pairs (score i >
    score j) whose rewards agree; ``rewards/top1_accuracy`` = share of lists whose highest
    reward is on a best-scored image (images that tie for the highest reward share a list's
    credit, so it does not depend on their order); the mean raw errors over present images."""
    rewards, present, scores = output.list_rewards, errors.present, errors.scores
    better = errors.ordered_pairs
    agree = better & (rewards[:, :, None] > rewards[:, None, :])
    margin = output.chosen_rewards - output.rejected_rewards
    count = present.sum()
    return {"loss": sum_count(output.losses),
            "rewards/chosen": sum_count(output.chosen_rewards),
            "rewards/rejected": sum_count(output.rejected_rewards),
            "rewards/margins": sum_count(margin),
            "rewards/accuracies": (agree.sum().float(), better.sum()),
            "rewards/top1_accuracy": sum_count(top1_hits(rewards, scores, present)),
            "denoise/policy": (torch.where(present, errors.policy, 0.0).sum(), count),
            "denoise/reference": (torch.where(present, errors.reference, 0.0).sum(), count)}


from . import reward_loss  # noqa: E402, F401  (registers longalign)
