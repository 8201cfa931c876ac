"""LSE merge of partial attentions (docs/algorithms.md#lse-merge) as a Triton kernel.

Each row's parts ``(O_p, LSE_p)`` combine into one softmax over the union of their keys:
``M = max_p LSE_p``, ``w_p = exp(LSE_p - M)``, ``O = Σ w_p O_p / Σ w_p``, ``LSE = M + log Σ w_p``.
Everything is fp32; a part with ``LSE = -inf`` gets weight exactly 0 and its O is never read into the sum
(so even a NaN there cannot leak); a row whose parts are all empty returns ``O = 0, LSE = -inf``.
Used for the three DCA parts and for split-KV decode partials. Same result as the reference ``merge_lse``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from longserve.kernels.dispatch import launches_enabled


@triton.jit
def _lse_merge_kernel(
    O_PARTS, LSE_PARTS, O_OUT, LSE_OUT,       # [P, R, D], [P, R], [R, D], [R]
    n_parts, n_rows,
    stride_op, stride_or, stride_lp, stride_lr, stride_outr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = rows < n_rows
    tile_ok = row_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    m = tl.full([BLOCK_R], float("-inf"), tl.float32)
    for p in range(0, n_parts):
        lse = tl.load(LSE_PARTS + p * stride_lp + rows * stride_lr, mask=row_ok, other=float("-inf"))
        m = tl.maximum(m, lse.to(tl.float32))
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    total = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    for p in range(0, n_parts):
        lse = tl.load(LSE_PARTS + p * stride_lp + rows * stride_lr, mask=row_ok, other=float("-inf"))
        w = tl.exp(lse.to(tl.float32) - m_safe)
        used = w > 0.0
        o = tl.load(O_PARTS + p * stride_op + rows[:, None] * stride_or + offs_d[None, :],
                    mask=tile_ok & used[:, None], other=0.0)
        acc += tl.where(used[:, None], w[:, None] * o.to(tl.float32), 0.0)
        total += w
    has = total > 0.0
    out = acc / tl.where(has, total, 1.0)[:, None]
    lse_out = tl.where(has, m_safe + tl.log(tl.where(has, total, 1.0)), float("-inf"))
    tl.store(O_OUT + rows[:, None] * stride_outr + offs_d[None, :], out.to(O_OUT.dtype.element_ty),
             mask=tile_ok)
    tl.store(LSE_OUT + rows, lse_out, mask=row_ok)


def merge_lse_stacked(o_parts: torch.Tensor, lse_parts: torch.Tensor, *, out_dtype=torch.float32):
    """Merge ``o_parts [P, *lead, D]`` with ``lse_parts [P, *lead]``; returns (O [*lead, D], LSE [*lead] fp32)."""
    if o_parts.dim() < 2 or lse_parts.shape != o_parts.shape[:-1]:
        raise ValueError(f"o_parts [P, ..., D] and lse_parts [P, ...] disagree: {tuple(o_parts.shape)} vs "
                         f"{tuple(lse_parts.shape)}")
    if o_parts.device != lse_parts.device:
        raise ValueError("o_parts and lse_parts must be on the same device")
    if not o_parts.dtype.is_floating_point or not lse_parts.dtype.is_floating_point:
        raise ValueError("o_parts and lse_parts must be floating point")
    P, lead, D = o_parts.shape[0], o_parts.shape[1:-1], o_parts.shape[-1]
    if P == 0:
        raise ValueError("need at least one part to merge")
    n_rows = 1
    for size in lead:
        n_rows *= size
    o3 = o_parts.reshape(P, n_rows, D)
    if o3.stride(-1) != 1:
        o3 = o3.contiguous()
    l2 = lse_parts.reshape(P, n_rows)
    out = torch.empty((n_rows, D), dtype=out_dtype, device=o_parts.device)
    lse = torch.empty((n_rows,), dtype=torch.float32, device=o_parts.device)
    if n_rows and D:
        block_r = 16
        if launches_enabled():
            _lse_merge_kernel[(triton.cdiv(n_rows, block_r),)](
                o3, l2, out, lse, P, n_rows,
                o3.stride(0), o3.stride(1), l2.stride(0), l2.stride(1), out.stride(0),
                HEAD_DIM=D, BLOCK_D=triton.next_power_of_2(D), BLOCK_R=block_r, num_warps=4,
            )
    elif n_rows:
        lse = torch.logsumexp(l2.float(), dim=0)
    return out.reshape(*lead, D), lse.reshape(lead)


def merge_lse_triton(parts):
    """Same contract as the reference ``merge_lse(parts)``: list of (O [..., D], LSE [...]) -> fp32 (O, LSE)."""
    parts = list(parts)
    if not parts:
        raise ValueError("need at least one part to merge")
    shape = parts[0][0].shape
    for o, lse in parts:
        if o.shape != shape or lse.shape != shape[:-1]:
            raise ValueError(f"all parts must share O shape {tuple(shape)} and LSE shape {tuple(shape[:-1])}")
    o_parts = torch.stack([o for o, _ in parts])
    lse_parts = torch.stack([lse.float() for _, lse in parts])
    return merge_lse_stacked(o_parts, lse_parts)
