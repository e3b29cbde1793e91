"""``python tests/fsdp_on_cpu.py ARGS`` = ``python -m preftune ARGS``, with accelerate's FSDP2
switched on for CPU processes (gloo).

accelerate applies its FSDP plugin only to GPU-like devices, though torch's ``fully_shard`` runs
on CPU meshes. This launcher changes that one decision, after accelerate has read the usual
``ACCELERATE_USE_FSDP`` / ``FSDP_*`` variables, so the tests run preftune through accelerate's
real FSDP2 code path (sharding, gathered state dicts) on a machine without GPUs.
"""

import os
import sys

from accelerate.state import AcceleratorState, DistributedType, PartialState

_init = AcceleratorState.__init__


def _init_with_fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
    _init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if (fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU
            and os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"):
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = fsdp_plugin
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP


AcceleratorState.__init__ = _init_with_fsdp_on_cpu

if __name__ == "__main__":
    from preftune.cli import main

    sys.exit(main(sys.argv[1:]))
