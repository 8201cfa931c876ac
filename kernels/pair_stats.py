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
    def with_selected(cls) -> "PairStats":
        return cls(selected=0)

    @property
    def counts_selected(self) -> bool:
        return self.selected is not None

    def add(self, other: "PairStats") -> "PairStats":
        """Adds ``other``'s counts into this one (selected only when both count it); returns self."""
        self.computed = self.computed + other.computed
        self.causal = self.causal + other.causal
        if self.selected is not None and other.selected is not None:
            self.selected = self.selected + other.selected
        return self

    def resolved(self) -> "PairStats":
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
