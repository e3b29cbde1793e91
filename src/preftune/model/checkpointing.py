"""``train.gradient_checkpointing``: a layer's activations recomputed in backward, one autograd
node per layer.

torch's non-reentrant checkpoint hooks every tensor a layer keeps for backward: a Python call
packs it in forward, another unpacks it in backward, and the recomputation packs and checks
each again (about 40 tensors a Llama layer). Where a step is bound by the host, as a small
model's is on a GPU, those calls cost more than the recomputed kernels: on a thin 30-layer
model they made a checkpointed step 2.1x a plain one on the host, where one extra forward is
1.3x (``benchmarks/checkpointing_overhead.py``).

``recompute`` keeps a layer's positional inputs only and runs it under no_grad; in backward it
runs the layer again with gradients (same random state, same attention kernels) and hands the
gradients of the inputs and of the layer's trained weights back to the graph. The weights are
inputs of the node, so their gradients accumulate where every other weight's do (DDP's and
FSDP's hooks, ``optimizer_in_backward``). Four cases go through torch's checkpoint instead: a
layer called with a keyword tensor that needs a gradient (that gradient would be lost),
DeepSpeed ZeRO-3, which frees each weight after the call that gathered it, a layer with
hooks handed over as its ``__call__`` (transformers before 5.23), whose hooks would run again,
and a forward inside ``side_outputs`` (a mixture of experts' router logits, which
transformers' hooks hand out beside the layer's output: computed under no_grad, they would
give the load-balancing loss no gradient).
"""

from __future__ import annotations

import functools
from contextlib import nullcontext

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .forward import SIDE_OUTPUTS, attention_kernels


def checkpoint_contexts():
    """``context_fn`` of torch's checkpoint: the forward already runs in
    ``attention_kernels``; the recomputation in backward enters it again."""
    return nullcontext(), attention_kernels()


# torch's checkpoint as preftune runs it (where ``recompute`` does not apply, and for layers
# transformers checkpoints itself)
TORCH_SETTINGS = {"use_reentrant": False, "context_fn": checkpoint_contexts}
torch_checkpoint = functools.partial(checkpoint, **TORCH_SETTINGS)


def enable_checkpointing(model: nn.Module, every: int = 1) -> None:
    """Activation checkpointing for every ``every``-th decoder layer of a transformers model
    (the first, then each ``every`` further), through ``recompute``. transformers' own switch
    (``activation_checkpointing_enable``, or its older name) marks the layers; each then calls
    ``recompute`` with its forward."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=dict(TORCH_SETTINGS))
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=dict(TORCH_SETTINGS))
    # transformers also makes the embeddings' output require a gradient, which only reentrant
    # checkpointing needs: with frozen lower layers (model.train_layers) backward would run
    # through them and keep their inputs for nothing
    model.disable_input_require_grads()
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    for index, layer in enumerate(layers):
        layer.gradient_checkpointing = index % every == 0
        layer._gradient_checkpointing_func = recompute


def recompute(run: functools.partial, *args, forward=None):
    """``run(*args)`` (transformers' ``partial(forward, layer, **kwargs)``) with its
    activations recomputed in backward, calling ``forward`` (the layer class's forward,
    compiled: ``model/compile.py``) in place of ``run.func`` if given; through torch's
    checkpoint where a keyword tensor needs a gradient, DeepSpeed ZeRO-3 splits the weights,
    or the call runs the layer's hooks."""
    layer = _layer_of(run)
    # transformers before 5.23 hands over ``layer.__call__``: its hooks (FSDP2's unshard and
    # reshard, which also reduce the weights' gradients) would run again in the recomputation
    hooked = layer is not None and not run.args and bool(
        layer._forward_pre_hooks or layer._forward_hooks)
    if forward is not None and layer is not None and not hooked:
        run = functools.partial(forward, layer, **run.keywords)
    weights = list(layer.parameters()) if isinstance(layer, nn.Module) else None
    # DeepSpeed ZeRO-3 (its weights carry a ds_id) gathers each weight for the call that uses
    # it and frees it after: the weights this node would hold are empty by backward
    if weights is None or hooked or SIDE_OUTPUTS.get() or _needs_grad(run.keywords) \
            or any(hasattr(w, "ds_id") for w in weights):
        return torch_checkpoint(run, *args)
    return _Recompute.apply(run, len(args), *args, *(w for w in weights if w.requires_grad))


def _layer_of(run) -> nn.Module | None:
    """The layer transformers hands ``recompute``: ``partial(forward, layer, **kwargs)``, or in
    transformers before 5.23 ``partial(layer.__call__, **kwargs)``."""
    if not isinstance(run, functools.partial):
        return None
    owner = run.args[0] if run.args else getattr(run.func, "__self__", None)
    return owner if isinstance(owner, nn.Module) else None


def _needs_grad(value) -> bool:
    if isinstance(value, torch.Tensor):
        return value.requires_grad
    if isinstance(value, (tuple, list)):
        return any(_needs_grad(v) for v in value)
    if isinstance(value, dict):
        return any(_needs_grad(v) for v in value.values())
    return False


class _Recompute(torch.autograd.Function):
    """forward(run, count, *args, *weights) = run(*args[:count]) under no_grad; backward runs
    it again with gradients and differentiates that."""

    @staticmethod
    def forward(ctx, run, count, *inputs):
        ctx.run, ctx.count = run, count
        ctx.others = [None if isinstance(a, torch.Tensor) else a for a in inputs[:count]]
        ctx.save_for_backward(*(a if isinstance(a, torch.Tensor) else None for a in inputs))
        ctx.devices = list(dict.fromkeys(a.device for a in inputs[:count]
                                         if isinstance(a, torch.Tensor) and a.is_cuda))
        ctx.rng = (torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in ctx.devices])
        return run(*inputs[:count])

    @staticmethod
    def backward(ctx, *grads):
        saved = ctx.saved_tensors
        needs = ctx.needs_input_grad[2:]
        args = [kept if tensor is None else tensor.detach().requires_grad_(need)
                for tensor, kept, need in zip(saved, ctx.others, needs)]
        weights = saved[ctx.count:]
        with torch.random.fork_rng(devices=ctx.devices), torch.enable_grad(), \
                attention_kernels():
            torch.set_rng_state(ctx.rng[0])
            for device, state in zip(ctx.devices, ctx.rng[1]):
                torch.cuda.set_rng_state(state, device)
            out = ctx.run(*args)
        outs = out if isinstance(out, tuple) else (out,)
        pairs = [(o, g) for o, g in zip(outs, grads)
                 if isinstance(o, torch.Tensor) and o.requires_grad and g is not None]
        wanted = [t for t, need in zip([*args, *weights], needs) if need]
        found = iter(torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs],
                                         allow_unused=True))
        return (None, None, *(next(found) if need else None for need in needs))
