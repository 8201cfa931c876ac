"""Admission rules, defined once: context length and vocabulary range.

The API layer runs them before it admits a request (to answer 400 early, with the same words), the
engine runs them again in `add_request` (offline callers reach the engine directly). Both raise
`RequestRejected`; the API turns it into its own error type without rewording it.
"""
from __future__ import annotations

import operator
from collections.abc import Iterable

from longserve.server.engine.protocol import RequestRejected


def context_length_error(limit: int, prompt_tokens: int, completion_tokens: int | None) -> RequestRejected:
    """The one message for a request that does not fit the context (`completion_tokens` None: not asked)."""
    if completion_tokens is None:
        message = (f"This model's maximum context length is {limit} tokens, but the request has {prompt_tokens} "
                   "tokens in the prompt, leaving no room for the completion. Shorten the prompt.")
    else:
        message = (f"This model's maximum context length is {limit} tokens, but the request needs "
                   f"{prompt_tokens + completion_tokens} tokens ({prompt_tokens} in the prompt, {completion_tokens} "
                   "for the completion). Shorten the prompt or lower max_tokens.")
    return RequestRejected(message, param="input_tokens")


def resolve_max_tokens(prompt_tokens: int, requested: int | None, *, max_model_len: int,
                       max_output_tokens: int, scoring: bool = False) -> int:
    """The completion-token cap of a request, or `RequestRejected`.

    `requested` None means "as many as allowed": min(max_output_tokens, max_model_len - prompt). An
    explicit value is never truncated: too large is an error, so a client is not silently cut short.
    `scoring` (the request asks for prompt log-probabilities) also allows 0: the prompt is scored, nothing is
    generated.
    """
    limit, cap = max_model_len, max_output_tokens
    if prompt_tokens == 0:
        raise RequestRejected("the prompt is empty", param="prompt")
    if requested is None:
        if prompt_tokens >= limit:
            raise context_length_error(limit, prompt_tokens, None)
        return min(cap, limit - prompt_tokens)
    if scoring and requested == 0 and not isinstance(requested, bool):
        if prompt_tokens > limit:
            raise context_length_error(limit, prompt_tokens, 0)
        return 0
    if isinstance(requested, bool) or not isinstance(requested, int) or requested < 1:
        raise RequestRejected(f"max_tokens must be at least 1, got {requested}", param="max_tokens")
    if requested > cap:
        raise RequestRejected(f"max_tokens is too large: {requested}. This model supports at most {cap} "
                              "completion tokens.", param="max_tokens")
    if prompt_tokens + requested > limit:
        raise context_length_error(limit, prompt_tokens, requested)
    return requested


def check_token_ids(token_ids: Iterable, vocab_size: int, *, param: str = "prompt") -> list[int]:
    """The ids as plain ints, or `RequestRejected` naming the first one outside [0, vocab_size).

    Integer-like values (numpy or torch scalars) are accepted; floats and booleans are not ids.
    """
    ids = []
    for t in token_ids:
        try:
            value = None if isinstance(t, bool) else operator.index(t)
        except TypeError:
            value = None
        if value is None or not 0 <= value < vocab_size:
            raise RequestRejected(f"token id {t!r} is outside the vocabulary [0, {vocab_size})", param=param)
        ids.append(value)
    return ids
