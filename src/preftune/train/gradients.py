"""A step's gradient norm, and clipping by it."""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor


def clipped_norm(parameters, max_norm: float | None, sharded_by=None) -> torch.Tensor:
    """The global norm of the gradients of ``parameters``, which are clipped to ``max_norm``
    by it when that is set. It is computed in float32: float16 ends at 65504, below the norm of
    the finite float16 gradients of a large step, which torch's own clipping would call inf
    (and the step would be skipped). Sharded parameters (``sharded_by``: the accelerator of an
    FSDP run) leave it to the engine, which gathers the shards' norms."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if sharded_by is not None:
        norm = sharded_by.clip_grad_norm_(parameters, max_norm) if max_norm else \
            torch.nn.utils.get_total_norm(grads) if grads else torch.tensor(0.0)
        return norm.full_tensor() if isinstance(norm, DTensor) else norm  # (on the device)
    if not grads:
        return torch.tensor(0.0)
    norm = torch.linalg.vector_norm(torch.stack(
        [torch.linalg.vector_norm(grad, dtype=torch.float32) for grad in grads]))
    if max_norm:
        torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, norm)
    return norm
