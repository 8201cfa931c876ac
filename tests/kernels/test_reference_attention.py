"""attention_with_lse, merge_lse (O3 (docs/algorithms.md#oracle-lse-merge)) and RoPE against naive float64 formulas."""
import math

import pytest
import torch

from longserve.kernels.dca_math import apply_rope, rope_cos_sin
from longserve.kernels.reference import attention as att
from longserve.kernels.reference.attention import attention_with_lse, merge_lse


def naive(q, k, v, scale, allowed):
    """Per-head loops, explicit softmax; allowed is bool [H, n_q, n_k]."""
    n_q, H, D = q.shape
    group = H // k.shape[1]
    out = torch.zeros((n_q, H, v.shape[-1]), dtype=torch.float64)
    lse = torch.full((n_q, H), -math.inf, dtype=torch.float64)
    for h in range(H):
        z = (q[:, h] @ k[:, h // group].T) * scale
        for r in range(n_q):
            keys = allowed[h, r].nonzero().flatten()
            if keys.numel():
                zr = z[r, keys]
                lse[r, h] = torch.logsumexp(zr, 0)
                out[r, h] = torch.softmax(zr, 0) @ v[keys, h // group]
    return out, lse


@pytest.mark.parametrize("n_q,n_k,H,G", [(1, 1, 1, 1), (2, 2, 2, 1), (63, 63, 2, 2), (65, 100, 7, 1), (5, 64, 4, 2)])
def test_causal_bottom_right_matches_naive(kit, n_q, n_k, H, G):
    q, k, v = kit.make_qkv(n_q, n_k, H, G, seed=n_q + n_k)
    allowed = (torch.arange(n_k)[None, :] <= (n_k - n_q) + torch.arange(n_q)[:, None]).expand(H, n_q, n_k)
    o, lse = attention_with_lse(q, k, v, scale=0.3, causal=True)
    o_ref, lse_ref = naive(q, k, v, 0.3, allowed)
    assert kit.max_err(o, o_ref) < kit.FP64_TOL and kit.max_err(lse, lse_ref) < kit.FP64_TOL
    o32, lse32 = attention_with_lse(q.float(), k.float(), v.float(), scale=0.3, causal=True)
    assert o32.dtype == torch.float32 and lse32.dtype == torch.float32
    assert kit.max_err(o32, o_ref) < kit.FP32_TOL and kit.max_err(lse32, lse_ref) < kit.FP32_TOL


def test_mask_with_empty_rows_gives_zero_and_minus_inf(kit):
    q, k, v = kit.make_qkv(6, 9, 4, 2, seed=1)
    mask = torch.rand((4, 6, 9), generator=torch.Generator().manual_seed(0)) < 0.4
    mask[:, 2] = False                       # an empty row in every head
    mask[1, 4] = False
    o, lse = attention_with_lse(q, k, v, scale=0.25, mask=mask)
    o_ref, lse_ref = naive(q, k, v, 0.25, mask)
    assert not torch.isnan(o).any() and not torch.isnan(lse).any()
    assert torch.all(o[2] == 0) and torch.all(lse[2] == -math.inf) and lse[4, 1] == -math.inf
    assert kit.max_err(o, o_ref) < kit.FP64_TOL and kit.max_err(lse, lse_ref) < kit.FP64_TOL


def test_row_tiling_does_not_change_results(kit, monkeypatch):
    q, k, v = kit.make_qkv(100, 130, 2, 1, seed=2)
    whole = attention_with_lse(q, k, v, scale=0.2, causal=True)
    monkeypatch.setattr(att, "TILE_ELEMENTS", 7 * 2 * 130)      # 7-row tiles
    tiled = attention_with_lse(q, k, v, scale=0.2, causal=True)
    assert kit.max_err(tiled[0], whole[0]) < 1e-14 and kit.max_err(tiled[1], whole[1]) < 1e-14


def test_bad_shapes_raise(kit):
    q, k, v = kit.make_qkv(4, 4, 3, 2)
    with pytest.raises(ValueError):
        attention_with_lse(q, k, v, scale=1.0)                   # 3 heads over 2 KV heads
    q, k, v = kit.make_qkv(4, 4, 2, 2)
    with pytest.raises(ValueError):
        attention_with_lse(q, k, v, scale=1.0, mask=torch.ones((2, 4, 5), dtype=torch.bool))


def _parts(q, k, v, bounds, scale):
    return [attention_with_lse(q, k[a:b], v[a:b], scale=scale) for a, b in bounds]


def test_o3_merge_equals_full_softmax_with_empty_parts(kit):
    q, k, v = kit.make_qkv(7, 40, 4, 2, seed=3)
    full = attention_with_lse(q, k, v, scale=0.3)
    bounds = [(0, 0), (0, 13), (13, 13), (13, 31), (31, 40)]
    o, lse = merge_lse(_parts(q, k, v, bounds, 0.3))
    assert kit.max_err(o, full[0]) < 1e-13 and kit.max_err(lse, full[1]) < 1e-13
    # commutative and associative
    parts = _parts(q, k, v, bounds, 0.3)
    o2, lse2 = merge_lse(parts[::-1])
    o3, lse3 = merge_lse([merge_lse(parts[:2]), merge_lse(parts[2:])])
    for x, y in ((o2, o), (lse2, lse), (o3, o), (lse3, lse)):
        assert kit.max_err(x, y) < 1e-14


def test_merge_of_only_empty_parts_is_zero_without_nan(kit):
    q, k, v = kit.make_qkv(3, 5, 2, 2, seed=4)
    empty = attention_with_lse(q, k[:0], v[:0], scale=1.0)
    o, lse = merge_lse([empty, empty])
    assert torch.all(o == 0) and torch.all(lse == -math.inf)
    some = attention_with_lse(q, k, v, scale=1.0)
    o, lse = merge_lse([empty, some, empty])
    assert kit.max_err(o, some[0]) == 0.0 and kit.max_err(lse, some[1]) == 0.0
    with pytest.raises(ValueError):
        merge_lse([])


def test_merge_runs_in_fp32_for_half_inputs(kit):
    q, k, v = kit.make_qkv(4, 20, 2, 1, seed=5)
    parts = [(o.half(), lse.float()) for o, lse in _parts(q, k, v, [(0, 9), (9, 20)], 0.3)]
    o, lse = merge_lse(parts)
    assert o.dtype == torch.float32 and lse.dtype == torch.float32


def test_rope_is_a_rotation_and_relative():
    g = torch.Generator().manual_seed(0)
    x = torch.randn((5, 3, 16), generator=g, dtype=torch.float64)
    y = torch.randn((5, 3, 16), generator=g, dtype=torch.float64)
    pos = torch.tensor([0, 7, 1000, 262144, 1010000])
    rx = apply_rope(x, pos, 1e7)
    assert torch.allclose(rx.norm(dim=-1), x.norm(dim=-1), atol=1e-12)
    assert torch.equal(apply_rope(x[:1], pos[:1], 1e7), x[:1])            # position 0 is the identity
    # <R(a) x, R(b) y> depends only on a - b
    a, b, s = torch.tensor([5, 300000]), torch.tensor([2, 299997]), 1e4
    dots = (apply_rope(x[:2], a, s) * apply_rope(y[:2], b, s)).sum(-1)
    shifted = (apply_rope(x[:2], a - b, s) * y[:2]).sum(-1)
    assert torch.allclose(dots, shifted, atol=1e-9)


def test_rope_layout_is_neox_half_split():
    x = torch.zeros((1, 1, 4), dtype=torch.float64)
    x[0, 0, 0] = 1.0                                           # pairs (0, 2) and (1, 3)
    out = apply_rope(x, torch.tensor([1]), 10000.0)
    assert torch.allclose(out[0, 0], torch.tensor([math.cos(1.0), 0.0, math.sin(1.0), 0.0], dtype=torch.float64))


def test_rope_angles_are_float64_at_large_positions():
    cos, sin = rope_cos_sin(torch.tensor([516095]), 128, 1e7, dtype=torch.float64)
    inv = 1e7 ** (-torch.arange(0, 128, 2, dtype=torch.float64) / 128)
    assert torch.allclose(cos[0], torch.cos(516095 * inv), atol=1e-12)
    c32, _ = rope_cos_sin(torch.tensor([516095]), 128, 1e7, dtype=torch.float32)
    assert float((c32[0].double() - cos[0]).abs().max()) < 1e-6          # only the final cast rounds
    with pytest.raises(ValueError):
        rope_cos_sin(torch.tensor([1]), 15, 1e4)
