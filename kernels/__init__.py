"""Public attention API of LongServe: dual chunk attention (dense or vertical-slash sparse prefill), paged DCA
decode, key rotation for the KV cache, and the sparse-config types.

Every call dispatches on its tensors (``longserve.kernels.dispatch``): CUDA tensors on sm_80+ run the Triton
kernels (imported lazily), everything else runs the same-signature PyTorch references in
``longserve.kernels.reference``. Shapes: q ``[n_q, H, D]``, k/v ``[n_k, G, D]`` with query head h reading KV head
``h // (H // G)``; LSE is natural-log fp32 ``[n_q, H]``. See docs/algorithms.md.
"""
from __future__ import annotations

from longserve.kernels import dispatch
from longserve.kernels.dca_math import relative_positions, rotate_keys, yarn_mscale
from longserve.kernels.kv_source import ContiguousKV, PagedKV
from longserve.kernels.pair_stats import PairStats
from longserve.kernels.sparse_config import (
    HeadPattern,
    SparseAttentionConfig,
    SparseHeadBudgets,
    load_sparse_attention_config,
    refine_sparse_config,
)

__all__ = [
    "ContiguousKV",
    "HeadPattern",
    "PagedKV",
    "PairStats",
    "SparseAttentionConfig",
    "SparseHeadBudgets",
    "dual_chunk_attention",
    "load_sparse_attention_config",
    "paged_dual_chunk_attention",
    "paged_dca_decode",
    "refine_sparse_config",
    "relative_positions",
    "rotate_keys",
    "vertical_slash_attention",
    "yarn_mscale",
]


def dual_chunk_attention(q, k, v, *, rope_theta, chunk_size, local_size, original_max_position_embeddings=0,
                         prompt_len=None, sparse=None, return_lse=False, keys_rotated=False, scale=None, stats=None):
    """DCA prefill for queries at absolute positions ``[kv_len - n_q, kv_len)`` over keys ``[0, kv_len)``.

    q is un-rotated; k is un-rotated unless ``keys_rotated`` (then it carries RoPE at ``j mod cl`` as the KV cache
    stores it). ``chunk_size = local_size = None`` is plain causal RoPE attention. ``scale`` defaults to
    ``1/sqrt(D)``; the YaRN factor ``m(prompt_len or kv_len)^2`` is applied on top. ``sparse`` is None (dense) or
    a ``SparseHeadBudgets`` for the H heads of this call; sparse prefill runs iff the prompt length exceeds its
    threshold. ``stats`` (a ``PairStats``) gets the call's (query, key) pair counts added. Returns O ``[n_q, H,
    D]`` (and LSE ``[n_q, H]`` when ``return_lse``).
    """
    return dispatch.dual_chunk_attention(
        q, k, v, rope_theta=rope_theta, chunk_size=chunk_size, local_size=local_size,
        original_max_position_embeddings=original_max_position_embeddings, prompt_len=prompt_len, sparse=sparse,
        return_lse=return_lse, keys_rotated=keys_rotated, scale=scale, stats=stats)


def paged_dual_chunk_attention(q, kv, *, rope_theta, chunk_size, local_size, original_max_position_embeddings=0,
                               prompt_len=None, sparse=None, scale=None, return_lse=False, stats=None):
    """DCA prefill reading keys and values straight from a KV source: ``PagedKV`` (one sequence's block table
    in one layer of the paged cache) or ``ContiguousKV``; keys stored rotated at ``j mod cl``.

    q ``[n_q, H, D]`` un-rotated for positions ``[kv.length - n_q, kv.length)``. No whole-context gather: the
    Triton path reads the cache through the block table, the reference reads bounded key blocks (dense) or the
    keys its work lists name (sparse). ``stats`` (a ``PairStats``) gets the pair counts added; other arguments
    as ``dual_chunk_attention``. Returns O ``[n_q, H, D]`` (and LSE ``[n_q, H]`` when ``return_lse``).
    """
    return dispatch.paged_dual_chunk_attention(
        q, kv, rope_theta=rope_theta, chunk_size=chunk_size, local_size=local_size,
        original_max_position_embeddings=original_max_position_embeddings, prompt_len=prompt_len, sparse=sparse,
        scale=scale, return_lse=return_lse, stats=stats)


def paged_dca_decode(q, k_cache, v_cache, block_tables, seq_lens, *, rope_theta, chunk_size, local_size,
                     original_max_position_embeddings=0, scale=None, return_lse=False, max_seq_len=None,
                     scales=None):
    """One DCA decode step per sequence over a paged KV cache.

    q ``[B, H, D]`` un-rotated; caches ``[num_blocks, block_size, G, D]`` holding rotated keys; ``block_tables``
    int32 ``[B, max_blocks]``; ``seq_lens`` int32 ``[B]`` including the new token (already in the cache, at
    position ``seq_len - 1``). YaRN uses ``m(seq_len)^2`` per sequence. Returns O ``[B, H, D]`` (and LSE).
    A caller that prepares, once per step, ``max_seq_len`` (host int, the largest ``seq_lens``) and ``scales``
    (``[B]`` full softmax scales, replacing ``scale`` and the YaRN factor) gets a decode without host syncs.
    """
    return dispatch.paged_dca_decode(
        q, k_cache, v_cache, block_tables, seq_lens, rope_theta=rope_theta, chunk_size=chunk_size,
        local_size=local_size, original_max_position_embeddings=original_max_position_embeddings, scale=scale,
        return_lse=return_lse, max_seq_len=max_seq_len, scales=scales)


def vertical_slash_attention(q, k, v, block_count, block_offset, column_count, column_index, *, scale, causal):
    """Sparse attention over work lists (docs/algorithms.md#index-building) (from ``convert_vertical_slash_indexes``) ->
    (O, LSE)."""
    return dispatch.vertical_slash_attention(q, k, v, block_count, block_offset, column_count, column_index,
                                             scale=scale, causal=causal)

