"""The micro-batches of a run, each collated one ahead in a background thread.

While the device runs micro-batch k, a worker thread lays out micro-batch k + 1 (collate is
Python work) and, for a GPU, puts it in page-locked memory, so its copy to the device does not
block the host and the device is not left waiting for the next batch.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch


class MicroBatches:
    """``get(step, micro)``: the batch of micro-batch ``micro`` of optimizer step ``step`` on
    ``device``, for this process (``rank``'s share of every step's examples, as listed by
    ``order``). ``ahead`` builds the next one in the background; a task whose batches depend
    on the state of training (online sampling) turns it off."""

    def __init__(self, task, order: list, examples_per_step: int, rank: int, batch_size: int,
                 accumulation: int, total_steps: int, device: torch.device, ahead: bool = True):
        self.task, self.order, self.device = task, order, torch.device(device)
        self.examples_per_step, self.batch_size = examples_per_step, batch_size
        self.first_of_rank = rank * batch_size * accumulation
        self.accumulation, self.total_steps = accumulation, total_steps
        self.pin = self.device.type == "cuda"
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="collate") \
            if ahead else None
        self._queued = None  # ((step, micro), future) of the batch being built ahead

    def get(self, step: int, micro: int):
        queued, self._queued = self._queued, None
        batch = queued[1].result() if queued and queued[0] == (step, micro) \
            else self._build(step, micro)  # a resumed run may start elsewhere
        following = (step, micro + 1) if micro + 1 < self.accumulation else (step + 1, 0)
        if self._pool is not None and following[0] < self.total_steps:
            self._queued = (following, self._pool.submit(self._build, *following))
        return batch.to(self.device, non_blocking=self.pin)

    def _build(self, step: int, micro: int):
        start = step * self.examples_per_step + self.first_of_rank + micro * self.batch_size
        examples = [self.task.train_examples[i]
                    for i in self.order[start : start + self.batch_size]]
        batch = self.task.make_batch(examples)
        return batch.pin_memory() if self.pin else batch

    def close(self) -> None:
        self._queued = None
        if self._pool is not None:
            self._pool.shutdown(wait=True)
