"""Device index builder: (verticals, slashes) -> per-(head, query block) work lists (docs/algorithms.md#index-building).

Provenance: a Triton port of the sequential merge in vLLM's ``csrc/attention/vertical_slash_index.cu`` (itself
from MInference), one program per (query block, head) instead of one CUDA thread; the per-head counts play the
role of the "merge-head" variant. Semantics, sentinels and the causal / non-causal differences are exactly those
of the CPU reference ``longserve.kernels.reference.sparse_index.convert_vertical_slash_indexes``.

Inputs: ``vertical [H, NV]`` key columns, ``slash [H, NS]`` offsets (``key = off + row - s``), per-head valid
counts; entries past a head's count are ignored. The wrapper sorts each head's valid entries (verticals
ascending, slashes descending) on device, so callers may pass top-k order. Outputs are int32:
``block_count [H, R]``, ``block_offset [H, R, max(NS, 1)]``, ``column_count [H, R]``, ``column_index [H, R,
max(NV, 1)]``, ``R = ceil(q_len / block_m)``; entries past the counts are zero.
Limits: the loop is scalar per program (one warp); cost grows with NV + NS per query block.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from longserve.kernels.dispatch import launches_enabled

_INT32_MAX = 2**31 - 1
_INT32_MIN = -(2**31)


@triton.jit
def _save_blocks(BO, n_blocks, range_start, range_end, kv_len, BLOCK_N: tl.constexpr):
    """Append block starts range_start, +BLOCK_N, ... (< min(range_end, kv_len)); returns the new count."""
    end = tl.minimum(range_end, kv_len)
    for idx in range(range_start, end, BLOCK_N):
        tl.store(BO + n_blocks, idx)
        n_blocks += 1
    return n_blocks


@triton.jit
def _vs_index_kernel(
    VERT, VCOUNT, SLASH, SCOUNT,                          # [H, NV] asc, [H], [H, NS] desc, [H]
    BLOCK_COUNT, BLOCK_OFFSET, COLUMN_COUNT, COLUMN_INDEX,  # [H, R], [H, R, NB], [H, R], [H, R, NC]
    stride_vh, stride_sh, stride_bch, stride_boh, stride_bor, stride_cch, stride_cih, stride_cir,
    q_len, kv_len,
    CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    head = tl.program_id(1)
    kv = tl.full([], 0, tl.int64) + kv_len
    m0 = (tl.full([], 0, tl.int64) + pid_m) * BLOCK_M
    if CAUSAL:
        base = (kv - q_len) + m0 + BLOCK_M      # off + m1: a slash s lands row m1-1 on key base - 1 - s
    else:
        base = kv + m0 + BLOCK_M
    n_vert = tl.load(VCOUNT + head).to(tl.int64)
    n_slash = tl.load(SCOUNT + head).to(tl.int64)
    vert = VERT + head * stride_vh
    slash = SLASH + head * stride_sh
    bo = BLOCK_OFFSET + head * stride_boh + pid_m * stride_bor
    ci = COLUMN_INDEX + head * stride_cih + pid_m * stride_cir

    # first vertical (or the past-the-block sentinel when the head has none)
    v = tl.minimum(n_vert, 1)
    v_idx = tl.load(vert, mask=n_vert > 0, other=0).to(tl.int64)
    v_idx = tl.where(n_vert > 0, v_idx, base + BLOCK_N)

    # skip slashes whose band lies entirely left of key 0 for this block
    s = tl.minimum(n_slash, 1)
    s_val = tl.load(slash, mask=n_slash > 0, other=0).to(tl.int64)
    s_val = tl.where(n_slash > 0, s_val, base + 1)
    while (s_val >= base) & (s < n_slash):
        s_val = tl.load(slash + s).to(tl.int64)
        s += 1
    s_idx = tl.maximum(base - s_val, BLOCK_M)
    range_start = s_idx - BLOCK_M
    range_end = s_idx
    if s_val > base:                            # no usable slash: start from the sentinel range
        if CAUSAL:
            range_start = base
            range_end = base + BLOCK_N
        else:
            range_start = kv
            range_end = kv + BLOCK_N

    n_cols = tl.zeros([], tl.int32)
    n_blocks = tl.zeros([], tl.int32)
    finished = tl.zeros([], tl.int32)
    slash_done = tl.zeros([], tl.int32)
    while finished == 0:
        if v_idx < range_end:
            if v_idx < range_start:             # verticals inside the current band are covered already
                tl.store(ci + n_cols, v_idx.to(tl.int32))
                n_cols += 1
            if v < n_vert:
                v_idx = tl.load(vert + v).to(tl.int64)
                v += 1
            else:
                v_idx = base + BLOCK_N
        else:
            take = s < n_slash
            if not CAUSAL:
                nxt = tl.load(slash + s, mask=take, other=0).to(tl.int64)
                take = take & (nxt >= m0)
            if take:
                s_idx = tl.maximum(base - tl.load(slash + s).to(tl.int64), BLOCK_M)
                s += 1
            else:
                if CAUSAL:
                    # remaining verticals sit at/after the diagonal band: dropped
                    n_blocks = _save_blocks(bo, n_blocks, range_start, range_end, kv, BLOCK_N)
                    finished = 1
                else:
                    if v == n_vert:
                        if v_idx < kv:         # the pending last vertical
                            tl.store(ci + n_cols, v_idx.to(tl.int32))
                            n_cols += 1
                        n_blocks = _save_blocks(bo, n_blocks, range_start, range_end, kv, BLOCK_N)
                        finished = 1
                    else:
                        n_blocks = _save_blocks(bo, n_blocks, range_start, range_end, kv, BLOCK_N)
                        range_start = kv
                        range_end = kv + BLOCK_N
                        slash_done = 1
            if (finished == 0) & (slash_done == 0) & take:
                if s_idx > range_end + BLOCK_M:      # disjoint band: flush the current range
                    n_blocks = _save_blocks(bo, n_blocks, range_start, range_end, kv, BLOCK_N)
                    range_start = s_idx - BLOCK_M
                    range_end = s_idx
                elif s_idx > range_end:              # adjacent band: extend by one block
                    range_end += BLOCK_M

    tl.store(BLOCK_COUNT + head * stride_bch + pid_m, n_blocks)
    tl.store(COLUMN_COUNT + head * stride_cch + pid_m, n_cols)


def _sorted_valid(x: torch.Tensor, count: torch.Tensor, *, descending: bool) -> torch.Tensor:
    """Sort each head's first ``count`` entries; padding sorts last and is never read."""
    pad = _INT32_MIN if descending else _INT32_MAX
    width = x.shape[1]
    valid = torch.arange(width, device=x.device)[None, :] < count[:, None].to(torch.int64)
    x = torch.where(valid, x.to(torch.int64), torch.full_like(x, pad, dtype=torch.int64))
    return torch.sort(x, dim=1, descending=descending).values.to(torch.int32).contiguous()


def _check_counts(name: str, x: torch.Tensor, count: torch.Tensor, num_heads: int) -> torch.Tensor:
    if x.dim() != 2 or x.shape[0] != num_heads:
        raise ValueError(f"{name} must be [H={num_heads}, N], got {tuple(x.shape)}")
    if count.shape != (num_heads,):
        raise ValueError(f"{name}_count must be [H={num_heads}], got {tuple(count.shape)}")
    if x.dtype.is_floating_point or count.dtype.is_floating_point:
        raise ValueError(f"{name} and {name}_count must be integer tensors")
    if count.device.type == "cpu":              # a free check on the host; on a device it would stall the stream
        if bool(((count < 0) | (count > x.shape[1])).any()):
            raise ValueError(f"{name}_count must lie in [0, {x.shape[1]}]")
    count = count.to(device=x.device, dtype=torch.int32)
    return count.clamp(0, x.shape[1]).contiguous()   # device counts: never read past the list, no sync


def convert_vertical_slash_indexes(vertical, vertical_count, slash, slash_count, q_len: int, kv_len: int, *,
                                   causal: bool, block_m: int = 64, block_n: int = 64):
    """(V, S) -> (block_count, block_offset, column_count, column_index), int32, on the inputs' device."""
    if q_len < 0 or kv_len < 0:
        raise ValueError(f"q_len and kv_len must be >= 0, got {q_len}, {kv_len}")
    if block_m <= 0 or block_n <= 0 or block_m & (block_m - 1) or block_n & (block_n - 1):
        raise ValueError(f"block sizes must be powers of two, got {block_m}, {block_n}")
    if vertical.device != slash.device:
        raise ValueError("vertical and slash must be on the same device")
    num_heads = vertical.shape[0] if vertical.dim() == 2 else -1
    vertical_count = _check_counts("vertical", vertical, vertical_count, num_heads)
    slash_count = _check_counts("slash", slash, slash_count, num_heads)
    device = vertical.device
    R = triton.cdiv(q_len, block_m)
    nb, nc = max(slash.shape[1], 1), max(vertical.shape[1], 1)
    block_count = torch.zeros((num_heads, R), dtype=torch.int32, device=device)
    block_offset = torch.zeros((num_heads, R, nb), dtype=torch.int32, device=device)
    column_count = torch.zeros((num_heads, R), dtype=torch.int32, device=device)
    column_index = torch.zeros((num_heads, R, nc), dtype=torch.int32, device=device)
    if R == 0 or num_heads == 0:
        return block_count, block_offset, column_count, column_index
    vert = _sorted_valid(vertical, vertical_count, descending=False) if vertical.shape[1] else \
        torch.zeros((num_heads, 1), dtype=torch.int32, device=device)
    sl = _sorted_valid(slash, slash_count, descending=True) if slash.shape[1] else \
        torch.zeros((num_heads, 1), dtype=torch.int32, device=device)
    if launches_enabled():
        _vs_index_kernel[(R, num_heads)](
            vert, vertical_count, sl, slash_count, block_count, block_offset, column_count, column_index,
            vert.stride(0), sl.stride(0), block_count.stride(0), block_offset.stride(0), block_offset.stride(1),
            column_count.stride(0), column_index.stride(0), column_index.stride(1),
            q_len, kv_len, CAUSAL=bool(causal), BLOCK_M=block_m, BLOCK_N=block_n, num_warps=1,
        )
    return block_count, block_offset, column_count, column_index
