"""The benchmarks' tensor-byte accounting on CPU (benchmarks/common.py: PhaseMemory "tensors"),
which stands in for torch.cuda.max_memory_allocated when comparing peaks without a GPU."""

import torch
from common import PhaseMemory

MIB = 2**20


def test_tensor_peaks_per_phase_count_live_bytes_exactly():
    kept = torch.empty(MIB // 4)  # allocated before recording starts: not counted
    memory = PhaseMemory("tensors")
    weights = torch.empty(3 * MIB, dtype=torch.uint8)  # setup: 3 MiB alive
    memory.enter("train")
    activations = torch.empty(5 * MIB, dtype=torch.uint8)  # 8 alive
    del activations  # 3 alive
    gradients = torch.empty(2 * MIB, dtype=torch.uint8)  # 5 alive
    memory.enter("reference")
    del kept  # freed, but never counted: stays out of the totals
    extra = torch.empty(MIB, dtype=torch.uint8)  # 6 alive
    peaks = memory.stop()
    del weights, gradients, extra
    assert peaks == {"setup": 3.0, "train": 8.0, "reference": 6.0}
