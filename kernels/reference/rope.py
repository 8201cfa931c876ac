"""NeoX (half-split) rotary embedding with angles computed in float64.

Positions reach ``o + chunk_size`` (~5e5) with ``rope_theta = 1e7`` for the selection variants; fp32 angles lose
several digits there (algorithms.md §7 pitfall 10), so angles are always fp64 and only cos/sin are cast.
"""
from __future__ import annotations

import torch


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
