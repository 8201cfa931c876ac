"""Per-runtime container details: command, environment, ports and probes (pure).

`native` runs `longserve serve` on the mounted EngineConfig; `vllm` and `sglang` run the upstream
launch command with the planner's numbers (docs/operator.md#runtimes), HTTP only. Every runtime serves
`/health` on the HTTP port, so the probes are the same; none of them runs a generation.

A replica spanning pods (a LeaderWorkerSet group, render_lws.py) runs each runtime's own
multi-node launch (`multi_node_command`), with ranks and the leader's address from the variables
LeaderWorkerSet injects (flags use Kubernetes' `$(VAR)` expansion of them).
"""
from __future__ import annotations

import math
import shlex

from longserve.server.config import EngineConfig

CONFIG_DIR = "/etc/longserve"
CONFIG_FILE = "engine_config.json"
STARTUP_FLOOR_SECONDS = 1800
LOAD_BYTES_PER_SECOND = 100e6        # pessimistic weight load rate: network volume, cold page cache
PROBE_PERIOD_SECONDS = 10
RENDEZVOUS_PORT = 29500              # torch.distributed store on the leader (native and SGLang)
RAY_PORT = 6379                      # the Ray head on a vLLM group's leader

UPSTREAM_ENV = {
    "vllm": {"VLLM_USE_V1": "0", "VLLM_ATTENTION_BACKEND": "DUAL_CHUNK_FLASH_ATTN",
             "VLLM_ALLOW_LONG_MAX_MODEL_LEN": "1"},
    "sglang": {},
}


def startup_probe_seconds(weight_bytes: int) -> int:
    """Budget for loading weights before liveness applies: max(1800, 2·W / 100 MB/s + 600)."""
    return max(STARTUP_FLOOR_SECONDS, math.ceil(2 * weight_bytes / LOAD_BYTES_PER_SECOND + 600))


def command(cfg: EngineConfig, extra_args: tuple = ()) -> list[str]:
    """The container command line for `cfg.runtime`."""
    if cfg.runtime == "native":
        args = ["longserve", "serve", "--config", f"{CONFIG_DIR}/{CONFIG_FILE}"]
    elif cfg.runtime == "vllm":
        args = ["vllm", "serve", cfg.model_path, "--served-model-name", cfg.served_model_name,
                "--host", "0.0.0.0", "--port", str(cfg.http_port),
                "--tensor-parallel-size", str(cfg.tensor_parallel_size),
                "--max-model-len", str(cfg.max_model_len), "--max-num-seqs", str(cfg.max_num_seqs),
                "--enable-chunked-prefill", "--max-num-batched-tokens", str(cfg.prefill_chunk_tokens),
                "--enforce-eager", "--gpu-memory-utilization", f"{cfg.gpu_memory_utilization:.2f}"]
    elif cfg.runtime == "sglang":
        args = ["python3", "-m", "sglang.launch_server", "--model-path", cfg.model_path,
                "--served-model-name", cfg.served_model_name, "--host", "0.0.0.0",
                "--port", str(cfg.http_port), "--tp", str(cfg.tensor_parallel_size),
                "--context-length", str(cfg.max_model_len), "--max-running-requests", str(cfg.max_num_seqs),
                "--chunked-prefill-size", str(cfg.prefill_chunk_tokens),
                "--mem-fraction-static", f"{cfg.gpu_memory_utilization:.2f}",
                "--attention-backend", "dual_chunk_flash_attn", "--enable-metrics"]
    else:
        raise ValueError(f"unknown runtime {cfg.runtime!r}")
    return args + [str(a) for a in extra_args]


def env(cfg: EngineConfig) -> list[dict]:
    """Runtime-specific environment (user env and secrets are added by render)."""
    items = [{"name": "PYTHONSAFEPATH", "value": "1"}]
    items += [{"name": k, "value": v} for k, v in sorted(UPSTREAM_ENV.get(cfg.runtime, {}).items())]
    return items


def ports(cfg: EngineConfig) -> list[dict]:
    """Container ports: HTTP (OpenAI API, /health, /metrics) always, gRPC for native only."""
    items = [{"name": "http", "containerPort": cfg.http_port, "protocol": "TCP"}]
    if cfg.runtime == "native":
        items.append({"name": "grpc", "containerPort": cfg.grpc_port, "protocol": "TCP"})
    return items


def probes(weight_bytes: int) -> dict:
    """Startup, readiness and liveness on /health (docs/operator.md#pod)."""
    def http_get() -> dict:
        return {"path": "/health", "port": "http"}
    startup = startup_probe_seconds(weight_bytes)
    return {
        "startupProbe": {"httpGet": http_get(), "periodSeconds": PROBE_PERIOD_SECONDS, "timeoutSeconds": 5,
                         "failureThreshold": math.ceil(startup / PROBE_PERIOD_SECONDS)},
        "readinessProbe": {"httpGet": http_get(), "periodSeconds": 10, "timeoutSeconds": 5,
                           "failureThreshold": 3},
        "livenessProbe": {"httpGet": http_get(), "periodSeconds": 30, "timeoutSeconds": 10,
                          "failureThreshold": 5},
    }


def rank_env(cpu: str | None, gpus: int, *, runtime: str, tensor_parallel_size: int,
             startup_seconds: int) -> list[dict]:
    """What the ranks of a pod need: OMP_NUM_THREADS, the pod's CPUs shared by its GPU processes
    (unset, every rank's torch would size its thread pool to all the node's cores); and for native
    TP, the start-up timeout of the process group (the rendezvous and the agreement on KV capacity,
    which waits for the slowest rank's weight load) set to the startup budget, so it never gives
    up before the startup probe would. Collectives keep the engine's own, short timeout."""
    items = [{"name": "OMP_NUM_THREADS", "value": str(max(1, int(_cpus(cpu) // max(1, gpus))))}]
    if runtime == "native" and tensor_parallel_size > 1:
        items.append({"name": "LONGSERVE_DIST_INIT_TIMEOUT", "value": str(startup_seconds)})
    return items


def _cpus(cpu: str | None) -> float:
    text = str(cpu or "1")
    return int(text[:-1]) / 1000 if text.endswith("m") else float(text)


def multi_node_command(runtime: str, command: list[str], *, leader: bool, pods: int,
                       startup_seconds: int) -> list[str]:
    """The command of a pod in a group of `pods` pods (one per node), from the single-pod `command`.

    native: the same command; ranks and the leader come from the LWS variables (the start-up
    timeout is in the environment, `rank_env`). SGLang: its own flags (`--nnodes --node-rank
    --dist-init-addr`). vLLM: a Ray cluster, the launch its DCA-capable releases support across
    nodes (its V0 engine, which the DCA backend needs, has no multi-node multiprocessing launch):
    the leader starts the Ray head and `vllm serve` with the Ray executor, which waits for the
    workers' GPUs; the workers only join the Ray cluster.
    """
    if runtime == "native":
        return list(command)
    if runtime == "sglang":
        return command + ["--nnodes", str(pods), "--node-rank", "$(LWS_WORKER_INDEX)",
                          "--dist-init-addr", f"$(LWS_LEADER_ADDRESS):{RENDEZVOUS_PORT}"]
    if runtime == "vllm":
        if not leader:
            return ["sh", "-c",
                    f"exec ray start --address=$LWS_LEADER_ADDRESS:{RAY_PORT} --block --disable-usage-stats"]
        serve = shlex.join(command + ["--distributed-executor-backend", "ray"])
        return ["sh", "-c", f"ray start --head --port={RAY_PORT} --disable-usage-stats && exec {serve}"]
    raise ValueError(f"unknown runtime {runtime!r}")


def multi_node_env(runtime: str) -> list[dict]:
    """Environment of every pod of a group (beside the variables LeaderWorkerSet injects)."""
    if runtime == "native":
        return [{"name": "LONGSERVE_MASTER_PORT", "value": str(RENDEZVOUS_PORT)}]
    return []


def rendezvous_port(runtime: str) -> dict:
    """The port the group's other pods first connect to on the leader."""
    return {"name": "rendezvous", "containerPort": RAY_PORT if runtime == "vllm" else RENDEZVOUS_PORT,
            "protocol": "TCP"}
