"""Micro-batches collated ahead in a background thread are the batches the loop would build
itself, for every step, micro-batch and process."""

import threading

import torch

from preftune.data.layout import collate
from preftune.data.tokenize import TokenizedExample
from preftune.train.batches import MicroBatches
from preftune.train.schedule import example_stream


class Task:
    def __init__(self):
        self.train_examples = [TokenizedExample([1] * (2 + i % 5), [[3] * (1 + i % 3), [4, 2]],
                                                index=i) for i in range(20)]
        self.threads = []

    def make_batch(self, examples):
        self.threads.append(threading.current_thread().name)
        return collate(examples, 0, "prefix_shared")


def test_batches_built_ahead_equal_batches_built_in_place():
    batch_size, accumulation, world, steps = 2, 2, 2, 4
    per_step = batch_size * accumulation * world
    order = example_stream(20, per_step, steps, seed=3)
    for rank in range(world):
        ahead_task, plain_task = Task(), Task()
        ahead = MicroBatches(ahead_task, order, per_step, rank, batch_size, accumulation, steps,
                             "cpu", ahead=True)
        plain = MicroBatches(plain_task, order, per_step, rank, batch_size, accumulation, steps,
                             "cpu", ahead=False)
        for step in range(steps):
            for micro in range(accumulation):
                a, b = ahead.get(step, micro), plain.get(step, micro)
                first = step * per_step + rank * batch_size * accumulation + micro * batch_size
                assert a.example_ids == b.example_ids == tuple(order[first:first + batch_size])
                for name in ("input_ids", "position_ids", "logit_positions", "target_tokens"):
                    assert torch.equal(getattr(a, name), getattr(b, name)), name
        ahead.close()
        # all but the first batch were collated by the worker thread, none twice
        assert ahead_task.threads.count("MainThread") == 1
        assert len(ahead_task.threads) == steps * accumulation
        assert set(plain_task.threads) == {"MainThread"}


def test_a_batch_asked_for_out_of_order_is_built_on_the_spot():
    """A resumed run starts at a later step: the queued batch is dropped, the asked one built."""
    task = Task()
    order = example_stream(20, 4, 4, seed=0)
    batches = MicroBatches(task, order, 4, 0, 4, 1, 4, "cpu", ahead=True)
    batches.get(0, 0)
    resumed = batches.get(2, 0)
    assert resumed.example_ids == tuple(order[8:12])
    batches.close()
