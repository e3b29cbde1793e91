"""DeepSpeed ZeRO-3 (and ZeRO-2) through accelerate on 2 CPU processes (DeepSpeed's CPU
accelerator, gloo): the same per-step losses, gradient norms and final weights as one plain
process with the same global batch; checkpoints cross between DeepSpeed and one process."""

import json
from pathlib import Path

import pytest
import yaml
from test_distributed import reward_model_on_two_processes_equals_one
from test_fsdp import (checkpoints_cross_between_sharded_and_one_process, launch,
                       launched_plan, one_process_run, planned_memory, sharded_config,
                       wider_model_config)
from test_train_loop import assert_same_weights, losses, run, workspace  # noqa: F401

from preftune.config import build_config
from preftune.train import loop
from preftune.train.logging import read_metrics

pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install deepspeed)")

EXAMPLE = Path(__file__).parents[1] / "examples" / "accelerate" / "zero3.yaml"


def zero_environment(stage: int = 3):
    """The variables ``accelerate launch --config_file examples/accelerate/zero3.yaml`` sets,
    computed by accelerate itself, with the ZeRO stage swapped in."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env

    args = launch_command_parser().parse_args(["--config_file", str(EXAMPLE), "script.py"])
    args, defaults, _ = _validate_launch_command(args)
    args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
    env = prepare_deepspeed_cmd_env(args)[1]
    env = {k: v for k, v in env.items() if k.startswith("ACCELERATE_")}
    return {**env, "ACCELERATE_DEEPSPEED_ZERO_STAGE": str(stage), "DS_ACCELERATOR": "cpu"}


@pytest.mark.parametrize("stage,layout,objective,strategy,clip,accumulation,checkpointed", [
    (3, "padded", "dpo", "precomputed", None, 1, False),
    (3, "prefix_shared", "tdpo", "live", 1.0, 2, False),  # DeepSpeed steps at the last micro-batch
    (3, "prefix_shared", "dpo", "adapter-off", None, 1, False),  # LoRA: adapters off, partitioned
    (2, "padded", "dpo", "adapter-off", None, 2, False),
    (3, "prefix_shared", "dpo", "precomputed", 1.0, 1, True),  # torch's checkpoint
    (2, "prefix_shared", "dpo", "precomputed", 1.0, 1, True)])  # through preftune's recompute
def test_zero_on_two_processes_equals_one_plain_process(workspace, tmp_path,  # noqa: F811
                                                        stage, layout, objective, strategy, clip,
                                                        accumulation, checkpointed):
    name = f"zero{stage}-{layout}-{objective}-{strategy}-{checkpointed}"
    one, _ = one_process_run(workspace, name, layout, objective, strategy, clip, checkpointed)
    config = sharded_config(one, tmp_path, name, 4 // accumulation, accumulation)
    done = launch(config, engine=lambda: zero_environment(stage))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    two = one.parent / name
    info = json.loads((two / "run.json").read_text())
    assert (info["engine"], info["processes"]) == ("DEEPSPEED", 2)
    assert losses(two) == pytest.approx(losses(one), rel=1e-5)
    grad_norms = [r["grad_norm"] for r in read_metrics(two / "metrics.jsonl")]
    assert grad_norms == pytest.approx(
        [r["grad_norm"] for r in read_metrics(one / "metrics.jsonl")], rel=1e-5)
    assert_same_weights(two, one, atol=1e-6)


@pytest.mark.parametrize("stage", [3, 2])
def test_zero_trains_the_top_layer_alone_like_one_process(workspace, tmp_path, stage):  # noqa: F811
    """model.train_layers: frozen weights partitioned with the rest, never stepped."""
    name = f"zero{stage}-top-layer"
    one = run(workspace, f"one-{name}", train__batch_size=8, train__max_steps=3,
              model__train_layers=1)
    done = launch(sharded_config(one, tmp_path, name, 4), engine=lambda: zero_environment(stage))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    two = one.parent / name
    assert losses(two) == pytest.approx(losses(one), rel=1e-5)
    assert_same_weights(two, one, atol=1e-6)


@pytest.mark.parametrize("stage,lora", [(2, False), (3, True)])
def test_zero_moves_a_tr_dpo_reference_like_one_process(workspace, tmp_path, stage,  # noqa: F811
                                                        lora):
    """reference.sync_every: each process mixes the updated weights into its whole reference
    after DeepSpeed's step (whole under ZeRO-2; gathered from their partitions under ZeRO-3,
    with LoRA each layer's merged weight)."""
    name = f"zero{stage}-sync{'-lora' if lora else ''}"
    one = run(workspace, f"one-{name}", train__batch_size=8, train__max_steps=3,
              reference__sync_every=2, reference__sync_mix=0.5, reference__strategy="live",
              **({"model__lora": {"r": 4, "alpha": 8}} if lora else {}))
    done = launch(sharded_config(one, tmp_path, name, 4),
                  engine=lambda: zero_environment(stage))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert losses(one.parent / name) == pytest.approx(losses(one), rel=1e-5)
    assert_same_weights(one.parent / name, one, atol=1e-6)


def test_checkpoints_move_between_zero3_and_one_process(workspace, tmp_path,  # noqa: F811
                                                        monkeypatch):
    checkpoints_cross_between_sharded_and_one_process(workspace, tmp_path, monkeypatch, "zero",
                                                      zero_environment)


def test_a_reward_model_trains_under_zero3_like_on_one_process(tmp_path):
    reward_model_on_two_processes_equals_one(
        tmp_path, lambda config: launch(config, command=("rm", "train"), engine=zero_environment),
        engine="DEEPSPEED")


def test_a_deepspeed_optimizer_section_is_refused_before_any_work(workspace,  # noqa: F811
                                                                  tmp_path):
    one = run(workspace, "zero-refused-base", train__max_steps=1)
    ds_config = tmp_path / "ds.json"
    ds_config.write_text(json.dumps({"zero_optimization": {"stage": 3},
                                     "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}))
    environment = {"ACCELERATE_USE_DEEPSPEED": "true", "DS_ACCELERATOR": "cpu",
                   "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(ds_config)}
    done = launch(sharded_config(one, tmp_path, "zero-refused", 4), engine=lambda: environment)
    assert done.returncode != 0
    assert "the DeepSpeed config has a 'optimizer' section" in done.stderr, done.stderr[:3000]
    assert not (one.parent / "zero-refused").exists()


def test_plan_divides_what_zero2_splits(workspace, tmp_path, capsys):  # noqa: F811
    config = wider_model_config(workspace, tmp_path)
    capsys.readouterr()
    loop.train(build_config(yaml.safe_load(config.read_text())), plan_only=True)
    whole = planned_memory(capsys.readouterr().out)
    split, printed = launched_plan(config, engine=lambda: zero_environment(2))
    assert printed.count("(1/2 per process: ZeRO-2)") == 2  # gradients and optimizer state
    assert split["weights"] == whole["weights"]
    for kind in ("gradients", "optimizer"):
        assert split[kind] == pytest.approx(whole[kind] / 2, abs=0.5)
