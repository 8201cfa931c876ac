"""The seam between the API layer and the engine (architecture.md §3).

`AsyncEngine` (server/engine/async_engine.py) implements `EngineClient`; API tests use a fake.
Everything that crosses the seam is plain data defined here (torch-free).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import AsyncIterator, Protocol, Sequence

from longserve.server.sampling import SamplingParams


class RequestRejected(ValueError):
    """A request the engine refuses up front (e.g. prompt + max_tokens > max_model_len).

    `param` names the offending input for the OpenAI error envelope (serving.md §1.6).
    """

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


class EngineDeadError(RuntimeError):
    """The engine loop has failed; the server should report unhealthy."""


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    token_id: int
    token: str
    logprob: float
    top: tuple[tuple[int, str, float], ...] = ()   # (token_id, token text, logprob), best first


@dataclass(frozen=True, slots=True)
class PrefillProgress:
    """Emitted after each prefill chunk of a request: processed / total prompt tokens."""
    request_id: str
    processed_tokens: int
    total_tokens: int
    sparse_density: float | None = None   # computed / causal (query, key) pairs of this chunk, when sparse ran


@dataclass(frozen=True, slots=True)
class CompletionDelta:
    """New output of one of the request's `n` choices since the previous delta."""
    request_id: str
    index: int                           # choice index in [0, n)
    text: str                            # newly decoded text (never splits a UTF-8 character)
    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprob, ...] = ()
    finish_reason: str | None = None     # "stop" | "length" | "abort" | None while running
    stop_reason: str | int | None = None # the stop string or token id that ended it
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0           # cumulative for this choice


@dataclass(frozen=True, slots=True)
class RequestTimings:
    arrival: float
    queued_seconds: float = 0.0
    first_token_seconds: float | None = None   # TTFT from arrival
    prefill_chunk_seconds: tuple[float, ...] = ()
    prefill_chunk_tokens: tuple[int, ...] = ()
    decode_seconds: float = 0.0
    finished: float | None = None


@dataclass(frozen=True, slots=True)
class RequestFinished:
    """Last event of a request: totals and timings for usage and metrics."""
    request_id: str
    num_prompt_tokens: int
    num_output_tokens: int               # over all n choices
    finish_reasons: tuple[str, ...]
    timings: RequestTimings
    num_preemptions: int = 0


GenerationEvent = PrefillProgress | CompletionDelta | RequestFinished


@dataclass(frozen=True, slots=True)
class LoadStats:
    num_running: int
    num_waiting: int
    pending_prefill_tokens: int
    kv_blocks_total: int
    kv_blocks_used: int
    kv_block_size: int

    @property
    def kv_usage(self) -> float:
        return self.kv_blocks_used / self.kv_blocks_total if self.kv_blocks_total else 0.0


@dataclass(frozen=True, slots=True)
class ModelInfo:
    served_model_name: str
    model_path: str
    max_model_len: int
    max_output_tokens: int
    vocab_size: int
    dca_enabled: bool
    sparse_enabled: bool
    sparse_threshold: int | None
    kv_capacity_tokens: int
    extra: dict = field(default_factory=dict)


class EngineClient(Protocol):
    model_info: ModelInfo

    def generate(self, request_id: str, prompt_token_ids: Sequence[int],
                 params: SamplingParams) -> AsyncIterator[GenerationEvent]:
        """Async iterator of events; raises RequestRejected before yielding if the request is invalid.

        Leaving the iterator early (client disconnect) must abort the request and free its KV.
        """

    async def abort(self, request_id: str) -> None: ...

    def is_healthy(self) -> bool: ...

    def load_stats(self) -> LoadStats: ...

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]: ...

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            **kwargs) -> str: ...
