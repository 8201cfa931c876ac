"""Flash-attention forward over vertical-slash work lists (and its dense special case), with LSE.

Provenance: the two-phase structure of MInference's Triton VS kernel (algorithms.md §2.4) rewritten for
LongServe: natural-log LSE output, causal (bottom-right aligned) and non-causal modes, GQA by indexing KV head
``h // group`` (K/V are never repeated), ``O = 0, LSE = -inf`` for rows without keys, pointer arithmetic only.

Shapes: q ``[n_q, H, D]``, k/v ``[n_k, G, D]``; work lists per (head, 64-row query block) as produced by
``convert_vertical_slash_indexes``: ``block_count [H, R]``, ``block_offset [H, R, NB]`` (key-block starts, not
aligned to 64), ``column_count [H, R]``, ``column_index [H, R, NC]``, ``R = ceil(n_q / 64)``.
Phase 1 attends keys ``[b, b + 64)`` of each listed block start ``b`` (causal mask ``key <= off + row`` with
``off = n_k - n_q``, and ``key < n_k``); phase 2 gathers the listed columns 64 at a time. Columns get the same
causal mask (a no-op for lists built by §2.3, whose causal columns lie before the block's first row).
Limits: any head dim (padded to a power of two internally, >= 16); fp32 / fp16 / bf16 inputs, softmax in
fp32, base-2 exponentials internally; the dense path (``dense_attention``) walks all causal key blocks itself
and may use larger query tiles.
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from longserve.kernels.dispatch import launches_enabled

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
def _vs_attn_fwd_kernel(
    Q, K, V, O, LSE,                                        # q [n_q, H, D]; k, v [n_k, G, D]; o like q; lse [n_q, H]
    BLOCK_COUNT, BLOCK_OFFSET, COLUMN_COUNT, COLUMN_INDEX,  # [H, R], [H, R, NB], [H, R], [H, R, NC]
    stride_qm, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh,
    stride_om, stride_oh, stride_lm, stride_lh,
    stride_bch, stride_bcr, stride_boh, stride_bor, stride_cch, stride_ccr, stride_cih, stride_cir,
    q_len, kv_len, group, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, DENSE: tl.constexpr, IEEE: tl.constexpr,
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

    if DENSE:
        if CAUSAL:
            hi = tl.minimum(kv_len, off + m0 + BLOCK_M)
            n_full = tl.maximum(tl.minimum(off + m0 + 1, kv_len), 0) // BLOCK_N
        else:
            hi = kv_len
            n_full = kv_len // BLOCK_N
        for i in range(0, n_full):             # blocks every row sees entirely: no mask
            cols = i * BLOCK_N + offs_n
            kT = tl.load(k_base + cols[None, :] * stride_kn, mask=d_ok[:, None], other=0.0)
            vv = tl.load(v_base + cols[:, None] * stride_vn, mask=d_ok[None, :], other=0.0)
            acc, m_i, l_i = _online_step(acc, m_i, l_i, q, kT, vv, qk_scale, None, False, IEEE)
        for start in range(n_full * BLOCK_N, hi, BLOCK_N):
            cols = start + offs_n
            col_ok = cols < kv_len
            kT = tl.load(k_base + cols[None, :] * stride_kn, mask=col_ok[None, :] & d_ok[:, None], other=0.0)
            vv = tl.load(v_base + cols[:, None] * stride_vn, mask=col_ok[:, None] & d_ok[None, :], other=0.0)
            mask = col_ok[None, :]
            if CAUSAL:
                mask = mask & (cols[None, :] <= limit[:, None])
            acc, m_i, l_i = _online_step(acc, m_i, l_i, q, kT, vv, qk_scale, mask, True, IEEE)
    else:
        n_blocks = tl.load(BLOCK_COUNT + head * stride_bch + pid_m * stride_bcr)
        bo_base = BLOCK_OFFSET + head * stride_boh + pid_m * stride_bor
        for i in range(0, n_blocks):
            start = tl.load(bo_base + i)
            cols = start + offs_n
            col_ok = (cols < kv_len) & (cols >= 0)
            kT = tl.load(k_base + cols[None, :] * stride_kn, mask=col_ok[None, :] & d_ok[:, None], other=0.0)
            vv = tl.load(v_base + cols[:, None] * stride_vn, mask=col_ok[:, None] & d_ok[None, :], other=0.0)
            mask = col_ok[None, :]
            if CAUSAL:
                mask = mask & (cols[None, :] <= limit[:, None])
            acc, m_i, l_i = _online_step(acc, m_i, l_i, q, kT, vv, qk_scale, mask, True, IEEE)
        n_cols = tl.load(COLUMN_COUNT + head * stride_cch + pid_m * stride_ccr)
        ci_base = COLUMN_INDEX + head * stride_cih + pid_m * stride_cir
        for c0 in range(0, n_cols, BLOCK_N):
            listed = (c0 + offs_n) < n_cols
            cols = tl.load(ci_base + c0 + offs_n, mask=listed, other=0)
            col_ok = listed & (cols < kv_len) & (cols >= 0)
            kT = tl.load(k_base + cols[None, :] * stride_kn, mask=col_ok[None, :] & d_ok[:, None], other=0.0)
            vv = tl.load(v_base + cols[:, None] * stride_vn, mask=col_ok[:, None] & d_ok[None, :], other=0.0)
            mask = col_ok[None, :]
            if CAUSAL:
                mask = mask & (cols[None, :] <= limit[:, None])
            acc, m_i, l_i = _online_step(acc, m_i, l_i, q, kT, vv, qk_scale, mask, True, IEEE)

    has_keys = l_i > 0.0
    out = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    lse = tl.where(has_keys, (m_i + tl.log2(tl.where(has_keys, l_i, 1.0))) * 0.6931471805599453,
                   float("-inf"))
    tl.store(O + rows64[:, None] * stride_om + head * stride_oh + offs_d[None, :],
             out.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    tl.store(LSE + offs_m * stride_lm + head * stride_lh, lse, mask=row_ok)


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> int:
    """Validate the contract shapes; returns the GQA group size."""
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(f"expected q [n_q, H, D] and k, v [n_k, G, D], got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k and v shapes differ: {tuple(k.shape)} vs {tuple(v.shape)}")
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"head dims differ: q {q.shape[2]} vs k {k.shape[2]}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"query heads {q.shape[1]} are not a multiple of KV heads {k.shape[1]}")
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16) or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share one of fp32/fp16/bf16, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError("q, k and v must be on the same device")
    return q.shape[1] // k.shape[1]


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


def _launch(q, k, v, lists, *, scale, causal, dense, block_m, num_warps, num_stages, out, lse_out):
    group = _check_qkv(q, k, v)
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    out, lse_out = _outputs(q, out, lse_out)
    n_q, H, D = q.shape
    if n_q == 0:
        return out, lse_out
    bc, bo, cc, ci = lists
    grid = (triton.cdiv(n_q, block_m), H)
    if launches_enabled():
        _vs_attn_fwd_kernel[grid](
            q, k, v, out, lse_out, bc, bo, cc, ci,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            out.stride(0), out.stride(1), lse_out.stride(0), lse_out.stride(1),
            bc.stride(0), bc.stride(1), bo.stride(0), bo.stride(1),
            cc.stride(0), cc.stride(1), ci.stride(0), ci.stride(1),
            n_q, k.shape[0], group, float(scale) * _LOG2E,
            HEAD_DIM=D, BLOCK_D=max(16, triton.next_power_of_2(D)), BLOCK_M=block_m, BLOCK_N=BLOCK_N,
            CAUSAL=bool(causal), DENSE=dense, IEEE=q.dtype == torch.float32,
            num_warps=num_warps, num_stages=num_stages,
        )
    return out, lse_out


def vertical_slash_attention(q, k, v, block_count, block_offset, column_count, column_index, *,
                             scale: float, causal: bool, out=None, lse_out=None):
    """Sparse attention over §2.3 work lists; returns (O like q, LSE fp32 [n_q, H], natural log)."""
    H = q.shape[1] if q.dim() == 3 else -1
    R = triton.cdiv(q.shape[0], BLOCK_M) if q.dim() == 3 else -1
    for name, t, rank in (("block_count", block_count, 2), ("block_offset", block_offset, 3),
                          ("column_count", column_count, 2), ("column_index", column_index, 3)):
        if t.dim() != rank or tuple(t.shape[:2]) != (H, R):
            raise ValueError(f"{name} must have shape [H={H}, R={R}{', ...' if rank == 3 else ''}], "
                             f"got {tuple(t.shape)}")
        if t.dtype != torch.int32:
            raise ValueError(f"{name} must be int32, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} must be on {q.device}")
    lists = [_last_dim_contiguous(t) for t in (block_count, block_offset, column_count, column_index)]
    return _launch(q, k, v, lists, scale=scale, causal=causal, dense=False, block_m=BLOCK_M,
                   num_warps=4, num_stages=2, out=out, lse_out=lse_out)


def default_dense_config(head_dim: int, device: torch.device, dtype: torch.dtype = torch.bfloat16) -> dict:
    """Launch meta-parameters for the dense path; bench/gpu/check.py times alternatives on the GPU."""
    if _INTERPRET or device.type != "cuda":
        return {"block_m": 64, "num_warps": 4, "num_stages": 1}
    if dtype == torch.float32:                  # fp32 tiles need twice the shared memory per stage
        return {"block_m": 64, "num_warps": 4, "num_stages": 2}
    if head_dim <= 64:
        return {"block_m": 128, "num_warps": 4, "num_stages": 3}
    return {"block_m": 128, "num_warps": 8, "num_stages": 3}


def dense_attention(q, k, v, *, scale: float, causal: bool, out=None, lse_out=None, config: dict | None = None):
    """Full (causal bottom-right or non-causal) attention with the same kernel, walking all key blocks."""
    if q.dim() != 3:
        raise ValueError(f"expected q [n_q, H, D], got {tuple(q.shape)}")
    cfg = dict(default_dense_config(q.shape[2], q.device, q.dtype))
    cfg.update(config or {})
    if cfg["block_m"] not in (16, 32, 64, 128):
        raise ValueError(f"block_m must be one of 16, 32, 64, 128, got {cfg['block_m']}")
    dummy = torch.zeros((1, 1, 1), dtype=torch.int32, device=q.device)
    lists = (dummy[0], dummy, dummy[0], dummy)
    return _launch(q, k, v, lists, scale=scale, causal=causal, dense=True, block_m=cfg["block_m"],
                   num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], out=out, lse_out=lse_out)


def full_block_lists(q_len: int, kv_len: int, num_heads: int, *, causal: bool, device=None):
    """Work lists that cover every (causal) pair: block starts 0, 64, ... per query block, no columns.

    Used to test the list path against dense attention (O7); the lists are broadcast over heads.
    """
    if q_len < 0 or kv_len < 0 or num_heads <= 0:
        raise ValueError("q_len, kv_len must be >= 0 and num_heads > 0")
    R = math.ceil(q_len / BLOCK_M)
    nb_max = max(1, math.ceil(kv_len / BLOCK_N))
    ends = torch.arange(1, R + 1, device=device, dtype=torch.int64) * BLOCK_M
    if causal:
        visible = torch.clamp(torch.minimum(ends + (kv_len - q_len), torch.tensor(kv_len, device=device)), min=0)
    else:
        visible = torch.full_like(ends, kv_len)
    counts = ((visible + BLOCK_N - 1) // BLOCK_N).to(torch.int32)
    starts = (torch.arange(nb_max, device=device, dtype=torch.int32) * BLOCK_N).expand(R, nb_max)
    block_count = counts.expand(num_heads, R)
    block_offset = starts.expand(num_heads, R, nb_max)
    column_count = torch.zeros((num_heads, R), dtype=torch.int32, device=device)
    column_index = torch.zeros((num_heads, R, 1), dtype=torch.int32, device=device)
    return block_count, block_offset, column_count, column_index
