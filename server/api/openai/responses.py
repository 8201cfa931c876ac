"""Response bodies and SSE framing for the OpenAI routes (docs/serving.md#responses, docs/serving.md#streaming), as
plain dicts.

`Choice` accumulates one choice's output; the same state feeds the non-streaming body and the
stream's chunks, so usage and finish reasons cannot disagree between the two.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

from longserve.server.api.accounting import Usage, count_delta
from longserve.server.api.engine_client import CompletionDelta, TokenLogprob
from longserve.server.api.openai import tools as T


def sse(data) -> str:
    """One SSE event: a single `data:` line and a blank line (no event/id fields)."""
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {payload}\n\n"


def sse_comment(text: str) -> str:
    """An SSE comment line: ignored by parsers, counted as traffic by proxies."""
    return f": {text}\n\n"


DONE = sse("[DONE]")


@dataclass
class Choice:
    index: int
    text: list[str] = field(default_factory=list)
    num_tokens: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    text_len: int = 0          # characters emitted so far, for completions' text_offset

    def add(self, delta: CompletionDelta) -> None:
        self.text.append(delta.text)
        self.logprobs.extend(delta.logprobs)
        count_delta(self, delta)


def usage(use: Usage) -> dict:
    body = {"prompt_tokens": use.prompt_tokens, "completion_tokens": use.completion_tokens,
            "total_tokens": use.total_tokens}
    if use.cached_tokens:
        body["prompt_tokens_details"] = {"cached_tokens": use.cached_tokens}
    return body


def _top(entry: TokenLogprob) -> list[tuple[str, float]]:
    return [(text, lp) for _, text, lp in entry.top]


def chat_logprobs(entries: list[TokenLogprob] | tuple[TokenLogprob, ...]) -> dict:
    return {"content": [{
        "token": e.token, "logprob": e.logprob, "bytes": list(e.token.encode("utf-8")),
        "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(t.encode("utf-8"))} for t, lp in _top(e)],
    } for e in entries]}


def completion_logprobs(entries, start_offset: int) -> dict:
    """OpenAI's completions `logprobs` object. Echoed prompt entries come first: the first prompt token has no
    log-probability (null, with null top_logprobs); the others list their top-k and the token itself."""
    offsets, pos = [], start_offset
    for e in entries:
        offsets.append(pos)
        pos += len(e.token)
    return {"tokens": [e.token for e in entries], "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [_completion_top(e) for e in entries], "text_offset": offsets}


def _completion_top(e: TokenLogprob) -> dict | None:
    if e.logprob is None:
        return None
    top: dict = {}
    for text, lp in _top(e):             # tokens whose texts coincide keep the best value (best first)
        top.setdefault(text, lp)
    if e.rank is not None:               # a prompt token: vLLM lists the token itself beside the top-k
        top.setdefault(e.token, e.logprob)
    return top


def prompt_head(token_id: int, token: str) -> TokenLogprob:
    """The first prompt token's entry: it has no log-probability (nothing precedes it)."""
    return TokenLogprob(token_id, token, None)


def vllm_prompt_logprobs(entries) -> list[dict | None]:
    """vLLM's `prompt_logprobs`: per prompt token None (the first) or {token id: {logprob, rank, decoded_token}}
    holding the token itself and the top-k."""
    out: list[dict | None] = []
    for e in entries:
        if e.logprob is None:
            out.append(None)
            continue
        item = {str(t): {"logprob": lp, "rank": r + 1, "decoded_token": text}
                for r, (t, text, lp) in enumerate(e.top)}
        item.setdefault(str(e.token_id), {"logprob": e.logprob, "rank": e.rank, "decoded_token": e.token})
        out.append(item)
    return out


def chat_message(c: Choice, parse_tools: bool) -> tuple[dict, str | None]:
    """The assistant message of a choice and its finish reason ("tool_calls" when it called tools and
    stopped by itself; a call cut short stays text)."""
    text = "".join(c.text)
    if not parse_tools:
        return {"role": "assistant", "content": text}, c.finish_reason
    content, calls = T.parse(text)
    if not calls:
        return {"role": "assistant", "content": content}, c.finish_reason
    return ({"role": "assistant", "content": content, "tool_calls": calls},
            "tool_calls" if c.finish_reason == "stop" else c.finish_reason)


def chat_body(rid: str, created: int, model: str, choices: list[Choice], use: dict,
              want_logprobs: bool, parse_tools: bool = False) -> dict:
    out = []
    for c in choices:
        message, finish_reason = chat_message(c, parse_tools)
        out.append({"index": c.index, "message": message,
                    "logprobs": chat_logprobs(c.logprobs) if want_logprobs else None,
                    "finish_reason": finish_reason, "stop_reason": c.stop_reason})
    return {"id": rid, "object": "chat.completion", "created": created, "model": model, "choices": out,
            "usage": use}


def completion_body(rid: str, created: int, model: str, choices: list[Choice], use: dict,
                    want_logprobs: bool, echo: list[str] | None, prompt_entries: dict | None = None,
                    vllm_prompt: bool = False) -> dict:
    """`prompt_entries` (choice index -> the prompt's entries, first one without a log-probability): echoed
    before the completion's logprobs, and as vLLM's `prompt_logprobs` when `vllm_prompt`."""
    out = []
    for c in choices:
        prefix = echo[c.index] if echo else ""
        head = prompt_entries.get(c.index, []) if prompt_entries else []
        item = {"index": c.index, "text": prefix + "".join(c.text),
                "logprobs": completion_logprobs((head if echo else []) + c.logprobs, 0 if echo else len(prefix))
                if want_logprobs else None,
                "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}
        if vllm_prompt:
            item["prompt_logprobs"] = vllm_prompt_logprobs(head)
        out.append(item)
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": out, "usage": use}


class ChunkWriter:
    """Builds the stream's chunk events for chat (`chat.completion.chunk`) or completions."""

    def __init__(self, chat: bool, rid: str, created: int, model: str, *, include_usage: bool,
                 want_logprobs: bool):
        self.chat, self.rid, self.created, self.model = chat, rid, created, model
        self.include_usage = include_usage
        self.want_logprobs = want_logprobs

    def _chunk(self, choices: list[dict], use: dict | None = None) -> str:
        body = {"id": self.rid, "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": choices}
        if self.include_usage or use is not None:
            body["usage"] = use
        return sse(body)

    def role(self, index: int) -> str:
        return self._chunk([{"index": index, "delta": {"role": "assistant", "content": ""},
                             "logprobs": None, "finish_reason": None}])

    def content(self, choice: Choice, text: str, entries, finish_reason: str | None,
                stop_reason, use: dict | None = None) -> str:
        if self.chat:
            item = {"index": choice.index, "delta": {"content": text} if text or not finish_reason else {},
                    "logprobs": chat_logprobs(entries) if self.want_logprobs and entries else None}
        else:
            item = {"index": choice.index, "text": text,
                    "logprobs": completion_logprobs(entries, choice.text_len) if self.want_logprobs
                    and entries else None}
        choice.text_len += len(text)
        item["finish_reason"] = finish_reason
        item["stop_reason"] = stop_reason
        return self._chunk([item], use)

    def delta(self, choice: Choice, delta: dict, entries, finish_reason: str | None, stop_reason,
              use: dict | None = None) -> str:
        """A chat chunk with an explicit delta (content or tool-call parts)."""
        item = {"index": choice.index, "delta": delta,
                "logprobs": chat_logprobs(entries) if self.want_logprobs and entries else None,
                "finish_reason": finish_reason, "stop_reason": stop_reason}
        return self._chunk([item], use)

    def usage(self, use: dict) -> str:
        return self._chunk([], use)

    def prompt_entries(self, index: int, entries, positions: dict[int, int]) -> str:
        """A completions chunk without text carrying echoed prompt tokens' logprobs, streamed as prefill scores
        them; `positions` (choice index -> text offset) advances past them."""
        start = positions[index]
        positions[index] = start + sum(len(e.token) for e in entries)
        return self._chunk([{"index": index, "text": "", "logprobs": completion_logprobs(entries, start),
                             "finish_reason": None, "stop_reason": None}])
