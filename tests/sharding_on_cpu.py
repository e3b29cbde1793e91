"""``python tests/sharding_on_cpu.py ARGS`` = ``python -m preftune ARGS``, with accelerate's FSDP2
or DeepSpeed switched on for CPU processes (gloo).

accelerate applies its FSDP and DeepSpeed plugins only to GPU-like devices, though torch's
``fully_shard`` runs on CPU meshes and DeepSpeed has a CPU accelerator. This launcher changes
that one decision, after accelerate has read the usual ``ACCELERATE_USE_FSDP`` / ``FSDP_*`` or
``ACCELERATE_USE_DEEPSPEED`` / ``ACCELERATE_DEEPSPEED_*`` variables, so the tests run preftune
through accelerate's real sharding code paths on a machine without GPUs.
"""

import os
import sys

from accelerate.state import AcceleratorState, DistributedType, PartialState

_init = AcceleratorState.__init__


def _init_with_sharding_on_cpu(self, *args, fsdp_plugin=None, deepspeed_plugin=None, **kwargs):
    _init(self, *args, fsdp_plugin=fsdp_plugin, deepspeed_plugin=deepspeed_plugin, **kwargs)
    if self.distributed_type != DistributedType.MULTI_CPU:
        return
    if fsdp_plugin is not None and os.environ.get("ACCELERATE_USE_FSDP", "") == "true":
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = fsdp_plugin
    elif deepspeed_plugin is not None and os.environ.get("ACCELERATE_USE_DEEPSPEED", "") == "true":
        self.distributed_type = DistributedType.DEEPSPEED
        deepspeed_plugin.set_mixed_precision(self._mixed_precision)
        deepspeed_plugin.select(_from_accelerator_state=True)
        self.deepspeed_plugins = deepspeed_plugin
    PartialState._shared_state["distributed_type"] = self.distributed_type


AcceleratorState.__init__ = _init_with_sharding_on_cpu

if os.environ.get("ACCELERATE_USE_DEEPSPEED", "") == "true":
    import importlib

    # DeepSpeed compiles its CPU shared-memory all-reduce the first time a process group starts
    # on a machine (about 40 s on 2 cores); only its inference engine calls it, not training.
    # (The module by name: the attribute deepspeed.comm.torch is torch itself.)
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None

if __name__ == "__main__":
    from preftune.cli import main

    sys.exit(main(sys.argv[1:]))
