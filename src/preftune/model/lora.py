"""LoRA adapters on a model (``model.lora``, through PEFT): their config, their start (default,
PiSSA, OLoRA), LoRA+'s learning rates and the modules trained in full beside them."""

from __future__ import annotations

import re

import torch
from torch import nn

from ..config_tree import ConfigError
from .load import quiet_peft


def peft_lora_config(lora, **settings):
    """peft's ``LoraConfig`` for a config's ``model.lora`` (plus peft ``settings``)."""
    from peft import LoraConfig  # installed: checked when model.lora was read

    target = lora.target_modules
    if isinstance(target, str) and target != "all-linear" and re.fullmatch(r"[\w.]+", target):
        target = [target]  # a module's name, not a pattern (peft would match it as a whole path)
    settings.setdefault("init_lora_weights", INITS[lora.init])
    if lora.modules_to_save:  # (a reward model's head is added to them by peft)
        settings.update(modules_to_save=list(lora.modules_to_save), ensure_weight_tying=True)
    if lora.target_parameters:
        settings["target_parameters"] = list(lora.target_parameters)
    return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                      target_modules=target if isinstance(target, str) else list(target),
                      use_rslora=lora.rslora, use_dora=lora.dora, **settings)


INITS = {"default": True, "pissa": "pissa", "pissa_fast": "pissa_niter_16",  # -> peft's
         "olora": "olora"}
INITIAL_ADAPTER = "preftune_initial_adapter"  # on a PiSSA/OLoRA model: its adapter at the start


def add_lora(model, lora, task_type: str = "CAUSAL_LM"):
    """Wrap ``model`` with trainable adapters of a config's ``model.lora`` (PEFT); the base
    weights stay frozen. ``task_type`` "SEQ_CLS" (reward models) also trains the
    classification head in full."""
    from peft import get_peft_model
    from transformers import PreTrainedModel

    check_modules_to_save(model, lora.modules_to_save)
    check_target_parameters(model, lora.target_parameters)
    settings = peft_lora_config(lora, task_type=task_type)
    check_target_modules(model, settings.target_modules)
    # peft leaves the output layer out of all-linear in transformers models only: a VLM reward
    # model (preftune's module) would get adapters on its unused language-model head
    if settings.target_modules == "all-linear" and not isinstance(model, PreTrainedModel):
        settings.target_modules = all_linear(model)
    with quiet_peft():
        model = get_peft_model(model, settings)
    if lora.init != "default":  # kept to write the trained adapter as one of the original base
        from peft import get_peft_model_state_dict

        initial = get_peft_model_state_dict(model)
        setattr(model, INITIAL_ADAPTER, {name: value.detach().to("cpu", copy=True)
                                         for name, value in initial.items()})
    mark_lora_plus(model, lora.lr_ratio)
    return model


def all_linear(model: nn.Module) -> set[str]:
    """peft's ``all-linear`` for a model that is not a transformers one: the full names of its
    linear layers (a short name can also be a block's), less its output layer and a reward
    head (``score``), which trains in full."""
    output = _output_layer(model)
    return {name for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and module is not output and name != "score"}


def check_modules_to_save(model: nn.Module, names: list[str] | None) -> None:
    """Each of model.lora.modules_to_save names a module of ``model`` (as peft matches them:
    the full name or its last parts)."""
    modules = [name for name, _ in model.named_modules()]
    for wanted in names or []:
        if not any(_is_called(name, wanted) for name in modules):
            tops = sorted({name.rsplit(".", 1)[-1] for name in modules if name
                           and not name.rsplit(".", 1)[-1].isdigit()})
            raise ConfigError(f"model.lora.modules_to_save: no module of {type(model).__name__} "
                              f"is called {wanted!r}; module names include "
                              f"{', '.join(tops[:12])}.")


def _is_called(name: str, wanted: str) -> bool:
    """Whether the module or weight ``name`` is ``wanted`` as peft matches names: the full
    name or its last parts."""
    return name == wanted or name.endswith("." + wanted)


def check_target_modules(model: nn.Module, target) -> None:
    """model.lora.target_modules names layers of ``model``, as peft matches them: each name of
    a list is a module's full name or its last parts, a string other than all-linear a
    pattern of the whole name. Every module they match must be a layer LoRA adapts (linear,
    convolution), and not a language model's embeddings, which the log-prob path reads as
    plain weights (``modules_to_save`` trains them in full)."""
    if target == "all-linear":
        return
    modules = [(name, module) for name, module in model.named_modules() if name]
    if isinstance(target, str):
        matched = [(name, module) for name, module in modules if re.fullmatch(target, name)]
        missing = [] if matched else [target]
    else:
        matched = [(name, module) for name, module in modules
                   if any(_is_called(name, wanted) for wanted in target)]
        missing = [wanted for wanted in target
                   if not any(_is_called(name, wanted) for name, _ in modules)]
    embeddings = {"input embeddings": _layer(model, "get_input_embeddings"),
                  "output layer": _output_layer(model)}
    linear = sorted({name.rsplit(".", 1)[-1] for name, module in modules
                     if isinstance(module, nn.Linear) and module not in embeddings.values()})
    layers = f"its linear layers are called {', '.join(linear[:16])} (or give all-linear)"
    if missing:
        raise ConfigError(f"model.lora.target_modules: {', '.join(map(repr, missing))} names no "
                          f"module of {type(model).__name__}; {layers}.")
    given = repr(target) if isinstance(target, str) else ", ".join(sorted(target))
    for name, module in matched:
        roles = [role for role, layer in embeddings.items() if module is layer]
        if roles:
            raise ConfigError(
                f"model.lora.target_modules: {name} is the model's {' and '.join(roles)}, "
                "which log-probs are computed from as a plain weight: train it in full with "
                f"model.lora.modules_to_save: [{name.rsplit('.', 1)[-1]}], or leave it out.")
        if not isinstance(module, ADAPTABLE) and type(module).__name__ != "Conv1D":
            raise ConfigError(f"model.lora.target_modules: {given} matches {name} "
                              f"({type(module).__name__}), which is no layer LoRA adapts; "
                              f"name layers only ({layers}).")


ADAPTABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)  # (and transformers' Conv1D)


def _layer(model: nn.Module, getter: str):
    """``model.get_output_embeddings()`` (or input), None where a model has none."""
    try:
        return getattr(model, getter)() if hasattr(model, getter) else None
    except NotImplementedError:
        return None


def _output_layer(model: nn.Module):
    return _layer(model, "get_output_embeddings")


def check_target_parameters(model: nn.Module, names: list[str] | None) -> None:
    """Each of model.lora.target_parameters names a weight of ``model`` (its full name or its
    last parts, as peft matches them) that no linear layer holds."""
    weights = [name for name, _ in model.named_parameters()]
    for wanted in names or []:
        if not any(_is_called(name, wanted) for name in weights):
            stacked = sorted({re.sub(r"^.*?\.\d+\.", "", name)  # less the layer's path
                              for name, param in model.named_parameters() if param.dim() == 3})
            have = (f"its 3-D weights (experts) are {', '.join(stacked[:8])}" if stacked else
                    "it has no 3-D weights (experts): all-linear already adapts its linear "
                    "layers")
            raise ConfigError(f"model.lora.target_parameters: no weight of "
                              f"{type(model).__name__} is called {wanted!r}; {have}.")


LR_SCALE = "preftune_lr_scale"  # set on a parameter: it trains at learning_rate times this


def mark_lora_plus(module: nn.Module, ratio: float | None) -> None:
    """LoRA+ (Hayou et al. 2024): each adapter's B matrix (``lora_B``, the one that starts at
    zero) trains at ``ratio`` times the learning rate of its A. In a wide layer a shared rate
    is either too small for B or unstable for A; a ratio of about 16 (the paper's advice for
    LLMs) learns faster at the same cost. ``None``: one rate for all."""
    if ratio is None:
        return
    for name, param in module.named_parameters():
        if "lora_B" in name and param.requires_grad:
            setattr(param, LR_SCALE, ratio)


def lr_scale(param: torch.Tensor) -> float:
    """The learning-rate multiplier ``mark_lora_plus`` set on ``param`` (1 if none)."""
    return getattr(param, LR_SCALE, 1.0)
