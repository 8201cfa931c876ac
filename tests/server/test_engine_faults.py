"""Failure isolation in `LLMEngine`: a step that raises fails only the request(s) that cause it.

A fault injector wraps the runner's forward: whenever a marked request has tokens in the batch it
first runs the real forward (so the batch's K/V are written, the worst case for a re-run) and then
raises. The other requests must produce exactly what an undisturbed run produces, and every KV block
must be free once the engine is idle.
"""
from __future__ import annotations

import pytest
import torch

from longserve.server.engine import LLM, SamplingParams
from longserve.server.engine.protocol import CompletionDelta, FailureCause, FinishReason, RequestFailed, RequestFinished

GREEDY = dict(temperature=0.0, ignore_eos=True)
PROMPTS = {"a": list(range(3, 40)), "b": list(range(50, 120)), "c": list(range(7, 19))}


class Fault:
    """Makes `runner.forward_logits` raise for batches holding `request_id` (after `after_tokens` outputs)."""

    def __init__(self, runner, request_id: str, *, after_tokens: int = 0, exc_type=torch.OutOfMemoryError,
                 message: str = "CUDA out of memory. Tried to allocate 20.00 GiB (injected)"):
        self.request_id, self.after_tokens, self.exc_type, self.message = request_id, after_tokens, exc_type, message
        self.raised = 0
        self.batch_sizes: list[int] = []     # requests in each batch that raised
        self._forward = runner.forward_logits
        runner.forward_logits = self.forward

    def forward(self, batch, *args, **kwargs):
        logits = self._forward(batch, *args, **kwargs)
        if any(c.seq.request_id == self.request_id and len(c.seq.output_token_ids) >= self.after_tokens
               for c in batch.chunks):
            self.raised += 1
            self.batch_sizes.append(len({c.seq.request_id for c in batch.chunks}))
            raise self.exc_type(self.message)
        return logits


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    return LLM(tiny_model_dir, prefill_chunk_tokens=48, kv_capacity_tokens=2048, max_num_seqs=8)


def run(engine, requests: dict[str, tuple[list[int], SamplingParams]]) -> dict[str, list]:
    for rid, (ids, params) in requests.items():
        engine.add_request(rid, ids, params)
    events: dict[str, list] = {rid: [] for rid in requests}
    while engine.has_work():
        for event in engine.step():
            events[event.request_id].append(event)
    return events


def tokens(events) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for e in events:
        if isinstance(e, CompletionDelta):
            out.setdefault(e.index, []).extend(e.token_ids)
    return out


def text(events) -> str:
    return "".join(e.text for e in events if isinstance(e, CompletionDelta))


def assert_idle(engine) -> None:
    assert not engine.has_work() and not engine.requests
    assert engine.blocks.num_used_blocks == 0
    assert not engine.runner._generators


def baseline(llm, max_tokens: int = 10) -> dict[str, list]:
    return run(llm.engine, {rid: (ids, SamplingParams(max_tokens=max_tokens, **GREEDY))
                            for rid, ids in PROMPTS.items()})


@pytest.mark.parametrize("after_tokens", [0, 3], ids=["in-prefill", "in-decode"])
def test_failing_request_fails_alone_others_unchanged(llm, after_tokens):
    engine = llm.engine
    clean = baseline(llm)
    fault = Fault(engine.runner, "b", after_tokens=after_tokens)
    try:
        got = baseline(llm)
    finally:
        engine.runner.forward_logits = fault._forward
    assert fault.raised >= 2 and max(fault.batch_sizes) >= 2     # the shared batch, then "b" alone
    for rid in ("a", "c"):
        assert tokens(got[rid]) == tokens(clean[rid]) and text(got[rid]) == text(clean[rid])
        assert isinstance(got[rid][-1], RequestFinished)
    failed = got["b"][-1]
    assert isinstance(failed, RequestFailed) and failed.cause is FailureCause.OUT_OF_MEMORY and failed.out_of_memory
    assert failed.num_prompt_tokens == len(PROMPTS["b"]) and failed.num_output_tokens == after_tokens
    assert "ran out of memory" in failed.message and f"prompt of {len(PROMPTS['b'])} tokens" in failed.message
    assert "OutOfMemoryError" in failed.message
    last = got["b"][-2]
    assert isinstance(last, CompletionDelta) and last.finish_reason is FinishReason.ERROR and last.token_ids == ()
    assert tokens(got["b"]).get(0, []) == tokens(clean["b"])[0][:after_tokens]
    assert_idle(engine)
    again = baseline(llm)                                       # the engine keeps serving
    assert {r: tokens(e) for r, e in again.items()} == {r: tokens(e) for r, e in clean.items()}
    assert_idle(engine)


def test_single_request_step_failure_and_generic_exception(llm):
    engine = llm.engine
    fault = Fault(engine.runner, "solo", after_tokens=2, exc_type=RuntimeError, message="illegal memory access")
    try:
        got = run(engine, {"solo": (PROMPTS["a"], SamplingParams(max_tokens=8, n=2, **GREEDY))})["solo"]
    finally:
        engine.runner.forward_logits = fault._forward
    assert fault.raised == 1 and fault.batch_sizes == [1]          # one request: no re-run
    failed = got[-1]
    assert isinstance(failed, RequestFailed) and failed.cause is FailureCause.EXCEPTION
    assert "The engine failed" in failed.message and "RuntimeError: illegal memory access" in failed.message
    errors = [e for e in got if isinstance(e, CompletionDelta) and e.finish_reason is FinishReason.ERROR]
    assert sorted(e.index for e in errors) == [0, 1]                # both choices end with "error"
    assert failed.num_output_tokens == sum(len(t) for t in tokens(got).values()) >= 2
    assert_idle(engine)
    ok = run(engine, {"next": (PROMPTS["c"], SamplingParams(max_tokens=3, **GREEDY))})["next"]
    assert isinstance(ok[-1], RequestFinished) and ok[-1].finish_reasons == (FinishReason.LENGTH,)
    assert_idle(engine)


def test_offline_llm_reports_the_failure(llm):
    fault = Fault(llm.engine.runner, "offline-missing")         # marks nothing: every request runs
    try:
        outs = llm.generate([PROMPTS["a"], PROMPTS["c"]], SamplingParams(max_tokens=4, **GREEDY))
    finally:
        llm.engine.runner.forward_logits = fault._forward
    assert fault.raised == 0 and all(o.failure is None and o.finished is not None for o in outs)
    rid = f"offline-{llm._counter + 1}"                         # the second prompt of the next call
    fault = Fault(llm.engine.runner, rid)
    try:
        outs = llm.generate([PROMPTS["a"], PROMPTS["c"]], SamplingParams(max_tokens=4, **GREEDY))
    finally:
        llm.engine.runner.forward_logits = fault._forward
    assert outs[0].failure is None and outs[0].outputs[0].finish_reason is FinishReason.LENGTH
    assert outs[1].failure is not None and outs[1].finished is None
    assert outs[1].outputs[0].finish_reason is FinishReason.ERROR
    assert_idle(llm.engine)


def test_error_turning_a_token_into_text_fails_only_that_request(llm):
    engine = llm.engine
    clean = baseline(llm, max_tokens=6)
    params = SamplingParams(max_tokens=6, **GREEDY)
    for rid, ids in PROMPTS.items():
        engine.add_request(rid, ids, params)

    def broken(token_ids, final=False):
        raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "injected")
    engine.requests["c"].choices[0].detok.step = broken
    got: dict[str, list] = {rid: [] for rid in PROMPTS}
    while engine.has_work():
        for event in engine.step():
            got[event.request_id].append(event)
    assert {r: tokens(got[r]) for r in ("a", "b")} == {r: tokens(clean[r]) for r in ("a", "b")}
    failed = got["c"][-1]
    assert isinstance(failed, RequestFailed) and failed.cause is FailureCause.EXCEPTION
    assert "UnicodeDecodeError" in failed.message
    assert_idle(engine)


def test_a_broken_device_is_not_blamed_on_a_request(llm, monkeypatch):
    """After a failed step that is not out-of-memory the engine probes the device; if the probe fails
    too (CUDA errors are sticky), the step raises EngineDeadError instead of failing requests."""
    from longserve.server.engine import llm_engine
    from longserve.server.engine.protocol import EngineDeadError
    llm_engine._probe_device(llm.engine.runner.device)             # a working device passes
    probes = []

    def broken(device):
        probes.append(device)
        raise RuntimeError("CUDA error: an illegal memory access was encountered")
    monkeypatch.setattr(llm_engine, "_probe_device", broken)
    engine = llm.engine
    fault = Fault(engine.runner, "a", exc_type=torch.OutOfMemoryError)     # out of memory: no probe
    try:
        got = run(engine, {"a": (PROMPTS["a"], SamplingParams(max_tokens=2, **GREEDY))})["a"]
    finally:
        engine.runner.forward_logits = fault._forward
    assert isinstance(got[-1], RequestFailed) and not probes
    fault = Fault(engine.runner, "a", exc_type=RuntimeError, message="illegal memory access")
    try:
        engine.add_request("a", PROMPTS["a"], SamplingParams(max_tokens=2, **GREEDY))
        with pytest.raises(EngineDeadError, match="device is unusable.*illegal memory access"):
            engine.step()
    finally:
        engine.runner.forward_logits = fault._forward
        engine.abort("a")
    assert len(probes) == 1
    assert_idle(engine)


def test_async_engine_dies_only_when_the_device_does(tiny_model_dir, monkeypatch):
    import asyncio

    from longserve.server.engine import llm_engine
    from longserve.server.engine.async_engine import AsyncEngine
    from longserve.server.engine.offline import default_engine_config
    from longserve.server.engine.protocol import EngineDeadError
    engine = AsyncEngine(default_engine_config(tiny_model_dir, kv_capacity_tokens=1024, served_model_name="tiny"))
    try:
        runner = engine.engine.runner

        async def generate(rid):
            return [e async for e in engine.generate(rid, PROMPTS["c"], SamplingParams(max_tokens=3, **GREEDY))]
        fault = Fault(runner, "x", exc_type=RuntimeError, message="bad kernel argument")
        events = asyncio.run(generate("x"))
        assert isinstance(events[-1], RequestFailed) and engine.is_healthy()
        assert isinstance(asyncio.run(generate("y"))[-1], RequestFinished)
        monkeypatch.setattr(llm_engine, "_probe_device", lambda device: 1 / 0)
        with pytest.raises(EngineDeadError, match="device is unusable"):
            asyncio.run(generate("x"))
        assert not engine.is_healthy()
        runner.forward_logits = fault._forward
    finally:
        engine.shutdown()
