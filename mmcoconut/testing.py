"""Instrumentation behind the hot-path proofs (tests/test_model_hotpath.py, bench/bench_hotpath.py).

- :class:`HostSyncCounter`: device->host reads. A TorchFunctionMode sees Python-level reads (`.item()`, `.tolist()`,
  `bool(t)`, `int(t)`, `float(t)`, `.nonzero()`, ...); a TorchDispatchMode sees the ATen ops that read device data
  (`_local_scalar_dense`, `nonzero`, `is_nonzero`, `equal`, ...) also inside C++ ops and autograd backward.
- :class:`VDGradCounter`: ops that produce a [V, D] tensor during backward (embedding-table gradients).
- :func:`saved_activation_bytes`: bytes of the distinct storages autograd saves for backward during a call.
"""
from __future__ import annotations

from collections import Counter

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

_PY_READS = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "numpy", "equal",
             "allclose"}
_ATEN_READS = {"_local_scalar_dense", "nonzero", "nonzero_static", "is_nonzero", "equal", "unique",
               "_unique2", "masked_select", "repeat_interleave"}


class _FunctionReads(TorchFunctionMode):
    def __init__(self, counts: Counter):
        super().__init__()
        self.counts = counts

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func))
        if name in _PY_READS:
            self.counts["py." + name] += 1
        return func(*args, **(kwargs or {}))


class _DispatchReads(TorchDispatchMode):
    def __init__(self, counts: Counter):
        super().__init__()
        self.counts = counts

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in _ATEN_READS:
            self.counts["aten." + name] += 1
        return func(*args, **(kwargs or {}))


class HostSyncCounter:
    """with HostSyncCounter() as c: ...; c.counts (Counter by op), c.total."""

    def __init__(self):
        self.counts: Counter = Counter()
        self._modes = [_FunctionReads(self.counts), _DispatchReads(self.counts)]

    def __enter__(self):
        for m in self._modes:
            m.__enter__()
        return self

    def __exit__(self, *exc):
        for m in reversed(self._modes):
            m.__exit__(*exc)

    @property
    def total(self) -> int:
        return sum(self.counts.values())


class VDGradCounter(TorchDispatchMode):
    """Counts ops whose output is a `shape` ([V, D]) tensor, by op name (use around the backward call)."""

    def __init__(self, shape):
        super().__init__()
        self.shape = tuple(shape)
        self.counts: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outs = out if isinstance(out, (tuple, list)) else (out,)
        for o in outs:
            if isinstance(o, torch.Tensor) and tuple(o.shape) == self.shape:
                self.counts[str(func.overloadpacket.__name__)] += 1
        return out


def saved_activation_bytes(fn, *args, exclude=(), **kwargs):
    """(result of fn, bytes of the distinct storages saved for backward while fn runs), storages of the tensors in
    `exclude` (e.g. model.parameters()) not counted."""
    seen = {}
    skip = {t.untyped_storage().data_ptr() for t in exclude}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in skip:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*args, **kwargs)
    return out, sum(seen.values())
