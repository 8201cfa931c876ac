"""Exact-mask vertical-slash DCA prefill (algorithms.md §2.5), computing only what the selection touches.

Per region and 64-row query block, the keys read are the selected columns plus the key window every selected
diagonal crosses in that block (the bands of §2.3); they are gathered (never K/V repeated over heads), scored with
one batched matmul, and masked to the exact selection ``j in V or (t - j) in S`` (plus causality in the intra
region) before an fp32 softmax with LSE. Work is vectorised over heads and blocks; blocks are taken in groups that
bound the temporary memory, so the cost scales with the selected pairs, not with ``n_q * n_k``.
"""
from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass

import torch

from longserve.kernels.reference.attention import masked_exp, merge_lse, work_dtype
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
    count_selected: bool = True     # the exact-mask count costs a pass over every mask; rates need only computed


_COLLECTOR: contextvars.ContextVar = contextvars.ContextVar("sparse_pair_stats", default=None)


@contextlib.contextmanager
def collect_pair_stats(count_selected: bool = True):
    """Count the pairs every sparse sub-block run inside the ``with`` block selects and computes (benchmarks).

    Collectors nest: an inner one (the engine's per-step density) also adds its counts to the enclosing one
    (a benchmark around the whole run), and counts selected pairs whenever the enclosing one does."""
    outer = _COLLECTOR.get()
    stats = PairStats(count_selected=count_selected or (outer is not None and outer.count_selected))
    token = _COLLECTOR.set(stats)
    try:
        yield stats
    finally:
        _COLLECTOR.reset(token)
        if outer is not None:
            outer.selected += stats.selected
            outer.computed += stats.computed
            outer.causal += stats.causal


def _lookup(values: torch.Tensor, count: torch.Tensor, size: int) -> torch.Tensor:
    """Bool ``[H, size + 1]``: True at each head's valid values in ``[0, size]`` (slot ``size`` is padding)."""
    H, W = values.shape
    table = torch.zeros((H, size + 2), dtype=torch.bool, device=values.device)
    ok = (torch.arange(W, device=values.device)[None, :] < count[:, None]) & (values >= 0) & (values <= size)
    table.scatter_(1, torch.where(ok, values, torch.full_like(values, size + 1)), True)
    return table[:, :size + 1]


def _covered_keys(m0: torch.Tensor, off: int, kv: int, causal: bool, verts, vcount, slashes, scount, group: int):
    """Compacted key lists ``[G, Rc, K]`` (padded with kv) read by the blocks starting at rows ``m0``: the union
    over the heads of each KV group, so a group's keys are gathered once and scored in one matmul."""
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
    cover = diff.cumsum(dim=2, dtype=torch.int32) > 0                             # slot kv stays False
    v_ok = (torch.arange(verts.shape[1], device=device)[None, :] < vcount[:, None]) & (verts >= 0) & (verts < kv)
    v_idx = torch.where(v_ok, verts, kv)[:, None, :].expand(H, Rc, verts.shape[1])
    cover.scatter_(2, v_idx, True)
    cover = cover[..., :kv]
    if causal:                                                                     # nothing past the last row
        cover &= torch.arange(kv, device=device)[None, None, :] <= (off + m0 + BLOCK - 1)[None, :, None]
    cover = cover.view(H // group, group, Rc, kv).any(dim=1)
    count = cover.sum(dim=2)
    K = max(int(count.max()), 1) if count.numel() else 1
    nz = cover.nonzero()                                                           # row-major: keys ascending
    row = nz[:, 0] * Rc + nz[:, 1]
    flat_count = count.reshape(-1)
    first = flat_count.cumsum(dim=0) - flat_count
    idx = torch.full(((H // group) * Rc, K), kv, dtype=torch.int64, device=device)
    idx[row, torch.arange(nz.shape[0], device=device) - first[row]] = nz[:, 2]
    return idx.view(H // group, Rc, K), count


def _sub_group(widths: torch.Tensor, limit: int) -> int:
    """How many leading blocks to take: padded size (blocks x widest) within ``limit`` and padding <= ~20%."""
    cm = torch.cummax(widths, dim=0).values
    n = torch.arange(1, widths.numel() + 1, device=widths.device)
    ok = (n * cm <= limit) & (cm <= widths[0] * 1.2 + BLOCK)
    return max(1, int(ok.to(torch.int64).cumprod(dim=0).sum()))


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
    is_v = _lookup(vertical, vertical_count, kv).reshape(-1)                       # [H * (kv + 1)]
    # Blocked-pair table: entry (h, w, vertical?) holds the 64 rows of a block for a key whose slash value on the
    # block's row 0 is x = w - BLOCK. Slash flags come from is_s (with BLOCK False entries in front, so negative
    # slash values - keys after the row - are never selected); a vertical key is allowed for all rows, or in a
    # causal region for rows i >= -x. One gather per (head, block, key) then yields the whole exact mask.
    is_s = torch.cat([torch.zeros((H, BLOCK), dtype=torch.bool, device=device),
                      _lookup(slash, slash_count, s_size), torch.zeros((H, BLOCK), dtype=torch.bool, device=device)], 1)
    slash_win = is_s.unfold(1, BLOCK, 1)                                           # [H, n_windows, 64]
    n_windows = slash_win.shape[1]
    lane = torch.arange(BLOCK, device=device)
    if causal:
        vert_win = (lane[None, :] + torch.arange(n_windows, device=device)[:, None] - BLOCK) >= 0
    else:
        vert_win = torch.ones((n_windows, BLOCK), dtype=torch.bool, device=device)
    table = ~torch.stack([slash_win, slash_win | vert_win[None]], dim=2).reshape(H * n_windows * 2, BLOCK)
    R = -(-n_q // BLOCK)
    q_pad = torch.zeros((R * BLOCK, H, D), dtype=wd, device=device)
    q_pad[:n_q] = q.to(wd) * scale                                                # logits come out scaled
    # query blocks per KV group: row hh * 64 + i of block r is query r * 64 + i of the group's head hh
    qb = q_pad.view(R, BLOCK, G, group, D).permute(2, 0, 3, 1, 4).reshape(G, R, group * BLOCK, D)
    qb_t = qb.transpose(-1, -2)
    k_flat = torch.cat([k.to(wd).transpose(0, 1), torch.zeros((G, 1, D), dtype=wd, device=device)], 1).reshape(-1, D)
    v_flat = torch.cat([v.to(wd).transpose(0, 1), torch.zeros((G, 1, Dv), dtype=wd, device=device)], 1).reshape(-1, Dv)
    g_base = (torch.arange(G, device=device) * (kv + 1))[:, None, None]
    h_of = torch.arange(H, device=device).view(G, 1, 1, group)                    # head id per (group, member)
    o_blocks = torch.zeros((G, R, group * BLOCK, Dv), dtype=wd, device=device)
    l_blocks = torch.full((G, R, group * BLOCK), float("-inf"), dtype=wd, device=device)
    step = max(1, COVER_ELEMENTS // (H * (kv + 2)))
    for g0 in range(0, R, step):
        g1 = min(R, g0 + step)
        idx_all, count = _covered_keys(torch.arange(g0, g1, device=device) * BLOCK, off, kv, causal,
                                       vertical, vertical_count, slash, slash_count, group)
        n_blocks = g1 - g0
        widest = count.max(dim=0).values.clamp(min=1)                              # keys per block, over groups
        limit = GATHER_ELEMENTS // (H * max(D, Dv, BLOCK))
        r0 = 0
        while r0 < n_blocks:
            r1 = r0 + _sub_group(widest[r0:], limit)
            K = int(widest[r0:r1].max())
            idx = idx_all[:, r0:r1, :K]                                            # [G, Rs, K]
            Rs = r1 - r0
            m0 = torch.arange(g0 + r0, g0 + r1, device=device) * BLOCK
            x = ((off + m0)[None, :, None] - idx)[..., None]                       # slash value on row 0: [G,Rs,K,1]
            # scores are laid out key-major, [G, Rs, K, g * 64], so the gathered 64-row windows need no transpose;
            # padding keys read window 0, which is all False (the leading padding of is_s)
            w = torch.where(idx[..., None] < kv, (x + BLOCK).clamp(0, n_windows - 1), 0)
            vert = is_v.index_select(0, (h_of * (kv + 1) + idx[..., None]).reshape(-1)).view(G, Rs, K, group)
            blocked = table.index_select(0, ((h_of * n_windows + w) * 2 + vert).reshape(-1))
            blocked = blocked.view(G, Rs, K, group * BLOCK)
            rows_kv = (g_base + idx).reshape(-1)
            kk = k_flat.index_select(0, rows_kv).view(G, Rs, K, D)
            scores = torch.matmul(kk, qb_t[:, g0 + r0:g0 + r1])                   # [G, Rs, K, g * 64]
            if stats is not None:
                valid_rows = ((m0[:, None] + lane) < n_q)
                if stats.count_selected:
                    chosen = ~blocked.view(G, Rs, K, group, BLOCK) & valid_rows[None, :, None, None, :]
                    stats.selected += int(chosen.sum())
                stats.computed += group * int((count[:, r0:r1] * valid_rows.sum(dim=1)[None, :]).sum())
            e, total, l_ = masked_exp(scores, None, dim=-2, blocked=blocked)
            vv = v_flat.index_select(0, rows_kv).view(G, Rs, K, Dv)
            o_blocks[:, g0 + r0:g0 + r1] = torch.matmul(e.transpose(-1, -2), vv).div_(total.transpose(-1, -2))
            l_blocks[:, g0 + r0:g0 + r1] = l_
            r0 = r1
    out = o_blocks.view(G, R, group, BLOCK, Dv).permute(1, 3, 0, 2, 4).reshape(R * BLOCK, H, Dv)[:n_q]
    lse = l_blocks.view(G, R, group, BLOCK).permute(1, 3, 0, 2).reshape(R * BLOCK, H)[:n_q]
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
    stats = stats if stats is not None else _COLLECTOR.get()
    for idx, (qr, lo, hi, causal) in zip(split_regions(sel, b=b, e=e, P=P, cl=cl),
                                         dense_regions(q_rows, P, e, b, cl, chunk_size, rope_theta)):
        parts.append(region_attention(qr, k_rot[lo:hi], v[lo:hi], idx.vertical, idx.vertical_count, idx.slash,
                                      idx.slash_count, scale=tau, causal=causal, stats=stats))
        if stats is not None:
            stats.causal += causal_pair_count(e - b, hi - lo, causal, H)
    return parts[0] if len(parts) == 1 else merge_lse(parts)
