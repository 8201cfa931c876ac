"""gRPC `longserve.v1.Generation` against the fake engine: stream order, status codes, cancel, big prompts."""
from __future__ import annotations

import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from longserve.server.api.grpc.pb import generation_pb2 as pb
from longserve.server.api.grpc.pb import generation_pb2_grpc as pb_grpc

LIMIT = 64 * 2**20


def _channel(server):
    return grpc.insecure_channel(server.stack.grpc_target, options=[
        ("grpc.max_send_message_length", LIMIT), ("grpc.max_receive_message_length", LIMIT)])


def _kinds(responses):
    return [r.WhichOneof("kind") for r in responses]


def test_generate_stream_order_and_final(server, engine):
    with _channel(server) as ch:
        stub = pb_grpc.GenerationStub(ch)
        req = pb.GenerateRequest(prompt="x" * 600, return_token_ids=True,
                                 sampling=pb.SamplingParams(max_tokens=5, seed=3, logprobs=1))
        out = list(stub.Generate(req, timeout=10))
    kinds = _kinds(out)
    assert kinds[0] == "progress" and out[0].progress.prefill_tokens_done == 0
    assert out[0].progress.prompt_tokens == 600
    assert [r.progress.prefill_tokens_done for r in out if r.WhichOneof("kind") == "progress"] == [0, 256, 512, 600]
    assert kinds.count("final") == 1 and kinds[-1] == "final"
    deltas = [r.delta for r in out if r.WhichOneof("kind") == "delta"]
    assert len(deltas) == 5 and all(len(d.token_ids) == 1 and len(d.logprobs) == 1 for d in deltas)
    assert deltas[-1].finish_reason == pb.FINISH_REASON_LENGTH
    final = out[-1].final
    assert final.finish_reason == pb.FINISH_REASON_LENGTH
    assert (final.usage.prompt_tokens, final.usage.completion_tokens, final.usage.total_tokens) == (600, 5, 605)
    assert final.timing.e2e_ms > 0 and len(final.choices) == 1
    assert len({r.request_id for r in out}) == 1 and out[0].request_id.startswith("grpc-")


def test_generate_chat_tokens_and_n(server, engine):
    with _channel(server) as ch:
        stub = pb_grpc.GenerationStub(ch)
        chat = pb.ChatMessages(messages=[pb.ChatMessage(role="user", content="hi")])
        out = list(stub.Generate(pb.GenerateRequest(request_id="mine", chat=chat,
                                                    sampling=pb.SamplingParams(max_tokens=3, n=2, seed=1))))
        assert {r.request_id for r in out} == {"mine"}
        assert sorted({r.delta.index for r in out if r.WhichOneof("kind") == "delta"}) == [0, 1]
        assert out[-1].final.usage.completion_tokens == 6
        ids = list(stub.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=[104, 105]),
                                                    sampling=pb.SamplingParams(max_tokens=1))))
        assert ids[-1].final.usage.prompt_tokens == 2
        tok = stub.Tokenize(pb.TokenizeRequest(chat=chat))
        assert tok.count == len(engine.apply_chat_template([{"role": "user", "content": "hi"}]))
        assert list(stub.Tokenize(pb.TokenizeRequest(prompt="ab")).token_ids) == [97, 98]
        info = stub.GetModelInfo(pb.GetModelInfoRequest())
        assert (info.served_model_name, info.max_model_len, info.max_output_tokens) == ("fake-model", 4096, 512)
        assert info.dca and info.sparse_prefill and info.sparse_threshold == 1024 and info.version
        load = stub.GetLoad(pb.GetLoadRequest())
        assert load.running == 0 and load.kv_cache_capacity_tokens == 100_000 * 16


@pytest.mark.parametrize("request_, code", [
    (pb.GenerateRequest(prompt="x" * 4000, sampling=pb.SamplingParams(max_tokens=200)), "INVALID_ARGUMENT"),
    (pb.GenerateRequest(model="other", prompt="x"), "NOT_FOUND"),
    (pb.GenerateRequest(), "INVALID_ARGUMENT"),
    (pb.GenerateRequest(prompt="x", sampling=pb.SamplingParams(top_p=2.0)), "INVALID_ARGUMENT"),
    (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[10**6])), "INVALID_ARGUMENT"),
])
def test_generate_errors_map_to_status(server, request_, code):
    with _channel(server) as ch:
        with pytest.raises(grpc.RpcError) as info:
            list(pb_grpc.GenerationStub(ch).Generate(request_, timeout=10))
    assert info.value.code() == getattr(grpc.StatusCode, code)
    if request_.prompt == "x" * 4000:
        assert "maximum context length is 4096 tokens" in info.value.details()


def test_cancel_frees_kv(server_factory, config, fake_engine_cls):
    engine = fake_engine_cls(config, token_delay=0.02)
    srv = server_factory(config, engine)
    with _channel(srv) as ch:
        call = pb_grpc.GenerationStub(ch).Generate(pb.GenerateRequest(request_id="c1", prompt="a",
                                                                      sampling=pb.SamplingParams(max_tokens=400)))
        for i, _ in enumerate(call):
            if i == 5:
                assert engine.load_stats().kv_blocks_used > 0
                call.cancel()
                break
    deadline = time.monotonic() + 5
    while engine.load_stats().kv_blocks_used and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.load_stats().kv_blocks_used == 0 and "c1" in engine.aborted


def test_several_mb_prompt_is_accepted(server_factory, config_factory, fake_engine_cls):
    config = config_factory(max_model_len=2**23, max_output_tokens=8, prefill_chunk_tokens=2**20)
    engine = fake_engine_cls(config)
    srv = server_factory(config, engine)
    prompt = "y" * (5 * 2**20)                          # 5 MiB: above gRPC's default 4 MB receive limit
    with _channel(srv) as ch:
        out = list(pb_grpc.GenerationStub(ch).Generate(
            pb.GenerateRequest(prompt=prompt, sampling=pb.SamplingParams(max_tokens=1)), timeout=60))
    progress = [r.progress.prefill_tokens_done for r in out if r.WhichOneof("kind") == "progress"]
    assert progress == [0, 2**20, 2 * 2**20, 3 * 2**20, 4 * 2**20, 5 * 2**20]
    assert out[-1].final.usage.prompt_tokens == 5 * 2**20


def test_health_reflection_and_auth(server_factory, config, engine):
    srv = server_factory(config, None, api_key="k")
    with _channel(srv) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        for service in ("", "longserve.v1.Generation"):
            assert health.Check(health_pb2.HealthCheckRequest(service=service)).status == \
                health_pb2.HealthCheckResponse.NOT_SERVING
        stub = pb_grpc.GenerationStub(ch)
        with pytest.raises(grpc.RpcError) as info:
            list(stub.Generate(pb.GenerateRequest(prompt="x"), metadata=[("authorization", "Bearer k")]))
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        srv.call(srv.stack.set_engine(engine))
        assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as info:
            stub.GetLoad(pb.GetLoadRequest(), metadata=[("authorization", "Bearer wrong")])
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert stub.GetLoad(pb.GetLoadRequest(), metadata=[("authorization", "Bearer k")]).running == 0
        reflect = reflection_pb2_grpc.ServerReflectionStub(ch)
        reply = next(reflect.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
        names = {s.name for s in reply.list_services_response.service}
        assert {"longserve.v1.Generation", "grpc.health.v1.Health"} <= names


def test_progress_repeats_during_a_slow_prefill(server_factory, config, fake_engine_cls):
    srv = server_factory(config, fake_engine_cls(config, chunk_delay=0.25), keepalive_s=0.05, admission_wait_s=0.05)
    with _channel(srv) as ch:
        out = list(pb_grpc.GenerationStub(ch).Generate(
            pb.GenerateRequest(prompt="z" * 300, sampling=pb.SamplingParams(max_tokens=1)), timeout=10))
    done = [r.progress.prefill_tokens_done for r in out if r.WhichOneof("kind") == "progress"]
    assert done[0] == 0 and done[-1] == 300 and done == sorted(done)
    assert len(done) > 4 and {256, 300} <= set(done)    # keep-alive progress between the two chunks
