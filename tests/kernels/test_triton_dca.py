"""DCA on the Triton kernels (interpreted) vs the reference: prefill and paged decode, 2x rule
(docs/testing.md#tolerance-rule)."""
import math

import pytest
import torch

from longserve.kernels import dispatch
from longserve.kernels.dca import dual_chunk_attention_triton
from longserve.kernels.dca_decode import paged_dca_decode_triton
from longserve.kernels.reference.dca import dual_chunk_attention_reference, paged_dca_decode_reference

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array:DeprecationWarning")  # interpreter noise

FLOOR = {torch.float32: 2e-5, torch.float16: 2e-3}
TOY = dict(rope_theta=1e4, chunk_size=48, local_size=16)          # chunk length cl = 32
SPARSE_TOY = dict(rope_theta=1e4, chunk_size=80, local_size=16)   # cl = 64: fewer sub-blocks in the interpreter


def _qkv(n_q, L, H, G, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn((n_q, H, D), generator=g, dtype=torch.float64),
            torch.randn((L, G, D), generator=g, dtype=torch.float64),
            torch.randn((L, G, D), generator=g, dtype=torch.float64))


def _err(x, truth):
    finite = torch.isfinite(truth)
    assert torch.equal(torch.isfinite(x), finite)
    return float((x.double()[finite] - truth.double()[finite]).abs().max()) if finite.any() else 0.0


def _two_x(kernel, low, truth, dtype):
    for got, ref, want in zip(kernel, low, truth):
        assert _err(got, want) <= 2 * _err(ref, want) + FLOOR[dtype]


F32, F16 = torch.float32, torch.float16


@pytest.mark.parametrize("dtype,L,n_q,H,G", [
    (F32, 1, 1, 2, 2), (F32, 2, 2, 2, 1), (F32, 32, 32, 7, 1), (F16, 33, 33, 4, 2), (F16, 63, 63, 2, 2),
    (F32, 65, 65, 7, 1), (F16, 100, 100, 4, 2), (F32, 100, 100, 4, 2), (F16, 100, 37, 7, 1), (F32, 64, 1, 2, 2)])
def test_prefill_matches_reference(dtype, L, n_q, H, G):
    q, k, v = _qkv(n_q, L, H, G, seed=L + n_q)
    kw = dict(TOY, original_max_position_embeddings=64, return_lse=True)
    truth = dual_chunk_attention_reference(q, k, v, **kw)
    low = dual_chunk_attention_reference(q.to(dtype), k.to(dtype), v.to(dtype), **kw)
    out = dual_chunk_attention_triton(q.to(dtype), k.to(dtype), v.to(dtype), **kw)
    assert out[0].dtype == dtype and out[1].dtype == torch.float32
    _two_x(out, low, truth, dtype)


@pytest.mark.parametrize("kwargs", [dict(rope_theta=1e4, chunk_size=None, local_size=None),
                                    dict(TOY, keys_rotated=True, prompt_len=130, scale=0.3)])
def test_prefill_variants_match_reference(kwargs):
    """No-DCA (plain RoPE) and pre-rotated keys with an explicit prompt length and scale."""
    q, k, v = (t.float() for t in _qkv(70, 99, 4, 2, seed=9))
    kw = dict(kwargs, original_max_position_embeddings=64, return_lse=True)
    truth = dual_chunk_attention_reference(q.double(), k.double(), v.double(), **kw)
    low = dual_chunk_attention_reference(q, k, v, **kw)
    _two_x(dual_chunk_attention_triton(q, k, v, **kw), low, truth, torch.float32)


def _paged(L_list, G, D, page=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    blocks = [math.ceil(n / page) for n in L_list]
    perm = torch.randperm(sum(blocks), generator=g)
    tables = torch.zeros((len(L_list), max(blocks)), dtype=torch.int32)
    at = 0
    for b, nb in enumerate(blocks):
        tables[b, :nb] = perm[at:at + nb].int()
        at += nb
    shape = (sum(blocks), page, G, D)
    return torch.randn(shape, generator=g, dtype=torch.float64), torch.randn(shape, generator=g,
                                                                              dtype=torch.float64), tables


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("H,G", [(2, 2), (7, 1)])
def test_paged_decode_matches_reference(dtype, H, G):
    lens = [1, 2, 32, 33, 64, 65, 100]
    kc, vc, tables = _paged(lens, G, 16, seed=H)
    q = torch.randn((len(lens), H, 16), dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    seq = torch.tensor(lens, dtype=torch.int32)
    kw = dict(TOY, original_max_position_embeddings=48, return_lse=True)
    truth = paged_dca_decode_reference(q, kc, vc, tables, seq, **kw)
    low = paged_dca_decode_reference(q.to(dtype), kc.to(dtype), vc.to(dtype), tables, seq, **kw)
    out = paged_dca_decode_triton(q.to(dtype), kc.to(dtype), vc.to(dtype), tables, seq, **kw)
    _two_x(out, low, truth, dtype)


def test_decode_equals_last_prefill_row():
    """O5 (docs/algorithms.md#oracle-decode-equals-prefill) on the Triton path: a decode step over the cache equals the
    last row of the prefill."""
    L, H, G, D, page = 77, 4, 2, 16, 8
    q, k, v = (t.float() for t in _qkv(L, L, H, G, D, seed=4))
    from longserve.kernels.dca_math import apply_rope
    k_rot = apply_rope(k, torch.arange(L) % 32, 1e4)
    out = dual_chunk_attention_triton(q, k_rot, v, keys_rotated=True, **TOY)
    blocks = math.ceil(L / page)
    kc = torch.zeros((blocks * page, G, D)).index_copy_(0, torch.arange(L), k_rot).view(blocks, page, G, D)
    vc = torch.zeros((blocks * page, G, D)).index_copy_(0, torch.arange(L), v).view(blocks, page, G, D)
    tables = torch.arange(blocks, dtype=torch.int32)[None]
    dec = paged_dca_decode_triton(q[-1:], kc, vc, tables, torch.tensor([L], dtype=torch.int32), **TOY)
    assert torch.allclose(dec[0], out[-1], atol=2e-6)


def test_rerun_is_bitwise_identical_and_dispatch_picks_triton(monkeypatch):
    q, k, v = (t.half() for t in _qkv(70, 70, 4, 2, seed=1))
    a = dual_chunk_attention_triton(q, k, v, return_lse=True, **TOY)
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    b = dispatch.dual_chunk_attention(q, k, v, return_lse=True, **TOY)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    monkeypatch.setenv(dispatch.ENV_VAR, "reference")
    assert dispatch.backend_for(q) == "reference"
    monkeypatch.setenv(dispatch.ENV_VAR, "auto")
    assert dispatch.backend_for(q) == "reference"            # CPU tensors
    monkeypatch.setenv(dispatch.ENV_VAR, "fast")
    with pytest.raises(ValueError):
        dispatch.backend_for(q)


def test_bad_config_raises():
    q, k, v = (t.float() for t in _qkv(4, 4, 2, 2, seed=0))
    with pytest.raises(ValueError):
        dual_chunk_attention_triton(q, k, v, rope_theta=1e4, chunk_size=16, local_size=16)
    with pytest.raises(ValueError):
        dual_chunk_attention_triton(q, k[:2], v[:2], **TOY)


def _twin_sparse_dca(q, k, v, q_sel, k_sel, budgets, tau):
    """Reference composition of sparse DCA with the same work lists the Triton path builds from (q_sel, k_sel):
    covered-mask attention per region (reference twin) and the reference LSE merge."""
    from longserve.kernels.dca_math import apply_rope, dense_regions, sub_blocks
    from longserve.kernels.estimation import estimate_dca_selection, split_regions
    from longserve.kernels.reference import vertical_slash as ref_vs
    from longserve.kernels.reference.attention import merge_lse
    from longserve.kernels.reference.sparse_index import convert_vertical_slash_indexes

    cs, cl, theta = SPARSE_TOY["chunk_size"], SPARSE_TOY["chunk_size"] - SPARSE_TOY["local_size"], 1e4
    L, n_q = k.shape[0], q.shape[0]
    k_rot = apply_rope(k, torch.arange(L) % cl, theta)
    k_sel_rot = apply_rope(k_sel, torch.arange(L) % cl, theta)
    outs, lses = [], []
    for b, e, P in sub_blocks(L, n_q, cl):
        rows = slice(b - (L - n_q), e - (L - n_q))
        sel = estimate_dca_selection(q_sel[rows], k_sel_rot, b=b, e=e, P=P, cl=cl, chunk_size=cs, rope_theta=theta,
                                     tau=tau, budgets=budgets)
        lists = [convert_vertical_slash_indexes(r.vertical, r.vertical_count, r.slash, r.slash_count, e - b,
                                                r.key_end - r.key_start, causal=r.causal)
                 for r in split_regions(sel, b=b, e=e, P=P, cl=cl)]
        parts = [ref_vs.vertical_slash_attention(qr, k_rot[lo:hi], v[lo:hi], *lst, scale=tau, causal=causal)
                 for (qr, lo, hi, causal), lst in zip(dense_regions(q[rows], P, e, b, cl, cs, theta), lists)]
        o, lse = parts[0] if len(parts) == 1 else merge_lse(parts)
        outs.append(o.to(q.dtype))
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses)


@pytest.mark.parametrize("dtype,n_q", [(F32, 150), (F16, 70)])
def test_sparse_prefill_matches_reference_twin(dtype, n_q):
    from longserve.kernels.sparse_config import SparseHeadBudgets

    L, H, G = 150, 4, 2
    budgets = SparseHeadBudgets((5, 12, 30, 3), (8, 20, 40, 110), threshold=64, last_q=16)
    q, k, v = _qkv(n_q, L, H, G, seed=11)
    low_in = [t.to(dtype) for t in (q, k, v)]
    tau = 1 / math.sqrt(16)
    truth = _twin_sparse_dca(q, k, v, low_in[0], low_in[1], budgets, tau)
    low = _twin_sparse_dca(*low_in, low_in[0], low_in[1], budgets, tau)
    out = dual_chunk_attention_triton(*low_in, sparse=budgets, return_lse=True, **SPARSE_TOY)
    _two_x(out, low, truth, dtype)
    dense = dual_chunk_attention_reference(*(t.double() for t in low_in), return_lse=True, **SPARSE_TOY)
    # a subset of the keys: recall <= 1 (O8 (docs/algorithms.md#oracle-recall-bound))
    assert torch.all(out[1].double() <= dense[1] + 1e-3)
    if dtype == F32:                                              # same inputs => same selection as the kernel's
        exact = dual_chunk_attention_reference(*low_in, sparse=budgets, return_lse=True, **SPARSE_TOY)
        # covered pairs include the exact mask (O7 (docs/algorithms.md#oracle-full-budget))
        assert torch.all(out[1] >= exact[1] - 1e-4)


def test_sparse_full_budget_equals_dense_and_threshold_is_strict():
    """O7 (docs/algorithms.md#oracle-full-budget) through the whole sparse DCA path; O12
    (docs/algorithms.md#oracle-threshold-switch): prompt length == threshold stays dense."""
    from longserve.kernels.sparse_config import SparseHeadBudgets

    L, H, G = 140, 2, 1
    q, k, v = (t.float() for t in _qkv(L, L, H, G, seed=12))
    dense = dual_chunk_attention_reference(q.double(), k.double(), v.double(), return_lse=True, **SPARSE_TOY)
    full = SparseHeadBudgets.uniform(H, L, L, threshold=L - 1)
    out = dual_chunk_attention_triton(q, k, v, sparse=full, return_lse=True, **SPARSE_TOY)
    assert _err(out[0], dense[0]) < 2e-5 and _err(out[1], dense[1]) < 2e-5
    tiny = SparseHeadBudgets.uniform(H, 1, 1, threshold=L)
    at_threshold = dual_chunk_attention_triton(q, k, v, sparse=tiny, return_lse=True, **SPARSE_TOY)
    plain = dual_chunk_attention_triton(q, k, v, return_lse=True, **SPARSE_TOY)
    assert torch.equal(at_threshold[0], plain[0]) and torch.equal(at_threshold[1], plain[1])
    with pytest.raises(ValueError):
        dual_chunk_attention_triton(q, k, v, sparse=SparseHeadBudgets.uniform(3, 1, 1, threshold=1), **TOY)
