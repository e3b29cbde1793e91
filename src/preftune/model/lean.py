"""Layers that keep less for backward, with the same forward, bit for bit.

- RMSNorm. transformers' Llama-style norm (Llama, Qwen2/3, Mistral, SmolLM2...) upcasts its
  input to fp32, normalizes, casts back and scales by its weight; autograd keeps the fp32 copy
  of the input and the normalized values. ``LeanRMSNorm`` keeps the input as it came and one
  fp32 scale per token and recomputes the rest in backward.
- SiLU-gated MLP. ``down(silu(gate(x)) * up(x))`` keeps gate(x), silu(gate(x)), up(x) and the
  product; ``LeanSiluMul`` keeps gate(x) and up(x) and recomputes silu in backward.

Each class is switched only where a random probe shows the lean forward gives exactly the
class's own output; everything else is left as it is.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn import functional as F


class LeanRMSNorm(torch.autograd.Function):
    """``weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype)``, in fp32 inside; saves x, weight
    and the per-token scale."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        upcast = x.float()
        scale = torch.rsqrt(upcast.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, scale)
        return weight * (upcast * scale).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, weight, scale = ctx.saved_tensors
        normed = x * scale  # fp32: the product promotes, as x.float() * scale would
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = (grad * normed.to(x.dtype)).reshape(-1, weight.shape[-1]).sum(0)
            grad_weight = grad_weight.to(weight.dtype)
        # d/dx of x * scale(x), scale = (mean(x^2) + eps)^-1/2: scale * (g - normed * mean(g * normed))
        upstream = (grad * weight).float()
        projection = (upstream * normed).mean(-1, keepdim=True)
        grad_x = scale * torch.addcmul(upstream, normed, projection, value=-1)
        return grad_x.to(x.dtype), grad_weight, None


class LeanSiluMul(torch.autograd.Function):
    """``silu(gate) * up``; saves gate and up, not silu(gate), which backward recomputes."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        # the kernel autograd runs for transformers' MLP: the gradients are its, bit for bit
        grad_gate = torch.ops.aten.silu_backward(grad * up, gate)
        return grad_gate, grad * F.silu(gate)


def _norm_forward(self, hidden_states):
    return LeanRMSNorm.apply(hidden_states, self.weight, self.variance_epsilon)


def _mlp_forward(self, x):
    return self.down_proj(LeanSiluMul.apply(self.gate_proj(x), self.up_proj(x)))


def _probe_norm(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return (isinstance(weight, nn.Parameter) and weight.dim() == 1 and weight.numel() > 0
            and isinstance(getattr(module, "variance_epsilon", None), float)
            and _same(module, _norm_forward, weight.numel(), random_weight=True))


def _probe_mlp(module: nn.Module) -> bool:
    return (all(hasattr(module, name) for name in ("gate_proj", "up_proj", "down_proj"))
            and type(getattr(module, "act_fn", None)).__name__ in ("SiLU", "SiLUActivation")
            and getattr(module.gate_proj, "in_features", 0) > 0
            and _same(module, _mlp_forward, module.gate_proj.in_features))


def _same(module, lean_forward, width: int, random_weight: bool = False) -> bool:
    """The class's own forward (not one transformers may have put on the module for a hub
    kernel, which then stays in use) against ``lean_forward``, on a host copy of the module
    and random bf16 and fp32 rows; ``random_weight``: the copy's weight is random too (ones,
    a fresh norm's, would hide Gemma's 1 + weight)."""
    probe = copy.deepcopy(module).cpu()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        if random_weight:
            probe.weight.copy_(torch.randn(probe.weight.shape, generator=generator))
        for dtype in (torch.bfloat16, torch.float32):
            probe.to(dtype)
            x = (torch.randn(3, width, generator=generator) * 3).to(dtype)
            if not torch.equal(type(module).forward(probe, x), lean_forward(probe, x)):
                return False
    return True


PROBES = {"RMSNorm": (_probe_norm, _norm_forward), "MLP": (_probe_mlp, _mlp_forward)}


def _lean_class(kind: type, forward) -> type:
    """``kind`` with the lean forward: a subclass, not a forward set on each module, because
    transformers (with the ``kernels`` package) resets per-module forwards whenever a model
    switches between train and eval. Kept in this module's namespace, so pickle finds it."""
    if kind not in _LEAN_CLASSES:
        name = f"Lean{kind.__name__}"
        while name in globals():  # another module's class of the same name (Qwen2RMSNorm)
            name += "_"
        lean = type(name, (kind,), {"forward": forward, "__module__": __name__,
                                    "__qualname__": name})
        globals()[name] = _LEAN_CLASSES[kind] = lean
    return _LEAN_CLASSES[kind]


_LEAN_CLASSES: dict[type, type] = {}


def use_lean_layers(model: nn.Module) -> dict[str, int]:
    """Every RMSNorm and SiLU-gated MLP module of ``model`` whose class the lean forward
    reproduces exactly runs through it from now on (its class becomes a subclass with that
    forward; each class is probed once). Returns how many of each kind."""
    verified: dict[type, bool] = {}
    counts = dict.fromkeys(PROBES, 0)
    for module in model.modules():
        kind = type(module)
        suffix = next((s for s in PROBES if kind.__name__.endswith(s)), None)
        if suffix is None:
            continue
        probe, forward = PROBES[suffix]
        if kind.forward is not forward:
            if kind not in verified:
                verified[kind] = _passes(probe, module)
            if not verified[kind]:
                continue
            module.__class__ = _lean_class(kind, forward)
        counts[suffix] += 1
    return counts


def _passes(probe, module: nn.Module) -> bool:
    try:
        return probe(module)
    except Exception:  # a module it cannot copy or run on the host is left alone
        return False


def kept_for_backward(run, leave_out=()) -> int:
    """Bytes of the tensors autograd keeps for backward while ``run()`` executes, each storage
    once, those of ``leave_out`` (e.g. the parameters) not counted."""
    storages: dict[int, int] = {}

    def pack(tensor):
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        run()
    left_out = {tensor.untyped_storage().data_ptr() for tensor in leave_out}
    return sum(size for pointer, size in storages.items() if pointer not in left_out)
