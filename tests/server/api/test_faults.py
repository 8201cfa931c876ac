"""Fault injection through the real server: one request's step raises, the others are untouched.

The runner's forward is wrapped (on the engine thread) so that it raises whenever the marked request
has tokens in the batch, after the real forward ran (its K/V writes happened: the worst case for the
engine's one-request-at-a-time re-run). A gate holds the first step until every request of the test
has arrived, so the marked request really shares batches with the others. The others must return
the same text as an undisturbed run; the marked one gets 503/500, an SSE `finish_reason: "error"`, or
a gRPC status; `/health` stays 200, the failure counter moves, and every KV block ends free.
"""
from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import httpx
import openai
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from longserve.server.api.grpc.pb import generation_pb2 as pb
from longserve.server.api.grpc.pb import generation_pb2_grpc as pb_grpc

PROMPTS = ["The sky is blue and the grass is", "Once upon a time, in a land far away,", "Numbers: 1 2 3 4 5"]
OTHERS = dict(max_tokens=16, temperature=0, extra_body={"ignore_eos": True})


@pytest.fixture(scope="module")
def real(tiny_checkpoint, real_engine_server):
    with real_engine_server(tiny_checkpoint) as (srv, engine):
        yield srv, engine


class Fault:
    """Wraps the runner's forward: optionally waits for `expect` open requests, then raises for batches
    holding `request_id` once that request has `after_tokens` outputs."""

    def __init__(self, engine, request_id: str | None, *, expect: int, after_tokens: int = 2,
                 exc_type=torch.OutOfMemoryError, message: str = "CUDA out of memory (injected)",
                 delay: float = 0.0):
        self.async_engine, self.runner, self.delay = engine, engine.engine.runner, delay
        self.request_id, self.expect, self.after_tokens = request_id, expect, after_tokens
        self.exc_type, self.message = exc_type, message
        self.raised, self.batch_sizes = 0, []
        self._gate = threading.Event()
        self._forward = self.runner.forward_logits

    def __enter__(self) -> Fault:
        self.runner.forward_logits = self.forward
        return self

    def __exit__(self, *exc) -> None:
        self.runner.forward_logits = self._forward

    def forward(self, batch, *args, **kwargs):
        if not self._gate.is_set():
            deadline = time.monotonic() + 10.0
            while len(self.async_engine._streams) < self.expect and time.monotonic() < deadline:
                time.sleep(0.005)
            self._gate.set()
        time.sleep(self.delay)
        logits = self._forward(batch, *args, **kwargs)
        if any(c.seq.request_id == self.request_id and len(c.seq.output_token_ids) >= self.after_tokens
               for c in batch.chunks):
            self.raised += 1
            self.batch_sizes.append(len({c.seq.request_id for c in batch.chunks}))
            raise self.exc_type(self.message)
        return logits


def _client(srv):
    return openai.OpenAI(base_url=srv.stack.http_url + "/v1", api_key="k", max_retries=0)


def _complete(srv, prompt: str) -> str:
    return _client(srv).completions.create(model="tiny", prompt=prompt, **OTHERS).choices[0].text


def _scrape(srv) -> dict:
    text = httpx.get(srv.stack.http_url + "/metrics").text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def _value(samples, name, **labels) -> float:
    return sum(v for (n, ls), v in samples.items()
               if n == name and all(dict(ls).get(k) == x for k, x in labels.items()))


def _idle(engine, timeout=10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = engine.load_stats()
        if stats.kv_blocks_used == 0 and stats.num_running == 0 and stats.num_waiting == 0:
            return True
        time.sleep(0.02)
    return False


def _with_others(srv, engine, victim, expect: int, fault_kwargs: dict):
    """Run `victim()` beside the three other prompts under a fault; returns (victim result, other texts)."""
    with Fault(engine, fault_kwargs.pop("request_id"), expect=expect, **fault_kwargs) as fault, \
            ThreadPoolExecutor(4) as pool:
        others = [pool.submit(_complete, srv, p) for p in PROMPTS]
        outcome = pool.submit(victim)
        texts = [f.result(timeout=60) for f in others]
        result = outcome.result(timeout=60)
    assert fault.raised >= 1 and max(fault.batch_sizes) >= 2, fault.batch_sizes   # it shared a batch
    return result, texts


@pytest.fixture(scope="module")
def undisturbed(real):
    srv, engine = real
    with Fault(engine, None, expect=3), ThreadPoolExecutor(3) as pool:
        texts = [f.result(timeout=60) for f in [pool.submit(_complete, srv, p) for p in PROMPTS]]
    assert _idle(engine)
    return texts


def test_out_of_memory_fails_one_request_with_503_and_the_others_finish(real, undisturbed):
    srv, engine = real
    before = _scrape(srv)

    def victim():
        with pytest.raises(openai.APIStatusError) as info:
            _client(srv).completions.create(model="tiny", prompt="Hello there " * 10, max_tokens=32,
                                            extra_body={"ignore_eos": True, "request_id": "victim-http"})
        return info.value

    error, texts = _with_others(srv, engine, victim, 4, {"request_id": "victim-http"})
    assert texts == undisturbed
    assert error.status_code == 503
    message = error.body["message"]
    assert "ran out of memory" in message and "prompt of" in message and "OutOfMemoryError" in message
    assert error.body["type"] == "ServiceUnavailableError"
    assert httpx.get(srv.stack.http_url + "/health").status_code == 200
    assert _idle(engine) and engine.is_healthy()
    after = _scrape(srv)

    def delta(name, **labels):
        return _value(after, name, model_name="tiny", **labels) - _value(before, name, model_name="tiny", **labels)
    assert delta("longserve_request_failures_total", reason="out_of_memory") == 1
    assert delta("longserve_request_failures_total", reason="exception") == 0
    assert delta("longserve_request_outcomes_total", outcome="error") == 1
    assert delta("vllm:request_success_total", finished_reason="length") == 3     # the three others
    assert delta("vllm:request_success_total", finished_reason="error") == 1      # and the failed one


def test_open_stream_ends_with_finish_reason_error_and_an_error_object(real, undisturbed):
    srv, engine = real
    before = _scrape(srv)

    def victim():
        with httpx.stream("POST", srv.stack.http_url + "/v1/chat/completions", timeout=60, json={
                "model": "tiny", "messages": [{"role": "user", "content": "Tell me a long story."}],
                "max_tokens": 64, "stream": True, "ignore_eos": True, "logprobs": True,
                "request_id": "victim-sse"}) as r:
            assert r.status_code == 200
            return [line for line in r.iter_lines() if line.startswith("data: ")]

    lines, texts = _with_others(srv, engine, victim, 4, {
        "request_id": "victim-sse", "exc_type": RuntimeError, "message": "device-side assert triggered"})
    assert texts == undisturbed
    assert lines[-1] == "data: [DONE]"
    error = json.loads(lines[-2][6:])["error"]
    assert error["code"] == 500 and "RuntimeError: device-side assert triggered" in error["message"]
    last = json.loads(lines[-3][6:])
    assert last["choices"][0]["finish_reason"] == "error"
    tokens = [json.loads(line[6:])["choices"][0]["logprobs"] for line in lines[:-3]]
    assert sum(len(t["content"]) for t in tokens if t) == 2          # the two tokens before the failure
    assert httpx.get(srv.stack.http_url + "/health").status_code == 200
    assert _idle(engine)
    after = _scrape(srv)
    assert _value(after, "longserve_request_failures_total", reason="exception") - \
        _value(before, "longserve_request_failures_total", reason="exception") == 1


@pytest.mark.parametrize("exc_type,code", [(torch.OutOfMemoryError, grpc.StatusCode.RESOURCE_EXHAUSTED),
                                           (RuntimeError, grpc.StatusCode.INTERNAL)], ids=["oom", "error"])
def test_grpc_gets_a_status(real, undisturbed, exc_type, code):
    srv, engine = real
    rid = f"victim-grpc-{code.name.lower()}"

    def victim():
        with grpc.insecure_channel(srv.stack.grpc_target) as ch:
            call = pb_grpc.GenerationStub(ch).Generate(pb.GenerateRequest(
                request_id=rid, prompt="Hello, world! " * 5,
                sampling=pb.SamplingParams(max_tokens=32, ignore_eos=True)))
            deltas = 0
            with pytest.raises(grpc.RpcError) as info:
                for response in call:
                    deltas += response.WhichOneof("kind") == "delta"
            return info.value, deltas

    (error, deltas), texts = _with_others(srv, engine, victim, 4, {
        "request_id": rid, "exc_type": exc_type, "message": "injected fault"})
    assert texts == undisturbed
    assert error.code() == code and "injected fault" in error.details() and "prompt of" in error.details()
    assert deltas == 2                                               # the two tokens before the failure
    assert httpx.get(srv.stack.http_url + "/health").status_code == 200
    assert _idle(engine) and engine.is_healthy()


def test_a_request_id_already_in_flight_is_a_400_and_leaves_the_first_alone(real):
    srv, engine = real
    url = srv.stack.http_url + "/v1/completions"
    body = {"model": "tiny", "prompt": "Same id twice", "ignore_eos": True, "request_id": "twice"}
    with Fault(engine, None, expect=1, delay=0.05), \
            httpx.stream("POST", url, json={**body, "max_tokens": 24, "stream": True}, timeout=60) as first:
        lines = first.iter_lines()                                      # 24 steps of >= 50 ms each
        assert next(line for line in lines if line.startswith("data: "))     # the first one is in flight
        second = httpx.post(url, json={**body, "max_tokens": 2}, timeout=60)
        assert second.status_code == 400 and "already in flight" in second.json()["error"]["message"]
        rest = [line for line in lines if line.startswith("data: ")]
    assert rest[-1] == "data: [DONE]" and '"finish_reason":"length"' in rest[-2]
    assert _idle(engine) and engine.is_healthy()
