"""Vertical-slash / dense Triton attention (interpreted) vs the references, 2x rule (docs/testing.md#tolerance-rule, O7
(docs/algorithms.md#oracle-full-budget))."""
import math

import pytest
import torch

from longserve.kernels import vertical_slash as tri
from longserve.kernels.reference import vertical_slash as ref_vs
from longserve.kernels.reference.attention import attention_with_lse
from longserve.kernels.sparse_index import convert_vertical_slash_indexes

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array:DeprecationWarning")  # interpreter noise

FLOOR = {torch.float32: 2e-5, torch.float16: 2e-3}


def full_block_lists(q_len: int, kv_len: int, num_heads: int, *, causal: bool, device=None):
    """Work lists that cover every (causal) pair: block starts 0, 64, ... per query block, no columns (the
    full-budget oracle of the list path against dense attention); the lists are broadcast over heads."""
    if q_len < 0 or kv_len < 0 or num_heads <= 0:
        raise ValueError("q_len, kv_len must be >= 0 and num_heads > 0")
    R = math.ceil(q_len / tri.BLOCK_M)
    nb_max = max(1, math.ceil(kv_len / tri.BLOCK_N))
    ends = torch.arange(1, R + 1, device=device, dtype=torch.int64) * tri.BLOCK_M
    if causal:
        visible = torch.clamp(torch.minimum(ends + (kv_len - q_len), torch.tensor(kv_len, device=device)), min=0)
    else:
        visible = torch.full_like(ends, kv_len)
    counts = ((visible + tri.BLOCK_N - 1) // tri.BLOCK_N).to(torch.int32)
    starts = (torch.arange(nb_max, device=device, dtype=torch.int32) * tri.BLOCK_N).expand(R, nb_max)
    block_count = counts.expand(num_heads, R)
    block_offset = starts.expand(num_heads, R, nb_max)
    column_count = torch.zeros((num_heads, R), dtype=torch.int32, device=device)
    column_index = torch.zeros((num_heads, R, 1), dtype=torch.int32, device=device)
    return block_count, block_offset, column_count, column_index


def _qkv(n_q, n_k, H, G, D, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn((n_q, H, D), generator=g, dtype=torch.float64),
            torch.randn((n_k, G, D), generator=g, dtype=torch.float64),
            torch.randn((n_k, G, D), generator=g, dtype=torch.float64))


def _err(x, truth):
    x, truth = x.double(), truth.double()
    finite = torch.isfinite(truth)
    assert torch.equal(torch.isfinite(x), finite), "rows without keys must be exactly -inf, never NaN"
    return float((x[finite] - truth[finite]).abs().max()) if finite.any() else 0.0


def _two_x(kernel, low, truth, dtype):
    for got, ref, want in zip(kernel, low, truth):
        assert _err(got, want) <= 2 * _err(ref, want) + FLOOR[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n_q,n_k,H,G,causal", [
    (1, 1, 2, 1, True), (2, 2, 2, 2, True), (63, 63, 2, 1, True), (65, 100, 4, 2, True),
    (100, 65, 7, 1, True), (64, 64, 2, 1, False), (33, 101, 7, 1, False)])
def test_dense_matches_reference(dtype, n_q, n_k, H, G, causal):
    q, k, v = _qkv(n_q, n_k, H, G, 16, seed=n_q + n_k)
    scale = 1 / math.sqrt(16)
    truth = attention_with_lse(q, k, v, scale=scale, causal=causal)
    low = attention_with_lse(q.to(dtype), k.to(dtype), v.to(dtype), scale=scale, causal=causal)
    out = tri.dense_attention(q.to(dtype), k.to(dtype), v.to(dtype), scale=scale, causal=causal)
    assert out[0].dtype == dtype and out[1].dtype == torch.float32
    _two_x(out, low, truth, dtype)
    if causal and n_q > n_k:                     # bottom-right alignment leaves the first rows keyless
        assert torch.all(out[0][: n_q - n_k] == 0) and torch.all(torch.isneginf(out[1][: n_q - n_k]))


@pytest.mark.parametrize("causal", [True, False])
def test_full_lists_equal_dense(causal):
    """O7 (docs/algorithms.md#oracle-full-budget) for the list path: full block lists reproduce dense attention."""
    q, k, v = (t.float() for t in _qkv(100, 130, 4, 2, 32, seed=1))
    lists = full_block_lists(100, 130, 4, causal=causal)
    o_l, l_l = tri.vertical_slash_attention(q, k, v, *lists, scale=0.2, causal=causal)
    o_d, l_d = tri.dense_attention(q, k, v, scale=0.2, causal=causal)
    assert torch.allclose(o_l, o_d, atol=1e-6) and torch.allclose(l_l, l_d, atol=1e-6)


@pytest.mark.parametrize("dtype,causal,n_q,n_k", [
    (torch.float32, True, 150, 150), (torch.float16, True, 150, 150), (torch.float32, True, 65, 129),
    (torch.float16, False, 100, 77)])
def test_sparse_lists_match_reference_twin(dtype, causal, n_q, n_k):
    H, G = 7, 1 if causal else 7
    gen = torch.Generator().manual_seed(n_q)
    s_limit = n_k if causal else n_k + n_q
    vert = torch.stack([torch.randperm(n_k, generator=gen)[:9].sort().values for _ in range(H)]).int()
    sl = torch.stack([torch.randperm(s_limit, generator=gen)[:6].sort(descending=True).values
                      for _ in range(H)]).int()
    if causal:
        sl[:, -1] = 0                            # the forced main diagonal, as estimation guarantees
    counts_v = torch.full((H,), 9, dtype=torch.int32)
    counts_s = torch.full((H,), 6, dtype=torch.int32)
    lists = convert_vertical_slash_indexes(vert, counts_v, sl, counts_s, n_q, n_k, causal=causal)
    q, k, v = _qkv(n_q, n_k, H, G, 16, seed=3)
    truth = ref_vs.vertical_slash_attention(q, k, v, *lists, scale=0.3, causal=causal)
    low = ref_vs.vertical_slash_attention(q.to(dtype), k.to(dtype), v.to(dtype), *lists, scale=0.3, causal=causal)
    out = tri.vertical_slash_attention(q.to(dtype), k.to(dtype), v.to(dtype), *lists, scale=0.3, causal=causal)
    _two_x(out, low, truth, dtype)


def test_rerun_is_bitwise_identical():
    q, k, v = (t.half() for t in _qkv(113, 113, 4, 2, 16, seed=5))
    lists = full_block_lists(113, 113, 4, causal=True)
    a = tri.vertical_slash_attention(q, k, v, *lists, scale=0.25, causal=True)
    b = tri.vertical_slash_attention(q, k, v, *lists, scale=0.25, causal=True)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_bad_input_raises():
    q, k, v = (t.float() for t in _qkv(8, 8, 3, 2, 16, seed=0))
    with pytest.raises(ValueError):
        tri.dense_attention(q, k, v, scale=1.0, causal=True)          # 3 heads over 2 KV heads
    q, k, v = (t.float() for t in _qkv(8, 8, 4, 2, 16, seed=0))
    with pytest.raises(ValueError):
        tri.dense_attention(q, k.half(), v, scale=1.0, causal=True)
    bc, bo, cc, ci = full_block_lists(8, 8, 4, causal=True)
    with pytest.raises(ValueError):
        tri.vertical_slash_attention(q, k, v, bc.long(), bo, cc, ci, scale=1.0, causal=True)
    with pytest.raises(ValueError):
        tri.vertical_slash_attention(q, k, v, bc[:2], bo, cc, ci, scale=1.0, causal=True)
