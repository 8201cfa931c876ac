"""Trace what a piece of torch code allocates and reads back to the host, at any shape, on any machine.

`trace()` is a `TorchDispatchMode` that sees every aten op the code runs:

- **Memory.** Each tensor storage created inside the trace is counted from its creation until the last tensor
  viewing it dies (weak references on the tensor objects, keyed by the storage). The live total and its peak are
  what a caching allocator would have to hold for these temporaries; storages that existed before the trace
  (weights, the KV cache, inputs) are not counted. Each allocation is attributed to a component by the innermost
  LongServe frame on the Python stack (`COMPONENTS`), so a report can say *which code* holds the peak.
- **Host syncs.** Ops that need device values on the host — `_local_scalar_dense` (`.item()`, `int(t)`,
  `bool(t)`), data-dependent shapes (`nonzero`, `masked_select`, `unique`...) and copies from a device to the CPU
  — are counted by op and by call site.

Run the code on the **meta device** (shapes and dtypes only, no data, no compute) and the trace covers a 1M-token
prefill of a 7B model in seconds on a CPU; with `kernels.dispatch.tracing()` the Triton wrappers run their host
code and allocate their outputs without launching. A host sync on meta tensors cannot produce a value: by default
the trace raises `HostSyncInTrace` naming the op and the call site (a sync in a traced path is a finding);
on real CPU tensors syncs are simply counted.
"""
from __future__ import annotations

import collections
import contextlib
import os
import sys
import weakref
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

aten = torch.ops.aten

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # the repository (package-dir mapping)
_THIS = os.path.abspath(__file__)

# Innermost matching frame wins; paths are relative to the repository root.
COMPONENTS: tuple[tuple[str, str], ...] = (
    ("kernels/estimation.py", "estimation"),
    ("kernels/reference/estimate.py", "estimation"),
    ("kernels/sparse_index.py", "index"),                  # the sparse kernel's work lists
    ("kernels/reference/sparse_index.py", "index"),
    ("kernels/", "attention"),
    ("server/layers/attention.py", "attention"),
    ("server/layers/sampler.py", "sampling"),
    ("server/models/", "activations"),
    ("server/engine/", "metadata"),
)

_SYNC_OPS = {
    aten._local_scalar_dense.default: "item",
    aten.nonzero.default: "nonzero",
    aten.masked_select.default: "masked_select",
    aten.unique_consecutive.default: "unique",
    aten._unique2.default: "unique",
    aten.unique_dim.default: "unique",
    aten.repeat_interleave.Tensor: "repeat_interleave",
    aten.equal.default: "equal",
    aten.is_nonzero.default: "is_nonzero",
}


class HostSyncInTrace(RuntimeError):
    """Traced code asked for a device value on the host (meta tensors have none)."""


def component_of(path: str) -> str | None:
    """Component of a source file inside the repository, or None for files outside it."""
    path = os.path.abspath(path)
    if not path.startswith(_ROOT + os.sep) or path == _THIS:
        return None
    rel = os.path.relpath(path, _ROOT).replace(os.sep, "/")
    for prefix, name in COMPONENTS:
        if rel.startswith(prefix):
            return name
    return None


def _call_site(depth_limit: int = 64) -> tuple[str, str]:
    """(component, 'file:line') of the innermost repository frame that is not this module or torch."""
    frame = sys._getframe(2)
    for _ in range(depth_limit):
        if frame is None:
            break
        name = component_of(frame.f_code.co_filename)
        if name is not None:
            rel = os.path.relpath(frame.f_code.co_filename, _ROOT)
            return name, f"{rel}:{frame.f_lineno}"
        frame = frame.f_back
    return "other", "?"


@dataclass
class TraceReport:
    peak_bytes: int = 0                     # peak of live traced bytes
    live_bytes: int = 0                     # live now
    peak_by_component: dict = field(default_factory=dict)   # live bytes per component at the moment of the peak
    component_peaks: dict = field(default_factory=dict)     # each component's own peak of live bytes
    largest: list = field(default_factory=list)              # [(bytes, component, site, shape)] biggest allocations
    syncs: collections.Counter = field(default_factory=collections.Counter)       # by kind
    sync_sites: collections.Counter = field(default_factory=collections.Counter)  # by "kind@file:line"

    @property
    def num_syncs(self) -> int:
        return sum(self.syncs.values())


class trace(TorchDispatchMode):
    """`with trace() as t: ...` then read `t.report`. `raise_on_meta_sync=False` counts and re-raises torch's own
    error instead of `HostSyncInTrace`; `keep_largest` keeps that many of the biggest allocations."""

    def __init__(self, *, raise_on_meta_sync: bool = True, keep_largest: int = 8):
        super().__init__()
        self.report = TraceReport()
        self._raise = raise_on_meta_sync
        self._keep = keep_largest
        self._live: dict[int, tuple[int, str]] = {}         # storage key -> (bytes, component)
        self._holders: dict[int, int] = {}                   # storage key -> tensor objects alive
        self._seen: set[tuple[int, int]] = set()             # (storage key, id(tensor)) with a finalizer
        self._by_component: collections.Counter = collections.Counter()
        self._sections: list[str] = []

    @contextlib.contextmanager
    def section(self, name: str):
        """Attribute every allocation inside the block to `name` (overrides the stack lookup)."""
        self._sections.append(name)
        try:
            yield
        finally:
            self._sections.pop()

    # --- dispatch ---------------------------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        kind = _SYNC_OPS.get(func)
        if kind is None and func in (aten._to_copy.default, aten.copy_.default):
            kind = self._host_copy(func, args, kwargs)
        if kind is not None:
            component, site = _call_site()
            self.report.syncs[kind] += 1
            self.report.sync_sites[f"{kind}@{site}"] += 1
            if self._raise and any(isinstance(a, torch.Tensor) and a.is_meta for a in tree_leaves((args, kwargs))) \
                    and kind != "host_copy":
                raise HostSyncInTrace(f"{func} ({kind}) on meta tensors at {site}: the traced path reads a "
                                      "device value on the host")
        out = func(*args, **kwargs)
        existing = {a.untyped_storage()._cdata for a in tree_leaves((args, kwargs))
                    if isinstance(a, torch.Tensor) and _has_storage(a)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and _has_storage(t):
                self._track(t, fresh=t.untyped_storage()._cdata not in existing)
        return out

    @staticmethod
    def _host_copy(func, args, kwargs) -> str | None:
        if func is aten._to_copy.default:
            src, dst = args[0], kwargs.get("device")
            dst = torch.device(dst) if dst is not None else None
        else:
            dst_t, src = args[0], args[1]
            dst = dst_t.device
        if dst is not None and dst.type == "cpu" and isinstance(src, torch.Tensor) and src.device.type != "cpu":
            return "host_copy"
        return None

    def _track(self, t: torch.Tensor, *, fresh: bool) -> None:
        key = t.untyped_storage()._cdata
        if key not in self._live:
            if not fresh:
                return                                   # a view of / write into storage made before the trace
            size = t.untyped_storage().nbytes()
            if self._sections:
                component, site = self._sections[-1], self._sections[-1]
            else:
                component, site = _call_site()
            self._live[key] = (size, component)
            self._holders[key] = 0
            self._allocated(size, component, site, tuple(t.shape))
        ident = (key, id(t))
        if ident in self._seen:
            return
        self._seen.add(ident)
        self._holders[key] += 1
        weakref.finalize(t, self._release, key, ident)

    def _allocated(self, size: int, component: str, site: str, shape: tuple) -> None:
        r = self.report
        r.live_bytes += size
        self._by_component[component] += size
        r.component_peaks[component] = max(r.component_peaks.get(component, 0), self._by_component[component])
        if r.live_bytes > r.peak_bytes:
            r.peak_bytes = r.live_bytes
            r.peak_by_component = {k: v for k, v in self._by_component.items() if v}
        if self._keep:
            r.largest.append((size, component, site, shape))
            r.largest.sort(key=lambda x: -x[0])
            del r.largest[self._keep:]

    def _release(self, key: int, ident: tuple[int, int]) -> None:
        self._seen.discard(ident)
        holders = self._holders.get(key)
        if holders is None:
            return
        if holders > 1:
            self._holders[key] = holders - 1
            return
        size, component = self._live.pop(key)
        del self._holders[key]
        self.report.live_bytes -= size
        self._by_component[component] -= size


def _has_storage(t: torch.Tensor) -> bool:
    try:
        t.untyped_storage()
    except (RuntimeError, NotImplementedError):   # sparse / nested layouts have no plain storage
        return False
    return True
