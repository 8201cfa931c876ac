"""Raw SSE: framing, prefill-progress and keep-alive comments, disconnect aborts and frees KV; goldens."""
from __future__ import annotations

import json
import re
import time

import httpx
import pytest

MSG = [{"role": "user", "content": "hi"}]


def _wait_until(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def _normalize(text: str) -> str:
    text = re.sub(r'"(chatcmpl|cmpl)-[0-9a-f]{32}"', r'"\1-ID"', text)
    return re.sub(r'"created":\s?\d+', '"created":0', text)


def test_sse_framing_and_prefill_progress(server):
    body = {"model": "fake-model", "prompt": "p" * 600, "max_tokens": 3, "stream": True, "seed": 1}
    with httpx.stream("POST", server.stack.http_url + "/v1/completions", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["cache-control"] == "no-cache" and r.headers["x-accel-buffering"] == "no"
        raw = r.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    assert all(e.startswith(("data: ", ": ")) and "\n" not in e for e in events[:-1])
    assert [e for e in events if e.startswith(": prefill")] == [
        ": prefill 256/600", ": prefill 512/600", ": prefill 600/600"]
    assert all("event:" not in e and not e.startswith("id:") for e in events)


def test_headers_before_prefill_then_keepalives(server_factory, config, fake_engine_cls):
    engine = fake_engine_cls(config, chunk_delay=0.3)
    srv = server_factory(config, engine, keepalive_s=0.05, admission_wait_s=0.05)
    started = time.monotonic()
    with httpx.stream("POST", srv.stack.http_url + "/v1/completions",
                      json={"prompt": "q" * 300, "max_tokens": 2, "stream": True}) as r:
        assert r.status_code == 200
        assert time.monotonic() - started < 0.3            # headers went out before the first chunk finished
        lines = [line for line in r.iter_lines() if line]
    assert ": keep-alive" in lines
    assert lines.index(": keep-alive") < lines.index(": prefill 256/300")
    assert lines[-1] == "data: [DONE]"


def test_client_disconnect_mid_stream_frees_kv(server_factory, config, fake_engine_cls):
    engine = fake_engine_cls(config, token_delay=0.02)
    srv = server_factory(config, engine)
    with httpx.stream("POST", srv.stack.http_url + "/v1/chat/completions",
                      json={"messages": MSG, "max_tokens": 400, "stream": True, "request_id": "gone-1"}) as r:
        seen = 0
        for line in r.iter_lines():
            seen += line.startswith("data: ")
            if seen == 5:
                assert engine.load_stats().kv_blocks_used > 0
                break
    assert _wait_until(lambda: engine.load_stats().kv_blocks_used == 0)
    assert "gone-1" in engine.aborted
    scrape = httpx.get(srv.stack.http_url + "/metrics").text
    assert 'longserve_request_outcomes_total{model_name="fake-model",outcome="abort"} 1.0' in scrape


def test_client_disconnect_non_streaming_frees_kv(server_factory, config, fake_engine_cls):
    engine = fake_engine_cls(config, token_delay=0.02)
    srv = server_factory(config, engine)
    with pytest.raises(httpx.ReadTimeout):              # the client gives up and closes the connection
        httpx.post(srv.stack.http_url + "/v1/completions", json={"prompt": "a", "max_tokens": 400, "request_id": "nb"},
                   timeout=0.3)
    assert _wait_until(lambda: engine.load_stats().kv_blocks_used == 0)
    assert "nb" in engine.aborted


def test_recorded_chat_bodies(server, golden):
    base = server.stack.http_url + "/v1/chat/completions"
    body = {"model": "fake-model", "messages": MSG, "max_tokens": 4, "seed": 11, "n": 2, "stop": ["zz"]}
    plain = httpx.post(base, json=body).json()
    golden.check_json("api/chat_completion.json", json.loads(_normalize(json.dumps(plain))))
    with httpx.stream("POST", base, json={**body, "stream": True, "stream_options": {"include_usage": True}}) as r:
        raw = r.read().decode()
    golden.check_text("api/chat_completion_stream.sse", _normalize(raw))
