"""Tool calls in Qwen2.5's format through the official openai client, parsed from the text of an engine
that emits exactly what the model would write (the parser and the streaming deltas), plus the parser,
the stream parser and the Qwen2.5 chat rendering on their own."""
from __future__ import annotations

import json

import httpx
import openai
import pytest

from longserve.server.api.engine_client import CompletionDelta, FinishReason
from longserve.server.api.openai import tools as T
from longserve.server.qwen_chat import render

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
                   "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
TOOLS = [WEATHER, TIME]
MSG = [{"role": "user", "content": "Weather in Paris and the time?"}]
TWO_CALLS = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}\n'
             '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>')
MALFORMED = '<tool_call>\n{"name": "get_weather", "arguments": {"city": }\n</tool_call>'


@pytest.fixture
def scripted(fake_engine_cls, config):
    """A fake engine whose output is `engine.script`, a few characters per token, then end of sequence."""

    class Scripted(fake_engine_cls):
        script = ""
        seen_params = None

        async def _decode(self, request_id, prompt, params):
            self.seen_params = params
            pieces = [self.script[i:i + 3] for i in range(0, len(self.script), 3)] or [""]
            pieces = pieces[:params.max_tokens]
            reasons = []
            for i in range(params.n):
                for k, piece in enumerate(pieces):
                    last = k == len(pieces) - 1
                    reason = None
                    if last:
                        reason = FinishReason.STOP if len(pieces) < params.max_tokens or \
                            "".join(pieces) == self.script else FinishReason.LENGTH
                    yield CompletionDelta(request_id, i, piece, (ord(piece[0]) if piece else 32,), (), reason,
                                          None, len(prompt), k + 1)
                reasons.append(reason)
            self._reasons[request_id] = reasons
            self._outputs[request_id] = len(pieces) * params.n

    return Scripted(config)


@pytest.fixture
def tool_server(server_factory, config, scripted):
    return server_factory(config, scripted)


def _client(srv) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.stack.http_url + "/v1", api_key="unused", max_retries=0)


def _collect(stream):
    """Content, tool calls (by index) and finish reason rebuilt from stream chunks, as a client does."""
    content, calls, finish = "", {}, None
    for chunk in stream:
        for choice in chunk.choices:
            d = choice.delta
            content += d.content or ""
            for tc in d.tool_calls or []:
                call = calls.setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
                if tc.id:
                    assert call["id"] is None, "the id comes once"
                    call["id"] = tc.id
                if tc.function and tc.function.name:
                    call["name"] += tc.function.name
                if tc.function and tc.function.arguments:
                    call["arguments"] += tc.function.arguments
            finish = choice.finish_reason or finish
    return content, [calls[i] for i in sorted(calls)], finish


def test_openai_client_gets_parsed_tool_calls(tool_server, scripted):
    scripted.script = TWO_CALLS
    r = _client(tool_server).chat.completions.create(model="fake-model", messages=MSG, tools=TOOLS, max_tokens=200)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Let me check."
    calls = choice.message.tool_calls
    assert [c.function.name for c in calls] == ["get_weather", "get_time"]
    assert json.loads(calls[0].function.arguments) == {"city": "Paris", "unit": "c"}
    assert json.loads(calls[1].function.arguments) == {}
    assert all(c.id.startswith("call_") and c.type == "function" for c in calls)
    assert len({c.id for c in calls}) == 2
    assert scripted.seen_params.guided_tool_calls is None        # auto: the model chooses


def test_openai_client_streams_tool_call_deltas(tool_server, scripted):
    scripted.script = TWO_CALLS
    stream = _client(tool_server).chat.completions.create(model="fake-model", messages=MSG, tools=TOOLS,
                                                          max_tokens=200, stream=True)
    content, calls, finish = _collect(stream)
    assert finish == "tool_calls"
    assert content.strip() == "Let me check."
    assert [c["name"] for c in calls] == ["get_weather", "get_time"]
    assert json.loads(calls[0]["arguments"]) == {"city": "Paris", "unit": "c"}
    assert json.loads(calls[1]["arguments"]) == {}
    assert all(c["id"].startswith("call_") for c in calls)


def test_stream_sends_each_call_as_header_then_arguments(tool_server, scripted):
    scripted.script = 'Sure.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Saint-Étienne"}}\n</tool_call>'
    r = httpx.post(tool_server.stack.http_url + "/v1/chat/completions", timeout=30, json={
        "messages": MSG, "tools": TOOLS, "max_tokens": 200, "stream": True})
    chunks = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    parts = [d["tool_calls"][0] for d in deltas if d.get("tool_calls")]
    assert parts[0]["index"] == 0 and parts[0]["id"].startswith("call_") and parts[0]["type"] == "function"
    assert parts[0]["function"] == {"name": "get_weather", "arguments": ""}
    assert [set(p) for p in parts[1:]] == [{"index", "function"}]
    assert json.loads(parts[1]["function"]["arguments"]) == {"city": "Saint-Étienne"}
    assert "".join(d.get("content") or "" for d in deltas) == "Sure."      # no tag text leaks as content
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


@pytest.mark.parametrize("stream", [False, True])
def test_malformed_tool_call_is_content(tool_server, scripted, stream):
    scripted.script = MALFORMED
    c = _client(tool_server)
    if stream:
        content, calls, finish = _collect(c.chat.completions.create(model="fake-model", messages=MSG, tools=TOOLS,
                                                                    max_tokens=200, stream=True))
    else:
        r = c.chat.completions.create(model="fake-model", messages=MSG, tools=TOOLS, max_tokens=200)
        content, calls, finish = r.choices[0].message.content, r.choices[0].message.tool_calls or [], \
            r.choices[0].finish_reason
    assert content == MALFORMED and not calls and finish == "stop"


@pytest.mark.parametrize("stream", [False, True])
def test_call_cut_by_max_tokens_is_length_and_content(tool_server, scripted, stream):
    scripted.script = TWO_CALLS
    c = _client(tool_server)
    kwargs = dict(model="fake-model", messages=MSG, tools=TOOLS, max_tokens=14)     # 14 tokens of 3 characters
    if stream:
        content, calls, finish = _collect(c.chat.completions.create(stream=True, **kwargs))
    else:
        r = c.chat.completions.create(**kwargs)
        content, calls, finish = r.choices[0].message.content, r.choices[0].message.tool_calls or [], \
            r.choices[0].finish_reason
    assert finish == "length" and not calls and content == TWO_CALLS[:42]


def test_tool_choice_none_leaves_text_alone(tool_server, scripted):
    scripted.script = TWO_CALLS
    r = _client(tool_server).chat.completions.create(model="fake-model", messages=MSG, tools=TOOLS,
                                                     tool_choice="none", max_tokens=200)
    assert r.choices[0].message.content == TWO_CALLS and not r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "stop"


def test_required_and_named_tool_choice_are_enforced_by_a_grammar(tool_server, scripted):
    scripted.script = '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'
    c = _client(tool_server)
    r = c.chat.completions.create(model="fake-model", messages=MSG, tools=TOOLS, tool_choice="required",
                                  max_tokens=200)
    assert r.choices[0].finish_reason == "tool_calls"
    spec = json.loads(scripted.seen_params.guided_tool_calls)
    assert [t["name"] for t in spec["tools"]] == ["get_weather", "get_time"] and spec["parallel"] is True
    c.chat.completions.create(model="fake-model", messages=MSG, tools=TOOLS, max_tokens=200,
                              tool_choice={"type": "function", "function": {"name": "get_time"}})
    spec = json.loads(scripted.seen_params.guided_tool_calls)
    assert [t["name"] for t in spec["tools"]] == ["get_time"] and spec["parallel"] is False
    c.chat.completions.create(model="fake-model", messages=MSG, tools=TOOLS, tool_choice="required",
                              parallel_tool_calls=False, max_tokens=200)
    assert json.loads(scripted.seen_params.guided_tool_calls)["parallel"] is False


@pytest.mark.parametrize("body, param", [
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools"),
    ({"tools": [WEATHER, WEATHER]}, "tools"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "foo"}}}],
      "tool_choice": "required"}, "tools"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
    ({"messages": MSG + [{"role": "assistant", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_time", "arguments": "not json"}}]}]},
     "messages"),
])
def test_bad_tool_requests_are_400(tool_server, body, param):
    r = httpx.post(tool_server.stack.http_url + "/v1/chat/completions", json={"messages": MSG, **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_history_with_tool_calls_and_results_is_accepted(tool_server, scripted):
    scripted.script = "It is 18 degrees in Paris."
    history = MSG + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 18}'}]
    r = _client(tool_server).chat.completions.create(model="fake-model", messages=history, tools=TOOLS, max_tokens=200)
    assert r.choices[0].message.content == "It is 18 degrees in Paris." and r.choices[0].finish_reason == "stop"


# --- the parsers and the renderer on their own ---------------------------------------------------------
def test_parse_splits_content_and_calls():
    content, calls = T.parse(TWO_CALLS)
    assert content == "Let me check."
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("get_weather", {"city": "Paris", "unit": "c"}), ("get_time", {})]
    assert T.parse("no calls here") == ("no calls here", [])
    for bad in (MALFORMED, '<tool_call>\n{"arguments": {}}\n</tool_call>', '<tool_call>\n["x"]\n</tool_call>',
                '<tool_call>\n{"name": "f", "arguments": 3}\n</tool_call>', TWO_CALLS[:60]):
        assert T.parse(bad) == (bad, [])


@pytest.mark.parametrize("size", [1, 2, 5, 1000])
def test_stream_parser_matches_whole_parse_for_any_split(size):
    text = TWO_CALLS + "\nDone <tool maybe> and <tool_"
    s = T.ToolCallStream()
    deltas = []
    for i in range(0, len(text), size):
        deltas += s.feed(text[i:i + size])
    deltas += s.close()
    content = "".join(d.get("content", "") for d in deltas)
    calls: dict[int, dict] = {}
    for d in deltas:
        for tc in d.get("tool_calls", []):
            call = calls.setdefault(tc["index"], {"name": "", "arguments": ""})
            call["name"] += tc["function"].get("name", "")
            call["arguments"] += tc["function"]["arguments"]
    assert content == "Let me check.\n\n\nDone <tool maybe> and <tool_"
    assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == [
        ("get_weather", {"city": "Paris", "unit": "c"}), ("get_time", {})]
    assert s.called


def test_stream_parser_holds_back_a_possible_tag():
    s = T.ToolCallStream()
    assert s.feed("Hello <tool") == [{"content": "Hello "}]
    assert s.feed("box>") == [{"content": "<toolbox>"}]
    assert s.close() == []


def test_qwen_rendering_of_tools_calls_and_results():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather?"},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
                    {"type": "function", "function": {"name": "get_time", "arguments": {}}}]},
                {"role": "tool", "content": "18C"}, {"role": "tool", "content": "noon"}]
    text = render(messages, [TIME])
    assert text == (
        "<|im_start|>system\nBe brief.\n\n# Tools\n\nYou may call one or more functions to assist with the user "
        "query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
        + json.dumps(TIME) + "\n</tools>\n\nFor each function call, return a json object with function name and "
        "arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, "
        "\"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n"
        "<|im_start|>user\nWeather?<|im_end|>\n"
        "<|im_start|>assistant\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n"
        "</tool_call>\n<tool_call>\n{\"name\": \"get_time\", \"arguments\": {}}\n</tool_call><|im_end|>\n"
        "<|im_start|>user\n<tool_response>\n18C\n</tool_response>\n<tool_response>\nnoon\n</tool_response>"
        "<|im_end|>\n<|im_start|>assistant\n")
    plain = render([{"role": "user", "content": "hi"}], None)
    assert plain.startswith("<|im_start|>system\nYou are Qwen")
