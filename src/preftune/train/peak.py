"""What a piece of work allocates at its peak, measured, counting tensors as
``torch.cuda.max_memory_allocated`` does: CUDA's allocator statistics on a GPU; elsewhere every
allocation and free of the CPU allocator, recorded by torch.profiler's memory profiling and
replayed in time order (allocations on other threads are not seen)."""

from __future__ import annotations

from collections.abc import Callable

import torch


def peak_allocated(work: Callable[[], object], device: torch.device) -> int:
    """Bytes that ``work()`` holds at its peak beyond what was allocated before it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        work()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        work()
    alive = peak = 0
    for _, nbytes in sorted((event.start_ns(), event.nbytes()) for event in
                            profiler.profiler.kineto_results.events()
                            if event.name() == "[memory]"):
        alive += nbytes
        peak = max(peak, alive)
    return peak
