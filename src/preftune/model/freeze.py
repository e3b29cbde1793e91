"""Full fine-tuning of part of a model (``model.train_layers``, ``model.train_params``).

Only the chosen weights get gradients and AdamW moments; the rest stays as loaded. Training the
top few decoder layers is the cheapest full-weight alternative to LoRA: the layers below the
first trained one keep no activations for backward (nothing under them needs a gradient), and
their weights need neither gradients nor moments. Names are matched as the model's own
``named_parameters`` spells them (``model.layers.29.mlp.down_proj.weight``, ``lm_head.weight``),
tied weights under each of their names.
"""

from __future__ import annotations

import fnmatch

from torch import nn

from ..config import ConfigError
from .forward import decoder_layers


def train_only_part(model: nn.Module, settings, always: tuple[str, ...] = ()) -> str:
    """Freeze every weight of ``model`` but those of its last ``settings.train_layers`` decoder
    layers (the first ones when negative), those whose names match one of
    ``settings.train_params`` (fnmatch) and those matching ``always`` (a reward head). Returns
    a line saying what trains."""
    layers, patterns = settings.train_layers, settings.train_params
    stack = decoder_layers(model)
    chosen: set[int] = set()
    if layers is not None:
        if abs(layers) > len(stack):
            raise ConfigError(f"model.train_layers: {layers}, but the model has {len(stack)} "
                              f"decoder layers; choose 1 to {len(stack)} (or -1 to "
                              f"-{len(stack)} for the first ones).")
        picked = stack[-layers:] if layers > 0 else stack[:-layers]
        chosen |= {id(p) for layer in picked for p in layer.parameters()}
    named = list(model.named_parameters(remove_duplicate=False))
    for pattern in [*(patterns or []), *always]:
        matched = {id(p) for name, p in named if fnmatch.fnmatchcase(name, pattern)}
        if not matched and pattern not in always:
            shown = ", ".join(name for name, _ in named[:3])
            raise ConfigError(f"model.train_params: {pattern!r} matches no weight of the model; "
                              f"names look like {shown}, ... (patterns are fnmatch globs over "
                              "the full names, e.g. '*.mlp.*' or 'lm_head.weight').")
        chosen |= matched
    for param in model.parameters():
        param.requires_grad_(id(param) in chosen)
    unique = {id(p): p for _, p in named}.values()
    trained = sum(p.numel() for p in unique if id(p) in chosen)
    total = sum(p.numel() for p in unique)
    what = (f"the {'last' if layers > 0 else 'first'} {abs(layers)} of {len(stack)} decoder "
            "layers" if layers is not None else "")
    if patterns:
        what += (" and " if what else "") + "weights matching " + ", ".join(patterns)
    return f"training {what}: {trained:,} of {total:,} weights ({100 * trained / total:.1f}%)"
