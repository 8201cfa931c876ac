"""Sparse references: estimation (oracles O10, O11), index conversion (O9 b-d; docs/algorithms.md#oracles), sparse DCA
with the kernel's tile semantics (oracles O7, O8, O12, O13, O14 of docs/algorithms.md#oracles) against dense attention
masked to the work lists' tiles, pair counts, pattern masks."""
import pytest
import torch

from longserve.kernels import SparseHeadBudgets, dual_chunk_attention
from longserve.kernels.dca_math import apply_rope, dense_regions, rotate_keys, softmax_scale, sub_blocks
from longserve.kernels.estimation import Selection, estimate_dca_selection, fallback_indices, split_regions
from longserve.kernels.pair_stats import PairStats, selected_pair_count
from longserve.kernels.reference.attention import attend, attention_with_lse, merge_lse
from longserve.kernels.reference.dca import dual_chunk_attention_reference
from longserve.kernels.reference.estimate import estimate_vertical_slash, select
from longserve.kernels.reference.masks import (
    a_shape_mask,
    block_sparse_mask,
    covered_mask,
    subblock_selected_mask,
    vs_region_mask,
)
from longserve.kernels.reference.sparse_dca import listed_keys
from longserve.kernels.reference.sparse_index import convert_vertical_slash_indexes

CFG = dict(rope_theta=1e4, chunk_size=80, local_size=16)           # cl = 64: L = 150 has intra, succ and inter
CL = 64


def budgets(H, seed, threshold=0, last_q=16):
    g = torch.Generator().manual_seed(seed)
    return SparseHeadBudgets(tuple(int(x) for x in torch.randint(1, 40, (H,), generator=g)),
                             tuple(int(x) for x in torch.randint(1, 120, (H,), generator=g)), threshold, last_q)


def masked_truth(q, k, v, sparse, exact=False):
    """Sparse DCA as dense attention under a boolean mask over every region (the oracle): the tiles the work
    lists cover (``covered_mask``), or the exact selection ``j in V or t - j in S`` when ``exact``."""
    L, n_q = k.shape[0], q.shape[0]
    tau = softmax_scale(q.shape[-1], None, 0, L)
    kr = rotate_keys(k, torch.arange(L), rope_theta=1e4, chunk_size=80, local_size=16)
    outs, lses = [], []
    pairs = 0
    for b, e, P in sub_blocks(L, n_q, CL):
        rows = q[b - (L - n_q):e - (L - n_q)]
        sel = estimate_dca_selection(rows, kr, b=b, e=e, P=P, cl=CL, chunk_size=80, rope_theta=1e4, tau=tau,
                                     budgets=sparse)
        regions = split_regions(sel, b=b, e=e, P=P, cl=CL)
        if exact:
            whole = subblock_selected_mask(regions, b, e)
            masks = [whole[:, :, r.key_start:r.key_end] for r in regions]
        else:
            masks = [covered_mask(e - b, r.key_end - r.key_start,
                                  *convert_vertical_slash_indexes(r.vertical, r.vertical_count, r.slash,
                                                                  r.slash_count, e - b, r.key_end - r.key_start,
                                                                  causal=r.causal), causal=r.causal)
                     for r in regions]
        pairs += sum(int(m.sum()) for m in masks)
        o, lse = merge_lse([attend(qr, kr[lo:hi], v[lo:hi], scale=tau, causal=c, mask=m)
                            for (qr, lo, hi, c), m in zip(dense_regions(rows, P, e, b, CL, 80, 1e4), masks)])
        outs.append(o)
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses), pairs


@pytest.mark.parametrize("L,n_q,H,G", [(150, 150, 4, 2), (150, 77, 7, 1), (129, 1, 2, 2), (65, 65, 2, 1),
                                       (64, 64, 4, 4), (1, 1, 2, 1), (100, 37, 4, 2), (200, 101, 4, 1)])
def test_tile_sparse_dca_matches_masked_dense(kit, L, n_q, H, G):
    """The reference computes the work lists' whole tiles (the kernel's semantics), a superset of the exact
    selection, with fp64 accuracy and the pair counts of that mask."""
    q, k, v = kit.make_qkv(n_q, L, H, G, seed=L + n_q)
    sp = budgets(H, seed=L)
    stats = PairStats.with_selected()
    o, lse = dual_chunk_attention_reference(q, k, v, **CFG, sparse=sp, return_lse=True, stats=stats)
    o_ref, lse_ref, pairs = masked_truth(q, k, v, sp)
    assert kit.max_err(o, o_ref) < kit.FP64_TOL and kit.max_err(lse, lse_ref) < kit.FP64_TOL
    assert int(stats.computed) == pairs                # the builder lists no key twice
    exact_lse = masked_truth(q, k, v, sp, exact=True)[1]
    assert torch.all(lse >= exact_lse - 1e-12)                     # tiles only add keys to the exact selection
    o32, lse32 = dual_chunk_attention_reference(q.float(), k.float(), v.float(), **CFG, sparse=sp, return_lse=True)
    assert o32.dtype == torch.float32
    assert kit.max_err(o32, o_ref) < 1e-4 and kit.max_err(lse32, lse_ref) < 1e-4   # fp32 may flip a near tie
    stats = stats.resolved()
    assert 0 < stats.selected <= stats.computed <= stats.causal


@pytest.mark.parametrize("L,n_q", [(150, 150), (200, 50), (100, 100), (2, 2)])
def test_o7_full_budget_equals_dense(kit, L, n_q):
    q, k, v = kit.make_qkv(n_q, L, 4, 2, seed=3)
    full = SparseHeadBudgets.uniform(4, L, L, threshold=0)
    dense = dual_chunk_attention_reference(q, k, v, **CFG, return_lse=True)
    stats = PairStats.with_selected()
    sparse = dual_chunk_attention_reference(q, k, v, **CFG, sparse=full, return_lse=True, stats=stats)
    assert kit.max_err(sparse[0], dense[0]) < 1e-13 and kit.max_err(sparse[1], dense[1]) < 1e-13
    stats = stats.resolved()
    assert stats.selected == stats.computed == stats.causal == 4 * (n_q * (L - n_q) + n_q * (n_q + 1) // 2)


def test_pair_stats_add_up_over_calls(kit):
    """Calls add into the PairStats they are given; dense calls count every causal pair as computed."""
    q, k, v = kit.make_qkv(120, 120, 4, 2, seed=5)
    alone = PairStats.with_selected()
    dual_chunk_attention_reference(q, k, v, **CFG, sparse=budgets(4, 5), stats=alone)
    twice = PairStats.with_selected()
    for _ in range(2):
        dual_chunk_attention_reference(q, k, v, **CFG, sparse=budgets(4, 5), stats=twice)
    alone, twice = alone.resolved(), twice.resolved()
    assert (twice.selected, twice.computed, twice.causal) == (2 * alone.selected, 2 * alone.computed,
                                                              2 * alone.causal)
    assert 0 < alone.selected < alone.computed < alone.causal
    dense = PairStats()
    dual_chunk_attention_reference(q, k, v, **CFG, stats=dense)
    assert dense.computed == dense.causal == alone.causal and dense.selected is None
    total = PairStats(computed=torch.tensor(3), causal=4).add(PairStats(computed=2, causal=torch.tensor(6)))
    assert total.resolved() == PairStats(computed=5, causal=10) and total.computed_fraction == 0.5


def test_listed_keys_follow_the_kernel_order_and_keep_duplicates():
    """Block keys in list order, then columns; a column inside a listed block stays (the kernel scores it twice)."""
    bc, bo = torch.tensor([[2]]), torch.tensor([[[64, 0, 0]]])
    cc, ci = torch.tensor([[2]]), torch.tensor([[[5, 200]]])
    keys, listed = listed_keys(bc, bo, cc, ci, 2 * 64 + 3)
    expect = list(range(64, 128)) + list(range(0, 64)) + [5, 200]
    assert keys[0, 0, :130].tolist() == expect and listed[0, 0].tolist() == [True] * 130 + [False]


def test_duplicate_listed_key_counts_twice(kit):
    """Lists naming key 5 as a block key and as a column weigh it twice, like the kernel's two phases."""
    from longserve.kernels.kv_source import ContiguousKV
    from longserve.kernels.reference.sparse_dca import tile_attention
    q, k, v = kit.make_qkv(4, 70, 1, 1, seed=6)
    lists = (torch.tensor([[1]], dtype=torch.int32), torch.tensor([[[0]]], dtype=torch.int32),
             torch.tensor([[1]], dtype=torch.int32), torch.tensor([[[5]]], dtype=torch.int32))
    stats = PairStats()
    o, lse = tile_attention(q, ContiguousKV(k, v), 0, 70, lists, scale=0.3, causal=False, stats=stats)
    keys = torch.cat([k[:64], k[5:6]])
    vals = torch.cat([v[:64], v[5:6]])
    o_ref, lse_ref = attention_with_lse(q, keys, vals, scale=0.3)
    assert kit.max_err(o, o_ref) < kit.FP64_TOL and kit.max_err(lse, lse_ref) < kit.FP64_TOL
    assert int(stats.computed) == 4 * 65


def test_selected_pair_count_matches_the_exact_mask():
    g = torch.Generator().manual_seed(21)
    from longserve.kernels.estimation import RegionIndices
    for causal in (True, False):
        for q_len, kv in ((1, 1), (63, 70), (130, 130), (64, 200)):
            vert, vc, sl, sc = _random_selection(g, 3, kv, q_len, causal)
            region = RegionIndices("r", 0, kv, causal, vert, vc, sl, sc, 0)
            exact = vs_region_mask(q_len, kv, vert, vc, sl, sc, causal=causal)
            assert int(selected_pair_count(region, q_len, rows_per_tile=50)) == int(exact.sum())


def test_o8_recall_bound(kit):
    q, k, v = kit.make_qkv(150, 150, 4, 2, seed=11)
    dense = dual_chunk_attention_reference(q, k, v, **CFG, return_lse=True)
    o, lse = dual_chunk_attention_reference(q, k, v, **CFG, sparse=budgets(4, 5), return_lse=True)
    recall = torch.exp(lse - dense[1])
    assert torch.all(recall > 0) and torch.all(recall <= 1 + 1e-12)
    assert float(recall.min()) < 0.99                              # the budgets really are partial
    vmax = v.norm(dim=-1).max(dim=0).values.repeat_interleave(2)   # per query head, its KV head's max |v|
    err = (o - dense[0]).norm(dim=-1)
    assert torch.all(err <= 2 * (1 - recall) * vmax[None, :] + 1e-12)


def test_o12_threshold_switch(kit):
    q, k, v = kit.make_qkv(100, 100, 2, 1, seed=12)
    dense = dual_chunk_attention_reference(q, k, v, **CFG, prompt_len=100)
    sp = SparseHeadBudgets((3, 4), (5, 6), threshold=100, last_q=8)
    at = dual_chunk_attention_reference(q, k, v, **CFG, prompt_len=100, sparse=sp)
    assert torch.equal(at, dense)                                  # prompt length == threshold: dense
    above = dual_chunk_attention_reference(q, k, v, **CFG, prompt_len=101, sparse=sp)
    forced = dual_chunk_attention_reference(q, k, v, **CFG, prompt_len=101,
                                            sparse=SparseHeadBudgets((3, 4), (5, 6), threshold=0, last_q=8))
    assert torch.equal(above, forced) and not torch.allclose(above, dense)
    with pytest.raises(ValueError):
        dual_chunk_attention_reference(q, k, v, **CFG, sparse=SparseHeadBudgets.uniform(3, 5, 5, threshold=0))


def test_o13_monotone_budgets(kit):
    q, k, v = kit.make_qkv(150, 150, 2, 1, seed=13)
    dense_lse = dual_chunk_attention_reference(q, k, v, **CFG, return_lse=True)[1]
    prev = None
    for vert, slash in ((1, 1), (1, 40), (10, 40), (10, 110), (60, 110), (150, 150)):
        lse = dual_chunk_attention_reference(q, k, v, **CFG, return_lse=True,
                                             sparse=SparseHeadBudgets.uniform(2, vert, slash, threshold=0))[1]
        recall = torch.exp(lse - dense_lse)
        if prev is not None:
            assert torch.all(recall >= prev - 1e-12)
        prev = recall
    assert torch.allclose(prev, torch.ones_like(prev), atol=1e-12)


def test_o14_tensor_parallel_slices_equal_unsharded(kit):
    H, G, tp = 8, 2, 2
    q, k, v = kit.make_qkv(150, 150, H, G, seed=14)
    sp = budgets(H, seed=14)
    whole = dual_chunk_attention_reference(q, k, v, **CFG, sparse=sp, return_lse=True)
    per = H // tp
    parts = [dual_chunk_attention_reference(q[:, r * per:(r + 1) * per], k[:, r:r + 1], v[:, r:r + 1], **CFG,
                                            sparse=sp.for_rank(r, tp), return_lse=True) for r in range(tp)]
    assert sp.for_rank(1, tp).vertical == sp.vertical[4:]
    assert kit.max_err(torch.cat([p[0] for p in parts], 1), whole[0]) < 1e-12
    assert kit.max_err(torch.cat([p[1] for p in parts], 1), whole[1]) < 1e-12


def test_sparse_runs_through_public_api_and_is_deterministic(kit):
    q, k, v = kit.make_qkv(150, 150, 4, 2, seed=15)
    sp = budgets(4, 15)
    a = dual_chunk_attention(q.float(), k.float(), v.float(), **CFG, sparse=sp, return_lse=True)
    b = dual_chunk_attention(q.float(), k.float(), v.float(), **CFG, sparse=sp, return_lse=True)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def _sel_one_diagonal(c, vertical=(0,)):
    return Selection(torch.tensor([list(vertical)]), torch.tensor([len(vertical)]), torch.tensor([[c]]),
                     torch.tensor([1]))


def test_o10_region_mapping_of_slashes():
    g = torch.Generator().manual_seed(10)
    checked = 0
    for _ in range(150):
        cl = int(torch.randint(3, 40, (1,), generator=g))
        P = cl * int(torch.randint(0, 4, (1,), generator=g))
        e = P + int(torch.randint(1, cl + 1, (1,), generator=g))
        b = int(torch.randint(P, e, (1,), generator=g))
        n_q = e - b
        c = int(torch.randint(0, e, (1,), generator=g))
        for reg in split_regions(_sel_one_diagonal(c), b=b, e=e, P=P, cl=cl):
            mask = vs_region_mask(n_q, reg.key_end - reg.key_start, reg.vertical[:, :0], torch.tensor([0]),
                                  reg.slash, reg.slash_count, causal=reg.causal)[0]
            for r in range(n_q):
                key = c - (n_q - 1 - r)                        # where diagonal c crosses row r
                local = key - reg.key_start
                in_region = 0 <= local < reg.key_end - reg.key_start
                expect_causal = not reg.causal or key <= b + r
                hit = bool(mask[r, local]) if in_region else False
                anchor = {"intra": e - 1, "succ": P + n_q - 1, "inter": P - cl + n_q - 1}[reg.name]
                kept = bool((reg.slash[0, :reg.slash_count[0]] == anchor - c).any())
                if in_region and expect_causal and kept:
                    assert hit, (cl, P, b, e, c, reg.name, r)
                    checked += 1
                # every selected pair of the region lies on the global diagonal t - j = (e - 1) - c
                sel_keys = mask[r].nonzero().flatten() + reg.key_start
                fb = reg.slash[0, :reg.slash_count[0]]
                on_diag = (b + r) - sel_keys == (e - 1 - c)
                from_fallback = torch.isin((b + r) - sel_keys - reg.delta_shift, fb)
                assert torch.all(on_diag | from_fallback)
    assert checked > 100


def test_o11_forced_entries_quirk_caps_and_truncation(kit):
    L, H = 300, 3
    q, k, _ = kit.make_qkv(L, L, H, 1, seed=16)
    kr = apply_rope(k, torch.arange(L), 1e4)
    qr = q
    sp = SparseHeadBudgets((30, 10, 1000), (50, 200, 1000), threshold=0)
    sel = estimate_dca_selection(qr, kr, b=0, e=L, P=0, cl=None, chunk_size=None, rope_theta=1e4, tau=0.25,
                                 budgets=sp)
    assert sel.vertical_count.tolist() == [130, 10, 300]                 # 30 -> 130; capped at kv length
    assert sel.diagonal_count.tolist() == [50, 200, 300]
    for h in (0, 2):
        assert set(range(30)) <= set(sel.vertical[h, :sel.vertical_count[h]].tolist())
    assert set(sel.vertical[1, :10].tolist()) <= set(range(30))          # budget < 30: only (tied) sinks
    offsets = [set(((L - 1) - sel.diagonal[h, :sel.diagonal_count[h]]).tolist()) for h in range(H)]
    assert offsets[0] == set(range(50))                                  # < 100 forced: the nearest 50 win
    assert set(range(100)) <= offsets[1] and set(range(100)) <= offsets[2]
    # one top-k with the largest budget truncated per head == per-head top-k
    from longserve.kernels.reference.estimate import causal_tail_logits, vs_scores
    vs, ds = vs_scores(causal_tail_logits(apply_rope(q[-64:], torch.arange(L - 64, L), 1e4), kr, 0.25))
    for h in range(H):
        alone = select(vs[h:h + 1], ds[h:h + 1], [sp.effective_vertical()[h]], [sp.slash[h]])
        assert torch.equal(alone.vertical[0, :alone.vertical_count[0]], sel.vertical[h, :sel.vertical_count[h]])
        assert torch.equal(alone.diagonal[0, :alone.diagonal_count[0]], sel.diagonal[h, :sel.diagonal_count[h]])


def test_standalone_estimation_finds_a_planted_column(kit):
    q, k, _ = kit.make_qkv(256, 256, 2, 1, seed=17)
    k = k * 0.1
    k[170] = 4.0 * q[-64:].mean(dim=(0, 1))                              # every late query likes key 170
    sel = estimate_vertical_slash(q[-64:], k, scale=0.25, vertical_size=31, slash_size=10)
    assert sel.vertical_count.tolist() == [31, 31] and sel.diagonal_count.tolist() == [50, 50]
    for h in range(2):
        assert sel.vertical[h, 30] == 170 or 170 in sel.vertical[h, :31].tolist()


def test_fallbacks_fill_empty_regions():
    assert fallback_indices(48, "cpu").tolist() == [0, 9, 19, 28, 38]
    assert fallback_indices(3, "cpu").tolist() == [0, 1, 2]
    assert fallback_indices(10, "cpu").tolist() == [0, 2, 4, 6, 8]
    # all verticals and diagonals in intra: succ and inter get ~5 evenly spaced local indices
    regs = split_regions(_sel_one_diagonal(90, vertical=(85, 86)), b=80, e=91, P=80, cl=40)
    names = [r.name for r in regs]
    assert names == ["intra", "succ", "inter"]
    for r in regs[1:]:
        assert r.vertical[0, :r.vertical_count[0]].tolist() == [0, 8, 16, 24, 32]
    assert regs[1].slash[0, :regs[1].slash_count[0]].tolist() == [0]       # c = 90 < P + n_q: kept by succ
    assert sorted(regs[2].slash[0, :regs[2].slash_count[0]].tolist()) == [0, 8, 16, 24, 32]
    assert regs[0].vertical[0, :2].tolist() == [5, 6] and regs[0].slash[0, 0] == 0


def _random_selection(g, H, kv, q_len, causal, nv=12, ns=10):
    limit = kv if causal else kv + q_len
    vert = torch.stack([torch.randperm(kv, generator=g)[:min(nv, kv)].sort().values for _ in range(H)])
    sl = torch.stack([torch.randperm(limit, generator=g)[:min(ns, limit)].sort(descending=True).values
                      for _ in range(H)])
    vc = torch.randint(0, vert.shape[1] + 1, (H,), generator=g)
    sc = torch.randint(1 if causal else 0, sl.shape[1] + 1, (H,), generator=g)
    if causal:                                  # the forced local diagonal the causal mode relies on
        sl[:, -1] = 0
        sc[:] = sl.shape[1]
    return vert, vc, sl, sc


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("q_len,kv", [(1, 1), (63, 63), (65, 65), (100, 203), (130, 64), (64, 200)])
def test_o9_conversion_invariants(causal, q_len, kv):
    if causal and kv < q_len:
        kv = q_len
    g = torch.Generator().manual_seed(q_len * 7 + kv + causal)
    vert, vc, sl, sc = _random_selection(g, 3, kv, q_len, causal)
    bc, bo, cc, ci = convert_vertical_slash_indexes(vert, vc, sl, sc, q_len, kv, causal=causal)
    off = kv - q_len if causal else kv
    for h in range(3):
        for r in range(bc.shape[1]):
            cols = ci[h, r, :cc[h, r]].tolist()
            starts = bo[h, r, :bc[h, r]].tolist()
            assert len(cols) == len(set(cols))                                      # (b) no column twice
            assert not any(s <= c < s + 64 for c in cols for s in starts)           # (b) nor inside a block
            if causal:
                assert all(c < off + r * 64 for c in cols)                          # (c) before the first row
    covered = covered_mask(q_len, kv, bc, bo, cc, ci, causal=causal)
    exact = vs_region_mask(q_len, kv, vert, vc, sl, sc, causal=causal)
    assert not torch.any(exact & ~covered)                                          # (d) exact ⊆ covered
    if causal:
        assert not torch.any(covered & ~(torch.arange(kv)[None, :] <= off + torch.arange(q_len)[:, None]))


def test_conversion_golden_example():
    vert, vc = torch.tensor([[0, 5, 100]]), torch.tensor([3])
    sl, sc = torch.tensor([[0]]), torch.tensor([1])
    bc, bo, cc, ci = convert_vertical_slash_indexes(vert, vc, sl, sc, 128, 128, causal=True)
    assert bc.tolist() == [[1, 1]] and bo[0, :, 0].tolist() == [0, 64]
    assert cc.tolist() == [[0, 2]] and ci[0, 1, :2].tolist() == [0, 5]
    with pytest.raises(ValueError):
        convert_vertical_slash_indexes(vert, torch.tensor([4]), sl, sc, 128, 128, causal=True)


def test_a_shape_and_block_sparse_masks(kit):
    m = a_shape_mask(6, 10, n_init=2, n_local=3)[0]
    t = torch.arange(4, 10)[:, None]
    j = torch.arange(10)[None, :]
    assert torch.equal(m, (j <= t) & ((j < 2) | (t - j < 3)))
    q, k, v = kit.make_qkv(200, 200, 4, 2, seed=18)
    every = block_sparse_mask(q, k, top_k=10)
    causal = torch.arange(200)[None, :] <= torch.arange(200)[:, None]
    assert torch.equal(every, causal.expand(4, 200, 200))
    one = block_sparse_mask(q, k, top_k=1)
    kept_blocks = one.view(4, 200, 200)[:, ::64].reshape(4, 4, 200).any(dim=1)
    assert torch.all(one.sum(dim=2) <= 64) and torch.all(kept_blocks.sum(-1) >= 1)
    o, lse = attention_with_lse(q, k, v, scale=0.25, mask=one)
    assert torch.all(torch.isfinite(lse))                          # every row keeps at least its own key tile
    with pytest.raises(ValueError):
        a_shape_mask(2, 2, n_init=-1, n_local=1)
