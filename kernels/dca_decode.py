"""Paged DCA decode composed from the Triton kernels: three paged-attention calls per step (intra, succ, inter,
each with its own query rotation and key range) and one LSE merge (docs/algorithms.md#paged-decode). Keys are stored
rotated at ``j mod cl``; the YaRN factor is per sequence."""
from __future__ import annotations

import math

import torch

from longserve.kernels.dca import chunk_params
from longserve.kernels.dca_math import apply_rope, query_positions
from longserve.kernels.merge import merge_lse_stacked
from longserve.kernels.paged_attention import paged_attention_decode


def _yarn_scales(seq_lens: torch.Tensor, base: float, original_max: int) -> torch.Tensor:
    """Per-sequence softmax scale ``base * m(N)^2`` (fp64, on the lengths' device, no host readback) with N the
    sequence length including the new token: ``dca_math.yarn_mscale`` on device tensors."""
    n = seq_lens.to(torch.float64)
    if not original_max:
        return torch.full_like(n, base)
    m = torch.clamp(0.1 * torch.log(n / original_max) + 1.0, min=1.0)
    return base * m * m


def paged_dca_decode_triton(q, k_cache, v_cache, block_tables, seq_lens, *, rope_theta, chunk_size, local_size,
                            original_max_position_embeddings=0, scale=None, return_lse=False,
                            max_seq_len: int | None = None, scales: torch.Tensor | None = None):
    """One DCA decode step per sequence over the paged cache (keys stored rotated at ``j mod cl``).

    ``max_seq_len`` (host int, the largest ``seq_lens``) and ``scales`` (``[B]``, each sequence's full softmax
    scale, replacing ``scale`` and the YaRN factor) let a caller that prepared them once per step run every layer
    without a device->host sync; when ``max_seq_len`` is None it is read back here (one sync) and the lengths
    are validated.
    """
    if q.dim() != 3 or seq_lens.shape != (q.shape[0],):
        raise ValueError(f"expected q [B, H, D] and seq_lens [B]; got {tuple(q.shape)}, {tuple(seq_lens.shape)}")
    cl, chunk_size = chunk_params(chunk_size, local_size)
    B, H, D = q.shape
    lens = seq_lens.to(device=q.device, dtype=torch.int64)
    if max_seq_len is None:
        lo, max_seq_len = torch.stack(torch.aminmax(lens)).tolist() if B else (1, 0)
        if lo < 1:
            raise ValueError("every sequence needs at least its new token in the cache (seq_lens >= 1)")
    max_keys = int(max_seq_len) if B else 0
    if scales is None:
        base = 1.0 / math.sqrt(D) if scale is None else float(scale)
        scales = _yarn_scales(lens, base, original_max_position_embeddings)
    elif scales.shape != (B,):
        raise ValueError(f"scales must be [B={B}], got {tuple(scales.shape)}")
    scales = scales.to(q.device)
    t = lens - 1
    if cl is None:
        o, lse = paged_attention_decode(apply_rope(q, t, rope_theta), k_cache, v_cache, block_tables,
                                        torch.zeros_like(lens), lens, scale=scales, max_num_keys=max_keys)
        o = o.to(q.dtype)
        return (o, lse) if return_lse else o
    c = t // cl
    p_intra, p_succ, p_inter = query_positions(t, cl, chunk_size)
    zero = torch.zeros_like(lens)
    ranges = [                                  # (query positions, key start, key end, most keys)
        (p_intra, c * cl, lens, min(max_keys, cl)),
        (p_succ, torch.where(c >= 1, (c - 1) * cl, zero), torch.where(c >= 1, c * cl, zero), cl),
        (p_inter, zero, torch.where(c >= 2, (c - 1) * cl, zero), max_keys),
    ]
    o_parts = torch.empty((3, B, H, D), dtype=torch.float32, device=q.device)
    l_parts = torch.empty((3, B, H), dtype=torch.float32, device=q.device)
    for i, (pos, start, end, most) in enumerate(ranges):
        o_parts[i], l_parts[i] = paged_attention_decode(apply_rope(q, pos, rope_theta), k_cache, v_cache,
                                                        block_tables, start, end, scale=scales, max_num_keys=most)
    o, lse = merge_lse_stacked(o_parts, l_parts, out_dtype=q.dtype)
    return (o, lse) if return_lse else o
