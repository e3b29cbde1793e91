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

from collections import Counter

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

    unsaved: tuple[str, ...] = ()  # tensor attributes made again from the data, not saved

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: value.detach().cpu().contiguous() for name, value in vars(self).items()
                if isinstance(value, torch.Tensor) and name not in self.unsaved}

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
    group's loss in the batch (0 when the batch has none of it). That is the paper's
    alpha <- alpha exp(eta L) / sum, from uniform, written in log space (no under- or overflow).

    The groups are those of the training examples (``scores["group"]``); a group first met
    later (held-out data, examples made while training) starts where all groups started.
    ``counts`` holds how many training examples each group has (0 for one met later): they are
    the data's, so they are made again from it rather than saved."""

    unsaved = ("counts",)

    def __init__(self, examples=()):
        self.data_counts = Counter(float(ex.scores["group"]) for ex in examples
                                   if "group" in getattr(ex, "scores", {}))
        self.ids = torch.tensor(sorted(self.data_counts), dtype=torch.float32)
        self.log_weights = torch.zeros(len(self.ids))
        self.counts = self._counts_of(self.ids)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        super().load_state_dict(state)
        self.counts = self._counts_of(self.ids)

    def weights(self, group: torch.Tensor, losses: torch.Tensor, step_size: float,
                update: bool, by_data_counts: bool = False,
                adjustment: float = 0.0) -> torch.Tensor:
        """Each example's weight, such that the mean of losses x weight over the batch (E
        examples, N_g of them in group g, all processes counted) is sum_g alpha_g L_g. L_g is
        the group's mean loss in the batch, or with ``by_data_counts`` (N / D_g) times its sum,
        D_g of the data's N training examples being in group g. With ``update``, alpha first
        takes its step on this batch's L_g + ``adjustment`` / sqrt(D_g)."""
        ids, log_weights, counts = self._with(group, by_data_counts or (adjustment and update))
        index = torch.searchsorted(ids, group.to(ids))
        sums = torch.zeros(2, len(ids), device=losses.device)
        sums[0].index_add_(0, index, losses.detach().float())
        sums[1].index_add_(0, index, torch.ones_like(losses, dtype=torch.float32))
        if update:
            sums = summed_over_processes(sums)
        totals, in_batch = sums
        scale = counts.sum() / counts.clamp(min=1) if by_data_counts \
            else 1 / in_batch.clamp(min=1)  # L_g = scale_g x the group's loss sum
        if update:  # a group not in the batch has L_g = 0
            steps = totals * scale + adjustment / counts.clamp(min=1).sqrt()
            log_weights = log_weights + step_size * steps
            self.ids, self.log_weights, self.counts = ids, log_weights, counts
        alpha = torch.softmax(log_weights, dim=0)
        return (alpha * in_batch.sum() * scale)[index].to(losses)

    def _counts_of(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.tensor([float(self.data_counts.get(g, 0)) for g in ids.tolist()])

    def _with(self, group: torch.Tensor,
              need_counts: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ids, log weights, counts) of the groups known and of those in ``group`` not met
        yet, which start at log weight 0 with count 0 (refused if ``need_counts``: a group met
        after the data was counted has no count)."""
        known = self.ids.to(group.device)
        log_weights, counts = self.log_weights.to(group.device), self.counts.to(group.device)
        ids = torch.unique(torch.cat([known, group.float()]))
        if len(ids) == len(known):  # (the host reads the size: no second read below)
            return known, log_weights, counts
        if need_counts:
            raise ValueError(
                f"group_robust_dpo: divide_by_totalcount and adjustment use each group's count "
                f"in the training data, and group(s) {ids[~torch.isin(ids, known)].tolist()} "
                "have none there (held-out data or examples made while training); give the "
                "training data examples of every group, or set divide_by_totalcount: false and "
                "adjustment: 0")
        place = torch.searchsorted(ids, known)
        widened = torch.zeros(2, len(ids), device=group.device)
        widened[0, place], widened[1, place] = log_weights, counts
        return ids, widened[0], widened[1]
