"""SPO (Step-aware Preference Optimization, arXiv:2406.04314): online preference training of a
denoiser from prompts alone; the loss itself is ``losses.spo``.

For each prompt of a batch the policy samples a DDIM trajectory (eta > 0) under no_grad from
noise x_T drawn by a CPU generator seeded by (train.seed, step, record index), which also draws
every later random choice of that trajectory: the same seed gives the same trajectories, pools
and loss however the prompts are batched. At each trained step (every step from ``first_step``
on, or a seeded random ``steps_per_trajectory`` of them; a step whose sigma_t is 0, such as a
last step onto alpha_bar = 1, is deterministic and never trained) k = ``pool_size`` candidates
x_{t-1} are drawn from the DDIM transition N(mu_theta(x_t, t), sigma_t^2 I) of the same x_t.

The step-aware scorer rates each candidate through its predicted clean image x̂_0: the policy's
own (guided) prediction at (x_{t-1}, t_prev), the prediction the sampler needs for the next
step anyway, decoded to pixels (at the last step the candidate is x_0 itself, rated at
timestep 0), as the SPO repo's multi_sample_pipeline does. The best and the worst candidate are
the pair (win, lose); a pool whose score gap is not above ``min_gap`` (a tie) is skipped. The
trajectory continues from a random candidate (the step-wise resampler).

Then, with gradients through the policy, log p(x_{t-1}^w | x_t) and log p(x_{t-1}^l | x_t) under
the policy and the reference (a live frozen copy or the adapter-off denoiser) enter the loss.
x_t is shared by the two sides, so one policy and one reference forward serve both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch

from ..config import ConfigError
from ..objectives.metrics import sum_count
from .losses import DiffusionLossOutput, TransitionLogps, clipped_log_ratio
from .sample import guided
from .step_scorers import step_scorer
from .train import DiffusionTask, example_generator


@dataclass
class PromptBatch:
    """A micro-batch of an online objective: prompts and their records' indices."""

    prompts: list[str]
    indices: list[int]

    def to(self, device, non_blocking: bool = False) -> "PromptBatch":
        return self

    def pin_memory(self) -> "PromptBatch":
        return self

    @property
    def num_examples(self) -> int:
        return len(self.indices)

    @property  # the trainer's throughput counter: one trajectory per prompt
    def real_tokens(self) -> int:
        return self.num_examples

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.ones(self.num_examples)


class DDIMTransition:
    """The DDIM step x_t -> x_{t-1} of a noise schedule with ``steps`` steps and ``eta``: the
    Gaussian's mean and sigma_t and the predicted x_0 (DDIM formulas (12) and (16), as
    diffusers' ``DDIMScheduler.step``: x̂_0 clipped when the scheduler says clip_sample, the
    direction term from the unclipped prediction)."""

    def __init__(self, scheduler_config, steps: int, eta: float):
        from diffusers import DDIMScheduler

        scheduler = DDIMScheduler.from_config(scheduler_config)
        scheduler.set_timesteps(steps)
        config = scheduler.config
        if config.prediction_type not in ("epsilon", "v_prediction"):
            raise ConfigError(f"scheduler prediction_type {config.prediction_type!r} is not "
                              "supported by spo (epsilon or v_prediction).")
        if config.thresholding:
            raise ConfigError("scheduler thresholding is not supported by spo; set "
                              "thresholding false in scheduler/scheduler_config.json.")
        self.timesteps = [int(t) for t in scheduler.timesteps]
        self.stride = config.num_train_timesteps // steps
        self.alphas_cumprod = scheduler.alphas_cumprod.float()
        self.final_alpha_cumprod = float(scheduler.final_alpha_cumprod)
        self.kind, self.eta = config.prediction_type, eta
        self.clip_range = config.clip_sample_range if config.clip_sample else None

    def alphas(self, timesteps, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha_bar_t, alpha_bar_{t_prev}) shaped to broadcast over ``like``'s rows."""
        t = torch.as_tensor(timesteps).long().cpu().reshape(-1)
        prev = t - self.stride
        abar_t = self.alphas_cumprod[t]
        abar_prev = torch.where(prev >= 0, self.alphas_cumprod[prev.clamp(min=0)],
                                torch.tensor(self.final_alpha_cumprod))
        shape = (-1,) + (1,) * (like.dim() - 1)
        return abar_t.view(shape).to(like.device), abar_prev.view(shape).to(like.device)

    def sigma(self, abar_t: torch.Tensor, abar_prev: torch.Tensor) -> torch.Tensor:
        return self.eta * ((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)).sqrt()

    def step_sigma(self, t: int) -> float:
        return float(self.sigma(*self.alphas([t], torch.zeros(1))))

    def _x0_and_eps(self, prediction, abar_t, x_t):
        prediction, x_t = prediction.float(), x_t.float()
        if self.kind == "epsilon":
            x0, eps = (x_t - (1 - abar_t).sqrt() * prediction) / abar_t.sqrt(), prediction
        else:  # v-prediction
            x0 = abar_t.sqrt() * x_t - (1 - abar_t).sqrt() * prediction
            eps = abar_t.sqrt() * prediction + (1 - abar_t).sqrt() * x_t
        if self.clip_range is not None:
            x0 = x0.clamp(-self.clip_range, self.clip_range)
        return x0, eps

    def predicted_x0(self, prediction, timesteps, x_t) -> torch.Tensor:
        return self._x0_and_eps(prediction, self.alphas(timesteps, x_t)[0], x_t)[0]

    def __call__(self, prediction, timesteps, x_t):
        """(mean [N, ...], sigma_t [N, 1, ...], x̂_0 [N, ...]) of the step from ``x_t`` at
        ``timesteps`` [N] given the denoiser's ``prediction``."""
        abar_t, abar_prev = self.alphas(timesteps, x_t)
        x0, eps = self._x0_and_eps(prediction, abar_t, x_t)
        sigma = self.sigma(abar_t, abar_prev)
        mean = abar_prev.sqrt() * x0 + (1 - abar_prev - sigma**2).sqrt() * eps
        return mean, sigma, x0


def transition_logp(x_prev: torch.Tensor, mean: torch.Tensor, sigma: torch.Tensor):
    """log N(x_prev; mean, sigma^2 I) per row, averaged over dims (the SPO repo's
    ``ddim_step_with_logprob``; its constants cancel in a policy/reference ratio)."""
    logp = (-(x_prev.detach().float() - mean) ** 2 / (2 * sigma**2) - sigma.log()
            - 0.5 * math.log(2 * math.pi))
    return logp.flatten(1).mean(dim=1)


def pick_pairs(scores: torch.Tensor, min_gap: float = 0.0):
    """For pools' scores [M, k]: (win = argmax, lose = argmin, gap = max - min, kept = gap >
    min_gap), each [M]; a pool with every score equal is a tie, never kept."""
    win, lose = scores.argmax(dim=1), scores.argmin(dim=1)
    gap = scores.max(dim=1).values - scores.min(dim=1).values
    return win, lose, gap, gap > min_gap


@dataclass
class Rollout:
    """A batch's trained steps, one row per (example, step), in step order: [N, ...]."""

    example: torch.Tensor  # position of the prompt in the batch
    step_index: torch.Tensor  # index of the step in the sampler's timesteps
    timesteps: torch.Tensor  # t of x_t
    x_t: torch.Tensor  # [N, C, H, W]
    pool: torch.Tensor  # [N, k, C, H, W] the candidates x_{t-1}
    scores: torch.Tensor  # [N, k]
    win: torch.Tensor  # index of the chosen candidate (argmax)
    lose: torch.Tensor  # index of the rejected candidate (argmin)
    gap: torch.Tensor  # best - worst score
    kept: torch.Tensor  # bool: gap > min_gap
    continued: torch.Tensor  # index of the candidate the trajectory continued from

    def side(self, which: torch.Tensor) -> torch.Tensor:
        return self.pool[torch.arange(len(which)), which]


class PromptTask(DiffusionTask):
    """An objective trained from prompts alone, sampling its own images with the policy."""

    def make_batch(self, records) -> PromptBatch:
        return PromptBatch([r.prompt for r in records], [r.index for r in records])

    def conditions(self, prompts: list[str]):
        """(prompt conditioning, unconditional conditioning or None without guidance)."""
        model = self.module
        uncond = (model.unconditional(len(prompts))
                  if self.params.guidance_scale != 1 else None)
        return model.encode_prompts(prompts), uncond

    def predict(self, call, x, timesteps, cond, uncond) -> torch.Tensor:
        """The (classifier-free guided) prediction of ``call`` (see ``sample.guided``)."""
        steps = torch.as_tensor(timesteps, device=x.device).long().expand(len(x))
        return guided(call, x, steps, cond, uncond, self.params.guidance_scale)

    def sampler(self):
        """The policy's denoiser called directly, never through a DDP wrapper: each process
        samples its own trajectories, as many calls as they need, with no collective."""
        return partial(self.module.predict, self.module.denoiser)

    def run_info(self) -> dict:
        config = self.module.denoiser.config
        return {**super().run_info(), "online": True,
                "layout": f"prompts -> sampled {config.in_channels}x{config.sample_size}x"
                          f"{config.sample_size}"}


class SPOTask(PromptTask):
    """SPO: each ``losses`` call samples the batch's trajectories, then trains on their pairs."""

    def __init__(self, config, model, splits: dict, reference_strategy: str):
        super().__init__(config, model, splits, reference_strategy)
        p = self.params
        self.transition = DDIMTransition(model.scheduler.config, p.sampling_steps, p.eta)
        self.scorer = step_scorer(p.scorer)
        self.eligible = self.eligible_steps()
        if not self.eligible:
            raise ConfigError(f"objective.first_step {p.first_step}: no step of the "
                              f"{p.sampling_steps} sampling steps is left to train; lower it.")

    def eligible_steps(self) -> list[int]:
        """Indices of the sampler's steps that may train: from first_step on, sigma_t > 0."""
        return [i for i, t in enumerate(self.transition.timesteps)
                if i >= self.params.first_step and self.transition.step_sigma(t) > 0]

    @torch.no_grad()
    def _reference_predict(self, *inputs) -> torch.Tensor:
        model = self.module
        if self.reference_strategy == "live":
            return self.predict(partial(model.predict, self.reference), *inputs)
        model.denoiser.disable_adapters()  # adapter-off: the base denoiser is the reference
        try:
            return self.predict(self.sampler(), *inputs)
        finally:
            model.denoiser.enable_adapters()

    def trained_steps(self, generator: torch.Generator) -> set[int]:
        count = self.params.steps_per_trajectory
        if not count or count >= len(self.eligible):
            return set(self.eligible)
        order = torch.randperm(len(self.eligible), generator=generator)[:count]
        return {self.eligible[k] for k in order.tolist()}

    @torch.no_grad()
    def rollout(self, batch: PromptBatch, step: int, cond, uncond) -> Rollout:
        """Sample the batch's trajectories with the policy; pools, pairs and resampling at the
        trained steps (see the module docstring)."""
        k, transition, model = self.params.pool_size, self.transition, self.module
        size, policy = batch.num_examples, self.sampler()
        config = model.denoiser.config
        shape = (config.in_channels, config.sample_size, config.sample_size)
        generators = [example_generator(self.config.train.seed, step, index)
                      for index in batch.indices]
        x = torch.stack([torch.randn(shape, generator=g) for g in generators]).to(model.device)
        plans = [self.trained_steps(g) for g in generators]

        def rows(positions):
            return cond[positions], None if uncond is None else uncond[positions]

        prediction, known = torch.zeros_like(x), torch.zeros(size, dtype=torch.bool)
        found, last = [], len(transition.timesteps) - 1
        for i, t in enumerate(transition.timesteps):
            todo = (~known).nonzero().flatten().tolist()
            if todo:
                prediction[todo] = self.predict(policy, x[todo], t, *rows(todo))
            mean, sigma, _ = transition(prediction, [t] * size, x)
            here = [e for e in range(size) if i in plans[e]]
            noise = [torch.randn((k if i in plans[e] else 1, *shape), generator=g)
                     for e, g in enumerate(generators)]
            x_next = mean + sigma * torch.stack([n[0] for n in noise]).to(x.device)
            known[:] = False
            if here:
                pool = (mean[here].unsqueeze(1) + sigma[here].unsqueeze(1)
                        * torch.stack([noise[e] for e in here]).to(x.device))  # [H, k, ...]
                flat, repeated = pool.flatten(0, 1), [e for e in here for _ in range(k)]
                pool_prediction, score_t = None, 0
                if i == last:  # the candidates are clean images
                    x0 = flat
                else:
                    score_t = transition.timesteps[i + 1]
                    pool_prediction = self.predict(policy, flat, score_t, *rows(repeated))
                    x0 = transition.predicted_x0(pool_prediction, [score_t] * len(flat), flat)
                if model.vae is not None:
                    x0 = x0.to(model.vae.dtype)
                images = model.to_pixels(x0).float().clamp(-1, 1).cpu()
                scores = torch.tensor(self.scorer.score([batch.prompts[e] for e in repeated],
                                                        images, [score_t] * len(flat)))
                win, lose, gap, kept = pick_pairs(scores.view(len(here), k),
                                                  self.params.min_gap)
                member = torch.tensor([int(torch.randint(k, (1,), generator=generators[e]))
                                       for e in here])
                picked = torch.arange(len(here))
                x_next[here] = pool[picked, member]
                if pool_prediction is not None:  # the next step's prediction, already made
                    prediction[here] = pool_prediction.view(len(here), k, *shape)[picked, member]
                    known[here] = True
                found.append(dict(example=torch.tensor(here), step_index=torch.full(
                    (len(here),), i), timesteps=torch.full((len(here),), t), x_t=x[here],
                    pool=pool, scores=scores.view(len(here), k), win=win, lose=lose, gap=gap,
                    kept=kept, continued=member))
            x = x_next
        return Rollout(**{key: torch.cat([row[key] for row in found]) for key in found[0]})

    def transition_losses(self, module, x_t, timesteps, cond, uncond, chosen, rejected):
        """(loss output, log-probs) of pairs (x^w_{t-1}, x^l_{t-1}) from ``x_t`` [N, ...] at
        ``timesteps`` [N]: the policy's prediction with gradients through ``module`` (the
        task's model or its DDP wrapper: one call per step), the reference's without."""
        policy = self.predict(module, x_t, timesteps, cond, uncond)
        reference = self._reference_predict(x_t, timesteps, cond, uncond)
        mean, sigma, _ = self.transition(policy, timesteps, x_t)
        reference_mean = self.transition(reference, timesteps, x_t)[0]
        logps = TransitionLogps(
            transition_logp(chosen, mean, sigma), transition_logp(rejected, mean, sigma),
            transition_logp(chosen, reference_mean, sigma),
            transition_logp(rejected, reference_mean, sigma))
        return self.spec.fn(logps, self.params), logps

    def losses(self, module, batch: PromptBatch, step: int):
        """Per-prompt losses [E] whose mean is the mean loss over the batch's kept pairs (the
        repo's mean over a training batch; under DDP each process's, averaged as gradients
        are), and metrics."""
        size, device = batch.num_examples, self.module.device
        cond, uncond = self.conditions(batch.prompts)
        rollout = self.rollout(batch, step, cond, uncond)
        kept = rollout.kept.nonzero().flatten()
        # every pool a tie: nothing to learn, yet one pair goes through the policy with weight
        # 0, so that the step has a graph and (under DDP) its one forward and gradient exchange
        rows = kept if len(kept) else torch.zeros(1, dtype=torch.long)
        where = rollout.example[rows].to(device)
        output, logps = self.transition_losses(
            module, rollout.x_t[rows], rollout.timesteps[rows], cond[where],
            None if uncond is None else uncond[where], rollout.side(rollout.win)[rows],
            rollout.side(rollout.lose)[rows])
        weight = size / len(kept) if len(kept) else 0.0
        losses = torch.zeros(size, device=device).index_add(0, where, output.losses) * weight
        # the same metric names whatever was kept (processes add them up in one collective);
        # the trainer reads every metric of a step in one stack
        metrics = {"loss": sum_count(losses),
                   "spo/skipped_ties": sum_count((~rollout.kept).float().to(device)),
                   "spo/score_gap": sum_count(rollout.gap.to(device)),
                   **pair_metrics(output, logps, self.params.clip, len(kept))}
        return losses, metrics


def pair_metrics(output: DiffusionLossOutput, logps: TransitionLogps, clip: float,
                 kept: int) -> dict:
    """Implicit rewards beta log ratio per side over the first ``kept`` pairs (the kept ones;
    0: none, counted as such), their margin and accuracy, and the clipped ratios themselves
    (the repo's train_ratio_win / train_ratio_lose)."""
    chosen, rejected = output.chosen_rewards[:kept], output.rejected_rewards[:kept]
    margin = chosen - rejected
    ratio = {side: clipped_log_ratio(getattr(logps, f"policy_{side}")[:kept],
                                     getattr(logps, f"reference_{side}")[:kept], clip).exp()
             for side in ("chosen", "rejected")}
    return {"rewards/chosen": sum_count(chosen), "rewards/rejected": sum_count(rejected),
            "rewards/margins": sum_count(margin),
            "rewards/accuracies": sum_count((margin > 0).float()),
            "spo/ratio_chosen": sum_count(ratio["chosen"]),
            "spo/ratio_rejected": sum_count(ratio["rejected"])}
