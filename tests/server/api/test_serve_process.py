"""`longserve serve` as a real process on the tiny checkpoint: loading -> ready -> SIGTERM drain -> exit 0."""
from __future__ import annotations

import json
import signal
import time

import grpc
import httpx
from grpc_health.v1 import health_pb2, health_pb2_grpc

from longserve.bench.serve_load import LocalServer


def _health(url: str, target: str) -> tuple[int | None, int | None]:
    try:
        http = httpx.get(url + "/health", timeout=1).status_code
    except httpx.HTTPError:
        http = None
    try:
        with grpc.insecure_channel(target) as ch:
            status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=1).status
    except grpc.RpcError:
        status = None
    return http, status


def test_serve_process_lifecycle_and_sigterm_drain(tiny_checkpoint, tmp_path):
    """Spawned through the bench's LocalServer (free 127.0.0.1 ports), as `longserve bench serve` does."""
    log_path = tmp_path / "serve.log"
    server = LocalServer(tiny_checkpoint, str(log_path), [
        "--dtype", "float32", "--max-model-len", "2048", "--max-output-tokens", "1024",
        "--prefill-chunk-tokens", "64", "--kv-capacity-tokens", "16384", "--drain-grace-seconds", "20"])
    proc, url = server.proc, server.url
    target = server.grpc_target
    try:
        seen = []
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and proc.poll() is None:
            state = _health(url, target)
            if state[0] is not None and (not seen or seen[-1] != state):
                seen.append(state)
            if state == (200, health_pb2.HealthCheckResponse.SERVING):
                break
            time.sleep(0.05)
        assert seen and seen[-1] == (200, health_pb2.HealthCheckResponse.SERVING), (seen, log_path.read_text())
        assert seen[0] == (503, health_pb2.HealthCheckResponse.NOT_SERVING), seen     # ports answer while loading

        lines, drained = [], None
        with httpx.stream("POST", url + "/v1/completions", timeout=60, json={
                "model": "bench", "prompt": "The sky is blue.", "max_tokens": 300, "stream": True,
                "ignore_eos": True, "stream_options": {"include_usage": True}}) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    lines.append(line)
                    if len(lines) == 3:
                        proc.send_signal(signal.SIGTERM)
                        time.sleep(0.2)
                        drained = _health(url, target)
                        refused = httpx.post(url + "/v1/completions", json={"prompt": "x"}, timeout=5)
        assert drained == (503, health_pb2.HealthCheckResponse.NOT_SERVING)
        assert refused.status_code == 503 and refused.json()["error"]["type"] == "ServiceUnavailableError"
        assert lines[-1] == "data: [DONE]" and '"completion_tokens":300' in lines[-2]
        assert '"finish_reason":"length"' in lines[-3]
        assert proc.wait(timeout=30) == 0
    finally:
        server.stop(timeout=10)             # no-op once it exited; kills it if a check above failed
    events = [json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")]
    assert {"loading", "ready", "draining", "stopped"} <= {e.get("event") for e in events}
    assert all({"ts", "level", "logger", "msg"} <= set(e) for e in events)
