"""The HTTP/gRPC surface over the real `AsyncEngine` on a tiny random Qwen2 checkpoint (CPU, float32).

One engine and server for the module; every test leaves the engine idle (asserted through
`load_stats`), so tests stay independent.
"""
from __future__ import annotations

import asyncio
import time

import grpc
import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from longserve.server.api.grpc.pb import generation_pb2 as pb
from longserve.server.api.grpc.pb import generation_pb2_grpc as pb_grpc

MSG = [{"role": "user", "content": "Hello, what is the pass key?"}]


@pytest.fixture(scope="module")
def real(tiny_checkpoint, real_engine_server):
    sizes = dict(max_num_seqs=32, max_output_tokens=1024, kv_capacity_tokens=32768)
    with real_engine_server(tiny_checkpoint, **sizes) as (srv, engine):
        yield srv, engine


def _idle(engine, timeout=10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = engine.load_stats()
        if stats.kv_blocks_used == 0 and stats.num_running == 0 and stats.num_waiting == 0:
            return True
        time.sleep(0.02)
    return False


def _client(srv):
    return openai.OpenAI(base_url=srv.stack.http_url + "/v1", api_key="k", max_retries=0)


def _count(srv, **body) -> int:
    return httpx.post(srv.stack.http_url + "/tokenize", json=body).json()["count"]


def test_models_chat_completion_usage(real):
    srv, engine = real
    c = _client(srv)
    assert c.models.list().data[0].model_dump()["max_model_len"] == 2048
    chat = c.chat.completions.create(model="tiny", messages=MSG, max_tokens=6, extra_body={"ignore_eos": True})
    assert chat.usage.prompt_tokens == _count(srv, messages=MSG)
    assert chat.usage.completion_tokens == 6 and chat.choices[0].finish_reason == "length"
    comp = c.completions.create(model="tiny", prompt="The sky is", max_tokens=5, extra_body={"ignore_eos": True})
    assert comp.usage.prompt_tokens == _count(srv, prompt="The sky is") and comp.usage.completion_tokens == 5
    assert _idle(engine)


def test_seed_reproducibility_n2_and_logprobs(real):
    srv, engine = real
    c = _client(srv)
    kwargs = dict(model="tiny", prompt="Hello, world!", max_tokens=8, temperature=1.0, n=2, logprobs=2,
                  extra_body={"ignore_eos": True})
    a = c.completions.create(seed=123, **kwargs)
    b = c.completions.create(seed=123, **kwargs)
    assert [ch.text for ch in a.choices] == [ch.text for ch in b.choices]
    assert [ch.logprobs.tokens for ch in a.choices] == [ch.logprobs.tokens for ch in b.choices]
    assert a.usage.completion_tokens == 16
    for ch in a.choices:
        assert len(ch.logprobs.tokens) == 8 and all(len(top) <= 2 for top in ch.logprobs.top_logprobs)
    chat = c.chat.completions.create(model="tiny", messages=MSG, max_tokens=4, logprobs=True, top_logprobs=3,
                                     extra_body={"ignore_eos": True})
    content = chat.choices[0].logprobs.content
    assert len(content) == 4 and all(len(e.top_logprobs) == 3 and e.logprob <= 0 for e in content)
    assert _idle(engine)


def test_stop_string_and_max_tokens(real):
    srv, engine = real
    c = _client(srv)
    free = c.completions.create(model="tiny", prompt="The grass is", max_tokens=16, temperature=0, logprobs=0,
                                extra_body={"ignore_eos": True}).choices[0]
    tokens = free.logprobs.tokens
    stop = next((t for t in tokens[2:] if t.strip() and t.isprintable() and "\ufffd" not in t), None)
    assert stop is not None, tokens
    cut = free.text.index(stop)
    r = c.completions.create(model="tiny", prompt="The grass is", max_tokens=16, temperature=0, stop=[stop],
                             extra_body={"ignore_eos": True}).choices[0]
    assert r.text == free.text[:cut] and r.finish_reason == "stop"
    assert r.model_dump()["stop_reason"] == stop
    assert _idle(engine)


def test_streaming_usage_and_prefill_progress(real):
    srv, engine = real
    prompt = "The sky is blue. " * 20
    with httpx.stream("POST", srv.stack.http_url + "/v1/completions", json={
            "model": "tiny", "prompt": prompt, "max_tokens": 3, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}}) as r:
        lines = [line for line in r.iter_lines() if line]
    total = _count(srv, prompt=prompt)
    progress = [line for line in lines if line.startswith(": prefill")]
    assert len(progress) == -(-total // 64) and progress[-1] == f": prefill {total}/{total}"
    assert '"completion_tokens":3' in lines[-2] and lines[-1] == "data: [DONE]"


def test_32_concurrent_streams_async_client(real):
    srv, engine = real
    prompts = [f"Request number {i}: " + "hello " * (i % 7) for i in range(32)]

    async def one(c, i):
        stream = await c.completions.create(model="tiny", prompt=prompts[i], max_tokens=3 + i % 4, stream=True,
                                            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        usage, chunks = None, 0
        async for ch in stream:
            chunks += bool(ch.choices)
            usage = ch.usage or usage
        return usage, chunks

    async def main():
        c = openai.AsyncOpenAI(base_url=srv.stack.http_url + "/v1", api_key="k", max_retries=0)
        try:
            return await asyncio.gather(*(one(c, i) for i in range(32)))
        finally:
            await c.close()
    results = asyncio.run(main())
    for i, (usage, chunks) in enumerate(results):
        assert usage.completion_tokens == 3 + i % 4 and chunks >= 1
        assert usage.prompt_tokens == _count(srv, prompt=prompts[i])
    assert _idle(engine)


def _aborted(srv) -> float:
    text = httpx.get(srv.stack.http_url + "/metrics").text
    return next(s.value for f in text_string_to_metric_families(text) for s in f.samples
                if s.name == "longserve_request_outcomes_total" and s.labels["outcome"] == "abort")


def test_http_disconnect_frees_kv(real):
    """1024 tokens would take seconds; leaving after 3 chunks must free the KV well before that."""
    srv, engine = real
    aborted = _aborted(srv)
    with httpx.stream("POST", srv.stack.http_url + "/v1/chat/completions", json={
            "model": "tiny", "messages": MSG, "max_tokens": 1024, "stream": True, "ignore_eos": True}) as r:
        for i, _ in enumerate(line for line in r.iter_lines() if line.startswith("data: ")):
            if i == 3:
                assert engine.load_stats().kv_blocks_used > 0
                break
    assert _idle(engine, timeout=2.0)
    assert _aborted(srv) == aborted + 1


def test_grpc_progress_cancel_frees_kv(real):
    srv, engine = real
    with grpc.insecure_channel(srv.stack.grpc_target) as ch:
        stub = pb_grpc.GenerationStub(ch)
        aborted = _aborted(srv)
        call = stub.Generate(pb.GenerateRequest(prompt="Hello, world! " * 20, sampling=pb.SamplingParams(
            max_tokens=1024, ignore_eos=True)))
        kinds = []
        for response in call:
            kinds.append(response.WhichOneof("kind"))
            if kinds.count("delta") == 3:
                call.cancel()
                break
        assert kinds[0] == "progress" and kinds.count("progress") >= 3
        assert _idle(engine, timeout=2.0)
        assert _aborted(srv) == aborted + 1
        load = stub.GetLoad(pb.GetLoadRequest())
        assert load.running == 0 and load.kv_cache_usage_ratio == 0 and load.kv_cache_capacity_tokens == 32768


def test_metrics_count_the_real_workload(real):
    srv, engine = real

    def scrape():
        text = httpx.get(srv.stack.http_url + "/metrics").text
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for f in text_string_to_metric_families(text) for s in f.samples}

    def value(samples, name, **labels):
        wanted = {"model_name": "tiny", **labels}
        return sum(v for (n, ls), v in samples.items() if n == name and all(dict(ls).get(k) == x
                                                                              for k, x in wanted.items()))
    assert _idle(engine)
    before = scrape()
    prompts = ["Metrics one.", "Metrics number two is longer than one. " * 5, "Three"]
    for p in prompts:
        _client(srv).completions.create(model="tiny", prompt=p, max_tokens=4, extra_body={"ignore_eos": True})
    after = scrape()
    prompt_tokens = sum(_count(srv, prompt=p) for p in prompts)

    def delta(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)
    assert delta("vllm:prompt_tokens_total") == prompt_tokens
    assert delta("longserve_prefill_tokens_total") + delta(
        "vllm:prompt_tokens_by_source_total", source="local_cache_hit") == prompt_tokens
    assert delta("longserve_generation_tokens_total") == delta("vllm:generation_tokens_total") == 12
    assert delta("longserve_time_to_first_token_seconds_count") == 3
    assert delta("vllm:e2e_request_latency_seconds_count") == 3
    assert delta("longserve_request_outcomes_total", outcome="length") == 3


def test_context_overflow_is_a_400_and_serving_continues(real):
    srv, engine = real
    c = _client(srv)
    prompt = "Hello, world! " * 800
    assert _count(srv, prompt=prompt) > 2048
    with pytest.raises(openai.BadRequestError) as info:
        c.completions.create(model="tiny", prompt=prompt, max_tokens=8)
    assert info.value.body["param"] == "input_tokens"
    assert "maximum context length is 2048 tokens" in info.value.body["message"]
    assert c.completions.create(model="tiny", prompt="ok", max_tokens=2,
                                extra_body={"ignore_eos": True}).usage.completion_tokens == 2
    assert _idle(engine)


def test_a_resent_prompt_reports_its_cached_tokens_over_http_and_grpc(real):
    """Prefix caching through the APIs: the repeat's usage names the prompt tokens the cache served (all but
    the last KV block), with the same number over HTTP and gRPC."""
    srv, engine = real
    prompt = "The pass key is 71432. Remember it. " * 12
    c = _client(srv)
    first = c.completions.create(model="tiny", prompt=prompt, max_tokens=2, temperature=0)
    again = c.completions.create(model="tiny", prompt=prompt, max_tokens=2, temperature=0)
    n = first.usage.prompt_tokens
    cached = again.usage.prompt_tokens_details.cached_tokens
    assert again.choices[0].text == first.choices[0].text
    assert cached == (n - 1) // 16 * 16 and cached > 0
    with grpc.insecure_channel(srv.stack.grpc_target) as ch:
        final = [r.final for r in pb_grpc.GenerationStub(ch).Generate(pb.GenerateRequest(
            prompt=prompt, sampling=pb.SamplingParams(max_tokens=2, temperature=0))) if r.HasField("final")][0]
    assert final.usage.cached_tokens == cached and final.usage.prompt_tokens == n
    assert _idle(engine)
