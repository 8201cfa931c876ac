"""`longserve bench host`: host time of a decode step at a short and a million-token context, in one run.

The engine's own `ModelRunner` is built for the model's real shapes on the `meta` device (random-weight
construction, no data, no compute), with a KV cache sized for the contexts, so a sequence with a 1M-token history
costs nothing but its host state: its token list and the block manager's table. Each measured step is what the
engine does per decode step on the host: append the sampled token, grow the block table when a block fills,
build the step's metadata (`runner._metadata`), then run the model forward with `kernels.dispatch.tracing()`
(every layer's host code and the Triton wrappers, launches skipped). Device work is absent by construction, so
the figures are the host's share of a GPU step: `metadata` is the runner's per-step preparation, `step` the
whole forward's host time including it.

Target: the 1M-context figures within 2x of the short-context ones (host work independent of context length).
"""
from __future__ import annotations

import json
import statistics
import time

HELP = "host time per decode step (metadata + forward host code) at a short vs a 1M-token context"


def add_arguments(p) -> None:
    p.add_argument("--model", default="Qwen/Qwen2.5-7B-Instruct-1M",
                   help="catalog id or a config.json / checkpoint directory (shapes only; no weights are read)")
    p.add_argument("--contexts", default="1024,1010000",
                   help="comma-separated context lengths; the first is the reference for the ratios")
    p.add_argument("--batch", type=int, default=4, help="decoding sequences per step")
    p.add_argument("--steps", type=int, default=30, help="measured decode steps per context (after 3 warm-up)")
    p.add_argument("--layers", type=int, default=2,
                   help="decoder layers to build (default 2: every layer repeats the same host code; 0: all)")
    p.add_argument("-o", "--output", choices=["table", "json"], default="table")


def build_runner(facts, *, max_len: int, num_seqs: int, block_size: int = 16):
    """The engine's ModelRunner on the meta device for `facts`, with KV room for `num_seqs` x `max_len` tokens."""
    from longserve.server.config import SCHEMA_VERSION, EngineConfig
    from longserve.server.engine.model_runner import ModelRunner
    from longserve.server.hf_config import Checkpoint

    config = EngineConfig(schema_version=SCHEMA_VERSION, runtime="native", model_path="bench-host",
                          served_model_name="bench-host", tensor_parallel_size=1, max_model_len=max_len,
                          max_num_seqs=num_seqs, max_output_tokens=max_len - 1, prefill_chunk_tokens=block_size * 8,
                          gpu_memory_utilization=0.9, kv_block_size=block_size,
                          kv_capacity_tokens=num_seqs * (max_len + block_size), load_format="dummy",
                          sparse_prefill=False)
    return ModelRunner(config, Checkpoint(path="bench-host", facts=facts, config={}), device="meta")


def _decoding_sequences(blocks, context: int, batch: int):
    """`batch` sequences with a `context`-token history whose KV is (notionally) cached, each about to decode."""
    from longserve.server.engine.sequence import Sequence
    from longserve.server.sampling import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=1 << 30, ignore_eos=True)
    seqs = []
    for i in range(batch):
        seq = Sequence(f"host-{i}", 0, [(7 * t + i) % 1000 + 3 for t in range(context - 1)], params, 1 << 30)
        seq.output_token_ids.append(5)
        blocks.grow(seq, context)
        seq.num_computed_tokens = context - 1
        seqs.append(seq)
    return seqs


def measure_contexts(runner, contexts: list[int], *, batch: int, steps: int, warmup: int = 3) -> list[dict]:
    """Median host milliseconds per decode step at each context: the runner's metadata, and the whole step's host
    time (metadata + the forward's host code), on the meta device. The main figures are the Python thread's CPU
    time (a shared machine's scheduling gaps left out); wall-clock medians are kept beside them. Steps alternate
    between the contexts so that load on the machine weighs on every context alike."""
    import torch

    from longserve.kernels import dispatch
    from longserve.server.engine.block_manager import BlockManager
    from longserve.server.engine.scheduler import ScheduledBatch, ScheduledChunk

    blocks = BlockManager(runner.num_kv_blocks, runner.config.kv_block_size)
    groups = [_decoding_sequences(blocks, n, batch) for n in contexts]
    times = [{"metadataMs": [], "stepMs": [], "metadataWallMs": [], "stepWallMs": []} for _ in contexts]
    try:
        for i in range(warmup + steps):
            for seqs, record in zip(groups, times):
                w0, t0 = time.perf_counter(), time.thread_time()
                for seq in seqs:                               # what the scheduler does for a decode
                    blocks.grow(seq, seq.num_tokens)
                step = ScheduledBatch([ScheduledChunk(s, s.num_tokens - 1, 1) for s in seqs])
                ids, meta = runner._metadata(step)
                w1, t1 = time.perf_counter(), time.thread_time()
                with dispatch.tracing(), torch.inference_mode():
                    runner.model.logits(runner.model(ids, _backend(runner, meta)))
                w2, t2 = time.perf_counter(), time.thread_time()
                for seq in seqs:                               # commit + the sampled token
                    seq.num_computed_tokens = seq.num_tokens
                    seq.output_token_ids.append(5 + i % 7)
                if i >= warmup:
                    for key, value in (("metadataMs", t1 - t0), ("stepMs", t2 - t0),
                                       ("metadataWallMs", w1 - w0), ("stepWallMs", w2 - w0)):
                        record[key].append(value * 1e3)
    finally:
        for seq in (s for seqs in groups for s in seqs):
            blocks.free(seq)
            runner.release(seq)
    return [{"context": n, **{k: statistics.median(v) for k, v in record.items()}}
            for n, record in zip(contexts, times)]


def _backend(runner, meta):
    from longserve.server.layers.attention import PagedDCABackend
    return PagedDCABackend(runner.cache, meta, runner.dca, None)


def measure(model_ref: str, contexts: list[int], *, batch: int = 4, steps: int = 30, layers: int | None = None) -> dict:
    from dataclasses import replace

    from longserve.operator.models import resolve_model

    if not contexts or min(contexts) < 2:
        raise ValueError("--contexts needs lengths >= 2")
    if batch < 1 or steps < 1:
        raise ValueError("--batch and --steps must be >= 1")
    facts = resolve_model(model_ref).facts
    if layers:
        facts = replace(facts, num_layers=layers)
    max_len = max(contexts) + steps + 8
    facts = replace(facts, max_position_embeddings=max(facts.max_position_embeddings, max_len))
    runner = build_runner(facts, max_len=max_len, num_seqs=batch * len(contexts))
    rows = measure_contexts(runner, contexts, batch=batch, steps=steps)
    ref = rows[0]
    for row in rows:
        for key in ("metadataMs", "stepMs"):             # ratios of the CPU-time medians
            row[key.replace("Ms", "Ratio")] = row[key] / ref[key]
    return {"model": model_ref, "layers": facts.num_layers, "batch": batch, "steps": steps, "rows": rows}


def table(result: dict) -> str:
    lines = [f"decode host time per step: {result['model']} ({result['layers']} layers), batch {result['batch']}, "
             f"median thread CPU time of {result['steps']} steps (wall-clock median in brackets); ratios against "
             "the first context",
             f"{'context':>10} {'metadata ms':>20} {'ratio':>6} {'step host ms':>20} {'ratio':>6}"]
    for r in result["rows"]:
        metadata = f"{r['metadataMs']:.3f} ({r['metadataWallMs']:.3f})"
        step = f"{r['stepMs']:.2f} ({r['stepWallMs']:.2f})"
        lines.append(f"{r['context']:>10} {metadata:>20} {r['metadataRatio']:>5.2f}x {step:>20} "
                     f"{r['stepRatio']:>5.2f}x")
    lines.append("metadata: runner._metadata; step host: metadata + the forward's host code (Triton wrappers without "
                 "launches). Meta device: host work only; a meta op costs more host time than a GPU launch.")
    return "\n".join(lines)


def run(args) -> int:
    contexts = [int(x) for x in args.contexts.split(",") if x.strip()]
    result = measure(args.model, contexts, batch=args.batch, steps=args.steps, layers=args.layers)
    print(json.dumps(result, indent=2) if args.output == "json" else table(result))
    return 0
