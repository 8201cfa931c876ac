"""`longserve bench memory`: the engine's real prefill and decode traced at full model scale on a CPU, against the
memory model the planner and the engine size with.

The planner plans the model on the GPU (TP from the plan or `--tp`); the bench then builds the engine's own
`ModelRunner` as rank 0 of a TP replica (the sharded model: its query heads, KV heads, MLP columns and vocabulary
rows; collectives stand in without communication; random-weight construction on the `meta` device: real shapes,
no data, no compute) and drives the engine's scheduler through an N-token prompt
chunk by chunk, then one decode step. Every step runs the runner's metadata, the model forward, the paged
attention backend and the kernels' host code (`kernels.dispatch.tracing()`: the Triton path, launches replaced by
their output allocations) under `bench.trace.trace()`, which counts the live bytes of every tensor created in the
step. Reported per GPU: the measured peak of live transient bytes by component beside the memory model's terms
(`server.memory_model`), and whether weights + KV + measured peak + overhead fit the planner's budget.

Sparse prefill uses uniform per-head budgets (vertical 1000, slash 6096: the base pattern of Qwen's configs;
`--vertical/--slash` change them, and the memory model is evaluated with the same budgets): the largest budgets
size the kernel's padded index lists, GBs at 1M tokens. `--chunks last` traces only the prompt's last two chunks
(the final one, with the largest context, and the last full-size one; between them they hold every transient's
peak) and the decode step, running the earlier chunks' scheduling and metadata untraced. `--layers` traces
fewer decoder layers (each layer frees its temporaries, so one layer shows the same peak). `--sweep` prints the
estimation component at 64K..1M tokens; `--lengths` with `--modes` prints one row per length and mode (the
memory table of bench/RESULTS.md).
A host synchronisation on the traced path cannot produce a value on meta tensors: the bench stops and names
the call site (a finding, not a bench failure mode to work around).
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time

HELP = "trace the engine's real prefill/decode on meta tensors at full scale; peak transient memory vs the plan"
SWEEP_TOKENS = (65536, 131072, 262144, 524288, 1_010_000)
COMPONENTS = ("activations", "attention", "estimation", "index", "metadata")


def add_arguments(p) -> None:
    p.add_argument("--model", required=True, help="Qwen/Qwen2.5-7B-Instruct-1M, Qwen/Qwen2.5-14B-Instruct-1M, "
                                                  "or a config.json / checkpoint directory")
    p.add_argument("--gpu", required=True, help="catalog GPU, e.g. H200-141GB, H100-80GB")
    p.add_argument("--prompt-tokens", type=int, help="prompt length N (default: the model's maximum)")
    p.add_argument("--prefill-chunk-tokens", type=int, help="prefill chunk (default: the planner's)")
    p.add_argument("--tp", type=int, help="tensor parallel size (default: the planner's)")
    p.add_argument("--dense", action="store_true", help="dense prefill (default: sparse above the threshold)")
    p.add_argument("--vertical", type=int, default=1000, help="vertical budget per head (sparse)")
    p.add_argument("--slash", type=int, default=6096, help="slash budget per head (sparse)")
    p.add_argument("--chunks", choices=["all", "last"], default="all",
                   help="trace every prefill chunk, or only the last (largest context) one")
    p.add_argument("--layers", type=int, help="trace this many decoder layers (default: all)")
    p.add_argument("--sweep", action="store_true",
                   help="estimation (and total) peak at 64K, 128K, 256K, 512K, 1M tokens (last chunk, one layer)")
    p.add_argument("--lengths", help="comma-separated prompt lengths: one row per length and mode (a grid)")
    p.add_argument("--modes", default="sparse,dense", help="with --lengths: sparse, dense or both (default)")
    p.add_argument("-o", "--output", choices=["table", "json"], default="table")


# --- building the meta runner ----------------------------------------------------------------------------------------

class MetaRankGroup:
    """Rank 0 of a `size`-way tensor-parallel group for meta tensors, standing in for `parallel.group.TPGroup`:
    the collectives keep their shapes and allocations (the all-reduce works in place, the logits gather
    concatenates `size` parts) and communicate nothing."""

    def __init__(self, size: int):
        self.rank, self.size = 0, size

    def all_reduce(self, x):
        return x

    def gather_last_dim(self, x):
        import torch
        parts = [torch.empty_like(x) for _ in range(self.size)]
        return torch.cat(parts, dim=-1)

    def min_int(self, value: int) -> int:
        return value


def write_config(facts, directory: str) -> str:
    """A Hugging Face config.json for `facts` (what server/hf_config.py reads); no weights, no tokenizer."""
    cfg = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "num_hidden_layers": facts.num_layers,
           "hidden_size": facts.hidden_size, "intermediate_size": facts.intermediate_size,
           "num_attention_heads": facts.num_heads, "num_key_value_heads": facts.num_kv_heads,
           "head_dim": facts.head_dim, "vocab_size": facts.vocab_size,
           "tie_word_embeddings": facts.tie_word_embeddings, "rope_theta": facts.rope_theta,
           "max_position_embeddings": facts.max_position_embeddings, "rms_norm_eps": facts.rms_norm_eps,
           "torch_dtype": facts.torch_dtype, "attention_bias": facts.qkv_bias}
    if facts.has_dca:
        cfg["dual_chunk_attention_config"] = {
            "chunk_size": facts.dca_chunk_size, "local_size": facts.dca_local_size,
            "original_max_position_embeddings": facts.dca_original_max_position_embeddings}
        if facts.sparse_attention_threshold is not None:
            cfg["dual_chunk_attention_config"]["sparse_attention_threshold"] = facts.sparse_attention_threshold
    with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as fh:
        json.dump(cfg, fh, indent=2)
    return directory


def build_meta_runner(facts, *, tp: int, prompt_tokens: int, chunk: int, dense: bool, vertical: int, slash: int,
                      directory: str, layers: int | None = None):
    """The engine's ModelRunner on the meta device as rank 0 of a `tp`-way replica (its shard of the sharded
    model, its KV heads), with KV room for the prompt and one decode token, and sparse budgets for its heads
    unless `dense`. `layers` keeps only that many decoder layers."""
    from dataclasses import replace

    from longserve.kernels import SparseHeadBudgets
    from longserve.server.config import SCHEMA_VERSION, EngineConfig
    from longserve.server.engine.model_runner import ModelRunner
    from longserve.server.hf_config import load_checkpoint

    if tp < 1 or facts.num_heads % tp or facts.num_kv_heads % tp or facts.intermediate_size % tp:
        raise ValueError(f"tp {tp} must divide the {facts.num_heads} heads, {facts.num_kv_heads} KV heads and "
                         f"the MLP width {facts.intermediate_size}")
    checkpoint = load_checkpoint(write_config(replace(facts, num_layers=layers or facts.num_layers), directory))
    max_len = prompt_tokens + 1
    config = EngineConfig(schema_version=SCHEMA_VERSION, runtime="native", model_path=directory,
                          served_model_name="bench-memory", tensor_parallel_size=tp, max_model_len=max_len,
                          max_num_seqs=1, max_output_tokens=1, prefill_chunk_tokens=chunk,
                          gpu_memory_utilization=0.9, kv_capacity_tokens=max_len + 16, load_format="dummy",
                          sparse_prefill=not dense)
    runner = ModelRunner(config, checkpoint, device="meta", tp=MetaRankGroup(tp) if tp > 1 else None)
    if not dense and facts.has_dca:
        from longserve.server import memory_model as mm
        threshold = facts.sparse_attention_threshold or mm.DEFAULT_SPARSE_THRESHOLD
        budgets = SparseHeadBudgets.uniform(facts.num_heads // tp, vertical, slash, threshold=threshold,
                                            last_q=config.sparse_last_q)
        runner.set_sparse(lambda layer: budgets)
    return runner


# --- tracing ---------------------------------------------------------------------------------------------------------

def trace_request(runner, prompt_tokens: int, chunk: int, *, chunks: str = "all") -> dict:
    """Drive the engine's scheduler through the prompt and one decode step, tracing each step's forward.

    Returns the peak over the traced steps: total, by component at the peak, each component's own peak, the step
    where the peak happened, the largest allocations and the host syncs seen."""
    from longserve.bench.trace import trace
    from longserve.kernels import dispatch
    from longserve.server.engine.block_manager import BlockManager
    from longserve.server.engine.scheduler import Scheduler
    from longserve.server.engine.sequence import Sequence
    from longserve.server.sampling import SamplingParams

    blocks = BlockManager(runner.num_kv_blocks, runner.config.kv_block_size)
    scheduler = Scheduler(blocks, max_num_seqs=1, max_num_batched_tokens=chunk)
    seq = Sequence("bench-memory", 0, [0] * prompt_tokens, SamplingParams(max_tokens=1), max_tokens=1)
    scheduler.add(seq)
    result = {"peak": 0, "components": {}, "own": {}, "step": None, "largest": [], "syncs": {}, "steps": []}
    while True:
        batch = scheduler.schedule()
        if batch.is_empty:
            break
        decoding = bool(seq.output_token_ids)
        start, end = seq.num_computed_tokens, seq.num_computed_tokens + batch.num_tokens
        if decoding or end >= prompt_tokens - chunk or chunks == "all":
            name = "decode" if decoding else f"prefill [{start}, {end})"
            started = time.monotonic()
            with dispatch.tracing(), trace() as t:
                runner.forward_logits(batch)
            _merge(result, t.report, name)
            result["steps"].append({"step": name, "tokens": batch.num_tokens, "context": end,
                                    "decode": decoding, "peakBytes": t.report.peak_bytes,
                                    "seconds": round(time.monotonic() - started, 2)})
        else:
            with dispatch.tracing():
                runner._metadata(batch)            # keep the runner's per-sequence metadata state in step
        scheduler.commit(batch)
        if decoding:
            break
        if seq.num_computed_tokens == prompt_tokens:
            seq.output_token_ids.append(0)        # the sampled token (sampling itself is not traced)
    return result


def _merge(result: dict, report, name: str) -> None:
    for k, v in report.component_peaks.items():
        result["own"][k] = max(result["own"].get(k, 0), v)
    for kind, count in report.syncs.items():
        result["syncs"][kind] = result["syncs"].get(kind, 0) + count
    if report.peak_bytes > result["peak"]:
        result["peak"] = report.peak_bytes
        result["components"] = dict(report.peak_by_component)
        result["step"] = name
        result["largest"] = [{"bytes": b, "component": c, "site": s, "shape": list(shape)}
                             for b, c, s, shape in report.largest[:6]]


# --- one measurement -------------------------------------------------------------------------------------------------

def measure(model_ref: str, gpu_name: str, *, prompt_tokens: int | None = None, chunk: int | None = None,
            tp: int | None = None, dense: bool = False, vertical: int = 1000, slash: int = 6096,
            chunks: str = "all", layers: int | None = None) -> dict:
    """Plan, trace and compare; the JSON-ready result (see the module docstring)."""
    from longserve.operator.catalog import lookup_gpu
    from longserve.operator.models import resolve_model
    from longserve.operator.planner import SizingRequest, plan
    from longserve.server import memory_model as mm

    entry = resolve_model(model_ref)
    gpu = lookup_gpu(gpu_name)
    facts = entry.facts
    n = prompt_tokens or facts.max_position_embeddings
    if n < 2:
        raise ValueError("--prompt-tokens must be >= 2")
    manual = tp is not None
    request = SizingRequest(max_model_len=n, mode="Manual" if manual else "Auto", tensor_parallel_size=tp,
                            prefill_chunk_tokens=chunk if manual else None)
    p = plan(entry, gpu, request)
    if not p.feasible and not (chunk and tp):
        raise ValueError(f"the planner finds no plan: {p.explanation}")
    tp = tp or p.tensor_parallel_size
    chunk = chunk or p.prefill_chunk_tokens or mm.chunk_candidates(n)[-1]
    chunk = min(chunk, n)
    shapes = mm.rank_shapes(facts, tp, dtype_bytes=entry.dtype_bytes, sparse=not dense,
                            sparse_budgets=mm.sparse_budget_maxima([{"0": ["vertical_and_slash", vertical, slash]}]))
    planned = mm.step_transients(shapes, chunk, n, 1)
    weights = entry.weight_bytes / tp
    kv = mm.kv_bytes(shapes, n)
    overhead = mm.overhead_bytes(weights)
    budget = mm.native_sizing(facts, tp=tp, chunk=chunk, max_model_len=n, max_num_seqs=1,
                              memory_per_gpu=gpu.memory_bytes, utilization=request.gpu_memory_utilization,
                              margin=request.safety_margin_percent / 100, dtype_bytes=entry.dtype_bytes,
                              weights=weights, sparse=not dense).budget
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="longserve-bench-memory-") as tmp:
        runner = build_meta_runner(facts, tp=tp, prompt_tokens=n, chunk=chunk, dense=dense, vertical=vertical,
                                   slash=slash, directory=tmp, layers=layers)
        traced = trace_request(runner, n, chunk, chunks=chunks)
    peak = traced["peak"]
    per_step = [mm.decode_transients(shapes, 1, st["context"]) if st["decode"]
                else mm.prefill_transients(shapes, st["tokens"], st["context"], n) for st in traced["steps"]]
    predicted = max(per_step, key=lambda t: t.peak)
    for st, model in zip(traced["steps"], per_step):
        st["predictedBytes"] = int(model.peak)
    return {
        "model": entry.hf_id, "gpu": gpu.name, "tp": tp, "chunk": chunk, "prompt": n,
        "mode": "dense" if dense else "sparse", "layersTraced": layers or facts.num_layers, "chunksTraced": chunks,
        "peakTransientBytes": int(peak), "planTransientBytes": int(planned.peak),
        "predictedTransientBytes": int(predicted.peak),
        "ratio": round(peak / planned.peak, 4) if planned.peak else None,
        "predictedRatio": round(peak / predicted.peak, 4) if predicted.peak else None,
        "peakStep": traced["step"], "planPhase": planned.phase, "predictedPhase": predicted.phase,
        "weightsBytes": int(weights), "kvBytes": int(kv), "overheadBytes": int(overhead), "budgetBytes": int(budget),
        "fits": bool(weights + kv + peak + overhead <= budget),
        "components": {c: {"measured": int(traced["components"].get(c, 0)),
                           "predicted": int(predicted.components[c]), "planned": int(planned.components[c]),
                           "measuredOwnPeak": int(traced["own"].get(c, 0)),
                           "predictedOwnPeak": int(predicted.own[c]), "plannedOwnPeak": int(planned.own[c])}
                       for c in COMPONENTS},
        "otherBytes": int(sum(v for k, v in traced["components"].items() if k not in COMPONENTS)),
        "planner": {"tensorParallelSize": p.tensor_parallel_size, "prefillChunkTokens": p.prefill_chunk_tokens,
                    "perGpuBytes": p.per_gpu_bytes, "feasible": p.feasible},
        "largest": traced["largest"], "syncs": traced["syncs"], "steps": traced["steps"],
        "seconds": round(time.monotonic() - started, 1),
    }


def sweep(model_ref: str, gpu_name: str, *, dense: bool = False, tp: int | None = None, chunk: int | None = None,
          tokens=SWEEP_TOKENS) -> list[dict]:
    """The last chunk at each length, one decoder layer: the estimation component should grow linearly."""
    rows = []
    for n in tokens:
        r = measure(model_ref, gpu_name, prompt_tokens=n, dense=dense, tp=tp, chunk=chunk, chunks="last", layers=1)
        est = r["components"]["estimation"]
        rows.append({"prompt": n, "tp": r["tp"], "chunk": r["chunk"],
                     "estimationBytes": est["measuredOwnPeak"], "estimationPlannedBytes": est["plannedOwnPeak"],
                     "indexBytes": r["components"]["index"]["measuredOwnPeak"],
                     "peakTransientBytes": r["peakTransientBytes"], "planTransientBytes": r["planTransientBytes"],
                     "predictedTransientBytes": r["predictedTransientBytes"]})
    return rows


def grid(model_ref: str, gpu_name: str, lengths, modes, **kw) -> list[dict]:
    """One full measurement per (length, mode): the rows of the RESULTS memory table."""
    return [measure(model_ref, gpu_name, prompt_tokens=n, dense=mode == "dense", **kw)
            for n in lengths for mode in modes]


# --- CLI -------------------------------------------------------------------------------------------------------------

def _gb(x) -> str:
    return f"{x / 1e9:.2f}"


def table(r: dict) -> str:
    lines = [(f"{r['model']} on {r['gpu']}: TP {r['tp']}, chunk {r['chunk']:,}, prompt {r['prompt']:,} tokens, "
              f"{r['mode']} ({r['layersTraced']} layers, {r['chunksTraced']} chunks traced, {r['seconds']} s)"),
             "GB per GPU    -------- at the peak --------   ----- each component's own peak -----",
             (f"{'component':<12} {'measured':>9} {'predicted':>9} {'planned':>8}   {'measured':>9} {'predicted':>9} "
              f"{'planned':>8}")]
    for c, v in r["components"].items():
        lines.append(f"{c:<12} {_gb(v['measured']):>9} {_gb(v['predicted']):>9} {_gb(v['planned']):>8}   "
                     f"{_gb(v['measuredOwnPeak']):>9} {_gb(v['predictedOwnPeak']):>9} {_gb(v['plannedOwnPeak']):>8}")
    lines.append(f"{'peak':<12} {_gb(r['peakTransientBytes']):>9} {_gb(r['predictedTransientBytes']):>9} "
                 f"{_gb(r['planTransientBytes']):>8}   measured/planned {r['ratio']} (measured at {r['peakStep']}; "
                 f"planned phase {r['planPhase']})")
    lines.append(f"weights {_gb(r['weightsBytes'])} + KV {_gb(r['kvBytes'])} + peak {_gb(r['peakTransientBytes'])} "
                 f"+ overhead {_gb(r['overheadBytes'])} vs budget {_gb(r['budgetBytes'])} GB: "
                 f"{'fits' if r['fits'] else 'DOES NOT FIT'}")
    if r["syncs"]:
        lines.append(f"host syncs: {r['syncs']}")
    return "\n".join(lines)


def sweep_table(rows: list[dict]) -> str:
    lines = [(f"{'prompt':>10} {'TP':>3} {'chunk':>7} {'estimation GB':>14} {'planned':>8} {'index GB':>9} "
              f"{'peak GB':>8} {'predicted':>9} {'planned':>8}")]
    for r in rows:
        lines.append(f"{r['prompt']:>10,} {r['tp']:>3} {r['chunk']:>7} {_gb(r['estimationBytes']):>14} "
                     f"{_gb(r['estimationPlannedBytes']):>8} {_gb(r['indexBytes']):>9} "
                     f"{_gb(r['peakTransientBytes']):>8} {_gb(r['predictedTransientBytes']):>9} "
                     f"{_gb(r['planTransientBytes']):>8}")
    return "\n".join(lines)


def grid_table(rows: list[dict]) -> str:
    """Markdown rows: the RESULTS.md memory table."""
    lines = [("| model | GPU | TP | chunk | prompt | mode | measured peak GB | predicted GB | planned GB | "
              "measured/planned | KV GB | weights + KV + peak + overhead / budget GB | fits |"),
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        need = r["weightsBytes"] + r["kvBytes"] + r["peakTransientBytes"] + r["overheadBytes"]
        lines.append(f"| {r['model'].rsplit('/', 1)[-1]} | {r['gpu']} | {r['tp']} | {r['chunk']:,} | "
                     f"{r['prompt']:,} | {r['mode']} | {_gb(r['peakTransientBytes'])} | "
                     f"{_gb(r['predictedTransientBytes'])} | {_gb(r['planTransientBytes'])} | {r['ratio']:.3f} | "
                     f"{_gb(r['kvBytes'])} | {_gb(need)} / {_gb(r['budgetBytes'])} | "
                     f"{'yes' if r['fits'] else 'NO'} |")
    return "\n".join(lines)


def run(args) -> int:
    from longserve.bench.trace import HostSyncInTrace
    try:
        if args.sweep:
            rows = sweep(args.model, args.gpu, dense=args.dense, tp=args.tp, chunk=args.prefill_chunk_tokens)
            print(json.dumps(rows, indent=2) if args.output == "json" else sweep_table(rows))
            return 0
        if args.lengths:
            lengths = [int(x) for x in args.lengths.split(",") if x.strip()]
            modes = [m.strip() for m in args.modes.split(",") if m.strip()]
            if not lengths or any(m not in ("sparse", "dense") for m in modes) or not modes:
                raise ValueError("--lengths needs integers and --modes sparse and/or dense")
            rows = grid(args.model, args.gpu, lengths, modes, chunk=args.prefill_chunk_tokens, tp=args.tp,
                        vertical=args.vertical, slash=args.slash, chunks=args.chunks, layers=args.layers)
            print(json.dumps(rows, indent=2) if args.output == "json" else grid_table(rows))
            return 0 if all(r["fits"] for r in rows) else 1
        result = measure(args.model, args.gpu, prompt_tokens=args.prompt_tokens, chunk=args.prefill_chunk_tokens,
                         tp=args.tp, dense=args.dense, vertical=args.vertical, slash=args.slash,
                         chunks=args.chunks, layers=args.layers)
    except HostSyncInTrace as exc:
        print(f"longserve bench memory: the traced path synchronises with the host: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:
        print(f"longserve bench memory: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2) if args.output == "json" else table(result))
    return 0 if result["fits"] else 1
