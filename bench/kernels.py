"""`longserve bench kernels`: dense vs vertical-slash sparse DCA prefill on the PyTorch reference path, one run.

For each length the same synthetic inputs go through ``longserve.kernels.dual_chunk_attention`` twice (dense, then
sparse with Qwen-like budgets) and the table reports both times, their ratio, the fraction of causal (query, key)
pairs the sparse path scored and selected, and the mean attention recall ``exp(LSE_sparse - LSE_dense)``.

Inputs imitate a local head with sinks: q and k share a component on one low-frequency RoPE pair, so logits fall
smoothly with distance (slash scores are highest near the diagonal), keys 0-3 attract every query, and the rest
is Gaussian noise. Budgets: vertical 1000 / slash 6096 at 32768 tokens (the most common Qwen2.5-1M entry),
scaled linearly with length below that (8K: 250 / 1524), never below the forced 30 sinks / 100 diagonals; the
sparse threshold is set to 0 so the sparse path runs at every length (the deployed default, 32768 strict, would
route all three lengths to dense). Dense and sparse both run the plain PyTorch math (like for like, the
algorithmic comparison); the last column adds the dense time of the fused CPU attention the engine uses,
which the sparse reference does not have. Module level imports stay stdlib-only (bench/cli.py registry).
"""
from __future__ import annotations

import json
import math
import time

HELP = "dense vs sparse DCA prefill (reference path): time ratio and fraction of pairs computed"

QWEN_TOKENS = 32768
QWEN_VERTICAL = 1000
QWEN_SLASH = 6096
FIELDS = ("tokens", "heads", "kv_heads", "head_dim", "vertical", "slash", "dense_s", "sparse_s", "dense_fused_s",
          "speedup", "dense_cpu_s", "sparse_cpu_s", "cpu_speedup", "computed_frac", "selected_frac", "recall_mean",
          "recall_min", "max_abs_diff")


def add_arguments(parser) -> None:
    parser.add_argument("--lengths", default="8192,16384,32768", help="comma-separated prompt lengths")
    parser.add_argument("--heads", type=int, default=4, help="query heads")
    parser.add_argument("--kv-heads", type=int, default=1, help="KV heads (must divide --heads)")
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--vertical", type=int, default=QWEN_VERTICAL, help=f"vertical budget at {QWEN_TOKENS} tokens")
    parser.add_argument("--slash", type=int, default=QWEN_SLASH, help=f"slash budget at {QWEN_TOKENS} tokens")
    parser.add_argument("--chunk-size", type=int, default=262144, help="DCA chunk_size (0: DCA off)")
    parser.add_argument("--local-size", type=int, default=8192, help="DCA local_size")
    parser.add_argument("--rope-theta", type=float, default=1e7)
    parser.add_argument("--device", default="cpu", help="torch device (cuda dispatches to the Triton path)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON object per length instead of a table")


def scaled_budgets(tokens: int, vertical: int, slash: int) -> tuple[int, int]:
    """Budgets at ``tokens``: linear in length below 32768, at least the forced 30 sinks / 100 diagonals."""
    f = min(1.0, tokens / QWEN_TOKENS)
    return max(30, round(vertical * f)), max(100, round(slash * f))


def synthetic_qkv(n: int, heads: int, kv_heads: int, head_dim: int, *, rope_theta: float, seed: int, device="cpu"):
    """Un-rotated q ``[n, H, D]``, k/v ``[n, G, D]`` fp32 with local + sink structure (see module docstring)."""
    import torch

    g = torch.Generator(device="cpu").manual_seed(seed)
    half = head_dim // 2
    q = 0.3 * torch.randn((n, heads, head_dim), generator=g)
    k = 0.3 * torch.randn((n, kv_heads, head_dim), generator=g)
    v = torch.randn((n, kv_heads, head_dim), generator=g)
    # RoPE pair i turns by theta^(-2i/D) rad per token. Equal weight on every pair whose wavelength lies between
    # ~30 tokens and the prompt length makes q.k fall roughly with log(distance): each e-fold of distance drops
    # ~2 logits, a power-law decay like a local head's, so diagonal scores shrink steadily away from the diagonal.
    lo = math.ceil(half * math.log(30.0) / math.log(rope_theta))
    hi = min(half - 2, int(half * math.log(float(n)) / math.log(rope_theta)))
    amp = math.sqrt(math.sqrt(head_dim) * math.log(rope_theta) / half)     # tau * amp^2 * (pairs per e-fold) = 1
    q[:, :, lo:hi + 1] += amp
    k[:, :, lo:hi + 1] += amp
    sink = half - 1                                   # slowest pair: nearly constant over the context
    q[:, :, sink] += 3.0
    k[:4, :, sink] += 8.0
    return q.to(device), k.to(device), v.to(device)


def _timed(fn):
    """(result, wall seconds, CPU seconds of this process); CPU time is steadier on a shared machine."""
    import torch

    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0, time.process_time() - c0


def bench_length(tokens: int, *, heads: int = 4, kv_heads: int = 1, head_dim: int = 64, vertical: int = QWEN_VERTICAL,
                 slash: int = QWEN_SLASH, chunk_size: int | None = 262144, local_size: int | None = 8192,
                 rope_theta: float = 1e7, device: str = "cpu", seed: int = 0) -> dict:
    """One row of the table: dense and sparse DCA prefill of the same inputs."""
    import torch

    from longserve.kernels import PairStats, SparseHeadBudgets, dual_chunk_attention
    from longserve.kernels.reference.attention import tiled_math_only

    v_budget, s_budget = scaled_budgets(tokens, vertical, slash)
    q, k, v = synthetic_qkv(tokens, heads, kv_heads, head_dim, rope_theta=rope_theta, seed=seed, device=device)
    kw = dict(rope_theta=rope_theta, chunk_size=chunk_size, local_size=local_size, return_lse=True)
    budgets = SparseHeadBudgets.uniform(heads, v_budget, s_budget, threshold=0)
    with torch.inference_mode():
        with tiled_math_only():          # like for like: both paths in plain PyTorch math
            (o_dense, lse_dense), dense_s, dense_cpu = _timed(lambda: dual_chunk_attention(q, k, v, **kw))
        _, fused_s, _ = _timed(lambda: dual_chunk_attention(q, k, v, **kw))   # the engine's CPU dense path
        stats = PairStats.with_selected()
        (o_sparse, lse_sparse), sparse_s, sparse_cpu = _timed(
            lambda: dual_chunk_attention(q, k, v, sparse=budgets, stats=stats, **kw))
        recall = torch.exp(lse_sparse.double() - lse_dense.double())
    stats = stats.resolved()
    causal = heads * tokens * (tokens + 1) // 2
    return {
        "tokens": tokens, "heads": heads, "kv_heads": kv_heads, "head_dim": head_dim,
        "vertical": v_budget, "slash": s_budget,
        "dense_s": round(dense_s, 3), "sparse_s": round(sparse_s, 3), "dense_fused_s": round(fused_s, 3),
        "speedup": round(dense_s / sparse_s, 2) if sparse_s > 0 else math.inf,
        "dense_cpu_s": round(dense_cpu, 3), "sparse_cpu_s": round(sparse_cpu, 3),
        "cpu_speedup": round(dense_cpu / sparse_cpu, 2) if sparse_cpu > 0 else math.inf,
        "computed_frac": round(stats.computed / causal, 4) if stats.causal else None,
        "selected_frac": round(stats.selected / causal, 4) if stats.causal else None,
        "recall_mean": round(float(recall.mean()), 4), "recall_min": round(float(recall.min()), 4),
        "max_abs_diff": round(float((o_sparse.double() - o_dense.double()).abs().max()), 4),
    }


def format_table(rows: list[dict]) -> str:
    header = ("tokens", "budgets(v/s)", "dense s", "sparse s", "dense/sparse", "cpu dense/sparse", "pairs computed",
              "pairs selected", "recall mean/min", "fused dense s")
    lines = [header]
    for r in rows:
        frac = [f"{100 * r[key]:.1f}%" if r[key] is not None else "n/a" for key in ("computed_frac", "selected_frac")]
        lines.append((str(r["tokens"]), f"{r['vertical']}/{r['slash']}", f"{r['dense_s']:.2f}", f"{r['sparse_s']:.2f}",
                      f"{r['speedup']:.2f}x", f"{r['cpu_speedup']:.2f}x", *frac,
                      f"{r['recall_mean']:.3f}/{r['recall_min']:.3f}", f"{r['dense_fused_s']:.2f}"))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in lines)


def _parse_lengths(text: str) -> list[int]:
    try:
        lengths = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--lengths must be comma-separated integers, got {text!r}") from None
    if not lengths or min(lengths) < 1:
        raise ValueError(f"--lengths must list positive integers, got {text!r}")
    return lengths


def run(args) -> int:
    import sys

    try:
        lengths = _parse_lengths(args.lengths)
        if args.heads < 1 or args.kv_heads < 1 or args.heads % args.kv_heads:
            raise ValueError(f"--heads ({args.heads}) must be a positive multiple of --kv-heads ({args.kv_heads})")
        if args.head_dim < 4 or args.head_dim % 2:
            raise ValueError(f"--head-dim must be an even number >= 4, got {args.head_dim}")
        chunk = (args.chunk_size, args.local_size) if args.chunk_size else (None, None)
        rows = []
        for n in lengths:
            row = bench_length(n, heads=args.heads, kv_heads=args.kv_heads, head_dim=args.head_dim,
                               vertical=args.vertical, slash=args.slash, chunk_size=chunk[0], local_size=chunk[1],
                               rope_theta=args.rope_theta, device=args.device, seed=args.seed)
            rows.append(row)
            if args.json:
                print(json.dumps(row), flush=True)
    except ValueError as exc:
        print(f"longserve bench kernels: {exc}", file=sys.stderr)
        return 2
    if not args.json:
        print(f"dense vs sparse DCA prefill, reference path on {args.device}, H={args.heads} G={args.kv_heads} "
              f"D={args.head_dim}; budgets scaled from {args.vertical}/{args.slash} at {QWEN_TOKENS} tokens; "
              "wall and process-CPU time ratios; pairs as a share of the causal pairs")
        print(format_table(rows))
    return 0
