"""Paged split-KV decode and the Triton LSE merge (interpreted) vs their references (O3
(docs/algorithms.md#oracle-lse-merge), empty parts)."""
import math

import pytest
import torch

from longserve.kernels.merge import merge_lse_stacked, merge_lse_triton
from longserve.kernels.paged_attention import paged_attention_decode
from longserve.kernels.reference.attention import attention_with_lse, merge_lse
from longserve.kernels.reference.paged_attention import paged_attention_decode as ref_decode

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array:DeprecationWarning")  # interpreter noise

FLOOR = {torch.float32: 2e-5, torch.float16: 2e-3}


def _cache(lengths, G, D, page, seed):
    g = torch.Generator().manual_seed(seed)
    blocks = [max(1, math.ceil(n / page)) for n in lengths]
    total = sum(blocks) + 2
    perm = torch.randperm(total, generator=g)
    tables = torch.zeros((len(lengths), max(blocks) + 1), dtype=torch.int32)
    at = 0
    for b, nb in enumerate(blocks):
        tables[b, :nb] = perm[at:at + nb].int()
        at += nb
    k = torch.randn((total, page, G, D), generator=g, dtype=torch.float64)
    v = torch.randn((total, page, G, D), generator=g, dtype=torch.float64)
    return k, v, tables


def _err(x, truth):
    finite = torch.isfinite(truth)
    assert torch.equal(torch.isfinite(x), finite)
    return float((x.double()[finite] - truth.double()[finite]).abs().max()) if finite.any() else 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("H,G,num_splits", [(2, 2, None), (7, 1, 3), (4, 2, 1)])
def test_paged_decode_matches_reference(dtype, H, G, num_splits):
    lengths = [1, 64, 65, 203]
    k, v, tables = _cache(lengths, G, 16, 16, seed=H)
    q = torch.randn((4, H, 16), dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    end = torch.tensor(lengths)
    start = torch.tensor([0, 64, 17, 100])         # sequence 1 has an empty range
    scale = torch.tensor([0.25, 0.3, 0.2, 0.25], dtype=torch.float64)
    truth = ref_decode(q, k, v, tables, start, end, scale=scale)
    low = ref_decode(q.to(dtype), k.to(dtype), v.to(dtype), tables, start, end, scale=scale)
    out = paged_attention_decode(q.to(dtype), k.to(dtype), v.to(dtype), tables, start, end, scale=scale,
                                 num_splits=num_splits)
    for got, ref, want in zip(out, low, truth):
        assert _err(got, want) <= 2 * _err(ref, want) + FLOOR[dtype]
    assert torch.all(out[0][1] == 0) and torch.all(torch.isneginf(out[1][1]))


def test_paged_twin_matches_dense_attention():
    """The reference twin itself: a paged range equals plain attention over the gathered keys."""
    k, v, tables = _cache([100], 2, 16, 8, seed=0)
    q = torch.randn((1, 4, 16), dtype=torch.float64)
    o, lse = ref_decode(q, k, v, tables, torch.tensor([10]), torch.tensor([100]), scale=0.3)
    pos = torch.arange(10, 100)
    kk, vv = k[tables[0, pos // 8].long(), pos % 8], v[tables[0, pos // 8].long(), pos % 8]
    o2, lse2 = attention_with_lse(q, kk, vv, scale=0.3)
    assert torch.allclose(o, o2.to(o.dtype)) and torch.allclose(lse, lse2.to(lse.dtype))


def test_merge_matches_reference_and_ignores_empty_parts():
    g = torch.Generator().manual_seed(0)
    parts = []
    for p in range(3):
        o = torch.randn((37, 3, 16), generator=g)
        lse = torch.randn((37, 3), generator=g) * 3
        empty = torch.rand((37, 3), generator=g) < 0.3
        lse[empty] = float("-inf")
        if p == 0:
            o[empty] = float("nan")                  # an empty part's O must never leak into the merge
        parts.append((o, lse))
    parts[1][1][:5] = float("-inf")
    parts[2][1][:5] = float("-inf")
    parts[0][1][:5] = float("-inf")                  # rows 0..4: every part empty
    o, lse = merge_lse_triton(parts)
    o_r, lse_r = merge_lse([(torch.nan_to_num(o_p).double(), l_p.double()) for o_p, l_p in parts])
    assert not torch.isnan(o).any()
    assert torch.all(o[:5] == 0) and torch.all(torch.isneginf(lse[:5]))
    assert torch.allclose(o.double(), o_r.double(), atol=1e-6)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(lse_r))
    fin = torch.isfinite(lse_r)
    assert torch.allclose(lse.double()[fin], lse_r.double()[fin], atol=1e-6)


def test_merge_is_commutative_and_associative():
    g = torch.Generator().manual_seed(2)
    parts = [(torch.randn((9, 2, 16), generator=g), torch.randn((9, 2), generator=g)) for _ in range(3)]
    a = merge_lse_triton(parts)
    b = merge_lse_triton(parts[::-1])
    c = merge_lse_triton([merge_lse_triton(parts[:2]), parts[2]])
    for x, y in ((a, b), (a, c)):
        assert torch.allclose(x[0], y[0], atol=1e-6) and torch.allclose(x[1], y[1], atol=1e-6)


def test_merge_bad_input_raises():
    with pytest.raises(ValueError):
        merge_lse_triton([])
    with pytest.raises(ValueError):
        merge_lse_stacked(torch.zeros(2, 3, 4), torch.zeros(2, 4))
