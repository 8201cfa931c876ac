"""Tensor parallelism on a lent multi-GPU machine: all-reduce time per layer and engine tokens/s, TP 2 against TP 1.

1. All-reduce: the two per-layer all-reduces of a [tokens, hidden] activation (o_proj and down_proj outputs),
   timed in a process group of `--tp` ranks (NCCL on GPUs, gloo on the CPU) for a decode batch and a prefill chunk.
2. Engine: the real engine (`LLMEngine`, random weights made on each rank, `load_format="dummy"`) at TP 1 and at
   `--tp`: prefill tokens/s of one prompt and decode tokens/s of a batch of sequences.
Needs `--tp` CUDA GPUs: with fewer, prints why and exits 0 with `"skipped"` in the report. `--smoke` runs a tiny
model on the CPU with gloo (the test suite does). Run by path from the repository root:
`PYTHONSAFEPATH=1 python bench/gpu/tp.py --out FILE` (Qwen2.5-7B-Instruct-1M shapes on GPUs).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time


def _allreduce_rank(rank: int, tp: int, port: int, backend: str, hidden: int, tokens: list, dtype: str,
                    iters: int, out: str) -> None:
    import torch
    import torch.distributed as dist
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", world_size=tp, rank=rank)
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    if backend == "nccl":
        torch.cuda.set_device(rank)
    sync = torch.cuda.synchronize if backend == "nccl" else (lambda: None)
    rows = []
    for t in tokens:
        x = torch.ones(t, hidden, dtype=getattr(torch, dtype), device=device)
        for _ in range(3):
            dist.all_reduce(x)
        sync()
        start = time.perf_counter()
        for _ in range(iters):
            dist.all_reduce(x)
        sync()
        seconds = (time.perf_counter() - start) / iters
        rows.append({"tokens": t, "allReduceMs": seconds * 1e3, "perLayerMs": 2 * seconds * 1e3,
                     "busGBps": 2 * (tp - 1) / tp * x.numel() * x.element_size() / seconds / 1e9})
    if rank == 0:
        with open(out, "w", encoding="utf-8") as fh:
            json.dump(rows, fh)
    dist.destroy_process_group()


def measure_allreduce(tp: int, backend: str, hidden: int, tokens: list, dtype: str, iters: int) -> list:
    import torch.multiprocessing as mp

    from longserve.server.parallel.topology import free_port
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "allreduce.json")
        mp.spawn(_allreduce_rank, args=(tp, free_port(), backend, hidden, tokens, dtype, iters, out), nprocs=tp)
        with open(out, encoding="utf-8") as fh:
            return json.load(fh)


def measure_engine(model_dir: str, tp: int, device: str, dtype: str, prompt: int, batch: int, decode: int,
                   chunk: int) -> dict:
    from longserve.server.engine.llm_engine import LLMEngine
    from longserve.server.engine.offline import default_engine_config
    from longserve.server.sampling import SamplingParams

    config = default_engine_config(model_dir, tensor_parallel_size=tp, dtype=dtype, load_format="dummy",
                                   prefill_chunk_tokens=chunk, max_num_seqs=batch,
                                   kv_capacity_tokens=(prompt + decode + 64) * batch + 4096,
                                   max_model_len=prompt + decode + 64)
    engine = LLMEngine(config, device=device)
    try:
        ids = [(7 * i) % 900 + 3 for i in range(prompt)]
        engine.add_request("warmup", ids[:chunk], SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))
        while engine.has_work():        # first-call costs (kernel compilation, allocator) stay out of the timing
            engine.step()
        engine.add_request("prefill", ids, SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True))
        start = time.perf_counter()
        while engine.has_work():
            engine.step()
        prefill_s = time.perf_counter() - start
        params = SamplingParams(max_tokens=decode, temperature=0.0, ignore_eos=True)
        for b in range(batch):
            engine.add_request(f"d{b}", ids[:64], params)
        engine.step()                   # their prefill, then decode only
        start, steps = time.perf_counter(), 0
        while engine.has_work():
            engine.step()
            steps += 1
        decode_s = time.perf_counter() - start
        return {"tp": tp, "prefillTokens": prompt, "prefillTokensPerSecond": prompt / prefill_s,
                "decodeBatch": batch, "decodeSteps": steps, "decodeTokensPerSecond": steps * batch / decode_s,
                "decodeMsPerStep": decode_s / max(steps, 1) * 1e3}
    finally:
        engine.close()


def write_model(directory: str, smoke: bool) -> tuple[str, object]:
    from longserve.server.config import ModelFacts
    from longserve.server.tiny_checkpoint import build_tokenizer
    if smoke:
        facts = ModelFacts(num_layers=2, hidden_size=64, intermediate_size=128, num_heads=4, num_kv_heads=2,
                           head_dim=16, vocab_size=1000, tie_word_embeddings=False, rope_theta=10000.0,
                           max_position_embeddings=4096)
    else:
        from longserve.operator.catalog import lookup_model
        facts = lookup_model("Qwen/Qwen2.5-7B-Instruct-1M").facts
    config = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": facts.hidden_size,
              "intermediate_size": facts.intermediate_size, "num_hidden_layers": facts.num_layers,
              "num_attention_heads": facts.num_heads, "num_key_value_heads": facts.num_kv_heads,
              "head_dim": facts.head_dim, "vocab_size": facts.vocab_size,
              "tie_word_embeddings": facts.tie_word_embeddings, "rope_theta": facts.rope_theta,
              "max_position_embeddings": facts.max_position_embeddings, "rms_norm_eps": facts.rms_norm_eps,
              "eos_token_id": 2}
    os.makedirs(directory, exist_ok=True)
    build_tokenizer(directory, 1000)
    with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as fh:
        json.dump(config, fh)
    return directory, facts


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny random model on the CPU with gloo (seconds)")
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    import torch

    report = {"smoke": args.smoke, "tp": args.tp}
    gpus = torch.cuda.device_count()
    if not args.smoke and gpus < args.tp:
        report["skipped"] = f"needs {args.tp} CUDA GPUs, this machine has {gpus}"
        print(f"[tp] skipped: {report['skipped']}")
    else:
        backend, device, dtype = ("gloo", "cpu", "float32") if args.smoke else ("nccl", "cuda", "bfloat16")
        prompt, batch, decode, chunk = (256, 4, 8, 128) if args.smoke else (32768, 16, 64, 8192)
        with tempfile.TemporaryDirectory() as tmp:
            model_dir, facts = write_model(os.path.join(tmp, "model"), args.smoke)
            report["allReduce"] = measure_allreduce(args.tp, backend, facts.hidden_size, [1, batch, chunk], dtype,
                                                    5 if args.smoke else 50)
            report["engine"] = [measure_engine(model_dir, tp, device, dtype, prompt, batch, decode, chunk)
                                for tp in (1, args.tp)]
        one, many = report["engine"]
        report["speedup"] = {"prefill": many["prefillTokensPerSecond"] / one["prefillTokensPerSecond"],
                             "decode": many["decodeTokensPerSecond"] / one["decodeTokensPerSecond"]}
        for row in report["allReduce"]:
            print(f"[tp] all-reduce {row['tokens']:>6} tokens: {row['perLayerMs']:.3f} ms per layer "
                  f"({row['busGBps']:.1f} GB/s bus)")
        for row in report["engine"]:
            print(f"[tp] TP {row['tp']}: prefill {row['prefillTokensPerSecond']:.0f} tok/s, decode "
                  f"{row['decodeTokensPerSecond']:.1f} tok/s ({row['decodeMsPerStep']:.1f} ms/step, batch "
                  f"{row['decodeBatch']})")
    with open(args.out, "w", encoding="utf-8") as fh:
        json.dump(report, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
