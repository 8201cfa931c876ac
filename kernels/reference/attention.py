"""Dense attention with log-sum-exp and the LSE merge: the ground truth every kernel is checked against.

Shapes follow the kernel contract: q ``[n_q, H, D]``, k/v ``[n_k, G, D]`` with ``H = G * group`` and query head
``h`` reading KV head ``h // group`` (K/V are never repeated). LSE is natural-log, ``[n_q, H]``. A row with no keys
returns ``O = 0, LSE = -inf`` (never NaN). Work happens in ``promote(dtype, float32)`` so fp64 inputs give an fp64
truth; rows are processed in tiles so long inputs never hold an ``n_q x n_k`` score matrix at once.
"""
from __future__ import annotations

import contextlib
import contextvars

import torch

from longserve.kernels.dca_math import work_dtype

# Scores held per tile (elements); 2**24 fp32 scores = 64 MiB.
TILE_ELEMENTS = 1 << 24


def check_shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> int:
    """Validate contract shapes; returns the GQA group size."""
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(f"expected q [n_q, H, D], k/v [n_k, G, D]; got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if k.shape[:2] != v.shape[:2] or q.shape[2] != k.shape[2]:
        raise ValueError(f"k/v and head dims disagree: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    H, G = q.shape[1], k.shape[1]
    if G == 0 or H % G:
        raise ValueError(f"query heads {H} must be a multiple of KV heads {G}")
    return H // G


def softmax_with_lse(scores: torch.Tensor, allowed: torch.Tensor | None, *, inplace: bool = False):
    """Row softmax over the last axis with -inf where not allowed; returns (p, lse), safe for empty rows.

    ``inplace`` lets a caller that owns ``scores`` skip a copy (it is overwritten by p).
    """
    if not inplace:
        scores = scores.clone()
    if allowed is not None:
        scores.masked_fill_(~allowed, float("-inf"))
    m = scores.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))           # rows without keys: exp(-inf) = 0
    p = scores.sub_(m).exp_()
    total = p.sum(dim=-1, keepdim=True)
    p.div_(torch.where(total > 0, total, torch.ones_like(total)))
    return p, (m + torch.log(total)).squeeze(-1)


def masked_exp(scores: torch.Tensor, allowed: torch.Tensor | None, dim: int = -1, *,
               blocked: torch.Tensor | None = None):
    """In place on ``scores``: (unnormalised weights e, safe row sums, LSE) along ``dim``; pairs outside
    ``allowed`` (or inside ``blocked``, the complement, which saves a negation) get no weight.

    Dividing ``e @ V`` by the sums afterwards touches ``n x Dv`` values instead of normalising ``n x n_k`` weights.
    Rows without keys get e = 0, sum 1 (so O = 0) and LSE = -inf.
    """
    if allowed is not None:
        scores.masked_fill_(~allowed, float("-inf"))
    if blocked is not None:
        scores.masked_fill_(blocked, float("-inf"))
    m = scores.amax(dim=dim, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = scores.sub_(m).exp_()
    total = e.sum(dim=dim, keepdim=True)
    lse = (m + torch.log(total)).squeeze(dim)
    return e, torch.where(total > 0, total, torch.ones_like(total)), lse


_FUSED_CPU = contextvars.ContextVar("longserve_fused_cpu_attention", default=True)


@contextlib.contextmanager
def tiled_math_only():
    """Inside the block, fp32 CPU calls use the tiled math too (benchmarks comparing like with like)."""
    token = _FUSED_CPU.set(False)
    try:
        yield
    finally:
        _FUSED_CPU.reset(token)


def _cpu_flash(q, k, v, *, scale: float, causal: bool, group: int):
    """fp32 CPU fast path through PyTorch's fused flash attention, which also returns the natural-log LSE.

    Its causal mask is top-left aligned, so a bottom-right causal call is split into the keys every row sees
    (non-causal) and the square tail (where both alignments agree), then merged by LSE. K/V are broadcast
    to the group as views, never copied. Same contract and fp32 accuracy as the tiled math below.
    """
    n_q, H, D = q.shape
    n_k, G, Dv = v.shape
    qg = q.to(torch.float32).reshape(n_q, G, group, D).permute(1, 2, 0, 3)      # [G, g, n_q, D]
    kg = k.to(torch.float32).permute(1, 0, 2)[:, None].expand(G, group, n_k, D)
    vg = v.to(torch.float32).permute(1, 0, 2)[:, None].expand(G, group, n_k, Dv)
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    off = n_k - n_q
    parts = []
    if not causal:
        parts.append(flash(qg, kg, vg, 0.0, False, attn_mask=None, scale=scale))
    else:
        if off:
            parts.append(flash(qg, kg[:, :, :off], vg[:, :, :off], 0.0, False, attn_mask=None, scale=scale))
        parts.append(flash(qg, kg[:, :, off:], vg[:, :, off:], 0.0, True, attn_mask=None, scale=scale))
    if len(parts) == 1:
        o, lse = parts[0]
    else:
        (o1, l1), (o2, l2) = parts
        lse = torch.logaddexp(l1, l2)
        o = o1 * torch.exp(l1 - lse)[..., None] + o2 * torch.exp(l2 - lse)[..., None]
    return o.permute(2, 0, 1, 3).reshape(n_q, H, Dv), lse.permute(2, 0, 1).reshape(n_q, H)


def attend(q, k, v, *, scale: float, causal: bool = False, mask: torch.Tensor | None = None):
    """Like ``attention_with_lse`` but returns O in the working dtype (for merges that must stay in fp32)."""
    group = check_shapes(q, k, v)
    n_q, H, D = q.shape
    n_k, G, Dv = v.shape
    wd = work_dtype(q.dtype)
    if mask is not None and (mask.dim() != 3 or mask.shape[0] not in (1, H) or tuple(mask.shape[1:]) != (n_q, n_k)):
        raise ValueError(f"mask must be bool [H or 1, {n_q}, {n_k}], got {tuple(mask.shape)}")
    if (wd == torch.float32 and mask is None and q.device.type == "cpu" and 0 < n_q <= n_k and D == Dv
            and _FUSED_CPU.get()):
        return _cpu_flash(q, k, v, scale=scale, causal=causal, group=group)
    out = torch.zeros((n_q, H, Dv), dtype=wd, device=q.device)
    lse = torch.full((n_q, H), float("-inf"), dtype=wd, device=q.device)
    if n_q == 0 or n_k == 0:
        return out, lse
    off = n_k - n_q
    qg = (q.to(wd) * scale).reshape(n_q, G, group, D).permute(1, 2, 0, 3)   # [G, g, n_q, D], pre-scaled
    kg = k.to(wd).permute(1, 0, 2)                                      # [G, n_k, D]
    vg = v.to(wd).permute(1, 0, 2)
    tile = max(1, TILE_ELEMENTS // max(1, H * n_k))
    for r0 in range(0, n_q, tile):
        r1 = min(n_q, r0 + tile)
        kend = n_k if not causal else max(0, min(n_k, off + r1))       # keys past the tile's last row unused
        if kend == 0:
            continue
        s = torch.matmul(qg[:, :, r0:r1], kg[:, None, :kend].transpose(-1, -2))   # [G, g, T, kend]
        allowed = None
        if causal:
            rows = torch.arange(r0, r1, device=q.device)
            allowed = torch.arange(kend, device=q.device)[None, :] <= (off + rows)[:, None]
            allowed = allowed[None, None]
        if mask is not None:
            mt = mask[:, r0:r1, :kend].to(q.device)
            mt = mt.reshape(G, group, r1 - r0, kend) if mt.shape[0] == H else mt[None]
            allowed = mt if allowed is None else allowed & mt
        e, total, l_ = masked_exp(s, allowed)
        o = torch.matmul(e, vg[:, None, :kend]).div_(total)             # [G, g, T, Dv]
        out[r0:r1] = o.permute(2, 0, 1, 3).reshape(r1 - r0, H, Dv)
        lse[r0:r1] = l_.permute(2, 0, 1).reshape(r1 - r0, H)
    return out, lse


def attention_with_lse(q, k, v, *, scale: float, causal: bool = False, mask: torch.Tensor | None = None):
    """Softmax attention -> (O like q's dtype ``[n_q, H, Dv]``, LSE ``[n_q, H]`` fp32/fp64).

    ``causal`` is bottom-right aligned (row r sees keys ``<= (n_k - n_q) + r``); ``mask`` is a bool
    ``[H or 1, n_q, n_k]`` of allowed pairs, combined with ``causal`` when both are given.
    """
    out, lse = attend(q, k, v, scale=scale, causal=causal, mask=mask)
    return out.to(q.dtype), lse


def merge_lse(parts):
    """Merge partial attentions over disjoint key sets: list of (O ``[n, H, D]``, LSE ``[n, H]``) -> (O, LSE).

    Equals one softmax over the union of the parts' keys (docs/algorithms.md#lse-merge). Runs in fp32 (fp64 if any
    input is fp64); parts with ``LSE = -inf`` get weight exactly 0 and all-empty rows give ``O = 0, LSE = -inf``.
    """
    parts = list(parts)
    if not parts:
        raise ValueError("merge_lse needs at least one part")
    wd = torch.float32
    for o, l_ in parts:
        wd = torch.promote_types(wd, torch.promote_types(o.dtype, l_.dtype))
    os_ = torch.stack([o.to(wd) for o, _ in parts])          # [P, n, H, D]
    ls = torch.stack([l_.to(wd) for _, l_ in parts])         # [P, n, H]
    m = ls.amax(dim=0)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    w = torch.exp(ls - m)                                      # exp(-inf) = 0: empty parts drop out
    total = w.sum(dim=0)
    safe = torch.where(total > 0, total, torch.ones_like(total))
    out = (w[..., None] * torch.nan_to_num(os_, nan=0.0)).sum(dim=0) / safe[..., None]
    return out, m + torch.log(total)
