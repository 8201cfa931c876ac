"""`longserve bench ppl`: perplexity by context length through the server's prompt log-probabilities.

Why: DCA's claim is that a model keeps reading past its training length; perplexity by context length shows
it without any task on top. For each mode (DCA on, DCA off, DCA with sparse prefill) the bench starts
`longserve serve`'s stack in-process on 127.0.0.1 (a random port), and for each length scores windows of that
many tokens of the text with `/v1/completions` (`echo: true`, `logprobs: 0`, `max_tokens: 0`: the scoring
request lm-eval sends). It reports the perplexity of every scored token of the window and of its last quarter
(the tail, where a model that lost track of positions degrades first). Output: a table on stdout and, in --out,
`ppl.json`, `ppl.md` and `ppl.png`.

`--memory` measures instead what scoring costs in host memory: for each length, one fresh process runs the
offline engine on one window with and one without prompt log-probabilities (same KV capacity) and reports its
peak RSS; log-probabilities computed in bounded LM-head blocks keep the difference flat across lengths.

The default text is the demo model's training distribution (bench/demo_prompts.py: a passkey prompt in its chat
template with varied filler), so on models/demo-passkey the numbers mean something; `--text FILE` scores any
UTF-8 text.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

HELP = "perplexity by context length via the server's prompt log-probabilities (DCA on/off, sparse on/off)"

MODES = {                     # name -> engine settings
    "dca": {"dca": True, "sparse_prefill": False},
    "no-dca": {"dca": False, "sparse_prefill": False},
    "dca+sparse": {"dca": True, "sparse_prefill": True},
}


def _ints(text: str) -> list[int]:
    try:
        vals = sorted({int(x) for x in text.replace(",", " ").split()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers, got {text!r}") from None
    if not vals or vals[0] < 2:
        raise argparse.ArgumentTypeError("lengths must be integers >= 2")
    return vals


def _modes(text: str) -> list[str]:
    names = [x for x in text.replace(",", " ").split() if x]
    bad = [n for n in names if n not in MODES]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"modes are {', '.join(MODES)}; got {text!r}")
    return names


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="checkpoint directory (Hugging Face layout)")
    p.add_argument("--text", default=None,
                   help="UTF-8 text file to score (default: demo-style passkey text, the demo model's training "
                        "distribution)")
    p.add_argument("--lengths", type=_ints, required=True, help="window lengths in tokens, e.g. 256,512,1024,4096")
    p.add_argument("--modes", type=_modes, default=list(MODES), help=f"comma list of {', '.join(MODES)} (default all)")
    p.add_argument("--windows", type=int, default=1,
                   help="windows per length: consecutive, non-overlapping slices of the text (default 1)")
    p.add_argument("--sparse-threshold", type=int, default=None,
                   help="sparse prefill threshold in tokens for dca+sparse (default: the model's config)")
    p.add_argument("--prefill-chunk-tokens", type=int, default=2048, help="prefill chunk (default 2048)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--seed", type=int, default=0, help="seed of the default text (default 0)")
    p.add_argument("--out", default=None, help="directory for ppl.json, ppl.md and ppl.png")
    p.add_argument("--memory", action="store_true",
                   help="report peak RSS of scoring each length (offline engine, a process per run) with and "
                        "without prompt log-probabilities, instead of perplexity")


def demo_text(tokenizer, tokens: int, seed: int) -> str:
    """A demo-style passkey prompt (chat template, varied filler) of at least `tokens` tokens."""
    from longserve.bench.demo_prompts import chat_prompt, passkey_sample, random_digits

    rng = random.Random(seed)
    n = max(8, tokens // 6)
    while True:
        sample = passkey_sample(n, 0.5, random_digits(rng, 5), "varied", rng)
        text = chat_prompt(sample.prompt)
        if len(tokenizer.encode(text)) >= tokens:
            return text
        n *= 2


def perplexities(token_logprobs: list[float | None]) -> tuple[float, float]:
    """(perplexity of all scored tokens, of the last quarter of the window); the first token has none."""
    values = [lp for lp in token_logprobs if lp is not None]
    if not values:
        raise ValueError("no scored tokens (a window needs at least two tokens)")
    tail = values[-max(1, len(token_logprobs) // 4):]
    return math.exp(-sum(values) / len(values)), math.exp(-sum(tail) / len(tail))


def _score(url: str, model: str, ids: list[int]) -> list[float | None]:
    import httpx

    body = {"model": model, "prompt": ids, "echo": True, "logprobs": 0, "max_tokens": 0}
    resp = httpx.post(url + "/v1/completions", json=body, timeout=None)
    if resp.status_code != 200:
        raise RuntimeError(f"scoring {len(ids)} tokens failed: HTTP {resp.status_code} {resp.text[:300]}")
    logprobs = resp.json()["choices"][0]["logprobs"]["token_logprobs"]
    if len(logprobs) != len(ids):
        raise RuntimeError(f"expected {len(ids)} prompt log-probabilities, got {len(logprobs)}")
    return logprobs


def run_mode(args, mode: str, windows: dict[int, list[list[int]]]) -> dict[int, dict]:
    """Serve the model with `mode`'s settings and score every window; length -> {ppl, tail_ppl, seconds}."""
    from longserve.server.api.app import BackgroundServer, ServingStack
    from longserve.server.engine.async_engine import AsyncEngine
    from longserve.server.engine.offline import default_engine_config

    longest = max(windows)
    config = default_engine_config(args.model, max_model_len=longest + 1, max_output_tokens=1, max_num_seqs=1,
                                   prefill_chunk_tokens=min(args.prefill_chunk_tokens, _round_up(longest, 16)),
                                   kv_capacity_tokens=_round_up(longest + 16, 16), dtype=args.dtype,
                                   sparse_threshold=args.sparse_threshold, **MODES[mode])
    engine = AsyncEngine(config, device=args.device, warmup=False)
    server = BackgroundServer(ServingStack(config, host="127.0.0.1", http_port=0, grpc_port=0)).start(engine)
    out = {}
    try:
        for length, group in windows.items():
            start = time.monotonic()
            scored = [_score(server.stack.http_url, config.served_model_name, ids) for ids in group]
            pairs = [perplexities(lp) for lp in scored]
            # windows are combined by their mean log-likelihood (geometric mean of perplexities)
            ppl = math.exp(sum(math.log(a) for a, _ in pairs) / len(pairs))
            tail = math.exp(sum(math.log(b) for _, b in pairs) / len(pairs))
            out[length] = {"ppl": ppl, "tail_ppl": tail, "seconds": time.monotonic() - start,
                           "windows": len(group)}
            print(f"  {mode:>10}  {length:>7}  ppl {ppl:8.3f}  tail {tail:8.3f}", flush=True)
    finally:
        server.stop()
        engine.shutdown()
    return out


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def table(results: dict[str, dict[int, dict]], lengths: list[int]) -> str:
    modes = list(results)
    head = "| length | " + " | ".join(f"{m} ppl | {m} tail" for m in modes) + " |"
    rule = "|---:|" + "---:|---:|" * len(modes)
    rows = [f"| {n} | " + " | ".join(f"{results[m][n]['ppl']:.3f} | {results[m][n]['tail_ppl']:.3f}" for m in modes)
            + " |" for n in lengths]
    return "\n".join([head, rule, *rows])


def plot(results: dict[str, dict[int, dict]], lengths: list[int], path: Path, title: str) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for mode, by_len in results.items():
        line, = ax.plot(lengths, [by_len[n]["ppl"] for n in lengths], marker="o", label=f"{mode}")
        ax.plot(lengths, [by_len[n]["tail_ppl"] for n in lengths], marker="x", linestyle="--",
                color=line.get_color(), label=f"{mode} (last quarter)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [str(n) for n in lengths])
    ax.set_yscale("log")
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("perplexity")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _peak_rss(model: str, ids: list[int], capacity: int, chunk: int, dtype: str, score: bool, queue) -> None:
    """Child process: score (or just prefill) `ids` with the offline engine; put its peak RSS in bytes."""
    import resource

    from longserve.server.engine import LLM, SamplingParams

    llm = LLM(model, max_model_len=capacity, kv_capacity_tokens=capacity, prefill_chunk_tokens=chunk,
              max_num_seqs=1, dtype=dtype, sparse_prefill=False)     # the scoring cost does not depend on it
    params = SamplingParams(max_tokens=0, prompt_logprobs=1) if score else SamplingParams(max_tokens=1)
    out = llm.generate([ids], params)[0]
    if score and len(out.prompt_logprobs) != len(ids):
        raise RuntimeError("incomplete prompt log-probabilities")
    queue.put(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def memory_table(args, windows: dict[int, list[list[int]]]) -> str:
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    capacity = _round_up(max(windows) + 16, 16)
    chunk = min(args.prefill_chunk_tokens, capacity - 16)
    rows = ["| length | peak RSS, prefill only (MB) | peak RSS, prompt logprobs (MB) | difference (MB) |",
            "|---:|---:|---:|---:|"]
    for length, group in windows.items():
        peaks = []
        for score in (False, True):
            queue = ctx.Queue()
            proc = ctx.Process(target=_peak_rss, args=(args.model, group[0], capacity, chunk, args.dtype, score,
                                                        queue))
            proc.start()
            peaks.append(queue.get())
            proc.join()
        rows.append(f"| {length} | {peaks[0] / 2**20:.1f} | {peaks[1] / 2**20:.1f} | "
                    f"{(peaks[1] - peaks[0]) / 2**20:+.1f} |")
        print(rows[-1], flush=True)
    return "\n".join(rows)


def run(args) -> int:
    from longserve.server.tokenizer import Tokenizer

    if args.windows < 1:
        raise SystemExit("--windows must be >= 1")
    tokenizer = Tokenizer(args.model)
    need = max(args.lengths) * args.windows
    if args.text:
        text = Path(args.text).read_text(encoding="utf-8")
    else:
        text = demo_text(tokenizer, need, args.seed)
    ids = tokenizer.encode(text)
    if len(ids) < need:
        raise SystemExit(f"{args.text}: {len(ids)} tokens, the longest length x windows needs {need}")
    windows = {n: [ids[w * n:(w + 1) * n] for w in range(args.windows)] for n in args.lengths}
    print(f"scoring {len(args.lengths)} lengths x {args.windows} window(s) of {args.text or 'demo text'} "
          f"({len(ids)} tokens) with {args.model}", flush=True)
    if args.memory:
        md = memory_table(args, windows)
        if args.out:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            (Path(args.out) / "memory.md").write_text(md + "\n", encoding="utf-8")
        return 0
    results = {mode: run_mode(args, mode, windows) for mode in args.modes}
    md = table(results, args.lengths)
    print(md)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        summary = {"model": args.model, "text": args.text or "demo", "lengths": args.lengths,
                   "windows": args.windows, "results": {m: {str(n): v for n, v in r.items()}
                                                        for m, r in results.items()}}
        (out / "ppl.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        (out / "ppl.md").write_text(md + "\n", encoding="utf-8")
        if plot(results, args.lengths, out / "ppl.png", f"perplexity by context length: {Path(args.model).name}"):
            print(f"wrote {out / 'ppl.png'}")
    return 0
