"""`longserve bench serve`: a bounded HTTP load against an OpenAI-compatible endpoint.

Sends `--requests` streaming completions with mixed prompt lengths, `--concurrency` at a time,
and prints throughput, TTFT p50/p99 and the error count (exit 1 if any request failed). Without
`--url` it starts `longserve serve` itself on `--model` (default: a freshly built tiny random
checkpoint) on 127.0.0.1 and stops it with SIGTERM afterwards, checking it exits 0.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time

HELP = "HTTP load (streaming completions) against --url or a server it starts: throughput, TTFT, errors"

WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda river mountain cloud signal "
         "engine token window memory chunk attention prefill decode stream").split()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", help="base URL of a running server, e.g. http://127.0.0.1:8000")
    parser.add_argument("--model", metavar="DIR", help="start `longserve serve` on this checkpoint (no --url)")
    parser.add_argument("--requests", type=int, default=200, help="number of requests (default 200)")
    parser.add_argument("--concurrency", type=int, default=16, help="requests in flight (default 16)")
    parser.add_argument("--min-prompt-words", type=int, default=4)
    parser.add_argument("--max-prompt-words", type=int, default=200)
    parser.add_argument("--max-tokens", type=int, default=16, help="largest max_tokens; each request draws 1..N")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--api-key", default=os.environ.get("LONGSERVE_API_KEY", "none"))
    parser.add_argument("--serve-arg", action="append", default=[], metavar="ARG",
                        help="extra argument for the server it starts (repeatable), e.g. --serve-arg=--dtype=float32")
    parser.add_argument("--startup-timeout", type=float, default=300.0, help="seconds to wait for readiness")
    parser.add_argument("--request-timeout", type=float, default=300.0)
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON object")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]); NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), -(-len(ordered) * q // 100)))
    return ordered[int(rank) - 1]


class LocalServer:
    """`longserve serve` in a subprocess on free 127.0.0.1 ports; `stop()` sends SIGTERM and returns the exit code."""

    def __init__(self, model_dir: str, log_path: str, extra_args: list[str] = ()):
        self.port = _free_port()
        grpc_port = _free_port()
        while grpc_port == self.port:
            grpc_port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.grpc_target = f"127.0.0.1:{grpc_port}"
        self._log = open(log_path, "wb")
        cmd = [sys.executable, "-m", "longserve.server.cli", "serve", "--model", model_dir, "--host", "127.0.0.1",
               "--port", str(self.port), "--grpc-port", str(grpc_port), "--served-model-name", "bench",
               "--drain-grace-seconds", "10", *extra_args]
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, cwd=tempfile.gettempdir(),
                                     env={**os.environ, "PYTHONSAFEPATH": "1"})

    def wait_ready(self, timeout: float) -> None:
        import httpx
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"longserve serve exited with {self.proc.returncode} during start-up")
            try:
                ready = httpx.get(self.url + "/health", timeout=1.0).status_code == 200
            except httpx.HTTPError:   # port not open yet
                ready = False
            if ready:
                return
            time.sleep(0.2)
        raise RuntimeError(f"longserve serve not ready after {timeout:.0f}s")

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


def make_prompts(n: int, lo: int, hi: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))) for _ in range(n)]


async def _one(client, url: str, model: str, prompt: str, max_tokens: int, timeout: float) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}}
    started = time.perf_counter()
    ttft, usage, error = None, None, None
    try:
        async with client.stream("POST", url + "/v1/completions", json=body, timeout=timeout) as resp:
            if resp.status_code != 200:
                return {"error": f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}"}
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    error = chunk["error"].get("message", "error event")
                elif chunk.get("choices") and ttft is None:
                    ttft = time.perf_counter() - started
                if chunk.get("usage"):
                    usage = chunk["usage"]
    except Exception as exc:   # a transport failure is a failed request, counted, not fatal
        return {"error": f"{type(exc).__name__}: {exc}"}
    if error or usage is None:
        return {"error": error or "stream ended without a usage chunk"}
    return {"ttft": ttft, "latency": time.perf_counter() - started, "prompt_tokens": usage["prompt_tokens"],
            "completion_tokens": usage["completion_tokens"]}


async def _fit(client, url: str, prompt: str, budget: int) -> str:
    """Drop words until the prompt leaves room for the completion (checked with /tokenize, not timed)."""
    words = prompt.split()
    while len(words) > 1:
        count = (await client.post(url + "/tokenize", json={"prompt": " ".join(words)}, timeout=30)).json()["count"]
        if count <= budget:
            break
        words = words[:max(1, len(words) * budget // (count + 1))]
    return " ".join(words)


async def run_load(url: str, *, requests: int, concurrency: int, prompts: list[str], max_tokens: int,
                   seed: int, api_key: str, timeout: float) -> dict:
    import asyncio

    import httpx
    rng = random.Random(seed + 1)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    headers = {"Authorization": f"Bearer {api_key}"}
    async with httpx.AsyncClient(limits=limits, headers=headers) as client:
        models = (await client.get(url + "/v1/models", timeout=30)).json()["data"]
        model = models[0]["id"]
        if models[0].get("max_model_len"):
            budget = models[0]["max_model_len"] - max_tokens
            prompts = [await _fit(client, url, p, budget) for p in prompts]
        gate = asyncio.Semaphore(concurrency)

        async def bounded(prompt, n_tokens):
            async with gate:
                return await _one(client, url, model, prompt, n_tokens, timeout)
        jobs = [bounded(prompts[i % len(prompts)], rng.randint(1, max_tokens)) for i in range(requests)]
        started = time.perf_counter()
        results = await asyncio.gather(*jobs)
        elapsed = time.perf_counter() - started
    ok = [r for r in results if "error" not in r]
    errors = [r["error"] for r in results if "error" in r]
    ttfts = [r["ttft"] for r in ok if r["ttft"] is not None]
    output_tokens = sum(r["completion_tokens"] for r in ok)
    return {"url": url, "model": model, "requests": requests, "concurrency": concurrency,
            "completed": len(ok), "errors": len(errors), "first_errors": errors[:3],
            "elapsed_s": round(elapsed, 3), "requests_per_s": round(len(ok) / elapsed, 3),
            "output_tokens_per_s": round(output_tokens / elapsed, 2),
            "prompt_tokens": sum(r["prompt_tokens"] for r in ok), "output_tokens": output_tokens,
            "ttft_p50_ms": round(percentile(ttfts, 50) * 1e3, 2), "ttft_p99_ms": round(percentile(ttfts, 99) * 1e3, 2)}


def _print(summary: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(summary, sort_keys=True))
        return
    print(f"serve load: {summary['completed']}/{summary['requests']} requests at concurrency "
          f"{summary['concurrency']} in {summary['elapsed_s']} s against {summary['url']} ({summary['model']})")
    print(f"  throughput  {summary['requests_per_s']} req/s, {summary['output_tokens_per_s']} output tok/s")
    print(f"  TTFT        p50 {summary['ttft_p50_ms']} ms, p99 {summary['ttft_p99_ms']} ms")
    print(f"  errors      {summary['errors']}" + (f"  e.g. {summary['first_errors'][0]}" if summary["errors"] else ""))
    if "server_exit_code" in summary:
        print(f"  server      exited {summary['server_exit_code']} after SIGTERM")


def run(args) -> int:
    import asyncio
    if args.requests < 1 or args.concurrency < 1 or args.max_tokens < 1:
        print("bench serve: --requests, --concurrency and --max-tokens must be >= 1", file=sys.stderr)
        return 2
    if not 1 <= args.min_prompt_words <= args.max_prompt_words:
        print("bench serve: need 1 <= --min-prompt-words <= --max-prompt-words", file=sys.stderr)
        return 2
    prompts = make_prompts(min(args.requests, 64), args.min_prompt_words, args.max_prompt_words, args.seed)
    server, workdir = None, None
    url = args.url.rstrip("/") if args.url else None
    try:
        if url is None:
            workdir = tempfile.TemporaryDirectory(prefix="longserve-bench-")
            extra = list(args.serve_arg)
            if args.model is None:   # the tiny CPU checkpoint: small float32 KV, sized for the load
                model_dir = _tiny_checkpoint(workdir.name)
                extra = ["--dtype", "float32", "--max-model-len", "2048", "--kv-capacity-tokens", "65536",
                         "--max-num-seqs", str(max(args.concurrency, 1)), *extra]
            else:
                model_dir = args.model
            server = LocalServer(model_dir, os.path.join(workdir.name, "serve.log"), extra)
            server.wait_ready(args.startup_timeout)
            url = server.url
        summary = asyncio.run(run_load(url, requests=args.requests, concurrency=args.concurrency, prompts=prompts,
                                       max_tokens=args.max_tokens, seed=args.seed, api_key=args.api_key,
                                       timeout=args.request_timeout))
    except Exception as exc:   # CLI boundary: unreachable server, failed start-up, bad reply
        print(f"bench serve: {type(exc).__name__}: {exc}", file=sys.stderr)
        summary = None
    finally:
        code = server.stop() if server is not None else None
        if workdir is not None:
            workdir.cleanup()
    if summary is None:
        return 1
    if code is not None:
        summary["server_exit_code"] = code
    _print(summary, args.json)
    return 0 if summary["errors"] == 0 and code in (None, 0) else 1


def _tiny_checkpoint(root: str) -> str:
    from longserve.server.tiny_checkpoint import build_tiny_checkpoint
    path = os.path.join(root, "tiny")
    build_tiny_checkpoint(path)
    return path
