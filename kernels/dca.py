"""Dual chunk attention prefill composed from the Triton kernels (dense or vertical-slash); decode: ``dca_decode``.

Same semantics as the oracle ``longserve.kernels.reference.dca`` (docs/algorithms.md#dca-regions, #sparse-dca):
queries are cut into sub-blocks at DCA chunk boundaries; each sub-block attends its intra keys (causal,
bottom-right), the previous chunk (succ, non-causal) and all older chunks (inter, non-causal) with the three query
rotations, and the parts are LSE-merged in fp32. The cut, the regions, positions and scales come from
``kernels.dca_math``, which the oracle imports too. Rotations run as torch ops (fp64 angles); the attention parts run
``vertical_slash`` (dense or sparse work lists) and the merge runs the Triton merge kernel.

One composition serves both key layouts: ``paged_dual_chunk_attention_triton`` takes a KV source (a ``PagedKV``
straight from the engine's cache, or a ``ContiguousKV``) and every region is one kernel launch over keys
``[lo, hi)`` of that source, addressed in place: nothing gathers the context or slices K/V. The sparse path's
estimation reads keys through the same source, the device index builder makes the work lists, and the sparse
kernel counts the pairs it computes on the device. The sub-block structure comes from host integers (lengths),
so the host code issues no device-to-host synchronisation of its own.
Shapes: q ``[n_q, H, D]`` un-rotated for positions ``[L - n_q, L)``; keys ``[0, L)`` stored rotated at ``j mod cl``.
"""
from __future__ import annotations

import torch

from longserve.kernels.dca_math import apply_rope, chunk_length, dense_regions, key_positions, softmax_scale, sub_blocks
from longserve.kernels.estimation import estimate_dca_selection, split_regions
from longserve.kernels.kv_source import ContiguousKV, PagedKV
from longserve.kernels.merge import merge_lse_stacked
from longserve.kernels.pair_stats import region_pairs, selected_pair_count
from longserve.kernels.sparse_index import convert_vertical_slash_indexes
from longserve.kernels.vertical_slash import (
    dense_attention_kv,
    vertical_slash_attention_kv,
)


def chunk_params(chunk_size, local_size):
    """(cl, chunk_size) with cl = chunk_size - local_size; (None, None) when DCA is off."""
    cl = chunk_length(chunk_size, local_size)
    return cl, None if cl is None else int(chunk_size)


def _source_shape(kv) -> tuple[int, int, int, torch.dtype, torch.device]:
    """(L, G, D, dtype, device) of a KV source."""
    if isinstance(kv, PagedKV):
        if kv.k_cache.dim() != 4:
            raise ValueError(f"paged caches must be [num_blocks, PAGE, G, D], got {tuple(kv.k_cache.shape)}")
        t = kv.k_cache
    elif isinstance(kv, ContiguousKV):
        t = kv.k
    else:
        raise TypeError(f"kv must be a PagedKV or ContiguousKV, got {type(kv).__name__}")
    return int(kv.length), t.shape[-2], t.shape[-1], t.dtype, t.device


def dual_chunk_attention_triton(q, k, v, *, rope_theta, chunk_size, local_size,
                                original_max_position_embeddings=0, prompt_len=None, sparse=None,
                                return_lse=False, keys_rotated=False, scale=None, stats=None):
    """DCA prefill on the Triton kernels over contiguous k/v ``[L, G, D]``; returns O (and LSE fp32)."""
    if q.dim() != 3 or k.dim() != 3 or v.shape != k.shape:
        raise ValueError(f"expected q [n_q, H, D], k/v [L, G, D]; got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if not keys_rotated:
        cl = chunk_length(chunk_size, local_size)
        k = apply_rope(k, key_positions(torch.arange(k.shape[0], device=k.device), cl), rope_theta)
    return paged_dual_chunk_attention_triton(
        q, ContiguousKV(k, v), rope_theta=rope_theta, chunk_size=chunk_size, local_size=local_size,
        original_max_position_embeddings=original_max_position_embeddings, prompt_len=prompt_len, sparse=sparse,
        scale=scale, return_lse=return_lse, stats=stats)


def paged_dual_chunk_attention_triton(q, kv, *, rope_theta, chunk_size, local_size,
                                      original_max_position_embeddings=0, prompt_len=None, sparse=None,
                                      scale=None, return_lse=False, stats=None):
    """DCA prefill of q (positions ``[kv.length - n_q, kv.length)``) over the keys of a KV source.

    ``kv`` is a ``PagedKV`` (one sequence in one layer of the paged cache) or a ``ContiguousKV``; keys are
    stored rotated at ``j mod cl``. YaRN uses ``m(prompt_len or kv.length)^2``. ``sparse`` (``SparseHeadBudgets``)
    switches to vertical-slash attention when the prompt length exceeds its threshold. ``stats`` (a
    ``PairStats``) gets ``causal`` (what dense attention scores, an int) and ``computed`` added: on the sparse
    path the pairs the kernels score (see ``vertical_slash``; a 0-dim device tensor, never read back here), on
    the dense path the causal count; ``selected`` too when it is not None (exact-mask pairs; dense: causal).
    Returns O ``[n_q, H, D]`` in q's dtype (and LSE fp32 ``[n_q, H]``).
    """
    L, G, D, dtype, device = _source_shape(kv)
    if q.dim() != 3 or q.shape[2] != D or q.shape[1] % max(G, 1) or q.dtype != dtype or q.device != device:
        raise ValueError(f"q must be [n_q, H, D={D}] with H a multiple of G={G}, {dtype} on {device}; got "
                         f"{tuple(q.shape)} {q.dtype} on {q.device}")
    n_q, H, _ = q.shape
    if n_q > L:
        raise ValueError(f"n_q={n_q} exceeds kv_len={L}: queries must be the tail of the keys")
    cl, chunk_size = chunk_params(chunk_size, local_size)
    n_prompt = L if prompt_len is None else int(prompt_len)
    if n_prompt < L:
        raise ValueError(f"prompt_len={n_prompt} is shorter than kv_len={L}")
    tau = softmax_scale(D, scale, original_max_position_embeddings, n_prompt)
    use_sparse = sparse is not None and n_prompt > int(sparse.threshold)
    if use_sparse and sparse.num_heads != H:
        raise ValueError(f"sparse budgets cover {sparse.num_heads} heads, this call has {H}")
    out = torch.empty_like(q)
    lse = torch.empty((n_q, H), dtype=torch.float32, device=device)
    computed = torch.zeros((), dtype=torch.int64, device=device) if use_sparse and stats is not None else None
    selected = 0                                # exact-mask pairs, only when stats asks for them
    causal_pairs = 0
    q0 = L - n_q
    for b, e, P in sub_blocks(L, n_q, cl):
        rows = slice(b - q0, e - q0)
        regions = dense_regions(q[rows], P, e, b, cl, chunk_size, rope_theta)
        lists = None
        if use_sparse:
            indices = sparse_regions(q[rows], kv, b=b, e=e, P=P, cl=cl, chunk_size=chunk_size,
                                     rope_theta=rope_theta, tau=tau, budgets=sparse)
            lists = [work_lists(r, e - b) for r in indices]
            if stats is not None and stats.selected is not None:
                for r in indices:
                    selected = selected + selected_pair_count(r, e - b)
        single = len(regions) == 1
        o_parts = out[rows][None] if single else torch.empty((len(regions), e - b, H, D), dtype=torch.float32,
                                                             device=device)
        l_parts = lse[rows][None] if single else torch.empty((len(regions), e - b, H), dtype=torch.float32,
                                                             device=device)
        for i, (qi, lo, hi, causal) in enumerate(regions):
            causal_pairs += region_pairs(e - b, hi - lo, causal, H)
            if lists is None:
                dense_attention_kv(qi, kv, lo, hi, scale=tau, causal=causal, out=o_parts[i], lse_out=l_parts[i])
            else:
                vertical_slash_attention_kv(qi, kv, lo, hi, *lists[i], scale=tau, causal=causal, out=o_parts[i],
                                            lse_out=l_parts[i], pair_count=computed)
        if not single:
            _merge_into((o_parts, l_parts), out[rows], lse[rows])
    if stats is not None:                       # dense work computes (and selects) every causal pair
        stats.computed = stats.computed + (causal_pairs if computed is None else computed)
        stats.causal = stats.causal + causal_pairs
        if stats.selected is not None:
            stats.selected = stats.selected + (causal_pairs if computed is None else selected)
    return (out, lse) if return_lse else out


def sparse_regions(q_rows, kv, *, b, e, P, cl, chunk_size, rope_theta, tau, budgets):
    """Sparse DCA (docs/algorithms.md#sparse-dca) for one sub-block: estimation over the source's keys (bounded blocks),
    then the split into the intra / succ / inter ``RegionIndices`` (region-local verticals and slashes)."""
    sel = estimate_dca_selection(q_rows, kv, b=b, e=e, P=P, cl=cl, chunk_size=chunk_size,
                                 rope_theta=rope_theta, tau=tau, budgets=budgets)
    return split_regions(sel, b=b, e=e, P=P, cl=cl)


def work_lists(region, n_q: int):
    """The device index builder's (block_count, block_offset, column_count, column_index) for one region."""
    return convert_vertical_slash_indexes(region.vertical, region.vertical_count, region.slash, region.slash_count,
                                          n_q, region.key_end - region.key_start, causal=region.causal)


def sparse_work_lists(q_rows, kv, *, b, e, P, cl, chunk_size, rope_theta, tau, budgets):
    """Work lists of intra, succ, inter for one sub-block (estimation, region split, index builder)."""
    return [work_lists(r, e - b) for r in sparse_regions(q_rows, kv, b=b, e=e, P=P, cl=cl, chunk_size=chunk_size,
                                                         rope_theta=rope_theta, tau=tau, budgets=budgets)]


def _merge_into(parts, out, lse):
    o_parts, l_parts = parts
    o, l_ = merge_lse_stacked(o_parts, l_parts, out_dtype=out.dtype)
    out.copy_(o)
    lse.copy_(l_)
