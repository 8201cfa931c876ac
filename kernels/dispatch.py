"""Triton vs reference selection by device and capability, in one place.

CUDA tensors on an sm_80+ GPU run the Triton kernels; everything else runs the same-signature PyTorch
references. ``LONGSERVE_KERNELS=triton|reference|auto`` (default ``auto``) overrides the choice, e.g. to run the
Triton path on CPU tensors under ``TRITON_INTERPRET=1`` in tests, or to force the reference on a GPU when
bisecting a numerical difference. Imports are lazy so the reference path never needs a working Triton backend.

``tracing()`` runs the Triton path's host code without launching any kernel: wrappers allocate their outputs and
return them unfilled. The memory bench and the sync-count tests use it with meta tensors to trace what the GPU
path allocates and reads back at full model shapes on a machine without a GPU.
"""
from __future__ import annotations

import contextlib
import os
import threading

import torch

ENV_VAR = "LONGSERVE_KERNELS"
_MODES = ("auto", "triton", "reference")
_TRACE = threading.local()


@contextlib.contextmanager
def tracing():
    """Inside the block: the Triton path is chosen for every input and no kernel is launched."""
    previous = getattr(_TRACE, "on", False)
    _TRACE.on = True
    try:
        yield
    finally:
        _TRACE.on = previous


def launches_enabled() -> bool:
    """False inside ``tracing()``: Triton wrappers return their allocated outputs without launching."""
    return not getattr(_TRACE, "on", False)


def backend_for(*tensors: torch.Tensor) -> str:
    """'triton' or 'reference' for these inputs (see the module docstring)."""
    if not launches_enabled():
        return "triton"
    mode = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if mode not in _MODES:
        raise ValueError(f"{ENV_VAR} must be one of {', '.join(_MODES)}, got {mode!r}")
    if mode != "auto":
        return mode
    if tensors and all(t.is_cuda for t in tensors):
        major, _ = torch.cuda.get_device_capability(tensors[0].device)
        return "triton" if major >= 8 else "reference"
    return "reference"


def dual_chunk_attention(q, k, v, **kwargs):
    """DCA prefill (dense or sparse); signature of ``reference.dca.dual_chunk_attention_reference``."""
    if backend_for(q, k, v) == "triton":
        from longserve.kernels.dca import dual_chunk_attention_triton as impl
    else:
        from longserve.kernels.reference.dca import dual_chunk_attention_reference as impl
    return impl(q, k, v, **kwargs)


def paged_dual_chunk_attention(q, kv, **kwargs):
    """DCA prefill reading K/V from a KV source (``kernels.kv_source``); signature of
    ``reference.dca.paged_dual_chunk_attention_reference``."""
    caches = (kv.k_cache, kv.v_cache) if hasattr(kv, "k_cache") else (kv.k, kv.v)
    if backend_for(q, *caches) == "triton":
        from longserve.kernels.dca import paged_dual_chunk_attention_triton as impl
    else:
        from longserve.kernels.reference.dca import paged_dual_chunk_attention_reference as impl
    return impl(q, kv, **kwargs)


def paged_dca_decode(q, k_cache, v_cache, block_tables, seq_lens, **kwargs):
    """One DCA decode step over a paged cache; signature of ``reference.dca.paged_dca_decode_reference``."""
    if backend_for(q, k_cache, v_cache) == "triton":
        from longserve.kernels.dca_decode import paged_dca_decode_triton as impl
    else:
        from longserve.kernels.reference.dca import paged_dca_decode_reference as impl
    return impl(q, k_cache, v_cache, block_tables, seq_lens, **kwargs)


def vertical_slash_attention(q, k, v, block_count, block_offset, column_count, column_index, *, scale, causal):
    """Sparse attention over work lists (docs/algorithms.md#index-building) -> (O, LSE)."""
    if backend_for(q, k, v) == "triton":
        from longserve.kernels.vertical_slash import vertical_slash_attention as impl
    else:
        from longserve.kernels.reference.vertical_slash import vertical_slash_attention as impl
    return impl(q, k, v, block_count, block_offset, column_count, column_index, scale=scale, causal=causal)


def convert_vertical_slash_indexes(vertical, vertical_count, slash, slash_count, q_len, kv_len, **kwargs):
    """(V, S) -> kernel work lists, on the inputs' device."""
    if backend_for(vertical, slash) == "triton":
        from longserve.kernels.sparse_index import convert_vertical_slash_indexes as impl
    else:
        from longserve.kernels.reference.sparse_index import convert_vertical_slash_indexes as impl
    return impl(vertical, vertical_count, slash, slash_count, q_len, kv_len, **kwargs)


def paged_attention_decode(q, k_cache, v_cache, block_tables, key_start, key_end, *, scale, **kwargs):
    """Decode attention over one paged key range per sequence -> (O fp32, LSE fp32)."""
    if backend_for(q, k_cache, v_cache) == "triton":
        from longserve.kernels.paged_attention import paged_attention_decode as impl
    else:
        from longserve.kernels.reference.paged_attention import paged_attention_decode as impl
    return impl(q, k_cache, v_cache, block_tables, key_start, key_end, scale=scale, **kwargs)


def merge_lse(parts):
    """LSE merge of (O, LSE) parts -> fp32 (O, LSE)."""
    parts = list(parts)
    if parts and backend_for(*(o for o, _ in parts)) == "triton":
        from longserve.kernels.merge import merge_lse_triton as impl
    else:
        from longserve.kernels.reference.attention import merge_lse as impl
    return impl(parts)
