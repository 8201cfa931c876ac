"""`longserve serve`: one process serving the OpenAI HTTP API, gRPC and /metrics around the engine.

Ports open at once in the loading phase (/health 503, gRPC NOT_SERVING); the engine loads in a
worker thread, is warmed up with a one-token generation, then the server goes ready. SIGTERM
drains: health flips, new requests get 503/UNAVAILABLE, running ones finish within
`--drain-grace-seconds` (or are aborted), and the process exits 0. Logs are JSON lines on stderr.

Tensor parallelism (`--tensor-parallel-size N`): the replica's ranks may span pods (`--nnodes`, `--node-rank`,
`--master-addr`, `--master-port`, or LeaderWorkerSet / torchrun environment variables, `parallel.topology`).
The leader pod (node rank 0) serves as above, with its process as rank 0 and its other GPUs as worker
processes; a follower pod runs workers only and opens no port. A lost rank makes either exit non-zero.
Only the standard library is imported at module level (server/cli.py rule).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time

# JSON lines on stderr; a module of their own so worker processes log the same way without the API
from longserve.server.jsonlog import JsonFormatter, configure_logging  # noqa: F401 (JsonFormatter re-exported)

HELP = "serve a model over the OpenAI-compatible HTTP API, gRPC and Prometheus metrics"
log = logging.getLogger("longserve.serve")

def add_arguments(parser: argparse.ArgumentParser) -> None:
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", metavar="DIR", help="checkpoint directory (config.json, weights, tokenizer)")
    src.add_argument("--config", metavar="FILE", help="engine_config.json written by the operator")
    parser.add_argument("--host", default="0.0.0.0", help="listen address (default 0.0.0.0)")
    parser.add_argument("--port", type=int, help="HTTP port (default: config http_port, else 8000)")
    parser.add_argument("--grpc-port", type=int, help="gRPC port (default: config grpc_port, else 50051)")
    parser.add_argument("--served-model-name", help="model name clients send (default: the --model path)")
    parser.add_argument("--api-key-file", metavar="F",
                        help="file holding the bearer token clients must send (default: $LONGSERVE_API_KEY)")
    eng = parser.add_argument_group("engine (override --config values, or size a --model run)")
    eng.add_argument("--max-model-len", type=int, help="context window (default: the model's)")
    eng.add_argument("--max-output-tokens", type=int, help="default and cap for max_tokens (default 8192)")
    eng.add_argument("--max-num-seqs", type=int, help="concurrent sequences (default 16)")
    eng.add_argument("--prefill-chunk-tokens", type=int,
                     help="tokens per prefill step (default: on a GPU the largest of 131072..8192 that fits, as "
                          "the planner sizes it; on a CPU 8192)")
    eng.add_argument("--tensor-parallel-size", type=int, help="GPUs per replica, all pods (default 1)")
    tp = parser.add_argument_group("tensor parallelism across pods (default: LWS_* / torchrun-style env vars)")
    tp.add_argument("--nnodes", type=int, help="pods in the replica (env LWS_GROUP_SIZE or NNODES; default 1)")
    tp.add_argument("--node-rank", type=int,
                    help="this pod's index; 0 serves the APIs (env LWS_WORKER_INDEX or NODE_RANK; default 0)")
    tp.add_argument("--master-addr", help="the leader pod's address (env LWS_LEADER_ADDRESS or MASTER_ADDR)")
    tp.add_argument("--master-port", type=int,
                    help="rendezvous port on the leader (env MASTER_PORT; default 29500, a free one in one pod)")
    tp.add_argument("--dist-timeout-seconds", type=float,
                    help="timeout of one collective once running: a hung rank is noticed within it "
                         "(env LONGSERVE_DIST_TIMEOUT; default 120)")
    tp.add_argument("--dist-init-timeout-seconds", type=float,
                    help="how long ranks wait for each other at start-up: rendezvous and weight loading "
                         "(env LONGSERVE_DIST_INIT_TIMEOUT; default 600)")
    eng.add_argument("--gpu-memory-utilization", type=float,
                     help="fraction of the GPU's total memory the engine may use (default 0.9)")
    eng.add_argument("--kv-capacity-tokens", type=int, help="explicit KV capacity (default: from memory)")
    eng.add_argument("--kv-block-size", type=int, help="tokens per KV block (default 16)")
    eng.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), help="weights/activations dtype")
    eng.add_argument("--no-dca", dest="dca", action="store_false", default=None, help="disable dual chunk attention")
    eng.add_argument("--no-sparse-prefill", dest="sparse_prefill", action="store_false", default=None,
                     help="disable vertical-slash sparse prefill")
    eng.add_argument("--no-prefix-caching", dest="enable_prefix_caching", action="store_false", default=None,
                     help="compute every prompt in full instead of reusing the KV blocks of a cached prefix")
    eng.add_argument("--sparse-threshold", type=int, help="prompt length from which prefill is sparse")
    eng.add_argument("--seed", type=int, help="engine seed")
    ops = parser.add_argument_group("operations")
    ops.add_argument("--drain-grace-seconds", type=float, default=30.0,
                     help="on SIGTERM, how long running requests may finish before they are aborted (default 30)")
    ops.add_argument("--keepalive-seconds", type=float, default=10.0,
                     help="SSE keep-alive / gRPC progress interval while nothing else is sent (default 10)")
    ops.add_argument("--legacy-vllm-metrics", action="store_true",
                     help="accepted for compatibility; no effect: vllm:gpu_cache_usage_perc and "
                          "vllm:time_per_output_token_seconds are always exported as aliases")
    ops.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))


_ENGINE_FLAGS = ("max_model_len", "max_output_tokens", "max_num_seqs", "prefill_chunk_tokens",
                 "tensor_parallel_size", "gpu_memory_utilization", "kv_capacity_tokens", "kv_block_size", "dtype",
                 "dca", "sparse_prefill", "sparse_threshold", "seed", "enable_prefix_caching")


def build_config(args):
    """EngineConfig from --config (plus explicit overrides) or from --model and flags; ValueError if invalid."""
    from longserve.server.config import SCHEMA_VERSION, EngineConfig, load_model_facts
    overrides = {name: getattr(args, name) for name in _ENGINE_FLAGS if getattr(args, name) is not None}
    if args.served_model_name:
        overrides["served_model_name"] = args.served_model_name
    if args.port is not None:
        overrides["http_port"] = args.port
    if args.grpc_port is not None:
        overrides["grpc_port"] = args.grpc_port
    if args.config:
        try:
            with open(args.config, encoding="utf-8") as fh:
                text = fh.read()
        except OSError as exc:
            raise ValueError(f"cannot read --config {args.config}: {exc.strerror}") from None
        return EngineConfig.from_json(text).replace(**overrides)
    facts = load_model_facts(args.model)
    max_model_len = overrides.pop("max_model_len", facts.max_position_embeddings)
    values = dict(schema_version=SCHEMA_VERSION, runtime="native", model_path=args.model,
                  served_model_name=args.model, tensor_parallel_size=1, max_model_len=max_model_len,
                  max_num_seqs=16, max_output_tokens=min(8192, max_model_len - 1), prefill_chunk_tokens=8192,
                  gpu_memory_utilization=0.9)
    values.update(overrides)
    if "prefill_chunk_tokens" not in overrides:
        values["prefill_chunk_tokens"] = default_prefill_chunk(facts, values, args.model)
    return EngineConfig(**values)


def gpu_total_memory() -> int | None:
    """Total memory of the GPU the engine will use, or None without one (torch is imported only here)."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    return int(torch.cuda.mem_get_info()[1])


def default_prefill_chunk(facts, values: dict, model_dir: str) -> int:
    """The prefill chunk the planner would choose for this GPU: the largest candidate with which the weights,
    one max_model_len sequence of KV, the step transients (sparse ones sized by the checkpoint's own budgets when
    it has a sparse config) and the overhead fit `gpu_memory_utilization` of the GPU's total memory (with the
    planner's 10 % safety margin). On a CPU host memory is not profiled: 8192."""
    from longserve.server import memory_model as mm
    from longserve.server.config import DTYPE_BYTES

    total = gpu_total_memory()
    if total is None:
        log.info("prefill chunk %d tokens (CPU default)", mm.CPU_DEFAULT_CHUNK,
                 extra={"event": "prefill_chunk", "prefill_chunk_tokens": mm.CPU_DEFAULT_CHUNK})
        return mm.CPU_DEFAULT_CHUNK
    sparse_path = values.get("sparse_config_path") or os.path.join(model_dir, "sparse_attention_config.json")
    budgets = None
    if values.get("sparse_prefill", True) and os.path.exists(sparse_path):
        try:
            with open(sparse_path, encoding="utf-8") as fh:
                budgets = mm.sparse_budget_maxima(json.load(fh))
        except (OSError, ValueError, TypeError, AttributeError, IndexError) as exc:
            raise ValueError(f"{sparse_path}: cannot read the sparse attention config ({exc})") from None
    n = values["max_model_len"]
    chunk = mm.choose_chunk(facts, tp=values["tensor_parallel_size"], max_model_len=n, memory_per_gpu=total,
                            utilization=values["gpu_memory_utilization"],
                            dtype_bytes=DTYPE_BYTES[values.get("dtype", "bfloat16")], dca=values.get("dca", True),
                            sparse=budgets is not None, sparse_threshold=values.get("sparse_threshold"),
                            sparse_budgets=budgets)
    fallback = chunk is None
    if fallback:
        chunk = mm.chunk_candidates(n)[-1]
    log.log(logging.WARNING if fallback else logging.INFO,
            "prefill chunk %d tokens for max_model_len %d on a %.1f GB GPU%s", chunk, n, total / 1e9,
            ": nothing fits one full-length sequence, using the smallest chunk" if fallback else "",
            extra={"event": "prefill_chunk", "prefill_chunk_tokens": chunk, "gpu_total_bytes": total})
    return chunk


def read_api_key(args) -> str | None:
    if args.api_key_file:
        try:
            with open(args.api_key_file, encoding="utf-8") as fh:
                key = fh.read().strip()
        except OSError as exc:
            raise ValueError(f"cannot read --api-key-file {args.api_key_file}: {exc.strerror}") from None
        if not key:
            raise ValueError(f"--api-key-file {args.api_key_file} is empty")
        return key
    return os.environ.get("LONGSERVE_API_KEY") or None


def run(args) -> int:
    configure_logging(args.log_level)
    try:
        config = build_config(args)
        api_key = read_api_key(args)
    except ValueError as exc:
        print(f"longserve serve: {exc}", file=sys.stderr)
        return 2
    try:
        topology = resolve_topology(config, args) if config.tensor_parallel_size > 1 else None
    except ValueError as exc:
        print(f"longserve serve: {exc}", file=sys.stderr)
        return 2
    if topology is not None and not topology.is_leader:
        from longserve.server.parallel.workers import run_follower
        log.info("follower pod %d of %d: running ranks %d..%d, serving nothing", topology.node_rank, topology.nnodes,
                 topology.global_rank(0), topology.global_rank(topology.gpus_per_node - 1),
                 extra={"event": "tp_follower", "node_rank": topology.node_rank})
        return _leave_without_teardown(run_follower(config, topology))
    code = _serve(config, args, api_key, topology)
    return code if topology is None else _leave_without_teardown(code)


def _leave_without_teardown(code: int) -> int:
    """A tensor-parallel process exits here, skipping interpreter teardown: the group is already closed and our
    threads stopped, but gloo's C++ threads can still be joinable when Python finalizes, which aborts the process
    ("terminate called without an active exception", exit -6) after a clean stop and turns a drain into a crash for
    the kubelet. Logs and streams are flushed first."""
    import logging
    import os

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def resolve_topology(config, args):
    """Where this process sits in the replica (flags first, then the environment); ValueError if inconsistent."""
    from longserve.server.parallel.topology import resolve
    return resolve(config.tensor_parallel_size, nnodes=args.nnodes, node_rank=args.node_rank,
                   master_addr=args.master_addr, master_port=args.master_port, timeout_s=args.dist_timeout_seconds,
                   init_timeout_s=args.dist_init_timeout_seconds)


class _StopDuringLoad(Exception):
    """Raised by the SIGTERM handler to interrupt a model load: nothing is running, so exit at once."""


def _load_engine(config, topology=None):
    from longserve.server.engine.async_engine import AsyncEngine
    if config.tensor_parallel_size == 1:
        return AsyncEngine(config)
    from longserve.server.parallel.workers import exit_process
    return AsyncEngine(config, topology=topology, on_tp_failure=exit_process)


async def _warm_up(engine) -> None:
    """One short greedy generation through the asyncio path before declaring ready."""
    from longserve.server.sampling import SamplingParams
    ids = engine.encode("warm up") or [0]
    from longserve.server.api.engine_client import RequestFinished
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    events = [event async for event in engine.generate("warmup-0", ids, params)]
    if not any(isinstance(event, RequestFinished) for event in events):
        raise RuntimeError("warm-up generation ended without a result")


def _serve(config, args, api_key, topology=None) -> int:
    """HTTP/gRPC run on a background event loop; the engine is built on the main thread.

    Building the engine on the main thread matters on CPU: a build (and warm-up) in a worker thread
    leaves that thread's OpenMP team spin-waiting against the engine thread's, measured 5-15x slower
    decode on 2 cores (OMP_WAIT_POLICY=PASSIVE also cures it).
    """
    from longserve.server.api.app import BackgroundServer, ServingStack
    stack = ServingStack(config, host=args.host, api_key=api_key, keepalive_s=args.keepalive_seconds,
                         legacy_vllm_metrics=args.legacy_vllm_metrics)
    server = BackgroundServer(stack)
    stop = threading.Event()
    loading = True

    def on_signal(signum, _frame):
        log.info("received %s", signal.Signals(signum).name, extra={"event": "signal"})
        stop.set()
        if loading:
            raise _StopDuringLoad()
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    engine = None
    try:
        server.start()
        log.info("loading model", extra={"event": "loading", "model_path": config.model_path,
                                         "config": config.to_dict()})
        started = time.monotonic()
        try:
            engine = _load_engine(config) if topology is None else _load_engine(config, topology)
            server.call(_warm_up(engine), timeout=600)
        except _StopDuringLoad:
            log.info("stopped while loading", extra={"event": "stopped"})
            return 0
        except Exception:
            log.exception("engine failed to load", extra={"event": "load_failed"})
            server.call(stack.state.mark_dead())
            return 1
        load_seconds = time.monotonic() - started
        server.call(stack.set_engine(engine, load_seconds=load_seconds))
        loading = False
        info = getattr(engine, "model_info", None)
        log.info("ready", extra={"event": "ready", "load_seconds": round(load_seconds, 3),
                                 "http_port": stack.http_port, "grpc_port": stack.grpc_port,
                                 "prefill_chunk_tokens": config.prefill_chunk_tokens,
                                 "kv_capacity_tokens": getattr(info, "kv_capacity_tokens", None)})
        stop.wait()
        log.info("draining", extra={"event": "draining", "grace_seconds": args.drain_grace_seconds,
                                    "in_flight": len(stack.state.streams)})
        server.call(stack.drain(args.drain_grace_seconds), timeout=args.drain_grace_seconds + 60)
        log.info("stopped", extra={"event": "stopped"})
        return 0
    finally:
        loading = False
        if server.started:
            server.stop()
        _shutdown_engine(engine)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _shutdown_engine(engine) -> None:
    shutdown = getattr(engine, "shutdown", None)
    if shutdown is not None:
        try:
            shutdown()
        except Exception:
            log.exception("engine shutdown failed")
