"""Exact-mask vertical-slash DCA prefill (algorithms.md §2.5), computing only what the selection touches.

Per region and 64-row query block, the keys read are the selected columns plus the key window every selected
diagonal crosses in that block (the bands of §2.3); they are gathered (never K/V repeated over heads), scored with
one batched matmul, and masked to the exact selection ``j in V or (t - j) in S`` (plus causality in the intra
region) before an fp32 softmax with LSE. Work is vectorised over heads and blocks; blocks are taken in groups that
bound the temporary memory, so the cost scales with the selected pairs, not with ``n_q * n_k``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from longserve.kernels.reference.attention import merge_lse, softmax_with_lse, work_dtype
from longserve.kernels.reference.dca import dense_regions
from longserve.kernels.reference.estimate import estimate_dca_selection, split_regions

BLOCK = 64
COVER_ELEMENTS = 1 << 24     # [H, blocks, kv] coverage flags per group
GATHER_ELEMENTS = 1 << 24    # [H, blocks, keys, D] gathered keys per group


@dataclass
class PairStats:
    """(query, key) pair counts: ``selected`` (exact mask), ``computed`` (scored), ``causal`` (dense work)."""
    selected: int = 0
    computed: int = 0
    causal: int = 0

    def add(self, other: "PairStats") -> None:
        self.selected += other.selected
        self.computed += other.computed
        self.causal += other.causal


def _lookup(values: torch.Tensor, count: torch.Tensor, size: int) -> torch.Tensor:
    """Bool ``[H, size + 1]``: True at each head's valid values in ``[0, size]`` (slot ``size`` is padding)."""
    H, W = values.shape
    table = torch.zeros((H, size + 2), dtype=torch.bool, device=values.device)
    ok = (torch.arange(W, device=values.device)[None, :] < count[:, None]) & (values >= 0) & (values <= size)
    table.scatter_(1, torch.where(ok, values, torch.full_like(values, size + 1)), True)
    return table[:, :size + 1]


def _covered_keys(m0: torch.Tensor, off: int, kv: int, causal: bool, verts, vcount, slashes, scount):
    """Compacted key lists ``[H, Rc, K]`` (padded with kv) read by the blocks starting at rows ``m0``."""
    H = verts.shape[0]
    device = verts.device
    Rc = m0.numel()
    diff = torch.zeros((H, Rc, kv + 2), dtype=torch.int32, device=device)
    s_ok = (torch.arange(slashes.shape[1], device=device)[None, :] < scount[:, None])[:, None, :]
    start = (off + m0)[None, :, None] - slashes[:, None, :]                       # key of row m0 on slash s
    lo, hi = start.clamp(0, kv), (start + BLOCK).clamp(0, kv)
    s_ok = s_ok & (lo < hi)
    one = s_ok.to(torch.int32)
    diff.scatter_add_(2, torch.where(s_ok, lo, kv + 1), one)
    diff.scatter_add_(2, torch.where(s_ok, hi, kv + 1), -one)
    cover = diff[..., :kv].cumsum(dim=2) > 0
    cover = torch.cat([cover, torch.zeros((H, Rc, 1), dtype=torch.bool, device=device)], dim=2)
    v_ok = (torch.arange(verts.shape[1], device=device)[None, :] < vcount[:, None]) & (verts >= 0) & (verts < kv)
    v_idx = torch.where(v_ok, verts, kv)[:, None, :].expand(H, Rc, verts.shape[1])
    cover.scatter_(2, v_idx, True)
    cover = cover[..., :kv]
    if causal:                                                                     # nothing past the last row
        cover &= torch.arange(kv, device=device)[None, None, :] <= (off + m0 + BLOCK - 1)[None, :, None]
    count = cover.sum(dim=2)
    K = max(int(count.max()), 1) if count.numel() else 1
    pos = torch.where(cover, cover.cumsum(dim=2) - 1, K)
    idx = torch.full((H, Rc, K + 1), kv, dtype=torch.int64, device=device)
    idx.scatter_(2, pos, torch.arange(kv, device=device).expand(H, Rc, kv))
    return idx[..., :K], count


def region_attention(q, k, v, vertical, vertical_count, slash, slash_count, *, scale: float, causal: bool,
                     stats: PairStats | None = None):
    """Exact-mask VS attention of one region in kernel convention (``key = off + r - s``) -> (O, LSE), work dtype.

    q ``[n_q, H, D]`` rotated for this region; k/v ``[kv, G, D]``; vertical/slash ``[H, N]`` local indices with
    per-head counts. ``off = kv - n_q`` when causal, ``kv`` otherwise.
    """
    n_q, H, D = q.shape
    kv, G, Dv = v.shape
    group = H // G
    device = q.device
    wd = work_dtype(q.dtype)
    off = kv - n_q if causal else kv
    out = torch.zeros((n_q, H, Dv), dtype=wd, device=device)
    lse = torch.full((n_q, H), float("-inf"), dtype=wd, device=device)
    if n_q == 0 or kv == 0:
        return out, lse
    vertical, slash = vertical.to(device, torch.int64), slash.to(device, torch.int64)
    vertical_count, slash_count = vertical_count.to(device), slash_count.to(device)
    s_size = kv + n_q
    is_v = _lookup(vertical, vertical_count, kv)                                   # [H, kv + 1]
    is_s = _lookup(slash, slash_count, s_size)                                     # [H, s_size + 1]
    R = -(-n_q // BLOCK)
    q_pad = torch.zeros((R * BLOCK, H, D), dtype=wd, device=device)
    q_pad[:n_q] = q.to(wd)
    qb = q_pad.view(R, BLOCK, H, D).permute(2, 0, 1, 3)                            # [H, R, 64, D]
    k_pad = torch.cat([k.to(wd), torch.zeros((1, G, D), dtype=wd, device=device)])
    v_pad = torch.cat([v.to(wd), torch.zeros((1, G, Dv), dtype=wd, device=device)])
    kv_head = (torch.arange(H, device=device) // group)[:, None, None]
    heads = torch.arange(H, device=device)[:, None, None, None]
    o_blocks = torch.zeros((H, R, BLOCK, Dv), dtype=wd, device=device)
    l_blocks = torch.full((H, R, BLOCK), float("-inf"), dtype=wd, device=device)
    step = max(1, COVER_ELEMENTS // (H * (kv + 2)))
    for g0 in range(0, R, step):
        g1 = min(R, g0 + step)
        idx_all, count = _covered_keys(torch.arange(g0, g1, device=device) * BLOCK, off, kv, causal,
                                       vertical, vertical_count, slash, slash_count)
        sub = max(1, GATHER_ELEMENTS // (H * idx_all.shape[2] * max(D, Dv, BLOCK)))
        for r0 in range(0, g1 - g0, sub):
            r1 = min(g1 - g0, r0 + sub)
            idx = idx_all[:, r0:r1]
            rows = (torch.arange(g0 + r0, g0 + r1, device=device) * BLOCK)[:, None] + torch.arange(BLOCK, device=device)
            kk = k_pad[idx, kv_head]                                               # [H, Rs, K, D]
            scores = torch.matmul(qb[:, g0 + r0:g0 + r1], kk.transpose(-1, -2)) * scale
            s_val = off + rows[None, :, :, None] - idx[:, :, None, :]              # slash value of each pair
            sel = is_v[heads, idx[:, :, None, :]] | is_s[heads, s_val.clamp(0, s_size)] & (s_val >= 0)
            sel &= (idx[:, :, None, :] < kv) & (rows < n_q)[None, :, :, None]
            if causal:
                sel &= s_val >= 0
            p, l_ = softmax_with_lse(scores, sel)
            o_blocks[:, g0 + r0:g0 + r1] = torch.matmul(p, v_pad[idx, kv_head])
            l_blocks[:, g0 + r0:g0 + r1] = l_
            if stats is not None:
                valid_rows = (rows < n_q).sum(dim=1)
                stats.selected += int(sel.sum())
                stats.computed += int((count[:, r0:r1] * valid_rows[None, :]).sum())
    out = o_blocks.permute(1, 2, 0, 3).reshape(R * BLOCK, H, Dv)[:n_q]
    lse = l_blocks.permute(1, 2, 0).reshape(R * BLOCK, H)[:n_q]
    return out, lse


def causal_pair_count(n_q: int, kv: int, causal: bool, heads: int) -> int:
    """Pairs dense attention computes for one region: bottom-right causal or the full rectangle."""
    if not causal:
        return n_q * kv * heads
    off = kv - n_q
    return heads * (n_q * (off + 1) + n_q * (n_q - 1) // 2)


def sparse_subblock(q_rows, k_rot, v, *, b: int, e: int, P: int, cl, chunk_size, rope_theta, tau: float, budgets,
                    stats: PairStats | None = None):
    """Estimate (§2.5 steps 1-6) and run the three regions for the sub-block ``[b, e)``; LSE-merged (O, LSE)."""
    sel = estimate_dca_selection(q_rows, k_rot, b=b, e=e, P=P, cl=cl, chunk_size=chunk_size, rope_theta=rope_theta,
                                 tau=tau, budgets=budgets)
    parts = []
    H = q_rows.shape[1]
    for idx, (qr, lo, hi, causal) in zip(split_regions(sel, b=b, e=e, P=P, cl=cl),
                                         dense_regions(q_rows, P, e, b, cl, chunk_size, rope_theta)):
        parts.append(region_attention(qr, k_rot[lo:hi], v[lo:hi], idx.vertical, idx.vertical_count, idx.slash,
                                      idx.slash_count, scale=tau, causal=causal, stats=stats))
        if stats is not None:
            stats.causal += causal_pair_count(e - b, hi - lo, causal, H)
    return parts[0] if len(parts) == 1 else merge_lse(parts)
