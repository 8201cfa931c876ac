"""GPU check, section 2: every Triton kernel against its reference twin with the 2x rule
(docs/testing.md#tolerance-rule, docs/testing.md#gpu-check).

Each check builds inputs, computes an fp64 truth (on a row sample at long lengths), runs the reference in the
working precision and the Triton kernel, and returns a JSON-able record. Sizes come from ``Sizes`` so the same
code runs tiny under the interpreter (``--smoke``) and at 8K-128K on the GPU.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from longserve.bench.gpu.patterns import qwen_like_pattern, random_pattern, sample_rows, two_x_rule


@dataclass(frozen=True)
class Sizes:
    """Shapes of one correctness run."""
    heads: int
    kv_heads: int
    head_dim: int
    dense_lengths: tuple          # causal square lengths
    chunk_shape: tuple            # (q_len, kv_len) for bottom-right causal and non-causal
    sparse_lengths: tuple
    index_shape: tuple            # (q_len, kv_len, NV, NS)
    paged_lengths: tuple
    dca_len: int
    dca_cfg: tuple                # (chunk_size, local_size, original_max_position_embeddings)
    dca_heads: tuple              # (H, G) for the DCA checks (the reference is memory-hungry)
    rows_per_sample: int
    small: int                    # length of the merge, full-budget and determinism checks
    budgets: tuple = (1000, 6096)  # (vertical, slash) of the Qwen-like patterns
    dca_sparse_len: int = 8192


FULL = Sizes(28, 4, 128, (8192, 32768, 131072), (8192, 32768), (8192, 32768), (4096, 8192, 256, 384),
             (8192, 32785, 131077), 8192, (3072, 512, 2048), (7, 1), 16, 1024)
SMOKE = Sizes(4, 2, 32, (65,), (40, 100), (100,), (100, 130, 16, 24), (1, 65, 130), 100, (48, 16, 64),
              (4, 2), 8, 65, (12, 20), 70)


def _randn(shape, device, gen):
    return torch.randn(shape, generator=gen, dtype=torch.float64, device=device)


def _gen(device, seed):
    """A seeded generator on the device itself (generating 128K-token fp64 inputs on the host is slow)."""
    return torch.Generator(device=torch.device(device).type).manual_seed(seed)


def _qkv(n_q, n_k, H, G, D, device, seed):
    g = _gen(device, seed)
    return _randn((n_q, H, D), device, g), _randn((n_k, G, D), device, g), _randn((n_k, G, D), device, g)


def _row_mask(rows, q_len, kv_len, causal, device):
    keys = torch.arange(kv_len, device=device)
    if not causal:
        return torch.ones((1, rows.numel(), kv_len), dtype=torch.bool, device=device)
    return (keys[None, :] <= (kv_len - q_len) + rows[:, None])[None]


def _judge(name, o_k, l_k, o_r, l_r, o_t, l_t, dtype, **extra):
    out = two_x_rule(o_k, o_r, o_t, dtype)
    lse = two_x_rule(l_k, l_r, l_t, dtype)
    return {"check": name, "dtype": str(dtype).replace("torch.", ""), "ok": out["ok"] and lse["ok"],
            "out": out, "lse": lse, **extra}


def check_dense(sizes: Sizes, dtype, device, q_len, kv_len, causal, seed=0):
    """Dense Triton attention vs attention_with_lse on sampled rows (fp64 truth, same-precision reference)."""
    from longserve.kernels.reference.attention import attention_with_lse
    from longserve.kernels.vertical_slash import dense_attention

    q, k, v = _qkv(q_len, kv_len, sizes.heads, sizes.kv_heads, sizes.head_dim, device, seed)
    scale = 1.0 / math.sqrt(sizes.head_dim)
    o_k, l_k = dense_attention(q.to(dtype), k.to(dtype), v.to(dtype), scale=scale, causal=causal)
    rows = sample_rows(q_len, sizes.rows_per_sample, seed, device)
    mask = _row_mask(rows, q_len, kv_len, causal, device)
    o_t, l_t = attention_with_lse(q[rows], k, v, scale=scale, mask=mask)
    o_r, l_r = attention_with_lse(q[rows].to(dtype), k.to(dtype), v.to(dtype), scale=scale, mask=mask)
    return _judge("dense", o_k[rows], l_k[rows], o_r, l_r, o_t, l_t, dtype, q_len=q_len, kv_len=kv_len,
                  causal=causal)


def check_sparse(sizes: Sizes, dtype, device, n, pattern="qwen", seed=0):
    """VS kernel with device-built lists vs the reference twin (covered mask) on sampled rows."""
    from longserve.kernels.reference import vertical_slash as ref_vs
    from longserve.kernels.sparse_index import convert_vertical_slash_indexes
    from longserve.kernels.vertical_slash import vertical_slash_attention

    H = sizes.heads
    if pattern == "qwen":
        sel = qwen_like_pattern(n, H, vertical=sizes.budgets[0], slash=sizes.budgets[1], device=device, seed=seed)
    else:
        sel = random_pattern(n, H, vertical=max(8, n // 16), slash=max(8, n // 8), device=device, seed=seed)
    lists = convert_vertical_slash_indexes(*sel, n, n, causal=True)
    q, k, v = _qkv(n, n, H, sizes.kv_heads, sizes.head_dim, device, seed)
    scale = 1.0 / math.sqrt(sizes.head_dim)
    o_k, l_k = vertical_slash_attention(q.to(dtype), k.to(dtype), v.to(dtype), *lists, scale=scale, causal=True)
    rows = sample_rows(n, sizes.rows_per_sample, seed, device)
    mask = ref_vs.covered_mask(n, n, *lists, causal=True, rows=rows)
    from longserve.kernels.reference.attention import attention_with_lse
    o_t, l_t = attention_with_lse(q[rows], k, v, scale=scale, mask=mask)
    o_r, l_r = attention_with_lse(q[rows].to(dtype), k.to(dtype), v.to(dtype), scale=scale, mask=mask)
    frac = float(mask.sum()) / max(1, int(_row_mask(rows, n, n, True, device).sum()) * H)
    return _judge("sparse_vs", o_k[rows], l_k[rows], o_r, l_r, o_t, l_t, dtype, n=n, pattern=pattern,
                  sampled_fraction=round(frac, 4))


def check_full_budget(sizes: Sizes, dtype, device, n, seed=0):
    """O7 (docs/algorithms.md#oracle-full-budget): work lists built from every vertical and slash reproduce dense
    attention."""
    from longserve.kernels.sparse_index import convert_vertical_slash_indexes
    from longserve.kernels.vertical_slash import dense_attention, vertical_slash_attention

    H = sizes.heads
    vert = torch.arange(n, dtype=torch.int32, device=device).expand(H, n).contiguous()
    sl = torch.arange(n - 1, -1, -1, dtype=torch.int32, device=device).expand(H, n).contiguous()
    cnt = torch.full((H,), n, dtype=torch.int32, device=device)
    lists = convert_vertical_slash_indexes(vert, cnt, sl, cnt, n, n, causal=True)
    q, k, v = (t.to(dtype) for t in _qkv(n, n, H, sizes.kv_heads, sizes.head_dim, device, seed))
    scale = 1.0 / math.sqrt(sizes.head_dim)
    o_s, l_s = vertical_slash_attention(q, k, v, *lists, scale=scale, causal=True)
    o_d, l_d = dense_attention(q, k, v, scale=scale, causal=True)
    diff = float((o_s.float() - o_d.float()).abs().max())
    ldiff = float((l_s - l_d).abs().max())
    tol = 2e-2 if dtype == torch.bfloat16 else 2e-3 if dtype == torch.float16 else 1e-5
    return {"check": "full_budget_equals_dense", "dtype": str(dtype).replace("torch.", ""), "n": n,
            "out_diff": diff, "lse_diff": ldiff, "ok": diff <= tol and ldiff <= tol}


def check_index(sizes: Sizes, device, causal, seed=0):
    """Device index builder == reference convert_vertical_slash_indexes (entries up to the counts)."""
    from longserve.kernels.reference.sparse_index import convert_vertical_slash_indexes as ref_convert
    from longserve.kernels.sparse_index import convert_vertical_slash_indexes

    q_len, kv_len, nv, ns = sizes.index_shape
    if causal:
        kv_len = max(kv_len, q_len)
    sel = random_pattern(kv_len, 4, vertical=nv, slash=ns, device="cpu", seed=seed,
                         slash_limit=kv_len if causal else kv_len + q_len)
    got = [t.cpu() for t in convert_vertical_slash_indexes(*(t.to(device) for t in sel), q_len, kv_len,
                                                            causal=causal)]
    want = ref_convert(*sel, q_len, kv_len, causal=causal)
    mismatches = 0
    for h in range(4):
        for r in range(got[0].shape[1]):
            nb, nc = int(want[0][h, r]), int(want[2][h, r])
            same = int(got[0][h, r]) == nb and int(got[2][h, r]) == nc
            same = same and torch.equal(got[1][h, r, :nb], want[1][h, r, :nb].to(torch.int32))
            same = same and torch.equal(got[3][h, r, :nc], want[3][h, r, :nc].to(torch.int32))
            mismatches += 0 if same else 1
    return {"check": "index_builder", "causal": causal, "q_len": q_len, "kv_len": kv_len,
            "mismatched_blocks": mismatches, "ok": mismatches == 0}


def _paged_inputs(lengths, G, D, page, device, seed):
    g = torch.Generator(device="cpu").manual_seed(seed)
    gd = _gen(device, seed)
    blocks = [math.ceil(n / page) for n in lengths]
    total = sum(blocks) + 1
    perm = torch.randperm(total, generator=g)
    tables = torch.zeros((len(lengths), max(blocks)), dtype=torch.int32)
    at = 0
    for b, nb in enumerate(blocks):
        tables[b, :nb] = perm[at:at + nb].to(torch.int32)
        at += nb
    k_cache = _randn((total, page, G, D), device, gd)
    v_cache = _randn((total, page, G, D), device, gd)
    return k_cache, v_cache, tables.to(device)


def check_paged(sizes: Sizes, dtype, device, seed=0):
    """Paged split-KV decode (with one empty range) vs the reference twin."""
    from longserve.kernels.paged_attention import paged_attention_decode
    from longserve.kernels.reference.paged_attention import paged_attention_decode as ref_decode

    lengths = sizes.paged_lengths
    H, G, D = sizes.heads, sizes.kv_heads, sizes.head_dim
    kc, vc, bt = _paged_inputs(lengths, G, D, 16, device, seed)
    q = torch.randn((len(lengths), H, D), dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    q = q.to(device)
    end = torch.tensor(lengths, device=device)
    start = torch.zeros_like(end)
    start[0] = end[0]                           # an empty range: O = 0, LSE = -inf
    scale = 1.0 / math.sqrt(D)
    o_k, l_k = paged_attention_decode(q.to(dtype), kc.to(dtype), vc.to(dtype), bt, start, end, scale=scale)
    o_t, l_t = ref_decode(q, kc, vc, bt, start, end, scale=scale)
    o_r, l_r = ref_decode(q.to(dtype), kc.to(dtype), vc.to(dtype), bt, start, end, scale=scale)
    return _judge("paged_decode", o_k, l_k, o_r, l_r, o_t, l_t, dtype, lengths=list(lengths))


def check_merge(sizes: Sizes, device, seed=0):
    """Triton LSE merge vs reference merge_lse, with empty (-inf) parts carrying NaN outputs."""
    from longserve.kernels.merge import merge_lse_triton
    from longserve.kernels.reference.attention import merge_lse

    g = torch.Generator().manual_seed(seed)
    n, H, D = sizes.small, sizes.heads, sizes.head_dim
    parts = []
    for p in range(3):
        o = torch.randn((n, H, D), generator=g)
        lse = torch.randn((n, H), generator=g) * 4
        drop = torch.rand((n, H), generator=g) < 0.3
        lse[drop] = float("-inf")
        o[drop] = float("nan") if p == 0 else o[drop]
        parts.append((o.to(device), lse.to(device)))
    o_k, l_k = merge_lse_triton(parts)
    clean = [(torch.nan_to_num(o), lse) for o, lse in parts]
    o_r, l_r = merge_lse([(o.double(), lse.double()) for o, lse in clean])
    err = max(float((o_k.double() - o_r).abs().max()), float((l_k.double() - l_r).nan_to_num(0.0).abs().max()))
    ok = err < 1e-5 and not bool(torch.isnan(o_k).any()) and torch.equal(torch.isinf(l_k), torch.isinf(l_r))
    return {"check": "lse_merge", "max_err": err, "ok": bool(ok)}


def check_dca(sizes: Sizes, dtype, device, seed=0):
    """dual_chunk_attention_triton vs the reference (fp64 truth, same-precision reference), toy DCA config."""
    from longserve.kernels.dca import dual_chunk_attention_triton
    from longserve.kernels.reference.dca import dual_chunk_attention_reference

    H, G = sizes.dca_heads
    L = sizes.dca_len
    chunk_size, local_size, orig = sizes.dca_cfg
    q, k, v = _qkv(L, L, H, G, sizes.head_dim, device, seed)
    kw = dict(rope_theta=1e6, chunk_size=chunk_size, local_size=local_size,
              original_max_position_embeddings=orig, return_lse=True)
    o_t, l_t = dual_chunk_attention_reference(q, k, v, **kw)
    o_r, l_r = dual_chunk_attention_reference(q.to(dtype), k.to(dtype), v.to(dtype), **kw)
    o_k, l_k = dual_chunk_attention_triton(q.to(dtype), k.to(dtype), v.to(dtype), **kw)
    return _judge("dca_prefill", o_k, l_k, o_r, l_r, o_t, l_t, dtype, L=L, cfg=list(sizes.dca_cfg))


def check_dca_sparse(sizes: Sizes, dtype, device, seed=0):
    """Sparse DCA prefill on the Triton path: full budgets == dense Triton DCA (O7
    (docs/algorithms.md#oracle-full-budget)); with Qwen-like budgets every row's LSE lies between the reference
    exact-mask LSE and the dense LSE (covered pairs include the exact mask and are a subset of the causal keys, O7/O8,
    docs/algorithms.md#oracles)."""
    from longserve.kernels.dca import dual_chunk_attention_triton
    from longserve.kernels.sparse_config import SparseHeadBudgets

    H, G = sizes.dca_heads
    L = sizes.dca_sparse_len
    chunk_size, local_size, orig = sizes.dca_cfg
    q, k, v = (t.to(dtype) for t in _qkv(L, L, H, G, sizes.head_dim, device, seed))
    kw = dict(rope_theta=1e6, chunk_size=chunk_size, local_size=local_size,
              original_max_position_embeddings=orig, return_lse=True)
    o_d, l_d = dual_chunk_attention_triton(q, k, v, **kw)
    full = SparseHeadBudgets.uniform(H, L, L, threshold=L - 1)
    o_f, l_f = dual_chunk_attention_triton(q, k, v, sparse=full, **kw)
    part = SparseHeadBudgets.uniform(H, *sizes.budgets, threshold=L - 1)
    o_p, l_p = dual_chunk_attention_triton(q, k, v, sparse=part, **kw)
    from longserve.kernels.reference.dca import dual_chunk_attention_reference
    _, l_x = dual_chunk_attention_reference(q, k, v, sparse=part, **kw)     # exact mask, same selection
    tol = {torch.bfloat16: 2e-2, torch.float16: 2e-3, torch.float32: 2e-5}[dtype]
    diff = float((o_f.float() - o_d.float()).abs().max())
    ldiff = float((l_f - l_d).abs().max())
    recall = torch.exp(l_p.double() - l_d.double())
    superset = bool((l_p.double() >= l_x.double() - 1e-3).all())
    ok = diff <= tol and ldiff <= tol and bool((recall <= 1 + 1e-3).all()) and bool(torch.isfinite(o_p).all())
    return {"check": "dca_sparse", "dtype": str(dtype).replace("torch.", ""), "L": L, "full_out_diff": diff,
            "full_lse_diff": ldiff, "mean_recall": float(recall.mean()),
            "exact_mask_recall": float(torch.exp(l_x.double() - l_d.double()).mean()),
            "covers_exact_mask": superset, "ok": ok and superset}


def check_dca_paged_prefill(sizes: Sizes, dtype, device, seed=0):
    """paged_dual_chunk_attention_triton (keys read through a shuffled block table, page 16) against the
    contiguous composition, dense and sparse: the same kernels over the same keys, so equal up to launch-order
    noise; the sparse pair counter (a device tensor) lies between 0 and the causal count."""
    from longserve.kernels.dca import dual_chunk_attention_triton, paged_dual_chunk_attention_triton
    from longserve.kernels.kv_source import PagedKV
    from longserve.kernels.pair_stats import PairStats
    from longserve.kernels.sparse_config import SparseHeadBudgets

    H, G = sizes.dca_heads
    L = sizes.dca_sparse_len
    chunk_size, local_size, orig = sizes.dca_cfg
    q, k, v = (t.to(dtype) for t in _qkv(L, L, H, G, sizes.head_dim, device, seed))
    kc, vc, bt = _paged_inputs([L], G, sizes.head_dim, 16, device, seed)
    kc, vc = kc.to(dtype), vc.to(dtype)
    pos = torch.arange(L, device=device)
    phys = bt[0].long()[pos // 16]
    kc[phys, pos % 16], vc[phys, pos % 16] = k, v
    paged = PagedKV(kc, vc, bt[0], L)
    kw = dict(rope_theta=1e6, chunk_size=chunk_size, local_size=local_size,
              original_max_position_embeddings=orig, return_lse=True)
    n_q = L // 3                                    # a chunked prefill: the queries are the tail
    record = {"check": "dca_paged_prefill", "dtype": str(dtype).replace("torch.", ""), "L": L, "n_q": n_q}
    ok = True
    for name, sparse in (("dense", None), ("sparse", SparseHeadBudgets.uniform(H, *sizes.budgets,
                                                                                threshold=L - 1))):
        stats = PairStats()
        o_p, l_p = paged_dual_chunk_attention_triton(q[-n_q:], paged, sparse=sparse, stats=stats, **kw)
        o_c, l_c = dual_chunk_attention_triton(q[-n_q:], k, v, keys_rotated=True, sparse=sparse, **kw)
        diff = max(float((o_p.float() - o_c.float()).abs().max()), float((l_p - l_c).abs().max()))
        record[f"{name}_diff"] = diff
        ok = ok and diff <= 1e-6
        if sparse is not None:
            computed, causal = int(stats.computed), int(stats.causal)
            record.update(computed_pairs=computed, causal_pairs=causal)
            ok = ok and 0 < computed <= causal
    record["ok"] = bool(ok)
    return record


def check_dca_decode(sizes: Sizes, dtype, device, seed=0):
    """paged_dca_decode_triton vs paged_dca_decode_reference at lengths spanning 1, 2 and 3+ chunks."""
    from longserve.kernels.dca_decode import paged_dca_decode_triton
    from longserve.kernels.reference.dca import paged_dca_decode_reference

    H, G = sizes.dca_heads
    chunk_size, local_size, orig = sizes.dca_cfg
    cl = chunk_size - local_size
    lengths = [1, cl + 1, 2 * cl + 3, sizes.dca_len]
    kc, vc, bt = _paged_inputs(lengths, G, sizes.head_dim, 16, device, seed)
    q = torch.randn((len(lengths), H, sizes.head_dim), dtype=torch.float64,
                    generator=torch.Generator().manual_seed(seed)).to(device)
    seq_lens = torch.tensor(lengths, dtype=torch.int32, device=device)
    kw = dict(rope_theta=1e6, chunk_size=chunk_size, local_size=local_size,
              original_max_position_embeddings=orig, return_lse=True)
    o_t, l_t = paged_dca_decode_reference(q, kc, vc, bt, seq_lens, **kw)
    o_r, l_r = paged_dca_decode_reference(q.to(dtype), kc.to(dtype), vc.to(dtype), bt, seq_lens, **kw)
    o_k, l_k = paged_dca_decode_triton(q.to(dtype), kc.to(dtype), vc.to(dtype), bt, seq_lens, **kw)
    return _judge("dca_decode", o_k, l_k, o_r, l_r, o_t, l_t, dtype, lengths=lengths)


def check_determinism(sizes: Sizes, dtype, device, n, seed=0):
    """Two identical dense and sparse launches must agree bitwise."""
    from longserve.kernels.sparse_index import convert_vertical_slash_indexes
    from longserve.kernels.vertical_slash import dense_attention, vertical_slash_attention

    q, k, v = (t.to(dtype) for t in _qkv(n, n, sizes.heads, sizes.kv_heads, sizes.head_dim, device, seed))
    sel = qwen_like_pattern(n, sizes.heads, vertical=sizes.budgets[0], slash=sizes.budgets[1], device=device,
                            seed=seed)
    lists = convert_vertical_slash_indexes(*sel, n, n, causal=True)
    same = True
    for run in (lambda: dense_attention(q, k, v, scale=0.1, causal=True),
                lambda: vertical_slash_attention(q, k, v, *lists, scale=0.1, causal=True)):
        a, b = run(), run()
        same = same and torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    return {"check": "determinism", "n": n, "dtype": str(dtype).replace("torch.", ""), "ok": bool(same)}


def check_dispatch(sizes: Sizes, device, dtype):
    """The public API sends these tensors to the Triton path (bitwise the direct call); on CPU the smoke run
    forces it with LONGSERVE_KERNELS=triton, as the GPU gets it by default."""
    import os

    from longserve import kernels
    from longserve.kernels import dispatch
    from longserve.kernels.dca import dual_chunk_attention_triton

    H, G = sizes.dca_heads
    q, k, v = (t.to(dtype) for t in _qkv(70, 70, H, G, sizes.head_dim, device, 3))
    kw = dict(rope_theta=1e6, chunk_size=48, local_size=16, return_lse=True)
    saved = os.environ.get(dispatch.ENV_VAR)
    if device.type != "cuda":
        os.environ[dispatch.ENV_VAR] = "triton"
    try:
        backend = dispatch.backend_for(q, k, v)
        a = kernels.dual_chunk_attention(q, k, v, **kw)
    finally:
        if saved is None:
            os.environ.pop(dispatch.ENV_VAR, None)
        else:
            os.environ[dispatch.ENV_VAR] = saved
    b = dual_chunk_attention_triton(q, k, v, **kw)
    same = torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    return {"check": "public_api_dispatch", "backend": backend, "ok": bool(same and backend == "triton")}


def plan(sizes: Sizes, device, dtypes):
    """The ordered list of (label, thunk) checks; the first dtype gets every size, the others the smallest."""
    checks = [("dispatch", lambda: check_dispatch(sizes, device, dtypes[0])),
              ("lse_merge", lambda: check_merge(sizes, device))]
    for causal in (True, False):
        checks.append((f"index causal={causal}", lambda c=causal: check_index(sizes, device, c)))
    qn, kn = sizes.chunk_shape
    for i, dtype in enumerate(dtypes):
        lengths = sizes.dense_lengths if i == 0 else sizes.dense_lengths[:1]
        for n in lengths:
            checks.append((f"dense {n} {dtype}", lambda n=n, d=dtype: check_dense(sizes, d, device, n, n, True)))
        checks.append((f"dense chunk {dtype}", lambda d=dtype: check_dense(sizes, d, device, qn, kn, True)))
        checks.append((f"dense noncausal {dtype}", lambda d=dtype: check_dense(sizes, d, device, qn, kn, False)))
        for n in (sizes.sparse_lengths if i == 0 else sizes.sparse_lengths[:1]):
            checks.append((f"sparse {n} {dtype}", lambda n=n, d=dtype: check_sparse(sizes, d, device, n)))
        checks.append((f"sparse random {dtype}",
                       lambda d=dtype: check_sparse(sizes, d, device, sizes.sparse_lengths[0], "random")))
        checks.append((f"full budget {dtype}",
                       lambda d=dtype: check_full_budget(sizes, d, device, sizes.small)))
        checks.append((f"paged {dtype}", lambda d=dtype: check_paged(sizes, d, device)))
        checks.append((f"dca {dtype}", lambda d=dtype: check_dca(sizes, d, device)))
        checks.append((f"dca decode {dtype}", lambda d=dtype: check_dca_decode(sizes, d, device)))
        checks.append((f"dca sparse {dtype}", lambda d=dtype: check_dca_sparse(sizes, d, device)))
        checks.append((f"dca paged prefill {dtype}", lambda d=dtype: check_dca_paged_prefill(sizes, d, device)))
    checks.append(("determinism", lambda: check_determinism(sizes, dtypes[0], device, sizes.small)))
    return checks
