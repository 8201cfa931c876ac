"""`vllm:*` and `longserve_*` series agree after a mix of finished and cancelled requests (real engine, tiny
random checkpoint); `vllm:iteration_tokens_total` is observed once per engine step."""
from __future__ import annotations

import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families


@pytest.fixture(scope="module")
def real(tiny_checkpoint, real_engine_server):
    sizes = dict(max_num_seqs=8, max_output_tokens=1024, kv_capacity_tokens=16384)
    with real_engine_server(tiny_checkpoint, **sizes) as (srv, engine):
        yield srv, engine


def _scrape(srv) -> dict:
    text = httpx.get(srv.stack.http_url + "/metrics").text
    out: dict = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            key = (s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k not in ("model_name", "engine"))))
            out[key] = out.get(key, 0.0) + s.value
    return out


def _sum(f, name, **labels) -> float:
    return sum(v for (n, ls), v in f.items() if n == name and all(dict(ls).get(k) == x for k, x in labels.items()))


def _cancelled(srv, prompt: str) -> None:
    """A streamed completion the client leaves after its first tokens."""
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 1000, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", srv.stack.http_url + "/v1/completions", json=body, timeout=60) as resp:
        seen = 0
        for line in resp.iter_lines():
            if line.startswith("data: ") and '"text"' in line:
                seen += 1
                if seen == 3:
                    break


def _wait_idle(engine, timeout=20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = engine.load_stats()
        if s.num_running == 0 and s.num_waiting == 0 and s.kv_blocks_used == 0:
            return
        time.sleep(0.02)
    raise AssertionError("engine not idle")


def test_vllm_and_longserve_series_agree_on_counts_and_tokens(real):
    srv, engine = real
    base = srv.stack.http_url
    before = _scrape(srv)
    for prompt, max_tokens in [("hello " * 30, 5), ("story " * 100, 9), ("x", 3)]:
        r = httpx.post(base + "/v1/completions", json={"model": "tiny", "prompt": prompt, "max_tokens": max_tokens,
                                                        "ignore_eos": True}, timeout=60)
        assert r.status_code == 200
    _cancelled(srv, "cancel me " * 50)
    _cancelled(srv, "and me " * 20)
    assert httpx.post(base + "/v1/completions", json={"model": "tiny", "prompt": "a", "max_tokens": 99999}
                      ).status_code == 400       # refused before admission: longserve outcome only
    _wait_idle(engine)
    after = _scrape(srv)

    def delta(name, **labels):
        return _sum(after, name, **labels) - _sum(before, name, **labels)

    for reason in ("stop", "length", "abort", "error"):
        assert delta("vllm:request_success_total", finished_reason=reason) == \
            delta("longserve_request_outcomes_total", outcome=reason), reason
    assert delta("vllm:request_success_total", finished_reason="length") == 3
    assert delta("vllm:request_success_total", finished_reason="abort") == 2
    assert delta("longserve_request_outcomes_total", outcome="rejected_invalid") == 1
    prompt = delta("vllm:prompt_tokens_total")
    generated = delta("vllm:generation_tokens_total")
    assert prompt == delta("longserve_prefill_tokens_total") > 0
    assert delta("vllm:prompt_tokens_by_source_total", source="local_compute") == prompt
    assert generated == delta("longserve_generation_tokens_total") >= 5 + 9 + 3 + 2 * 3
    # one observation per engine step, each the tokens that step computed (the last sampled token of a choice is
    # never computed, so the steps hold at most the prompt and generated tokens)
    steps, tokens = delta("vllm:iteration_tokens_total_count"), delta("vllm:iteration_tokens_total_sum")
    assert prompt <= tokens <= prompt + generated
    assert steps < prompt + generated and steps >= 9


def test_get_model_by_id(real):
    srv, _ = real
    base = srv.stack.http_url
    card = httpx.get(base + "/v1/models/tiny").json()
    assert card["id"] == "tiny" and card["object"] == "model" and card["max_model_len"] == 2048
    missing = httpx.get(base + "/v1/models/nope")
    assert missing.status_code == 404
    error = missing.json()["error"]
    assert error["type"] == "NotFoundError" and error["param"] == "model" and "nope" in error["message"]
