"""Vertical-slash index estimation by full materialisation: the oracle the bounded estimation is tested against.

Estimation looks at the last ``n = min(last_q, rows)`` query rows: one fp32 softmax over all keys, vertical scores
(column sums, keys 0..29 forced) and diagonal scores (sums along diagonals indexed by the key ``c`` they meet on the
last row, the 100 nearest forced). Top-k is deterministic: a stable descending sort, ties going to the smaller key
for verticals and to the larger ``c`` (nearer diagonal) for slashes. This holds the ``[H, n, N]`` logits and sorts
over N, so it is a test oracle only; serving uses ``longserve.kernels.estimation`` (bounded memory, no host syncs),
which also owns the selection types and the region split.
"""
from __future__ import annotations

import torch

from longserve.kernels.dca_math import apply_rope, selection_positions, work_dtype
from longserve.kernels.estimation import FORCED_DIAGONALS, FORCED_SINKS, Selection
from longserve.kernels.reference.attention import softmax_with_lse


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
    """Top-k per head: verticals once with the largest budget then truncated per head. Budgets are host
    sequences (no device read-back) or tensors."""
    H, N = vertical_scores.shape
    device = vertical_scores.device

    def widest(budget):
        if isinstance(budget, torch.Tensor):
            return int(budget.clamp(max=N).max())
        return min(max(int(x) for x in budget), N)

    kv = torch.as_tensor(vertical_budget, device=device).to(torch.int64).clamp(max=N)
    ks = torch.as_tensor(slash_budget, device=device).to(torch.int64).clamp(max=N)
    vert = ordered_topk(vertical_scores, widest(vertical_budget))
    diag = ordered_topk(diagonal_scores, widest(slash_budget), prefer_larger_index=True)
    return Selection(vert, kv, diag, ks)


def estimate_vertical_slash(q_last, keys, *, scale: float, vertical_size, slash_size) -> Selection:
    """Standalone MInference estimation (docs/algorithms.md#vs-estimation): q_len = kv_len = N, q_last rotated rows
    ``[N - n, N)``.

    Budgets are per head (or scalars): ``k_v = min(N, max(v, 30))``, ``k_s = min(N, max(s, 50))``.
    """
    H = q_last.shape[1]
    kv = torch.as_tensor(vertical_size).expand(H).clamp(min=FORCED_SINKS)
    ks = torch.as_tensor(slash_size).expand(H).clamp(min=50)
    v, d = vs_scores(causal_tail_logits(q_last, keys, scale))
    return select(v, d, kv, ks)


def estimate_dca_selection_oracle(q_rows, k_rot, *, b: int, e: int, P: int, cl, chunk_size, rope_theta,
                                  tau: float, budgets) -> Selection:
    """Oracle of ``estimation.estimate_dca_selection``: the sub-block ``[b, e)`` (un-rotated ``q_rows``) over
    cache keys ``k_rot[:e]``, with the whole ``[H, n, e]`` logits at once.

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
