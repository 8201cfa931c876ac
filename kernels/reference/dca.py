"""Dual chunk attention oracles (docs/algorithms.md#dual-chunk-attention): dense prefill and paged decode.

Positions, the YaRN scale, the sub-block cut and the regions are the shared definitions of ``kernels.dca_math``;
this module composes them with plain attention into the results every fast path is tested against.

Keys carry RoPE at ``j mod cl`` (``cl = chunk_size - local_size``); queries are rotated three ways (intra, succ,
inter). A prefill cuts its queries into sub-blocks at multiples of ``cl``; each sub-block attends its intra keys
(causal, bottom-right aligned), the previous chunk (succ) and all older chunks (inter), and the parts are
LSE-merged in fp32/fp64. ``chunk_size = local_size = None`` turns DCA off: the same code with ``cl = infinity``,
i.e. plain causal RoPE attention. The YaRN temperature ``m(N)^2`` multiplies the logits on the query side with
N the full prompt length, so cached keys stay unscaled (docs/algorithms.md#yarn-scale).

The prefill reads keys from a KV source (``kernels.kv_source``: contiguous tensors or the paged cache) in
bounded pieces: dense regions ``KEY_BLOCK`` keys at a time, LSE-merged, and the sparse path only the keys its
work lists name (``sparse_dca``), so no call holds the whole context's keys at once.
"""
from __future__ import annotations

import torch

from longserve.kernels.dca_math import apply_rope, chunk_length, dense_regions, key_positions, softmax_scale, sub_blocks
from longserve.kernels.kv_source import PagedKV
from longserve.kernels.pair_stats import region_pairs
from longserve.kernels.reference.attention import attend, check_shapes, merge_lse

KEY_BLOCK = 32768      # keys read (and scored) at a time by the paged prefill


def _accumulate(acc, part):
    return part if acc is None else merge_lse([acc, part])


def dense_region(qr, kv, lo: int, hi: int, *, causal: bool, scale: float, key_block: int = KEY_BLOCK):
    """Dense attention of rotated queries ``qr`` over keys ``[lo, hi)`` of ``kv`` (bottom-right causal or full),
    reading at most ``key_block`` keys at a time and merging the blocks by LSE -> (O, LSE) in the work dtype.

    Causal rows are taken ``key_block`` at a time: the keys every row of the tile sees go in blocks, non-causal;
    the tile's own diagonal square is one causal block."""
    n_q = qr.shape[0]
    if not causal:
        acc = None
        for a in range(lo, max(hi, lo + 1), key_block):
            k, v = kv.read(a, min(hi, a + key_block))
            acc = _accumulate(acc, attend(qr, k, v, scale=scale))
        return acc
    off = (hi - lo) - n_q
    outs, lses = [], []
    for r0 in range(0, max(n_q, 1), key_block):
        r1 = min(n_q, r0 + key_block)
        acc = None
        for a in range(lo, lo + off + r0, key_block):
            k, v = kv.read(a, min(lo + off + r0, a + key_block))
            acc = _accumulate(acc, attend(qr[r0:r1], k, v, scale=scale))
        k, v = kv.read(lo + off + r0, lo + off + r1)
        acc = _accumulate(acc, attend(qr[r0:r1], k, v, scale=scale, causal=True))
        outs.append(acc[0])
        lses.append(acc[1])
    return (outs[0], lses[0]) if len(outs) == 1 else (torch.cat(outs), torch.cat(lses))


def paged_dual_chunk_attention_reference(q, kv, *, rope_theta, chunk_size, local_size,
                                         original_max_position_embeddings=0, prompt_len=None, sparse=None,
                                         scale=None, return_lse=False, stats=None):
    """DCA prefill for queries at ``[kv.length - n_q, kv.length)`` reading keys from a KV source.

    ``kv`` is a ``PagedKV`` (or ``ContiguousKV``) whose keys are stored rotated at ``j mod cl``. Dense regions
    read at most ``KEY_BLOCK`` keys at a time (LSE-merged); the sparse path (``sparse`` budgets, prompt length
    above their threshold) reads only the keys its work lists name, with the Triton kernel's tile semantics
    (``sparse_dca``). ``stats`` (a ``PairStats``), when given, gets the pair counts added: ``causal`` the dense
    pairs of every region, ``computed`` the pairs scored (equal to ``causal`` on the dense path). Returns O
    ``[n_q, H, D]`` in q's dtype (and LSE ``[n_q, H]``, fp32 or fp64 for fp64 inputs).
    """
    if q.dim() != 3:
        raise ValueError(f"expected q [n_q, H, D], got {tuple(q.shape)}")
    cl = chunk_length(chunk_size, local_size)
    chunk_size = None if cl is None else int(chunk_size)
    n_q, H, D = q.shape
    L = int(kv.length)
    if n_q > L:
        raise ValueError(f"n_q={n_q} exceeds kv_len={L}: the queries must be the tail of the keys")
    n_prompt = L if prompt_len is None else int(prompt_len)
    if n_prompt < L:
        raise ValueError(f"prompt_len={n_prompt} is shorter than kv_len={L}")
    tau = softmax_scale(D, scale, original_max_position_embeddings, n_prompt)
    use_sparse = sparse is not None and n_prompt > int(sparse.threshold)
    if use_sparse and sparse.num_heads != H:
        raise ValueError(f"sparse budgets cover {sparse.num_heads} heads, this call has {H}")
    outs, lses = [], []
    q0 = L - n_q
    for b, e, P in sub_blocks(L, n_q, cl):
        q_rows = q[b - q0:e - q0]
        if use_sparse:
            from longserve.kernels.reference.sparse_dca import sparse_subblock
            o, l_ = sparse_subblock(q_rows, kv, b=b, e=e, P=P, cl=cl, chunk_size=chunk_size,
                                    rope_theta=rope_theta, tau=tau, budgets=sparse, stats=stats)
        else:
            parts = []
            for qr, lo, hi, causal in dense_regions(q_rows, P, e, b, cl, chunk_size, rope_theta):
                parts.append(dense_region(qr, kv, lo, hi, causal=causal, scale=tau, key_block=KEY_BLOCK))
                if stats is not None:           # dense work: every causal pair is computed
                    n = region_pairs(e - b, hi - lo, causal, H)
                    stats.computed, stats.causal = stats.computed + n, stats.causal + n
                    if stats.selected is not None:
                        stats.selected = stats.selected + n
            o, l_ = parts[0] if len(parts) == 1 else merge_lse(parts)
        outs.append(o)
        lses.append(l_)
    if outs:
        out, lse = torch.cat(outs), torch.cat(lses)
    else:
        wd = torch.promote_types(q.dtype, torch.float32)
        out = torch.zeros((0, H, D), dtype=wd, device=q.device)
        lse = torch.zeros((0, H), dtype=wd, device=q.device)
    out = out.to(q.dtype)
    return (out, lse) if return_lse else out


def dual_chunk_attention_reference(q, k, v, *, rope_theta, chunk_size, local_size, original_max_position_embeddings=0,
                                   prompt_len=None, sparse=None, return_lse=False, keys_rotated=False, scale=None,
                                   stats=None):
    """DCA prefill for queries at ``[kv_len - n_q, kv_len)`` over contiguous keys ``[0, kv_len)``.

    Returns O ``[n_q, H, D]`` in q's dtype (and LSE ``[n_q, H]`` in fp32, fp64 for fp64 inputs). ``sparse`` (a
    ``SparseHeadBudgets``) switches to vertical-slash attention with the kernel's tile semantics when the prompt
    length exceeds its threshold (docs/algorithms.md#sparse-threshold); ``keys_rotated`` means k already carries the
    cache rotation; ``stats`` (a ``PairStats``) receives the sparse pair counts. Same computation as the paged entry.
    """
    from longserve.kernels.kv_source import ContiguousKV

    check_shapes(q, k, v)
    cl = chunk_length(chunk_size, local_size)
    L = k.shape[0]
    if not keys_rotated:
        k = apply_rope(k, key_positions(torch.arange(L, device=k.device), cl), rope_theta)
    return paged_dual_chunk_attention_reference(
        q, ContiguousKV(k, v), rope_theta=rope_theta, chunk_size=chunk_size, local_size=local_size,
        original_max_position_embeddings=original_max_position_embeddings, prompt_len=prompt_len, sparse=sparse,
        scale=scale, return_lse=return_lse, stats=stats)


def paged_dca_decode_reference(q, k_cache, v_cache, block_tables, seq_lens, *, rope_theta, chunk_size, local_size,
                               original_max_position_embeddings=0, scale=None, return_lse=False,
                               max_seq_len: int | None = None, scales=None):
    """One decode step per sequence: the prefill math for its last position over keys ``[0, seq_len)`` read from the
    paged cache (stored rotated at ``j mod cl``) a bounded key block at a time, with ``m(seq_len)``
    (docs/algorithms.md#paged-decode). O ``[B, H, D]``.

    ``max_seq_len`` and ``scales`` as in the Triton composition: a host bound on ``seq_lens`` and ``[B]`` full
    softmax scales (replacing ``scale`` and the YaRN factor). The reference reads the lengths back once per call.
    """
    if q.dim() != 3 or k_cache.dim() != 4 or v_cache.shape[:3] != k_cache.shape[:3]:
        raise ValueError(f"expected q [B, H, D], caches [blocks, block_size, G, D]; got {tuple(q.shape)}, "
                         f"{tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    B, H, _ = q.shape
    if tuple(seq_lens.shape) != (B,) or block_tables.dim() != 2 or block_tables.shape[0] != B:
        raise ValueError(f"seq_lens must be [{B}] and block_tables [{B}, max_blocks]")
    if scales is not None and tuple(scales.shape) != (B,):
        raise ValueError(f"scales must be [{B}], got {tuple(scales.shape)}")
    page = k_cache.shape[1]
    limit = block_tables.shape[1] * page if max_seq_len is None else min(int(max_seq_len), block_tables.shape[1] * page)
    lens = seq_lens.tolist()
    taus = scales.tolist() if scales is not None else None
    wd = torch.promote_types(q.dtype, torch.float32)
    out = torch.zeros((B, H, v_cache.shape[-1]), dtype=wd, device=q.device)
    lse = torch.full((B, H), float("-inf"), dtype=wd, device=q.device)
    for i, n in enumerate(lens):
        if n < 1 or n > limit:
            raise ValueError(f"sequence {i}: seq_len {n} outside [1, {limit}]")
        kv = PagedKV(k_cache, v_cache, block_tables[i].to(k_cache.device), n)     # read a key block at a time
        scaling = dict(original_max_position_embeddings=original_max_position_embeddings, scale=scale) \
            if taus is None else dict(original_max_position_embeddings=0, scale=taus[i])
        o, l_ = paged_dual_chunk_attention_reference(
            q[i:i + 1], kv, rope_theta=rope_theta, chunk_size=chunk_size, local_size=local_size, prompt_len=n,
            return_lse=True, **scaling)
        out[i], lse[i] = o[0].to(wd), l_[0].to(wd)
    out = out.to(q.dtype)
    return (out, lse) if return_lse else out
