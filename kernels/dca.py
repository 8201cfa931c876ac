"""Dual chunk attention prefill composed from the Triton kernels (dense or vertical-slash); decode: ``dca_decode``.

Same signatures and semantics as ``longserve.kernels.reference.dca`` (algorithms.md §1.4-§1.6, §2.5): queries
are cut into sub-blocks at DCA chunk boundaries; each sub-block attends its intra keys (causal, bottom-right),
the previous chunk (succ, non-causal) and all older chunks (inter, non-causal) with the three query rotations,
and the parts are LSE-merged in fp32. Rotations run as torch ops (fp64 angles, via the reference RoPE); the
attention parts run ``vertical_slash`` (dense or sparse work lists) and the merge runs the Triton merge kernel.
The sparse path uses the reference estimation (vectorised torch, device-agnostic), the device index builder and
the sparse kernel. Decode is three paged-attention calls per step (intra, succ, inter) plus the merge.
Shapes follow the kernel contract: q ``[n_q, H, D]`` un-rotated for positions ``[L - n_q, L)``, k/v ``[L, G, D]``.
"""
from __future__ import annotations

import torch

from longserve.kernels.merge import merge_lse_stacked
from longserve.kernels.reference.dca import (chunk_length, key_positions, query_positions, softmax_scale,
                                              sub_blocks)
from longserve.kernels.reference.estimate import estimate_dca_selection, split_regions
from longserve.kernels.reference.rope import apply_rope
from longserve.kernels.sparse_index import convert_vertical_slash_indexes
from longserve.kernels.vertical_slash import dense_attention, vertical_slash_attention


def chunk_params(chunk_size, local_size):
    """(cl, chunk_size) with cl = chunk_size - local_size; (None, None) when DCA is off."""
    cl = chunk_length(chunk_size, local_size)
    return cl, None if cl is None else int(chunk_size)


def _validate(q, k, v):
    if q.dim() != 3 or k.dim() != 3 or v.shape != k.shape:
        raise ValueError(f"expected q [n_q, H, D], k/v [L, G, D]; got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if q.shape[0] > k.shape[0]:
        raise ValueError(f"n_q={q.shape[0]} exceeds kv_len={k.shape[0]}: queries must be the tail of the keys")


def dual_chunk_attention_triton(q, k, v, *, rope_theta, chunk_size, local_size,
                                original_max_position_embeddings=0, prompt_len=None, sparse=None,
                                return_lse=False, keys_rotated=False, scale=None):
    """DCA prefill on the Triton kernels; returns O ``[n_q, H, D]`` (and LSE fp32 ``[n_q, H]``)."""
    _validate(q, k, v)
    cl, chunk_size = chunk_params(chunk_size, local_size)
    n_q, H, D = q.shape
    L = k.shape[0]
    n_prompt = L if prompt_len is None else int(prompt_len)
    tau = softmax_scale(q.shape[-1], scale, original_max_position_embeddings, n_prompt)
    if not keys_rotated:
        k = apply_rope(k, key_positions(torch.arange(L, device=k.device), cl), rope_theta)
    out = torch.empty_like(q)
    lse = torch.empty((n_q, H), dtype=torch.float32, device=q.device)
    use_sparse = sparse is not None and n_prompt > int(sparse.threshold)
    if use_sparse and sparse.num_heads != H:
        raise ValueError(f"sparse budgets cover {sparse.num_heads} heads, this call has {H}")
    q0 = L - n_q
    for b, e, P in sub_blocks(L, n_q, cl):
        rows = slice(b - q0, e - q0)
        pos = torch.arange(b, e, device=q.device)
        p_intra, p_succ, p_inter = query_positions(pos, cl, chunk_size)
        qr = q[rows]
        regions = [(apply_rope(qr, p_intra, rope_theta), P, e, True)]
        if cl is not None and P >= cl:
            regions.append((apply_rope(qr, p_succ, rope_theta), P - cl, P, False))
        if cl is not None and P >= 2 * cl:
            regions.append((apply_rope(qr, p_inter, rope_theta), 0, P - cl, False))
        lists = None
        if use_sparse:
            lists = sparse_work_lists(qr, k, b=b, e=e, P=P, cl=cl, chunk_size=chunk_size, rope_theta=rope_theta,
                                      tau=tau, budgets=sparse)
        single = len(regions) == 1
        o_parts = out[rows][None] if single else torch.empty((len(regions), e - b, H, D), dtype=torch.float32,
                                                             device=q.device)
        l_parts = lse[rows][None] if single else torch.empty((len(regions), e - b, H), dtype=torch.float32,
                                                             device=q.device)
        for i, (qi, lo, hi, causal) in enumerate(regions):
            if lists is None:
                dense_attention(qi, k[lo:hi], v[lo:hi], scale=tau, causal=causal, out=o_parts[i],
                                lse_out=l_parts[i])
            else:
                vertical_slash_attention(qi, k[lo:hi], v[lo:hi], *lists[i], scale=tau, causal=causal,
                                         out=o_parts[i], lse_out=l_parts[i])
        if not single:
            _merge_into((o_parts, l_parts), out[rows], lse[rows])
    return (out, lse) if return_lse else out


def sparse_work_lists(q_rows, k_rot, *, b, e, P, cl, chunk_size, rope_theta, tau, budgets):
    """§2.5 for one sub-block: reference estimation and region split (vectorised torch), then the device index
    builder; returns the (block_count, block_offset, column_count, column_index) lists of intra, succ, inter."""
    sel = estimate_dca_selection(q_rows, k_rot, b=b, e=e, P=P, cl=cl, chunk_size=chunk_size, rope_theta=rope_theta,
                                 tau=tau, budgets=budgets)
    return [convert_vertical_slash_indexes(r.vertical, r.vertical_count, r.slash, r.slash_count, e - b,
                                           r.key_end - r.key_start, causal=r.causal)
            for r in split_regions(sel, b=b, e=e, P=P, cl=cl)]


def _merge_into(parts, out, lse):
    o_parts, l_parts = parts
    o, l_ = merge_lse_stacked(o_parts, l_parts, out_dtype=out.dtype)
    out.copy_(o)
    lse.copy_(l_)
