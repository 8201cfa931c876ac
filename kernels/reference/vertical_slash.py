"""Reference twin of ``longserve.kernels.vertical_slash``: attention over the same work lists, same semantics.

``vertical_slash_attention`` scores, per (head, 64-row query block), keys ``[b, b + 64)`` of every listed block
start and every listed column, with ``key < n_k`` and, in causal mode, the bottom-right mask ``key <= (n_k - n_q) +
row``; a key listed twice is scored twice, as in the kernel (it runs ``sparse_dca.tile_attention``).
``covered_mask`` gives the covered pair set as a dense boolean mask (a set: duplicates collapse), for tests and
checks on row samples. Same signatures as the Triton module; fp64-capable, CPU or GPU.
"""
from __future__ import annotations

import math

import torch

from longserve.kernels.reference.attention import attention_with_lse, check_shapes

BLOCK_M = 64
BLOCK_N = 64


def _block_masks(kv_len: int, block_count, block_offset, column_count, column_index) -> torch.Tensor:
    """Bool ``[H, R, kv_len]``: keys listed for each (head, query block), before any causal mask."""
    H, R = block_count.shape
    device = block_count.device
    if H * R:                                   # only the used part of the padded lists is expanded
        block_offset = block_offset[:, :, :max(1, int(block_count.max()))]
        column_index = column_index[:, :, :max(1, int(column_count.max()))]
    per_block = torch.zeros((H, R, kv_len + 1), dtype=torch.bool, device=device)   # last slot: discarded
    listed = torch.arange(block_offset.shape[2], device=device)[None, None, :] < block_count[:, :, None]
    keys = block_offset.to(torch.int64)[:, :, :, None] + torch.arange(BLOCK_N, device=device)
    ok = listed[..., None] & (keys >= 0) & (keys < kv_len)
    per_block.scatter_(2, torch.where(ok, keys, torch.full_like(keys, kv_len)).reshape(H, R, -1), True)
    listed = torch.arange(column_index.shape[2], device=device)[None, None, :] < column_count[:, :, None]
    cols = column_index.to(torch.int64)
    ok = listed & (cols >= 0) & (cols < kv_len)
    per_block.scatter_(2, torch.where(ok, cols, torch.full_like(cols, kv_len)), True)
    return per_block[:, :, :kv_len]


def covered_mask(q_len: int, kv_len: int, block_count, block_offset, column_count, column_index, *,
                 causal: bool, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Bool ``[H, q_len, kv_len]`` of the pairs the kernel computes for these work lists.

    ``rows`` (query indices) restricts the result to ``[H, len(rows), kv_len]`` so long inputs can be checked
    on a row sample (only the query blocks of those rows are expanded).
    """
    R = block_count.shape[1]
    if R != math.ceil(q_len / BLOCK_M):
        raise ValueError(f"work lists have {R} query blocks, q_len {q_len} needs {math.ceil(q_len / BLOCK_M)}")
    device = block_count.device
    if rows is None:
        rows = torch.arange(q_len, device=device)
        mask = _block_masks(kv_len, block_count, block_offset, column_count, column_index)[:, rows // BLOCK_M]
    else:
        rows = rows.to(device=device, dtype=torch.int64)
        blocks, inverse = torch.unique(rows // BLOCK_M, return_inverse=True)
        lists = [t[:, blocks] for t in (block_count, block_offset, column_count, column_index)]
        mask = _block_masks(kv_len, *lists)[:, inverse]
    if causal:
        allowed = torch.arange(kv_len, device=device)[None, :] <= (kv_len - q_len) + rows[:, None]
        mask = mask & allowed[None]
    return mask


def vertical_slash_attention(q, k, v, block_count, block_offset, column_count, column_index, *,
                             scale: float, causal: bool):
    """Work-list attention with the kernel's semantics; returns (O like q, LSE [n_q, H], fp32 or fp64)."""
    from longserve.kernels.kv_source import ContiguousKV
    from longserve.kernels.reference.sparse_dca import tile_attention

    check_shapes(q, k, v)
    R = math.ceil(q.shape[0] / BLOCK_M)
    for name, t in (("block_count", block_count), ("block_offset", block_offset), ("column_count", column_count),
                    ("column_index", column_index)):
        if tuple(t.shape[:2]) != (q.shape[1], R):
            raise ValueError(f"{name} must start with [H={q.shape[1]}, R={R}], got {tuple(t.shape)}")
    lists = (block_count, block_offset, column_count, column_index)
    out, lse = tile_attention(q, ContiguousKV(k, v), 0, k.shape[0], lists, scale=scale, causal=causal)
    return out.to(q.dtype), lse


def dense_attention(q, k, v, *, scale: float, causal: bool):
    """Twin of the Triton dense path (full causal bottom-right or non-causal attention)."""
    return attention_with_lse(q, k, v, scale=scale, causal=causal)
