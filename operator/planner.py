"""The VRAM planner: tensor parallelism and prefill chunk from a GPU memory budget.

Pure and deterministic: `plan(model, gpu, request) -> Plan`. No I/O, no Kubernetes, no torch.
The memory model and its arithmetic (incl. the published-floor check) live in `memory.py`.

Plan choice (docs/operator.md#sizing-choice): TP candidates divide both head counts and are ≤ nodes × gpus_per_node.
TP stays within one node where it can: the candidates that fit in a node are tried first (MinGPUs the
smallest first, MaxPrefillThroughput the largest first), and a TP spanning nodes is taken only when
none of them fits (the smallest such TP). For a TP the chunk is the largest of 131072, 65536, 32768,
16384, 8192 (≤ max_model_len) that fits. The layout follows from the TP: one pod per node, each with
the same number of GPUs (`layout`). Manual TP/chunk are validated, not trusted. An infeasible request
yields a Plan with feasible=False, the reason and alternatives (largest max_model_len per valid TP,
the TP that would fit, the nodes it needs).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from longserve.operator.catalog import GpuSpec, ModelEntry
from longserve.operator.memory import (
    GB,
    KV_BLOCK_SIZE,
    MemoryBreakdown,
    chunk_candidates,
    memory_breakdown,
    valid_tensor_parallel_sizes,
)
from longserve.operator.sizing_rules import MAX_TENSOR_PARALLEL_SIZE, MODES, OBJECTIVES, manual_sizing_errors
from longserve.server.config import RUNTIMES, EngineConfig


@dataclass(frozen=True, slots=True)
class SizingRequest:
    max_model_len: int
    max_num_seqs: int = 1
    objective: str = "MinGPUs"
    mode: str = "Auto"
    tensor_parallel_size: int | None = None
    prefill_chunk_tokens: int | None = None
    gpu_memory_utilization: float = 0.90
    safety_margin_percent: float = 10.0
    gpus_per_node: int = 8
    runtime: str = "native"
    memory_per_gpu_bytes: int | None = None
    nodes: int = 1

    def validate(self) -> list[str]:
        errors = []
        if self.max_model_len < KV_BLOCK_SIZE:
            errors.append(f"max_model_len must be >= {KV_BLOCK_SIZE}")
        if self.max_num_seqs < 1:
            errors.append("max_num_seqs must be >= 1")
        if self.objective not in OBJECTIVES:
            errors.append(f"objective must be one of {', '.join(OBJECTIVES)}")
        if self.mode not in MODES:
            errors.append(f"sizing mode must be one of {', '.join(MODES)}")
        if self.runtime not in RUNTIMES:
            errors.append(f"runtime must be one of {', '.join(RUNTIMES)}")
        if not 0.5 <= self.gpu_memory_utilization <= 0.98:
            errors.append("gpu_memory_utilization must be within [0.5, 0.98]")
        if not 0 <= self.safety_margin_percent <= 50:
            errors.append("safety_margin_percent must be within [0, 50]")
        if self.gpus_per_node < 1:
            errors.append("gpus_per_node must be >= 1")
        if self.nodes < 1:
            errors.append("nodes must be >= 1")
        if self.memory_per_gpu_bytes is not None and self.memory_per_gpu_bytes <= 0:
            errors.append("memory per GPU must be positive")
        errors += [message for _, message in manual_sizing_errors(
            self.mode, self.tensor_parallel_size, self.prefill_chunk_tokens, self.max_model_len)]
        return errors


def layout(tp: int, gpus_per_node: int) -> tuple[int, int] | None:
    """(pods per replica, GPUs per pod) for `tp` ranks on nodes of `gpus_per_node` GPUs: one pod per
    node, every pod with the same number of GPUs, as few pods as possible; None when no split works."""
    for pods in range(1, tp + 1):
        if tp % pods == 0 and tp // pods <= gpus_per_node:
            return pods, tp // pods
    return None


@dataclass(frozen=True, slots=True)
class Plan:
    feasible: bool
    reason: str
    model: str
    gpu: str
    runtime: str
    objective: str
    mode: str
    tensor_parallel_size: int | None
    prefill_chunk_tokens: int | None
    max_model_len: int
    max_num_seqs: int
    kv_capacity_tokens: int
    gpu_memory_utilization: float | None
    kv_bytes_per_token: int
    weight_bytes: int
    memory_per_gpu_bytes: int
    per_gpu_bytes: dict = field(default_factory=dict)
    total_bytes: int = 0
    explanation: str = ""
    alternatives: tuple = ()
    nodes: int = 1                      # nodes the request allows per replica
    pods_per_replica: int | None = None
    gpus_per_pod: int | None = None

    @property
    def multi_node(self) -> bool:
        return (self.pods_per_replica or 1) > 1

    def to_dict(self) -> dict:
        return {
            "feasible": self.feasible, "reason": self.reason, "model": self.model, "gpu": self.gpu,
            "runtime": self.runtime, "objective": self.objective, "mode": self.mode,
            "tensorParallelSize": self.tensor_parallel_size, "gpusPerReplica": self.tensor_parallel_size,
            "gpusPerPod": self.gpus_per_pod, "podsPerReplica": self.pods_per_replica, "nodes": self.nodes,
            "prefillChunkTokens": self.prefill_chunk_tokens, "maxModelLen": self.max_model_len,
            "maxNumSeqs": self.max_num_seqs, "kvCapacityTokens": self.kv_capacity_tokens,
            "gpuMemoryUtilization": self.gpu_memory_utilization,
            "kvBytesPerToken": self.kv_bytes_per_token, "weightBytes": self.weight_bytes,
            "memoryPerGpuBytes": self.memory_per_gpu_bytes, "perGpuBytes": dict(self.per_gpu_bytes),
            "totalBytes": self.total_bytes, "explanation": self.explanation,
            "alternatives": [dict(a) for a in self.alternatives],
        }


class _Ctx:
    """Everything fixed for one planning call."""

    def __init__(self, model: ModelEntry, gpu: GpuSpec | None, req: SizingRequest):
        self.model, self.gpu, self.req = model, gpu, req
        self.memory = float(req.memory_per_gpu_bytes or (gpu.memory_bytes if gpu else 0))
        self.margin = req.safety_margin_percent / 100

    def breakdown(self, tp: int, chunk: int, max_model_len: int | None = None) -> MemoryBreakdown:
        return memory_breakdown(self.model, tp, chunk, max_model_len or self.req.max_model_len,
                                self.req.max_num_seqs, self.req.runtime, self.memory,
                                self.req.gpu_memory_utilization, self.margin)

    def best_chunk(self, tp: int, max_model_len: int | None = None) -> tuple[int, MemoryBreakdown] | None:
        for chunk in chunk_candidates(max_model_len or self.req.max_model_len):
            bd = self.breakdown(tp, chunk, max_model_len)
            if bd.feasible:
                return chunk, bd
        return None

    def kv_capacity(self, tp: int, bd: MemoryBreakdown) -> int:
        """KV tokens the budget holds once everything else is placed (all that is left goes to KV)."""
        f = self.model.facts
        per_token = f.kv_bytes_per_token(self.model.dtype_bytes) / tp
        if self.req.runtime == "native":
            room = bd.budget - (bd.total - bd.kv)
        else:
            room = bd.budget / (1 + bd.margin) - (bd.pool(self.req.runtime) - bd.kv)
        tokens = int(max(room, 0) // per_token)
        return tokens // KV_BLOCK_SIZE * KV_BLOCK_SIZE

    def max_len_fitting(self, tp: int) -> tuple[int, int] | None:
        """Largest max_model_len (multiple of 16) that fits at `tp`, with its chunk."""
        limit = self.model.facts.max_position_embeddings
        lo, hi = 0, limit // KV_BLOCK_SIZE
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.best_chunk(tp, mid * KV_BLOCK_SIZE):
                lo = mid
            else:
                hi = mid - 1
        if lo == 0:
            return None
        n = lo * KV_BLOCK_SIZE
        return n, self.best_chunk(tp, n)[0]


def _gb(x: float) -> str:
    return f"{x / GB:.1f}"


def _describe(bd: MemoryBreakdown, runtime: str = "native") -> str:
    terms = (f"weights {_gb(bd.weights)}, KV {_gb(bd.kv)}, activations {_gb(bd.activations)}, "
             f"attention {_gb(bd.attention + bd.estimation)}, overhead {_gb(bd.overhead)}")
    if runtime == "native":
        return f"{_gb(bd.total)} of {_gb(bd.budget)} GB per GPU ({terms})"
    pool = bd.pool(runtime)
    return (f"{_gb(bd.total)} GB per GPU ({terms}), of which the {runtime} pool of {_gb(pool)} GB must fit "
            f"its {_gb(bd.budget)} GB fraction")


def _alternatives(ctx: _Ctx, all_tps: list[int]) -> list[dict]:
    alts = []
    for tp in all_tps:
        fit = ctx.best_chunk(tp)
        split = layout(tp, ctx.req.gpus_per_node)
        entry = {"tensorParallelSize": tp, "fitsRequestedLength": fit is not None,
                 "withinGpusPerNode": tp <= ctx.req.gpus_per_node,
                 "nodesNeeded": split[0] if split else None,
                 "withinNodes": split is not None and split[0] <= ctx.req.nodes}
        if fit:
            entry["prefillChunkTokens"] = fit[0]
        longest = ctx.max_len_fitting(tp)
        entry["maxModelLen"] = longest[0] if longest else 0
        if longest:
            entry["prefillChunkTokensAtMaxModelLen"] = longest[1]
        alts.append(entry)
    return alts


def plan(model: ModelEntry, gpu: GpuSpec | None, request: SizingRequest) -> Plan:
    """Size tensor parallelism and prefill chunk for `model` on `gpu` (pure, deterministic)."""
    f = model.facts
    ctx = _Ctx(model, gpu, request)
    base = dict(model=model.hf_id, gpu=gpu.name if gpu else "custom", runtime=request.runtime,
                objective=request.objective, mode=request.mode, max_model_len=request.max_model_len,
                max_num_seqs=request.max_num_seqs, kv_bytes_per_token=f.kv_bytes_per_token(model.dtype_bytes),
                weight_bytes=model.weight_bytes, memory_per_gpu_bytes=int(ctx.memory), nodes=request.nodes)

    def infeasible(reason: str, explanation: str, alternatives=()) -> Plan:
        return Plan(feasible=False, reason=reason, tensor_parallel_size=request.tensor_parallel_size,
                    prefill_chunk_tokens=request.prefill_chunk_tokens, kv_capacity_tokens=0,
                    gpu_memory_utilization=None, explanation=explanation,
                    alternatives=tuple(alternatives), **base)

    errors = request.validate()
    if ctx.memory <= 0:
        errors.append("the GPU memory is unknown: name a catalog GPU or set the memory per GPU")
    if request.max_model_len > f.max_position_embeddings:
        errors.append(f"max_model_len {request.max_model_len} exceeds the model's maximum "
                      f"{f.max_position_embeddings} (max_position_embeddings)")
    all_tps = valid_tensor_parallel_sizes(model, MAX_TENSOR_PARALLEL_SIZE)
    gpn, nodes = request.gpus_per_node, request.nodes
    placeable = [t for t in all_tps if (split := layout(t, gpn)) is not None and split[0] <= nodes]
    heads = f"{f.num_heads} attention heads and {f.num_kv_heads} KV heads"
    where = f"{gpn} GPUs per node" if nodes == 1 else f"{nodes} nodes × {gpn} GPUs"
    manual_tp = request.tensor_parallel_size
    if manual_tp is not None and manual_tp not in all_tps:
        errors.append(f"tensor parallel size {manual_tp} must divide both the {heads} "
                      f"of {model.short_name}; valid: {', '.join(map(str, all_tps))}")
    elif manual_tp is not None and manual_tp not in placeable:
        needs = layout(manual_tp, gpn)
        hint = f"; it needs {needs[0]} nodes of {needs[1]} GPUs (set nodes)" if needs else ""
        errors.append(f"tensor parallel size {manual_tp} exceeds the {where}{hint}"
                      if manual_tp > gpn * nodes or needs else
                      f"tensor parallel size {manual_tp} cannot be split evenly over nodes of {gpn} GPUs")
    if errors:
        return infeasible("InvalidSpec", "; ".join(errors))

    in_node = [t for t in placeable if t <= gpn]
    across = [t for t in placeable if t > gpn]
    if request.mode == "Manual":
        candidates = [manual_tp]
    elif request.objective == "MaxPrefillThroughput":
        candidates = list(reversed(in_node)) + across     # within a node first, then the fewest nodes
    else:
        candidates = in_node + across
    intro = f"TP candidates {','.join(map(str, candidates))} (divide {heads}, ≤ {where})."
    chosen = None
    for tp in candidates:
        if request.prefill_chunk_tokens is not None:
            bd = ctx.breakdown(tp, request.prefill_chunk_tokens)
            fit = (request.prefill_chunk_tokens, bd) if bd.feasible else None
        else:
            fit = ctx.best_chunk(tp)
        if fit:
            chosen = (tp, *fit)
            break
    if chosen is None:
        alts = _alternatives(ctx, all_tps)
        hints = []
        for a in alts:
            if a["fitsRequestedLength"]:
                if a["withinNodes"]:
                    needs = ""
                elif a["nodesNeeded"]:
                    needs = f" (needs {a['nodesNeeded']} nodes of {gpn} GPUs)"
                else:
                    needs = " (needs more GPUs per node)"
                hints.append(f"TP {a['tensorParallelSize']} fits{needs}")
            elif a["maxModelLen"]:
                hints.append(f"at TP {a['tensorParallelSize']} about {a['maxModelLen']:,} tokens fit")
        smallest = ctx.breakdown(candidates[0], chunk_candidates(request.max_model_len)[-1])
        explanation = (f"{intro} Nothing fits {request.max_model_len:,} tokens × {request.max_num_seqs} "
                       f"sequence(s) on {base['gpu']}: at TP {candidates[0]} the smallest chunk needs "
                       f"{_describe(smallest, request.runtime)}. Alternatives: {'; '.join(hints) or 'none'}.")
        return infeasible("Infeasible", explanation, alts)

    tp, chunk, bd = chosen
    pods, per_pod = layout(tp, gpn)
    why_chunk = ("the requested chunk" if request.prefill_chunk_tokens is not None
                 else "the largest chunk that fits")
    if request.mode == "Manual":
        why_tp = "the requested TP"
    elif tp > gpn:
        why_tp = "no TP within one node fits; the smallest across nodes"
    elif request.objective == "MinGPUs":
        why_tp = "the smallest TP that fits"
    else:
        why_tp = "the largest valid TP within one node" if across else "the largest valid TP"
    explanation = (f"{intro} TP={tp} ({why_tp}) fits with chunk {chunk} ({why_chunk}): "
                   f"{_describe(bd, request.runtime)}.")
    if pods == 1:
        explanation += f" Layout: one pod with {per_pod} GPU(s) per replica."
    else:
        explanation += (f" Layout: {pods} pods per replica (one per node) with {per_pod} GPUs each, "
                        f"a leader and {pods - 1} worker(s) in one LeaderWorkerSet group.")
    if request.runtime != "native":
        explanation += (f" {request.runtime} gets memory fraction {bd.fraction:.2f}: the DCA/sparse transients "
                        f"({_gb(bd.attention + bd.estimation)} GB) lie outside its profiled pool.")
    return Plan(feasible=True, reason="PlanComputed", tensor_parallel_size=tp, prefill_chunk_tokens=chunk,
                kv_capacity_tokens=ctx.kv_capacity(tp, bd), gpu_memory_utilization=round(bd.fraction, 2),
                per_gpu_bytes=bd.as_dict(), total_bytes=int(bd.total * tp), explanation=explanation,
                pods_per_replica=pods, gpus_per_pod=per_pod, **base)


def engine_config_for(p: Plan, *, model_path: str, served_model_name: str, max_output_tokens: int = 8192,
                      http_port: int = 8000, grpc_port: int = 50051, **overrides) -> EngineConfig:
    """The EngineConfig a feasible plan renders into the pod (docs/architecture.md#engine-config)."""
    if not p.feasible:
        raise ValueError(f"cannot build an engine config from an infeasible plan: {p.explanation}")
    cfg = EngineConfig(
        schema_version=1, runtime=p.runtime, model_path=model_path, served_model_name=served_model_name,
        tensor_parallel_size=p.tensor_parallel_size, max_model_len=p.max_model_len,
        max_num_seqs=p.max_num_seqs, max_output_tokens=min(max_output_tokens, p.max_model_len - 1),
        prefill_chunk_tokens=p.prefill_chunk_tokens, gpu_memory_utilization=p.gpu_memory_utilization,
        http_port=http_port, grpc_port=grpc_port)
    return replace(cfg, **overrides) if overrides else cfg
