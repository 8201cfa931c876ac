"""Decode attention over a paged KV cache for one key range per sequence, returning LSE (split-KV).

Each sequence ``b`` attends keys at logical positions ``[key_start[b], key_end[b])`` of its block table; DCA
decode (docs/algorithms.md#paged-decode) is three such calls (intra, succ, inter) with different query rotations and one
LSE merge. One program handles all query heads of a KV head (GQA group padded to >= 16 rows for ``tl.dot``) and
one split of the key range; split partials are combined with the Triton LSE merge, so a 1M-token range keeps
the GPU busy even at batch 1. An empty range gives ``O = 0, LSE = -inf``.

Shapes: q ``[B, H, D]``; k_cache/v_cache ``[num_blocks, block_size, G, D]``; block_tables int32 ``[B,
max_blocks]`` (logical block i of sequence b lives in physical block ``block_tables[b, i]``); key_start/key_end
int ``[B]``. Returns O fp32 ``[B, H, D]`` and LSE fp32 ``[B, H]`` (natural log).
Limits: block_size must be a power of two; D any size (padded to a power of two).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from longserve.kernels.dispatch import launches_enabled
from longserve.kernels.merge import merge_lse_stacked
from longserve.kernels.vertical_slash import _online_step

_LOG2E = 1.4426950408889634
BLOCK_N = 64


@triton.jit
def _paged_decode_kernel(
    Q, K_CACHE, V_CACHE, BLOCK_TABLES, KEY_START, KEY_END, QK_SCALE, O_PART, LSE_PART,
    stride_qb, stride_qh, stride_kb, stride_ks, stride_kg, stride_vb, stride_vs, stride_vg,
    stride_btb, stride_op, stride_ob, stride_oh, stride_lp, stride_lb, stride_lh,
    group, keys_per_split,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
    PAGE: tl.constexpr, IEEE: tl.constexpr,
):
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    heads = kv_head * group + offs_h
    h_ok = offs_h < group
    d_ok = offs_d < HEAD_DIM
    start = tl.load(KEY_START + b) + split * keys_per_split
    end = tl.minimum(tl.load(KEY_END + b), start + keys_per_split)
    qk_scale = tl.load(QK_SCALE + b)            # per-sequence softmax scale (YaRN m(N)^2), base-2 units

    q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=h_ok[:, None] & d_ok[None, :], other=0.0)
    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    bt = BLOCK_TABLES + b * stride_btb
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + offs_n
        pos_ok = pos < end
        phys = tl.load(bt + pos // PAGE, mask=pos_ok, other=0).to(tl.int64)
        slot = pos % PAGE
        kT = tl.load(K_CACHE + phys[None, :] * stride_kb + slot[None, :] * stride_ks + kv_head * stride_kg
                     + offs_d[:, None], mask=pos_ok[None, :] & d_ok[:, None], other=0.0)
        vv = tl.load(V_CACHE + phys[:, None] * stride_vb + slot[:, None] * stride_vs + kv_head * stride_vg
                     + offs_d[None, :], mask=pos_ok[:, None] & d_ok[None, :], other=0.0)
        acc, m_i, l_i = _online_step(acc, m_i, l_i, q, kT, vv, qk_scale, pos_ok[None, :], True, IEEE)

    has_keys = l_i > 0.0
    out = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    lse = tl.where(has_keys, (m_i + tl.log2(tl.where(has_keys, l_i, 1.0))) * 0.6931471805599453,
                   float("-inf"))
    tl.store(O_PART + split * stride_op + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :], out,
             mask=h_ok[:, None] & d_ok[None, :])
    tl.store(LSE_PART + split * stride_lp + b * stride_lb + heads * stride_lh, lse, mask=h_ok)


def _check(q, k_cache, v_cache, block_tables, key_start, key_end):
    if q.dim() != 3 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"expected q [B, H, D] and k/v caches [num_blocks, block_size, G, D], got "
                         f"{tuple(q.shape)}, {tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    B, H, D = q.shape
    page, G = k_cache.shape[1], k_cache.shape[2]
    if k_cache.shape[3] != D or G == 0 or H % G:
        raise ValueError(f"cache [.., .., G={G}, D={k_cache.shape[3]}] does not fit q heads {H}, dim {D}")
    if page <= 0 or page & (page - 1):
        raise ValueError(f"block_size must be a power of two, got {page}")
    if block_tables.dim() != 2 or block_tables.shape[0] != B or block_tables.dtype != torch.int32:
        raise ValueError(f"block_tables must be int32 [B={B}, max_blocks], got {block_tables.dtype} "
                         f"{tuple(block_tables.shape)}")
    for name, t in (("key_start", key_start), ("key_end", key_end)):
        if t.shape != (B,) or t.dtype.is_floating_point:
            raise ValueError(f"{name} must be an integer tensor [B={B}]")
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16) or k_cache.dtype != q.dtype \
            or v_cache.dtype != q.dtype:
        raise ValueError(f"q and caches must share one of fp32/fp16/bf16, got {q.dtype}, {k_cache.dtype}")
    devices = {t.device for t in (q, k_cache, v_cache, block_tables, key_start, key_end)}
    if len(devices) != 1:
        raise ValueError("all paged-attention inputs must be on one device")


def _num_splits(max_keys: int, programs: int) -> int:
    """Enough splits for ~4 waves of programs on a large GPU, never below 256 keys per split."""
    if max_keys <= 0:
        return 1
    wanted = max(1, triton.cdiv(512, max(programs, 1)))
    return max(1, min(wanted, triton.cdiv(max_keys, 256)))


def paged_attention_decode(q, k_cache, v_cache, block_tables, key_start, key_end, *, scale,
                           max_num_keys: int | None = None, num_splits: int | None = None):
    """One decode query per sequence over its paged key range; returns (O fp32 [B, H, D], LSE fp32 [B, H]).

    ``scale`` is a float or a per-sequence tensor ``[B]`` (each sequence's own YaRN factor). ``max_num_keys`` bounds
    the longest key range and sizes the split-KV grid; without it the block tables' capacity is used, so the
    wrapper never reads a device value back.
    """
    _check(q, k_cache, v_cache, block_tables, key_start, key_end)
    B, H, D = q.shape
    qk_scale = torch.as_tensor(scale, dtype=torch.float64, device=q.device)
    if qk_scale.dim() == 0:
        qk_scale = qk_scale.expand(B)
    if qk_scale.shape != (B,):
        raise ValueError(f"scale must be a float or a tensor [B={B}], got shape {tuple(qk_scale.shape)}")
    qk_scale = (qk_scale * _LOG2E).to(torch.float32).contiguous()
    G, page = k_cache.shape[2], k_cache.shape[1]
    key_start = key_start.to(torch.int32).contiguous()
    key_end = torch.maximum(key_end.to(torch.int32), key_start).contiguous()
    if max_num_keys is None:                # a bound from shapes alone (no readback): the table's capacity
        max_num_keys = block_tables.shape[1] * page if B else 0
    if num_splits is None:
        num_splits = _num_splits(max_num_keys, B * G)
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    keys_per_split = max(BLOCK_N, triton.cdiv(triton.cdiv(max(max_num_keys, 1), num_splits), BLOCK_N) * BLOCK_N)
    num_splits = max(1, triton.cdiv(max(max_num_keys, 1), keys_per_split))
    q = q if q.stride(-1) == 1 else q.contiguous()
    k_cache = k_cache if k_cache.stride(-1) == 1 else k_cache.contiguous()
    v_cache = v_cache if v_cache.stride(-1) == 1 else v_cache.contiguous()
    block_tables = block_tables.contiguous()
    o_part = torch.empty((num_splits, B, H, D), dtype=torch.float32, device=q.device)
    lse_part = torch.empty((num_splits, B, H), dtype=torch.float32, device=q.device)
    if B == 0 or H == 0:
        return o_part[0], lse_part[0]
    group = H // G
    if launches_enabled():
        _paged_decode_kernel[(B, G, num_splits)](
            q, k_cache, v_cache, block_tables, key_start, key_end, qk_scale, o_part, lse_part,
            q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
            block_tables.stride(0), o_part.stride(0), o_part.stride(1), o_part.stride(2),
            lse_part.stride(0), lse_part.stride(1), lse_part.stride(2),
            group, keys_per_split,
            HEAD_DIM=D, BLOCK_D=max(16, triton.next_power_of_2(D)), BLOCK_H=max(16, triton.next_power_of_2(group)),
            BLOCK_N=BLOCK_N, PAGE=page, IEEE=q.dtype == torch.float32, num_warps=4, num_stages=2,
        )
    if num_splits == 1:
        return o_part[0], lse_part[0]
    return merge_lse_stacked(o_part, lse_part)
