"""Where attention reads one sequence's keys and values: a contiguous pair of tensors or a paged KV cache.

Both expose ``length`` (keys ``[0, length)`` exist) and ``read(lo, hi) -> (k, v)`` / ``keys(lo, hi)`` returning
``[hi - lo, G, D]`` tensors. Callers read bounded ranges (a key block at a time), so nothing ever materialises a
whole 1M-token context; Triton kernels take the paged cache and block table directly instead. Reads are pure
device indexing: no host synchronisation.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ContiguousKV:
    """Keys/values already laid out contiguously: k, v ``[L, G, D]``."""
    k: torch.Tensor
    v: torch.Tensor

    @property
    def length(self) -> int:
        return self.k.shape[0]

    def keys(self, lo: int, hi: int) -> torch.Tensor:
        return self.k[lo:hi]

    def read(self, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[lo:hi], self.v[lo:hi]


@dataclass(frozen=True)
class PagedKV:
    """One sequence in one layer of a paged cache: caches ``[num_blocks, block_size, G, D]``, ``block_table``
    (int32 or int64, on the caches' device) mapping logical block i to its physical block, keys ``[0, length)``."""
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    block_table: torch.Tensor
    length: int

    @property
    def block_size(self) -> int:
        return self.k_cache.shape[1]

    def _slots(self, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
        pos = torch.arange(lo, hi, device=self.k_cache.device)
        return self.block_table[pos // self.block_size].long(), pos % self.block_size

    def keys(self, lo: int, hi: int) -> torch.Tensor:
        blocks, offsets = self._slots(lo, hi)
        return self.k_cache[blocks, offsets]

    def read(self, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
        blocks, offsets = self._slots(lo, hi)
        return self.k_cache[blocks, offsets], self.v_cache[blocks, offsets]
