"""AdamW stepped inside backward: each parameter is updated the moment its gradient is complete,
and its gradient is freed right away.

A normal step keeps every gradient until ``optimizer.step()``: for full fine-tuning that is a
second copy of the weights (540 MB for SmolLM2-135M in fp32). Here at most one parameter's
gradient exists at a time. The price: no gradient accumulation and no clipping by the global
norm (neither is known before the updates happen). The update itself is AdamW's, parameter by
parameter, so the weights match a normal AdamW step without clipping.
"""

from __future__ import annotations

import torch


class AdamWInBackward(torch.optim.Optimizer):
    """One AdamW per parameter, run from that parameter's post-accumulate-grad hook.

    It behaves as an optimizer for the rest of the loop: ``param_groups`` are the per-parameter
    groups (so an LR scheduler sets every learning rate), ``state_dict`` and ``load_state_dict``
    cover all of them (checkpoints and resume work), and ``step`` does nothing because the
    updates already happened during backward. ``grad_norm()`` is the global norm of the
    gradients of the step (for logging); a non-finite gradient is not applied. Each part is
    torch's fused AdamW, whose update matches the plain one to rounding.
    """

    def __init__(self, params, lr: float, lr_scales=None, **adamw):
        """``lr_scales``: a learning-rate multiplier per parameter (default 1 each); ``adamw``:
        torch AdamW's other settings (weight_decay, betas, eps)."""
        params = list(params)
        scales = list(lr_scales) if lr_scales is not None else [1.0] * len(params)
        super().__init__(params, {"lr": lr})
        self.parts = [torch.optim.AdamW([p], lr=lr * scale, fused=True, **adamw)
                      for p, scale in zip(params, scales, strict=True)]
        self.param_groups = [group for part in self.parts for group in part.param_groups]
        self._squared_norm = 0.0
        self._hooks = [p.register_post_accumulate_grad_hook(self._hook(part))
                       for p, part in zip(params, self.parts)]

    def _hook(self, part: torch.optim.AdamW):
        def update(param: torch.Tensor) -> None:
            squared = param.grad.detach().float().pow(2).sum()
            self._squared_norm = self._squared_norm + squared
            # The fused kernel skips the whole update (weights, moments, step count) where
            # found_inf is 1, as under a GradScaler: a NaN/inf gradient is never applied, and
            # deciding it on the device keeps backward free of host syncs (one per weight
            # otherwise, which stalls a GPU).
            part.found_inf = (~torch.isfinite(squared)).float()
            part.step()
            param.grad = None
        return update

    def grad_norm(self) -> torch.Tensor:
        return torch.as_tensor(self._squared_norm).sqrt()

    def step(self, closure=None):  # the updates ran in backward
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._squared_norm = 0.0

    def state_dict(self) -> dict:
        return {"parts": [part.state_dict() for part in self.parts]}

    def load_state_dict(self, state_dict: dict) -> None:
        for part, state in zip(self.parts, state_dict["parts"], strict=True):
            part.load_state_dict(state)
        self.param_groups = [group for part in self.parts for group in part.param_groups]
