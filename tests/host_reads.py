"""Counting what a training step asks of the host: reads of tensor values (each one a
device->host sync on a GPU) and the number of operator calls (each at least one kernel launch).

``HostReads`` is a dispatch mode: it sees every aten operator, so it counts the scalar reads
(``item``, ``float(t)``, ``bool(t)``), copies to the CPU, operators whose output size depends on
the data (``nonzero``, boolean-mask indexing, ``bincount`` ... which wait for the device to
know how much to allocate) and, through patched ``Tensor.tolist``/``numpy``, list reads. On a
CPU every tensor is on the host, so it counts every read of a tensor's values, which is what a
GPU would have to sync for if those tensors lived on the device.
"""

from __future__ import annotations

import collections
import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

SCALAR_READS = {aten._local_scalar_dense.default, aten.equal.default, aten.is_nonzero.default}
DATA_DEPENDENT = {
    aten.nonzero.default, aten.masked_select.default, aten.bincount.default,
    aten._unique2.default, aten.unique_dim.default, aten.unique_consecutive.default,
    aten.repeat_interleave.Tensor, aten.nonzero_static.default,
}
# ops that only describe memory: no kernel runs
METADATA = {"view", "_unsafe_view", "reshape", "expand", "t", "transpose", "permute", "unsqueeze",
            "squeeze", "slice", "select", "as_strided", "alias", "detach", "split", "unbind",
            "split_with_sizes", "chunk", "narrow", "view_as", "flatten", "unflatten", "lift_fresh",
            "empty", "empty_strided", "new_empty", "new_empty_strided", "is_same_size", "sym_size",
            "sym_stride", "sym_numel", "sym_storage_offset", "_reshape_alias", "expand_as",
            "diagonal"}


def _bool_index(args) -> bool:
    indices = args[1] if len(args) > 1 else []
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8)
               for i in indices or [])


class HostReads(TorchDispatchMode):
    """Inside ``with HostReads() as reads:``, ``reads.count`` is the number of host reads and
    ``reads.ops`` the number of operator calls (metadata-only ones excluded); ``reads.where``
    has a short stack for each read (to find it when a budget test fails)."""

    def __init__(self):
        super().__init__()
        self.count, self.ops, self.where = 0, 0, []
        self._patched = {}

    def _read(self, what: str) -> None:
        self.count += 1
        frames = [f for f in traceback.extract_stack()[:-3] if "site-packages" not in f.filename
                  and "host_reads" not in f.filename][-3:]
        self.where.append((what, [f"{f.filename.split('/')[-1]}:{f.lineno} {f.line}"
                                  for f in frames]))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in SCALAR_READS:
            self._read(str(func))
        elif func in DATA_DEPENDENT or (func in (aten.index.Tensor, aten.index_put.default,
                                                 aten.index_put_.default) and _bool_index(args)):
            self._read(str(func))
        if func.__name__.split(".")[0] not in METADATA:
            self.ops += 1
        return func(*args, **kwargs)

    def __enter__(self):
        for name in ("tolist", "numpy"):
            original = getattr(torch.Tensor, name)
            self._patched[name] = original

            def counted(tensor, *a, _original=original, _name=name, **k):
                self._read(f"Tensor.{_name}")
                return _original(tensor, *a, **k)

            setattr(torch.Tensor, name, counted)
        return super().__enter__()

    def __exit__(self, *exc):
        for name, original in self._patched.items():
            setattr(torch.Tensor, name, original)
        return super().__exit__(*exc)

    def summary(self) -> str:
        counts = collections.Counter((what, tuple(stack)) for what, stack in self.where)
        return "\n".join(f"{n} x {what}\n    " + "\n    ".join(stack)
                         for (what, stack), n in counts.most_common())
