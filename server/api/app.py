"""Build the HTTP and gRPC servers around one `EngineClient`, on one asyncio loop (docs/architecture.md#request-path).

`ServingStack` opens both ports at once in the *loading* phase (health 503 / NOT_SERVING), goes
ready when `set_engine` is called, and drains on request. `BackgroundServer` runs a stack on its
own loop thread, for tests and for benchmarks that start their own server.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
from concurrent.futures import Future

import grpc
import uvicorn
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from longserve.server.api.engine_client import EngineClient
from longserve.server.api.generation import GenerationCore
from longserve.server.api.grpc.interceptors import ErrorMappingInterceptor
from longserve.server.api.grpc.pb import generation_pb2, generation_pb2_grpc
from longserve.server.api.grpc.servicer import GenerationServicer
from longserve.server.api.lifecycle import Phase, ServerState
from longserve.server.api.metrics import Metrics
from longserve.server.api.openai.routes import build_http_app
from longserve.server.api.openai.serving import OpenAIServing
from longserve.server.config import EngineConfig

log = logging.getLogger("longserve.server.api")
SERVICE_NAME = generation_pb2.DESCRIPTOR.services_by_name["Generation"].full_name
HEALTH_SERVICE_NAME = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("longserve")
    except PackageNotFoundError:
        return "unknown"


class _Uvicorn(uvicorn.Server):
    """uvicorn without its own signal handling: SIGTERM belongs to the drain logic of `longserve serve`."""

    def capture_signals(self):
        return contextlib.nullcontext()


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.setblocking(False)
    return sock


class ServingStack:
    def __init__(self, config: EngineConfig, *, host: str = "127.0.0.1", http_port: int | None = None,
                 grpc_port: int | None = None, api_key: str | None = None, keepalive_s: float = 10.0,
                 admission_wait_s: float = 1.0, legacy_vllm_metrics: bool = False):
        self.config = config
        self.host = host
        self.http_port = config.http_port if http_port is None else http_port
        self.grpc_port = config.grpc_port if grpc_port is None else grpc_port
        self.api_key = api_key
        self.version = package_version()
        self.state = ServerState()
        self.metrics = Metrics(config, legacy_vllm_aliases=legacy_vllm_metrics)
        self.core = GenerationCore(self.state, self.metrics, config, keepalive_s=keepalive_s,
                                   admission_wait_s=admission_wait_s)
        self.http_app = build_http_app(self.state, OpenAIServing(self.core), self.metrics, api_key=api_key,
                                       max_body_bytes=config.grpc_max_message_bytes, version=self.version)
        self._grpc: grpc.aio.Server | None = None
        self._health = HealthServicer()
        self._uvicorn: _Uvicorn | None = None
        self._http_task: asyncio.Task | None = None
        self._watch_task: asyncio.Task | None = None

    @property
    def http_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.http_port}"

    @property
    def grpc_target(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    async def start(self) -> None:
        """Open both ports in the loading phase (port 0 picks a free port)."""
        limit = self.config.grpc_max_message_bytes
        self._grpc = grpc.aio.server(
            interceptors=[ErrorMappingInterceptor(self.api_key)],
            options=[("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)])
        generation_pb2_grpc.add_GenerationServicer_to_server(GenerationServicer(self.core, self.version),
                                                             self._grpc)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._grpc)
        reflection.enable_server_reflection((SERVICE_NAME, HEALTH_SERVICE_NAME, reflection.SERVICE_NAME),
                                            self._grpc)
        await self._set_health(False)
        self.grpc_port = self._grpc.add_insecure_port(f"{self.host}:{self.grpc_port}")
        await self._grpc.start()
        self.state.add_listener(lambda phase: self._set_health(phase is Phase.READY))

        sock = _listen(self.host, self.http_port)
        self.http_port = sock.getsockname()[1]
        self._uvicorn = _Uvicorn(uvicorn.Config(self.http_app, lifespan="off", log_config=None, access_log=False,
                                                timeout_graceful_shutdown=5, timeout_keep_alive=5))
        self._http_task = asyncio.create_task(self._uvicorn.serve(sockets=[sock]))
        while not self._uvicorn.started:
            if self._http_task.done():
                self._http_task.result()
                raise RuntimeError("the HTTP server stopped during start-up")
            await asyncio.sleep(0.01)
        self._watch_task = asyncio.create_task(self._watch_engine())
        log.info("listening: http %s, grpc %s", self.http_url, self.grpc_target,
                 extra={"event": "listening", "http_port": self.http_port, "grpc_port": self.grpc_port})

    async def _set_health(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for service in ("", SERVICE_NAME):
            await self._health.set(service, status)

    async def _watch_engine(self) -> None:
        """Notice a dead engine without waiting for traffic, so gRPC health flips too."""
        while True:
            await asyncio.sleep(1.0)
            if self.state.phase is Phase.READY:
                self.state.is_ready()

    async def set_engine(self, engine: EngineClient, load_seconds: float | None = None) -> None:
        """The engine is loaded and warmed up: bind metrics and defaults, then go ready."""
        info = engine.model_info
        self.metrics.bind_engine(engine.load_stats, info.kv_capacity_tokens)
        observe_steps = getattr(engine, "observe_steps", None)     # engines that report their steps (the real one)
        if observe_steps is not None:
            observe_steps(self.metrics.observe_iteration)
        self.metrics.attention_threshold = info.sparse_threshold if info.sparse_enabled else None
        if load_seconds is not None:
            self.metrics.load_seconds.set(load_seconds)
        self.core.engine_loaded(engine)
        await self.state.set_ready(engine)

    async def drain(self, grace_s: float) -> None:
        """Stop admitting (503 / UNAVAILABLE, health NOT_SERVING), let requests finish, abort the rest."""
        await self.state.begin_drain()
        await self.core.drain(grace_s)

    async def stop(self) -> None:
        if self._watch_task is not None:
            self._watch_task.cancel()
        if self._uvicorn is not None and self._http_task is not None:
            self._uvicorn.should_exit = True
            await asyncio.gather(self._http_task, return_exceptions=True)
        if self._grpc is not None:
            await self._grpc.stop(grace=1.0)
        self.core.shutdown()


class BackgroundServer:
    """A `ServingStack` on a private event-loop thread; `call()` runs coroutines on that loop."""

    def __init__(self, stack: ServingStack):
        self.stack = stack
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="longserve-server", daemon=True)

    @property
    def started(self) -> bool:
        return self._thread.is_alive()

    def start(self, engine: EngineClient | None = None) -> "BackgroundServer":
        self._thread.start()
        self.call(self.stack.start())
        if engine is not None:
            self.call(self.stack.set_engine(engine))
        return self

    def call(self, coro, timeout: float = 30.0):
        future: Future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return future.result(timeout)

    def stop(self) -> None:
        try:
            self.call(self.stack.stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=10)
            self.loop.close()

    def __enter__(self) -> "BackgroundServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
