"""A training step reads the device once: the budget test of the hot path.

Each read of a tensor's value on the host (``float(t)``, ``.tolist()``, boolean indexing ...)
makes a GPU finish all queued work first, so a step with many of them is bound by host-device
round trips, not by compute. ``HostReads`` (tests/host_reads.py) counts them on CPU, where
every tensor read counts, and the operator calls (each at least one kernel launch on a GPU).
"""

import pytest
import torch
from accelerate import Accelerator

from host_reads import HostReads
from preftune.config import build_config
from preftune.train import loop
from preftune.train.trainer import Trainer
from test_train_loop import workspace  # noqa: F401  (fixture)

pytestmark = pytest.mark.filterwarnings("ignore")

# operator calls per step of the tiny 2-layer model (batch 4 pairs), measured when the budget
# was set (padded 332, prefix-shared 343; 347 and 358 before the lean MLP's backward ran
# silu_backward); a change that adds launches to the step fails here
OPS_BUDGET = {"padded": 345, "prefix_shared": 355}


def trainer_for(workspace, name, **train):  # noqa: F811
    config = build_config({
        "output_dir": str(workspace / name), "model": {"path": str(workspace / "model")},
        "data": {"train": str(workspace / "pairs.jsonl")},
        "reference": {"cache_dir": str(workspace / "cache")},
        "train": {"batch_size": 4, "max_steps": 8, "learning_rate": 1e-3, **train}})
    accelerator = Accelerator()
    task, steps = loop.policy_task(config, accelerator)
    return Trainer(task, config.train, workspace / name, accelerator, steps, show_progress=False)


@pytest.mark.parametrize("layout", ["padded", "prefix_shared"])
@pytest.mark.parametrize("accumulation", [1, 2])
def test_a_training_step_reads_the_device_once(workspace, layout, accumulation):  # noqa: F811
    trainer = trainer_for(workspace, f"{layout}-{accumulation}", layout=layout,
                          gradient_accumulation_steps=accumulation)
    for step in range(4):  # past the one-off check that the weights moved (step 3)
        trainer.step(step)
    with HostReads() as reads:
        record = trainer.step(4)
    assert reads.count == 1, reads.summary()
    assert reads.ops <= OPS_BUDGET[layout] * accumulation + 40, reads.ops
    assert record["step"] == 5 and record["grad_norm"] > 0 and record["loss"] > 0


def test_the_auditor_counts_each_kind_of_read():
    """The counter sees scalar reads, list reads and operators whose output size depends on
    the data (each a sync on a GPU), and nothing for work that stays on the device."""
    t = torch.tensor([1.0, -2.0, 3.0])
    with HostReads() as reads:
        (t * 2).sum()
        torch.where(t > 0, t, 0.0).sum()
    assert reads.count == 0 and reads.ops == 6  # mul, sum, gt, scalar 0.0, where, sum
    for read in (lambda: float(t.sum()), lambda: t.tolist(), lambda: t[t > 0],
                 lambda: torch.bincount(t.long().abs()), lambda: bool(t.sum() > 0),
                 lambda: t.nonzero()):
        with HostReads() as reads:
            read()
        assert reads.count == 1, read


def test_a_non_finite_step_is_skipped_on_the_device(workspace, monkeypatch):  # noqa: F811
    """A NaN loss leaves weights and optimizer state as they were (the fused AdamW skips the
    update on the device), raises the alarm, and training goes on."""
    trainer = trainer_for(workspace, "nan", layout="padded")
    trainer.step(0)
    before = {n: p.detach().clone() for n, p in trainer.task.module.named_parameters()}
    optimizer = trainer.optimizer.optimizer
    steps_before = [s["step"].item() for s in optimizer.state.values()]
    real_losses = trainer.task.losses

    def poisoned(module, batch, step):
        losses, metrics = real_losses(module, batch, step)
        return losses * float("nan"), {**metrics, "loss": (metrics["loss"][0] * float("nan"),
                                                           metrics["loss"][1])}

    monkeypatch.setattr(trainer.task, "losses", poisoned)
    record = trainer.step(1)
    assert record["alarms"] == ["non_finite_loss"]
    for name, p in trainer.task.module.named_parameters():
        assert torch.equal(p.detach(), before[name]), name
    assert [s["step"].item() for s in optimizer.state.values()] == steps_before
    monkeypatch.setattr(trainer.task, "losses", real_losses)
    trainer.step(2)
    assert [s["step"].item() for s in optimizer.state.values()] == [s + 1 for s in steps_before]
    assert any(not torch.equal(p.detach(), before[n])
               for n, p in trainer.task.module.named_parameters())


def test_a_reward_model_step_reads_the_device_once(tmp_path):
    """The shared Trainer's budget holds for reward models (Bradley-Terry on pairs) too."""
    from preftune.reward.config import build_reward_config
    from preftune.reward.train import reward_task
    from test_reward_model import digit_pairs, write_jsonl
    from tiny_models import save_tiny_model_dir

    save_tiny_model_dir(tmp_path / "decoder")
    write_jsonl(tmp_path / "train.jsonl", digit_pairs(64, 1))
    config = build_reward_config({
        "output_dir": str(tmp_path / "rm"), "model": {"path": str(tmp_path / "decoder")},
        "data": {"train": str(tmp_path / "train.jsonl")},
        "train": {"learning_rate": 1e-3, "batch_size": 8, "max_steps": 8}})
    accelerator = Accelerator()
    task, steps = reward_task(config, accelerator)
    trainer = Trainer(task, config.train, tmp_path / "rm", accelerator, steps,
                      show_progress=False)
    for step in range(4):
        trainer.step(step)
    with HostReads() as reads:
        record = trainer.step(4)
    assert reads.count == 1, reads.summary()
    assert record["step"] == 5 and record["loss"] > 0 and record["grad_norm"] > 0
