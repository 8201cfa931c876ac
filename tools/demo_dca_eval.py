#!/usr/bin/env python
"""Teacher-forced passkey accuracy of the demo model with and without DCA, on transformers.

Why: choosing the DCA window (local_size) for the demo checkpoint needs a quick, engine-independent
measurement: this scores prompts with the transformers oracle of longserve.bench.passkey_oracle (DCA positions
applied inside an attention function; teacher-forced exact match of the answer digits).

    python tools/demo_dca_eval.py --model models/demo-passkey --lengths 512 2048 4096 \
        --depths 0 0.25 0.5 0.75 1 --samples 4 --local 64 128 off
"""
from __future__ import annotations

import argparse
import random
import sys

import torch

from longserve.bench import demo_prompts as dp
from longserve.bench.passkey_oracle import answer_correct, load


def grid(model, tok, lengths, depths, samples: int, settings, seed: int, task: str = "passkey"):
    """{setting: {(length, depth): accuracy}} with the same prompts for every setting."""
    count = lambda s: len(tok.encode(dp.chat_prompt(s.prompt), add_special_tokens=False))  # noqa: E731
    results = {name: {} for name, _ in settings}
    for length in lengths:
        for depth in depths:
            rng = random.Random(f"{seed}-{length}-{depth}")
            cell = [dp.sized_sample(count, rng, length, task, depth=depth, key_digits=5) for _ in range(samples)]
            for name, (chunk, local) in settings:
                hits = sum(answer_correct(model, tok, s, chunk, local) for s in cell)
                results[name][(length, depth)] = hits / samples
                print(f"{task} L={length} depth={depth} {name}: {hits}/{samples}", flush=True)
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--lengths", type=int, nargs="+", required=True)
    p.add_argument("--depths", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--local", nargs="+", default=["64", "128", "off"],
                   help="DCA local_size values to compare; 'off' = plain RoPE")
    p.add_argument("--task", choices=["passkey", "kv"], default="passkey")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tok = load(args.model)
    chunk = model.config.dual_chunk_attention_config["chunk_size"]
    settings = [("plain" if x == "off" else f"dca/{x}", (None, None) if x == "off" else (chunk, int(x)))
                for x in args.local]
    res = grid(model, tok, args.lengths, args.depths, args.samples, settings, args.seed, args.task)
    print("length  " + "  ".join(f"{n:>9}" for n, _ in settings))
    for length in args.lengths:
        avgs = [sum(res[n][(length, d)] for d in args.depths) / len(args.depths) for n, _ in settings]
        print(f"{length:>6}  " + "  ".join(f"{100 * a:8.1f}%" for a in avgs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
