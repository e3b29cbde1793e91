"""FSDP2 through accelerate (gloo, 2 CPU processes): sharded training equals one unsharded
process with the same global batch; checkpoints and the final model are gathered to plain
files that resume on any number of processes and load in transformers."""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_distributed import reward_model_on_two_processes_equals_one
from test_train_loop import (assert_same_weights, crashed_run, losses, run,  # noqa: F401
                             workspace)
from forked_python import run_on_two_processes

from preftune.config import build_config
from preftune.train import loop
from preftune.train.logging import read_metrics

LAUNCHER = Path(__file__).with_name("sharding_on_cpu.py")
EXAMPLE = Path(__file__).parents[1] / "examples" / "accelerate" / "fsdp2.yaml"


def fsdp2_environment() -> dict:
    """The variables ``accelerate launch --config_file examples/accelerate/fsdp2.yaml`` sets,
    computed by accelerate itself (its launcher would not start FSDP on a machine without
    GPUs)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(EXAMPLE), "script.py"])
    env = prepare_multi_gpu_env(_validate_launch_command(args)[0])
    return {k: v for k, v in env.items() if k.startswith(("ACCELERATE_", "FSDP_"))}


def launch(config: Path, *args, command=("train",), engine=fsdp2_environment):
    """``preftune train CONFIG ARGS`` (or another command) on 2 CPU processes under FSDP2 (or
    the engine whose variables ``engine()`` returns)."""
    return run_on_two_processes([str(LAUNCHER), *command, str(config), *args], engine(),
                                timeout=300)


def sharded_config(one: Path, tmp_path: Path, name: str, batch_size: int,
                   accumulation: int = 1) -> Path:
    """``one``'s config with another output dir and per-process batch (and accumulation)."""
    tree = yaml.safe_load((one / "config.yaml").read_text())
    tree["output_dir"] = str(one.parent / name)
    tree["train"]["batch_size"] = batch_size
    tree["train"]["gradient_accumulation_steps"] = accumulation
    config = tmp_path / f"{name}.yaml"
    config.write_text(yaml.safe_dump(tree))
    return config


def one_process_run(workspace, name, layout, objective, strategy, clip,  # noqa: F811
                    checkpointed=False):
    """The plain 1-process run (batch 8, 3 steps) a sharded one is compared with; LoRA for the
    adapter-off reference; activation checkpointing if ``checkpointed``. Returns (output dir,
    whether LoRA is on)."""
    lora = {"model__lora": {"r": 4, "alpha": 8}} if strategy == "adapter-off" else {}
    one = run(workspace, f"one-{name}", train__batch_size=8, train__max_steps=3,
              train__layout=layout, objective={"name": objective}, train__max_grad_norm=clip,
              reference__strategy=strategy, train__gradient_checkpointing=checkpointed, **lora)
    return one, bool(lora)


@pytest.mark.parametrize("layout,objective,strategy,clip,accumulation,checkpointed", [
    ("padded", "dpo", "precomputed", None, 1, False),
    ("prefix_shared", "tdpo", "live", 1.0, 2, False),  # the reference's hidden states, weights
    ("prefix_shared", "tdpo", "adapter-off", None, 1, False),  # LoRA: adapters off, sharded
    ("prefix_shared", "dpo", "precomputed", 1.0, 1, True)])  # activation checkpointing
def test_fsdp2_on_two_processes_equals_one_unsharded_process(workspace, tmp_path,  # noqa: F811
                                                             layout, objective, strategy, clip,
                                                             accumulation, checkpointed):
    name = f"fsdp-{layout}-{objective}-{strategy}-{checkpointed}"
    one, lora = one_process_run(workspace, name, layout, objective, strategy, clip,
                                checkpointed)
    # 2 processes x 4 (or 2 x 2 accumulated): the same 8 examples a step
    done = launch(sharded_config(one, tmp_path, name, 4 // accumulation, accumulation))
    assert done.returncode == 0, done.stderr[-4000:]
    two = one.parent / name
    assert [r["step"] for r in read_metrics(two / "metrics.jsonl")] == [1, 2, 3]
    info = json.loads((two / "run.json").read_text())
    assert (info["engine"], info["processes"]) == ("FSDP", 2)
    assert done.stdout.count("done: model in") == 1  # the first process speaks for both
    assert done.stderr.count(f"train {objective}:   0%") == 1
    assert losses(two) == pytest.approx(losses(one), rel=1e-6)
    grad_norms = [r["grad_norm"] for r in read_metrics(two / "metrics.jsonl")]
    assert grad_norms == pytest.approx([r["grad_norm"] for r in read_metrics(one / "metrics.jsonl")],
                                       rel=1e-5)
    saved = "adapter/adapter_model" if lora else "model/model"  # gathered: a plain HF dir
    ours = load_file(two / f"{saved}.safetensors")
    theirs = load_file(one / f"{saved}.safetensors")
    assert ours.keys() == theirs.keys()
    for key in theirs:
        torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=1e-6, msg=key)
    if lora:  # the merged model too
        assert_same_weights(two, one, atol=1e-6)


@pytest.mark.parametrize("model", [{"train_layers": 1},
                                   {"lora": {"r": 4, "alpha": 8, "init": "pissa",
                                             "lr_ratio": 4.0}},
                                   {"lora": {"r": 4, "alpha": 8, "modules_to_save": ["lm_head"]}}],
                         ids=["top-layer", "pissa+", "head"])
def test_fsdp2_trains_part_of_a_model_like_one_process(workspace, tmp_path, model,  # noqa: F811
                                                       request):
    """Frozen weights inside a shard unit (model.train_layers), adapters that start from the
    base's decomposition with two learning rates (PiSSA, LoRA+), and a tied head trained beside
    adapters (a copy in peft's wrapper) shard like the rest."""
    name = "fsdp-part-" + request.node.callspec.id
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each process has: PiSSA's SVD rounds by the thread count
    try:
        one = run(workspace, f"one-{name}", train__batch_size=8, train__max_steps=3,
                  **{f"model__{key}": value for key, value in model.items()})
    finally:
        torch.set_num_threads(threads)
    done = launch(sharded_config(one, tmp_path, name, 4))
    assert done.returncode == 0, done.stderr[-4000:]
    two = one.parent / name
    assert losses(two) == pytest.approx(losses(one), rel=1e-6)
    # (float rounding of the sharded sums)
    atol = 1e-5 if model.get("lora", {}).get("init") == "pissa" else 1e-6
    assert_same_weights(two, one, atol=atol)
    if "lora" in model:  # the adapter, converted to one of the original base
        ours, theirs = (load_file(out / "adapter" / "adapter_model.safetensors")
                        for out in (two, one))
        for key in theirs:
            torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=atol, msg=key)


def checkpoints_cross_between_sharded_and_one_process(workspace, tmp_path, monkeypatch,
                                                     name: str, engine) -> None:
    """A 1-process checkpoint resumes on 2 sharded processes (``engine()``'s variables), and a
    sharded checkpoint (gathered) resumes on 1 process: both end as the uninterrupted run."""
    settings = dict(train__batch_size=8, train__max_steps=4, train__save_every=2)
    straight = run(workspace, f"{name}-resume-straight", **settings)
    # one process writes the step-2 checkpoint and dies; two sharded processes finish the run
    crashed = crashed_run(workspace, f"{name}-resume-from-one", monkeypatch, 2, **settings)
    done = launch(sharded_config(crashed, tmp_path, crashed.name, 4), "--resume", engine=engine)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "resumed from" in done.stdout and "step 2" in done.stdout
    assert losses(crashed) == pytest.approx(losses(straight), rel=1e-5)
    assert_same_weights(crashed, straight, atol=1e-6)
    # two sharded processes write the checkpoint; one plain process resumes it
    sharded = sharded_config(straight, tmp_path, f"{name}-resume-from-two", 4)
    done = launch(sharded, engine=engine)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    out = straight.parent / f"{name}-resume-from-two"
    assert (out / "checkpoints" / "step-00000002").is_dir()
    shutil.rmtree(out / "model")
    tree = yaml.safe_load(sharded.read_text())
    tree["train"]["batch_size"] = 8
    resumed = loop.train(build_config(tree), resume=True, show_progress=False)
    assert losses(resumed) == pytest.approx(losses(straight), rel=1e-5)
    assert_same_weights(resumed, straight, atol=1e-6)


def test_checkpoints_move_between_fsdp_and_one_process(workspace, tmp_path,  # noqa: F811
                                                       monkeypatch):
    checkpoints_cross_between_sharded_and_one_process(workspace, tmp_path, monkeypatch, "fsdp",
                                                      fsdp2_environment)


@pytest.mark.parametrize("section,key,value,message", [
    ("train", "optimizer_in_backward", True, "train.optimizer_in_backward works in one process "
                                             "only")])
def test_what_fsdp_cannot_do_is_refused_before_any_work(workspace, tmp_path, section,  # noqa: F811
                                                        key, value, message):
    one = run(workspace, f"fsdp-refused-base-{key}", train__max_steps=1)
    config = sharded_config(one, tmp_path, f"fsdp-refused-{key}", 4)
    tree = yaml.safe_load(config.read_text())
    tree[section][key] = value
    config.write_text(yaml.safe_dump(tree))
    done = launch(config)
    assert done.returncode != 0
    assert message in done.stderr
    assert "reference logps" not in done.stderr + done.stdout  # stopped before the reference pass
    assert not (one.parent / f"fsdp-refused-{key}").exists()  # nothing written


@pytest.mark.parametrize("lora", [False, True])
def test_fsdp2_moves_a_tr_dpo_reference_like_one_process(workspace, tmp_path, lora):  # noqa: F811
    """reference.sync_every under FSDP2: each process gathers the policy's sharded weights
    (with LoRA, each layer's merged weight) and mixes them into its whole reference; the losses,
    which the moved reference decides from step 2 on, and the final weights equal one
    process's."""
    name = f"fsdp-sync-{'lora' if lora else 'full'}"
    one = run(workspace, f"one-{name}", train__batch_size=8, train__max_steps=3,
              reference__sync_every=1, reference__sync_mix=0.5, reference__strategy="live",
              **({"model__lora": {"r": 4, "alpha": 8}} if lora else {}))
    done = launch(sharded_config(one, tmp_path, name, 4))
    assert done.returncode == 0, done.stderr[-4000:]
    two = one.parent / name
    assert losses(two) == pytest.approx(losses(one), rel=1e-6)
    rewards = [r["rewards/margins"] for r in read_metrics(two / "metrics.jsonl") if "loss" in r]
    assert rewards[1] != pytest.approx(0.0, abs=1e-6)  # the reference moved, not the policy's
    assert_same_weights(two, one, atol=1e-6)


def test_a_reward_model_trains_under_fsdp2_like_on_one_process(tmp_path):
    reward_model_on_two_processes_equals_one(
        tmp_path, lambda config: launch(config, command=("rm", "train")), engine="FSDP")


def planned_memory(printed: str) -> dict[str, float]:
    """The MiB column of ``--plan``'s memory estimate, by row."""
    rows = printed[printed.index("memory estimate"):].splitlines()[1:]
    found = (re.match(r"  (\S+(?: \S+)?) +(\d+)", row) for row in rows)
    return {match[1]: float(match[2]) for match in found if match}


def wider_model_config(workspace: Path, tmp_path: Path) -> Path:  # noqa: F811
    """A run config whose model is wide enough (8M parameters) for MiB-sized estimates."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig.from_pretrained(workspace / "model")
    config.update({"hidden_size": 512, "intermediate_size": 1024, "num_hidden_layers": 4,
                   "num_attention_heads": 8, "num_key_value_heads": 4})
    LlamaForCausalLM(config).save_pretrained(tmp_path / "wide")
    AutoTokenizer.from_pretrained(workspace / "model").save_pretrained(tmp_path / "wide")
    one = run(workspace, "plan-base", train__max_steps=1)
    tree = yaml.safe_load((one / "config.yaml").read_text())
    tree["model"]["path"], tree["output_dir"] = str(tmp_path / "wide"), str(tmp_path / "planned")
    path = tmp_path / "wide.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def launched_plan(config: Path, **launch_args) -> tuple[dict[str, float], str]:
    """``--plan`` of ``config`` on 2 processes: its memory estimate and what it printed."""
    done = launch(config, "--plan", **launch_args)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return planned_memory(done.stdout), done.stdout


def test_plan_divides_what_fsdp_shards(workspace, tmp_path, capsys):  # noqa: F811
    config = wider_model_config(workspace, tmp_path)
    capsys.readouterr()
    loop.train(build_config(yaml.safe_load(config.read_text())), plan_only=True)
    whole = planned_memory(capsys.readouterr().out)
    assert whole["weights"] > 20  # MiB: big enough for halves to show
    split, printed = launched_plan(config)
    assert printed.count("(1/2 per process: FSDP)") == 3
    for kind in ("weights", "gradients", "optimizer"):
        assert split[kind] == pytest.approx(whole[kind] / 2, abs=0.5)
    assert split["activations"] == whole["activations"]


@pytest.mark.parametrize("variable,name", [("ACCELERATE_USE_FSDP", "FSDP"),
                                           ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed")])
def test_a_sharded_engine_accelerate_did_not_start_is_said(monkeypatch, capsys, variable, name):
    """accelerate starts FSDP and DeepSpeed on GPUs only: on CPU the same launch trains
    unsharded, and the run says so instead of looking sharded."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from preftune.config import TrainConfig
    from preftune.train.engines import check_engine

    monkeypatch.setenv(variable, "true")  # (what accelerate launch sets from the config file)
    unsharded = SimpleNamespace(num_processes=1, distributed_type=DistributedType.NO,
                                is_main_process=True)  # what accelerate made of it on CPU
    check_engine(unsharded, TrainConfig())
    assert capsys.readouterr().out == (
        f"note: the accelerate config asks for {name}, which accelerate starts on GPUs only; "
        "this run is one process (every process holds the whole model).\n")


def test_optimizer_in_backward_on_several_processes_is_refused():
    """Under DDP too: each process updated its weights from its own gradient before the
    gradients were averaged, so two processes trained two different models."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from preftune.config import TrainConfig
    from preftune.config_tree import ConfigError
    from preftune.train.engines import check_engine

    cfg = TrainConfig(optimizer_in_backward=True, max_grad_norm=None)
    ddp = SimpleNamespace(num_processes=2, distributed_type=DistributedType.MULTI_CPU,
                          is_main_process=True)
    with pytest.raises(ConfigError, match=r"works in one process only: .* 2 processes would "
                                          r"each train their own weights"):
        check_engine(ddp, cfg)
    check_engine(SimpleNamespace(num_processes=1, distributed_type=DistributedType.NO,
                                 is_main_process=True), cfg)
