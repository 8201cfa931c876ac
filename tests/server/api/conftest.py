"""Fixtures for the API tests: a deterministic fake `EngineClient` and servers on 127.0.0.1.

The fake tokenizes one character per token, prefills in chunks (emitting progress), decodes canned
text chosen by a seeded RNG, honours stop strings / max_tokens / n / logprobs, and counts KV blocks
so tests can assert that an aborted request frees its KV through `load_stats()`.
"""
from __future__ import annotations

import asyncio
import contextlib
import math
import random
import time

import pytest

from longserve.server.api.app import BackgroundServer, ServingStack
from longserve.server.api.engine_client import (
    CompletionDelta,
    FinishReason,
    LoadStats,
    ModelInfo,
    PrefillProgress,
    RequestFinished,
    RequestRejected,
    RequestTimings,
    TokenLogprob,
)
from longserve.server.config import EngineConfig

VOCAB = 65536
ALPHABET = "abcdefghijklmnopqrstuvwxyz "


def make_config(**overrides) -> EngineConfig:
    base = dict(schema_version=1, runtime="native", model_path="/models/fake", served_model_name="fake-model",
                tensor_parallel_size=1, max_model_len=4096, max_num_seqs=64, max_output_tokens=512,
                prefill_chunk_tokens=256, gpu_memory_utilization=0.9, kv_block_size=16)
    base.update(overrides)
    return EngineConfig(**base)


class FakeEngine:
    """Deterministic EngineClient: canned tokens, chunked prefill progress, KV block accounting."""

    def __init__(self, config: EngineConfig, *, token_delay: float = 0.0, chunk_delay: float = 0.0,
                 kv_blocks_total: int = 100_000, fail_after_tokens: int | None = None):
        self.config = config
        self.token_delay = token_delay
        self.chunk_delay = chunk_delay
        self.fail_after_tokens = fail_after_tokens
        self.healthy = True
        self.reject: RequestRejected | None = None     # set to make every generate() refuse up front
        self.kv_blocks_total = kv_blocks_total
        self.blocks: dict[str, int] = {}
        self.pending_prefill: dict[str, int] = {}
        self.aborted: list[str] = []
        self._reasons: dict[str, list[str]] = {}
        self._outputs: dict[str, int] = {}
        self.model_info = ModelInfo(
            served_model_name=config.served_model_name, model_path=config.model_path,
            max_model_len=config.max_model_len, max_output_tokens=config.max_output_tokens, vocab_size=VOCAB,
            dca_enabled=True, sparse_enabled=True, sparse_threshold=1024,
            kv_capacity_tokens=kv_blocks_total * config.kv_block_size)

    # --- tokenizer ---------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [ord(c) if ord(c) < VOCAB else ord("?") for c in text]

    def decode(self, token_ids, skip_special_tokens: bool = True) -> str:
        return "".join(chr(t) for t in token_ids)

    def apply_chat_template(self, messages, add_generation_prompt=True, **kwargs) -> str:
        text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")

    # --- engine ------------------------------------------------------------------------------
    def is_healthy(self) -> bool:
        return self.healthy

    def load_stats(self) -> LoadStats:
        return LoadStats(num_running=len(self.blocks), num_waiting=0,
                         pending_prefill_tokens=sum(self.pending_prefill.values()),
                         kv_blocks_total=self.kv_blocks_total, kv_blocks_used=sum(self.blocks.values()),
                         kv_block_size=self.config.kv_block_size)

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)
        self._free(request_id)

    def _free(self, request_id: str) -> None:
        self.blocks.pop(request_id, None)
        self.pending_prefill.pop(request_id, None)

    async def generate(self, request_id, prompt_token_ids, params):
        prompt = list(prompt_token_ids)
        limit = self.config.max_model_len
        if self.reject is not None:
            raise self.reject
        if len(prompt) + params.max_tokens > limit:
            raise RequestRejected(f"This model's maximum context length is {limit} tokens", "input_tokens")
        arrival = time.monotonic()
        self.blocks[request_id] = math.ceil((len(prompt) + params.max_tokens * params.n) / self.config.kv_block_size)
        self.pending_prefill[request_id] = len(prompt)
        try:
            chunk_seconds, chunk_tokens = [], []
            done = 0
            while done < len(prompt):
                step = min(self.config.prefill_chunk_tokens, len(prompt) - done)
                started = time.monotonic()
                await asyncio.sleep(self.chunk_delay)
                done += step
                self.pending_prefill[request_id] = len(prompt) - done
                chunk_seconds.append(time.monotonic() - started)
                chunk_tokens.append(step)
                yield PrefillProgress(request_id, done, len(prompt))
            first_token = time.monotonic()
            async for delta in self._decode(request_id, prompt, params):
                yield delta
            finished = time.monotonic()
            reasons = tuple(self._reasons.pop(request_id))
            outputs = self._outputs.pop(request_id)
            self._free(request_id)
            yield RequestFinished(request_id, len(prompt), outputs, reasons, RequestTimings(
                arrival=arrival, queued_seconds=0.0, first_token_seconds=first_token - arrival,
                prefill_chunk_seconds=tuple(chunk_seconds), prefill_chunk_tokens=tuple(chunk_tokens),
                decode_seconds=finished - first_token, finished=finished))
        finally:
            self._free(request_id)

    async def _decode(self, request_id, prompt, params):
        rngs = [random.Random(f"{params.seed + i}" if params.seed is not None else f"{random.random()}")
                for i in range(params.n)]
        if params.temperature == 0:
            rngs = [random.Random(f"greedy-{sum(prompt)}") for _ in range(params.n)]
        held = [""] * params.n
        counts = [0] * params.n
        reasons: list[FinishReason | None] = [None] * params.n
        total = 0
        for _step in range(params.max_tokens):
            for i in range(params.n):
                if reasons[i] is not None:
                    continue
                if self.fail_after_tokens is not None and total >= self.fail_after_tokens:
                    raise RuntimeError("simulated engine failure")
                token = rngs[i].choice(ALPHABET)
                counts[i] += 1
                total += 1
                held[i] += token
                text, stop = self._release(held[i], params)
                finish = FinishReason.STOP if stop is not None else (
                    FinishReason.LENGTH if counts[i] == params.max_tokens else None)
                if stop is not None:
                    held[i] = ""
                else:
                    held[i] = held[i][len(text):]
                    if finish:
                        text, held[i] = text + held[i], ""
                reasons[i] = finish
                logprobs = ()
                if params.logprobs is not None:
                    top = tuple((ord(c), c, -0.1 * (k + 1)) for k, c in enumerate(ALPHABET[:params.logprobs]))
                    logprobs = (TokenLogprob(ord(token), token, -0.05, top),)
                yield CompletionDelta(request_id, i, text, (ord(token),), logprobs, finish, stop,
                                      len(prompt), counts[i])
            if all(r is not None for r in reasons):
                break
            await asyncio.sleep(self.token_delay)
        self._reasons[request_id] = [r or FinishReason.LENGTH for r in reasons]
        self._outputs[request_id] = sum(counts)

    @staticmethod
    def _release(held: str, params) -> tuple[str, str | None]:
        """Text safe to emit, holding back a possible stop-string prefix; (text, stop) on a match."""
        for stop in params.stop:
            at = held.find(stop)
            if at >= 0:
                keep = held[:at + len(stop)] if params.include_stop_str_in_output else held[:at]
                return keep, stop
        safe = len(held)
        for stop in params.stop:
            for k in range(min(len(stop) - 1, len(held)), 0, -1):
                if held.endswith(stop[:k]):
                    safe = min(safe, len(held) - k)
                    break
        return held[:safe], None


@pytest.fixture
def config():
    return make_config()


@pytest.fixture
def engine(config):
    return FakeEngine(config)


def start_server(config, engine=None, **kwargs) -> BackgroundServer:
    kwargs.setdefault("http_port", 0)
    kwargs.setdefault("grpc_port", 0)
    stack = ServingStack(config, host="127.0.0.1", **kwargs)
    return BackgroundServer(stack).start(engine)


@contextlib.contextmanager
def _real_engine_server(checkpoint: str, **overrides):
    """The real engine on a checkpoint behind the whole serving stack on 127.0.0.1: yields (server, engine)."""
    from longserve.server.engine.async_engine import AsyncEngine
    config = make_config(model_path=checkpoint, served_model_name="tiny", max_model_len=2048, max_num_seqs=16,
                         max_output_tokens=256, prefill_chunk_tokens=64, kv_capacity_tokens=8192, dtype="float32")
    config = config.replace(**overrides)
    engine = AsyncEngine(config)
    srv = start_server(config, engine)
    try:
        yield srv, engine
    finally:
        srv.stop()
        engine.shutdown()


@pytest.fixture(scope="session")
def real_engine_server():
    """`with real_engine_server(checkpoint, **config_overrides) as (srv, engine)`: for module-scoped fixtures."""
    return _real_engine_server


@pytest.fixture
def server(config, engine):
    srv = start_server(config, engine)
    yield srv
    srv.stop()


@pytest.fixture
def fake_engine_cls():
    return FakeEngine


@pytest.fixture
def server_factory():
    started = []

    def factory(config, engine=None, **kwargs):
        srv = start_server(config, engine, **kwargs)
        started.append(srv)
        return srv
    yield factory
    for srv in started:
        srv.stop()


@pytest.fixture
def config_factory():
    return make_config


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A tiny random Qwen2 checkpoint (built once per session) for the real-engine tests."""
    from longserve.server.tiny_checkpoint import build_tiny_checkpoint
    return build_tiny_checkpoint(str(tmp_path_factory.mktemp("tiny-qwen2")))
