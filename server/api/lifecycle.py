"""Server lifecycle (docs/serving.md#lifecycle): loading -> ready -> draining -> exit, or dead on engine failure.

One `ServerState` per server, shared by HTTP, gRPC and health. Phase changes notify listeners
(the gRPC health servicer) so every surface flips together.
"""
from __future__ import annotations

import asyncio
import enum
import logging
from typing import Awaitable, Callable

from longserve.server.api.engine_client import EngineClient
from longserve.server.api.errors import Unavailable

log = logging.getLogger("longserve.server.api")


class Phase(enum.Enum):
    LOADING = "loading"
    READY = "ready"
    DRAINING = "draining"
    DEAD = "dead"


class ServerState:
    def __init__(self) -> None:
        self.phase = Phase.LOADING
        self.engine: EngineClient | None = None
        self.streams: set = set()          # open EventStreams (generation.py), for drain and abort
        self._listeners: list[Callable[[Phase], Awaitable[None]]] = []

    def add_listener(self, listener: Callable[[Phase], Awaitable[None]]) -> None:
        self._listeners.append(listener)

    async def _set(self, phase: Phase) -> None:
        if self.phase is phase:
            return
        log.info("server phase %s -> %s", self.phase.value, phase.value,
                 extra={"event": "phase", "phase": phase.value})
        self.phase = phase
        for listener in self._listeners:
            await listener(phase)

    async def set_ready(self, engine: EngineClient) -> None:
        self.engine = engine
        await self._set(Phase.READY)

    async def begin_drain(self) -> None:
        if self.phase is not Phase.DEAD:
            await self._set(Phase.DRAINING)

    async def mark_dead(self) -> None:
        await self._set(Phase.DEAD)

    def is_ready(self) -> bool:
        """Ready and the engine still healthy (an unhealthy engine is detected lazily here)."""
        if self.phase is not Phase.READY or self.engine is None:
            return False
        if not self.engine.is_healthy():
            asyncio.get_running_loop().create_task(self.mark_dead())
            return False
        return True

    def require_engine(self) -> EngineClient:
        """The engine for a new request, or 503 while loading, draining or dead."""
        if self.is_ready():
            return self.engine
        reason = {Phase.LOADING: "the model is still loading", Phase.DRAINING: "the server is shutting down",
                  Phase.DEAD: "the engine has failed", Phase.READY: "the engine has failed"}[self.phase]
        raise Unavailable(f"Service unavailable: {reason}.")

    def loaded_engine(self) -> EngineClient:
        """The engine for read-only calls (tokenize, load), also while draining."""
        if self.engine is None or self.phase is Phase.LOADING:
            raise Unavailable("Service unavailable: the model is still loading.")
        return self.engine
