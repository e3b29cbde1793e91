"""``train.compile``: each decoder layer compiled once per shape bucket.

A step of a small model on a GPU is bound by kernel launches (thousands per step for a
30-layer model), not by arithmetic; compiling fuses a layer's elementwise work into a few
kernels. Only the decoder layers are compiled: they hold almost all the work, every layer of a
model shares one compiled graph (same code, parameters passed as inputs), and nothing in them
reads the device back (masks, positions and counts are built outside, once per batch). Shapes
are static: collate rounds row widths up (``train.pad_to_multiple_of``) so a few shapes repeat
for the whole run instead of one recompilation per new width.

A layer under activation checkpointing (``model/checkpointing.py``) has its forward compiled
instead of its call: ``recompute`` runs that compiled forward without gradients in forward and
with them in backward (two graphs per shape), where a compiled call would stop at the
recomputation node and run the layer eagerly.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from .checkpointing import recompute
from .forward import causal_lm_of, decoder_layers

# compiled graphs kept per layer code before falling back to eager: one per (rows, width)
# bucket, so enough for the buckets of a run with packed rows of varying count
RECOMPILE_LIMIT = 64


def compile_layers(model: nn.Module, mode: str = "default", backend: str = "inductor") -> int:
    """Compile every decoder layer of ``model`` (a transformers causal LM, PEFT-wrapped or not)
    in place; returns how many were compiled. ``mode`` is torch.compile's ("reduce-overhead"
    adds CUDA graphs on a GPU)."""
    layers = decoder_layers(model)
    if not layers:
        raise ValueError(f"train.compile: {type(causal_lm_of(model)).__name__} has no "
                         "decoder `layers` to compile; set train.compile: false.")
    limits = torch._dynamo.config
    limits.recompile_limit = max(limits.recompile_limit, RECOMPILE_LIMIT)
    compiled_forwards = {}  # one per layer class: its layers share the compiled graphs
    for layer in layers:
        if layer.gradient_checkpointing and layer._gradient_checkpointing_func is recompute:
            # the class's own forward (transformers >= 5.23 wraps it to checkpoint it)
            forward = type(layer).forward
            forward = getattr(forward, "__wrapped__", forward)
            if forward not in compiled_forwards:
                compiled_forwards[forward] = torch.compile(forward, mode=mode, backend=backend,
                                                           dynamic=False)
            layer._gradient_checkpointing_func = functools.partial(
                recompute, forward=compiled_forwards[forward])
        else:
            layer.compile(mode=mode, backend=backend, dynamic=False)
    return len(layers)
