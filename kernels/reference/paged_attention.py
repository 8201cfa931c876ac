"""Reference twin of ``longserve.kernels.paged_attention``: gather each sequence's key range, attend densely.

Shapes as in the Triton module: q ``[B, H, D]``, caches ``[num_blocks, block_size, G, D]``, block_tables
``[B, max_blocks]``, key_start/key_end ``[B]``; returns O and LSE in fp32 (fp64 for fp64 inputs), with
``O = 0, LSE = -inf`` for an empty range. Loops over the batch (a reference, not a fast path).
"""
from __future__ import annotations

import torch

from longserve.kernels.reference.attention import attention_with_lse


def gather_keys(cache: torch.Tensor, block_table: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """Rows ``[start, end)`` of one sequence's logical cache: ``[end - start, G, D]``."""
    page = cache.shape[1]
    pos = torch.arange(start, end, device=cache.device)
    return cache[block_table[pos // page].long(), pos % page]


def paged_attention_decode(q, k_cache, v_cache, block_tables, key_start, key_end, *, scale: float,
                           max_num_keys: int | None = None, num_splits: int | None = None):
    """Same signature as the Triton wrapper: ``scale`` float or ``[B]``; the split arguments are ignored."""
    B, H, D = q.shape
    dtype = torch.promote_types(q.dtype, torch.float32)     # fp64 inputs stay fp64 (truth runs)
    out = torch.zeros((B, H, D), dtype=dtype, device=q.device)
    lse = torch.full((B, H), float("-inf"), dtype=dtype, device=q.device)
    scales = torch.as_tensor(scale, dtype=torch.float64).expand(B) if not torch.is_tensor(scale) or \
        scale.dim() == 0 else scale
    for b in range(B):
        start, end = int(key_start[b]), int(key_end[b])
        if end <= start:
            continue
        k = gather_keys(k_cache, block_tables[b], start, end)
        v = gather_keys(v_cache, block_tables[b], start, end)
        o_b, lse_b = attention_with_lse(q[b:b + 1], k, v, scale=float(scales[b]), causal=False)
        out[b] = o_b[0].to(dtype)
        lse[b] = lse_b[0].to(dtype)
    return out, lse
