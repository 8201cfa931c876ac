"""(verticals, slashes) -> sparse-kernel work lists, the scalar merge of docs/algorithms.md#index-building, one query
block at a time.

This is the readable truth for the device index builder (``longserve.kernels.sparse_index``); it loops in Python
and is meant for test-sized inputs. Conventions: a slash value ``s`` maps query row ``r`` to key ``off + r - s``
with ``off = kv_len - q_len`` (causal) or ``off = kv_len`` (non-causal: the query block is treated as if it
followed the keys). Each head's first ``count`` entries are used (sorted here: verticals ascending, slashes
descending); entries past the count are ignored. Outputs are int32 ``block_count [H, R]``, ``block_offset
[H, R, max(NS, 1)]``, ``column_count [H, R]``, ``column_index [H, R, max(NV, 1)]`` with ``R = ceil(q_len /
block_m)``; unused slots are 0.
"""
from __future__ import annotations

import torch


def _valid_sorted(x: torch.Tensor, count: torch.Tensor, h: int, *, descending: bool) -> list[int]:
    n = int(count[h])
    return sorted((int(a) for a in x[h, :n].tolist()), reverse=descending)


def _block_lists(verts: list[int], slashes: list[int], m0: int, q_len: int, kv_len: int, causal: bool,
                 bm: int, bn: int):
    """(block starts, columns) for the query block starting at row m0."""
    off = kv_len - q_len if causal else kv_len
    m1 = m0 + bm
    base = off + m1                                  # slash s puts row m1 - 1 on key base - 1 - s
    past_block = base + bn                           # vertical sentinel: beyond anything this block reads
    blocks: list[int] = []
    cols: list[int] = []

    def emit(lo: int, hi: int) -> None:
        for start in range(lo, min(hi, kv_len), bn):
            blocks.append(start)

    v_pos = 0
    v_idx = verts[0] if verts else past_block
    v_pos = 1 if verts else 0
    s_pos = 0
    s_val = slashes[0] if slashes else base + 1
    s_pos = 1 if slashes else 0
    while s_val >= base and s_pos < len(slashes):    # bands entirely left of key 0 for this block
        s_val = slashes[s_pos]
        s_pos += 1
    if s_val > base:                                 # no usable slash: sentinel range
        start = base if causal else kv_len
        range_start, range_end = start, start + bn
    else:                                            # s_val == base lands on [0, bm)
        e = max(base - s_val, bm)
        range_start, range_end = e - bm, e
    while True:
        if v_idx < range_end:
            if v_idx < range_start:                  # inside the band it is covered already
                cols.append(v_idx)
            if v_pos < len(verts):
                v_idx = verts[v_pos]
                v_pos += 1
            else:
                v_idx = past_block
            continue
        take = s_pos < len(slashes) and (causal or slashes[s_pos] >= m0)
        if take:
            e = max(base - slashes[s_pos], bm)
            s_pos += 1
            if e > range_end + bm:                   # disjoint band: flush
                emit(range_start, range_end)
                range_start, range_end = e - bm, e
            elif e > range_end:                      # adjacent band: extend
                range_end += bm
            continue
        if causal:                                   # remaining verticals are at/after the diagonal band
            emit(range_start, range_end)
            break
        if v_pos == len(verts):                      # verticals exhausted: the pending one, then the range
            if v_idx < kv_len:
                cols.append(v_idx)
            emit(range_start, range_end)
            break
        emit(range_start, range_end)                 # keep draining verticals against the sentinel range
        range_start, range_end = kv_len, kv_len + bn
    return blocks, cols


def convert_vertical_slash_indexes(vertical, vertical_count, slash, slash_count, q_len: int, kv_len: int, *,
                                   causal: bool, block_m: int = 64, block_n: int = 64):
    """Work lists for ``vertical [H, NV]`` (key columns) and ``slash [H, NS]`` (offsets) with per-head counts."""
    if q_len < 0 or kv_len < 0:
        raise ValueError(f"q_len and kv_len must be >= 0, got {q_len}, {kv_len}")
    if block_m <= 0 or block_n <= 0:
        raise ValueError(f"block sizes must be positive, got {block_m}, {block_n}")
    if vertical.dim() != 2 or slash.dim() != 2 or vertical.shape[0] != slash.shape[0]:
        raise ValueError(f"vertical and slash must be [H, N] with the same H, got {tuple(vertical.shape)}, "
                         f"{tuple(slash.shape)}")
    H = vertical.shape[0]
    for name, x, c in (("vertical", vertical, vertical_count), ("slash", slash, slash_count)):
        if tuple(c.shape) != (H,):
            raise ValueError(f"{name}_count must be [{H}], got {tuple(c.shape)}")
        if bool(((c < 0) | (c > x.shape[1])).any()):
            raise ValueError(f"{name}_count must lie in [0, {x.shape[1]}]")
    R = -(-q_len // block_m)
    nb, nc = max(slash.shape[1], 1), max(vertical.shape[1], 1)
    block_count = torch.zeros((H, R), dtype=torch.int32)
    block_offset = torch.zeros((H, R, nb), dtype=torch.int32)
    column_count = torch.zeros((H, R), dtype=torch.int32)
    column_index = torch.zeros((H, R, nc), dtype=torch.int32)
    vertical, slash = vertical.cpu(), slash.cpu()
    for h in range(H):
        verts = _valid_sorted(vertical, vertical_count, h, descending=False)
        slashes = _valid_sorted(slash, slash_count, h, descending=True)
        for r in range(R):
            blocks, cols = _block_lists(verts, slashes, r * block_m, q_len, kv_len, causal, block_m, block_n)
            if len(blocks) > nb or len(cols) > nc:
                raise ValueError(f"head {h} block {r}: {len(blocks)} blocks / {len(cols)} columns exceed the "
                                 f"buffers ({nb}, {nc})")
            block_count[h, r], column_count[h, r] = len(blocks), len(cols)
            block_offset[h, r, :len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
            column_index[h, r, :len(cols)] = torch.tensor(cols, dtype=torch.int32)
    device = vertical_count.device
    return block_count.to(device), block_offset.to(device), column_count.to(device), column_index.to(device)
