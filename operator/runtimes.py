"""Per-runtime container details: command, environment, ports and probes (pure).

`native` runs `longserve serve` on the mounted EngineConfig; `vllm` and `sglang` run the upstream
launch command with the planner's numbers (serving.md §4.3), HTTP only. Every runtime serves
`/health` on the HTTP port, so the probes are the same; none of them runs a generation.
"""
from __future__ import annotations

import math

from longserve.server.config import EngineConfig

CONFIG_DIR = "/etc/longserve"
CONFIG_FILE = "engine_config.json"
STARTUP_FLOOR_SECONDS = 1800
LOAD_BYTES_PER_SECOND = 100e6        # pessimistic weight load rate: network volume, cold page cache
PROBE_PERIOD_SECONDS = 10

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
    """Startup, readiness and liveness on /health (operator.md §6)."""
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
