"""The engine's contract: what goes in (commands), what comes out (events), and how a request ends.

Everything here is plain, torch-free data owned by the engine. The API layer (HTTP, gRPC, metrics)
and the offline `LLM` consume these types; the engine never imports the API.

A request's events, in order: zero or more `PromptLogprobs` (when asked for), `PrefillProgress` and
`CompletionDelta`, then exactly one
terminal event: `RequestFinished` (it ran to the end, or was aborted) or `RequestFailed` (running
one of its steps raised; every unfinished choice got a last `CompletionDelta` with
`FinishReason.ERROR` just before).
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

from longserve.server.sampling import SamplingParams


class FinishReason(enum.StrEnum):
    """Why a choice ended. String-valued, so it serialises and compares as the plain OpenAI words."""
    STOP = "stop"          # an end-of-sequence token, a stop token id or a stop string
    LENGTH = "length"      # max_tokens or the model's context length reached
    ABORT = "abort"        # the client went away or the server drained
    ERROR = "error"        # the engine failed while running this request's step


class FailureCause(enum.StrEnum):
    """What made a request fail (the `reason` label of the failure counter)."""
    OUT_OF_MEMORY = "out_of_memory"   # device (or host) memory ran out while running its step
    EXCEPTION = "exception"           # any other error raised while running its step


# --- errors ------------------------------------------------------------------------------------------
class RequestRejected(ValueError):
    """A request the engine refuses up front (e.g. prompt + max_tokens > max_model_len).

    `param` names the offending input for the OpenAI error envelope; `code` marks overload refusals.
    """

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


class EngineDeadError(RuntimeError):
    """The engine loop itself has failed (not one request's step); the server should report unhealthy."""


# --- commands (API thread -> engine thread) ----------------------------------------------------------
@dataclass(frozen=True, slots=True)
class AddRequest:
    request_id: str
    prompt_token_ids: tuple[int, ...]
    params: SamplingParams


@dataclass(frozen=True, slots=True)
class AbortRequest:
    request_id: str


EngineCommand = AddRequest | AbortRequest


# --- events (engine -> consumers) --------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class TokenLogprob:
    token_id: int
    token: str
    logprob: float
    top: tuple[tuple[int, str, float], ...] = ()   # (token_id, token text, logprob), best first
    rank: int | None = None     # prompt tokens: 1 + the number of more likely tokens (None for sampled tokens)


@dataclass(frozen=True, slots=True)
class PrefillProgress:
    """Emitted after each prefill chunk of a request: processed / total prompt tokens."""
    request_id: str
    processed_tokens: int
    total_tokens: int
    sparse_density: float | None = None   # computed / causal (query, key) pairs of this chunk, when sparse ran


@dataclass(frozen=True, slots=True)
class PromptLogprobs:
    """Log-probabilities of prompt tokens `start .. start + len(logprobs) - 1`, emitted as prefill computes them
    (when `SamplingParams.prompt_logprobs` is set). The first prompt token has none, so `start` >= 1; the events
    of a request cover each prompt token once, in order, also across preemption."""
    request_id: str
    start: int
    logprobs: tuple[TokenLogprob, ...]


@dataclass(frozen=True, slots=True)
class CompletionDelta:
    """New output of one of the request's `n` choices since the previous delta."""
    request_id: str
    index: int                           # choice index in [0, n)
    text: str                            # newly decoded text (never splits a UTF-8 character)
    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprob, ...] = ()
    finish_reason: FinishReason | None = None   # None while the choice is running
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
    """Last event of a request that ran to its end: totals and timings for usage and metrics."""
    request_id: str
    num_prompt_tokens: int
    num_output_tokens: int               # over all n choices
    finish_reasons: tuple[FinishReason, ...]
    timings: RequestTimings
    num_preemptions: int = 0


@dataclass(frozen=True, slots=True)
class RequestFailed:
    """Last event of a request whose step raised: the request is dropped and its KV blocks are free.

    `message` is meant for the client: it names the cause and the request's size.
    """
    request_id: str
    cause: FailureCause
    message: str
    num_prompt_tokens: int
    num_output_tokens: int               # generated before the failure, over all n choices
    timings: RequestTimings

    @property
    def out_of_memory(self) -> bool:
        return self.cause is FailureCause.OUT_OF_MEMORY


GenerationEvent = PromptLogprobs | PrefillProgress | CompletionDelta | RequestFinished | RequestFailed
TERMINAL_EVENTS = (RequestFinished, RequestFailed)


# --- engine state and identity -----------------------------------------------------------------------
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


__all__ = ["TERMINAL_EVENTS", "AbortRequest", "AddRequest", "CompletionDelta", "EngineCommand", "EngineDeadError",
           "FailureCause", "FinishReason", "GenerationEvent", "LoadStats", "ModelInfo", "PrefillProgress",
           "PromptLogprobs", "RequestFailed", "RequestFinished", "RequestRejected", "RequestTimings", "TokenLogprob"]
