"""The planner's memory model: per-GPU bytes of one (TP, chunk) candidate (pure arithmetic).

Native runtime: the terms come from `longserve.server.memory_model`, the same functions the engine sizes its KV
cache with (weights, KV for max_model_len × max_num_seqs tokens, the step's transient peak, overhead; see that
module for how each transient is derived from the tensors the engine allocates). The breakdown reports the
transient peak by component at the step's largest phase (activations with the step metadata, attention,
estimation with the sparse work lists), so
weights + kv + activations + attention + estimation + overhead is what one GPU must hold.

Upstream runtimes (vllm, sglang) are modelled as those engines allocate, at tensor parallelism t, prefill chunk
C, N = max_model_len, S = max_num_seqs, b = bytes per element, H/G query/KV heads, D head dim, I intermediate:

    weights     = W / t
    kv          = 2·layers·G·D·b · N · S / t
    activations = 3·C·hidden·b + 3·C·(I/t)·b           residual buffers + MLP gate/up and SiLU·up of one chunk
    attention   = C·(H/t)·D·(2·variants + 4·parts)     bf16 query variants + fp32 partial outputs of their DCA
                                                        backend: N > 2·cl: 3 parts, 3 (+2 when sparse) variants
    estimation  = 4·N·D·(G/t + H/t) + 512·(H/t)·N       gathered + GQA-expanded K/V and [H/t, 64, N] logits
    overhead    = 1.5 GiB + 0.05·weights

Budget and safety margin. The native engine must satisfy

    weights + kv + transients + overhead ≤ u·M·(1 − m_eff)

with u the utilisation bound (default 0.90, a fraction of the GPU's total memory M) and m_eff the effective
safety margin: the configured margin m (default 10 %) guards against under-estimating the request-dependent
terms (kv + transients = R), so it shrinks for small requests: m_eff = m · min(1, R / 32 GiB).

Upstream runtimes budget memory themselves through a fraction of the GPU:

    vllm:   pool = weights + kv + activations   (profiled inside --gpu-memory-utilization)
    sglang: pool = weights + kv                 (--mem-fraction-static)
    outside  = every other term (DCA/sparse transients the upstream profiler never sees)
    fraction = min(u, floor_to_0.01(1 − outside·(1 + m_eff)/M))
    feasible iff fraction·M ≥ pool·(1 + m_eff)

Published floors. Qwen states ≥ 120 GB (7B) and ≥ 320 GB (14B) total VRAM for 1M-token contexts with
vLLM. `minimum_total_vram` searches every valid t and chunk for the smallest t·M that makes the vllm
plan feasible: M ≥ (1 + m)·max(pool/u, pool + outside), plus up to 1 % for the floored fraction
(found exactly by bisection). For 7B at 1,010,000 tokens: t = 1,
C = 8192, pool = 15.23 + 57.92 + 1.11 = 74.26 GB, outside = 0.65 + 31.0 + 2.37 = 34.0 GB → 119.1 GB,
120.1 GB with the floored fraction (published 120). For 14B: t = 1, C = 8192, pool = 29.54 + 198.57 + 0.93,
outside = 0.92 + 45.5 + 3.09 → 306 GB, 307.3 GB floored (published 320; at t = 8 and C = 16384 it is 325 GB).
Both within ±10 %.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from longserve.operator.catalog import ModelEntry
from longserve.server.memory_model import (
    CHUNK_CANDIDATES,
    DEFAULT_SPARSE_THRESHOLD,
    KV_BLOCK_SIZE,
    chunk_candidates,
    effective_margin,
    native_sizing,
    overhead_bytes,
)

__all__ = ["CHUNK_CANDIDATES", "KV_BLOCK_SIZE", "GB", "MemoryBreakdown", "chunk_candidates", "memory_breakdown",
           "minimum_memory_per_gpu", "minimum_total_vram", "valid_tensor_parallel_sizes"]

GB = 1e9


@dataclass(frozen=True, slots=True)
class MemoryBreakdown:
    """Per-GPU bytes of one (TP, chunk) candidate."""
    weights: float
    kv: float
    activations: float
    attention: float
    estimation: float
    overhead: float
    budget: float               # what the runtime may use: u·M·(1 − m_eff) (native) or fraction·M
    fraction: float             # gpu memory utilisation rendered into the runtime
    margin: float               # effective safety margin m_eff
    feasible: bool

    def pool(self, runtime: str) -> float:
        """What an upstream runtime budgets inside its memory fraction."""
        if runtime == "sglang":
            return self.weights + self.kv
        return self.weights + self.kv + self.activations

    @property
    def total(self) -> float:
        return self.weights + self.kv + self.activations + self.attention + self.estimation + self.overhead

    def as_dict(self) -> dict:
        return {"budget": int(self.budget), "weights": int(self.weights), "kv": int(self.kv),
                "activations": int(self.activations), "attention": int(self.attention),
                "estimation": int(self.estimation), "overhead": int(self.overhead),
                "total": int(self.total)}


def valid_tensor_parallel_sizes(model: ModelEntry, limit: int = 8) -> list[int]:
    """TP sizes dividing both the query-head and KV-head counts, up to `limit`."""
    f = model.facts
    return [t for t in range(1, limit + 1) if f.num_heads % t == 0 and f.num_kv_heads % t == 0]


def _sparse_possible(model: ModelEntry, max_model_len: int) -> bool:
    threshold = model.facts.sparse_attention_threshold or DEFAULT_SPARSE_THRESHOLD
    return model.facts.has_dca and max_model_len > threshold


def _attention_factor(model: ModelEntry, max_model_len: int) -> int:
    """Bytes per (token, head, dim) of the query variants (bf16) and partial outputs (fp32)."""
    cl = model.facts.dca_chunk_len
    sparse = _sparse_possible(model, max_model_len)
    if cl is None or max_model_len <= cl:
        parts, variants = 1, 1
    elif max_model_len <= 2 * cl:
        parts, variants = 2, 2 + (1 if sparse else 0)
    else:
        parts, variants = 3, 3 + (2 if sparse else 0)
    return 2 * variants + 4 * parts


def memory_breakdown(model: ModelEntry, tp: int, chunk: int, max_model_len: int, max_num_seqs: int,
                     runtime: str, memory_per_gpu: float, utilization: float,
                     margin: float) -> MemoryBreakdown:
    """Per-GPU memory terms and the verdict for one (TP, chunk) candidate."""
    if runtime == "native":
        return _native_breakdown(model, tp, chunk, max_model_len, max_num_seqs, memory_per_gpu, utilization,
                                 margin)
    f, b = model.facts, model.dtype_bytes
    n = max_model_len
    weights = model.weight_bytes / tp
    kv = f.kv_bytes_per_token(b) * n * max_num_seqs / tp
    activations = 3 * chunk * f.hidden_size * b + 3 * chunk * (f.intermediate_size / tp) * b
    attention = chunk * (f.num_heads / tp) * f.head_dim * _attention_factor(model, n)
    if _sparse_possible(model, n):
        estimation = 4 * n * f.head_dim * (f.num_kv_heads / tp + f.num_heads / tp) + 512 * (f.num_heads / tp) * n
    else:
        estimation = 0.0
    overhead = overhead_bytes(weights)
    m_eff = effective_margin(margin, kv + activations + attention + estimation)
    terms = dict(weights=weights, kv=kv, activations=activations, attention=attention,
                 estimation=estimation, overhead=overhead)
    pool = weights + kv + (activations if runtime == "vllm" else 0.0)
    outside = sum(terms.values()) - pool
    fraction = min(utilization, math.floor((1 - outside * (1 + m_eff) / memory_per_gpu) * 100) / 100)
    fraction = max(fraction, 0.0)
    budget = fraction * memory_per_gpu
    return MemoryBreakdown(**terms, budget=budget, fraction=fraction, margin=m_eff,
                           feasible=fraction > 0 and budget >= pool * (1 + m_eff))


def _native_breakdown(model: ModelEntry, tp: int, chunk: int, max_model_len: int, max_num_seqs: int,
                      memory_per_gpu: float, utilization: float, margin: float) -> MemoryBreakdown:
    """The engine's own model (server.memory_model); transients by component at the step's peak phase, with the
    runner's small per-step metadata counted under activations."""
    sz = native_sizing(model.facts, tp=tp, chunk=chunk, max_model_len=max_model_len, max_num_seqs=max_num_seqs,
                       memory_per_gpu=memory_per_gpu, utilization=utilization, margin=margin,
                       dtype_bytes=model.dtype_bytes, weights=model.weight_bytes / tp)
    c = sz.transients.components
    return MemoryBreakdown(weights=sz.weights, kv=sz.kv, activations=c["activations"] + c["metadata"],
                           attention=c["attention"], estimation=c["estimation"] + c["index"], overhead=sz.overhead,
                           budget=sz.budget, fraction=utilization, margin=sz.margin, feasible=sz.fits)


def minimum_memory_per_gpu(model: ModelEntry, tp: int, chunk: int, max_model_len: int, runtime: str, *,
                           max_num_seqs: int = 1, utilization: float = 0.90,
                           margin_percent: float = 10.0) -> float:
    """Smallest per-GPU memory M (bytes, to 1 MB) for which this (tp, chunk) candidate fits.

    Feasibility is monotone in M (the native budget u·M·(1 − m_eff) and the upstream fraction·M
    both grow with M), so bisection finds it; the closed forms of the module docstring are the
    starting bracket (the upstream fraction is floored to 0.01, hence the bisection).
    """
    def fits(memory: float) -> bool:
        return memory_breakdown(model, tp, chunk, max_model_len, max_num_seqs, runtime, memory,
                                utilization, margin_percent / 100).feasible

    lo, hi = 0.0, 1e9
    while not fits(hi):
        lo, hi = hi, hi * 2
    while hi - lo > 1e6:
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if fits(mid) else (mid, hi)
    return hi


def minimum_total_vram(model: ModelEntry, max_model_len: int, runtime: str, *, max_num_seqs: int = 1,
                       utilization: float = 0.90, margin_percent: float = 10.0,
                       gpus_per_node: int = 8) -> tuple[float, int, int]:
    """Smallest total VRAM (bytes) over valid TP and chunk that fits, with that (tp, chunk)."""
    best = None
    for tp in valid_tensor_parallel_sizes(model, gpus_per_node):
        for chunk in chunk_candidates(max_model_len):
            per_gpu = minimum_memory_per_gpu(model, tp, chunk, max_model_len, runtime, max_num_seqs=max_num_seqs,
                                             utilization=utilization, margin_percent=margin_percent)
            if best is None or per_gpu * tp < best[0]:
                best = (per_gpu * tp, tp, chunk)
    return best
