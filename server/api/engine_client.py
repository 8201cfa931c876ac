"""The seam between the API layer and the engine: the `EngineClient` protocol.

`AsyncEngine` (server/engine/async_engine.py) implements it; API tests use a fake. The data that
crosses the seam (events, errors, finish reasons) is the engine's contract, defined in
`longserve.server.engine.protocol` and re-exported here for the API modules.
"""
from __future__ import annotations

from typing import AsyncIterator, Protocol, Sequence

from longserve.server.engine.protocol import (
    CompletionDelta,
    EngineDeadError,
    FailureCause,
    FinishReason,
    GenerationEvent,
    LoadStats,
    ModelInfo,
    PrefillProgress,
    PromptLogprobs,
    RequestFailed,
    RequestFinished,
    RequestRejected,
    RequestTimings,
    TokenLogprob,
)
from longserve.server.sampling import SamplingParams

__all__ = ["CompletionDelta", "EngineClient", "EngineDeadError", "FailureCause", "FinishReason", "GenerationEvent",
           "LoadStats", "ModelInfo", "PrefillProgress", "PromptLogprobs", "RequestFailed", "RequestFinished",
           "RequestRejected", "RequestTimings", "TokenLogprob"]


class EngineClient(Protocol):
    model_info: ModelInfo

    def generate(self, request_id: str, prompt_token_ids: Sequence[int],
                 params: SamplingParams) -> AsyncIterator[GenerationEvent]:
        """Async iterator of events; raises RequestRejected before yielding if the request is invalid.

        It ends after the request's terminal event (`RequestFinished` or `RequestFailed`). Leaving the
        iterator early (client disconnect) must abort the request and free its KV.
        """

    async def abort(self, request_id: str) -> None: ...

    def is_healthy(self) -> bool: ...

    def load_stats(self) -> LoadStats: ...

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]: ...

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            **kwargs) -> str: ...
