"""Prompt log-probabilities over HTTP (real engine, tiny random checkpoint): completions `echo` + `logprobs` (with
max_tokens 0 and 1, as lm-eval sends them), streamed and not, and vLLM's `prompt_logprobs` extra; the values are
the offline engine's."""
from __future__ import annotations

import json

import httpx
import openai
import pytest

from longserve.server.engine import LLM, SamplingParams

PROMPTS = [[5, 17, 300, 42, 9, 77, 120, 3, 64, 8, 11, 900] * 6, [7, 8, 9, 10]]


@pytest.fixture(scope="module")
def real(tiny_checkpoint, real_engine_server):
    sizes = dict(max_model_len=1024, max_num_seqs=8, prefill_chunk_tokens=32)
    with real_engine_server(tiny_checkpoint, **sizes) as (srv, engine):
        yield srv


@pytest.fixture(scope="module")
def offline(tiny_checkpoint):
    llm = LLM(tiny_checkpoint, prefill_chunk_tokens=48, kv_capacity_tokens=4096)
    return llm.generate(PROMPTS, SamplingParams(max_tokens=0, prompt_logprobs=2))


def _client(srv):
    return openai.OpenAI(base_url=srv.stack.http_url + "/v1", api_key="k", max_retries=0)


@pytest.mark.parametrize("max_tokens", [0, 1])
def test_echo_logprobs_match_the_offline_engine(real, offline, max_tokens):
    out = _client(real).completions.create(model="tiny", prompt=PROMPTS, echo=True, logprobs=1,
                                           max_tokens=max_tokens, temperature=0)
    for choice, ids, ref in zip(sorted(out.choices, key=lambda c: c.index), PROMPTS, offline):
        lp = choice.logprobs
        assert len(lp.tokens) == len(ids) + max_tokens
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        expected = [e.logprob for e in ref.prompt_logprobs[1:]]
        assert lp.token_logprobs[1:len(ids)] == pytest.approx(expected, abs=1e-5)
        for entry, top in zip(ref.prompt_logprobs[1:], lp.top_logprobs[1:len(ids)]):
            assert top[entry.token] >= entry.logprob - 1e-5     # the token itself is listed (texts may coincide)
            assert max(top.values()) == pytest.approx(entry.top[0][2], abs=1e-5)  # and the best one
        assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
        assert "".join(lp.tokens[:len(ids)]) == choice.text[:len("".join(lp.tokens[:len(ids)]))]
        assert choice.finish_reason == "length"
        if max_tokens == 0:
            assert out.usage.completion_tokens == 0
    assert out.usage.prompt_tokens == sum(len(p) for p in PROMPTS)


def test_echo_logprobs_streamed_equal_the_body(real):
    body = dict(model="tiny", prompt=PROMPTS[0], echo=True, logprobs=2, max_tokens=3, temperature=0)
    whole = httpx.post(real.stack.http_url + "/v1/completions", json=body, timeout=60).json()["choices"][0]
    tokens, values, offsets, text = [], [], [], ""
    with httpx.stream("POST", real.stack.http_url + "/v1/completions", json=body | {"stream": True},
                      timeout=60) as resp:
        for line in resp.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choice = json.loads(line[6:])["choices"][0]
            text += choice["text"]
            if choice["logprobs"]:
                tokens += choice["logprobs"]["tokens"]
                values += choice["logprobs"]["token_logprobs"]
                offsets += choice["logprobs"]["text_offset"]
    assert text == whole["text"]
    assert tokens == whole["logprobs"]["tokens"] and offsets == whole["logprobs"]["text_offset"]
    assert values == pytest.approx(whole["logprobs"]["token_logprobs"], abs=1e-6)


def test_vllm_prompt_logprobs_extra(real, offline):
    c = _client(real)
    out = c.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=2, temperature=0,
                               extra_body={"prompt_logprobs": 2})
    plp = out.model_dump()["choices"][0]["prompt_logprobs"]
    ref = offline[1].prompt_logprobs
    assert plp[0] is None and len(plp) == len(PROMPTS[1])
    for entry, item in zip(ref[1:], plp[1:]):
        mine = item[str(entry.token_id)]
        assert mine["logprob"] == pytest.approx(entry.logprob, abs=1e-5) and mine["rank"] == entry.rank
        assert {str(t) for t, _, _ in entry.top} <= set(item)
    assert out.choices[0].logprobs is None            # prompt_logprobs alone does not echo
    chat = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=1,
                                     extra_body={"prompt_logprobs": 0}).model_dump()
    assert chat["prompt_logprobs"][0] is None and all(len(x) == 1 for x in chat["prompt_logprobs"][1:])
    assert chat["usage"]["prompt_tokens"] == len(chat["prompt_logprobs"])


def test_scoring_shapes_refused_where_they_mean_nothing(real):
    c = _client(real)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        c.completions.create(model="tiny", prompt="hello", max_tokens=0)        # no echo: nothing to return
    with pytest.raises(openai.BadRequestError, match="prompt_logprobs"):
        c.completions.create(model="tiny", prompt="hello", stream=True, extra_body={"prompt_logprobs": 1})
    with pytest.raises(openai.BadRequestError, match="prompt_logprobs"):
        c.completions.create(model="tiny", prompt="hello", extra_body={"prompt_logprobs": 21})
    out = c.completions.create(model="tiny", prompt="hello world", echo=True, max_tokens=0)
    assert out.choices[0].text == "hello world" and out.choices[0].logprobs is None


def test_grpc_prompt_logprobs_scoring_only(real, offline):
    import grpc

    from longserve.server.api.grpc.pb import generation_pb2 as pb
    from longserve.server.api.grpc.pb import generation_pb2_grpc as pb_grpc

    with grpc.insecure_channel(real.stack.grpc_target) as ch:
        stub = pb_grpc.GenerationStub(ch)
        responses = list(stub.Generate(pb.GenerateRequest(
            model="tiny", token_ids=pb.TokenIds(ids=PROMPTS[0]),
            sampling=pb.SamplingParams(max_tokens=0, prompt_logprobs=2)), timeout=60))
    parts = [r.prompt_logprobs for r in responses if r.WhichOneof("kind") == "prompt_logprobs"]
    entries = [e for p in parts for e in p.logprobs]
    assert parts[0].start == 1 and [p.start for p in parts[1:]] == \
        [parts[0].start + sum(len(q.logprobs) for q in parts[:i + 1]) for i in range(len(parts) - 1)]
    ref = offline[0].prompt_logprobs[1:]
    assert [e.token_id for e in entries] == PROMPTS[0][1:]
    assert [e.logprob for e in entries] == pytest.approx([r.logprob for r in ref], abs=1e-5)
    assert [e.rank for e in entries] == [r.rank for r in ref] and all(len(e.top) == 2 for e in entries)
    final = responses[-1].final
    assert final.usage.completion_tokens == 0 and final.finish_reason == pb.FINISH_REASON_LENGTH
