"""Dense DCA reference vs a per-pair float64 oracle, and oracles O1, O2, O4, O5, O6, O15
(docs/algorithms.md#oracles)."""
import math

import pytest
import torch

from longserve.kernels import dual_chunk_attention, paged_dca_decode, relative_positions, rotate_keys, yarn_mscale
from longserve.kernels.dca_math import apply_rope, dense_regions, sub_blocks
from longserve.kernels.reference.dca import dual_chunk_attention_reference, paged_dca_decode_reference

GOLDEN_R = """
0
1 0
2 1 0
3 2 1 0
4 3 2 1 0
5 4 3 2 1 0
6 5 4 3 2 1 0
7 6 5 4 3 2 1 0
8 7 6 5 4 3 2 1 0
8 7 6 5 4 4 3 2 1 0
8 7 6 5 4 5 4 3 2 1 0
8 7 6 5 4 6 5 4 3 2 1 0
8 7 6 5 4 7 6 5 4 3 2 1 0
8 7 6 5 4 8 7 6 5 4 3 2 1 0
8 7 6 5 4 8 7 6 5 4 4 3 2 1 0
"""
TOY = dict(rope_theta=1e4, chunk_size=48, local_size=16)       # cl = 32


def oracle(q, k, v, *, rope_theta, chunk_size, local_size, original_max=0, prompt_len=None):
    """Per-pair DCA: logit(t, j) = tau * <RoPE(q_t, P_q(t, j)), RoPE(k_j, j mod cl)>, explicit softmax."""
    n_q, H, D = q.shape
    L = k.shape[0]
    group = H // k.shape[1]
    cl = chunk_size - local_size
    n = L if prompt_len is None else prompt_len
    m = max(1.0, 0.1 * math.log(n / original_max) + 1.0) if original_max else 1.0
    tau = m * m / math.sqrt(D)
    t = torch.arange(L - n_q, L)
    o = t % cl
    variants = [apply_rope(q, o, rope_theta), apply_rope(q, torch.clamp(o + cl, max=chunk_size), rope_theta),
                apply_rope(q, torch.full_like(t, min(2 * cl - 1, chunk_size)), rope_theta)]
    kr = apply_rope(k, torch.arange(L) % cl, rope_theta)
    dc = (t // cl)[:, None] - (torch.arange(L) // cl)[None, :]
    which = dc.clamp(0, 2)
    causal = torch.arange(L)[None, :] <= t[:, None]
    out = torch.zeros((n_q, H, v.shape[-1]), dtype=torch.float64)
    lse = torch.zeros((n_q, H), dtype=torch.float64)
    for h in range(H):
        z = torch.stack([(x[:, h] @ kr[:, h // group].T) for x in variants])          # [3, n_q, L]
        z = torch.gather(z, 0, which[None]).squeeze(0) * tau
        z = z.masked_fill(~causal, -math.inf)
        lse[:, h] = torch.logsumexp(z, dim=1)
        out[:, h] = torch.softmax(z, dim=1) @ v[:, h // group]
    return out, lse


@pytest.mark.parametrize("L", [1, 2, 31, 32, 33, 63, 64, 65, 99, 100, 101, 113])
@pytest.mark.parametrize("H,G", [(2, 2), (4, 2), (7, 1)])
def test_dense_dca_matches_per_pair_oracle(kit, L, H, G):
    q, k, v = kit.make_qkv(L, L, H, G, seed=L * 10 + H)
    o, lse = dual_chunk_attention_reference(q, k, v, **TOY, original_max_position_embeddings=40, return_lse=True)
    o_ref, lse_ref = oracle(q, k, v, **TOY, original_max=40)
    assert kit.max_err(o, o_ref) < kit.FP64_TOL and kit.max_err(lse, lse_ref) < kit.FP64_TOL
    o32, lse32 = dual_chunk_attention_reference(q.float(), k.float(), v.float(), **TOY,
                                                original_max_position_embeddings=40, return_lse=True)
    assert o32.dtype == torch.float32 and lse32.dtype == torch.float32
    assert kit.max_err(o32, o_ref) < kit.FP32_TOL and kit.max_err(lse32, lse_ref) < kit.FP32_TOL


@pytest.mark.parametrize("cfg", [dict(chunk_size=8, local_size=3), dict(chunk_size=12, local_size=4),
                                 dict(chunk_size=160, local_size=32)])
def test_o1_dca_equals_rope_attention_for_short_inputs(kit, cfg):
    cl = cfg["chunk_size"] - cfg["local_size"]
    top = cfg["chunk_size"] + 2
    q, k, v = kit.make_qkv(top, top, 4, 2, seed=cl)
    plain = dict(rope_theta=1e4, chunk_size=None, local_size=None)
    for L in (1, cl // 2, cl):                          # only intra exists: the very same computation
        a = dual_chunk_attention_reference(q[:L], k[:L], v[:L], rope_theta=1e4, **cfg)
        assert torch.equal(a, dual_chunk_attention_reference(q[:L], k[:L], v[:L], **plain))
    for L in (cl + 1, cfg["chunk_size"], cfg["chunk_size"] + 1):    # succ exists, positions still exact
        a = dual_chunk_attention_reference(q[:L], k[:L], v[:L], rope_theta=1e4, **cfg)
        assert kit.max_err(a, dual_chunk_attention_reference(q[:L], k[:L], v[:L], **plain)) < 1e-12
    a = dual_chunk_attention_reference(q, k, v, rope_theta=1e4, **cfg)
    assert kit.max_err(a, dual_chunk_attention_reference(q, k, v, **plain)) > 1e-3     # DCA must act


def test_plain_mode_is_causal_rope_attention(kit):
    from longserve.kernels.reference.attention import attention_with_lse
    q, k, v = kit.make_qkv(30, 70, 4, 2, seed=8)
    pos = torch.arange(70)
    want = attention_with_lse(apply_rope(q, pos[40:], 1e4), apply_rope(k, pos, 1e4), v, scale=0.25, causal=True)
    got = dual_chunk_attention_reference(q, k, v, rope_theta=1e4, chunk_size=None, local_size=None,
                                         return_lse=True)
    assert kit.max_err(got[0], want[0]) < 1e-12 and kit.max_err(got[1], want[1]) < 1e-12


def test_o2_golden_relative_positions():
    golden = [[int(x) for x in line.split()] for line in GOLDEN_R.strip().splitlines()]
    R = relative_positions(15, 8, 3)
    for t, row in enumerate(golden):
        assert R[t, :t + 1].tolist() == row
        assert torch.all(R[t, t + 1:] == -1)
    paper = relative_positions(15, 8, 3, clamp_max=7)           # the report's figure: clamp at chunk_size - 1
    assert paper[8, :9].tolist() == [7, 6, 5, 4, 3, 3, 2, 1, 0]


@pytest.mark.parametrize("seed", range(6))
def test_o2_properties_random_configs(seed):
    g = torch.Generator().manual_seed(seed)
    local = int(torch.randint(1, 20, (1,), generator=g))
    chunk = local + int(torch.randint(2, 40, (1,), generator=g))
    L = int(torch.randint(1, 4 * chunk, (1,), generator=g))
    R = relative_positions(L, chunk, local)
    t = torch.arange(L)[:, None]
    j = torch.arange(L)[None, :]
    causal = j <= t
    true = (t - j).expand(L, L)
    assert torch.all(R[causal] >= 0) and torch.all(R[causal] <= chunk)                  # property 1
    assert torch.all(R[causal & (true <= local)] == true[causal & (true <= local)])      # property 2
    changed = causal & (R != true)
    assert torch.all((R[changed] >= local + 1) & (R[changed] <= chunk))                 # property 3
    if L <= chunk + 1:
        assert torch.equal(R[causal], true[causal])                                      # property 4


@pytest.mark.parametrize("L,splits", [(100, [37, 63]), (100, [1] * 5 + [95]), (97, [32, 32, 33]), (70, [64, 6]),
                                      (65, [30, 3, 31, 1])])
@pytest.mark.parametrize("yarn", [0, 40])
def test_o4_chunked_prefill_equals_unchunked(kit, L, splits, yarn):
    q, k, v = kit.make_qkv(L, L, 4, 2, seed=L)
    kw = dict(TOY, original_max_position_embeddings=yarn, return_lse=True, prompt_len=L)
    whole = dual_chunk_attention_reference(q, k, v, **kw)
    start, outs, lses = 0, [], []
    for n in splits:
        o, lse = dual_chunk_attention_reference(q[start:start + n], k[:start + n], v[:start + n], **kw)
        outs.append(o)
        lses.append(lse)
        start += n
    assert start == L
    assert kit.max_err(torch.cat(outs), whole[0]) < 1e-13 and kit.max_err(torch.cat(lses), whole[1]) < 1e-13


def _paged_cache(keys_list, values_list, page, seed=0):
    """Scatter each sequence's rows into shuffled pages; returns caches and block tables."""
    g = torch.Generator().manual_seed(seed)
    blocks = [math.ceil(x.shape[0] / page) for x in keys_list]
    order = torch.randperm(sum(blocks), generator=g)
    G, D = keys_list[0].shape[1:]
    kc = torch.zeros((sum(blocks), page, G, D), dtype=keys_list[0].dtype)
    vc = torch.zeros_like(kc)
    tables = torch.zeros((len(keys_list), max(blocks)), dtype=torch.int32)
    at = 0
    for b, (k, v) in enumerate(zip(keys_list, values_list)):
        for i in range(blocks[b]):
            page_id = int(order[at + i])
            tables[b, i] = page_id
            rows = slice(i * page, min((i + 1) * page, k.shape[0]))
            n = rows.stop - rows.start
            kc[page_id, :n], vc[page_id, :n] = k[rows], v[rows]
        at += blocks[b]
    return kc, vc, tables


def test_o5_decode_equals_last_prefill_row_batched(kit):
    """Differing lengths in one batch (per-sequence YaRN factor) incl. 1 token, chunk boundaries and 2*cl."""
    lens = [1, 2, 32, 33, 64, 65, 100]
    H, G, D, page = 4, 2, 16, 16
    kw = dict(TOY, original_max_position_embeddings=40)
    qs, ks, vs, want, want_lse = [], [], [], [], []
    for i, L in enumerate(lens):
        q, k, v = kit.make_qkv(L, L, H, G, D, seed=100 + i)
        o, lse = dual_chunk_attention_reference(q, k, v, **kw, return_lse=True)
        qs.append(q[-1])
        ks.append(rotate_keys(k, torch.arange(L), rope_theta=1e4, chunk_size=48, local_size=16))
        vs.append(v)
        want.append(o[-1])
        want_lse.append(lse[-1])
    kc, vc, tables = _paged_cache(ks, vs, page)
    seq = torch.tensor(lens, dtype=torch.int32)
    o, lse = paged_dca_decode_reference(torch.stack(qs), kc, vc, tables, seq, **kw, return_lse=True)
    assert kit.max_err(o, torch.stack(want)) < 1e-13 and kit.max_err(lse, torch.stack(want_lse)) < 1e-13
    o2 = paged_dca_decode(torch.stack(qs), kc, vc, tables, seq, **kw)            # public API, CPU -> reference
    assert torch.equal(o2, o)


def test_o6_parts_partition_the_causal_set():
    for cl, chunk in ((5, 8), (32, 48), (7, 9)):
        L = 4 * cl + 3
        for n_q in (L, 1, cl + 2):
            seen = torch.zeros((n_q, L), dtype=torch.int64)
            q = torch.zeros((n_q, 1, 4), dtype=torch.float64)
            for b, e, P in sub_blocks(L, n_q, cl):
                for _, lo, hi, causal in dense_regions(q[b - (L - n_q):e - (L - n_q)], P, e, b, cl, chunk, 1e4):
                    rows = torch.arange(b, e)[:, None]
                    keys = torch.arange(lo, hi)[None, :]
                    ok = (keys <= rows) if causal else torch.ones_like(keys - rows, dtype=torch.bool)
                    assert torch.all(keys <= rows) or causal                # succ/inter keys are all older
                    seen[b - (L - n_q):e - (L - n_q), lo:hi] += ok.to(torch.int64)
            t = torch.arange(L - n_q, L)[:, None]
            assert torch.equal(seen, (torch.arange(L)[None, :] <= t).to(torch.int64))
            # decode metadata for the last token (t = L - 1, c = (L - 1) // cl)
            c = (L - 1) // cl
            assert [L - c * cl, cl * (c >= 1), cl * max(c - 1, 0)] == [
                int((seen[-1, c * cl:] > 0).sum()), int((seen[-1, max(0, (c - 1) * cl):c * cl] > 0).sum()) if c else 0,
                int((seen[-1, :max(0, (c - 1) * cl)] > 0).sum())]


def test_o15_yarn_factor_and_prefill_scale(kit):
    assert yarn_mscale(262144, 262144) == 1.0 and yarn_mscale(1000, 262144) == 1.0
    assert abs(yarn_mscale(1_010_000, 262144) - 1.134881) < 1e-6
    assert abs(yarn_mscale(1_000_000, 262144) ** 2 - 1.2857) < 1e-4
    assert yarn_mscale(10**6, 0) == 1.0
    # prefill logits scale m^2 / sqrt(D): with the same base scale, YaRN on equals YaRN off with scale * m^2
    q, k, v = kit.make_qkv(20, 50, 2, 1, seed=6)
    m = yarn_mscale(50, 20)
    on = dual_chunk_attention_reference(q, k, v, **TOY, original_max_position_embeddings=20, return_lse=True)
    off = dual_chunk_attention_reference(q, k, v, **TOY, scale=m * m / 4.0, return_lse=True)
    assert kit.max_err(on[0], off[0]) < 1e-14 and kit.max_err(on[1], off[1]) < 1e-14


def test_keys_rotated_and_public_dispatch(kit):
    q, k, v = kit.make_qkv(40, 90, 4, 2, seed=7)
    base = dual_chunk_attention_reference(q, k, v, **TOY)
    k_rot = rotate_keys(k, torch.arange(90), rope_theta=1e4, chunk_size=48, local_size=16)
    assert torch.equal(dual_chunk_attention_reference(q, k_rot, v, **TOY, keys_rotated=True), base)
    assert torch.equal(dual_chunk_attention(q, k, v, **TOY), base)


@pytest.mark.parametrize("bad", [dict(chunk_size=16, local_size=16), dict(chunk_size=16, local_size=None),
                                 dict(chunk_size=16, local_size=-1)])
def test_invalid_configs_raise(kit, bad):
    q, k, v = kit.make_qkv(4, 4, 2, 2)
    with pytest.raises(ValueError):
        dual_chunk_attention_reference(q, k, v, rope_theta=1e4, **bad)


def test_invalid_shapes_raise(kit):
    q, k, v = kit.make_qkv(5, 4, 2, 2)
    with pytest.raises(ValueError):
        dual_chunk_attention_reference(q, k, v, **TOY)                 # more queries than keys
    q, k, v = kit.make_qkv(4, 4, 2, 2)
    with pytest.raises(ValueError):
        dual_chunk_attention_reference(q, k, v, **TOY, prompt_len=3)
    kc = torch.zeros((2, 4, 2, 16), dtype=torch.float64)
    with pytest.raises(ValueError):
        paged_dca_decode_reference(q[:1], kc, kc, torch.zeros((1, 2), dtype=torch.int32),
                                   torch.tensor([9], dtype=torch.int32), **TOY)


@pytest.mark.parametrize("layers,kv_heads,want", [(28, 4, 57_344), (48, 8, 196_608)])
def test_o16_kv_bytes_per_token_of_the_cache_layout(kit, layers, kv_heads, want):
    """Kernel part of O16 (docs/algorithms.md#oracle-memory-arithmetic): a bf16 paged cache [blocks, block_size, G, D]
    holds 2*G*D*2 bytes/token/layer."""
    page, D = 16, 128
    k_cache = torch.zeros((2, page, kv_heads, D), dtype=torch.bfloat16)
    per_token_layer = 2 * k_cache[0, 0].numel() * k_cache.element_size()        # K and V
    assert per_token_layer * layers == want
    # decode runs on such a cache (bf16 in, fp32 math) and agrees with the fp64 reference to bf16 precision
    q, k, v = kit.make_qkv(20, 20, 2 * kv_heads, kv_heads, D, seed=layers)
    k_rot = rotate_keys(k, torch.arange(20), rope_theta=1e7, chunk_size=16, local_size=4)
    kc, vc, tables = _paged_cache([k_rot.bfloat16()], [v.bfloat16()], page)
    seq = torch.tensor([20], dtype=torch.int32)
    kw = dict(rope_theta=1e7, chunk_size=16, local_size=4)
    low = paged_dca_decode_reference(q[-1:].bfloat16(), kc, vc, tables, seq, **kw)
    truth = dual_chunk_attention_reference(q, k, v, **kw)[-1:]
    assert low.dtype == torch.bfloat16 and float((low.double() - truth).abs().max()) < 5e-2


def _paged(k_rot, v, block_size, *, seed=0):
    """A paged cache holding k_rot/v under a shuffled block table (plus unused blocks), as the engine stores them."""
    from longserve.kernels import PagedKV
    L, G, D = k_rot.shape
    n_blocks = -(-L // block_size)
    total = n_blocks + 3
    table = torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:n_blocks]
    k_cache = torch.full((total, block_size, G, D), float("nan"), dtype=k_rot.dtype)
    v_cache = torch.full((total, block_size, G, D), float("nan"), dtype=v.dtype)
    pos = torch.arange(L)
    k_cache[table[pos // block_size], pos % block_size] = k_rot
    v_cache[table[pos // block_size], pos % block_size] = v
    return PagedKV(k_cache, v_cache, table, L)


class _CountingKV:
    """A KV source that records every range read."""

    def __init__(self, inner):
        self.inner, self.length, self.reads = inner, inner.length, []

    def keys(self, lo, hi):
        self.reads.append(hi - lo)
        return self.inner.keys(lo, hi)

    def read(self, lo, hi):
        self.reads.append(hi - lo)
        return self.inner.read(lo, hi)


@pytest.mark.parametrize("L,n_q,key_block", [(100, 100, 7), (100, 30, 16), (75, 1, 5), (40, 40, 64)])
@pytest.mark.parametrize("dca", [True, False])
def test_paged_prefill_reads_bounded_blocks_and_matches(kit, monkeypatch, L, n_q, key_block, dca):
    """The paged reference reads at most KEY_BLOCK keys at a time (LSE-merged) and equals the contiguous one."""
    from longserve.kernels.reference import dca as ref_dca
    cfg = TOY if dca else dict(rope_theta=1e4, chunk_size=None, local_size=None)
    q, k, v = kit.make_qkv(n_q, L, 4, 2, seed=L + n_q)
    k_rot = rotate_keys(k, torch.arange(L), **cfg)
    whole = dual_chunk_attention_reference(q, k, v, **cfg, return_lse=True)
    monkeypatch.setattr(ref_dca, "KEY_BLOCK", key_block)
    src = _CountingKV(_paged(k_rot, v, 8, seed=L))
    o, lse = ref_dca.paged_dual_chunk_attention_reference(q, src, **cfg, return_lse=True)
    assert kit.max_err(o, whole[0]) < kit.FP64_TOL and kit.max_err(lse, whole[1]) < kit.FP64_TOL
    assert src.reads and max(src.reads) <= key_block


def test_paged_sparse_prefill_matches_contiguous(kit):
    from longserve.kernels import PairStats, SparseHeadBudgets, paged_dual_chunk_attention
    L, n_q = 150, 90
    q, k, v = kit.make_qkv(n_q, L, 4, 2, seed=9)
    sp = SparseHeadBudgets.uniform(4, 20, 30, threshold=0, last_q=16)
    a_stats, b_stats = PairStats(), PairStats()
    a = dual_chunk_attention_reference(q, k, v, **TOY, sparse=sp, return_lse=True, stats=a_stats)
    b = paged_dual_chunk_attention(q, _paged(rotate_keys(k, torch.arange(L), **TOY), v, 16), **TOY, sparse=sp,
                                   return_lse=True, stats=b_stats)
    assert kit.max_err(b[0], a[0]) < kit.FP64_TOL and kit.max_err(b[1], a[1]) < kit.FP64_TOL
    assert a_stats.resolved() == b_stats.resolved() and 0 < int(a_stats.computed) < int(a_stats.causal)
