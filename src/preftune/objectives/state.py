"""What an objective keeps from one step to the next: BCO's running mean reward, group-robust
DPO's group weights.

An objective declares its state class (``@objective(..., state=RunningMean)``); the loop makes
one per run from the training examples, hands it over as ``inputs.state``, saves it in every
checkpoint and restores it on ``--resume``. While training (``inputs.training``) the objective
updates it; evaluation only reads it. Updates add up what every process saw, so all processes
hold the same state, equal to one process's with the same global batch. States are tensors on
the training device: updating one never waits for the device.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def summed_over_processes(values: torch.Tensor) -> torch.Tensor:
    """``values`` added up over every training process (itself when there is one)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        values = values.clone()
        dist.all_reduce(values)
    return values


class ObjectiveState:
    """Base of an objective's state: its tensor attributes are what checkpoints hold.

    A subclass takes the training examples (``TokenizedExample``s, whose ``scores`` hold their
    numeric fields; none when the data is made while training) and sets its tensors."""

    def __init__(self, examples=()):
        pass

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: value.detach().cpu().contiguous() for name, value in vars(self).items()
                if isinstance(value, torch.Tensor)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        mine = self.state_dict()
        if set(state) != set(mine):
            raise ValueError(f"{type(self).__name__} holds {sorted(mine)}, the checkpoint "
                             f"{sorted(state)}")
        for name, value in state.items():
            setattr(self, name, value.to(getattr(self, name).device))


class RunningMean(ObjectiveState):
    """The mean of every value seen in training so far (BCO's reward shift delta).

    ``mean`` and ``count`` are updated as mean += (batch_mean - mean) n_batch / (count + n_batch),
    which stays exact in float32 over long runs."""

    def __init__(self, examples=()):
        self.mean = torch.zeros(())
        self.count = torch.zeros(())

    def update(self, values: torch.Tensor) -> torch.Tensor:
        """Take in ``values`` (detached; every process's) and return the new mean."""
        values = values.detach().float()  # (the count is filled in on the device: no copy)
        added = summed_over_processes(torch.stack([values.sum(),
                                                   values.new_full((), values.numel())]))
        self.mean, self.count = self.mean.to(values.device), self.count.to(values.device)
        self.count = self.count + added[1]
        self.mean = self.mean + (added[0] - added[1] * self.mean) / self.count.clamp(min=1)
        return self.mean


class GroupWeights(ObjectiveState):
    """Mirror-ascent weights over groups (group-robust DPO): alpha = softmax(log_weights),
    where each group's ``log_weights`` entry adds up eta L_g over the updates, L_g being the
    group's mean loss in the batch (0 when the batch has none of it). That is the paper's
    alpha <- alpha exp(eta L) / sum, from uniform, written in log space (no under- or overflow).

    The groups are those of the training examples (``scores["group"]``); a group first met
    later (held-out data, examples made while training) starts where all groups started."""

    def __init__(self, examples=()):
        ids = sorted({float(ex.scores["group"]) for ex in examples
                      if "group" in getattr(ex, "scores", {})})
        self.ids = torch.tensor(ids, dtype=torch.float32)
        self.log_weights = torch.zeros(len(ids))

    def weights(self, group: torch.Tensor, losses: torch.Tensor, step_size: float,
                update: bool) -> torch.Tensor:
        """Each example's weight alpha_g(i) E / N_g(i) [E], so that the mean of losses x weight
        over the batch is sum_g alpha_g L_g (E examples, N_g of them in group g, all processes
        counted); with ``update``, alpha takes its step on this batch's group losses first."""
        ids, log_weights = self._with(group)
        index = torch.searchsorted(ids, group.to(ids))
        sums = torch.zeros(2, len(ids), device=losses.device)
        sums[0].index_add_(0, index, losses.detach().float())
        sums[1].index_add_(0, index, torch.ones_like(losses, dtype=torch.float32))
        if update:
            sums = summed_over_processes(sums)
        totals, counts = sums
        if update:  # a group not in the batch has L_g = 0
            log_weights = log_weights + step_size * totals / counts.clamp(min=1)
            self.ids, self.log_weights = ids, log_weights
        alpha = torch.softmax(log_weights, dim=0)
        return (alpha * counts.sum() / counts.clamp(min=1))[index].to(losses)

    def _with(self, group: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, log weights) of the groups known and of those in ``group`` not met yet, which
        start at log weight 0."""
        known, log_weights = self.ids.to(group.device), self.log_weights.to(group.device)
        ids = torch.unique(torch.cat([known, group.float()]))
        if len(ids) == len(known):
            return known, log_weights
        widened = torch.zeros(len(ids), device=group.device)
        widened[torch.searchsorted(ids, known)] = log_weights
        return ids, widened
