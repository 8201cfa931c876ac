"""Inputs and error helpers shared by the GPU check sections (correctness and timing).

- ``qwen_like_pattern``: a vertical-slash selection with Qwen-like budgets (vertical 1000, slash 6096) shaped like
  real heads: forced sinks (keys 0..29) and local diagonals (offsets 0..99), half of the remaining slashes in a
  dense local window, the rest in short runs of adjacent diagonals spread over the whole context, verticals
  uniformly at random. ``random_pattern`` draws slashes uniformly (the worst case: bands rarely merge).
- ``sample_rows``: first, random and last query rows, so fp64 truths at 128K tokens stay small.
- ``two_x_rule``: kernel error vs fp64 truth must be <= 2x the reference's own error in the same precision
  plus a floor (docs/testing.md#tolerance-rule).
"""
from __future__ import annotations

import math

import torch

FLOORS = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _distinct_sorted(values: torch.Tensor, forced: torch.Tensor, budget: int, limit: int, gen) -> torch.Tensor:
    """Forced entries first, then the candidates (then random fill), deduplicated in first-appearance order,
    capped at ``budget``."""
    cand = torch.cat([forced, values, torch.randperm(limit, generator=gen)[:budget]])   # the tail fills short budgets
    cand = cand[(cand >= 0) & (cand < limit)]
    uniq, inverse = torch.unique(cand, return_inverse=True)
    first = torch.full((uniq.numel(),), cand.numel(), dtype=torch.long)
    first.scatter_reduce_(0, inverse, torch.arange(cand.numel()), reduce="amin")
    return uniq[first.argsort()][:budget]


def qwen_like_pattern(n: int, num_heads: int, *, vertical: int = 1000, slash: int = 6096, device="cpu",
                      seed: int = 0, local_window: int = 8192, run_length: int = 32):
    """(vertical [H, NV], vertical_count [H], slash [H, NS], slash_count [H]) for a causal n x n region."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    nv, ns = min(vertical, n), min(slash, n)
    verts, slashes = [], []
    for _ in range(num_heads):
        v = torch.randint(0, n, (2 * nv + 64,), generator=g)
        verts.append(_distinct_sorted(v, torch.arange(min(30, n)), nv, n, g).sort().values)
        n_local = (ns - min(100, ns)) // 2
        local = torch.randint(0, max(1, min(local_window, n)), (2 * n_local + 1,), generator=g)
        n_runs = max(1, (ns - n_local) // run_length + 1)
        starts = torch.randint(0, max(1, n - run_length), (n_runs,), generator=g)
        runs = (starts[:, None] + torch.arange(run_length)[None, :]).reshape(-1)
        cand = torch.cat([local[:n_local], runs, torch.randint(0, n, (ns,), generator=g)])
        slashes.append(_distinct_sorted(cand, torch.arange(min(100, n)), ns, n, g).sort(descending=True).values)
    return _pack(verts, slashes, device)


def random_pattern(n: int, num_heads: int, *, vertical: int, slash: int, device="cpu", seed: int = 0,
                   slash_limit: int | None = None):
    """Uniformly random verticals in [0, n) and slash offsets in [0, slash_limit or n), sinks/diagonals forced."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    limit = n if slash_limit is None else slash_limit
    nv, ns = min(vertical, n), min(slash, limit)
    verts = [_distinct_sorted(torch.randint(0, n, (2 * nv + 8,), generator=g), torch.arange(min(30, n)), nv, n, g)
             .sort().values for _ in range(num_heads)]
    slashes = [_distinct_sorted(torch.randint(0, limit, (2 * ns + 8,), generator=g),
                                torch.arange(min(100, limit)), ns, limit, g).sort(descending=True).values
               for _ in range(num_heads)]
    return _pack(verts, slashes, device)


def _pack(verts, slashes, device):
    H = len(verts)
    nv = max(1, max(v.numel() for v in verts))
    ns = max(1, max(s.numel() for s in slashes))
    vertical = torch.zeros((H, nv), dtype=torch.int32)
    slash = torch.zeros((H, ns), dtype=torch.int32)
    for h in range(H):
        vertical[h, :verts[h].numel()] = verts[h].to(torch.int32)
        slash[h, :slashes[h].numel()] = slashes[h].to(torch.int32)
    vcount = torch.tensor([v.numel() for v in verts], dtype=torch.int32)
    scount = torch.tensor([s.numel() for s in slashes], dtype=torch.int32)
    return vertical.to(device), vcount.to(device), slash.to(device), scount.to(device)


def sample_rows(n: int, k: int = 16, seed: int = 0, device="cpu") -> torch.Tensor:
    """Up to 3k distinct query rows: the first k, k random ones, the last k (sorted)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    rows = torch.cat([torch.arange(min(k, n)), torch.randint(0, max(n, 1), (k,), generator=g),
                      torch.arange(max(0, n - k), n)])
    return torch.unique(rows[rows < n]).to(device)


def listed_pairs(block_count: torch.Tensor, column_count: torch.Tensor, block_m: int = 64,
                 block_n: int = 64) -> int:
    """Upper bound on computed (row, key) pairs: every listed block tile and column for all rows of a block."""
    return int(block_count.to(torch.int64).sum()) * block_m * block_n + \
        int(column_count.to(torch.int64).sum()) * block_m


def causal_pairs(q_len: int, kv_len: int) -> int:
    """Number of bottom-right causal pairs of a q_len x kv_len region."""
    off = kv_len - q_len
    lo = max(0, -off)
    return sum_range(off + lo + 1, off + q_len) if q_len > lo else 0


def sum_range(a: int, b: int) -> int:
    """a + (a+1) + ... + b."""
    return (a + b) * (b - a + 1) // 2


def max_err(x: torch.Tensor, truth: torch.Tensor) -> float:
    """Max |x - truth| over entries where the truth is finite; inf pattern mismatches count as inf."""
    x64, t64 = x.to(torch.float64), truth.to(torch.float64)
    finite = torch.isfinite(t64)
    if bool((torch.isfinite(x64) != finite).any()):
        return math.inf
    if not bool(finite.any()):
        return 0.0
    return float((x64[finite] - t64[finite]).abs().max())


def two_x_rule(kernel_out, ref_out, truth, dtype) -> dict:
    """{'kernel_err', 'ref_err', 'bound', 'ok'} for one output tensor."""
    k_err, r_err = max_err(kernel_out, truth), max_err(ref_out, truth)
    bound = 2.0 * r_err + FLOORS[dtype]
    return {"kernel_err": k_err, "ref_err": r_err, "bound": bound, "ok": bool(k_err <= bound)}
