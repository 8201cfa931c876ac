"""Device index builder (Triton, interpreted) == reference convert_vertical_slash_indexes
(docs/algorithms.md#index-building, O9 (docs/algorithms.md#oracle-index-lists))."""
import pytest
import torch

from longserve.kernels.reference.sparse_index import convert_vertical_slash_indexes as ref_convert
from longserve.kernels.sparse_index import convert_vertical_slash_indexes

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array:DeprecationWarning")  # interpreter noise


def _selection(gen, H, kv_len, q_len, nv, ns, causal):
    """Distinct sorted verticals in [0, kv_len) and slashes in the region's valid offset range, ragged counts."""
    s_limit = kv_len if causal else kv_len + q_len
    nv_max, ns_max = min(nv, kv_len), min(ns, s_limit)
    vert = torch.zeros((H, max(nv_max, 1)), dtype=torch.int32)
    sl = torch.zeros((H, max(ns_max, 1)), dtype=torch.int32)
    vc = torch.zeros(H, dtype=torch.int32)
    sc = torch.zeros(H, dtype=torch.int32)
    for h in range(H):
        nvh = int(torch.randint(0, nv_max + 1, (1,), generator=gen)) if h else nv_max
        nsh = int(torch.randint(0, ns_max + 1, (1,), generator=gen)) if h else ns_max
        v = torch.randperm(kv_len, generator=gen)[:nvh].sort().values
        s = torch.randperm(s_limit, generator=gen)[:nsh].sort(descending=True).values
        vert[h, :nvh], sl[h, :nsh], vc[h], sc[h] = v.int(), s.int(), nvh, nsh
    return vert, vc, sl, sc


def _assert_same(got, want):
    bc, bo, cc, ci = got
    rbc, rbo, rcc, rci = (t.to(torch.int32) for t in want)
    assert torch.equal(bc, rbc) and torch.equal(cc, rcc)
    H, R = bc.shape
    for h in range(H):
        for r in range(R):
            assert torch.equal(bo[h, r, :bc[h, r]], rbo[h, r, :rbc[h, r]]), (h, r)
            assert torch.equal(ci[h, r, :cc[h, r]], rci[h, r, :rcc[h, r]]), (h, r)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("q_len,kv_len", [(1, 1), (2, 5), (63, 63), (65, 65), (100, 203), (130, 64), (113, 113)])
def test_matches_reference(causal, q_len, kv_len):
    if causal and kv_len < q_len:
        kv_len = q_len
    gen = torch.Generator().manual_seed(q_len * 1000 + kv_len + causal)
    sel = _selection(gen, 3, kv_len, q_len, nv=20, ns=24, causal=causal)
    _assert_same(convert_vertical_slash_indexes(*sel, q_len, kv_len, causal=causal),
                 ref_convert(*sel, q_len, kv_len, causal=causal))


@pytest.mark.parametrize("causal", [True, False])
def test_unsorted_input_and_padding_are_handled(causal):
    """Top-k order and junk past the counts give the same lists as sorted, clean input."""
    q_len, kv_len = 100, 150
    gen = torch.Generator().manual_seed(7)
    vert, vc, sl, sc = _selection(gen, 2, kv_len, q_len, nv=12, ns=16, causal=causal)
    want = convert_vertical_slash_indexes(vert, vc, sl, sc, q_len, kv_len, causal=causal)
    shuffled_v, shuffled_s = vert.clone(), sl.clone()
    for h in range(2):
        pv = torch.randperm(int(vc[h]), generator=gen)
        ps = torch.randperm(int(sc[h]), generator=gen)
        shuffled_v[h, :vc[h]] = vert[h, :vc[h]][pv]
        shuffled_s[h, :sc[h]] = sl[h, :sc[h]][ps]
        shuffled_v[h, vc[h]:] = 5
        shuffled_s[h, sc[h]:] = 7
    got = convert_vertical_slash_indexes(shuffled_v, vc, shuffled_s, sc, q_len, kv_len, causal=causal)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_invariants_causal():
    """O9 (b, c) (docs/algorithms.md#oracle-index-lists): no column twice or inside an emitted block; causal columns
    precede the block's first row."""
    q_len = kv_len = 203
    gen = torch.Generator().manual_seed(3)
    sel = _selection(gen, 4, kv_len, q_len, nv=40, ns=30, causal=True)
    bc, bo, cc, ci = convert_vertical_slash_indexes(*sel, q_len, kv_len, causal=True)
    for h in range(4):
        for r in range(bc.shape[1]):
            cols = ci[h, r, :cc[h, r]].tolist()
            assert len(cols) == len(set(cols))
            starts = bo[h, r, :bc[h, r]].tolist()
            covered = {k for s in starts for k in range(s, min(s + 64, kv_len))}
            assert not covered & set(cols)
            assert all(c < (kv_len - q_len) + r * 64 for c in cols)


def test_bad_input_raises():
    v = torch.zeros((2, 3), dtype=torch.int32)
    with pytest.raises(ValueError):
        convert_vertical_slash_indexes(v, torch.tensor([4, 1]), v, torch.tensor([1, 1]), 8, 8, causal=True)
    with pytest.raises(ValueError):
        convert_vertical_slash_indexes(v, torch.tensor([1]), v, torch.tensor([1, 1]), 8, 8, causal=True)
    with pytest.raises(ValueError):
        convert_vertical_slash_indexes(v.float(), torch.tensor([1, 1]), v, torch.tensor([1, 1]), 8, 8, causal=True)
