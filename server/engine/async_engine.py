"""`AsyncEngine`: the `EngineClient` the HTTP/gRPC servers wrap.

The engine loop runs in its own thread, so the asyncio loop serving HTTP/gRPC never blocks on a
forward pass. Requests and aborts cross into that thread as typed commands (`AddRequest`,
`AbortRequest`) on a queue; events come back through `loop.call_soon_threadsafe` into one asyncio
queue per request. Validation (context length, token range) runs synchronously in `generate`, so a
bad request raises `RequestRejected` before any event and never touches the KV cache.

A request whose step fails ends with `RequestFailed` and the loop carries on (see llm_engine.py);
only an error of the loop itself (outside any request's step) marks the engine dead.
"""
from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque

from longserve.server.config import EngineConfig
from longserve.server.engine.llm_engine import LLMEngine
from longserve.server.engine.protocol import (
    TERMINAL_EVENTS,
    AbortRequest,
    AddRequest,
    EngineCommand,
    EngineDeadError,
    LoadStats,
    ModelInfo,
    RequestRejected,
)
from longserve.server.sampling import SamplingParams

log = logging.getLogger("longserve.engine")
_END = object()


class AsyncEngine:
    def __init__(self, config: EngineConfig, *, device: str | None = None, warmup: bool = True, topology=None,
                 on_tp_failure=None):
        """`topology` and `on_tp_failure` reach `LLMEngine` (tensor_parallel_size > 1)."""
        self.config = config
        self._tp = {"topology": topology, "on_tp_failure": on_tp_failure}
        self._commands: deque[EngineCommand] = deque()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.engine: LLMEngine | None = None
        # Every torch call (load, warm-up, steps) happens on the engine thread: torch's OpenMP workers
        # spin-wait on the thread that last used them, so splitting work across threads stalls decode.
        self._thread = threading.Thread(target=self._run, args=(device, warmup), name="longserve-engine",
                                        daemon=True)
        self._thread.start()
        self._ready.wait()
        if self.engine is None:
            raise self._error
        self.tokenizer = self.engine.tokenizer
        self._stats = self.engine.load_stats()
        facts = self.engine.checkpoint.facts
        self.model_info = ModelInfo(
            served_model_name=config.served_model_name, model_path=config.model_path,
            max_model_len=config.max_model_len, max_output_tokens=config.max_output_tokens,
            vocab_size=facts.vocab_size, dca_enabled=self.engine.runner.dca.chunk_size is not None,
            sparse_enabled=self.engine.sparse_threshold is not None, sparse_threshold=self.engine.sparse_threshold,
            kv_capacity_tokens=self.engine.kv_capacity_tokens,
            extra={"model_load_seconds": self.engine.runner.load_seconds})

    def _warmup(self) -> None:
        """One tiny generation before serving, so the first request does not pay for lazy initialisation."""
        self.engine.add_request("__warmup__", [0], SamplingParams(max_tokens=2, temperature=0.0))
        while self.engine.has_work():
            self.engine.step()

    # --- engine thread ---------------------------------------------------------------------------------------
    def _run(self, device, warmup: bool) -> None:
        try:
            engine = LLMEngine(self.config, device=device, **self._tp)
            self.engine = engine
            if warmup:
                self._warmup()
        except BaseException as exc:   # loading failed: __init__ re-raises it in the caller
            self.engine, self._error = None, exc
            self._ready.set()
            return
        self._ready.set()
        try:
            while not self._stop.is_set():
                self._drain_commands()
                if not self.engine.has_work():
                    self._stats = self.engine.load_stats()
                    self._wake.wait(0.05)
                    self._wake.clear()
                    continue
                events = self.engine.step()
                self._stats = self.engine.load_stats()
                for event in events:
                    self._deliver(event.request_id, event)
                    if isinstance(event, TERMINAL_EVENTS):
                        self._deliver(event.request_id, _END)
        except BaseException as exc:  # the loop must report, never die silently
            log.exception("engine loop failed")
            self._error = exc
            for rid in list(self._streams):
                self._deliver(rid, EngineDeadError(f"{type(exc).__name__}: {exc}"))

    def _drain_commands(self) -> None:
        while self._commands:
            command = self._commands.popleft()
            if isinstance(command, AddRequest):
                if command.request_id not in self._streams:    # the caller left before it was admitted
                    continue
                try:
                    self.engine.add_request(command.request_id, command.prompt_token_ids, command.params)
                except (RequestRejected, ValueError) as exc:   # refused late (e.g. can never fit the cache)
                    self._deliver(command.request_id, exc if isinstance(exc, RequestRejected)
                                  else RequestRejected(str(exc), param="input_tokens"))
            elif isinstance(command, AbortRequest):
                self.engine.abort(command.request_id)
            else:
                raise TypeError(f"unknown engine command {command!r}")

    def _deliver(self, request_id: str, item) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            loop, queue = stream
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:      # the caller's loop is closed: nobody listens any more
                self._commands.append(AbortRequest(request_id))

    # --- EngineClient ------------------------------------------------------------------------------------------
    async def generate(self, request_id: str, prompt_token_ids, params: SamplingParams):
        if self._error is not None:
            raise EngineDeadError(str(self._error))
        if request_id in self._streams:
            raise RequestRejected(f"request id {request_id!r} is already in flight", param="request_id")
        ids, _ = self.engine.validate(prompt_token_ids, params)
        queue: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), queue)
        self._commands.append(AddRequest(request_id, tuple(ids), params))
        self._wake.set()
        finished = False
        try:
            while True:
                item = await queue.get()
                if item is _END:
                    finished = True
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self._commands.append(AbortRequest(request_id))
                self._wake.set()

    async def abort(self, request_id: str) -> None:
        self._streams.pop(request_id, None)
        self._commands.append(AbortRequest(request_id))
        self._wake.set()

    def observe_steps(self, callback) -> None:
        """`callback(tokens)` after every engine step, on the engine thread (it must be thread-safe)."""
        self.engine.on_step = callback

    def is_healthy(self) -> bool:
        return self._error is None and self._thread.is_alive()

    def load_stats(self) -> LoadStats:
        return self._stats

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens)

    def decode(self, token_ids, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt, **kwargs)

    def shutdown(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=30)
        if self.engine is not None:
            self.engine.close()        # tensor-parallel workers get their stop message
