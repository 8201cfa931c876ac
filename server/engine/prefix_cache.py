"""Prefix caching: which KV blocks hold which token prefix (torch-free).

A *full* block is named by a chain hash: ``hash(parent's hash, the block's token ids)``, so one hash stands for
the whole prefix up to the block's end, and two sequences get the same hash for block ``i`` exactly when their
first ``(i + 1) * block_size`` tokens agree. K/V at a slot depend only on the tokens up to it, their absolute
positions and engine-wide settings (weights, dtype, DCA chunk/local sizes; keys are stored rotated by absolute
position), so a block reached by the same chain at the same index holds the same K/V in any sequence.

`PrefixIndex` maps hashes to blocks. A block enters it once every token of it is computed; it stays there after
its last owner frees it (the allocator keeps such blocks in an LRU of evictable free blocks) until the slot is
needed for something else.
"""
from __future__ import annotations

import hashlib
from array import array

from longserve.server.engine.sequence import Sequence

_ROOT = hashlib.sha256(b"longserve prefix cache v1").digest()


def chain_hash(parent: bytes | None, token_ids) -> bytes:
    """The hash of a block whose predecessor hashes to `parent` (None for the first block)."""
    return hashlib.sha256((_ROOT if parent is None else parent) + array("q", token_ids).tobytes()).digest()


def full_block_hashes(seq: Sequence, block_size: int, count: int | None = None) -> list[bytes]:
    """`seq.block_hashes` extended to its first `count` full blocks (default: every full block of prompt +
    outputs so far). Tokens never change once written, so hashes stay valid across preemption; each block is
    hashed once, when first asked for."""
    hashes = seq.block_hashes
    full = seq.num_tokens // block_size
    for i in range(len(hashes), full if count is None else min(count, full)):
        hashes.append(chain_hash(hashes[-1] if hashes else None,
                                 seq.token_ids(i * block_size, (i + 1) * block_size)))
    return hashes


class PrefixIndex:
    """Hash <-> block maps of the blocks whose contents are known."""

    def __init__(self) -> None:
        self._block_of: dict[bytes, int] = {}
        self._hash_of: dict[int, bytes] = {}

    def __len__(self) -> int:
        return len(self._block_of)

    def lookup(self, h: bytes) -> int | None:
        return self._block_of.get(h)

    def holds(self, block: int) -> bool:
        return block in self._hash_of

    def register(self, block: int, h: bytes) -> None:
        """`block` now holds the prefix named `h`. The first block registered for a hash keeps it (a second
        sequence that computed the same prefix at the same time keeps its copy unregistered)."""
        if h not in self._block_of and block not in self._hash_of:
            self._block_of[h] = block
            self._hash_of[block] = h

    def forget(self, block: int) -> None:
        """`block` is being reused for other tokens (evicted)."""
        h = self._hash_of.pop(block, None)
        if h is not None:
            del self._block_of[h]
