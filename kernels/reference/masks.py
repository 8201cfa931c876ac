"""Dense boolean masks of sparse patterns (docs/algorithms.md#vertical-slash, docs/algorithms.md#index-building,
docs/algorithms.md#region-split): the oracle side of every sparse test.

All masks are ``[H or 1, n_q, n_k]`` bools of allowed (query, key) pairs, bottom-right aligned like the kernels
(row r is query ``(n_k - n_q) + r`` in causal regions), ready for ``attention_with_lse(..., mask=...)``.
"""
from __future__ import annotations

import torch

from longserve.kernels.reference.vertical_slash import covered_mask

__all__ = ["a_shape_mask", "block_sparse_mask", "covered_mask", "subblock_selected_mask", "vs_region_mask"]


def _valid(values: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    return torch.arange(values.shape[1], device=values.device)[None, :] < count.to(values.device)[:, None]


def vs_region_mask(n_q: int, kv: int, vertical, vertical_count, slash, slash_count, *, causal: bool) -> torch.Tensor:
    """Exact VS mask of one region in kernel convention: ``j in V`` or ``off + r - j in S`` (∩ causal)."""
    H = vertical.shape[0]
    device = vertical.device
    off = kv - n_q if causal else kv
    rows = torch.arange(n_q, device=device)[:, None]
    keys = torch.arange(kv, device=device)[None, :]
    is_v = torch.zeros((H, kv + 1), dtype=torch.bool, device=device)
    vv = vertical.to(torch.int64)
    ok = _valid(vv, vertical_count) & (vv >= 0) & (vv < kv)
    is_v.scatter_(1, torch.where(ok, vv, kv), True)
    mask = is_v[:, None, :kv].expand(H, n_q, kv).clone()
    s_of_pair = off + rows - keys                                     # [n_q, kv]
    for h in range(H):
        s = slash[h, :int(slash_count[h])].to(device=device, dtype=torch.int64)
        mask[h] |= torch.isin(s_of_pair, s)
    if causal:
        mask &= (s_of_pair >= 0)[None]
    return mask


def subblock_selected_mask(regions, b: int, e: int) -> torch.Tensor:
    """Global exact selection ``[H, e - b, e]`` of one DCA sub-block from its ``RegionIndices``
    (docs/algorithms.md#region-split)."""
    H = regions[0].vertical.shape[0]
    mask = torch.zeros((H, e - b, e), dtype=torch.bool, device=regions[0].vertical.device)
    for reg in regions:
        mask[:, :, reg.key_start:reg.key_end] = vs_region_mask(
            e - b, reg.key_end - reg.key_start, reg.vertical, reg.vertical_count, reg.slash, reg.slash_count,
            causal=reg.causal)
    return mask


def a_shape_mask(n_q: int, n_k: int, *, n_init: int, n_local: int, device=None) -> torch.Tensor:
    """A-shape (StreamingLLM-like): causal pairs with ``j < n_init`` (sinks) or ``t - j < n_local`` (band)."""
    if n_init < 0 or n_local < 0:
        raise ValueError(f"n_init and n_local must be >= 0, got {n_init}, {n_local}")
    t = (n_k - n_q) + torch.arange(n_q, device=device)[:, None]
    j = torch.arange(n_k, device=device)[None, :]
    return ((j <= t) & ((j < n_init) | (t - j < n_local)))[None]


def block_sparse_mask(q: torch.Tensor, k: torch.Tensor, *, top_k: int, block: int = 64,
                      scale: float | None = None) -> torch.Tensor:
    """Block-sparse pattern: mean-pool q (rotated, ``[n_q, H, D]``) and k (``[n_k, G, D]``) over ``block`` rows,
    score pooled q-blocks against pooled k-blocks not after them, keep the ``top_k`` k-blocks per (head, q-block)
    (ties to the nearer block), element-wise causal inside. Returns ``[H, n_q, n_k]``."""
    n_q, H, D = q.shape
    n_k, G, _ = k.shape
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    off = n_k - n_q
    scale = D ** -0.5 if scale is None else scale
    device = q.device
    wd = torch.promote_types(q.dtype, torch.float32)
    rq, rk = -(-n_q // block), -(-n_k // block)

    def pool(x, n_blocks):
        pad = torch.zeros((n_blocks * block - x.shape[0], *x.shape[1:]), dtype=wd, device=device)
        sums = torch.cat([x.to(wd), pad]).view(n_blocks, block, *x.shape[1:]).sum(1)
        counts = torch.full((n_blocks,), block, dtype=wd, device=device)
        counts[-1] = x.shape[0] - (n_blocks - 1) * block
        return sums / counts.view(-1, *([1] * (x.dim() - 1)))

    pq = pool(q, rq)                                                        # [rq, H, D]
    pk = pool(k, rk).repeat_interleave(H // G, dim=1)                       # [rk, H, D]
    scores = torch.einsum("qhd,khd->hqk", pq, pk) * scale
    last_key = off + torch.clamp((torch.arange(rq, device=device) + 1) * block, max=n_q) - 1
    reachable = (torch.arange(rk, device=device) * block)[None, :] <= last_key[:, None]
    scores = scores.masked_fill(~reachable[None], float("-inf"))
    order = torch.sort(scores.flip(-1), dim=-1, descending=True, stable=True).indices[..., :min(top_k, rk)]
    chosen = torch.zeros((H, rq, rk), dtype=torch.bool, device=device)
    chosen.scatter_(2, rk - 1 - order, True)
    chosen &= reachable[None]
    mask = chosen.repeat_interleave(block, dim=1)[:, :n_q].repeat_interleave(block, dim=2)[:, :, :n_k]
    t = off + torch.arange(n_q, device=device)[:, None]
    return mask & (torch.arange(n_k, device=device)[None, :] <= t)[None]
