"""The engine contract: finish reasons, typed commands, the one admission rule of each kind, and the
detokenizer's stop strings (a held-back buffer of max(len(stop)) - 1 characters)."""
from __future__ import annotations

import json
from collections import deque

import numpy as np
import pytest

from longserve.server.api import engine_client
from longserve.server.engine import protocol
from longserve.server.engine.admission import check_token_ids, context_length_error, resolve_max_tokens
from longserve.server.engine.protocol import AbortRequest, AddRequest, FinishReason, RequestRejected
from longserve.server.tokenizer import IncrementalDetokenizer


def test_finish_reasons_are_the_plain_words():
    assert [r.value for r in FinishReason] == ["stop", "length", "abort", "error"]
    assert FinishReason.STOP == "stop" and str(FinishReason.ERROR) == "error"
    assert json.dumps({"finish_reason": FinishReason.LENGTH}) == '{"finish_reason": "length"}'
    assert {"abort": 1}[FinishReason.ABORT] == 1


def test_api_seam_reexports_the_engine_types():
    for name in ("CompletionDelta", "PrefillProgress", "RequestFinished", "RequestFailed", "RequestRejected",
                 "EngineDeadError", "LoadStats", "ModelInfo", "TokenLogprob", "RequestTimings", "FinishReason"):
        assert getattr(engine_client, name) is getattr(protocol, name)


def test_unknown_engine_command_is_an_error_not_an_abort():
    from longserve.server.engine.async_engine import AsyncEngine

    class Recorder:
        aborted: list = []

        def abort(self, request_id):
            self.aborted.append(request_id)

    eng = AsyncEngine.__new__(AsyncEngine)          # the command loop alone, without loading a model
    eng.engine, eng._streams = Recorder(), {}
    eng._commands = deque([AbortRequest("r1"), AddRequest("gone", (1, 2), None), ("abort", "r2")])
    with pytest.raises(TypeError, match="unknown engine command"):
        eng._drain_commands()
    assert eng.engine.aborted == ["r1"]             # the add of a request nobody waits for is skipped


def test_context_length_rule():
    kw = dict(max_model_len=100, max_output_tokens=30)
    assert resolve_max_tokens(10, None, **kw) == 30
    assert resolve_max_tokens(90, None, **kw) == 10
    assert resolve_max_tokens(10, 5, **kw) == 5
    with pytest.raises(RequestRejected, match="leaving no room for the completion") as info:
        resolve_max_tokens(100, None, **kw)
    assert info.value.param == "input_tokens"
    with pytest.raises(RequestRejected) as info:
        resolve_max_tokens(90, 20, **kw)
    assert info.value.message == context_length_error(100, 90, 20).message
    assert "needs 110 tokens (90 in the prompt, 20 for the completion)" in info.value.message
    with pytest.raises(RequestRejected, match="at most 30 completion tokens") as info:
        resolve_max_tokens(10, 31, **kw)
    assert info.value.param == "max_tokens"
    for bad in (0, True, 2.0):
        with pytest.raises(RequestRejected, match="max_tokens must be at least 1"):
            resolve_max_tokens(10, bad, **kw)
    with pytest.raises(RequestRejected, match="the prompt is empty"):
        resolve_max_tokens(0, None, **kw)


def test_vocabulary_rule():
    assert check_token_ids([0, np.int64(5), 9], 10) == [0, 5, 9]
    for bad in (10, -1, True, 1.0, "3"):
        with pytest.raises(RequestRejected, match=r"outside the vocabulary \[0, 10\)") as info:
            check_token_ids([1, bad], 10, param="tokens")
        assert info.value.param == "tokens"


def test_api_answers_the_engine_rules_as_400():
    from longserve.server.api.errors import BadRequest
    from longserve.server.api.generation import GenerationCore
    from longserve.server.api.lifecycle import ServerState
    from longserve.server.api.metrics import Metrics
    from longserve.server.config import EngineConfig
    cfg = EngineConfig(schema_version=1, runtime="native", model_path="/m", served_model_name="m",
                       tensor_parallel_size=1, max_model_len=100, max_num_seqs=4, max_output_tokens=30,
                       prefill_chunk_tokens=64, gpu_memory_utilization=0.9)
    core = GenerationCore(ServerState(), Metrics(cfg), cfg)
    try:
        with pytest.raises(BadRequest) as info:
            core.effective_max_tokens(90, 20)
        assert info.value.message == context_length_error(100, 90, 20).message
        assert info.value.param == "input_tokens"
    finally:
        core.shutdown()


class CharTokenizer:
    """One character per token id (its code point)."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids)


def feed(detok, text):
    out = []
    for ch in text:
        piece, stop = detok.step([ord(ch)])
        out.append(piece)
        if stop is not None:
            return out, stop
    return out, None


def test_detokenizer_holds_back_a_possible_stop_string():
    detok = IncrementalDetokenizer(CharTokenizer(), stop=("abc", "zz"))
    assert detok.hold == 2
    pieces, stop = feed(detok, "xyab")
    assert pieces == ["", "", "x", "y"] and stop is None       # "ab" could still become "abc"
    pieces, stop = feed(detok, "d")
    assert pieces == ["a"] and stop is None                     # "abd": no stop can start at "a" any more
    assert detok.step([], final=True) == ("bd", None)           # the choice ended for another reason: flush


def test_detokenizer_cuts_at_the_earliest_stop_string():
    detok = IncrementalDetokenizer(CharTokenizer(), stop=("abc", "b"))
    pieces, stop = feed(detok, "xxabc")
    assert "".join(pieces) == "xxa" and stop == "b"
    keep = IncrementalDetokenizer(CharTokenizer(), stop=("abc",), include_stop_str_in_output=True)
    pieces, stop = feed(keep, "12abc34")
    assert "".join(pieces) == "12abc" and stop == "abc"


def test_detokenizer_without_stop_strings_emits_at_once():
    detok = IncrementalDetokenizer(CharTokenizer())
    assert detok.hold == 0
    assert feed(detok, "hello") == (list("hello"), None)
    assert detok.step([]) == ("", None)                         # a hidden token adds no text
