"""Protocol-neutral request handling shared by HTTP and gRPC.

Prompt resolution (tokenization off the event loop), the engine's admission rules run early (so a
bad request gets a 400 before admission), sampling defaults (request -> generation_config.json ->
OpenAI), and `EventStream`: engine requests pumped into one queue, with keep-alive ticks, metrics,
and abort-on-close so a client that goes away frees its KV at once. A request the engine could not run (`RequestFailed`)
reaches the reader as its choices' last deltas (finish reason "error") followed by an `APIError`: 503 when it ran out of
memory, 500 otherwise.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Sequence

from longserve.server.api.engine_client import (
    CompletionDelta,
    EngineDeadError,
    FinishReason,
    PrefillProgress,
    RequestFailed,
    RequestFinished,
    RequestRejected,
)
from longserve.server.api.errors import (
    APIError,
    BadRequest,
    EngineFailure,
    EngineOutOfMemory,
    NotFound,
    Overloaded,
    Unavailable,
    model_not_found,
)
from longserve.server.api.lifecycle import ServerState
from longserve.server.api.metrics import Metrics, RequestRecorder
from longserve.server.config import EngineConfig
from longserve.server.engine.admission import check_token_ids, resolve_max_tokens
from longserve.server.sampling import SamplingParams

log = logging.getLogger("longserve.server.api")

TIMEOUT = object()   # EventStream.get: nothing arrived within the timeout
END = object()       # EventStream.get: every engine request has ended
_DONE = object()

# generation_config.json keys that act as request defaults, mapped to SamplingParams fields
_GEN_CONFIG_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
_OVERLOAD_CODES = {"overloaded", "queue_full", "rate_limited"}


def load_generation_defaults(model_path: str) -> dict:
    """Sampling defaults from the checkpoint's generation_config.json ({} when absent or unreadable)."""
    path = os.path.join(model_path, "generation_config.json")
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {k: data[k] for k in _GEN_CONFIG_KEYS if isinstance(data.get(k), (int, float))
            and not isinstance(data.get(k), bool)}


@dataclass
class EngineRequest:
    """One engine request; a multi-prompt completion has several, its choices offset by `choice_offset`."""
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    choice_offset: int = 0
    prompt_text: str | None = None
    arrival: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class StreamItem:
    request: EngineRequest
    event: PrefillProgress | CompletionDelta | RequestFinished


class EventStream:
    """Events of one API request's engine requests, in arrival order. Always `close()` it."""

    def __init__(self, core: "GenerationCore", requests: Sequence[EngineRequest]):
        self._core = core
        self._engine = core.state.require_engine()
        self._queue: asyncio.Queue = asyncio.Queue()
        self._open = len(requests)
        self._getter: asyncio.Task | None = None
        self._pumps = []
        for req in requests:
            recorder = RequestRecorder(core.metrics, req.request_id, len(req.prompt_ids), req.params.n, req.arrival)
            pump = asyncio.create_task(self._pump(req, recorder))
            # runs even for a pump cancelled before it started: END is always reached, one outcome recorded
            pump.add_done_callback(lambda _t, rec=recorder: (rec.unfinished(FinishReason.ABORT),
                                                             self._queue.put_nowait(_DONE)))
            self._pumps.append(pump)
        core.state.streams.add(self)

    async def get(self, timeout: float | None = None):
        """Next StreamItem, or TIMEOUT / END; raises APIError for a failed engine request."""
        while True:
            if self._open == 0 and self._queue.empty():
                return END
            if self._getter is None and not self._queue.empty():
                item = self._queue.get_nowait()
            else:
                if self._getter is None:
                    self._getter = asyncio.create_task(self._queue.get())
                done, _ = await asyncio.wait({self._getter}, timeout=timeout)
                if not done:
                    return TIMEOUT
                item = self._getter.result()
                self._getter = None
            if item is _DONE:
                self._open -= 1
                continue
            if isinstance(item, APIError):
                raise item
            return item

    async def abort(self) -> None:
        """Stop the engine requests (drain past the grace period); `get` then reaches END."""
        for pump in self._pumps:
            pump.cancel()
        await asyncio.gather(*self._pumps, return_exceptions=True)

    async def close(self) -> None:
        await self.abort()
        if self._getter is not None:
            self._getter.cancel()
            self._getter = None
        self._core.state.streams.discard(self)

    async def _pump(self, req: EngineRequest, recorder: RequestRecorder) -> None:
        events = None
        finished = False
        outcome = FinishReason.ABORT
        try:
            events = self._engine.generate(req.request_id, req.prompt_ids, req.params)
            async for event in events:
                recorder.on_event(event)
                if isinstance(event, RequestFailed):
                    finished = True        # the engine has already dropped it: nothing to abort
                    error = (EngineOutOfMemory if event.out_of_memory else EngineFailure)(event.message)
                    error.counted = True
                    self._queue.put_nowait(error)
                    continue
                finished = finished or isinstance(event, RequestFinished)
                self._queue.put_nowait(StreamItem(req, event))
        except RequestRejected as exc:
            finished = True     # never admitted: nothing to abort (an abort could hit a request with the same id)
            outcome = "rejected_overload" if exc.code in _OVERLOAD_CODES else (
                "rejected_too_long" if exc.param == "input_tokens" else "rejected_invalid")
            recorder.outcome(outcome)
            error = (Overloaded if exc.code in _OVERLOAD_CODES else BadRequest)(exc.message, exc.param)
            error.counted = True
            self._queue.put_nowait(error)
        except EngineDeadError as exc:
            outcome = FinishReason.ERROR
            await self._core.state.mark_dead()
            error = Unavailable(f"Service unavailable: the engine has failed ({exc}).")
            error.counted = True
            self._queue.put_nowait(error)
        except asyncio.CancelledError:
            raise
        except Exception as exc:   # an engine bug must not take the server down: report it as a value
            outcome = FinishReason.ERROR
            log.exception("engine request %s failed", req.request_id)
            error = EngineFailure(f"Engine error: {type(exc).__name__}: {exc}")
            error.counted = True
            self._queue.put_nowait(error)
        finally:
            if not finished:
                await self._stop_engine_request(events, req.request_id)
                recorder.unfinished(outcome)

    async def _stop_engine_request(self, events, request_id: str) -> None:
        aclose = getattr(events, "aclose", None)
        if aclose is not None:
            try:
                await aclose()
            except Exception:
                log.exception("closing engine request %s failed", request_id)
        try:
            await self._engine.abort(request_id)
        except Exception:
            log.exception("aborting engine request %s failed", request_id)


class GenerationCore:
    """Everything HTTP and gRPC share about turning a request into engine requests."""

    def __init__(self, state: ServerState, metrics: Metrics, config: EngineConfig, *,
                 keepalive_s: float = 10.0, admission_wait_s: float = 1.0):
        self.state = state
        self.metrics = metrics
        self.config = config
        self.served_model_name = config.served_model_name
        self.keepalive_s = keepalive_s
        self.admission_wait_s = admission_wait_s
        self.defaults: dict = {}
        self._tokenizer_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="longserve-tokenize")

    def engine_loaded(self, engine) -> None:
        """Read what depends on the loaded engine (model path for generation_config.json)."""
        self.defaults = load_generation_defaults(engine.model_info.model_path)

    def shutdown(self) -> None:
        self._tokenizer_pool.shutdown(wait=False, cancel_futures=True)

    @property
    def max_model_len(self) -> int:
        engine = self.state.engine
        return engine.model_info.max_model_len if engine is not None else self.config.max_model_len

    @property
    def max_output_tokens(self) -> int:
        engine = self.state.engine
        return engine.model_info.max_output_tokens if engine is not None else self.config.max_output_tokens

    def count_rejection(self, exc: APIError) -> None:
        """Record the outcome of a request refused before admission (once per request)."""
        if exc.counted:
            return
        exc.counted = True
        if isinstance(exc, Overloaded):
            self.metrics.observe_outcome("rejected_overload")
        elif exc.param == "input_tokens":
            self.metrics.observe_outcome("rejected_too_long")
        elif isinstance(exc, (BadRequest, NotFound)):
            self.metrics.observe_outcome("rejected_invalid")

    def check_model(self, name: str | None) -> None:
        if name and name != self.served_model_name:
            raise model_not_found(name)

    async def _in_pool(self, fn, *args, **kwargs):
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._tokenizer_pool, lambda: fn(*args, **kwargs))

    async def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        engine = self.state.loaded_engine()
        return list(await self._in_pool(engine.encode, text, add_special_tokens=add_special_tokens))

    async def render_chat(self, messages: list[dict], add_generation_prompt: bool = True,
                          continue_final_message: bool = False, template_kwargs: dict | None = None) -> str:
        if not messages:
            raise BadRequest("messages must be a non-empty list", param="messages")
        if continue_final_message and add_generation_prompt:
            raise BadRequest("continue_final_message and add_generation_prompt cannot both be true",
                             param="continue_final_message")
        engine = self.state.loaded_engine()
        kwargs = dict(template_kwargs or {})
        if continue_final_message:
            kwargs["continue_final_message"] = True
        try:
            return await self._in_pool(engine.apply_chat_template, messages,
                                       add_generation_prompt=add_generation_prompt, **kwargs)
        except (ValueError, TypeError, KeyError) as exc:
            raise BadRequest(f"cannot apply the chat template: {exc}", param="messages") from None

    async def decode(self, token_ids: Sequence[int]) -> str:
        self.check_token_ids(token_ids, param="tokens")
        engine = self.state.loaded_engine()
        return await self._in_pool(engine.decode, list(token_ids))

    async def token_strs(self, token_ids: Sequence[int]) -> list[str]:
        engine = self.state.loaded_engine()
        return await self._in_pool(lambda: [engine.decode([t], skip_special_tokens=False) for t in token_ids])

    def check_token_ids(self, token_ids: Sequence[int], param: str = "prompt") -> None:
        """The engine's vocabulary-range rule, answered as a 400."""
        vocab = self.state.loaded_engine().model_info.vocab_size
        try:
            check_token_ids(token_ids, vocab, param=param)
        except RequestRejected as exc:
            raise BadRequest(exc.message, param=exc.param) from None

    def effective_max_tokens(self, prompt_tokens: int, requested: int | None, scoring: bool = False) -> int:
        """The engine's context-length rule, answered as a 400: default min(C, L - P), never truncating;
        `scoring` (prompt log-probabilities asked for) allows 0."""
        try:
            return resolve_max_tokens(prompt_tokens, requested, max_model_len=self.max_model_len,
                                      max_output_tokens=self.max_output_tokens, scoring=scoring)
        except RequestRejected as exc:
            raise BadRequest(exc.message, param=exc.param) from None

    def sampling_params(self, prompt_tokens: int, fields: dict) -> SamplingParams:
        """SamplingParams from explicitly set request fields, generation_config defaults and limits."""
        fields = dict(fields)
        max_tokens = self.effective_max_tokens(prompt_tokens, fields.pop("max_tokens", None),
                                               scoring=fields.get("prompt_logprobs") is not None)
        merged = {**self.defaults, **{k: v for k, v in fields.items() if v is not None}}
        try:
            return SamplingParams(max_tokens=max_tokens, **merged)
        except (ValueError, TypeError) as exc:
            raise BadRequest(str(exc), param=_param_of(str(exc))) from None

    def prepare(self, request_id: str, prompt_ids: list[int], fields: dict, *, choice_offset: int = 0,
                prompt_text: str | None = None, truncate: int | None = None,
                arrival: float | None = None) -> EngineRequest:
        if truncate is not None:
            if isinstance(truncate, bool) or not isinstance(truncate, int) or truncate < 1:
                raise BadRequest("truncate_prompt_tokens must be >= 1", param="truncate_prompt_tokens")
            prompt_ids = prompt_ids[-truncate:]
        params = self.sampling_params(len(prompt_ids), fields)     # the admission rules refuse an empty prompt
        return EngineRequest(request_id, prompt_ids, params, choice_offset, prompt_text,
                             arrival if arrival is not None else time.monotonic())

    def open(self, requests: Sequence[EngineRequest]) -> EventStream:
        for req in requests:
            self.metrics.observe_admitted(len(req.prompt_ids), req.params.max_tokens, req.params.n)
        return EventStream(self, requests)

    async def drain(self, grace_s: float) -> None:
        """Wait up to `grace_s` for open streams, then abort the rest (their clients see `abort`)."""
        deadline = time.monotonic() + grace_s
        while self.state.streams and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        leftover = list(self.state.streams)
        if leftover:
            log.warning("aborting %d request(s) still running after the %.1fs grace period",
                        len(leftover), grace_s, extra={"event": "drain_abort"})
        await asyncio.gather(*(s.abort() for s in leftover), return_exceptions=True)


def _param_of(message: str) -> str | None:
    """The SamplingParams field a validation message starts with (e.g. 'top_p must be ...')."""
    head = message.split(" ", 1)[0]
    return head if head.isidentifier() else None
