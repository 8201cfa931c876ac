"""Vertical-slash index estimation in bounded memory, and the split of its selection into per-region kernel indices.

Both sparse paths (the Triton composition and the exact-mask reference) use this module. For a DCA sub-block
``[b, e)`` it scores the keys ``[0, e)`` against the last ``n = min(last_q, e - b)`` query rows, rotated per key
region (inter ``[0, P - cl)``, succ ``[P - cl, P)``, intra ``[P, e)``) with the continuous selection positions so
that diagonals stay diagonals across chunk boundaries.

Memory: keys are read a bounded block at a time from a KV source, a block never straddles a region edge, and the
softmax runs in two passes over the blocks: pass 1 keeps the online row maximum and sum of exponentials, pass 2
turns each block into probabilities and adds its column sums (vertical scores) and its sums along diagonals
(slash scores, a diagonal named by the key it meets on the last row). Transient memory is
O(H * n * block + H * context): a few ``[H, n, block]`` buffers plus the two ``[H, e]`` score vectors.

Selection avoids sorting over the context: a ``topk`` gives each head's k-th score, everything above it is taken
and ties at it are broken by key order (the smaller key for verticals, the larger key - the nearer diagonal - for
slashes), so the set is exact and deterministic. Nothing here reads a value back to the host: widths come from the
host-side budgets, padding uses sentinels and the fallbacks are ``torch.where`` on padded tensors, so the code
runs on meta tensors and never stalls a GPU stream.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from longserve.kernels.dca_math import apply_rope, region_bounds, selection_positions, work_dtype
from longserve.kernels.kv_source import ContiguousKV

FORCED_SINKS = 30            # keys 0..29 are always verticals
FORCED_DIAGONALS = 100       # the 100 diagonals nearest the last row are always slashes
INT32_MAX = 2**31 - 1        # vertical padding (sorts last in ascending order)
INT32_MIN = -(2**31)         # slash padding (sorts last in descending order)
PAD = -1                     # Selection padding past a head's count (never a key)
ESTIMATE_BLOCK_BYTES = 128 << 20   # one [H, n, block] logits block; pass 2 holds about two of them


@dataclass(frozen=True)
class Selection:
    """Per-head global selections of one sub-block: key columns ``vertical`` and diagonal ids ``diagonal`` (the
    key each diagonal meets on the sub-block's last row), in score order, valid up to the counts (padded after)."""
    vertical: torch.Tensor        # [H, KV] int64
    vertical_count: torch.Tensor  # [H] int64
    diagonal: torch.Tensor        # [H, KS] int64
    diagonal_count: torch.Tensor  # [H] int64


@dataclass(frozen=True)
class RegionIndices:
    """Kernel-convention indices of one DCA region: local verticals (ascending, INT32_MAX padded) and local slash
    values (descending, INT32_MIN padded); ``delta_shift`` turns a slash value into the global offset t - j."""
    name: str
    key_start: int
    key_end: int
    causal: bool
    vertical: torch.Tensor        # [H, NV] int64
    vertical_count: torch.Tensor  # [H]
    slash: torch.Tensor           # [H, NS] int64
    slash_count: torch.Tensor     # [H]
    delta_shift: int


def key_block_size(heads: int, rows: int, dtype: torch.dtype, budget_bytes: int = ESTIMATE_BLOCK_BYTES) -> int:
    """Keys per block so that one ``[heads, rows, block]`` logits buffer in ``dtype`` fits ``budget_bytes``
    (a multiple of 64 when that is possible, at least 1)."""
    per_key = heads * rows * torch.empty((), dtype=dtype).element_size()
    block = max(1, budget_bytes // max(per_key, 1))
    return block - block % 64 if block >= 64 else block


def estimation_transient_bytes(heads: int, last_q: int, context: int, *, kv_heads: int = 0, head_dim: int = 0,
                               max_budget: int = 0, dtype: torch.dtype = torch.float32,
                               budget_bytes: int = ESTIMATE_BLOCK_BYTES) -> int:
    """Bytes ``estimate_dca_selection`` keeps live at its peak for one sub-block over ``context`` keys (queries in
    ``dtype``; the work runs in fp32, or fp64 for fp64; ``max_budget`` the largest per-head vertical or slash
    count): the two ``[H, e]`` score vectors plus the larger of pass 2 (the logits block with its key block, or a
    probability block, its skewed copy and their diagonal sums) and the selection (one head group at about 16
    bytes per score, plus a few ``[H, max_budget]`` index tensors)."""
    wd = work_dtype(dtype)
    s = torch.empty((), dtype=wd).element_size()
    size = torch.empty((), dtype=dtype).element_size()
    n = min(last_q, context)
    block = min(key_block_size(heads, n, wd, budget_bytes), context)
    scores = 2 * heads * context * s + 3 * n * heads * head_dim * (size + s)   # + up to 3 rotations of the rows
    keys = block * kv_heads * head_dim * (size + 2 * s)
    logits = heads * n * block * s
    pass2 = max(logits + keys, 2 * logits + heads * n * n * s + heads * (block + n) * s)
    select = min(heads, max(1, budget_bytes // (16 * context))) * context * 16 + heads * min(max_budget, context) * 80
    return scores + max(pass2, select)


def host_ints(values, device) -> torch.Tensor:
    """An int64 tensor of host integers on ``device`` without waiting on the device stream (pinned, async)."""
    t = torch.tensor([int(x) for x in values], dtype=torch.int64)
    if torch.device(device).type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def as_key_source(keys):
    """A KV source (``keys(lo, hi)``, ``length``) for a plain key tensor ``[L, G, D]`` or an existing source."""
    if isinstance(keys, torch.Tensor):
        if keys.dim() != 3:
            raise ValueError(f"keys must be [L, G, D], got {tuple(keys.shape)}")
        return ContiguousKV(keys, keys)
    if not (hasattr(keys, "keys") and hasattr(keys, "length")):
        raise TypeError(f"keys must be a tensor or a KV source with keys(lo, hi) and length, got {type(keys)}")
    return keys


def _key_regions(q_last, e: int, P: int, cl, chunk_size, rope_theta):
    """[(key lo, key hi, rotated last rows)] in key order; each region has its own query rotation."""
    n = q_last.shape[0]
    pos = torch.arange(e - n, e, device=q_last.device)
    if cl is None:
        return [(0, e, apply_rope(q_last, pos, rope_theta))]
    succ_sel, inter_sel = selection_positions(pos, cl, chunk_size)
    rotation = {"intra": pos % cl, "succ": succ_sel, "inter": inter_sel}
    return [(lo, hi, apply_rope(q_last, rotation[name], rope_theta))
            for name, lo, hi, _ in reversed(region_bounds(P, e, cl)) if hi > lo]


class _BlockLogits:
    """Scaled, causally masked logits ``[H, n, hi - lo]`` of one key block (keys read through the source)."""

    def __init__(self, source, regions, *, e: int, n: int, tau: float, wd: torch.dtype):
        self.source, self.regions, self.e, self.n, self.tau, self.wd = source, regions, e, n, tau, wd
        self._grouped = {}

    def _queries(self, i: int, G: int) -> torch.Tensor:
        """Region i's rows as ``[G, g * n, D]`` (query head h = kv head h // g), built once per region."""
        if i not in self._grouped:
            q = self.regions[i][2]
            n, H, D = q.shape
            if H % G:
                raise ValueError(f"query heads {H} must be a multiple of KV heads {G}")
            self._grouped[i] = q.to(self.wd).reshape(n, G, H // G, D).permute(1, 2, 0, 3).reshape(G, -1, D)
        return self._grouped[i]

    def __call__(self, i: int, lo: int, hi: int) -> torch.Tensor:
        kb = self.source.keys(lo, hi)                                  # [B, G, D]
        qg = self._queries(i, kb.shape[1])
        z = torch.bmm(qg, kb.to(self.wd).permute(1, 2, 0))             # [G, g * n, B] == [H, n, B]
        z = z.view(-1, self.n, hi - lo).mul_(self.tau)
        if hi > self.e - self.n:                                       # the causal tail: key j <= row's query
            rows = torch.arange(self.e - self.n, self.e, device=z.device)
            z.masked_fill_(torch.arange(lo, hi, device=z.device)[None, :] > rows[:, None], float("-inf"))
        return z


def _blocks(regions, block: int):
    for i, (lo, hi, _) in enumerate(regions):
        for a in range(lo, hi, block):
            yield i, a, min(hi, a + block)


def dca_vs_scores(q_rows, keys, *, b: int, e: int, P: int, cl, chunk_size, rope_theta, tau: float, last_q: int,
                  key_block: int | None = None):
    """(vertical ``[H, e]``, diagonal ``[H, e]``) scores of the sub-block ``[b, e)`` (un-rotated ``q_rows``
    ``[e - b, H, D]``) over keys ``[0, e)`` of ``keys`` (tensor or KV source), forced entries +inf, in the work
    dtype. ``key_block`` overrides the block size derived from ``ESTIMATE_BLOCK_BYTES``."""
    source = as_key_source(keys)
    if q_rows.dim() != 3 or q_rows.shape[0] != e - b or not 0 <= b < e:
        raise ValueError(f"q_rows must be [e - b, H, D] for 0 <= b < e, got {tuple(q_rows.shape)}, b={b}, e={e}")
    if e > source.length:
        raise ValueError(f"sub-block ends at {e} but the KV source holds {source.length} keys")
    if cl is not None and (P % cl or not P <= b < e <= P + cl):
        raise ValueError(f"sub-block [{b}, {e}) does not start inside the DCA chunk at P={P} (cl={cl})")
    n = min(int(last_q), e - b)
    H = q_rows.shape[1]
    wd = work_dtype(q_rows.dtype)
    device = q_rows.device
    block = int(key_block) if key_block is not None else key_block_size(H, n, wd)
    if block < 1:
        raise ValueError(f"key_block must be >= 1, got {block}")
    regions = _key_regions(q_rows[-n:], e, P, cl, chunk_size, rope_theta)
    logits = _BlockLogits(source, regions, e=e, n=n, tau=tau, wd=wd)

    # pass 1: online row maximum and sum of exponentials
    m = torch.full((H, n, 1), float("-inf"), dtype=wd, device=device)
    s = torch.zeros((H, n, 1), dtype=wd, device=device)
    for i, lo, hi in _blocks(regions, block):
        z = logits(i, lo, hi)
        m_new = torch.maximum(m, z.amax(dim=-1, keepdim=True))
        m_safe = torch.where(torch.isfinite(m_new), m_new, torch.zeros_like(m_new))   # rows without keys yet
        s = s * torch.exp(m - m_safe) + z.sub_(m_safe).exp_().sum(dim=-1, keepdim=True)
        m = m_new
        del z
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    s = torch.where(s > 0, s, torch.ones_like(s))

    # pass 2: probabilities -> column sums and sums along diagonals
    vertical = torch.zeros((H, e), dtype=wd, device=device)
    diagonal = torch.zeros((H, e), dtype=wd, device=device)
    for i, lo, hi in _blocks(regions, block):
        p = logits(i, lo, hi).sub_(m).exp_().div_(s)
        B = hi - lo
        vertical[:, lo:hi] = p.sum(dim=1)
        # skew row r right by n - 1 - r: column c of the skewed block is the diagonal meeting key lo + c last
        W = B + n - 1
        skew = torch.zeros((H, n, W), dtype=wd, device=device)
        skew.as_strided((H, n, B), (n * W, W - 1, 1), skew.storage_offset() + n - 1).copy_(p)
        del p
        w = min(W, e - lo)                       # diagonals past the last key only receive masked zeros
        diagonal[:, lo:lo + w] += skew.sum(dim=1)[:, :w]
        del skew
    vertical[:, :FORCED_SINKS] = float("inf")
    diagonal[:, max(0, e - FORCED_DIAGONALS):] = float("inf")
    return vertical, diagonal


def _top_set(scores: torch.Tensor, k: torch.Tensor, K: int, *, prefer_larger_index: bool) -> torch.Tensor:
    """Each head's ``k[h]`` best entries ``[H, K]`` (score order, ties by key, PAD after ``k[h]``), no sorts over
    the context: the k-th value from ``topk``, all entries above it, then ties at it in key order."""
    H, N = scores.shape
    device = scores.device
    vals = torch.topk(scores, K, dim=1, sorted=True).values
    kth = vals.gather(1, (k - 1).clamp(min=0)[:, None])
    kth = torch.where(k[:, None] > 0, kth, torch.full_like(kth, float("inf")))
    del vals
    above = scores > kth
    tie = scores == kth
    need = k - above.sum(dim=1)
    rank = tie.cumsum(dim=1, dtype=torch.int32)                     # ties seen so far, from the left
    if prefer_larger_index:                                         # ... or from the right (in place)
        total = rank[:, -1:].clone()
        rank.neg_().add_(tie).add_(total)
    chosen = rank <= need[:, None]
    del rank
    chosen &= tie
    chosen |= above
    del above, tie
    # chosen keys as distinct positive integers: topk returns them in key order, deterministically
    j = torch.arange(N, device=device, dtype=torch.int32)
    code = torch.where(chosen, (j + 1) if prefer_larger_index else (N - j), torch.zeros_like(j))
    del chosen
    top = torch.topk(code, K, dim=1, sorted=True).values.to(torch.int64)
    valid = top > 0
    idx = (top - 1) if prefer_larger_index else (N - top)
    idx = torch.where(valid, idx, torch.zeros_like(idx))
    sc = scores.gather(1, idx)
    sc = torch.where(valid, sc, torch.full_like(sc, float("-inf")))
    order = torch.sort(sc, dim=1, descending=True, stable=True).indices      # over K entries only
    return torch.where(valid.gather(1, order), idx.gather(1, order), torch.full_like(idx, PAD))


def select_top(scores: torch.Tensor, budgets, *, prefer_larger_index: bool = False,
               budget_bytes: int = ESTIMATE_BLOCK_BYTES):
    """(indices ``[H, K]``, counts ``[H]``) of each head's ``min(budget, N)`` best entries, K the largest count.

    Equal to a stable descending sort truncated per head (ties to the smaller index, or to the larger one with
    ``prefer_larger_index``); heads are processed in groups so the temporaries stay within ``budget_bytes``."""
    H, N = scores.shape
    counts = [min(int(x), N) for x in budgets]
    if len(counts) != H:
        raise ValueError(f"need one budget per head ({H}), got {len(counts)}")
    K = max(counts)
    k = host_ints(counts, scores.device)
    out = torch.full((H, K), PAD, dtype=torch.int64, device=scores.device)
    if K == 0:
        return out, k
    step = max(1, budget_bytes // (16 * N))                # ~16 bytes of masks and ranks per score
    for h0 in range(0, H, step):
        h1 = min(H, h0 + step)
        out[h0:h1] = _top_set(scores[h0:h1], k[h0:h1], K, prefer_larger_index=prefer_larger_index)
    return out, k


def estimate_dca_selection(q_rows, keys, *, b: int, e: int, P: int, cl, chunk_size, rope_theta, tau: float,
                           budgets, key_block: int | None = None) -> Selection:
    """Vertical-slash selection of the sub-block ``[b, e)`` (un-rotated ``q_rows`` ``[e - b, H, D]``) over keys
    ``[0, e)`` of ``keys`` (a tensor ``[>= e, G, D]`` holding the cache rotation, or a KV source).

    Budgets per head: ``budgets.effective_vertical()`` verticals and ``budgets.slash`` slashes, capped at ``e``.
    """
    H = q_rows.shape[1] if q_rows.dim() == 3 else -1
    if budgets.num_heads != H:
        raise ValueError(f"sparse budgets cover {budgets.num_heads} heads, q_rows has {H}")
    vertical, diagonal = dca_vs_scores(q_rows, keys, b=b, e=e, P=P, cl=cl, chunk_size=chunk_size,
                                       rope_theta=rope_theta, tau=tau, last_q=budgets.last_q, key_block=key_block)
    v, vc = select_top(vertical, budgets.effective_vertical())
    del vertical
    d, dc = select_top(diagonal, budgets.slash, prefer_larger_index=True)
    return Selection(v, vc, d, dc)


def fallback_indices(length: int, device) -> torch.Tensor:
    """~5 evenly spaced local indices ``0, len/5, 2 len/5, ...`` (truncated) for a region left without any."""
    step = max(1.0, length / 5)
    count = math.ceil(length / step)
    return (torch.arange(count, device=device, dtype=torch.float64) * step).to(torch.int64)


def _compact(values: torch.Tensor, keep: torch.Tensor, fallback: torch.Tensor, width: int, *, descending: bool):
    """Kept values sorted per head into ``[H, width]`` with padding last; heads that keep none get ``fallback``.
    ``width`` is a host-known bound on the kept count (and the fallback size)."""
    pad = INT32_MIN if descending else INT32_MAX
    H = values.shape[0]
    count = keep.sum(dim=1)
    x = torch.where(keep, values, torch.full_like(values, pad))
    x = torch.sort(x, dim=1, descending=descending).values[:, :width]
    if x.shape[1] < width:
        x = torch.cat([x, torch.full((H, width - x.shape[1]), pad, dtype=x.dtype, device=x.device)], 1)
    fb = torch.full((width,), pad, dtype=x.dtype, device=x.device)
    fb[:fallback.shape[0]] = fallback.flip(0) if descending else fallback       # fallback is ascending
    empty = count == 0
    x = torch.where(empty[:, None], fb[None, :], x)
    count = torch.where(empty, torch.full_like(count, fallback.shape[0]), count)
    return x, count


def split_regions(sel: Selection, *, b: int, e: int, P: int, cl) -> list[RegionIndices]:
    """Global selections -> intra / succ / inter kernel indices (with the ~5-index fallbacks for empty regions).

    Slash values ``s = anchor - c`` put diagonal c on key ``c - (n_q - 1 - r)`` at row r in every region. Widths
    are host-known (the selection width, capped by what the region can hold); no host synchronisation.
    """
    n_q = e - b
    device = sel.vertical.device
    v, d = sel.vertical, sel.diagonal
    v_ok = torch.arange(v.shape[1], device=device)[None, :] < sel.vertical_count[:, None]
    d_ok = torch.arange(d.shape[1], device=device)[None, :] < sel.diagonal_count[:, None]
    out = []
    for name, lo, hi, causal in region_bounds(P, e, cl):
        # kept diagonals [c_lo, c_hi), slash anchor, delta shift
        c_lo, c_hi, anchor, shift = {"intra": (P, e, e - 1, 0),
                                     "succ": (lo, P + n_q, P + n_q - 1, b - P),
                                     "inter": (0, hi + n_q, hi + n_q - 1, b - hi)}[name]
        keep_v = v_ok & (v >= lo) & (v < hi)
        keep_s = d_ok & (d >= c_lo) & (d < c_hi)
        fb = fallback_indices(hi - lo, device)
        nf = fb.shape[0]
        verts, vc = _compact(v - lo, keep_v, fb, max(min(v.shape[1], hi - lo), nf, 1), descending=False)
        slashes, sc = _compact(anchor - d, keep_s, fb, max(min(d.shape[1], c_hi - c_lo), nf, 1), descending=True)
        out.append(RegionIndices(name, lo, hi, causal, verts, vc, slashes, sc, shift))
    return out
