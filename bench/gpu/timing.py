"""GPU check, section 3: dense Triton vs SDPA (flash) and sparse vs dense timings, TFLOP/s and ratios.

Qwen2.5-7B head shapes by default (28 query heads, 4 KV heads, D = 128, bf16, causal square prefill) and
Qwen-like sparse budgets (vertical 1000, slash 6096, ``patterns.qwen_like_pattern``). FLOPs count 4·H·D per
computed (query, key) pair: dense causal uses the exact causal pair count, and the sparse "effective" rate uses
the dense count (the work it replaces). Also times paged DCA decode at a long KV length.
"""
from __future__ import annotations

import math
import time
from functools import partial

import torch

from longserve.bench.gpu.patterns import causal_pairs, listed_pairs, qwen_like_pattern


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn, device, *, budget_s: float = 2.0, max_reps: int = 10) -> dict:
    """Warm up once (compiles), then time enough repetitions to fill ``budget_s``; returns ms stats."""
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    first = time.perf_counter() - t0
    reps = max(1, min(max_reps, int(budget_s / max(first, 1e-4))))
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return {"ms": times[len(times) // 2], "ms_min": times[0], "reps": reps, "first_call_s": round(first, 3)}


def _inputs(n, H, G, D, dtype, device, seed=0):
    g = torch.Generator(device=device.type if device.type == "cuda" else "cpu").manual_seed(seed)
    return tuple(torch.randn((n, heads, D), generator=g, device=device, dtype=dtype)
                 for heads in (H, G, G))


def sdpa_flash(q, k, v, scale):
    """torch SDPA restricted to the flash backend (math on CPU), K/V expanded to the query heads."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    group = q.shape[1] // k.shape[1]
    qt = q.transpose(0, 1)[None]
    kt = k.repeat_interleave(group, dim=1).transpose(0, 1)[None]
    vt = v.repeat_interleave(group, dim=1).transpose(0, 1)[None]
    backend = SDPBackend.FLASH_ATTENTION if q.is_cuda else SDPBackend.MATH
    with sdpa_kernel(backend):
        return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=scale)


DENSE_CONFIGS = [
    {"block_m": 128, "num_warps": 8, "num_stages": 3},
    {"block_m": 128, "num_warps": 4, "num_stages": 3},
    {"block_m": 64, "num_warps": 4, "num_stages": 3},
    {"block_m": 128, "num_warps": 8, "num_stages": 2},
]


def tune_dense(n, shape, dtype, device, budget_s) -> dict:
    """Time the dense launch configs at one length; returns {'best': cfg, 'configs': [...]}."""
    from longserve.kernels.vertical_slash import dense_attention

    H, G, D = shape
    q, k, v = _inputs(n, H, G, D, dtype, device)
    scale = 1.0 / math.sqrt(D)
    flops = 4.0 * H * D * causal_pairs(n, n)
    rows, best = [], None
    configs = DENSE_CONFIGS if device.type == "cuda" else DENSE_CONFIGS[2:3]
    for cfg in configs:
        try:
            t = time_call(lambda c=cfg: dense_attention(q, k, v, scale=scale, causal=True, config=c), device,
                          budget_s=budget_s)
            rows.append({"config": cfg, **t, "tflops": flops / (t["ms"] * 1e-3) / 1e12})
            if best is None or t["ms"] < best[1]:
                best = (cfg, t["ms"])
        except Exception as exc:  # a config that fails to compile or launch is reported, not fatal
            rows.append({"config": cfg, "error": f"{type(exc).__name__}: {exc}"[:500]})
    return {"n": n, "best": best[0] if best else None, "configs": rows}


def time_length(n, shape, dtype, device, dense_cfg, *, budget_s, with_sdpa=True, seed=0,
                budgets=(1000, 6096)) -> dict:
    """Dense Triton, SDPA flash, and sparse (index build + kernel) at one causal square length."""
    from longserve.kernels.sparse_index import convert_vertical_slash_indexes
    from longserve.kernels.vertical_slash import dense_attention, vertical_slash_attention

    H, G, D = shape
    q, k, v = _inputs(n, H, G, D, dtype, device, seed)
    scale = 1.0 / math.sqrt(D)
    pairs = causal_pairs(n, n)
    flops = 4.0 * H * D * pairs
    rec = {"n": n, "heads": H, "kv_heads": G, "head_dim": D, "dtype": str(dtype).replace("torch.", "")}
    dense = time_call(partial(dense_attention, q, k, v, scale=scale, causal=True, config=dense_cfg), device,
                      budget_s=budget_s)
    rec["dense_triton"] = {**dense, "tflops": flops / (dense["ms"] * 1e-3) / 1e12}
    if with_sdpa:
        try:
            sd = time_call(partial(sdpa_flash, q, k, v, scale), device, budget_s=budget_s)
            rec["sdpa_flash"] = {**sd, "tflops": flops / (sd["ms"] * 1e-3) / 1e12}
            rec["dense_over_sdpa"] = dense["ms"] / sd["ms"]
        except Exception as exc:  # e.g. no flash backend for this GPU / dtype
            rec["sdpa_flash"] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
    sel = qwen_like_pattern(n, H, vertical=budgets[0], slash=budgets[1], device=device, seed=seed)
    idx = time_call(lambda: convert_vertical_slash_indexes(*sel, n, n, causal=True), device,
                    budget_s=budget_s / 4, max_reps=3)
    lists = convert_vertical_slash_indexes(*sel, n, n, causal=True)
    computed = min(1.0, listed_pairs(lists[0], lists[2]) / (pairs * H))
    sp = time_call(partial(vertical_slash_attention, q, k, v, *lists, scale=scale, causal=True), device,
                   budget_s=budget_s)
    rec["sparse"] = {"budgets": list(budgets), "index_ms": idx["ms"], "attn_ms": sp["ms"],
                     "computed_fraction": computed,
                     "effective_tflops": flops / (sp["ms"] * 1e-3) / 1e12,
                     "actual_tflops": flops * computed / (sp["ms"] * 1e-3) / 1e12}
    rec["dense_over_sparse"] = dense["ms"] / (sp["ms"] + idx["ms"])
    rec["dense_over_sparse_kernel_only"] = dense["ms"] / sp["ms"]
    rec["paged"] = time_paged(q, k, v, lists, dense_cfg, scale, device, budget_s=budget_s, seed=seed)
    rec["paged"]["dense_over_contiguous"] = rec["paged"]["dense_ms"] / dense["ms"]
    rec["paged"]["sparse_over_contiguous"] = rec["paged"]["sparse_ms"] / sp["ms"]
    del q, k, v, lists
    if device.type == "cuda":
        torch.cuda.empty_cache()
        rec["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        torch.cuda.reset_peak_memory_stats(device)
    return rec


def time_paged(q, k, v, lists, dense_cfg, scale, device, *, budget_s, seed=0, page=16) -> dict:
    """The same dense and sparse launches reading K/V from a paged cache (shuffled block table, ``page``
    tokens a block) instead of contiguous tensors: the cost of the block-table indirection."""
    from longserve.kernels.kv_source import PagedKV
    from longserve.kernels.vertical_slash import dense_attention_kv, vertical_slash_attention_kv

    n = k.shape[0]
    blocks = -(-n // page)
    table = torch.randperm(blocks, generator=torch.Generator().manual_seed(seed)).to(torch.int32).to(device)
    pos = torch.arange(n, device=device)
    kc = torch.zeros((blocks, page, *k.shape[1:]), dtype=k.dtype, device=device)
    vc = torch.zeros_like(kc)
    kc[table[pos // page].long(), pos % page] = k
    vc[table[pos // page].long(), pos % page] = v
    kv = PagedKV(kc, vc, table, n)
    dense = time_call(lambda: dense_attention_kv(q, kv, 0, n, scale=scale, causal=True, config=dense_cfg), device,
                      budget_s=budget_s)
    sparse = time_call(lambda: vertical_slash_attention_kv(q, kv, 0, n, *lists, scale=scale, causal=True), device,
                       budget_s=budget_s)
    return {"page": page, "dense_ms": dense["ms"], "sparse_ms": sparse["ms"]}


def time_decode(kv_len, shape, dtype, device, *, chunk_size, local_size, budget_s, page=16) -> dict:
    """One paged DCA decode step (three parts + merge) for one sequence of ``kv_len`` tokens; ms per layer."""
    from longserve.kernels.dca_decode import paged_dca_decode_triton

    H, G, D = shape
    blocks = math.ceil(kv_len / page)
    k_cache = torch.randn((blocks, page, G, D), device=device, dtype=dtype)
    v_cache = torch.randn_like(k_cache)
    tables = torch.arange(blocks, dtype=torch.int32, device=device)[None]
    q = torch.randn((1, H, D), device=device, dtype=dtype)
    seq = torch.tensor([kv_len], dtype=torch.int32, device=device)
    t = time_call(lambda: paged_dca_decode_triton(q, k_cache, v_cache, tables, seq, rope_theta=1e7,
                                                  chunk_size=chunk_size, local_size=local_size), device,
                  budget_s=budget_s)
    bytes_read = 2 * kv_len * G * D * k_cache.element_size()
    return {"kv_len": kv_len, **t, "gb_per_s": bytes_read / (t["ms"] * 1e-3) / 1e9}


def ratio_table(records: list[dict]) -> str:
    """Markdown table of the timing records (the one that goes into bench/RESULTS.md)."""
    lines = ["| tokens | dense Triton ms | TFLOP/s | SDPA flash ms | TFLOP/s | dense/SDPA | sparse ms (index+attn) "
             "| computed | dense/sparse |", "|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        if "dense_triton" not in r:
            continue
        d, s, sp = r["dense_triton"], r.get("sdpa_flash", {}), r.get("sparse", {})
        sd_ms = f"{s['ms']:.1f}" if "ms" in s else "n/a"
        sd_tf = f"{s['tflops']:.0f}" if "tflops" in s else "n/a"
        ratio = f"{r['dense_over_sdpa']:.2f}x" if "dense_over_sdpa" in r else "n/a"
        lines.append(
            f"| {r['n']} | {d['ms']:.1f} | {d['tflops']:.0f} | {sd_ms} | {sd_tf} | {ratio} | "
            f"{sp.get('index_ms', 0):.1f}+{sp.get('attn_ms', 0):.1f} | {sp.get('computed_fraction', 0):.1%} | "
            f"{r.get('dense_over_sparse', 0):.2f}x |")
    return "\n".join(lines)
