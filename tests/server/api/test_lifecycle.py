"""Loading -> ready -> draining: health on both protocols, 503 for new work, in-flight requests finish or abort."""
from __future__ import annotations

import threading
import time

import grpc
import httpx
from grpc_health.v1 import health_pb2, health_pb2_grpc

NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVING = health_pb2.HealthCheckResponse.SERVING


def _grpc_health(server):
    with grpc.insecure_channel(server.stack.grpc_target) as ch:
        return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service="")).status


def test_loading_then_ready(server_factory, config, engine):
    srv = server_factory(config, None)
    base = srv.stack.http_url
    assert httpx.get(base + "/health").status_code == 503
    assert _grpc_health(srv) == NOT_SERVING
    r = httpx.post(base + "/v1/completions", json={"prompt": "a"})
    assert r.status_code == 503 and r.json()["error"]["type"] == "ServiceUnavailableError"
    assert httpx.get(base + "/v1/models").status_code == 503
    assert httpx.get(base + "/metrics").status_code == 200
    srv.call(srv.stack.set_engine(engine, load_seconds=1.5))
    assert httpx.get(base + "/health").status_code == 200 and httpx.get(base + "/health").content == b""
    assert _grpc_health(srv) == SERVING
    assert 'longserve_model_load_seconds{model_name="fake-model"} 1.5' in httpx.get(base + "/metrics").text


def _stream_in_background(url, body, sink):
    def run():
        with httpx.stream("POST", url, json=body, timeout=30) as r:
            sink["status"] = r.status_code
            sink["lines"] = [line for line in r.iter_lines() if line.startswith("data: ")]
    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_drain_finishes_in_flight_and_refuses_new(server_factory, config, fake_engine_cls):
    engine = fake_engine_cls(config, token_delay=0.01)
    srv = server_factory(config, engine)
    base = srv.stack.http_url
    sink: dict = {}
    thread = _stream_in_background(base + "/v1/completions",
                                   {"prompt": "a", "max_tokens": 60, "stream": True}, sink)
    deadline = time.monotonic() + 5
    while not srv.stack.state.streams and time.monotonic() < deadline:
        time.sleep(0.005)
    drain = threading.Thread(target=srv.call, args=(srv.stack.drain(10.0),))
    drain.start()
    time.sleep(0.05)
    assert httpx.get(base + "/health").status_code == 503
    assert _grpc_health(srv) == NOT_SERVING
    assert httpx.post(base + "/v1/completions", json={"prompt": "a"}).status_code == 503
    thread.join(10)
    drain.join(10)
    assert sink["status"] == 200 and sink["lines"][-1] == "data: [DONE]"
    assert '"finish_reason":"length"' in sink["lines"][-2]


def test_drain_aborts_after_grace(server_factory, config, fake_engine_cls):
    engine = fake_engine_cls(config, token_delay=0.02)
    srv = server_factory(config, engine)
    sink: dict = {}
    thread = _stream_in_background(srv.stack.http_url + "/v1/chat/completions",
                                   {"messages": [{"role": "user", "content": "x"}], "max_tokens": 500,
                                    "stream": True}, sink)
    deadline = time.monotonic() + 5
    while not srv.stack.state.streams and time.monotonic() < deadline:
        time.sleep(0.005)
    started = time.monotonic()
    srv.call(srv.stack.drain(0.2))
    thread.join(10)
    assert time.monotonic() - started < 3
    assert '"finish_reason":"abort"' in sink["lines"][-2] and sink["lines"][-1] == "data: [DONE]"
    assert engine.load_stats().kv_blocks_used == 0
