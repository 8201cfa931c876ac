"""Vertical-slash DCA prefill on the reference path, computing exactly what the Triton kernel computes.

One sparse semantics for both paths: the selection (estimation, region split) is turned into the kernel's work
lists by ``convert_vertical_slash_indexes`` (the reference builder; it matches the device one), and each
(head, 64-row query block) attends the keys ``[start, start + 64)`` of every listed block start plus every listed
column, with ``0 <= key < region length`` and, in the causal intra region, ``key <= off + row``. That is a
superset of the exact mask ``j in V or t - j in S`` (whole tiles around each diagonal). A key the lists name
twice for one block (a column that falls inside a listed block) enters the softmax twice, as it does in the
kernel's two phases.

CPU cost: per group of query blocks the listed keys are compacted per head (``bc * 64`` block keys, then the
columns), gathered straight from the key source (a contiguous tensor or the paged cache; only the keys the lists
name are read) and scored with one batched matmul. Groups bound the gathered keys and scores, so memory does not
grow with the context, and work scales with the listed tiles, not with ``n_q * n_k``.
"""
from __future__ import annotations

import torch

from longserve.kernels.dca_math import dense_regions, work_dtype
from longserve.kernels.estimation import estimate_dca_selection, split_regions
from longserve.kernels.kv_source import PagedKV
from longserve.kernels.pair_stats import PairStats, region_pairs, selected_pair_count
from longserve.kernels.reference.attention import masked_exp, merge_lse
from longserve.kernels.reference.sparse_index import convert_vertical_slash_indexes

BLOCK = 64
GATHER_ELEMENTS = 1 << 24    # gathered keys ([H, blocks, keys, D]) and scores per group of query blocks


def read_entries(src, pos: torch.Tensor, kv_head: torch.Tensor):
    """(k, v) rows at absolute positions ``pos`` for the broadcast KV head ids ``kv_head``: ``[..., D]``."""
    if isinstance(src, PagedKV):
        bs = src.block_size
        blocks = src.block_table.to(pos.device).long()[pos // bs]
        return src.k_cache[blocks, pos % bs, kv_head], src.v_cache[blocks, pos % bs, kv_head]
    return src.k[pos, kv_head], src.v[pos, kv_head]


def listed_keys(block_count, block_offset, column_count, column_index, width: int):
    """Compacted keys ``[H, Rs, width]`` of each (head, query block): the listed blocks' 64 keys in list order,
    then the listed columns; returns (keys, listed) with ``listed`` False on padding."""
    p = torch.arange(width, device=block_count.device)
    n_block_keys = (block_count.to(torch.int64) * BLOCK)[..., None]
    total = n_block_keys + column_count.to(torch.int64)[..., None]
    nb, nc = block_offset.shape[-1], column_index.shape[-1]
    blk = (p // BLOCK).clamp(max=nb - 1).expand(*block_count.shape, width)
    col = (p - n_block_keys).clamp(0, nc - 1)
    from_block = torch.gather(block_offset.to(torch.int64), 2, blk) + p % BLOCK
    from_col = torch.gather(column_index.to(torch.int64), 2, col)
    keys = torch.where(p < n_block_keys, from_block, from_col)
    return keys, p < total


def _sub_group(widths: torch.Tensor, limit: int) -> int:
    """How many leading blocks to take: padded size (blocks x widest) within ``limit`` and padding <= ~20%."""
    cm = torch.cummax(widths, dim=0).values
    n = torch.arange(1, widths.numel() + 1, device=widths.device)
    ok = (n * cm <= limit) & (cm <= widths[0] * 1.2 + BLOCK)
    return max(1, int(ok.to(torch.int64).cumprod(dim=0).sum()))


def tile_attention(q, src, lo: int, hi: int, lists, *, scale: float, causal: bool, stats: PairStats | None = None):
    """Work-list attention of one region -> (O, LSE) in the work dtype, the Triton kernel's semantics.

    q ``[n_q, H, D]`` rotated for this region; keys/values are positions ``[lo, hi)`` of ``src`` (a
    ``ContiguousKV`` or ``PagedKV``); ``lists`` = (block_count, block_offset, column_count, column_index) in
    region-local key indices. Causal regions are bottom-right aligned (``off = n_k - n_q``).
    """
    n_q, H, D = q.shape
    block_count, block_offset, column_count, column_index = (t.to(q.device) for t in lists)
    kv = hi - lo
    wd = work_dtype(q.dtype)
    out = torch.zeros((n_q, H, src.v_cache.shape[-1] if isinstance(src, PagedKV) else src.v.shape[-1]),
                      dtype=wd, device=q.device)
    lse = torch.full((n_q, H), float("-inf"), dtype=wd, device=q.device)
    if n_q == 0 or kv == 0:
        return out, lse
    Dv = out.shape[-1]
    G = (src.k_cache if isinstance(src, PagedKV) else src.k).shape[-2]
    kv_head = (torch.arange(H, device=q.device) // (H // G))[:, None, None]
    off = kv - n_q
    R = -(-n_q // BLOCK)
    q_pad = torch.zeros((R * BLOCK, H, D), dtype=wd, device=q.device)
    q_pad[:n_q] = q.to(wd) * scale                                               # logits come out scaled
    qb = q_pad.view(R, BLOCK, H, D).permute(2, 0, 1, 3)                          # [H, R, 64, D]
    widths = (block_count.to(torch.int64) * BLOCK + column_count).amax(dim=0).clamp(min=1)   # [R]
    limit = GATHER_ELEMENTS // (H * max(D, Dv, BLOCK))
    r0 = 0
    while r0 < R:
        r1 = r0 + _sub_group(widths[r0:], limit)
        width = int(widths[r0:r1].max())
        keys, ok = listed_keys(block_count[:, r0:r1], block_offset[:, r0:r1], column_count[:, r0:r1],
                               column_index[:, r0:r1], width)                     # [H, Rs, K]
        ok &= (keys >= 0) & (keys < kv)
        rows = torch.arange(r0 * BLOCK, r1 * BLOCK, device=q.device).view(r1 - r0, BLOCK)   # [Rs, 64]
        allowed = ok[:, :, None, :] & (rows < n_q)[None, :, :, None]             # [H, Rs, 64, K]
        if causal:
            allowed &= keys[:, :, None, :] <= (off + rows)[None, :, :, None]
        kk, vv = read_entries(src, lo + torch.where(ok, keys, 0), kv_head)       # [H, Rs, K, D]
        scores = torch.matmul(qb[:, r0:r1], kk.to(wd).transpose(-1, -2))         # [H, Rs, 64, K]
        if stats is not None:
            stats.computed = stats.computed + allowed.sum()
        e, total, l_ = masked_exp(scores, allowed)
        o = torch.matmul(e, vv.to(wd)).div_(total)                               # [H, Rs, 64, Dv]
        take = min(r1 * BLOCK, n_q) - r0 * BLOCK
        out[r0 * BLOCK:r0 * BLOCK + take] = o.permute(1, 2, 0, 3).reshape(-1, H, Dv)[:take]
        lse[r0 * BLOCK:r0 * BLOCK + take] = l_.permute(1, 2, 0).reshape(-1, H)[:take]
        r0 = r1
    return out, lse


def sparse_subblock(q_rows, src, *, b: int, e: int, P: int, cl, chunk_size, rope_theta, tau: float, budgets,
                    stats: PairStats | None = None):
    """Estimate (docs/algorithms.md#vs-estimation, docs/algorithms.md#region-split), build the work lists and run the
    regions of sub-block ``[b, e)``; LSE-merged (O, LSE). ``src`` holds the keys (stored rotated) and values of
    positions ``[0, e)`` at least."""
    sel = estimate_dca_selection(q_rows, src, b=b, e=e, P=P, cl=cl, chunk_size=chunk_size,
                                 rope_theta=rope_theta, tau=tau, budgets=budgets)
    parts = []
    H = q_rows.shape[1]
    for idx, (qr, lo, hi, causal) in zip(split_regions(sel, b=b, e=e, P=P, cl=cl),
                                         dense_regions(q_rows, P, e, b, cl, chunk_size, rope_theta)):
        lists = convert_vertical_slash_indexes(idx.vertical, idx.vertical_count, idx.slash, idx.slash_count,
                                               e - b, hi - lo, causal=causal)
        parts.append(tile_attention(qr, src, lo, hi, lists, scale=tau, causal=causal, stats=stats))
        if stats is not None:
            stats.causal = stats.causal + region_pairs(e - b, hi - lo, causal, H)
            if stats.selected is not None:
                stats.selected = stats.selected + selected_pair_count(idx, e - b)
    return parts[0] if len(parts) == 1 else merge_lse(parts)
