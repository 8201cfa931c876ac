"""The math of dual chunk attention that the Triton path and the reference oracles share.

Definitions, not implementations to be checked: the chunk length ``cl = chunk_size - local_size``, the RoPE
positions of keys (``j mod cl``) and of queries (intra, succ, inter), the sparse estimation's selection
positions, the YaRN softmax scale, the cutting of a prefill's queries into sub-blocks at multiples of ``cl``,
the dense regions (intra / succ / inter) each sub-block attends, NeoX rotary embedding with fp64 angles, and the
accumulation dtype. Both ``kernels/dca.py`` (Triton) and ``kernels/reference/`` (the oracles) import them from here,
so the two paths cannot drift apart on what they compute, only on how. docs/algorithms.md defines each.

Rotation: positions reach ``o + chunk_size`` (~5e5) with ``rope_theta = 1e7`` for the selection variants; fp32
angles lose several digits there, so angles are always fp64 and only cos/sin are cast.
"""
from __future__ import annotations

import math

import torch


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: fp64 stays fp64, everything else runs in fp32."""
    return torch.promote_types(dtype, torch.float32)


def inv_freq(head_dim: int, theta: float, device=None) -> torch.Tensor:
    """``theta ** (-2i / D)`` for i in [0, D/2), float64."""
    if head_dim <= 0 or head_dim % 2:
        raise ValueError(f"head_dim must be a positive even number, got {head_dim}")
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim
    return torch.pow(torch.tensor(float(theta), dtype=torch.float64, device=device), -exponents)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype = torch.float32):
    """(cos, sin) of shape ``[n, D/2]`` for integer positions ``[n]``, angles in float64."""
    pos = torch.as_tensor(positions).to(torch.float64)
    angles = pos[:, None] * inv_freq(head_dim, theta, device=pos.device)[None, :]
    return torch.cos(angles).to(dtype), torch.sin(angles).to(dtype)


def apply_rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate ``x [n, heads, D]`` at ``positions [n]`` (NeoX layout: pairs (i, i + D/2)); returns x's dtype."""
    if x.dim() != 3:
        raise ValueError(f"apply_rope expects [n, heads, D], got {tuple(x.shape)}")
    positions = torch.as_tensor(positions, device=x.device)
    if positions.shape != (x.shape[0],):
        raise ValueError(f"positions must be [{x.shape[0]}], got {tuple(positions.shape)}")
    wd = torch.promote_types(x.dtype, torch.float32)
    cos, sin = rope_cos_sin(positions, x.shape[-1], theta, dtype=wd)
    cos, sin = cos[:, None, :], sin[:, None, :]
    xw = x.to(wd)
    half = x.shape[-1] // 2
    x1, x2 = xw[..., :half], xw[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


def chunk_length(chunk_size, local_size):
    """``cl = chunk_size - local_size``, or None when DCA is off (both None)."""
    if chunk_size is None and local_size is None:
        return None
    if chunk_size is None or local_size is None:
        raise ValueError("chunk_size and local_size must both be set, or both be None (DCA off)")
    if int(local_size) < 0 or int(chunk_size) - int(local_size) <= 0:
        raise ValueError(f"need 0 <= local_size < chunk_size, got chunk_size={chunk_size}, local_size={local_size}")
    return int(chunk_size) - int(local_size)


def key_positions(positions: torch.Tensor, cl) -> torch.Tensor:
    """RoPE position of the key stored for absolute position j: ``j mod cl`` (j when DCA is off)."""
    return positions if cl is None else positions % cl


def query_positions(positions: torch.Tensor, cl, chunk_size):
    """(intra, succ, inter) RoPE positions for absolute query positions (docs/algorithms.md#dca-positions); succ/inter
    None when DCA is off."""
    if cl is None:
        return positions, None, None
    o = positions % cl
    return o, torch.clamp(o + cl, max=chunk_size), torch.full_like(positions, min(2 * cl - 1, chunk_size))


def selection_positions(positions: torch.Tensor, cl, chunk_size):
    """(succ_sel, inter_sel) positions used only by sparse index estimation: ``o + cl`` and ``o + chunk_size``."""
    o = positions % cl
    return o + cl, o + chunk_size


def relative_positions(L: int, chunk_size, local_size, clamp_max=None) -> torch.Tensor:
    """``R[t, j]`` = query RoPE position minus key RoPE position for causal pairs, -1 above the diagonal.

    ``clamp_max`` (default ``chunk_size``, the deployed-code convention) bounds the succ query position; pass
    ``chunk_size - 1`` to reproduce the paper's figure (clamp convention, docs/algorithms.md#dca-positions).
    """
    cl = chunk_length(chunk_size, local_size)
    pos = torch.arange(L, dtype=torch.int64)
    kp = key_positions(pos, cl)
    if cl is None:
        rel = pos[:, None] - kp[None, :]
    else:
        cmax = int(chunk_size) if clamp_max is None else int(clamp_max)
        o = pos % cl
        succ = torch.clamp(o + cl, max=cmax)
        inter = min(2 * cl - 1, cmax)
        dc = (pos // cl)[:, None] - (pos // cl)[None, :]
        q_pos = torch.where(dc == 0, o[:, None], torch.where(dc == 1, succ[:, None], torch.full_like(dc, inter)))
        rel = q_pos - kp[None, :]
    return torch.where(pos[None, :] <= pos[:, None], rel, torch.full_like(rel, -1))


def yarn_mscale(n: int, original_max: int) -> float:
    """``m(N) = max(1, 0.1 ln(N / original_max) + 1)``; 1 when scaling is off (original_max = 0)."""
    if not original_max or n <= 0:
        return 1.0
    return max(1.0, 0.1 * math.log(n / original_max) + 1.0)


def softmax_scale(head_dim: int, scale, original_max: int, n_tokens: int) -> float:
    """``tau = (scale or 1/sqrt(D)) * m(N)^2`` (YaRN applied on the query side, docs/algorithms.md#yarn-scale)."""
    base = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    m = yarn_mscale(n_tokens, original_max)
    return base * m * m


def sub_blocks(kv_len: int, n_q: int, cl):
    """Query sub-blocks ``(b, e, P)``: absolute ``[b, e)`` inside the DCA chunk starting at ``P``."""
    b = kv_len - n_q
    while b < kv_len:
        P = 0 if cl is None else (b // cl) * cl
        e = kv_len if cl is None else min(P + cl, kv_len)
        yield b, e, P
        b = e


def rotate_keys(k: torch.Tensor, positions: torch.Tensor, *, rope_theta, chunk_size, local_size) -> torch.Tensor:
    """Keys ``[n, G, D]`` at absolute ``positions [n]`` rotated as the KV cache stores them (``j mod cl``)."""
    cl = chunk_length(chunk_size, local_size)
    positions = torch.as_tensor(positions, device=k.device).to(torch.int64)
    return apply_rope(k, key_positions(positions, cl), rope_theta)


def region_bounds(P: int, e: int, cl) -> list[tuple[str, int, int, bool]]:
    """[(name, key start, key end, causal)] a sub-block of the DCA chunk starting at ``P`` (queries up to ``e``)
    attends: intra ``[P, e)`` (causal), then succ ``[P - cl, P)`` and inter ``[0, P - cl)`` when they exist."""
    regions = [("intra", P, e, True)]
    if cl is not None and P >= cl:
        regions.append(("succ", P - cl, P, False))
    if cl is not None and P >= 2 * cl:
        regions.append(("inter", 0, P - cl, False))
    return regions


def dense_regions(q_rows, P: int, e: int, b: int, cl, chunk_size, rope_theta):
    """[(rotated q, key start, key end, causal)] for one sub-block (``region_bounds``), each region's queries
    rotated at its own positions."""
    pos = torch.arange(b, e, device=q_rows.device)
    rotation = dict(zip(("intra", "succ", "inter"), query_positions(pos, cl, chunk_size)))
    return [(apply_rope(q_rows, rotation[name], rope_theta), lo, hi, causal)
            for name, lo, hi, causal in region_bounds(P, e, cl)]
