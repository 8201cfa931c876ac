"""Vertical-slash index estimation (algorithms.md §2.2, §2.5) and the per-region split that feeds the kernels.

Estimation looks at the last ``n = min(last_q, rows)`` query rows: one fp32 softmax over all keys, vertical scores
(column sums, keys 0..29 forced) and diagonal scores (sums along diagonals indexed by the key ``c`` they meet on the
last row, the 100 nearest forced). Top-k is deterministic: a stable descending sort, ties going to the smaller key
for verticals and to the larger ``c`` (nearer diagonal) for slashes (§7 pitfall 12). Everything is batched over
heads with torch ops, so the same code runs on GPU tensors.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from longserve.kernels.reference.attention import softmax_with_lse, work_dtype
from longserve.kernels.reference.dca import selection_positions
from longserve.kernels.reference.rope import apply_rope

FORCED_SINKS = 30
FORCED_DIAGONALS = 100
INT32_MAX = 2**31 - 1
INT32_MIN = -(2**31)


@dataclass(frozen=True)
class Selection:
    """Per-head global selections of one sub-block: key columns ``vertical`` and diagonal ids ``diagonal`` (the
    key each diagonal meets on the sub-block's last row), in score order, valid up to the counts."""
    vertical: torch.Tensor        # [H, KV] int64
    vertical_count: torch.Tensor  # [H] int64
    diagonal: torch.Tensor        # [H, KS] int64
    diagonal_count: torch.Tensor  # [H] int64


@dataclass(frozen=True)
class RegionIndices:
    """Kernel-convention indices of one DCA region: local verticals (ascending, INT32_MAX padded) and local slash
    values (descending, INT32_MIN padded); ``delta_shift`` turns a slash value into the global offset t - j."""
    name: str
    key_start: int
    key_end: int
    causal: bool
    vertical: torch.Tensor        # [H, NV] int64
    vertical_count: torch.Tensor  # [H]
    slash: torch.Tensor           # [H, NS] int64
    slash_count: torch.Tensor     # [H]
    delta_shift: int


def ordered_topk(scores: torch.Tensor, k: int, *, prefer_larger_index: bool = False) -> torch.Tensor:
    """Indices of the k largest entries per row, score-ordered, ties broken by index (deterministic)."""
    k = min(int(k), scores.shape[-1])
    if prefer_larger_index:
        order = torch.sort(scores.flip(-1), dim=-1, descending=True, stable=True).indices[..., :k]
        return scores.shape[-1] - 1 - order
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k]


def causal_tail_logits(q_last: torch.Tensor, keys: torch.Tensor, scale: float) -> torch.Tensor:
    """Logits ``[H, n, N]`` of the last n query rows against keys ``[N, G, D]`` (q already rotated)."""
    n, H, D = q_last.shape
    N, G, _ = keys.shape
    wd = work_dtype(q_last.dtype)
    qg = q_last.to(wd).reshape(n, G, H // G, D).permute(1, 2, 0, 3)
    z = torch.matmul(qg, keys.to(wd).permute(1, 2, 0)[:, None]) * scale     # [G, g, n, N]
    return z.reshape(H, n, N)


def vs_scores(z: torch.Tensor):
    """(vertical [H, N], diagonal [H, N]) scores from logits of the last n rows (row r is query N - n + r)."""
    H, n, N = z.shape
    device = z.device
    rows = torch.arange(N - n, N, device=device)
    allowed = torch.arange(N, device=device)[None, :] <= rows[:, None]            # causal on the last n columns
    p, _ = softmax_with_lse(z.to(torch.promote_types(z.dtype, torch.float32)), allowed[None])
    vertical = p.sum(dim=1)
    vertical[:, :FORCED_SINKS] = float("inf")
    key = torch.arange(N, device=device)[None, :] - (n - 1 - torch.arange(n, device=device))[:, None]  # [n, N]
    ok = key >= 0
    gathered = torch.gather(p, 2, key.clamp(min=0).expand(H, n, N)) * ok
    diagonal = gathered.sum(dim=1)
    diagonal[:, max(0, N - FORCED_DIAGONALS):] = float("inf")
    return vertical, diagonal


def select(vertical_scores, diagonal_scores, vertical_budget, slash_budget) -> Selection:
    """Top-k per head: verticals once with the largest budget then truncated per head (§2.5 step 4)."""
    H, N = vertical_scores.shape
    device = vertical_scores.device
    kv = torch.as_tensor(vertical_budget, device=device).to(torch.int64).clamp(max=N)
    ks = torch.as_tensor(slash_budget, device=device).to(torch.int64).clamp(max=N)
    vert = ordered_topk(vertical_scores, int(kv.max()))
    diag = ordered_topk(diagonal_scores, int(ks.max()), prefer_larger_index=True)
    return Selection(vert, kv, diag, ks)


def estimate_vertical_slash(q_last, keys, *, scale: float, vertical_size, slash_size) -> Selection:
    """Standalone MInference estimation (§2.2): q_len = kv_len = N, q_last rotated rows ``[N - n, N)``.

    Budgets are per head (or scalars): ``k_v = min(N, max(v, 30))``, ``k_s = min(N, max(s, 50))``.
    """
    H = q_last.shape[1]
    kv = torch.as_tensor(vertical_size).expand(H).clamp(min=FORCED_SINKS)
    ks = torch.as_tensor(slash_size).expand(H).clamp(min=50)
    v, d = vs_scores(causal_tail_logits(q_last, keys, scale))
    return select(v, d, kv, ks)


def estimate_dca_selection(q_rows, k_rot, *, b: int, e: int, P: int, cl, chunk_size, rope_theta, tau: float,
                           budgets) -> Selection:
    """§2.5 steps 1-4 for the sub-block ``[b, e)`` (un-rotated ``q_rows``) over cache keys ``k_rot[:e]``.

    The last n rows are rotated per key region with the continuous selection positions (intra ``o(t)``, succ
    ``o(t) + cl``, inter ``o(t) + chunk_size``) so that diagonals stay diagonals across chunk boundaries.
    """
    n = min(int(budgets.last_q), e - b)
    q_last = q_rows[-n:]
    pos = torch.arange(e - n, e, device=q_rows.device)
    if cl is None:
        z = causal_tail_logits(apply_rope(q_last, pos, rope_theta), k_rot[:e], tau)
    else:
        succ_sel, inter_sel = selection_positions(pos, cl, chunk_size)
        parts = []
        if P >= 2 * cl:
            parts.append(causal_tail_logits(apply_rope(q_last, inter_sel, rope_theta), k_rot[:P - cl], tau))
        if P >= cl:
            parts.append(causal_tail_logits(apply_rope(q_last, succ_sel, rope_theta), k_rot[P - cl:P], tau))
        parts.append(causal_tail_logits(apply_rope(q_last, pos % cl, rope_theta), k_rot[P:e], tau))
        z = torch.cat(parts, dim=-1)
    v, d = vs_scores(z)
    return select(v, d, budgets.effective_vertical(), budgets.slash)


def fallback_indices(length: int, device) -> torch.Tensor:
    """~5 evenly spaced local indices ``0, len/5, 2 len/5, ...`` (truncated) for a region left without any."""
    step = max(1.0, length / 5)
    count = math.ceil(length / step)
    return (torch.arange(count, device=device, dtype=torch.float64) * step).to(torch.int64)


def _compact(values: torch.Tensor, keep: torch.Tensor, fallback: torch.Tensor, *, descending: bool):
    """Kept values sorted per head with padding last; heads with none get ``fallback``."""
    pad = INT32_MIN if descending else INT32_MAX
    count = keep.sum(dim=1)
    empty = count == 0
    width = max(int(count.max()) if count.numel() else 0, fallback.numel() if bool(empty.any()) else 0, 1)
    x = torch.where(keep, values, torch.full_like(values, pad))
    x = torch.sort(x, dim=1, descending=descending).values
    if x.shape[1] < width:
        x = torch.cat([x, torch.full((x.shape[0], width - x.shape[1]), pad, dtype=x.dtype, device=x.device)], 1)
    x = x[:, :width]
    if bool(empty.any()):
        fb = torch.full((width,), pad, dtype=x.dtype, device=x.device)
        fb[:fallback.numel()] = fallback.sort(descending=descending).values
        x = torch.where(empty[:, None], fb[None, :], x)
        count = torch.where(empty, torch.full_like(count, fallback.numel()), count)
    return x, count


def split_regions(sel: Selection, *, b: int, e: int, P: int, cl) -> list[RegionIndices]:
    """§2.5 step 5 (+ step 6 fallbacks): global selections -> intra / succ / inter kernel indices."""
    n_q = e - b
    device = sel.vertical.device
    v, d = sel.vertical, sel.diagonal
    v_ok = torch.arange(v.shape[1], device=device)[None, :] < sel.vertical_count[:, None]
    d_ok = torch.arange(d.shape[1], device=device)[None, :] < sel.diagonal_count[:, None]
    specs = [("intra", P, e, True, P, None, e - 1, 0)]
    if cl is not None and P >= cl:
        specs.append(("succ", P - cl, P, False, P - cl, P + n_q, P + n_q - 1, b - P))
    if cl is not None and P >= 2 * cl:
        specs.append(("inter", 0, P - cl, False, None, P - cl + n_q, P - cl + n_q - 1, b - P + cl))
    out = []
    for name, lo, hi, causal, c_lo, c_hi, anchor, shift in specs:
        keep_v = v_ok & (v >= lo) & (v < hi)
        keep_s = d_ok if c_lo is None else d_ok & (d >= c_lo)
        if c_hi is not None:
            keep_s = keep_s & (d < c_hi)
        fb = fallback_indices(hi - lo, device)
        verts, vc = _compact(v - lo, keep_v, fb, descending=False)
        slashes, sc = _compact(anchor - d, keep_s, fb, descending=True)
        out.append(RegionIndices(name, lo, hi, causal, verts, vc, slashes, sc, shift))
    return out
