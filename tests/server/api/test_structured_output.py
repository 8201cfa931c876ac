"""Structured output and enforced tool calls through the real engine on a tiny random-weight checkpoint.

The weights are random, so whatever valid JSON comes out is the grammar's doing, not the model's. The
checkpoint's tokenizer is byte-level BPE (every string is expressible) and its chat template is plain
ChatML, so tools and tool history go through the built-in Qwen2.5 rendering.
"""
from __future__ import annotations

import json
import time

import httpx
import jsonschema
import openai
import pytest

from longserve.server.qwen_chat import render

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "age", "ok"],
          "properties": {"name": {"type": "string", "maxLength": 12},
                         "age": {"type": "integer", "minimum": 0, "maximum": 150},
                         "ok": {"type": "boolean"},
                         "tags": {"type": "array", "items": {"enum": ["red", "green"]}, "maxItems": 3}}}
RESPONSE_FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}
MSG = [{"role": "user", "content": "Describe a person as JSON."}]
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "additionalProperties": False, "required": ["city", "days"],
    "properties": {"city": {"type": "string", "maxLength": 10}, "days": {"type": "integer", "minimum": 1,
                                                                          "maximum": 7}}}}}
TIME = {"type": "function", "function": {"name": "get_time"}}


@pytest.fixture(scope="module")
def real(tiny_checkpoint, real_engine_server):
    sizes = dict(max_num_seqs=32, max_output_tokens=1024, kv_capacity_tokens=32768)
    with real_engine_server(tiny_checkpoint, **sizes) as (srv, engine):
        yield srv, engine


def _client(srv) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.stack.http_url + "/v1", api_key="k", max_retries=0)


def _idle(engine, timeout=10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = engine.load_stats()
        if stats.kv_blocks_used == 0 and stats.num_running == 0:
            return True
        time.sleep(0.02)
    return False


def test_json_schema_output_validates(real):
    srv, engine = real
    r = _client(srv).chat.completions.create(model="tiny", messages=MSG, response_format=RESPONSE_FORMAT, n=3,
                                             temperature=1.0, seed=5, max_tokens=300)
    assert len(r.choices) == 3
    for choice in r.choices:
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema.validate(json.loads(choice.message.content), SCHEMA)
    assert len({c.message.content for c in r.choices}) > 1      # sampled, not one forced string
    assert _idle(engine)


def test_unconstrained_random_model_is_not_json(real):
    """The control: without the constraint the same request does not give schema-valid JSON."""
    srv, _ = real
    r = _client(srv).chat.completions.create(model="tiny", messages=MSG, temperature=1.0, seed=5, max_tokens=40)
    with pytest.raises((ValueError, jsonschema.ValidationError)):
        jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMA)


def test_json_schema_streaming_and_completions(real):
    srv, engine = real
    c = _client(srv)
    stream = c.chat.completions.create(model="tiny", messages=MSG, response_format=RESPONSE_FORMAT, stream=True,
                                       temperature=0.8, seed=11, max_tokens=300)
    text, finish = "", None
    for chunk in stream:
        text += chunk.choices[0].delta.content or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "stop"
    jsonschema.validate(json.loads(text), SCHEMA)
    r = httpx.post(srv.stack.http_url + "/v1/completions", timeout=60, json={
        "prompt": "Person:", "response_format": RESPONSE_FORMAT, "max_tokens": 300, "temperature": 0})
    jsonschema.validate(json.loads(r.json()["choices"][0]["text"]), SCHEMA)
    assert _idle(engine)


def test_json_object_is_an_object(real):
    srv, _ = real
    c = _client(srv)
    r = c.chat.completions.create(model="tiny", messages=MSG, response_format={"type": "json_object"},
                                  temperature=0, max_tokens=400)
    assert r.choices[0].finish_reason == "stop" and isinstance(json.loads(r.choices[0].message.content), dict)
    r = c.chat.completions.create(model="tiny", messages=MSG, response_format={"type": "json_object"},
                                  temperature=1.0, seed=0, n=8, max_tokens=100)
    finished = [json.loads(ch.message.content) for ch in r.choices if ch.finish_reason == "stop"]
    assert all(isinstance(value, dict) for value in finished) and any(finished), finished
    # an open-ended object may run past max_tokens: cut off, it is "length" and still an object's beginning
    assert all(ch.message.content.startswith("{") for ch in r.choices if ch.finish_reason == "length")


def test_cut_off_json_is_length_and_stop_strings_still_apply(real):
    srv, engine = real
    c = _client(srv)
    r = c.chat.completions.create(model="tiny", messages=MSG, response_format=RESPONSE_FORMAT, temperature=0,
                                  max_tokens=4)
    assert r.choices[0].finish_reason == "length"
    with pytest.raises(ValueError):
        json.loads(r.choices[0].message.content)
    assert r.choices[0].message.content.startswith('{"')
    r = c.chat.completions.create(model="tiny", messages=MSG, response_format=RESPONSE_FORMAT, temperature=0,
                                  max_tokens=300, stop=['"age"'])
    assert r.choices[0].finish_reason == "stop" and r.choices[0].message.content.startswith('{"name":"')
    assert '"age"' not in r.choices[0].message.content
    assert _idle(engine)


def test_invalid_schema_is_400(real):
    srv, _ = real
    with pytest.raises(openai.BadRequestError) as err:
        _client(srv).chat.completions.create(model="tiny", messages=MSG, response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "minProperties": "two"}}})
    assert err.value.body["param"] == "response_format"
    for bad in ({"type": "json_schema"}, {"type": "json_schema", "json_schema": {"name": "x", "schema": [1]}}):
        r = httpx.post(srv.stack.http_url + "/v1/chat/completions", json={"messages": MSG, "response_format": bad})
        assert r.status_code == 400 and "json_schema" in r.json()["error"]["message"]


@pytest.mark.parametrize("stream", [False, True])
def test_required_tool_call_from_random_weights(real, stream):
    """tool_choice "required": the grammar makes a random model call a declared tool with valid arguments."""
    srv, engine = real
    c = _client(srv)
    kwargs = dict(model="tiny", messages=MSG, tools=[WEATHER, TIME], tool_choice="required", temperature=0.7,
                  seed=3, max_tokens=300, parallel_tool_calls=False)
    if stream:
        calls, finish = {}, None
        for chunk in c.chat.completions.create(stream=True, **kwargs):
            for tc in chunk.choices[0].delta.tool_calls or []:
                entry = calls.setdefault(tc.index, {"name": "", "arguments": ""})
                entry["name"] += tc.function.name or ""
                entry["arguments"] += tc.function.arguments or ""
            finish = chunk.choices[0].finish_reason or finish
        calls = list(calls.values())
    else:
        r = c.chat.completions.create(**kwargs)
        finish = r.choices[0].finish_reason
        calls = [{"name": t.function.name, "arguments": t.function.arguments} for t in r.choices[0].message.tool_calls]
    assert finish == "tool_calls" and len(calls) == 1
    schemas = {"get_weather": WEATHER["function"]["parameters"],
               "get_time": {"type": "object", "properties": {}, "additionalProperties": False}}
    jsonschema.validate(json.loads(calls[0]["arguments"]), schemas[calls[0]["name"]])
    tool_choice = {"type": "function", "function": {"name": "get_weather"}}
    named = c.chat.completions.create(**{**kwargs, "tool_choice": tool_choice})
    call = named.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    assert _idle(engine)


def test_tools_and_tool_history_render_in_qwen_format(real):
    """The tiny checkpoint's ChatML template knows no tools: the prompt is Qwen2.5's tool format."""
    srv, _ = real
    history = MSG + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Paris", "days": 2}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    expected = render([MSG[0], {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
        "name": "get_weather", "arguments": {"city": "Paris", "days": 2}}}]},
                       {"role": "tool", "content": "sunny"}], [WEATHER])
    assert "<tool_response>\nsunny\n</tool_response>" in expected and '"arguments": {"city": "Paris"' in expected
    url = srv.stack.http_url
    got = httpx.post(url + "/tokenize", json={"messages": history, "tools": [WEATHER]}).json()["tokens"]
    assert got == httpx.post(url + "/tokenize", json={"prompt": expected}).json()["tokens"]
    r = _client(srv).chat.completions.create(model="tiny", messages=history, tools=[WEATHER], max_tokens=5,
                                             temperature=0)
    assert r.usage.prompt_tokens == len(got)
