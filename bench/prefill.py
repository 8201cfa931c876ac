"""`longserve bench prefill`: prefill tokens/s and peak memory of our engine vs transformers, one run.

Both run the same checkpoint on the CPU in fp32: transformers (`Qwen2ForCausalLM`, sdpa attention, one
forward over the whole prompt, plain RoPE) and our engine (chunked prefill of `--chunk` tokens through
the paged KV cache, DCA; dense, and sparse with the checkpoint's budgets above its threshold). Each
measurement runs in a fresh subprocess; peak memory is the growth of the process's peak RSS
(ru_maxrss) over the RSS after loading the model, i.e. activations + KV cache + transients. Without
`--model` a random benchmark checkpoint is built (Qwen2 shapes scaled down, DCA chunk_size 16384 /
local_size 2048, sparse threshold 8192). Random weights attend without structure, so estimated slashes
scatter and any sizeable slash budget covers nearly every key; the benchmark heads therefore get the
smallest budgets Qwen's configs use for local heads with sinks (vertical 30, i.e. 130 after the quirk,
slash 100 = the forced local band), and the sparse rows report the fraction of causal (query, key) pairs
actually computed, so the speed-up is read against the work it skipped.

`--repeat` measures prefix caching instead: in one engine process, the time to first token of a prompt and of
the same prompt sent again (which reuses the cached prefix and computes only its last block).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

HELP = "prefill tokens/s and peak memory: our engine (dense, sparse) vs transformers, same checkpoint"
FIELDS = ("tokens", "impl", "mode", "seconds", "tokens_per_s", "peak_mib", "kv_mib", "pairs_computed")


def add_arguments(p) -> None:
    p.add_argument("--model", help="checkpoint directory (default: build a random benchmark checkpoint)")
    p.add_argument("--lengths", default="2048,8192,32768")
    p.add_argument("--chunk", type=int, default=2048, help="our prefill chunk (max_num_batched_tokens)")
    p.add_argument("--threads", type=int, default=2, help="torch threads in every measurement")
    p.add_argument("--skip-transformers-above", type=int, default=32768,
                   help="do not run transformers beyond this length (its mask and scores grow as N^2)")
    p.add_argument("--repeat", action="store_true",
                   help="instead: our engine's time to first token for a prompt and for the same prompt sent again "
                        "(the repeat reuses the cached prefix), one process per length")
    p.add_argument("-o", "--output", choices=["table", "json"], default="table")


def build_bench_checkpoint(directory: str) -> str:
    from longserve.server.tiny_checkpoint import build_tiny_checkpoint
    layers, heads = 2, 4
    sparse = [{str(h): ["vertical_and_slash", 30, 100, 0.95] for h in range(heads)} for _ in range(layers)]
    return build_tiny_checkpoint(directory, vocab_size=2048, hidden_size=256, intermediate_size=704,
                                 num_layers=layers, num_heads=heads, num_kv_heads=1, max_position_embeddings=131072,
                                 tie_word_embeddings=False, rope_theta=1e6,
                                 dca={"chunk_size": 16384, "local_size": 2048, "original_max_position_embeddings": 0,
                                      "sparse_attention_threshold": 8192},
                                 sparse_config=sparse)


WORKER = r"""
import json, resource, sys, time
import torch
args = json.loads(sys.argv[1])
torch.set_num_threads(args["threads"])
torch.manual_seed(0)
def rss_mib():
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * 4096 / 2**20
with open(args["model"] + "/config.json") as fh:
    vocab = json.load(fh)["vocab_size"]
ids = torch.randint(3, vocab, (args["tokens"],)).tolist()
if args["impl"] == "repeat":           # first request, then the same prompt again: TTFT of each
    from longserve.server.engine import LLM, SamplingParams
    llm = LLM(args["model"], dtype="float32", prefill_chunk_tokens=args["chunk"], max_num_seqs=1,
              kv_capacity_tokens=args["tokens"] + 64)
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    runs = [llm.generate([ids], params)[0] for _ in range(2)]
    print(json.dumps({"first_s": runs[0].finished.timings.first_token_seconds,
                      "repeat_s": runs[1].finished.timings.first_token_seconds,
                      "repeat_computed": sum(runs[1].finished.timings.prefill_chunk_tokens),
                      "same_output": runs[0].outputs[0].token_ids == runs[1].outputs[0].token_ids}))
    sys.exit(0)
if args["impl"] == "transformers":
    from transformers import Qwen2ForCausalLM
    model = Qwen2ForCausalLM.from_pretrained(args["model"], dtype=torch.float32, attn_implementation="sdpa").eval()
    base = rss_mib()
    t0 = time.perf_counter()
    with torch.inference_mode():
        model(torch.tensor([ids]), use_cache=True, logits_to_keep=1)
    seconds, kv, pairs = time.perf_counter() - t0, 0.0, None
else:
    from longserve.server.engine import LLM, SamplingParams
    llm = LLM(args["model"], dtype="float32", prefill_chunk_tokens=args["chunk"], max_num_seqs=1,
              kv_capacity_tokens=args["tokens"] + 64, sparse_prefill=args["mode"] == "sparse")
    kv = (llm.engine.runner.cache.k.numel() * 2 * 4) / 2**20
    base = rss_mib() - kv              # the cache is allocated (zeroed) at load: count it as prefill memory
    from longserve.kernels import PairStats
    stats = llm.engine.runner.pair_totals = PairStats()        # every step adds the counts its kernels return
    t0 = time.perf_counter()
    llm.generate([ids], SamplingParams(max_tokens=1, temperature=0.0))
    seconds = time.perf_counter() - t0
    pairs = stats.computed / stats.causal if stats.causal else None
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"seconds": seconds, "peak_mib": max(peak - base, 0.0), "kv_mib": kv,
                  "pairs": pairs if args["impl"] == "engine" else None}))
"""


def measure(model: str, tokens: int, impl: str, mode: str, chunk: int, threads: int) -> dict:
    args = json.dumps({"model": model, "tokens": tokens, "impl": impl, "mode": mode, "chunk": chunk,
                       "threads": threads})
    env = {**os.environ, "PYTHONSAFEPATH": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-c", WORKER, args], capture_output=True, text=True, env=env,
                         timeout=3600)
    row = {"tokens": tokens, "impl": impl, "mode": mode}
    if run.returncode != 0:
        row.update(seconds=None, tokens_per_s=None, peak_mib=None, kv_mib=None, pairs_computed=None,
                   error=(run.stderr.strip().splitlines() or ["failed"])[-1][:200])
        return row
    data = json.loads(run.stdout.strip().splitlines()[-1])
    row.update(seconds=round(data["seconds"], 3), tokens_per_s=round(tokens / data["seconds"], 1),
               peak_mib=round(data["peak_mib"], 1), kv_mib=round(data["kv_mib"], 1),
               pairs_computed=None if data["pairs"] is None else round(data["pairs"], 4))
    return row


def ratios(rows: list[dict]) -> list[dict]:
    by = {(r["tokens"], r["impl"], r["mode"]): r for r in rows}
    out = []
    for n in sorted({r["tokens"] for r in rows}):
        hf, dense, sparse = by.get((n, "transformers", "dense")), by.get((n, "engine", "dense")), \
            by.get((n, "engine", "sparse"))
        speed = lambda a, b: round(a["tokens_per_s"] / b["tokens_per_s"], 2) \
            if a and b and a["tokens_per_s"] and b["tokens_per_s"] else None  # noqa: E731
        out.append({"tokens": n, "dense_vs_transformers": speed(dense, hf), "sparse_vs_dense": speed(sparse, dense),
                    "dense_activation_mib": None if not dense or dense["peak_mib"] is None
                    else round(dense["peak_mib"] - dense["kv_mib"], 1)})
    return out


def measure_repeat(model: str, tokens: int, chunk: int, threads: int) -> dict:
    """TTFT of a prompt and of its exact repeat in one engine (the repeat computes only its last block)."""
    args = json.dumps({"model": model, "tokens": tokens, "impl": "repeat", "mode": "", "chunk": chunk,
                       "threads": threads})
    env = {**os.environ, "PYTHONSAFEPATH": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-c", WORKER, args], capture_output=True, text=True, env=env,
                         timeout=3600)
    if run.returncode != 0:
        return {"tokens": tokens, "error": (run.stderr.strip().splitlines() or ["failed"])[-1][:200]}
    data = json.loads(run.stdout.strip().splitlines()[-1])
    return {"tokens": tokens, "first_ttft_s": round(data["first_s"], 3), "repeat_ttft_s": round(data["repeat_s"], 4),
            "speedup": round(data["first_s"] / data["repeat_s"], 1), "repeat_computed_tokens": data["repeat_computed"],
            "same_output": data["same_output"]}


def run_repeat(args, lengths: list[int]) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or build_bench_checkpoint(os.path.join(tmp, "bench-model"))
        rows = [measure_repeat(model, n, args.chunk, args.threads) for n in lengths]
    if args.output == "json":
        print(json.dumps({"rows": rows}, indent=2))
    else:
        print(f"{'tokens':>7} {'first TTFT s':>13} {'repeat TTFT s':>14} {'speed-up':>9} {'computed':>9} {'same':>5}")
        for r in rows:
            if r.get("error"):
                print(f"{r['tokens']:>7}  failed: {r['error']}")
                continue
            print(f"{r['tokens']:>7} {r['first_ttft_s']:>13} {r['repeat_ttft_s']:>14} {r['speedup']:>8}x "
                  f"{r['repeat_computed_tokens']:>9} {str(r['same_output']):>5}")
    return 1 if any(r.get("error") or not r["same_output"] for r in rows) else 0


def run(args) -> int:
    lengths = [int(x) for x in args.lengths.split(",") if x.strip()]
    if not lengths or min(lengths) < 16:
        print("longserve bench prefill: --lengths needs positive token counts >= 16", file=sys.stderr)
        return 2
    if args.repeat:
        return run_repeat(args, lengths)
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or build_bench_checkpoint(os.path.join(tmp, "bench-model"))
        rows = []
        for n in lengths:
            if n <= args.skip_transformers_above:
                rows.append(measure(model, n, "transformers", "dense", args.chunk, args.threads))
            rows.append(measure(model, n, "engine", "dense", args.chunk, args.threads))
            rows.append(measure(model, n, "engine", "sparse", args.chunk, args.threads))
    table = ratios(rows)
    if args.output == "json":
        print(json.dumps({"rows": rows, "ratios": table}, indent=2))
    else:
        print(f"{'tokens':>7} {'impl':>12} {'mode':>6} {'seconds':>9} {'tok/s':>9} {'peak MiB':>9} {'KV MiB':>7} "
              f"{'pairs':>6}")
        for r in rows:
            print(f"{r['tokens']:>7} {r['impl']:>12} {r['mode']:>6} {r['seconds'] or 'fail':>9} "
                  f"{r['tokens_per_s'] or '-':>9} {r['peak_mib'] or '-':>9} {r['kv_mib'] or '-':>7} "
                  f"{r['pairs_computed'] if r['pairs_computed'] is not None else '-':>6}"
                  + (f"  ({r['error']})" if r.get("error") else ""))
        print(f"\n{'tokens':>7} {'dense/transformers':>19} {'sparse/dense':>13} {'dense activations MiB':>22}")
        for r in table:
            print(f"{r['tokens']:>7} {r['dense_vs_transformers'] or '-':>19} {r['sparse_vs_dense'] or '-':>13} "
                  f"{r['dense_activation_mib'] or '-':>22}")
    failed = [r for r in rows if r.get("error")]
    return 1 if failed else 0
