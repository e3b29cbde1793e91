"""What each accelerate engine needs from the trainer: DDP (nothing), FSDP2 and DeepSpeed ZeRO.

Sharded engines split weights, gradients and optimizer state across processes. The trainer
stays the same for all of them; this module holds the few engine-specific parts: refusing what
an engine cannot do, configuring DeepSpeed from ``train.*``, and reading or writing DeepSpeed's
training state as whole, name-keyed tensors (the format of every preftune checkpoint, so a run
resumes under any engine and number of processes).
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from ..config import ConfigError, TrainConfig
from ..model.lora import lr_scale

SHARDED = (DistributedType.FSDP, DistributedType.DEEPSPEED)


def check_engine(accelerator: Accelerator, cfg: TrainConfig, task=None) -> None:
    """What the launched engine cannot do here, said before any work (and, with ``task``,
    again once the task is known)."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > accelerator.num_processes:
        raise ConfigError(
            f"{launched} processes were launched but each runs alone (accelerate found no GPU "
            "to connect them): on CPU set ACCELERATE_USE_CPU=true (gloo), e.g. "
            "`ACCELERATE_USE_CPU=true python -m torch.distributed.run --nproc_per_node 2 -m "
            "preftune train CONFIG`.")
    engine = accelerator.distributed_type
    asked = next((name for name, variable in (("FSDP", "ACCELERATE_USE_FSDP"),
                                              ("DeepSpeed", "ACCELERATE_USE_DEEPSPEED"))
                  if os.environ.get(variable, "").lower() == "true"), None)
    if asked and engine not in SHARDED and accelerator.is_main_process:
        plain = "one process" if engine == DistributedType.NO else "DDP"
        print(f"note: the accelerate config asks for {asked}, which accelerate starts on GPUs "
              f"only; this run is {plain} (every process holds the whole model).")
    if cfg.optimizer_in_backward and accelerator.num_processes > 1:
        raise ConfigError(f"train.optimizer_in_backward works in one process only: it updates "
                          "each weight in its backward hook from this process's own gradient, "
                          "before the processes' gradients are averaged (or sharded), so "
                          f"{accelerator.num_processes} processes would each train their own "
                          "weights. Turn it off, or train in one process.")
    if engine not in SHARDED:
        return
    name = "FSDP" if engine == DistributedType.FSDP else "DeepSpeed"
    if cfg.optimizer != "adamw":
        raise ConfigError(f"train.optimizer: {cfg.optimizer} does not run under {name} (its "
                          "8-bit moments would have to be split with the weights); use adamw, "
                          "or DDP.")
    if engine == DistributedType.DEEPSPEED:
        ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
        for section in ("optimizer", "scheduler"):
            if section in ds_config:
                raise ConfigError(
                    f"the DeepSpeed config has a '{section}' section: preftune brings its own "
                    "AdamW and schedule (train.learning_rate, train.schedule); remove it.")
        for section in ("fp16", "bf16"):
            if ds_config.get(section, {}).get("enabled") is True:
                raise ConfigError(
                    f"the DeepSpeed config turns on {section}: preftune takes the precision "
                    "from model.dtype (bfloat16 trains in bf16); use mixed_precision: 'no'.")
    if (engine == DistributedType.DEEPSPEED and task is not None
            and any(lr_scale(p) != 1.0 for p in task.module.parameters())):
        raise ConfigError("model.lora.lr_ratio (LoRA+) does not run under DeepSpeed, whose "
                          "checkpoints here keep one learning rate; use FSDP2 or DDP, or remove "
                          "it.")
    if task is not None and not hasattr(task, "unsharded"):
        raise ConfigError(f"{task.name} training does not run under {name} yet; launch it with "
                          "DDP (examples/accelerate/ddp.yaml) or on one process.")


def refuse_sharding(accelerator: Accelerator, setting: str) -> None:
    """``setting`` (4-bit weights) cannot be split across processes by FSDP or DeepSpeed."""
    engine = accelerator.distributed_type
    if engine in SHARDED:
        name = "FSDP" if engine == DistributedType.FSDP else "DeepSpeed"
        raise ConfigError(f"{setting} does not run under {name}, which would shard the 4-bit "
                          "weights; launch it with DDP (examples/accelerate/ddp.yaml: each "
                          "process holds the quantized base) or on one process.")


def refuse_split_weights(accelerator: Accelerator, setting: str, why: str) -> None:
    """``setting`` needs every process to hold the policy's weights whole (``why``): not under
    FSDP or ZeRO-3, which split them."""
    engine, parts = shards(accelerator)
    if parts["weights"] > 1:
        raise ConfigError(f"{setting} {why}, but {engine} splits them across the processes "
                          "here; use DDP (or DeepSpeed ZeRO-1/2), or remove it.")


def shards(accelerator: Accelerator) -> tuple[str, dict[str, int]]:
    """The engine's name and into how many parts it splits each kind of training state across
    the processes: {"weights", "gradients", "optimizer"} (1: every process holds it whole)."""
    n, engine = accelerator.num_processes, accelerator.distributed_type
    if engine == DistributedType.FSDP:
        return "FSDP", dict.fromkeys(("weights", "gradients", "optimizer"), n)
    if engine == DistributedType.DEEPSPEED:
        stage = accelerator.state.deepspeed_plugin.zero_stage
        return f"ZeRO-{stage}", {"weights": n if stage >= 3 else 1,
                                 "gradients": n if stage >= 2 else 1,
                                 "optimizer": n if stage >= 1 else 1}
    return "", dict.fromkeys(("weights", "gradients", "optimizer"), 1)


def configure_deepspeed(accelerator: Accelerator, cfg: TrainConfig, module) -> None:
    """DeepSpeed's batch, accumulation and clipping from ``train.*``; under ZeRO-3 the final
    weights are gathered on save, and the output projection (used as a weight, not called as a
    module) is registered with ``module`` so ZeRO-3 gathers it for each forward."""
    ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
    ds_config["train_micro_batch_size_per_gpu"] = cfg.batch_size
    ds_config["gradient_accumulation_steps"] = cfg.gradient_accumulation_steps
    ds_config["train_batch_size"] = (cfg.batch_size * cfg.gradient_accumulation_steps
                                     * accelerator.num_processes)
    ds_config["gradient_clipping"] = cfg.max_grad_norm or 0.0
    # with optimizer offload, preftune's (torch's fused) AdamW steps the host copies; DeepSpeed
    # would otherwise insist on its own CPU Adam
    ds_config["zero_force_ds_cpu_optimizer"] = False
    zero = ds_config.setdefault("zero_optimization", {})
    if zero.get("stage") == 3:
        import deepspeed

        zero["stage3_gather_16bit_weights_on_model_save"] = True
        for weight in getattr(module, "external_weights", list)():
            deepspeed.zero.register_external_parameter(module, weight)


@contextmanager
def whole_models(accelerator: Accelerator):
    """Models load whole on every process, also under ZeRO-3, where transformers would
    otherwise partition them as they load (before the reference pass and LoRA, which need
    whole weights); DeepSpeed partitions them when training starts."""
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        yield
        return
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        accelerator.state.deepspeed_plugin.set_deepspeed_weakref()


def is_deepspeed(model) -> bool:
    return type(model).__name__ == "DeepSpeedEngine"


def deepspeed_training_state(engine, keep: bool) -> tuple[dict, dict]:
    """(trainable weights, optimizer state in torch's name-keyed format), whole: the fp32
    master weights and AdamW moments gathered from their partitions (collective)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    inner = engine.optimizer.optimizer  # the torch AdamW, stepping the flat partitions
    step = next(iter(inner.state.values()))["step"] if inner.state else None
    if step is not None and keep:
        step = step.detach().cpu()  # one read, shared by every parameter's entry
    weights, state = {}, {}
    for name, param in engine.module.named_parameters():
        if not param.requires_grad:
            continue
        whole = safe_get_full_fp32_param(param)
        moments = {key: safe_get_full_optimizer_state(param, key)
                   for key in ("exp_avg", "exp_avg_sq")} if step is not None else {}
        if keep:
            weights[name] = whole.detach().cpu().contiguous()
            if step is not None:
                state[name] = {"step": step.clone(),
                               **{k: v.detach().cpu().clone() for k, v in moments.items()}}
    names = list(weights)
    groups = [{**{k: v for k, v in group.items() if k != "params"}, "params": names}
              for group in inner.param_groups[:1]]
    return weights, ({"state": state, "param_groups": groups} if keep else {})


def load_deepspeed_training_state(engine, weights: dict, optimizer_state: dict) -> None:
    """Write whole weights and AdamW state (name-keyed) into DeepSpeed's partitions: the fp32
    masters, the model's own (possibly partitioned) weights and the moments."""
    import deepspeed
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    params = dict(engine.module.named_parameters())
    inner = engine.optimizer.optimizer
    state = optimizer_state.get("state", {})
    if state:  # AdamW makes its state at the first step: make it now, to be overwritten
        zero = engine.optimizer  # the flat fp32 partitions AdamW steps (ZeRO-3, ZeRO-1/2)
        flats = (getattr(zero, "fp32_partitioned_groups_flat", None)
                 or getattr(zero, "single_partition_of_fp32_groups", []))
        for flat in flats:
            inner.state.setdefault(flat, {
                "step": torch.zeros((), dtype=torch.float32, device=flat.device),
                "exp_avg": torch.zeros_like(flat), "exp_avg_sq": torch.zeros_like(flat)})
    for name, value in weights.items():
        param = params[name]
        with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
            with torch.no_grad():
                param.data.copy_(value.to(param.device, param.dtype).view(param.shape))
        safe_set_full_fp32_param(param, value.to(torch.float32))
        if name in state:
            for key in ("exp_avg", "exp_avg_sq"):
                safe_set_full_optimizer_state(param, state[name][key], key)
    step = next((saved["step"] for saved in state.values()), None)  # the same for every weight
    if step is not None:
        for partition_state in inner.state.values():
            partition_state["step"] = step.clone().to(partition_state["step"].device)
    for group, saved in zip(inner.param_groups, optimizer_state.get("param_groups", [])):
        group.update({k: v for k, v in saved.items() if k != "params"})
