"""Atomic training checkpoints and the final model directory.

A checkpoint holds exactly what resuming needs: trainable weights, optimizer and scheduler
state, RNG states, the step and the global batch (and the tensors of what else moves: a
moving reference's weights, TR-DPO; an objective's state, BCO's running mean), all loadable
without unpickling code
(safetensors, and ``torch.load(weights_only=True)`` for the rest). It is written to a staging
directory and renamed into place, so an interruption never leaves a half-written checkpoint.

Weights and optimizer state are stored whole and keyed by parameter name, whatever the engine:
under FSDP every process takes part in gathering them (``gather_training_state``) and the main
process writes them, and loading shards them again, so a checkpoint resumes on any number of
processes, sharded or not.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.tensor import DTensor, distribute_tensor

from ..config import ConfigError
from ..model.adapter_dirs import merged_copy, save_model
from ..model.load import saved_as_loaded
from .engines import deepspeed_training_state, is_deepspeed, load_deepspeed_training_state

PREFIX = "step-"
# what else a run may keep as tensors, by the name Trainer gives it: one safetensors file each
STATE_FILES = {"reference": "reference.safetensors",  # the weights TR-DPO's syncs moved
               "objective": "objective.safetensors"}  # objectives.state (BCO, group-robust DPO)
# states a checkpoint may lack (written before objectives kept one): resumed afresh, said so
OPTIONAL_STATES = ("objective",)


def gather_training_state(model, optimizer, keep: bool = True) -> tuple[dict, dict]:
    """(trainable weights, optimizer state), whole, on the host, keyed by parameter name.

    Under FSDP this is collective: every process must call it (sharded tensors are gathered one
    at a time); ``keep=False`` (the processes that write nothing) drops what was gathered.
    ``model`` is the prepared module (DDP/FSDP wrappers are looked through); ``optimizer`` a
    torch optimizer (possibly wrapped by accelerate) or one with its own ``state_dict``.
    """
    if is_deepspeed(model):
        return deepspeed_training_state(model, keep)
    weights = {}
    for name, param in _unwrap(model).named_parameters():
        if param.requires_grad:
            whole = param.full_tensor() if isinstance(param, DTensor) else param
            if keep:
                weights[name] = whole.detach().cpu().contiguous()
    inner = getattr(optimizer, "optimizer", optimizer)
    if _standard(inner):
        state = get_optimizer_state_dict(
            model, inner, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:  # an optimizer of its own (AdamW in backward), never sharded
        state = inner.state_dict()
    return weights, (state if keep else {})


def _standard(optimizer) -> bool:
    """A torch optimizer with torch's own state dict (which torch can key by name and shard)."""
    return (isinstance(optimizer, torch.optim.Optimizer)
            and type(optimizer).state_dict is torch.optim.Optimizer.state_dict)


def _unwrap(model):
    return getattr(model, "module", model)  # DDP's wrapper; FSDP2 shards in place


def save_checkpoint(directory: Path, step: int, weights: dict, optimizer_state: dict, scheduler,
                    keep: int, global_batch: int | None = None, states: dict | None = None,
                    alarms: dict | None = None, train_seconds: float = 0.0) -> Path:
    """Write a checkpoint of what ``gather_training_state`` returned (main process only), the
    tensors of ``states`` (``{name in STATE_FILES: holder with state_dict()}``, such as a
    reference_sync's moved weights), the alarms' state (``Alarms.state``) and the seconds
    trained so far."""
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / f"{PREFIX}{step:08d}"
    staging = directory / f".staging-{PREFIX}{step:08d}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        _write(staging, weights, optimizer_state, scheduler, states or {},
               {"step": step, "global_batch": global_batch, "alarms": alarms,
                "train_seconds": train_seconds})
    except (OSError, RuntimeError) as error:  # a full disk: torch says "unexpected pos ..."
        shutil.rmtree(staging, ignore_errors=True)
        free = shutil.disk_usage(directory).free / 2**20
        raise ConfigError(
            f"the checkpoint of step {step} could not be written to {directory} "
            f"({getattr(error, 'strerror', None) or str(error).splitlines()[0][:160]}; "
            f"{free:.0f} MB free there); the partial checkpoint was removed. Free some space "
            "(or lower train.keep_checkpoints), then run the same command with --resume.") \
            from None
    shutil.rmtree(target, ignore_errors=True)
    os.replace(staging, target)
    for old in sorted(directory.glob(f"{PREFIX}*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def _write(staging: Path, weights: dict, optimizer_state: dict, scheduler, states: dict,
           state: dict) -> None:
    staging.mkdir()
    save_file(weights, staging / "trainable.safetensors")
    for name, holder in states.items():
        save_file(holder.state_dict(), staging / STATE_FILES[name])
    torch.save(optimizer_state, staging / "optimizer.pt")
    torch.save(scheduler.state_dict(), staging / "scheduler.pt")
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    torch.save(  # only tensors and plain values: loadable with weights_only (no code runs)
        {"torch": torch.get_rng_state(), "python": random.getstate(),
         "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, gauss],
         "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
        staging / "rng.pt",
    )
    (staging / "state.json").write_text(json.dumps(state))


def checkpoints(directory: Path) -> list[Path]:
    """The checkpoints under ``directory``, oldest first."""
    return sorted(directory.glob(f"{PREFIX}*")) if directory.exists() else []


def latest_checkpoint(directory: Path) -> Path | None:
    found = checkpoints(directory)
    return found[-1] if found else None


def load_checkpoint(path: Path, model, optimizer, scheduler, states: dict | None = None) -> int:
    """Restore everything saved by ``save_checkpoint`` (every process reads it; sharded
    parameters take their own shard); returns the step it was taken at."""
    state = load_file(path / "trainable.safetensors")
    states = states or {}
    saved = {name: load_file(path / STATE_FILES[name]) for name in states
             if name not in OPTIONAL_STATES or (path / STATE_FILES[name]).exists()}
    # weights_only: tensors and plain values, never arbitrary pickled objects
    optimizer_state = torch.load(path / "optimizer.pt", weights_only=True)
    named = all(isinstance(key, str) for key in optimizer_state.get("state", {}))
    if is_deepspeed(model):
        if not named:
            raise ValueError("its optimizer state is keyed by position (written by an earlier "
                             "version or by train.optimizer_in_backward), which DeepSpeed "
                             "cannot take; resume it without DeepSpeed")
        load_deepspeed_training_state(model, state, optimizer_state)
        return _restore_the_rest(path, scheduler, states, saved)
    params = dict(_unwrap(model).named_parameters())
    missing = [name for name in state if name not in params]
    if missing:
        raise ValueError(f"checkpoint {path} does not match the model: unknown {missing[:3]}")
    with torch.no_grad():
        for name, value in state.items():
            param = params[name]
            if isinstance(param, DTensor):
                value = distribute_tensor(value.to(param.device), param.device_mesh,
                                          param.placements)
            param.copy_(value.to(param.device))
    inner = getattr(optimizer, "optimizer", optimizer)
    if _standard(inner) and named:
        # strict=False: a trained parameter that never had a gradient (LLaVA's unread
        # post_layernorm) has no state to restore, as it had none when saved
        set_optimizer_state_dict(model, inner, optimizer_state,
                                 options=StateDictOptions(full_state_dict=True, strict=False))
    else:  # keyed by position: an optimizer of its own, or a checkpoint from before names
        optimizer.load_state_dict(optimizer_state)
    return _restore_the_rest(path, scheduler, states, saved)


def _restore_the_rest(path: Path, scheduler, states: dict, saved: dict) -> int:
    """The scheduler, RNG states and the ``states`` saved; returns the checkpoint's step."""
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    rng = torch.load(path / "rng.pt", weights_only=True)
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    kind, keys, position, has_gauss, gauss = rng["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    step = json.loads((path / "state.json").read_text())["step"]
    for name, holder in states.items():  # last: nothing after them can fail half-way
        if name in saved:
            holder.load_state_dict(saved[name])
        else:
            print(f"{path} holds no {name} state; the objective's running statistics "
                  "start afresh")
    return step


def save_final_model(model, tokenizer, output_dir: Path, save_merged: bool,
                     unquantized_base=None) -> dict[str, Path]:
    """Write the trained model as HF directories: ``model/`` (full or merged) and ``adapter/``,
    each written aside and renamed into place, so a kill never leaves half a model. A LoRA
    model on a quantized base merges into ``unquantized_base()`` (the base loaded again)."""
    written = {}
    if hasattr(model, "merge_and_unload"):  # LoRA (PEFT)
        with warnings.catch_warnings():  # a base that is itself an adapter dir has no config
            warnings.filterwarnings("ignore", "Could not find a config file in", UserWarning)
            written["adapter"] = _write_dir(output_dir / "adapter", model, tokenizer)
        if not save_merged:
            return written
        model = merged_copy(model, written["adapter"], unquantized_base)
    written["model"] = _write_dir(output_dir / "model", model, tokenizer)
    return written


def _write_dir(target: Path, model, tokenizer) -> Path:
    staging = target.with_name(f".staging-{target.name}")
    shutil.rmtree(staging, ignore_errors=True)
    save_model(model, staging)  # (PiSSA / OLoRA: as an adapter of the original base)
    images = getattr(tokenizer, "image_inputs", None)  # a VLM: its processor holds the tokenizer
    with saved_as_loaded(tokenizer):  # (a processor saves the tokenizer it holds)
        (images.processor if images is not None else tokenizer).save_pretrained(staging)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(staging, target)
    return target
