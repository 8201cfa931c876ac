"""Per-choice accounting shared by the OpenAI routes and gRPC, so both report the same counts and endings.

From the engine's events: a choice's generated-token count (a delta may carry several tokens, or none when a stop
string is held back or a scoring request ends; the engine's own count wins when larger), its finish and stop
reasons, `abort` for a choice the engine never finished (client gone, drain), and the prompt tokens the prefix
cache served (the prompt minus what prefill computed).
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from longserve.server.engine.protocol import CompletionDelta, FinishReason, RequestFinished


def count_delta(choice, delta: CompletionDelta) -> None:
    """Add `delta` to `choice` (anything with num_tokens, finish_reason and stop_reason)."""
    choice.num_tokens = max(choice.num_tokens + len(delta.token_ids), delta.num_output_tokens)
    if delta.finish_reason is not None:
        choice.finish_reason = delta.finish_reason
        choice.stop_reason = delta.stop_reason


@dataclass(slots=True)
class ChoiceTally:
    """One choice's count and ending (for callers that keep no text)."""
    num_tokens: int = 0
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None

    def add(self, delta: CompletionDelta) -> None:
        count_delta(self, delta)


def close_unfinished(choices: Iterable) -> list:
    """Choices the engine never finished end as `abort`; returns them."""
    left = [c for c in choices if c.finish_reason is None]
    for c in left:
        c.finish_reason = FinishReason.ABORT
    return left


def cached_prompt_tokens(finished: RequestFinished | None) -> int:
    """Prompt tokens of a finished request that came from the prefix cache (0 when nothing was reported)."""
    if finished is None or not finished.timings.prefill_chunk_tokens:
        return 0
    return max(finished.num_prompt_tokens - sum(finished.timings.prefill_chunk_tokens), 0)


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def usage(prompt_tokens: int, choices: Iterable, cached_tokens: int = 0) -> Usage:
    """Usage of one API request: its prompts, every choice's generated tokens, the cached prompt tokens."""
    return Usage(prompt_tokens, sum(c.num_tokens for c in choices), cached_tokens)
