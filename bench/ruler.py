"""`longserve bench ruler`: a RULER-style retrieval suite for the demo model, by task x length, per attention mode.

Why: one task at one wording says little; a model that only learned its filler fails as soon as the text, the
needle's wording or the kind of value changes. The tasks (prompts from bench/demo_prompts.py, in the model's
own tokens, on any haystack of bench/haystacks.py, by default the held-out one):

- ``single``   the seed prompt's needle, a 5-digit key (the passkey bench's task);
- ``wording``  a needle worded as in no training prompt (NEEDLE_UNSEEN), 5-digit key;
- ``word``     the key is a word;
- ``code``     the key is 5-7 capitals and digits;
- ``multikey`` four "code for the <item>" records, one asked, three decoys;
- ``none``     no key in the text: the reply must say so.

Depths are spread evenly over [0, 1]. A reply counts when it is exactly the trained answer ("The pass key is
28884.", "The code for the apple is 417.", "There is no pass key in the text."). Modes: ``dca+sparse`` (DCA with
vertical-slash sparse prefill above the model's threshold, the serving default), ``dca`` (dense DCA) and
``nodca`` (plain RoPE, the ablation). Output: a table per mode on stdout, plus ``ruler.csv``, ``ruler.png`` (one
heatmap per mode) and ``summary.json`` (every reply) in --out.
"""
from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

from longserve.bench.passkey import _ints, chat_ids, select_kernels

HELP = "RULER-style retrieval suite (task x length) on a chosen haystack, DCA and sparse prefill on or off"

TASKS = ("single", "wording", "word", "code", "multikey", "none")
MODES = {"dca+sparse": {"dca": True, "sparse_prefill": True}, "dca": {"dca": True, "sparse_prefill": False},
         "nodca": {"dca": False, "sparse_prefill": False}}


def _choices(known):
    def parse(text: str) -> list[str]:
        vals = [x.strip() for x in text.split(",") if x.strip()]
        bad = [v for v in vals if v not in known]
        if not vals or bad:
            raise argparse.ArgumentTypeError(f"expected a comma list of {', '.join(known)}; got {text!r}")
        return vals
    return parse


def add_arguments(p: argparse.ArgumentParser) -> None:
    from longserve.bench import haystacks as hs

    p.add_argument("--model", required=True, help="checkpoint directory (Hugging Face layout)")
    p.add_argument("--lengths", type=_ints, required=True, help="prompt lengths in tokens, e.g. 512,2048,4096")
    p.add_argument("--tasks", type=_choices(TASKS), default=list(TASKS), help=f"tasks (default {','.join(TASKS)})")
    p.add_argument("--modes", type=_choices(tuple(MODES)), default=list(MODES),
                   help="attention modes (default dca+sparse,dca,nodca)")
    p.add_argument("--haystack", choices=hs.ALL_STYLES, default=hs.HELD_OUT,
                   help=f"filler text (default {hs.HELD_OUT}, the source the demo model never trained on)")
    p.add_argument("--samples", type=int, default=10, help="prompts per (task, length) cell (default 10)")
    p.add_argument("--sparse-threshold", type=int, default=None,
                   help="override the sparse prefill threshold in tokens (default: the model's config)")
    p.add_argument("--kernels", choices=["auto", "reference", "triton"], default="auto",
                   help="kernel path (triton on a CPU runs the Triton interpreter; slow)")
    p.add_argument("--seed", type=int, default=0, help="prompt seed")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--out", default=None, help="output directory (default bench/results/ruler-<time>)")


def task_sample(task: str, count, rng: random.Random, length: int, depth: float, haystack: str):
    """One prompt of `task` filling at most `length` tokens of the haystack, the needle at `depth`."""
    from longserve.bench import demo_prompts as dp

    common = dict(depth=depth, style=haystack)
    if task == "single":
        return dp.sized_sample(count, rng, length, "passkey", key_digits=5, needle=dp.NEEDLES[0], **common)
    if task == "wording":
        return dp.sized_sample(count, rng, length, "passkey", key_digits=5, needle=dp.NEEDLE_UNSEEN, **common)
    if task in ("word", "code"):
        kind = "word" if task == "word" else "mixed"
        return dp.sized_sample(count, rng, length, "passkey", value_kind=kind, needle=dp.NEEDLES[0], **common)
    if task == "multikey":
        return dp.sized_sample(count, rng, length, "kv", records=4, **common)
    if task == "none":
        return dp.sized_sample(count, rng, length, "none", **common)
    raise ValueError(f"unknown task {task!r} (expected one of {', '.join(TASKS)})")


def build_suite(tokenizer, tasks, lengths, samples, haystack, seed) -> dict:
    """{(task, length): [(Sample, prompt_ids)]}, the same for the same arguments (and for every mode)."""
    suite = {}
    for task in tasks:
        for length in lengths:
            rng = random.Random(f"{seed}/{task}/{length}")
            cell = []
            for i in range(samples):
                depth = i / (samples - 1) if samples > 1 else 0.5
                sample = task_sample(task, lambda s: len(chat_ids(tokenizer, s)), rng, length, depth, haystack)
                cell.append((sample, chat_ids(tokenizer, sample)))
            suite[(task, length)] = cell
    return suite


def run_mode(args, mode: str, suite: dict) -> dict[tuple[str, int], list[str]]:
    """Replies of one engine (one attention mode) to every prompt of the suite, greedy."""
    from longserve.server.engine import LLM, SamplingParams

    overrides = {**MODES[mode], "dtype": "float32"}
    if args.sparse_threshold is not None:
        overrides["sparse_threshold"] = args.sparse_threshold
    longest = max(len(ids) for cell in suite.values() for _, ids in cell)
    llm = LLM(args.model, max_model_len=max(longest + 32, 1024), **overrides)
    params = SamplingParams(temperature=0.0, max_tokens=24)
    replies = {}
    for key, cell in suite.items():
        outputs = llm.generate([ids for _, ids in cell], params)
        replies[key] = [o.outputs[0].text for o in outputs]
    return replies


def format_table(cells: list[dict], mode: str, tasks, lengths) -> str:
    acc = {(c["task"], c["length"]): c["accuracy"] for c in cells if c["mode"] == mode}
    head = f"{mode:>10} task \\ length" + "".join(f"{n:>9}" for n in lengths)
    lines = [head, "-" * len(head)]
    for task in tasks:
        lines.append(f"{task:>25}" + "".join(f"{100 * acc[(task, n)]:8.1f}%" for n in lengths))
    return "\n".join(lines)


def save_heatmaps(path: Path, cells, modes, tasks, lengths, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(modes), figsize=(1.6 + (1.0 + 0.8 * len(lengths)) * len(modes),
                                                     1.4 + 0.45 * len(tasks)), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        acc = {(c["task"], c["length"]): c["accuracy"] for c in cells if c["mode"] == mode}
        data = [[100 * acc[(t, n)] for n in lengths] for t in tasks]
        im = ax.imshow(data, cmap="RdYlGn", vmin=0, vmax=100, aspect="auto")
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
        ax.set_yticks(range(len(tasks)), tasks)
        ax.set_xlabel("context length (tokens)")
        ax.set_title(mode, fontsize=9)
        for i, row in enumerate(data):
            for j, v in enumerate(row):
                ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=8)
    fig.colorbar(im, ax=list(axes[0]), label="accuracy %")
    fig.suptitle(title, fontsize=9)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def run(args) -> int:
    if args.samples < 1:
        raise SystemExit("error: --samples must be >= 1")
    if not Path(args.model, "config.json").is_file():
        raise SystemExit(f"error: {args.model} has no config.json")
    if args.kernels != "auto":
        select_kernels(args.kernels)
    import torch
    from transformers import AutoTokenizer

    torch.set_num_threads(args.threads)
    out = Path(args.out or f"bench/results/ruler-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    suite = build_suite(tokenizer, args.tasks, args.lengths, args.samples, args.haystack, args.seed)
    cells, answers, seconds = [], {}, {}
    for mode in args.modes:
        t0 = time.time()
        replies = run_mode(args, mode, suite)
        seconds[mode] = round(time.time() - t0, 1)
        for (task, length), cell in suite.items():
            ok = [r.strip() == s.answer for r, (s, _) in zip(replies[(task, length)], cell)]
            cells.append({"mode": mode, "task": task, "length": length, "samples": len(cell), "correct": sum(ok),
                          "accuracy": sum(ok) / len(cell),
                          "mean_prompt_tokens": round(sum(len(ids) for _, ids in cell) / len(cell), 1)})
            answers[f"{mode}/{task}/{length}"] = [{"reply": r, "answer": s.answer, "depth": round(s.depth, 3)}
                                                 for r, (s, _) in zip(replies[(task, length)], cell)]
    print(f"ruler suite: {Path(args.model).name}, haystack {args.haystack}, {args.samples} prompts per cell, "
          f"kernels {args.kernels}")
    for mode in args.modes:
        print(format_table(cells, mode, args.tasks, args.lengths) + f"\n({seconds[mode]} s)\n")
    with open(out / "ruler.csv", "w") as f:
        f.write("mode,task,length,samples,correct,accuracy,mean_prompt_tokens\n")
        for c in cells:
            f.write(f"{c['mode']},{c['task']},{c['length']},{c['samples']},{c['correct']},{c['accuracy']:.4f},"
                    f"{c['mean_prompt_tokens']}\n")
    save_heatmaps(out / "ruler.png", cells, args.modes, args.tasks, args.lengths,
                  f"ruler: {Path(args.model).name}, haystack {args.haystack}, kernels {args.kernels}")
    (out / "summary.json").write_text(json.dumps(
        {"model": args.model, "haystack": args.haystack, "samples": args.samples, "seed": args.seed,
         "kernels": args.kernels, "seconds": seconds, "cells": cells, "answers": answers}, indent=2) + "\n")
    print(f"wrote {out}/ruler.csv, ruler.png, summary.json")
    return 0
