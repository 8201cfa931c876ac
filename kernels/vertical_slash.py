"""Flash-attention forward over vertical-slash work lists (and its dense special case), with LSE.

Provenance: the two-phase structure of MInference's Triton VS kernel (docs/algorithms.md#sparse-kernel) rewritten for
LongServe: natural-log LSE output, causal (bottom-right aligned) and non-causal modes, GQA by indexing KV head
``h // group`` (K/V are never repeated), ``O = 0, LSE = -inf`` for rows without keys, pointer arithmetic only.

Shapes: q ``[n_q, H, D]``, k/v ``[n_k, G, D]``; work lists per (head, 64-row query block) as produced by
``convert_vertical_slash_indexes``: ``block_count [H, R]``, ``block_offset [H, R, NB]`` (key-block starts, not
aligned to 64), ``column_count [H, R]``, ``column_index [H, R, NC]``, ``R = ceil(n_q / 64)``.
Phase 1 attends keys ``[b, b + 64)`` of each listed block start ``b`` (causal mask ``key <= off + row`` with
``off = n_k - n_q``, and ``key < n_k``); phase 2 gathers the listed columns 64 at a time. Columns get the same
causal mask (a no-op for lists built as in docs/algorithms.md#index-building, whose causal columns lie before the
block's first row). Limits: any head dim (padded to a power of two internally, >= 16); fp32 / fp16 / bf16 inputs,
softmax in fp32, base-2 exponentials internally; the dense path (``dense_attention``) walks all causal key blocks itself
and may use larger query tiles.

Key sources (``*_kv`` entries): the kernel's key range ``[0, n_k)`` is keys ``[lo, hi)`` of one sequence, read
either from contiguous ``[n, G, D]`` tensors (row ``lo + col``) or straight from a paged cache ``[num_blocks,
PAGE, G, D]`` through the sequence's block table (position ``p = lo + col`` lives at page
``block_table[p // PAGE]``, slot ``p % PAGE``); ``PAGE`` is a power of two. Addresses are int64.

Pair counting (``pair_count=``): **computed pairs** = the (query row, key) pairs the kernel scores with the
key valid and causally visible, i.e. over every key tile a program processes (each listed block start's 64
keys, each 64-wide chunk of listed columns, or every tile of the dense walk), the count of (row, key) with
``row < n_q``, ``0 <= key < n_k``, the column slot actually listed (``c < column_count``), and in causal mode
``key <= n_k - n_q + row``. Keys listed twice (overlapping block ranges, a column inside a listed block, a
column repeated) count twice: this is work done, not a set size. Dense attention's count therefore equals the
causal (or full-rectangle) pair count exactly. Each program writes its count to an int32 ``[H, R]`` buffer
(no atomics); the wrapper sums it on the device into the caller's 0-dim int64 tensor.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from longserve.kernels.dispatch import launches_enabled
from longserve.kernels.kv_source import ContiguousKV, PagedKV

BLOCK_M = 64
BLOCK_N = 64
_LOG2E = 1.4426950408889634
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    """fp32 inputs use exact IEEE products (no TF32); fp16/bf16 use tensor cores with fp32 accumulation."""
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _online_step(acc, m_i, l_i, q, kT, v, qk_scale, mask, USE_MASK: tl.constexpr, IEEE: tl.constexpr):
    """One online-softmax update with a [BLOCK_N] key tile; scores are in base-2 units."""
    qk = _dot(q, kT, IEEE) * qk_scale
    if USE_MASK:
        qk = tl.where(mask, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)   # a row with no key so far stays all-zero
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(qk - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE)
    return acc, m_new, l_i


@triton.jit
def _key_rows(cols, ok, BLOCK_TABLE, key_start, PAGED: tl.constexpr, PAGE: tl.constexpr):
    """(major, minor) int64 address terms of key columns ``cols`` (region-local): contiguous mode reads row
    ``key_start + col`` of a ``[n, G, D]`` tensor (minor 0); paged mode reads the physical page and slot of
    sequence position ``key_start + col`` through the block table (masked lanes read page 0)."""
    pos = key_start + cols.to(tl.int64)
    if PAGED:
        phys = tl.load(BLOCK_TABLE + pos // PAGE, mask=ok, other=0).to(tl.int64)
        return phys, pos % PAGE
    else:
        return pos, tl.zeros_like(pos)


@triton.jit
def _tile(k_base, v_base, cols, col_ok, d_ok, BLOCK_TABLE, key_start,
          stride_k0, stride_k1, stride_v0, stride_v1, PAGED: tl.constexpr, PAGE: tl.constexpr):
    """K^T ``[BLOCK_D, BLOCK_N]`` and V ``[BLOCK_N, BLOCK_D]`` tiles of the key columns ``cols``."""
    major, minor = _key_rows(cols, col_ok, BLOCK_TABLE, key_start, PAGED, PAGE)
    kT = tl.load(k_base + major[None, :] * stride_k0 + minor[None, :] * stride_k1,
                 mask=col_ok[None, :] & d_ok[:, None], other=0.0)
    vv = tl.load(v_base + major[:, None] * stride_v0 + minor[:, None] * stride_v1,
                 mask=col_ok[:, None] & d_ok[None, :], other=0.0)
    return kT, vv


@triton.jit
def _vs_attn_fwd_kernel(
    Q, K, V, Out, LSE,                                      # q [n_q, H, D]; k, v [n, G, D] or [blocks, PAGE, G, D]
    BLOCK_COUNT, BLOCK_OFFSET, COLUMN_COUNT, COLUMN_INDEX,  # [H, R], [H, R, NB], [H, R], [H, R, NC]
    BLOCK_TABLE, PAIRS,                                     # int32 [pages] (paged mode); int32 [H, R] (COUNT)
    stride_qm, stride_qh, stride_k0, stride_k1, stride_kh, stride_v0, stride_v1, stride_vh,
    stride_om, stride_oh, stride_lm, stride_lh,
    stride_bch, stride_bcr, stride_boh, stride_bor, stride_cch, stride_ccr, stride_cih, stride_cir,
    stride_ph, q_len, kv_len, key_start, group, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, DENSE: tl.constexpr, IEEE: tl.constexpr,
    PAGED: tl.constexpr, PAGE: tl.constexpr, COUNT: tl.constexpr,
):
    pid_m = tl.program_id(0)
    if CAUSAL:
        pid_m = tl.num_programs(0) - 1 - pid_m  # heaviest (last) query blocks first: better tail balance
    head = tl.program_id(1)
    kv_head = head // group
    off = kv_len - q_len                       # bottom-right alignment (causal only)
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    rows64 = offs_m.to(tl.int64)               # n_q * H * D can exceed 2**31 at 1M tokens
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    row_ok = offs_m < q_len
    d_ok = offs_d < HEAD_DIM

    q = tl.load(Q + rows64[:, None] * stride_qm + head * stride_qh + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    k_base = K + kv_head * stride_kh + offs_d[:, None]
    v_base = V + kv_head * stride_vh + offs_d[None, :]
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    limit = off + offs_m                       # last visible key per row (causal)
    pairs = tl.zeros([], tl.int32)             # per program: at most BLOCK_M x kv_len, well below 2**31
    n_rows = tl.sum(row_ok.to(tl.int32))

    if DENSE:
        if CAUSAL:
            hi = tl.minimum(kv_len, off + m0 + BLOCK_M)
            n_full = tl.maximum(tl.minimum(off + m0 + 1, kv_len), 0) // BLOCK_N
        else:
            hi = kv_len
            n_full = kv_len // BLOCK_N
        all_cols = offs_n >= 0
        for i in range(0, n_full):             # blocks every row sees entirely: no mask
            cols = i * BLOCK_N + offs_n
            kT, vv = _tile(k_base, v_base, cols, all_cols, d_ok, BLOCK_TABLE, key_start,
                           stride_k0, stride_k1, stride_v0, stride_v1, PAGED, PAGE)
            acc, m_i, l_i = _online_step(acc, m_i, l_i, q, kT, vv, qk_scale, None, False, IEEE)
        if COUNT:
            pairs += n_rows * tl.maximum(n_full, 0) * BLOCK_N
        for start in range(n_full * BLOCK_N, hi, BLOCK_N):
            cols = start + offs_n
            col_ok = cols < kv_len
            kT, vv = _tile(k_base, v_base, cols, col_ok, d_ok, BLOCK_TABLE, key_start,
                           stride_k0, stride_k1, stride_v0, stride_v1, PAGED, PAGE)
            mask = col_ok[None, :]
            if CAUSAL:
                mask = mask & (cols[None, :] <= limit[:, None])
            acc, m_i, l_i = _online_step(acc, m_i, l_i, q, kT, vv, qk_scale, mask, True, IEEE)
            if COUNT:
                pairs += tl.sum((mask & row_ok[:, None]).to(tl.int32))
    else:
        n_blocks = tl.load(BLOCK_COUNT + head * stride_bch + pid_m * stride_bcr)
        bo_base = BLOCK_OFFSET + head * stride_boh + pid_m * stride_bor
        for i in range(0, n_blocks):
            start = tl.load(bo_base + i)
            cols = start + offs_n
            col_ok = (cols < kv_len) & (cols >= 0)
            kT, vv = _tile(k_base, v_base, cols, col_ok, d_ok, BLOCK_TABLE, key_start,
                           stride_k0, stride_k1, stride_v0, stride_v1, PAGED, PAGE)
            mask = col_ok[None, :]
            if CAUSAL:
                mask = mask & (cols[None, :] <= limit[:, None])
            acc, m_i, l_i = _online_step(acc, m_i, l_i, q, kT, vv, qk_scale, mask, True, IEEE)
            if COUNT:
                pairs += tl.sum((mask & row_ok[:, None]).to(tl.int32))
        n_cols = tl.load(COLUMN_COUNT + head * stride_cch + pid_m * stride_ccr)
        ci_base = COLUMN_INDEX + head * stride_cih + pid_m * stride_cir
        for c0 in range(0, n_cols, BLOCK_N):
            listed = (c0 + offs_n) < n_cols
            cols = tl.load(ci_base + c0 + offs_n, mask=listed, other=0)
            col_ok = listed & (cols < kv_len) & (cols >= 0)
            kT, vv = _tile(k_base, v_base, cols, col_ok, d_ok, BLOCK_TABLE, key_start,
                           stride_k0, stride_k1, stride_v0, stride_v1, PAGED, PAGE)
            mask = col_ok[None, :]
            if CAUSAL:
                mask = mask & (cols[None, :] <= limit[:, None])
            acc, m_i, l_i = _online_step(acc, m_i, l_i, q, kT, vv, qk_scale, mask, True, IEEE)
            if COUNT:
                pairs += tl.sum((mask & row_ok[:, None]).to(tl.int32))

    has_keys = l_i > 0.0
    out = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    lse = tl.where(has_keys, (m_i + tl.log2(tl.where(has_keys, l_i, 1.0))) * 0.6931471805599453,
                   float("-inf"))
    tl.store(Out + rows64[:, None] * stride_om + head * stride_oh + offs_d[None, :],
             out.to(Out.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    tl.store(LSE + offs_m * stride_lm + head * stride_lh, lse, mask=row_ok)
    if COUNT:
        tl.store(PAIRS + head * stride_ph + pid_m, pairs)


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> int:
    """Validate the contract shapes; returns the GQA group size."""
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(f"expected q [n_q, H, D] and k, v [n_k, G, D], got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k and v shapes differ: {tuple(k.shape)} vs {tuple(v.shape)}")
    return _check_heads(q, k)


def _check_heads(q: torch.Tensor, k: torch.Tensor) -> int:
    """q ``[n_q, H, D]`` against a K layout whose last two dims are ``[G, D]``; returns the group size."""
    if q.shape[2] != k.shape[-1]:
        raise ValueError(f"head dims differ: q {q.shape[2]} vs k {k.shape[-1]}")
    if k.shape[-2] == 0 or q.shape[1] % k.shape[-2] != 0:
        raise ValueError(f"query heads {q.shape[1]} are not a multiple of KV heads {k.shape[-2]}")
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16) or k.dtype != q.dtype:
        raise ValueError(f"q, k, v must share one of fp32/fp16/bf16, got {q.dtype}, {k.dtype}")
    if q.device != k.device:
        raise ValueError("q, k and v must be on the same device")
    return q.shape[1] // k.shape[-2]


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _outputs(q: torch.Tensor, out: torch.Tensor | None, lse_out: torch.Tensor | None):
    n_q, H, D = q.shape
    if out is None:
        out = torch.empty_like(q)
    elif out.shape != q.shape or out.stride(-1) != 1:
        raise ValueError(f"out must be {tuple(q.shape)} with a contiguous last dim")
    if lse_out is None:
        lse_out = torch.empty((n_q, H), dtype=torch.float32, device=q.device)
    elif lse_out.shape != (n_q, H) or lse_out.dtype != torch.float32:
        raise ValueError(f"lse_out must be fp32 {(n_q, H)}")
    return out, lse_out


def _key_layout(kv, lo: int, hi: int):
    """Kernel view of keys ``[lo, hi)`` of a KV source: (k, v, block table, page, strides, paged).

    ``ContiguousKV`` (or a plain ``(k, v)`` pair) is read as rows ``lo + col`` of ``[n, G, D]`` tensors; a
    ``PagedKV`` through its block table, the caches staying where they are (nothing is gathered)."""
    if isinstance(kv, PagedKV):
        kc, vc, table = kv.k_cache, kv.v_cache, kv.block_table
        if kc.dim() != 4 or vc.shape != kc.shape:
            raise ValueError(f"paged caches must be [num_blocks, PAGE, G, D] alike, got {tuple(kc.shape)}, "
                             f"{tuple(vc.shape)}")
        page = kc.shape[1]
        if page <= 0 or page & (page - 1):
            raise ValueError(f"page size must be a power of two, got {page}")
        if table.dim() != 1 or table.dtype not in (torch.int32, torch.int64) or table.device != kc.device:
            raise ValueError(f"block_table must be a 1-D int32/int64 tensor on {kc.device}, got {table.dtype} "
                             f"{tuple(table.shape)} on {table.device}")
        if not 0 <= lo <= hi <= min(kv.length, table.shape[0] * page):
            raise ValueError(f"key range [{lo}, {hi}) outside the sequence's {kv.length} cached keys")
        kc, vc = _last_dim_contiguous(kc), _last_dim_contiguous(vc)
        table = table if table.dtype == torch.int32 and table.stride(0) == 1 else table.to(torch.int32).contiguous()
        return kc, vc, table, page, (kc.stride(0), kc.stride(1), kc.stride(2)), \
            (vc.stride(0), vc.stride(1), vc.stride(2)), True
    k, v = (kv.k, kv.v) if isinstance(kv, ContiguousKV) else kv
    if k.dim() != 3 or v.shape != k.shape:
        raise ValueError(f"expected k, v [n_k, G, D] alike, got {tuple(k.shape)}, {tuple(v.shape)}")
    if not 0 <= lo <= hi <= k.shape[0]:
        raise ValueError(f"key range [{lo}, {hi}) outside the {k.shape[0]} keys")
    k, v = _last_dim_contiguous(k), _last_dim_contiguous(v)
    return k, v, None, 1, (k.stride(0), 0, k.stride(1)), (v.stride(0), 0, v.stride(1)), False


def _pair_buffer(pair_count: torch.Tensor | None, shape, device):
    if pair_count is None:
        return None
    if pair_count.dim() != 0 or pair_count.dtype != torch.int64 or pair_count.device != device:
        raise ValueError(f"pair_count must be a 0-dim int64 tensor on {device}, got {pair_count.dtype} "
                         f"{tuple(pair_count.shape)} on {pair_count.device}")
    return torch.zeros(shape, dtype=torch.int32, device=device)


def _launch(q, kv, lo, hi, lists, *, scale, causal, dense, block_m, num_warps, num_stages, out, lse_out,
            pair_count):
    if q.dim() != 3:
        raise ValueError(f"expected q [n_q, H, D], got {tuple(q.shape)}")
    k, v, table, page, ks, vs, paged = _key_layout(kv, lo, hi)
    group = _check_heads(q, k)
    if v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share one of fp32/fp16/bf16, got {q.dtype}, {k.dtype}, {v.dtype}")
    q = _last_dim_contiguous(q)
    out, lse_out = _outputs(q, out, lse_out)
    n_q, H, D = q.shape
    grid = (triton.cdiv(n_q, block_m), H)
    pairs = _pair_buffer(pair_count, grid[::-1], q.device)
    if n_q == 0:
        return out, lse_out
    bc, bo, cc, ci = lists
    if launches_enabled():
        dummy = bc                              # any int32 pointer: never read when its mode is off
        _vs_attn_fwd_kernel[grid](
            q, k, v, out, lse_out, bc, bo, cc, ci, table if paged else dummy, dummy if pairs is None else pairs,
            q.stride(0), q.stride(1), ks[0], ks[1], ks[2], vs[0], vs[1], vs[2],
            out.stride(0), out.stride(1), lse_out.stride(0), lse_out.stride(1),
            bc.stride(0), bc.stride(1), bo.stride(0), bo.stride(1),
            cc.stride(0), cc.stride(1), ci.stride(0), ci.stride(1),
            0 if pairs is None else pairs.stride(0), n_q, hi - lo, lo, group, float(scale) * _LOG2E,
            HEAD_DIM=D, BLOCK_D=max(16, triton.next_power_of_2(D)), BLOCK_M=block_m, BLOCK_N=BLOCK_N,
            CAUSAL=bool(causal), DENSE=dense, IEEE=q.dtype == torch.float32,
            PAGED=paged, PAGE=page, COUNT=pairs is not None,
            num_warps=num_warps, num_stages=num_stages,
        )
    if pairs is not None:
        pair_count.add_(pairs.sum(dtype=torch.int64))   # stays on the device: no host sync
    return out, lse_out


def _check_lists(q, lists):
    H = q.shape[1] if q.dim() == 3 else -1
    R = triton.cdiv(q.shape[0], BLOCK_M) if q.dim() == 3 else -1
    names = ("block_count", "block_offset", "column_count", "column_index")
    for name, t, rank in zip(names, lists, (2, 3, 2, 3)):
        if t.dim() != rank or tuple(t.shape[:2]) != (H, R):
            raise ValueError(f"{name} must have shape [H={H}, R={R}{', ...' if rank == 3 else ''}], "
                             f"got {tuple(t.shape)}")
        if t.dtype != torch.int32:
            raise ValueError(f"{name} must be int32, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} must be on {q.device}")
    return [_last_dim_contiguous(t) for t in lists]


def vertical_slash_attention_kv(q, kv, lo: int, hi: int, block_count, block_offset, column_count, column_index,
                                *, scale: float, causal: bool, out=None, lse_out=None, pair_count=None):
    """Sparse attention of q over keys ``[lo, hi)`` of a KV source (``PagedKV``, ``ContiguousKV`` or a
    ``(k, v)`` pair), work lists in region-local key indices; returns (O like q, LSE fp32 [n_q, H]).

    ``pair_count`` (0-dim int64 tensor on q's device) accumulates the computed pairs in place, on the device.
    """
    lists = _check_lists(q, (block_count, block_offset, column_count, column_index))
    return _launch(q, kv, lo, hi, lists, scale=scale, causal=causal, dense=False, block_m=BLOCK_M,
                   num_warps=4, num_stages=2, out=out, lse_out=lse_out, pair_count=pair_count)


def vertical_slash_attention(q, k, v, block_count, block_offset, column_count, column_index, *,
                             scale: float, causal: bool, out=None, lse_out=None, pair_count=None):
    """Sparse attention over work lists (docs/algorithms.md#index-building); returns (O like q, LSE fp32 [n_q, H],
    natural log)."""
    _check_qkv(q, k, v)
    return vertical_slash_attention_kv(q, (k, v), 0, k.shape[0], block_count, block_offset, column_count,
                                       column_index, scale=scale, causal=causal, out=out, lse_out=lse_out,
                                       pair_count=pair_count)


def default_dense_config(head_dim: int, device: torch.device, dtype: torch.dtype = torch.bfloat16) -> dict:
    """Launch meta-parameters for the dense path; bench/gpu/check.py times alternatives on the GPU."""
    if _INTERPRET or device.type != "cuda":
        return {"block_m": 64, "num_warps": 4, "num_stages": 1}
    if dtype == torch.float32:                  # fp32 tiles need twice the shared memory per stage
        return {"block_m": 64, "num_warps": 4, "num_stages": 2}
    if head_dim <= 64:
        return {"block_m": 128, "num_warps": 4, "num_stages": 3}
    return {"block_m": 128, "num_warps": 8, "num_stages": 3}


def dense_attention_kv(q, kv, lo: int, hi: int, *, scale: float, causal: bool, out=None, lse_out=None,
                       config: dict | None = None, pair_count=None):
    """Full (causal bottom-right or non-causal) attention of q over keys ``[lo, hi)`` of a KV source."""
    if q.dim() != 3:
        raise ValueError(f"expected q [n_q, H, D], got {tuple(q.shape)}")
    cfg = dict(default_dense_config(q.shape[2], q.device, q.dtype))
    cfg.update(config or {})
    if cfg["block_m"] not in (16, 32, 64, 128):
        raise ValueError(f"block_m must be one of 16, 32, 64, 128, got {cfg['block_m']}")
    dummy = torch.zeros((1, 1, 1), dtype=torch.int32, device=q.device)
    lists = (dummy[0], dummy, dummy[0], dummy)
    return _launch(q, kv, lo, hi, lists, scale=scale, causal=causal, dense=True, block_m=cfg["block_m"],
                   num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], out=out, lse_out=lse_out,
                   pair_count=pair_count)


def dense_attention(q, k, v, *, scale: float, causal: bool, out=None, lse_out=None, config: dict | None = None,
                    pair_count=None):
    """Full (causal bottom-right or non-causal) attention with the same kernel, walking all key blocks."""
    if q.dim() != 3:
        raise ValueError(f"expected q [n_q, H, D], got {tuple(q.shape)}")
    _check_qkv(q, k, v)
    return dense_attention_kv(q, (k, v), 0, k.shape[0], scale=scale, causal=causal, out=out, lse_out=lse_out,
                              config=config, pair_count=pair_count)
