"""One sparse semantics: the reference and the Triton path (interpreted, fp32) compute the same vertical-slash
DCA prefill, tile for tile, and count the same (query, key) pairs, contiguous and paged, with 1, 2 and 4 DCA chunks."""
import pytest
import torch

from longserve.kernels import ContiguousKV, PagedKV, PairStats, SparseHeadBudgets, rotate_keys
from longserve.kernels.dca import dual_chunk_attention_triton, paged_dual_chunk_attention_triton
from longserve.kernels.reference.dca import dual_chunk_attention_reference, paged_dual_chunk_attention_reference

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array:DeprecationWarning")  # interpreter noise

CFG = dict(rope_theta=1e4, chunk_size=80, local_size=16)      # cl = 64
TOL = 2e-5


def _inputs(n_q, L, H, G, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(shape, generator=g) for shape in ((n_q, H, D), (L, G, D), (L, G, D)))
    k[:4] *= 3.0                            # a few strong sink keys, so selections are not uniform noise
    return q, k, v


def _budgets(H, seed):
    g = torch.Generator().manual_seed(seed)
    return SparseHeadBudgets(tuple(int(x) for x in torch.randint(1, 30, (H,), generator=g)),
                             tuple(int(x) for x in torch.randint(1, 90, (H,), generator=g)), 0, 16)


def _err(a, b):
    return float((a.double() - b.double()).abs().max())


@pytest.mark.parametrize("L,n_q,H,G", [(60, 60, 4, 2),      # one DCA chunk
                                       (120, 120, 4, 2),    # two: intra + succ
                                       (250, 250, 4, 1),    # four: intra + succ + inter
                                       (250, 70, 2, 2)])    # a later prefill chunk over cached keys
def test_reference_sparse_equals_triton_sparse(L, n_q, H, G):
    q, k, v = _inputs(n_q, L, H, G, seed=L + n_q)
    sp = _budgets(H, seed=L)
    ref = dual_chunk_attention_reference(q, k, v, **CFG, sparse=sp, return_lse=True)
    tri = dual_chunk_attention_triton(q, k, v, **CFG, sparse=sp, return_lse=True)
    assert _err(ref[0], tri[0]) < TOL and _err(ref[1], tri[1]) < TOL
    if L > 200:                             # the budgets really are partial: sparse differs from dense
        dense = dual_chunk_attention_reference(q, k, v, **CFG, return_lse=True)
        assert _err(ref[1], dense[1]) > 1e-3


@pytest.mark.parametrize("L,n_q,H,G", [(60, 60, 4, 2), (250, 250, 4, 1), (250, 70, 2, 2)])
def test_both_paths_count_the_same_pairs(L, n_q, H, G):
    """computed = pairs scored with the key valid and causally visible for a real query row; causal = dense."""
    q, k, v = _inputs(n_q, L, H, G, seed=L + n_q)
    sp = _budgets(H, seed=L)
    ref_stats, tri_stats = PairStats(), PairStats()
    dual_chunk_attention_reference(q, k, v, **CFG, sparse=sp, stats=ref_stats)
    dual_chunk_attention_triton(q, k, v, **CFG, sparse=sp, stats=tri_stats)
    ref_stats, tri_stats = ref_stats.resolved(), tri_stats.resolved()
    assert (tri_stats.computed, tri_stats.causal) == (ref_stats.computed, ref_stats.causal)


def test_paged_reference_equals_paged_triton():
    L, n_q, H, G, bs = 250, 130, 4, 2, 16
    q, k, v = _inputs(n_q, L, H, G, seed=3)
    k_rot = rotate_keys(k, torch.arange(L), **CFG)
    n_blocks = -(-L // bs)
    table = torch.randperm(n_blocks + 2, generator=torch.Generator().manual_seed(3))[:n_blocks]
    k_cache, v_cache = torch.zeros((n_blocks + 2, bs, G, 16)), torch.zeros((n_blocks + 2, bs, G, 16))
    pos = torch.arange(L)
    k_cache[table[pos // bs], pos % bs] = k_rot
    v_cache[table[pos // bs], pos % bs] = v
    kv = PagedKV(k_cache, v_cache, table.to(torch.int32), L)
    sp = _budgets(H, seed=4)
    ref_stats, tri_stats = PairStats(), PairStats()
    ref = paged_dual_chunk_attention_reference(q, kv, **CFG, sparse=sp, return_lse=True, stats=ref_stats)
    tri = paged_dual_chunk_attention_triton(q, kv, **CFG, sparse=sp, return_lse=True, stats=tri_stats)
    contiguous = paged_dual_chunk_attention_reference(q, ContiguousKV(k_rot, v), **CFG, sparse=sp,
                                                      return_lse=True)
    assert _err(ref[0], tri[0]) < TOL and _err(ref[1], tri[1]) < TOL
    assert _err(ref[0], contiguous[0]) < 1e-6
    assert ref_stats.resolved().causal == tri_stats.resolved().causal


@pytest.mark.parametrize("causal", [True, False])
def test_keys_listed_twice_are_scored_twice_on_both_paths(causal):
    """Hand-made lists naming keys twice (overlapping block starts, a column inside a block, a repeated column):
    the reference twin matches the kernel, and both differ from attention over the set of keys."""
    from longserve.kernels.reference import vertical_slash as ref_vs
    from longserve.kernels.reference.attention import attention_with_lse
    from longserve.kernels.vertical_slash import vertical_slash_attention
    q, k, v = _inputs(70, 200, 2, 1, seed=8)
    bc = torch.tensor([[2, 1], [1, 2]], dtype=torch.int32)
    bo = torch.tensor([[[0, 32], [64, 0]], [[100, 0], [0, 10]]], dtype=torch.int32)
    cc = torch.tensor([[3, 0], [1, 2]], dtype=torch.int32)
    ci = torch.tensor([[[5, 150, 150], [0, 0, 0]], [[120, 0, 0], [3, 3, 0]]], dtype=torch.int32)
    lists = (bc, bo, cc, ci)
    ref = ref_vs.vertical_slash_attention(q, k, v, *lists, scale=0.3, causal=causal)
    tri = vertical_slash_attention(q, k, v, *lists, scale=0.3, causal=causal)
    assert _err(ref[0], tri[0]) < TOL and _err(ref[1], tri[1]) < TOL
    as_set = attention_with_lse(q, k, v, scale=0.3, causal=causal,
                                mask=ref_vs.covered_mask(70, 200, *lists, causal=causal))
    assert _err(ref[1], as_set[1]) > 1e-3
