"""(query, key) pair counts of a prefill, returned by the attention entries instead of kept in a global.

Definitions (shared by the reference and the Triton paths):
- ``computed``: pairs scored with the key inside its region and causally visible to the query row; a key the
  work lists name twice for one row (a column inside a listed block) is scored, and counted, twice.
- ``causal``: the pairs dense attention scores over the same regions (bottom-right causal intra region, full
  succ and inter rectangles), so ``computed / causal`` is the work fraction of sparse prefill.
- ``selected`` (optional, None unless asked for): pairs of the exact vertical-slash mask ``j in V or t - j in S``
  behind the work lists, for comparing the tile work with the selection it serves.

Values may be Python ints or 0-dim integer tensors on the device, so the GPU path adds counts without a
device-to-host copy per layer; ``resolved()`` turns them into ints once (one synchronisation per step).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


def _as_int(x) -> int | None:
    if x is None:
        return None
    return int(x.item()) if isinstance(x, torch.Tensor) else int(x)


@dataclass
class PairStats:
    """Mutable pair counters a prefill call adds into (``stats=`` argument of the prefill entries)."""
    computed: int | torch.Tensor = 0
    causal: int | torch.Tensor = 0
    selected: int | torch.Tensor | None = None     # set to 0 to ask the reference path for exact-mask counts

    @classmethod
    def with_selected(cls) -> PairStats:
        return cls(selected=0)

    @property
    def counts_selected(self) -> bool:
        return self.selected is not None

    def add(self, other: PairStats) -> PairStats:
        """Adds ``other``'s counts into this one (selected only when both count it); returns self."""
        self.computed = self.computed + other.computed
        self.causal = self.causal + other.causal
        if self.selected is not None and other.selected is not None:
            self.selected = self.selected + other.selected
        return self

    def resolved(self) -> PairStats:
        """A copy with plain ints (reads device counters back once)."""
        return PairStats(computed=_as_int(self.computed), causal=_as_int(self.causal),
                         selected=_as_int(self.selected))

    @property
    def computed_fraction(self) -> float | None:
        """computed / causal as a float, None before any sparse pair was counted."""
        causal = _as_int(self.causal)
        return _as_int(self.computed) / causal if causal else None

    @property
    def selected_fraction(self) -> float | None:
        causal = _as_int(self.causal)
        return _as_int(self.selected) / causal if causal and self.selected is not None else None


def region_pairs(n_q: int, kv: int, causal: bool, heads: int) -> int:
    """(query, key) pairs dense attention scores in one region: bottom-right causal or the full rectangle."""
    if not causal:
        return n_q * kv * heads
    off = kv - n_q
    return heads * (n_q * (off + 1) + n_q * (n_q - 1) // 2)


def selected_pair_count(region, n_q: int, rows_per_tile: int = 4096) -> torch.Tensor:
    """Pairs of the exact mask ``j in V or off + r - j in S`` of one region (``RegionIndices``), causally
    visible and inside the region: |V| + |S| - |V and S| per row, counted without a dense mask."""
    kv = region.key_end - region.key_start
    device = region.vertical.device
    H = region.vertical.shape[0]
    off = kv - n_q if region.causal else kv
    v = region.vertical.to(torch.int64)
    s = region.slash.to(torch.int64)
    v_ok = (torch.arange(v.shape[1], device=device)[None, :] < region.vertical_count.to(device)[:, None]) \
        & (v >= 0) & (v < kv)
    s_ok = torch.arange(s.shape[1], device=device)[None, :] < region.slash_count.to(device)[:, None]
    size = off + n_q                                         # slash values of in-region keys lie in [0, size)
    is_s = torch.zeros((H, size + 1), dtype=torch.bool, device=device)
    is_s.scatter_(1, torch.where(s_ok & (s >= 0) & (s < size), s, size), True)
    is_s = is_s[:, :size]
    total = torch.zeros((), dtype=torch.int64, device=device)
    for t0 in range(0, n_q, rows_per_tile):
        r = torch.arange(t0, min(n_q, t0 + rows_per_tile), device=device)
        key_of_s = off + r[None, :, None] - s[:, None, :]                          # [H, T, NS]
        s_in = s_ok[:, None, :] & (key_of_s >= 0) & (key_of_s < kv) & (s[:, None, :] >= 0)
        if region.causal:
            v_in = v_ok[:, None, :] & (v[:, None, :] <= off + r[None, :, None])   # [H, T, NV]
        else:
            v_in = v_ok[:, None, :].expand(H, r.numel(), v.shape[1])
        s_of_v = off + r[None, :, None] - v[:, None, :]
        both = v_in & (s_of_v >= 0) & (s_of_v < size)
        both &= torch.gather(is_s, 1, s_of_v.clamp(0, size - 1).reshape(H, -1)).view_as(both)
        total += v_in.sum() + s_in.sum() - both.sum()
    return total
