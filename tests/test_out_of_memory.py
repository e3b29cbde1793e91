"""The device runs out of memory in the middle of a run: the steps before it are checkpointed,
the command says so and what to change (exit code 1), and ``--resume`` with gradient
checkpointing, or with half the micro-batch and twice the accumulation, finishes the run as an
uninterrupted one would."""

import pytest
import torch
import yaml
from test_train_loop import _tree_of, assert_same_weights, losses, run, workspace  # noqa: F401

from preftune.cli import main
from preftune.config import build_config
from preftune.train import loop
from preftune.train.logging import read_metrics

CAUSE = "CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.10 GiB total capacity)"


def out_of_memory_at(monkeypatch, step: int):
    """The second micro-batch of ``step`` (0-based) runs out of memory, once: the first one's
    gradients are already made."""
    real = loop.PolicyTask.losses
    calls = []

    def losses_or_out_of_memory(self, module, batch, at):
        calls.append(at)
        if at == step and calls.count(step) == 2 and len(calls) < 100:
            calls.extend([None] * 100)  # (once)
            raise torch.OutOfMemoryError(CAUSE)
        return real(self, module, batch, at)

    monkeypatch.setattr(loop.PolicyTask, "losses", losses_or_out_of_memory)


def config_file(workspace, tmp_path, name: str) -> str:
    """A yaml config of ``run``'s run ``name``: 4 steps of 4 pairs in micro-batches of 2."""
    tree = {"output_dir": str(workspace / "runs" / name),
            "model": {"path": str(workspace / "model")},
            "data": {"train": str(workspace / "pairs.jsonl"), "eval_fraction": 0.25},
            "reference": {"cache_dir": str(workspace / "cache")},
            "train": {"learning_rate": 5e-3, "batch_size": 2, "gradient_accumulation_steps": 2,
                      "max_steps": 4, "warmup_ratio": 0.0, "max_grad_norm": None, "seed": 3}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(tree))
    return str(path)


@pytest.mark.parametrize("less", [
    pytest.param({"gradient_checkpointing": True}, id="checkpointing"),
    pytest.param({"batch_size": 1, "gradient_accumulation_steps": 4}, id="half-micro-batch"),
])
def test_out_of_memory_checkpoints_says_what_to_change_and_resumes_with_less(
        workspace, tmp_path, monkeypatch, capsys, less):
    name = f"oom-{'-'.join(less)}"
    straight = run(workspace, f"{name}-straight", train__max_steps=4, train__batch_size=2,
                   train__gradient_accumulation_steps=2)
    config = config_file(workspace, tmp_path, name)
    out_of_memory_at(monkeypatch, 2)
    assert main(["train", config]) == 1
    said = capsys.readouterr().err
    checkpoint = workspace / "runs" / name / "checkpoints" / "step-00000002"
    assert f"out of memory in step 3 of 4 ({CAUSE}); the last checkpoint is {checkpoint}. " \
        "Continue from it with less memory: the same command with --resume --set " \
        "train.gradient_checkpointing=true, or a smaller train.batch_size" in said
    assert checkpoint.is_dir() and not (workspace / "runs" / name / "model").exists()
    monkeypatch.undo()

    tree = _tree_of(workspace / "runs" / name)
    tree["train"].update(less)
    resumed = loop.train(build_config(tree), resume=True, show_progress=False)
    assert [r["step"] for r in read_metrics(resumed / "metrics.jsonl")] == [1, 2, 3, 4]
    assert losses(resumed) == pytest.approx(losses(straight), rel=1e-5)
    assert_same_weights(straight, resumed)


def test_out_of_memory_in_the_first_step_says_to_start_again(workspace, tmp_path, monkeypatch,
                                                             capsys):
    config = config_file(workspace, tmp_path, "oom-first")
    out_of_memory_at(monkeypatch, 0)
    assert main(["train", config]) == 1
    said = capsys.readouterr().err
    assert f"out of memory in step 1 of 4 ({CAUSE}); no checkpoint was written yet. Start " \
        "again with --overwrite and less memory: --set train.gradient_checkpointing=true" \
        in said
    assert not (workspace / "runs" / "oom-first" / "checkpoints").exists() or not any(
        (workspace / "runs" / "oom-first" / "checkpoints").iterdir())


def test_out_of_memory_outside_the_steps_is_one_error_line(workspace, tmp_path, monkeypatch,
                                                           capsys):
    """The reference pass runs out of memory: no traceback, what to change, exit code 1."""
    config = config_file(workspace, tmp_path, "oom-reference")

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError(CAUSE)

    monkeypatch.setattr(loop, "build_reference", out_of_memory)
    assert main(["train", config]) == 1
    err = capsys.readouterr().err
    said = err.splitlines()[-1]  # (after the loading progress bar)
    assert "Traceback" not in err
    assert said.startswith(f"error: the device ran out of memory ({CAUSE}) outside the "
                           "training steps: loading, the reference pass, evaluation, sampling "
                           "or scoring. What was written is kept. Less memory: a smaller "
                           "train.batch_size")
