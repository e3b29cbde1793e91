"""TR-DPO's moving reference (Gorbatovski et al. 2024, arXiv:2404.09656): every few optimizer
steps the live reference takes a share of the policy's weights,

    ref <- mix * policy + (1 - mix) * ref      (soft update; mix = 1 is the hard update)

so the reference trails the policy instead of staying at the initial model, and the implicit
KL constraint is to a recent policy rather than the start. The paper finds soft updates with
mix 0.5-0.6 every 256-512 steps best on Anthropic-HH and Reddit TL;DR.

The reference is a plain copy of the initial model (``LiveReference``). With LoRA the policy's
weights are the base plus the adapter, so each adapted layer is mixed in merged (W + s·BA, or
DoRA's rescaled direction), and ``modules_to_save``'s trained copies under the original names.
Only weights that train are mixed: the others are the same in both models already. Under FSDP2
and ZeRO-3 every process keeps a whole reference and gathers the policy's sharded weights to
mix them in.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from .forward import causal_lm_of

DEFAULT_MIX = 0.6  # TR-DPO's soft update (and TRL's ref_model_mixup_alpha)


class ReferenceSync:
    """Moves ``reference`` (a frozen plain copy of the initial model) toward ``policy`` (the
    model being trained, PEFT-wrapped or not) after every ``every``-th optimizer step. Its
    ``state_dict`` (the weights it has moved) goes into checkpoints, so a resumed run continues
    from the same reference."""

    def __init__(self, reference: nn.Module, policy: nn.Module, every: int, mix: float):
        self.policy, self.every, self.mix = policy, every, mix
        self.weights = dict(reference.named_parameters(remove_duplicate=False))
        self.moved: list[str] = []  # names of the reference's weights syncs have changed

    def due(self, step: int) -> bool:
        """Whether a sync follows optimizer step ``step`` (0-based)."""
        return (step + 1) % self.every == 0

    @torch.no_grad()
    def after_update(self, step: int) -> bool:
        """Mix the policy into the reference if ``step`` is due; returns whether it was."""
        if not self.due(step):
            return False
        with gathered(self.policy):
            self._mix()
        return True

    def _mix(self) -> None:
        moved, seen = [], set()
        for name, value in trained_weights(self.policy):
            target = self.weights.get(name)
            if target is None:
                raise KeyError(f"reference.sync_every: the policy trains {name}, which the "
                               "reference model does not have")
            if id(target) in seen:  # tied weights: one tensor under two names
                continue
            seen.add(id(target))
            target.lerp_(whole(value).to(target.dtype), self.mix)
            moved.append(name)
        self.moved = moved

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: self.weights[name].detach().cpu().contiguous() for name in self.moved}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for name, value in state.items():
            self.weights[name].copy_(value)
        self.moved = list(state)


def gathered(model: nn.Module):
    """Under DeepSpeed ZeRO-3, a context in which ``model``'s partitioned weights are whole
    (every process takes part); otherwise nothing."""
    partitioned = [p for p in model.parameters() if hasattr(p, "ds_id")]
    if not partitioned:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(partitioned)


def whole(value: torch.Tensor) -> torch.Tensor:
    """A weight as one plain tensor: under FSDP2 the policy's weights (and what is computed
    from them, a LoRA layer's merged weight) are sharded DTensors, gathered here; every process
    gathers the same weights in the same order, as the collective needs."""
    from torch.distributed.tensor import DTensor

    return value.full_tensor() if isinstance(value, DTensor) else value


def trained_weights(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(name in the plain model, current value) of every weight training changes: each LoRA
    layer's merged weight, each ``modules_to_save`` copy under the original name, and the
    trainable weights of a model without adapters."""
    lm = causal_lm_of(model)
    lora_layer, saved_copy = _peft_classes()
    covered: set[int] = set()
    for path, module in lm.named_modules():
        if isinstance(module, lora_layer):
            adapter = module.active_adapters[0]
            covered.update(id(p) for p in module.parameters())
            yield f"{path}.weight", merged_lora_weight(module, adapter)
        elif isinstance(module, saved_copy):
            adapter = module.active_adapters[0]
            covered.update(id(p) for p in module.parameters())
            yield from ((f"{path}.{name}", p)
                        for name, p in module.modules_to_save[adapter].named_parameters())
    for name, param in lm.named_parameters():
        if param.requires_grad and id(param) not in covered:
            yield name, param


def _peft_classes() -> tuple[type | tuple, type | tuple]:
    """(LoRA layers, modules_to_save's wrapper) of PEFT, or () each (nothing matches) without
    it."""
    try:
        from peft.tuners.lora import LoraLayer
        from peft.utils import ModulesToSaveWrapper
    except ImportError:
        return (), ()
    return LoraLayer, ModulesToSaveWrapper


def merged_lora_weight(layer: nn.Module, adapter: str) -> torch.Tensor:
    """The weight ``layer`` acts with: W + s·BA, and for DoRA that direction rescaled row by
    row to the learned magnitude, m · (W + s·BA) / ||W + s·BA|| (norms over the inputs). The
    module is left as it is (nothing merged in place)."""
    weight = layer.get_base_layer().weight
    merged = weight + layer.get_delta_weight(adapter).to(weight.dtype)
    magnitudes = getattr(layer, "lora_magnitude_vector", None)
    if magnitudes is None or adapter not in magnitudes:
        return merged
    magnitude = magnitudes[adapter]
    magnitude = getattr(magnitude, "weight", magnitude)  # a module in newer PEFT
    rows = merged.T if layer.fan_in_fan_out else merged  # [outputs, inputs]
    rows = rows * (magnitude / rows.norm(dim=1)).unsqueeze(1)
    return (rows.T if layer.fan_in_fan_out else rows).to(weight.dtype)
