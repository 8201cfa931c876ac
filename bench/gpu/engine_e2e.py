"""End-to-end engine run for a lent GPU: Qwen2.5-7B-Instruct-1M shapes with random weights (no checkpoint).

Measures, through the real engine (scheduler, paged KV cache, DCA, sparse prefill, sampler):
  * time to first token, dense vs sparse prefill, at 128K, 512K and 1M prompt tokens;
  * peak GPU memory (`torch.cuda.max_memory_allocated`) beside the planner's per-GPU terms for the same
    model, chunk and context (`longserve.operator.memory`): weights + KV measured after start-up, and the
    transient peak of each prompt against the planned activations + attention + estimation;
  * decode ms/token after every prompt, i.e. at 128K, 512K and 1M context (decode is always dense).
The engine gets `load_format="dummy"`: seeded random weights made on the GPU, a config.json written from the
built-in catalog, a small byte-level tokenizer and a sparse config with one budget for every head.

A wall-clock budget (default 420 s) is checked before every measurement, using the previous prompt's time
scaled to the next length, and between engine steps; what does not fit is skipped and listed. The table is
printed, and JSON written to --out. `--smoke` runs a tiny model on the CPU in seconds (the test suite does).
Run by path from the repository root: `PYTHONSAFEPATH=1 python bench/gpu/engine_e2e.py --out FILE`.
"""
from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import random
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass

# Seconds per decode token assumed when deciding whether a decode measurement fits (generous for 1M on one GPU).
DECODE_GUESS_S = 0.2
# Growth of prefill time with length, used to predict the next prompt from the last: attention dominates
# dense prefill (quadratic); sparse prefill grows more slowly (estimation still scans the whole context).
GROWTH_EXPONENT = {"dense": 2.0, "sparse": 1.6}


@dataclass(frozen=True)
class Setup:
    facts: object                  # longserve.server.config.ModelFacts
    device: str
    dtype: str
    lengths: tuple[int, ...]
    chunk: int
    max_model_len: int
    decode_tokens: int
    warmup_tokens: int
    sparse_threshold: int
    vs_budget: tuple[int, int]     # (vertical, slash) for every head
    memory_per_gpu: int
    plan: dict


def smoke_setup(args) -> Setup:
    from longserve.server.config import ModelFacts
    facts = ModelFacts(num_layers=2, hidden_size=64, intermediate_size=128, num_heads=4, num_kv_heads=2, head_dim=16,
                       vocab_size=1000, tie_word_embeddings=False, rope_theta=10000.0, max_position_embeddings=4096,
                       rms_norm_eps=1e-5, dca_chunk_size=64, dca_local_size=16,
                       dca_original_max_position_embeddings=64, sparse_attention_threshold=64)
    return Setup(facts, "cpu", "float32", args.lengths or (96, 200, 320), 64, 4096, args.decode_tokens or 4, 80, 64,
                 (8, 16), 2**30, {})


def full_setup(args) -> Setup:
    import torch

    from longserve.operator.catalog import lookup_model
    from longserve.operator.planner import SizingRequest, plan
    entry = lookup_model("Qwen/Qwen2.5-7B-Instruct-1M")
    total = torch.cuda.mem_get_info()[1]
    p = plan(entry, None, SizingRequest(max_model_len=entry.facts.max_position_embeddings,
                                        memory_per_gpu_bytes=total))
    chunk = args.chunk or p.prefill_chunk_tokens or 131072
    # one budget for every head: the most common entry of the published Qwen2.5-1M sparse configs
    return Setup(entry.facts, "cuda", "bfloat16", args.lengths or (131072, 524288, 1_000_000), chunk,
                 entry.facts.max_position_embeddings, args.decode_tokens or 32, 40960, 32768, (1000, 6096), total,
                 {"tensorParallelSize": p.tensor_parallel_size, "prefillChunkTokens": p.prefill_chunk_tokens,
                  "feasible": p.feasible, "explanation": p.explanation})


def write_checkpoint(directory: str, s: Setup) -> str:
    """config.json (from ModelFacts), generation_config.json, tokenizer files and sparse_attention_config.json."""
    from longserve.server.tiny_checkpoint import build_tokenizer
    f = s.facts
    config = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": f.hidden_size,
              "intermediate_size": f.intermediate_size, "num_hidden_layers": f.num_layers,
              "num_attention_heads": f.num_heads, "num_key_value_heads": f.num_kv_heads, "head_dim": f.head_dim,
              "vocab_size": f.vocab_size, "tie_word_embeddings": f.tie_word_embeddings, "rope_theta": f.rope_theta,
              "max_position_embeddings": f.max_position_embeddings, "rms_norm_eps": f.rms_norm_eps,
              "torch_dtype": s.dtype, "eos_token_id": 2,
              "dual_chunk_attention_config": {
                  "chunk_size": f.dca_chunk_size, "local_size": f.dca_local_size,
                  "original_max_position_embeddings": f.dca_original_max_position_embeddings,
                  "sparse_attention_threshold": s.sparse_threshold}}
    os.makedirs(directory, exist_ok=True)
    build_tokenizer(directory, 1000)
    files = {"config.json": config, "generation_config.json": {"eos_token_id": [2]},
             "sparse_attention_config.json": [{str(h): ["vertical_and_slash", *s.vs_budget, 0.9]
                                               for h in range(f.num_heads)} for _ in range(f.num_layers)]}
    for name, data in files.items():
        with open(os.path.join(directory, name), "w", encoding="utf-8") as fh:
            json.dump(data, fh)
    return directory


def planned_terms(s: Setup, context: int) -> dict:
    """The planner's per-GPU terms (bytes, TP 1, native) for this chunk, the engine's KV capacity and `context`."""
    from longserve.operator.catalog import ModelEntry
    from longserve.operator.memory import memory_breakdown
    dtype_bytes = 4 if s.dtype == "float32" else 2
    entry = ModelEntry(hf_id="engine-e2e", facts=s.facts, weight_bytes=s.facts.num_parameters() * dtype_bytes,
                       dtype_bytes=dtype_bytes)
    kv_tokens = kv_capacity(s)
    at_context = memory_breakdown(entry, 1, s.chunk, context, 1, "native", s.memory_per_gpu, 0.9, 0.1)
    kv = memory_breakdown(entry, 1, s.chunk, kv_tokens, 1, "native", s.memory_per_gpu, 0.9, 0.1).kv
    terms = {k: int(getattr(at_context, k)) for k in ("weights", "activations", "attention", "estimation",
                                                      "overhead")}
    terms["kv"] = int(kv)
    terms["transient"] = terms["activations"] + terms["attention"] + terms["estimation"]
    return terms


def kv_capacity(s: Setup) -> int:
    return -(-(max(s.lengths) + s.decode_tokens + 16) // 16) * 16


class Budget:
    def __init__(self, seconds: float):
        self.start, self.seconds = time.monotonic(), seconds

    def left(self) -> float:
        return self.seconds - (time.monotonic() - self.start)


class Runner:
    """Builds engines on demand (one per attention mode) and measures prompts on them."""

    def __init__(self, s: Setup, checkpoint: str, budget: Budget, log):
        self.s, self.checkpoint, self.budget, self.log = s, checkpoint, budget, log
        self.engine, self.mode, self.baseline, self.build_seconds = None, None, 0, {}
        self.seed = 0

    def _config(self, sparse: bool):
        from longserve.server.config import EngineConfig
        s = self.s
        return EngineConfig(schema_version=1, runtime="native", model_path=self.checkpoint,
                            served_model_name="qwen2.5-7b-1m-random", tensor_parallel_size=1,
                            max_model_len=s.max_model_len, max_num_seqs=1, max_output_tokens=s.decode_tokens + 1,
                            prefill_chunk_tokens=s.chunk, gpu_memory_utilization=0.9,
                            kv_capacity_tokens=kv_capacity(s), dtype=s.dtype, load_format="dummy",
                            sparse_prefill=sparse)

    def release(self) -> None:
        import torch
        self.engine, self.mode = None, None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def engine_for(self, mode: str):
        import torch

        from longserve.server.engine.llm_engine import LLMEngine
        if self.mode == mode:
            return self.engine
        self.release()
        t0 = time.monotonic()
        self.engine = LLMEngine(self._config(mode == "sparse"), device=self.s.device)
        self.mode = mode
        if self.s.device == "cuda":
            torch.cuda.synchronize()
            self.baseline = torch.cuda.memory_allocated()
        self.prompt(self.s.warmup_tokens, 0)      # first launches compile the kernels: keep them out of TTFT
        self.build_seconds[mode] = round(time.monotonic() - t0, 2)
        self.log(f"  {mode} engine ready in {self.build_seconds[mode]} s (warm-up {self.s.warmup_tokens} tokens)")
        return self.engine

    def prompt(self, length: int, decode_tokens: int) -> dict:
        """One request of `length` random tokens; times every step. Returns TTFT, decode ms/token, peak bytes."""
        import torch

        from longserve.server.sampling import SamplingParams
        engine, cuda = self.engine, self.s.device == "cuda"
        self.seed += 1                            # a fresh prompt each time: no prefix shared with earlier ones
        rng = random.Random(self.seed)
        ids = [rng.randrange(3, 1000) for _ in range(length)]
        params = SamplingParams(max_tokens=decode_tokens + 1, temperature=0.0, ignore_eos=True)
        rid = f"e2e-{self.seed}"
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.monotonic()
        engine.add_request(rid, ids, params)
        token_times = []
        while engine.has_work():
            events = engine.step()
            now = time.monotonic()
            token_times += [now] * sum(len(getattr(e, "token_ids", ()) or ()) for e in events)
            if self.budget.left() < 0 and engine.has_work():
                engine.abort(rid)
                raise TimeoutError(f"time budget spent after {len(token_times)} tokens")
        if not token_times:
            raise RuntimeError("the request finished without producing a token")
        gaps = [b - a for a, b in itertools.pairwise(token_times)]
        out = {"ttftSeconds": round(token_times[0] - t0, 4),
               "decodeTokens": len(gaps), "decodeMsPerToken": round(1e3 * sorted(gaps)[len(gaps) // 2], 3)
               if gaps else None}
        if cuda:
            peak = torch.cuda.max_memory_allocated()
            out.update(peakBytes=int(peak), baselineBytes=int(self.baseline),
                       peakTransientBytes=int(peak - self.baseline))
        return out


def measure_all(s: Setup, runner: Runner, budget: Budget, modes: list[str], log) -> tuple[list, list]:
    """Every (mode, length) in order, each prompt followed by its decode steps, within the budget."""
    runs, skipped, last = [], [], {}
    for mode in modes:
        for length in sorted(s.lengths):
            decode = s.decode_tokens
            guess = predict(last, mode, length) + decode * DECODE_GUESS_S
            if guess > budget.left():
                reason = f"predicted {guess:.0f} s > {max(budget.left(), 0):.0f} s left"
                skipped.append({"attention": mode, "promptTokens": length, "reason": reason})
                log(f"  skip {mode} {length}: {reason}")
                continue
            row = {"attention": mode, "promptTokens": length}
            try:
                runner.engine_for(mode)
                row.update(runner.prompt(length, decode))
                last[mode] = (length, row["ttftSeconds"])
                row["prefillTokensPerSecond"] = round(length / row["ttftSeconds"], 1)
            except Exception as exc:  # an OOM or a failed step: record it, start a fresh engine next time
                row["error"] = f"{type(exc).__name__}: {exc}"[:800]
                row["trace"] = traceback.format_exc()[-1200:]
                runner.release()
            row["planned"] = planned_terms(s, length + decode)
            if "peakTransientBytes" in row:
                row["transientOverPlan"] = round(row["peakTransientBytes"] / max(row["planned"]["transient"], 1), 3)
            runs.append(row)
            log(f"  {mode} {length}: " + (row.get("error") or f"TTFT {row['ttftSeconds']} s"))
    return runs, skipped


def predict(last: dict, mode: str, length: int) -> float:
    """Seconds the next prompt should take, from the last one of this mode (or else the other mode's)."""
    ref = last.get(mode) or next(iter(last.values()), None)
    if ref is None:
        return 0.0
    n0, t0 = ref
    return t0 * (length / n0) ** GROWTH_EXPONENT[mode]


def _cell(row: dict, key: str, scale: float = 1.0, fmt: str = "{:.2f}") -> str:
    value = row.get(key)
    return "–" if value is None else fmt.format(value / scale)


def table(report: dict) -> str:
    gb = 1e9
    lines = [("| attention | prompt tokens | TTFT s | tokens/s | decode ms/token | peak GB | transient GB | "
              "planned transient GB | note |"), "|---|---|---|---|---|---|---|---|---|"]
    for r in report["runs"]:
        lines.append(f"| {r['attention']} | {r['promptTokens']:,} | {_cell(r, 'ttftSeconds')} | "
                     f"{_cell(r, 'prefillTokensPerSecond', fmt='{:.0f}')} | {_cell(r, 'decodeMsPerToken')} | "
                     f"{_cell(r, 'peakBytes', gb)} | {_cell(r, 'peakTransientBytes', gb)} | "
                     f"{r['planned']['transient'] / gb:.2f} | {(r.get('error') or '')[:60]} |")
    for sk in report["skipped"]:
        lines.append(f"| {sk['attention']} | {sk['promptTokens']:,} | skipped | | | | | | {sk['reason']} |")
    if report["speedups"]:
        lines.append("")
    lines += [f"sparse speed-up (dense TTFT / sparse TTFT) at {sp['promptTokens']:,} tokens: "
              f"{sp['denseOverSparse']:.2f}x" for sp in report["speedups"]]
    return "\n".join(lines)


def speedups(runs: list) -> list:
    ttft = {(r["attention"], r["promptTokens"]): r["ttftSeconds"] for r in runs if "ttftSeconds" in r}
    return [{"promptTokens": n, "denseOverSparse": round(ttft[("dense", n)] / ttft[("sparse", n)], 3)}
            for (mode, n) in sorted(ttft) if mode == "sparse" and ("dense", n) in ttft]


def parse_lengths(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(",") if x)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("lengths must be positive")
    return values


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="LongServe end-to-end engine run with random 7B-1M weights")
    parser.add_argument("--out", required=True, help="JSON report path")
    parser.add_argument("--smoke", action="store_true", help="tiny random model on the CPU (seconds)")
    parser.add_argument("--budget-s", type=float, default=420.0, help="wall-clock budget for everything")
    parser.add_argument("--lengths", type=parse_lengths, default=None, help="prompt lengths, comma-separated")
    parser.add_argument("--modes", default="sparse,dense", help="attention modes in run order")
    parser.add_argument("--decode-tokens", type=int, default=None, help="decode steps after every prompt")
    parser.add_argument("--chunk", type=int, default=None, help="prefill chunk (default: the planner's)")
    args = parser.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    if not modes or set(modes) - {"dense", "sparse"}:
        parser.error("--modes takes dense and/or sparse")
    budget = Budget(args.budget_s)
    import torch
    if not args.smoke and not torch.cuda.is_available():
        print("no CUDA device: run with --smoke on CPU", file=sys.stderr)
        return 2
    s = smoke_setup(args) if args.smoke else full_setup(args)

    def log(msg):
        print(msg, flush=True)

    log(f"[engine e2e] {'smoke' if args.smoke else 'Qwen2.5-7B-Instruct-1M shape'}, chunk {s.chunk}, "
        f"lengths {list(s.lengths)}, budget {args.budget_s:.0f} s")
    with tempfile.TemporaryDirectory(prefix="longserve-e2e-") as tmp:
        runner = Runner(s, write_checkpoint(tmp, s), budget, log)
        runs, skipped = measure_all(s, runner, budget, modes, log)
        runner.release()
    report = {"smoke": args.smoke, "device": s.device, "dtype": s.dtype,
              "gpu": torch.cuda.get_device_name() if s.device == "cuda" else None,
              "memoryPerGpuBytes": s.memory_per_gpu, "prefillChunkTokens": s.chunk,
              "kvCapacityTokens": kv_capacity(s), "plan": s.plan, "budgetSeconds": args.budget_s,
              "engineBuildSeconds": runner.build_seconds, "runs": runs, "skipped": skipped,
              "speedups": speedups(runs), "elapsedSeconds": round(time.monotonic() - budget.start, 1)}
    text = table(report)
    report["table"] = text
    with open(args.out, "w", encoding="utf-8") as fh:
        json.dump(report, fh, indent=1)
    log(text)
    log(f"[engine e2e] {len(runs)} runs, {len(skipped)} skipped, {report['elapsedSeconds']} s; report {args.out}")
    return 1 if any("error" in r for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
