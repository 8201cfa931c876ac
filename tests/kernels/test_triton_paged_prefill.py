"""Triton prefill straight from the paged KV cache (interpreted): the paged kernel mode against the contiguous one,
its pair counter against a brute-force count of the work lists, the paged DCA composition against the reference,
and a meta-tensor trace of a 1M-token layer-chunk (no whole-context K/V copy, no host sync)."""
import math

import pytest
import torch

from longserve.kernels import dispatch
from longserve.kernels import vertical_slash as tri
from longserve.kernels.dca import dual_chunk_attention_triton, paged_dual_chunk_attention_triton, sparse_work_lists
from longserve.kernels.dca_math import rotate_keys, sub_blocks
from longserve.kernels.kv_source import ContiguousKV, PagedKV
from longserve.kernels.pair_stats import PairStats, region_pairs
from longserve.kernels.reference.dca import dual_chunk_attention_reference, paged_dual_chunk_attention_reference
from longserve.kernels.sparse_config import SparseHeadBudgets
from longserve.kernels.sparse_index import convert_vertical_slash_indexes

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array:DeprecationWarning")  # interpreter noise

F32, F16 = torch.float32, torch.float16
FLOOR = {F32: 2e-5, F16: 2e-3}
TOY = dict(rope_theta=1e4, chunk_size=48, local_size=16)          # chunk length cl = 32
SPARSE_TOY = dict(rope_theta=1e4, chunk_size=80, local_size=16)   # cl = 64


def _randn(shape, seed, dtype=torch.float64):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def paged_copy(k, v, page, seed=0):
    """k/v ``[L, G, D]`` scattered into NaN-filled caches over a shuffled block table with spare blocks, so a read
    of any slot outside the sequence's keys poisons the result."""
    L = k.shape[0]
    n_blocks = math.ceil(L / page)
    total = n_blocks + 3
    table = torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:n_blocks].to(torch.int32)
    kc = torch.full((total, page, *k.shape[1:]), float("nan"), dtype=k.dtype)
    vc = torch.full_like(kc, float("nan"))
    pos = torch.arange(L)
    kc[table[pos // page].long(), pos % page] = k
    vc[table[pos // page].long(), pos % page] = v
    return PagedKV(kc, vc, table, L)


def random_lists(n_q, kv, H, *, causal, seed, n_vert=9, n_slash=6):
    gen = torch.Generator().manual_seed(seed)
    s_limit = kv if causal else kv + n_q
    vert = torch.stack([torch.randperm(kv, generator=gen)[:n_vert].sort().values for _ in range(H)]).int()
    sl = torch.stack([torch.randperm(s_limit, generator=gen)[:n_slash].sort(descending=True).values
                      for _ in range(H)]).int()
    counts_v = torch.full((H,), min(n_vert, kv), dtype=torch.int32)
    counts_s = torch.full((H,), min(n_slash, s_limit), dtype=torch.int32)
    return convert_vertical_slash_indexes(vert, counts_v, sl, counts_s, n_q, kv, causal=causal)


def brute_pairs(n_q, kv, lists, *, causal, dense=False):
    """Computed pairs by the definition in ``kernels.vertical_slash``: every listed block start's 64 keys and
    every listed column, for each valid row of its 64-row block, key in range and causally visible; repeats
    count again. Dense: every key of the region for every row (causal when asked)."""
    off = kv - n_q

    def visible(r, key):
        return 0 <= key < kv and (not causal or key <= off + r)

    if dense:
        return sum(visible(r, key) for r in range(n_q) for key in range(kv))
    bc, bo, cc, ci = lists
    H, R = bc.shape
    total = 0
    for h in range(H):
        for blk in range(R):
            rows = range(blk * 64, min(n_q, blk * 64 + 64))
            keys = [int(s) + i for s in bo[h, blk, :int(bc[h, blk])] for i in range(64)]
            keys += [int(c) for c in ci[h, blk, :int(cc[h, blk])]]
            total += sum(visible(r, key) for r in rows for key in keys)
    return total


@pytest.mark.parametrize("dtype", [F32, F16])
@pytest.mark.parametrize("page,L,lo,n_q,H,G,causal", [
    (16, 203, 37, 101, 4, 2, True),        # odd lengths, offset not a page multiple, GQA
    (64, 203, 37, 101, 4, 2, True),
    (16, 150, 5, 70, 7, 1, False),          # non-causal (succ / inter regions)
    (64, 129, 0, 129, 2, 2, True),          # whole sequence, one key per last page
])
def test_paged_kernel_equals_contiguous(dtype, page, L, lo, n_q, H, G, causal):
    """Same kernel, same keys: paged reads through a shuffled table give bitwise the contiguous results, for
    the dense walk and for sparse work lists, and the contiguous mode's key offset matches a slice."""
    k, v = _randn((L, G, 16), 1, dtype), _randn((L, G, 16), 2, dtype)
    q = _randn((n_q, H, 16), 3, dtype)
    paged = paged_copy(k, v, page, seed=page + L)
    kw = dict(scale=0.3, causal=causal)
    want = tri.dense_attention(q, k[lo:], v[lo:], **kw)
    for got in (tri.dense_attention_kv(q, paged, lo, L, **kw), tri.dense_attention_kv(q, ContiguousKV(k, v), lo, L,
                                                                                       **kw)):
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    lists = random_lists(n_q, L - lo, H, causal=causal, seed=L)
    want = tri.vertical_slash_attention(q, k[lo:], v[lo:], *lists, **kw)
    got = tri.vertical_slash_attention_kv(q, paged, lo, L, *lists, **kw)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert torch.isfinite(got[1]).any() and not torch.isnan(got[0]).any()


def test_paged_kernel_key_range_inside_the_sequence():
    """A region ending before the sequence does (succ / inter) reads only its own keys."""
    L, page = 150, 16
    k, v, q = _randn((L, 1, 16), 4), _randn((L, 1, 16), 5), _randn((40, 2, 16), 6)
    paged = paged_copy(k.float(), v.float(), page, seed=1)
    want = tri.dense_attention(q.float(), k[21:90].float(), v[21:90].float(), scale=0.25, causal=False)
    got = tri.dense_attention_kv(q.float(), paged, 21, 90, scale=0.25, causal=False)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("n_q,kv,causal", [(100, 130, True), (70, 65, True), (33, 101, False), (1, 1, True)])
def test_pair_counts_equal_brute_force(n_q, kv, causal):
    H, G = 3, 1
    q, k, v = _randn((n_q, H, 16), 7).float(), _randn((kv, G, 16), 8).float(), _randn((kv, G, 16), 9).float()
    lists = random_lists(n_q, kv, H, causal=causal, seed=n_q + kv)
    count = torch.zeros((), dtype=torch.int64)
    tri.vertical_slash_attention(q, k, v, *lists, scale=0.3, causal=causal, pair_count=count)
    assert int(count) == brute_pairs(n_q, kv, lists, causal=causal)
    dense = torch.zeros((), dtype=torch.int64)
    for config in ({"block_m": 64}, {"block_m": 16}):
        dense.zero_()
        tri.dense_attention(q, k, v, scale=0.3, causal=causal, pair_count=dense, config=config)
        assert int(dense) == H * brute_pairs(n_q, kv, None, causal=causal, dense=True)
    if n_q <= kv:
        assert int(dense) == region_pairs(n_q, kv, causal, H)


def test_pair_counts_repeat_keys_listed_twice():
    """A column inside a listed block and a block listed twice are scored, and counted, twice."""
    n_q, kv, H = 10, 70, 1
    q, k, v = _randn((n_q, H, 16), 1).float(), _randn((kv, 1, 16), 2).float(), _randn((kv, 1, 16), 3).float()
    bc = torch.tensor([[2]], dtype=torch.int32)
    bo = torch.tensor([[[0, 0]]], dtype=torch.int32)
    cc = torch.tensor([[1]], dtype=torch.int32)
    ci = torch.tensor([[[5]]], dtype=torch.int32)
    count = torch.zeros((), dtype=torch.int64)
    tri.vertical_slash_attention(q, k, v, bc, bo, cc, ci, scale=0.3, causal=False, pair_count=count)
    assert int(count) == n_q * (64 + 64 + 1)


def test_bad_sources_and_counters_raise():
    k, v, q = _randn((40, 2, 16), 1).float(), _randn((40, 2, 16), 2).float(), _randn((8, 4, 16), 3).float()
    paged = paged_copy(k, v, 16)
    with pytest.raises(ValueError):
        tri.dense_attention_kv(q, paged, 0, 41, scale=1.0, causal=True)               # past the sequence
    with pytest.raises(ValueError):
        tri.dense_attention_kv(q, paged, 0, 40, scale=1.0, causal=True, pair_count=torch.zeros(()))
    odd = PagedKV(torch.zeros((3, 12, 2, 16)), torch.zeros((3, 12, 2, 16)), torch.arange(3).int(), 30)
    with pytest.raises(ValueError):
        tri.dense_attention_kv(q, odd, 0, 30, scale=1.0, causal=True)                 # page not a power of two
    with pytest.raises(ValueError):
        tri.dense_attention_kv(q.half(), paged, 0, 40, scale=1.0, causal=True)
    with pytest.raises(TypeError):
        paged_dual_chunk_attention_triton(q, (k, v), **TOY)


def _cache(L, G, D, seed, cl):
    """Un-rotated k, v ``[L, G, D]`` (fp64) and k as the cache stores it (rotated at ``j mod cl``)."""
    k, v = _randn((L, G, D), seed), _randn((L, G, D), seed + 1)
    return k, v, rotate_keys(k, torch.arange(L), rope_theta=1e4, chunk_size=cl + 16, local_size=16)


def _err(x, truth):
    finite = torch.isfinite(truth)
    assert torch.equal(torch.isfinite(x), finite)
    return float((x.double()[finite] - truth.double()[finite]).abs().max()) if finite.any() else 0.0


@pytest.mark.parametrize("dtype,L,n_q,page,H,G", [
    (F32, 30, 30, 16, 2, 1),       # one DCA chunk
    (F16, 61, 61, 16, 4, 2),       # two chunks
    (F32, 130, 45, 64, 4, 2),      # five chunks, a chunked prefill (queries are the tail)
    (F16, 101, 1, 16, 2, 2),       # a single query row
])
def test_paged_dca_matches_reference(dtype, L, n_q, page, H, G):
    k, v, k_rot = _cache(L, G, 16, seed=L, cl=32)
    q = _randn((n_q, H, 16), L + 1)
    kw = dict(TOY, original_max_position_embeddings=40, prompt_len=L + 7, return_lse=True)   # YaRN on
    truth = dual_chunk_attention_reference(q, k, v, **kw)
    low = dual_chunk_attention_reference(q.to(dtype), k.to(dtype), v.to(dtype), **kw)
    paged = paged_copy(k_rot.to(dtype), v.to(dtype), page, seed=n_q)
    out = paged_dual_chunk_attention_triton(q.to(dtype), paged, **kw)
    assert out[0].dtype == dtype and out[1].dtype == torch.float32
    for got, ref, want in zip(out, low, truth):
        assert _err(got, want) <= 2 * _err(ref, want) + FLOOR[dtype]
    contiguous = dual_chunk_attention_triton(q.to(dtype), k_rot.to(dtype), v.to(dtype), keys_rotated=True, **kw)
    assert torch.equal(out[0], contiguous[0]) and torch.equal(out[1], contiguous[1])


@pytest.mark.parametrize("n_q", [150, 70])
def test_paged_sparse_dca_counts_and_equals_contiguous(n_q):
    """Sparse DCA from the paged cache: bitwise the contiguous composition, pair counts as device tensors equal
    to the brute-force count of the same work lists, and the causal count of the dense regions."""
    L, H, G, cl = 150, 4, 2, 64
    budgets = SparseHeadBudgets((5, 12, 30, 3), (8, 20, 40, 110), threshold=64, last_q=16)
    _, v, k_rot = _cache(L, G, 16, seed=11, cl=cl)
    q = _randn((n_q, H, 16), 12).float()
    k_rot, v = k_rot.float(), v.float()
    paged = paged_copy(k_rot, v, 16, seed=3)
    stats = PairStats()
    out = paged_dual_chunk_attention_triton(q, paged, sparse=budgets, return_lse=True, stats=stats, **SPARSE_TOY)
    assert isinstance(stats.computed, torch.Tensor) and stats.computed.dim() == 0
    plain = dual_chunk_attention_triton(q, k_rot, v, keys_rotated=True, sparse=budgets, return_lse=True,
                                        **SPARSE_TOY)
    assert torch.equal(out[0], plain[0]) and torch.equal(out[1], plain[1])
    want, causal = 0, 0
    tau = 1 / math.sqrt(16)
    for b, e, P in sub_blocks(L, n_q, cl):
        rows = q[b - (L - n_q):e - (L - n_q)]
        lists = sparse_work_lists(rows, ContiguousKV(k_rot, v), b=b, e=e, P=P, cl=cl, chunk_size=80, rope_theta=1e4,
                                  tau=tau, budgets=budgets)
        bounds = [(P, e, True), (P - cl, P, False), (0, P - cl, False)][:len(lists)]
        for lst, (lo, hi, causal_region) in zip(lists, bounds):
            want += brute_pairs(e - b, hi - lo, lst, causal=causal_region)
            causal += region_pairs(e - b, hi - lo, causal_region, H)
    assert int(stats.computed) == want and stats.causal == causal
    assert 0 < want < causal
    both = PairStats.with_selected(), PairStats.with_selected()        # the reference counts the same tiles
    paged_dual_chunk_attention_triton(q, paged, sparse=budgets, stats=both[0], **SPARSE_TOY)
    paged_dual_chunk_attention_reference(q, paged, sparse=budgets, stats=both[1], **SPARSE_TOY)
    assert both[0].resolved() == both[1].resolved() and 0 < both[0].resolved().selected <= want
    dense_stats = PairStats.with_selected()
    paged_dual_chunk_attention_triton(q, paged, stats=dense_stats, **SPARSE_TOY)
    assert dense_stats.computed == dense_stats.causal == dense_stats.selected == causal    # dense: every pair


def test_dispatch_tracing_picks_the_paged_triton_path_at_1m_without_copies_or_syncs():
    """131072 queries over 1M cached keys (Qwen2.5-7B shapes: H=28, G=4, D=128, page 16) on meta tensors: the
    host code allocates no whole-context K/V tensor and reads nothing back, dense and sparse."""
    trace = pytest.importorskip("longserve.bench.trace")
    L, n_q, H, G, D, page = 1 << 20, 131072, 28, 4, 128, 16
    kc = torch.empty((L // page, page, G, D), dtype=torch.bfloat16, device="meta")
    paged = PagedKV(kc, torch.empty_like(kc), torch.empty((L // page,), dtype=torch.int32, device="meta"), L)
    q = torch.empty((n_q, H, D), dtype=torch.bfloat16, device="meta")
    qwen = dict(rope_theta=1e7, chunk_size=262144, local_size=8192, original_max_position_embeddings=32768)
    for sparse in (None, SparseHeadBudgets.uniform(H, 1000, 6096, threshold=32768, last_q=64)):
        stats = PairStats()
        with dispatch.tracing(), trace.trace(keep_largest=64) as t:
            out = paged_dual_chunk_attention_triton(q, paged, sparse=sparse, stats=stats, **qwen)
        assert out.shape == q.shape and t.report.num_syncs == 0
        # per-query-head tensors ([.., H, D]) scale with the chunk; anything else this large is a K/V copy
        for _nbytes, _, site, shape in t.report.largest:
            numel = math.prod(shape)
            assert numel < L * G * D or (len(shape) >= 2 and shape[-2] == H), (site, shape)
        assert not any(len(s) >= 2 and tuple(s[-2:]) == (G, D) and math.prod(s) >= L * G * D // 4
                       for _, _, _, s in t.report.largest)
        assert t.report.peak_bytes < 16 << 30
        if sparse is not None:
            assert isinstance(stats.computed, torch.Tensor) and stats.causal > 0


def test_public_entry_dispatches_to_the_paged_triton_path(monkeypatch):
    """``kernels.paged_dual_chunk_attention`` with LONGSERVE_KERNELS=triton is bitwise the direct Triton call."""
    from longserve import kernels

    L, H, G = 77, 4, 2
    _, v, k_rot = _cache(L, G, 16, seed=5, cl=32)
    paged = paged_copy(k_rot.half(), v.half(), 16, seed=2)
    q = _randn((40, H, 16), 6, F16)
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    a = kernels.paged_dual_chunk_attention(q, paged, return_lse=True, **TOY)
    b = paged_dual_chunk_attention_triton(q, paged, return_lse=True, **TOY)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
