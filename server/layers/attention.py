"""Per-step attention over the paged KV cache: new keys are rotated at their DCA key positions and
written to their slots, then prefill chunks run DCA (dense, or vertical-slash sparse above the
threshold) and decode tokens run the paged DCA decode, all through `longserve.kernels`."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from longserve import kernels


@dataclass(frozen=True)
class DCASettings:
    rope_theta: float
    chunk_size: int | None          # None: plain RoPE attention
    local_size: int | None
    original_max_position_embeddings: int = 0


@dataclass(frozen=True)
class PrefillSpan:
    rows: slice                     # rows of this step's tokens
    end: int                        # keys [0, end) exist after this step
    prompt_len: int                 # N for YaRN and the sparse threshold
    block_table: torch.Tensor       # int32 [blocks covering end] (a view of the runner's device table)


@dataclass(frozen=True)
class StepMetadata:
    """Everything the layers need for one step, prepared once by the runner: no layer reads a device value
    back to the host for it (the decode length maximum is a host int, the per-sequence scales a device tensor)."""
    positions: torch.Tensor         # int64 [T] absolute positions of this step's tokens
    slots: torch.Tensor             # int64 [T] KV slot of each token: physical block * block_size + offset
    prefills: tuple[PrefillSpan, ...]
    decode_rows: torch.Tensor       # int64 [B]
    decode_block_tables: torch.Tensor  # int32 [B, max_blocks]
    decode_seq_lens: torch.Tensor   # int32 [B]
    decode_max_seq_len: int | None = None      # max of decode_seq_lens (host int); None: kernels read it back
    decode_scales: torch.Tensor | None = None  # fp64 [B] softmax scale 1/sqrt(D) * m(N)^2 per sequence


class KVCache:
    """K (rotated, unscaled) and V for every layer: [layers, blocks, block_size, G, D]."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        shape = (num_layers, num_blocks, block_size, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.block_size = block_size


class PagedDCABackend:
    def __init__(self, cache: KVCache, meta: StepMetadata, dca: DCASettings, sparse_budgets=None,
                 pair_stats=None):
        self.cache, self.meta, self.dca = cache, meta, dca
        self.sparse_budgets = sparse_budgets   # callable layer -> SparseHeadBudgets, or None (dense)
        self.pair_stats = pair_stats           # kernels.PairStats the prefill calls add into, or None

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        m, d = self.meta, self.dca
        k_rot = kernels.rotate_keys(k, m.positions, rope_theta=d.rope_theta, chunk_size=d.chunk_size,
                                    local_size=d.local_size).to(self.cache.k.dtype)
        self.cache.k[layer].flatten(0, 1)[m.slots] = k_rot        # [blocks * block_size, G, D] views
        self.cache.v[layer].flatten(0, 1)[m.slots] = v.to(self.cache.v.dtype)
        out = torch.empty_like(q)
        common = dict(rope_theta=d.rope_theta, chunk_size=d.chunk_size, local_size=d.local_size,
                      original_max_position_embeddings=d.original_max_position_embeddings)
        if m.decode_rows.numel():
            out[m.decode_rows] = kernels.paged_dca_decode(
                q[m.decode_rows], self.cache.k[layer], self.cache.v[layer], m.decode_block_tables,
                m.decode_seq_lens, max_seq_len=m.decode_max_seq_len, scales=m.decode_scales,
                **common).to(q.dtype)
        sparse = self.sparse_budgets(layer) if self.sparse_budgets is not None else None
        for span in m.prefills:            # reads K/V through the block table: no whole-context gather
            kv = kernels.PagedKV(self.cache.k[layer], self.cache.v[layer], span.block_table, span.end)
            out[span.rows] = kernels.paged_dual_chunk_attention(
                q[span.rows], kv, prompt_len=span.prompt_len, sparse=sparse, stats=self.pair_stats,
                **common).to(q.dtype)
        return out
