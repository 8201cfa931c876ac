"""`longserve bench passkey`: passkey retrieval accuracy over a (context length x depth) grid.

Why: DCA's claim is that a model reads far past its training length without retraining, and sparse
prefill's claim is that it keeps that accuracy while computing fewer (query, key) pairs; both are only
worth anything measured. Prompts follow the Qwen2.5-1M passkey example (bench/demo_prompts.py), sized
in the model's own tokens with its chat template, and go through our engine (greedy, `--backend engine`)
or through the transformers oracle (`--backend oracle`, teacher-forced, engine-independent). A reply is
correct when it is exactly the trained answer ("The pass key is 28884."; `--match number`: when its first number
is the key). Output: a table on stdout, plus
`passkey.csv`, `passkey.png` (heatmap in the style of the Qwen passkey figure), `prompts.csv` (one row per prompt,
with the needle's distance from the end of the prompt) and `summary.json` in --out. A depth is a fraction of the
filler, so the distance DCA has to bridge varies with the sentences around it; `--distance-bins` adds a table by
that distance, which is what decides whether plain RoPE still reads a needle (docs: bench/RESULTS.md).
"""
from __future__ import annotations

import argparse
import json
import random
import re
import time
from pathlib import Path

HELP = "passkey retrieval accuracy grid (length x depth), DCA and sparse prefill on or off"


def _ints(text: str) -> list[int]:
    try:
        vals = [int(x) for x in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers, got {text!r}") from None
    if not vals or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers (token counts), got {text!r}")
    return vals


def _fracs(text: str) -> list[float]:
    try:
        vals = [float(x) for x in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers in [0, 1], got {text!r}") from None
    if not vals or any(not 0.0 <= v <= 1.0 for v in vals):
        raise argparse.ArgumentTypeError("depths must be in [0, 1]")
    return vals


def add_arguments(p: argparse.ArgumentParser) -> None:
    from longserve.bench import haystacks as hs

    p.add_argument("--model", required=True, help="checkpoint directory (Hugging Face layout)")
    p.add_argument("--lengths", type=_ints, required=True, help="prompt lengths in tokens, e.g. 512,2048,4096")
    p.add_argument("--depths", type=_fracs, default=[0.0, 0.25, 0.5, 0.75, 1.0],
                   help="needle depths as fractions of the filler (default 0,0.25,0.5,0.75,1)")
    p.add_argument("--dca", choices=["on", "off"], default="on", help="dual chunk attention (default on)")
    p.add_argument("--sparse", choices=["on", "off"], default="off",
                   help="vertical-slash sparse prefill above the model's threshold (default off)")
    p.add_argument("--sparse-threshold", type=int, default=None,
                   help="override the sparse prefill threshold in tokens (default: the model's config)")
    p.add_argument("--samples", type=int, default=5, help="prompts per cell (default 5)")
    p.add_argument("--key-digits", type=int, default=5, help="pass key length in digits (default 5)")
    p.add_argument("--filler", choices=hs.ALL_STYLES, default="qwen",
                   help="filler text: the seed prompt's repeated block (qwen), a sampled sentence pool (varied), "
                        f"or a haystack of bench/haystacks.py ({hs.HELD_OUT}: the source the demo model never "
                        "trained on)")
    p.add_argument("--backend", choices=["engine", "oracle"], default="engine",
                   help="engine: greedy generation through longserve's LLM; oracle: transformers, teacher-forced")
    p.add_argument("--kernels", choices=["auto", "reference", "triton"], default="auto",
                   help="kernel path (sets LONGSERVE_KERNELS); triton on a CPU runs the Triton interpreter "
                        "(TRITON_INTERPRET=1, set here before Triton is imported; fp32; slow)")
    p.add_argument("--match", choices=["exact", "number"], default="exact",
                   help="a reply counts when it is exactly the trained answer 'The pass key is <key>.' (default), or "
                        "when its first number is the key (lenient: 'The pass key is 28884Q.' counts)")
    p.add_argument("--seed", type=int, default=0, help="prompt seed (keys, filler)")
    p.add_argument("--distance-bins", type=_ints, default=None,
                   help="also tabulate accuracy by the needle's distance in tokens from the end of the prompt, "
                        "with these upper bounds, e.g. 512,768,1024 (a last open bin is added)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--out", default=None, help="output directory (default bench/results/passkey-<time>)")


def first_number(text: str) -> str | None:
    m = re.search(r"\d+", text)
    return m.group(0) if m else None


def reply_correct(reply: str, sample, match: str = "exact") -> bool:
    """`exact`: the reply is the trained answer, nothing more; `number`: its first number is the key."""
    if match == "exact":
        return reply.strip() == sample.answer
    return first_number(reply) == sample.target


def chat_ids(tokenizer, sample) -> list[int]:
    """The token ids of `sample`'s prompt as one user turn in the model's chat template, ready for generation."""
    return list(tokenizer.apply_chat_template([{"role": "user", "content": sample.prompt}],
                                              add_generation_prompt=True, tokenize=True, return_dict=False))


def needle_distance(tokenizer, sample, ids: list[int]) -> int:
    """Tokens from the first token of the needle's key to the end of the prompt `ids` (the chat template included):
    the relative distance the model must bridge to read the key. The prefix is tokenized on its own, so a token that
    straddles the cut can move the figure by one."""
    chat = tokenizer.apply_chat_template([{"role": "user", "content": sample.prompt}], add_generation_prompt=True,
                                         tokenize=False)
    cut = chat.index(sample.prompt) + sample.prompt.index(sample.target)
    return len(ids) - len(tokenizer.encode(chat[:cut], add_special_tokens=False))


def distance_table(rows, bounds: list[int]) -> list[dict]:
    """[{"low", "high", "prompts", "correct"}] over `rows` of (needle_distance, correct), binned by the upper
    `bounds` (inclusive) plus an open last bin; empty bins are left out."""
    edges = sorted(set(bounds))
    bins = [{"low": lo + 1, "high": hi, "prompts": 0, "correct": 0}
            for lo, hi in zip([-1] + edges, edges + [None])]
    for distance, correct in rows:
        b = next(b for b in bins if b["high"] is None or distance <= b["high"])
        b["prompts"] += 1
        b["correct"] += bool(correct)
    return [b for b in bins if b["prompts"]]


def format_distance_table(bins) -> str:
    lines = ["needle distance (tokens)   prompts   accuracy", "-" * 45]
    for b in bins:
        span = f"{b['low']}-{b['high']}" if b["high"] is not None else f">= {b['low']}"
        lines.append(f"{span:>24} {b['prompts']:>9} {100 * b['correct'] / b['prompts']:>9.1f}%")
    return "\n".join(lines)


def build_prompts(tokenizer, lengths, depths, samples, key_digits, filler, seed):
    """{(length, depth): [(Sample, prompt_token_ids)]}; the same seed gives the same prompts."""
    from longserve.bench import demo_prompts as dp

    grid = {}
    for length in lengths:
        for depth in depths:
            rng = random.Random(f"{seed}/{length}/{depth}")
            cell = []
            for _ in range(samples):
                key = dp.random_digits(rng, key_digits)
                sub = rng.getrandbits(32)
                sample, _ = dp.fit_to_length(
                    lambda n: dp.passkey_sample(n, depth, key, filler, random.Random(sub)),  # noqa: B023
                    lambda s: len(chat_ids(tokenizer, s)), length)
                cell.append((sample, chat_ids(tokenizer, sample)))
            grid[(length, depth)] = cell
    return grid


def _engine_answers(args, prompts_by_length: dict[int, list[list[int]]]):
    """{length: answers} and {length: PairStats}: one engine, one batch per length, each summing the prefill pair
    counts its steps return."""
    from longserve.kernels import PairStats
    from longserve.server.engine import LLM, SamplingParams

    overrides = {"dca": args.dca == "on", "sparse_prefill": args.sparse == "on", "dtype": "float32"}
    if args.sparse_threshold is not None:
        overrides["sparse_threshold"] = args.sparse_threshold
    longest = max(len(p) for ps in prompts_by_length.values() for p in ps) + args.key_digits + 16
    llm = LLM(args.model, max_model_len=max(longest, 1024), **overrides)
    params = SamplingParams(temperature=0.0, max_tokens=args.key_digits + 12)
    answers, stats = {}, {}
    for length, prompts in prompts_by_length.items():
        stats[length] = llm.engine.runner.pair_totals = PairStats()
        answers[length] = [o.outputs[0].text for o in llm.generate(prompts, params)]
    return answers, stats


def _pair_summary(stats) -> dict | None:
    if stats is None or not stats.causal:
        return None
    return {"computed": stats.computed, "dense_causal": stats.causal,
            "computed_fraction": stats.computed / stats.causal}


def select_kernels(choice: str) -> None:
    """Routes every kernel call to one path (``LONGSERVE_KERNELS``); the Triton path on a machine without a GPU
    needs the interpreter, which Triton reads when it is first imported."""
    import os

    os.environ["LONGSERVE_KERNELS"] = choice
    if choice == "triton":
        import torch
        if not torch.cuda.is_available():
            os.environ["TRITON_INTERPRET"] = "1"


def _sparse_setting(args, model):
    """(SparseAttentionConfig, threshold) for the oracle when --sparse on, else None."""
    if args.sparse == "off":
        return None
    from longserve.kernels import load_sparse_attention_config
    cfg = model.config
    config = load_sparse_attention_config(str(Path(args.model, "sparse_attention_config.json")),
                                          cfg.num_hidden_layers, cfg.num_attention_heads)
    dca = getattr(cfg, "dual_chunk_attention_config", None) or {}
    threshold = args.sparse_threshold or dca.get("sparse_attention_threshold") or 32768
    return config, threshold


def _oracle_correct(args, model, tokenizer, cell, stats) -> list[bool]:
    from longserve.bench.passkey_oracle import answer_correct

    dca = model.config.dual_chunk_attention_config if args.dca == "on" else None
    chunk, local = (dca["chunk_size"], dca["local_size"]) if dca else (None, None)
    sparse = _sparse_setting(args, model)
    return [answer_correct(model, tokenizer, sample, chunk, local, sparse, stats) for sample, _ in cell]


def evaluate(args) -> dict:
    """Runs the grid; returns {"cells": [...], ...} ready for the table, CSV and heatmap."""
    import torch
    from transformers import AutoTokenizer

    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    grid = build_prompts(tokenizer, args.lengths, args.depths, args.samples, args.key_digits, args.filler,
                         args.seed)
    keys = list(grid)
    t0 = time.time()
    from longserve.kernels import PairStats
    stats = {n: PairStats() for n in args.lengths}
    answers = {}
    if args.backend == "engine":
        texts, stats = _engine_answers(args, {n: [ids for k in keys if k[0] == n for _, ids in grid[k]]
                                              for n in args.lengths})
        texts = {n: iter(t) for n, t in texts.items()}
        answers = {k: [next(texts[k[0]]) for _ in grid[k]] for k in keys}
        verdicts = {k: [reply_correct(a, s, args.match) for a, (s, _) in zip(answers[k], grid[k])] for k in keys}
    else:
        from longserve.bench.passkey_oracle import load
        model, _ = load(args.model)
        verdicts = {k: _oracle_correct(args, model, tokenizer, grid[k], stats[k[0]]) for k in keys}
    stats = {n: st.resolved() for n, st in stats.items()}
    cells = [{"length": k[0], "depth": k[1], "samples": len(grid[k]), "correct": sum(verdicts[k]),
              "accuracy": sum(verdicts[k]) / len(grid[k]),
              "mean_prompt_tokens": round(sum(len(ids) for _, ids in grid[k]) / len(grid[k]), 1),
              "answers": answers.get(k),
              "prompts": [{"tokens": len(ids), "needle_distance": needle_distance(tokenizer, s, ids), "correct": v}
                          for (s, ids), v in zip(grid[k], verdicts[k])]}
             for k in keys]
    pairs = None
    if args.sparse == "on":
        total = PairStats()
        for st in stats.values():
            total.add(st)
        pairs = _pair_summary(total)
        if pairs:
            pairs["by_length"] = {str(n): _pair_summary(st) for n, st in stats.items()}
    return {"cells": cells, "seconds": round(time.time() - t0, 1), "sparse_pairs": pairs}


def format_table(cells, lengths, depths) -> str:
    acc = {(c["length"], c["depth"]): c["accuracy"] for c in cells}
    head = "length \\ depth " + "".join(f"{d:>8.2f}" for d in depths) + "     avg"
    lines = [head, "-" * len(head)]
    for n in lengths:
        row = [acc[(n, d)] for d in depths]
        lines.append(f"{n:>14} " + "".join(f"{100 * a:7.1f}%" for a in row) + f"{100 * sum(row) / len(row):7.1f}%")
    return "\n".join(lines)


def save_heatmap(path: Path, cells, lengths, depths, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    acc = {(c["length"], c["depth"]): c["accuracy"] for c in cells}
    data = [[100 * acc[(n, d)] for n in lengths] for d in depths]
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(lengths), 1.2 + 0.5 * len(depths)))
    im = ax.imshow(data, cmap="RdYlGn", vmin=0, vmax=100, aspect="auto")
    ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{100 * d:.0f}%" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    for i, row in enumerate(data):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label="accuracy %")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args) -> int:
    if args.samples < 1 or args.key_digits < 1:
        raise SystemExit("error: --samples and --key-digits must be >= 1")
    if not Path(args.model, "config.json").is_file():
        raise SystemExit(f"error: {args.model} has no config.json")
    if args.kernels != "auto":
        select_kernels(args.kernels)
    out = Path(args.out or f"bench/results/passkey-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    result = evaluate(args)
    cells = result["cells"]
    mode = (f"dca={args.dca} sparse={args.sparse} backend={args.backend} kernels={args.kernels} filler={args.filler}"
            + (f" match={args.match}" if args.backend == "engine" else ""))
    print(f"passkey accuracy ({mode}, {args.samples} prompts per cell, {args.key_digits}-digit keys)")
    print(format_table(cells, args.lengths, args.depths))
    pairs = result["sparse_pairs"]
    if pairs:
        by = ", ".join(f"{n}: {100 * p['computed_fraction']:.1f}%" for n, p in pairs["by_length"].items() if p)
        print(f"sparse prefill computed {100 * pairs['computed_fraction']:.1f}% of the causal (query, key) pairs "
              f"({by}), as the kernels counted them over all layers, heads and prompts")
    elif args.sparse == "on":
        print("sparse prefill pair counts: none recorded (no prompt above the threshold)")
    with open(out / "passkey.csv", "w") as f:
        f.write("length,depth,samples,correct,accuracy,mean_prompt_tokens\n")
        for c in cells:
            f.write(f"{c['length']},{c['depth']},{c['samples']},{c['correct']},{c['accuracy']:.4f},"
                    f"{c['mean_prompt_tokens']}\n")
    with open(out / "prompts.csv", "w") as f:
        f.write("length,depth,prompt,prompt_tokens,needle_distance,correct\n")
        for c in cells:
            for i, pr in enumerate(c["prompts"]):
                f.write(f"{c['length']},{c['depth']},{i},{pr['tokens']},{pr['needle_distance']},{int(pr['correct'])}\n")
    by_distance = None
    if args.distance_bins:
        by_distance = distance_table([(pr["needle_distance"], pr["correct"]) for c in cells for pr in c["prompts"]],
                                     args.distance_bins)
        print(format_distance_table(by_distance))
    save_heatmap(out / "passkey.png", cells, args.lengths, args.depths, f"passkey: {Path(args.model).name}, {mode}")
    summary = {"model": args.model, "dca": args.dca, "sparse": args.sparse, "backend": args.backend,
               "kernels": args.kernels, "filler": args.filler, "match": args.match, "depths": args.depths,
               "answers": {f"{c['length']}/{c['depth']}": c["answers"] for c in cells if c["answers"]},
               "samples": args.samples, "seed": args.seed, "seconds": result["seconds"],
               "sparse_pairs": result["sparse_pairs"], "by_needle_distance": by_distance,
               "average_by_length": {str(n): sum(c["accuracy"] for c in cells if c["length"] == n)
                                     / len(args.depths) for n in args.lengths}}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {out}/passkey.csv, passkey.png, prompts.csv, summary.json")
    return 0
