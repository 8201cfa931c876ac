"""Every bad request gets the OpenAI error envelope with the right status; none is a 500."""
from __future__ import annotations

import httpx
import openai
import pytest

MSG = [{"role": "user", "content": "hi"}]


def _assert_envelope(resp: httpx.Response, status: int, err_type: str, param=None):
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert err["type"] == err_type and err["code"] == status and isinstance(err["message"], str)
    if param is not None:
        assert err["param"] == param
    return err


def _still_serving(server):
    r = httpx.post(server.stack.http_url + "/v1/completions", json={"prompt": "ok", "max_tokens": 2})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2


@pytest.mark.parametrize("body, param", [
    (b"{not json", None),
    (b"[1, 2]", None),
    (b'{"model": "fake-model"}', "messages"),
    (b'{"messages": []}', "messages"),
    (b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": -1}', "max_tokens"),
    (b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}', "max_tokens"),
    (b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": 513}', "max_tokens"),
    (b'{"messages": [{"role": "user", "content": "x"}], "temperature": -1}', "temperature"),
    (b'{"messages": [{"role": "user", "content": "x"}], "top_p": 0}', "top_p"),
    (b'{"messages": [{"role": "user", "content": "x"}], "n": 0}', "n"),
    (b'{"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}', "tools"),
    (b'{"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_schema", '
     b'"json_schema": {"name": "x", "schema": {"type": "foo"}}}}', "response_format"),
    (b'{"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "xml"}}', "response_format"),
    (b'{"messages": [{"role": "user", "content": "x"}], "tool_choice": "required"}', "tool_choice"),
    (b'{"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}', "messages"),
    (b'{"messages": [{"role": "user", "content": "x"}], "use_beam_search": true}', "use_beam_search"),
])
def test_chat_bad_requests_are_400(server, body, param):
    r = httpx.post(server.stack.http_url + "/v1/chat/completions", content=body,
                   headers={"content-type": "application/json"})
    _assert_envelope(r, 400, "BadRequestError", param)
    _still_serving(server)


def test_completion_rejections(server):
    base = server.stack.http_url + "/v1/completions"
    _assert_envelope(httpx.post(base, json={"prompt": "a", "suffix": "z"}), 400, "BadRequestError", "suffix")
    _assert_envelope(httpx.post(base, json={"prompt": [70000]}), 400, "BadRequestError", "prompt")
    _assert_envelope(httpx.post(base, json={"prompt": ""}), 400, "BadRequestError", "prompt")
    _assert_envelope(httpx.post(base, json={"prompt": "a", "stream_options": {"include_usage": True}}),
                     400, "BadRequestError", "stream_options")


def test_unknown_model_is_404(server):
    with pytest.raises(openai.NotFoundError) as info:
        openai.OpenAI(base_url=server.stack.http_url + "/v1", api_key="k", max_retries=0).chat.completions.create(
            model="nope", messages=MSG)
    assert info.value.status_code == 404
    assert info.value.body["message"] == "The model `nope` does not exist."
    assert info.value.body["param"] == "model"


def test_prompt_over_max_model_len(server):
    c = openai.OpenAI(base_url=server.stack.http_url + "/v1", api_key="k", max_retries=0)
    with pytest.raises(openai.BadRequestError) as info:
        c.completions.create(model="fake-model", prompt="x" * 4000, max_tokens=200)
    body = info.value.body
    assert body["param"] == "input_tokens" and info.value.status_code == 400
    assert "maximum context length is 4096 tokens" in body["message"]
    assert "request needs 4200 tokens (4000 in the prompt, 200 for the completion)" in body["message"]
    with pytest.raises(openai.BadRequestError) as info:
        c.completions.create(model="fake-model", prompt="x" * 4096)         # max_tokens omitted, P >= L
    assert "maximum context length is 4096 tokens" in info.value.body["message"]
    with pytest.raises(openai.BadRequestError) as info:                      # streaming: rejected before 200
        list(c.completions.create(model="fake-model", prompt="x" * 4000, max_tokens=200, stream=True))
    assert info.value.body["param"] == "input_tokens"
    assert c.completions.create(model="fake-model", prompt="x" * 4000, max_tokens=96).usage.total_tokens == 4096


def test_body_over_limit_is_413(server_factory, config_factory, fake_engine_cls):
    config = config_factory(grpc_max_message_bytes=4 * 2**20)
    srv = server_factory(config, fake_engine_cls(config))
    limit = config.grpc_max_message_bytes
    url = srv.stack.http_url + "/v1/completions"
    _assert_envelope(httpx.post(url, content=b"{" + b" " * limit), 413, "BadRequestError")

    def chunked():   # no content-length header: the cap applies while reading
        for _ in range(5):
            yield b" " * 2**20
    _assert_envelope(httpx.post(url, content=chunked()), 413, "BadRequestError")
    _still_serving(srv)


def test_unknown_route_and_method(server):
    _assert_envelope(httpx.get(server.stack.http_url + "/v1/nothing"), 404, "NotFoundError")
    _assert_envelope(httpx.get(server.stack.http_url + "/v1/completions"), 405, "BadRequestError")


def test_engine_error_mid_stream_is_an_error_event(server_factory, config, fake_engine_cls):
    srv = server_factory(config, fake_engine_cls(config, fail_after_tokens=3))
    base = srv.stack.http_url + "/v1/completions"
    with httpx.stream("POST", base, json={"prompt": "a", "max_tokens": 10, "stream": True}) as r:
        assert r.status_code == 200
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert '"error"' in lines[-2] and "simulated engine failure" in lines[-2]
    assert lines[-1] == "data: [DONE]"
    r = httpx.post(base, json={"prompt": "a", "max_tokens": 10})
    _assert_envelope(r, 500, "InternalServerError")


def test_api_key(server_factory, config, engine):
    srv = server_factory(config, engine, api_key="s3cret")
    base = srv.stack.http_url
    with pytest.raises(openai.AuthenticationError) as info:
        openai.OpenAI(base_url=base + "/v1", api_key="wrong", max_retries=0).models.list()
    assert info.value.status_code == 401 and info.value.body["type"] == "AuthenticationError"
    _assert_envelope(httpx.post(base + "/tokenize", json={"prompt": "x"}), 401, "AuthenticationError")
    ok = openai.OpenAI(base_url=base + "/v1", api_key="s3cret", max_retries=0)
    assert ok.completions.create(model="fake-model", prompt="a", max_tokens=1).usage.completion_tokens == 1
    assert httpx.get(base + "/health").status_code == 200              # probes need no key
    assert httpx.get(base + "/metrics").status_code == 200


def test_dead_engine_turns_503(server, engine):
    engine.healthy = False
    r = httpx.post(server.stack.http_url + "/v1/completions", json={"prompt": "a"})
    _assert_envelope(r, 503, "ServiceUnavailableError")
    assert httpx.get(server.stack.http_url + "/health").status_code == 503


def test_engine_overload_is_429_on_both_protocols(server, engine):
    import grpc
    from prometheus_client.parser import text_string_to_metric_families

    from longserve.server.api.engine_client import RequestRejected
    from longserve.server.api.grpc.pb import generation_pb2 as pb
    from longserve.server.api.grpc.pb import generation_pb2_grpc as pb_grpc
    engine.reject = RequestRejected("waiting queue is full", code="queue_full")
    base = server.stack.http_url + "/v1/completions"
    _assert_envelope(httpx.post(base, json={"prompt": "a"}), 429, "RateLimitError")
    _assert_envelope(httpx.post(base, json={"prompt": "a", "stream": True}), 429, "RateLimitError")
    with grpc.insecure_channel(server.stack.grpc_target) as ch:
        with pytest.raises(grpc.RpcError) as info:
            list(pb_grpc.GenerationStub(ch).Generate(pb.GenerateRequest(prompt="a")))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert info.value.details() == "waiting queue is full"
    samples = {(s.name, s.labels.get("outcome")): s.value
               for f in text_string_to_metric_families(httpx.get(server.stack.http_url + "/metrics").text)
               for s in f.samples}
    assert samples[("longserve_request_outcomes_total", "rejected_overload")] == 3
    engine.reject = None
    _still_serving(server)
