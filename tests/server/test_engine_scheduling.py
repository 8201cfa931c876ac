"""Engine behaviour: chunked long prompts beside decoding requests, preemption, abort, admission,
stop conditions, incremental detokenisation and the async engine."""
import asyncio

import pytest

from longserve.server.api.engine_client import CompletionDelta, PrefillProgress, RequestFinished, RequestRejected
from longserve.server.engine import LLM, SamplingParams
from longserve.server.engine.async_engine import AsyncEngine
from longserve.server.engine.offline import default_engine_config
from longserve.server.tokenizer import IncrementalDetokenizer

GREEDY = dict(temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    return LLM(tiny_model_dir, prefill_chunk_tokens=32, kv_capacity_tokens=4096)


def test_long_prompt_completes_while_short_request_keeps_decoding(llm):
    engine = llm.engine
    engine.add_request("short", list(range(3, 8)), SamplingParams(max_tokens=12, **GREEDY))
    engine.step()                                              # short: prefill + first token
    engine.add_request("long", list(range(3, 3 + 8 * 32)), SamplingParams(max_tokens=2, **GREEDY))
    short_tokens_during_long_prefill, progress = 0, []
    while engine.has_work():
        events = engine.step()
        progress += [e for e in events if isinstance(e, PrefillProgress) and e.request_id == "long"]
        if progress and progress[-1].processed_tokens < 256:
            short_tokens_during_long_prefill += sum(
                1 for e in events if isinstance(e, CompletionDelta) and e.request_id == "short")
    assert [p.processed_tokens for p in progress][-1] == 256 and len(progress) >= 8
    assert short_tokens_during_long_prefill >= 7
    assert engine.blocks.num_used_blocks == 0


def test_forced_preemption_keeps_outputs_correct(tiny_model_dir, llm):
    prompts = [list(range(3 + i, 13 + i)) for i in range(3)]
    params = SamplingParams(max_tokens=14, **GREEDY)
    expected = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    tight = LLM(tiny_model_dir, prefill_chunk_tokens=32, kv_capacity_tokens=80, kv_block_size=16)
    outs = tight.generate(prompts, params)
    assert [o.outputs[0].token_ids for o in outs] == expected
    assert sum(o.finished.num_preemptions for o in outs) > 0
    assert tight.engine.blocks.num_used_blocks == 0


def test_abort_frees_every_block(llm):
    engine = llm.engine
    engine.add_request("a", list(range(3, 90)), SamplingParams(max_tokens=50, n=2, **GREEDY))
    engine.add_request("b", list(range(3, 20)), SamplingParams(max_tokens=50, **GREEDY))
    engine.step()
    engine.step()
    assert engine.blocks.num_used_blocks > 0
    assert engine.abort("a") and engine.abort("b")
    assert engine.blocks.num_used_blocks == 0 and not engine.has_work()
    assert not engine.abort("a")


def test_over_length_prompt_is_rejected_without_touching_kv(tiny_model_dir):
    small = LLM(tiny_model_dir, max_model_len=64, max_output_tokens=16, kv_capacity_tokens=256)
    with pytest.raises(RequestRejected, match="maximum context length is 64 tokens") as info:
        small.engine.add_request("x", list(range(3, 60)), SamplingParams(max_tokens=10))
    assert info.value.param == "input_tokens"
    with pytest.raises(RequestRejected, match="at most 16 completion tokens"):
        small.engine.add_request("y", [5], SamplingParams(max_tokens=17))
    with pytest.raises(RequestRejected, match="outside the vocabulary"):
        small.engine.add_request("z", [5, 10**6], SamplingParams(max_tokens=2))
    assert small.engine.blocks.num_used_blocks == 0 and not small.engine.has_work()


def test_stop_conditions(llm):
    base = llm.generate([list(range(3, 30))], SamplingParams(max_tokens=16, **GREEDY))[0].outputs[0]
    # a stop token id ends the choice with that id as stop_reason
    tok = base.token_ids[3]
    out = llm.generate([list(range(3, 30))], SamplingParams(max_tokens=16, stop_token_ids=[tok], **GREEDY))[0]
    first = base.token_ids.index(tok)
    assert out.outputs[0].token_ids == base.token_ids[:first + 1]
    assert (out.outputs[0].finish_reason, out.outputs[0].stop_reason) == ("stop", tok)
    # min_tokens blocks the stop token until reached
    later = llm.generate([list(range(3, 30))], SamplingParams(max_tokens=16, min_tokens=first + 2,
                                                             stop_token_ids=[tok], **GREEDY))[0].outputs[0]
    assert len(later.token_ids) >= first + 2 and tok not in later.token_ids[:first + 2]
    # a stop string cuts the text (excluded by default)
    text = base.text
    stop = text[len(text) // 2:len(text) // 2 + 2]
    if stop.strip():
        cut = llm.generate([list(range(3, 30))], SamplingParams(max_tokens=16, stop=[stop], **GREEDY))[0]
        assert cut.outputs[0].finish_reason == "stop" and cut.outputs[0].stop_reason == stop
        assert cut.outputs[0].text == text[:text.index(stop)]


def test_incremental_detokenizer_never_splits_characters(llm):
    tok = llm.tokenizer
    text = "数字 こんにちは 🙂 Привет"
    ids = tok.encode(text)
    detok = IncrementalDetokenizer(tok)
    pieces = [detok.add([i]) for i in ids]
    assert "".join(pieces) == tok.decode(ids) == text
    assert all("\ufffd" not in p for p in pieces)


def test_async_engine_events_and_early_exit_frees_kv(tiny_model_dir):
    cfg = default_engine_config(tiny_model_dir, prefill_chunk_tokens=16, kv_capacity_tokens=2048,
                                served_model_name="tiny")
    engine = AsyncEngine(cfg)
    try:
        async def scenario():
            events = [e async for e in engine.generate("r1", list(range(3, 50)),
                                                        SamplingParams(max_tokens=5, **GREEDY))]
            kinds = [type(e).__name__ for e in events]
            assert kinds[0] == "PrefillProgress" and kinds[-1] == "RequestFinished"
            assert sum(isinstance(e, CompletionDelta) for e in events) == 5
            fin = events[-1]
            assert isinstance(fin, RequestFinished) and fin.num_output_tokens == 5
            assert fin.timings.first_token_seconds is not None and sum(fin.timings.prefill_chunk_tokens) == 47
            gen = engine.generate("r2", list(range(3, 40)), SamplingParams(max_tokens=500, **GREEDY))
            async for event in gen:
                if isinstance(event, CompletionDelta):
                    break
            await gen.aclose()
            for _ in range(100):
                stats = engine.load_stats()
                if stats.kv_blocks_used == 0 and stats.num_running == 0:
                    break
                await asyncio.sleep(0.02)
            assert engine.load_stats().kv_blocks_used == 0
            with pytest.raises(RequestRejected):
                async for _ in engine.generate("r3", list(range(3, 10)), SamplingParams(max_tokens=10**6)):
                    pass
        asyncio.run(scenario())
        assert engine.is_healthy()
        assert engine.model_info.kv_capacity_tokens == 2048
    finally:
        engine.shutdown()
