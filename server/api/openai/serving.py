"""Chat, completions, tokenize and models over `GenerationCore` (HTTP-agnostic: returns bodies or SSE text).

Validation and admission happen before anything is returned, so errors up to the first engine
event are plain HTTP errors; once the stream has started they become an in-stream error event. A
request the engine fails mid-stream ends with a chunk whose finish_reason is "error", then the error
object and `[DONE]`; without streaming it is a 500 (503 when the engine ran out of memory).
"""
from __future__ import annotations

import logging
import time
import uuid
from typing import AsyncIterator

from longserve.server.api import accounting
from longserve.server.api.engine_client import (
    CompletionDelta,
    FinishReason,
    PrefillProgress,
    PromptLogprobs,
    RequestFinished,
)
from longserve.server.api.errors import APIError, BadRequest, model_not_found
from longserve.server.api.generation import END, TIMEOUT, EngineRequest, EventStream, GenerationCore
from longserve.server.api.openai import responses as R
from longserve.server.api.openai import tools as T
from longserve.server.api.openai.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)

log = logging.getLogger("longserve.server.api")


class _Totals:
    """Per API request: choices and usage, filled from stream items."""

    def __init__(self, requests: list[EngineRequest], tools: T.ToolSettings | None = None):
        self.requests = requests
        self.tools = tools if tools is not None and tools.parse_output else None   # parse tool calls
        self.tool_streams: dict[int, T.ToolCallStream] = {}
        self.choices: dict[int, R.Choice] = {}
        for req in requests:
            for i in range(req.params.n):
                index = req.choice_offset + i
                self.choices[index] = R.Choice(index)
        self.cached = 0
        self.prompt: dict[int, list] = {}       # choice index -> prompt log-probability entries (when asked for)
        self.prompt_pos: dict[int, int] = {}    # choice index -> text offset of its next streamed prompt entry

    def on_prompt(self, req: EngineRequest, event: PromptLogprobs) -> list[int]:
        """Record a request's prompt entries for each of its choices; returns those choice indices."""
        indices = [req.choice_offset + i for i in range(req.params.n)]
        for index in indices:
            self.prompt.setdefault(index, []).extend(event.logprobs)
        return indices

    def ordered(self) -> list[R.Choice]:
        return [self.choices[i] for i in sorted(self.choices)]

    def on_finished(self, event: RequestFinished) -> None:
        self.cached += accounting.cached_prompt_tokens(event)

    def close_unfinished(self) -> list[R.Choice]:
        """Choices the engine never finished (client gone, drain abort) end as `abort`."""
        return accounting.close_unfinished(self.ordered())

    def usage(self) -> dict:
        prompt = sum(len(r.prompt_ids) for r in self.requests)
        return R.usage(accounting.usage(prompt, self.choices.values(), self.cached))


class SSEBody:
    """The SSE text of a stream; `aclose()` also closes the engine requests if iteration never started."""

    def __init__(self, events: AsyncIterator[str], stream: EventStream):
        self._events = events
        self._stream = stream

    def __aiter__(self):
        return self._events

    async def aclose(self) -> None:
        await self._events.aclose()
        await self._stream.close()


class OpenAIServing:
    def __init__(self, core: GenerationCore):
        self.core = core

    # --- metadata ------------------------------------------------------------------------------
    def models(self) -> dict:
        info = self.core.state.loaded_engine().model_info
        card = {"id": self.core.served_model_name, "object": "model", "created": int(time.time()),
                "owned_by": "longserve", "root": info.model_path, "parent": None,
                "max_model_len": info.max_model_len, "kv_capacity_tokens": info.kv_capacity_tokens}
        return {"object": "list", "data": [card]}

    def model(self, model_id: str) -> dict:
        """One model's card (`GET /v1/models/{id}`); 404 with the error envelope for an unknown id."""
        if model_id != self.core.served_model_name:
            raise model_not_found(model_id)
        return self.models()["data"][0]

    async def tokenize(self, req: TokenizeRequest) -> dict:
        self.core.check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise BadRequest("give exactly one of prompt or messages", param="prompt")
        if req.messages is not None:
            kwargs = dict(req.chat_template_kwargs or {})
            tools = T.resolve(req.tools, None, None)
            if tools is not None:
                kwargs["tools"] = tools.template_tools
            text = await self.core.render_chat([m.template_dict(f"messages[{i}]") for i, m in enumerate(req.messages)],
                                               req.add_generation_prompt, req.continue_final_message, kwargs)
            ids = await self.core.encode(text)
        else:
            ids = await self.core.encode(req.prompt, add_special_tokens=req.add_special_tokens)
        body = {"count": len(ids), "max_model_len": self.core.max_model_len, "tokens": ids}
        if req.return_token_strs:
            body["token_strs"] = await self.core.token_strs(ids)
        return body

    async def detokenize(self, req: DetokenizeRequest) -> dict:
        self.core.check_model(req.model)
        return {"prompt": await self.core.decode(req.tokens)}

    # --- generation ----------------------------------------------------------------------------
    async def chat(self, req: ChatCompletionRequest, arrival: float):
        self.core.check_model(req.model)
        fields = req.sampling_fields()
        self._log_ignored(req)
        tools = req.tool_settings()
        kwargs = dict(req.chat_template_kwargs or {})
        if tools is not None and tools.template_tools:
            kwargs["tools"] = tools.template_tools
        text = await self.core.render_chat(req.message_dicts(), req.add_generation_prompt,
                                           req.continue_final_message, kwargs)
        self.core.metrics.observe_prompt_bytes(len(text.encode("utf-8")), "http")
        ids = await self.core.encode(text)
        rid = req.request_id or f"chatcmpl-{uuid.uuid4().hex}"
        requests = [self.core.prepare(rid, ids, fields, truncate=req.truncate_prompt_tokens, arrival=arrival)]
        return await self._run(True, req, rid, requests, echo=None, tools=tools)

    async def completions(self, req: CompletionRequest, arrival: float):
        self.core.check_model(req.model)
        fields = req.sampling_fields()
        self._log_ignored(req)
        prompts = req.prompts()
        rid = req.request_id or f"cmpl-{uuid.uuid4().hex}"
        requests, echo = [], []
        for i, prompt in enumerate(prompts):
            if isinstance(prompt, str):
                self.core.metrics.observe_prompt_bytes(len(prompt.encode("utf-8")), "http")
                ids, text = await self.core.encode(prompt), prompt
            else:
                self.core.check_token_ids(prompt)
                ids, text = prompt, (await self.core.decode(prompt) if req.echo else None)
            sub_id = rid if len(prompts) == 1 else f"{rid}-{i}"
            requests.append(self.core.prepare(sub_id, ids, fields, choice_offset=i * req.n, prompt_text=text,
                                              truncate=req.truncate_prompt_tokens, arrival=arrival))
            echo.extend([text or ""] * req.n)
        return await self._run(False, req, rid, requests, echo=echo if req.echo else None)

    def _log_ignored(self, req) -> None:
        ignored = req.ignored_fields()
        if ignored:
            log.info("ignoring unknown request field(s): %s", ", ".join(ignored),
                     extra={"event": "ignored_fields", "fields": ignored})

    async def _run(self, chat: bool, req, rid: str, requests: list[EngineRequest], echo, tools=None):
        """Admit, wait for the first engine event (or the admission window), then answer."""
        stream = self.core.open(requests)
        try:
            first = await stream.get(timeout=self.core.admission_wait_s if req.stream else None)
        except BaseException:
            await stream.close()
            raise
        totals = _Totals(requests, tools)
        await self._prompt_heads(totals)
        created = int(time.time())
        model = self.core.served_model_name
        want_logprobs = req.logprobs is not None and req.logprobs is not False
        if req.stream:
            writer = R.ChunkWriter(chat, rid, created, model, include_usage=req.include_usage,
                                   want_logprobs=want_logprobs)
            return SSEBody(self._sse(stream, first, totals, writer, chat, req.continuous_usage, echo), stream)
        try:
            item = first
            while item is not END:
                self._apply(item, totals)
                item = await stream.get()
        finally:
            await stream.close()
        totals.close_unfinished()
        if chat:
            body = R.chat_body(rid, created, model, totals.ordered(), totals.usage(), want_logprobs,
                               parse_tools=totals.tools is not None)
            if req.prompt_logprobs is not None:      # vLLM's extra: the prompt's entries, beside the choices
                body["prompt_logprobs"] = R.vllm_prompt_logprobs(totals.prompt.get(0, []))
            return body
        return R.completion_body(rid, created, model, totals.ordered(), totals.usage(), want_logprobs, echo,
                                 totals.prompt, vllm_prompt=req.prompt_logprobs is not None)

    async def _prompt_heads(self, totals: _Totals) -> None:
        """Requests scoring their prompt start each choice's entries with the first prompt token (no
        log-probability: nothing precedes it)."""
        for req in totals.requests:
            if req.params.prompt_logprobs is None:
                continue
            head = R.prompt_head(req.prompt_ids[0], (await self.core.token_strs(req.prompt_ids[:1]))[0])
            for i in range(req.params.n):
                totals.prompt[req.choice_offset + i] = [head]

    @staticmethod
    def _apply(item, totals: _Totals) -> None:
        event = item.event
        if isinstance(event, PromptLogprobs):
            totals.on_prompt(item.request, event)
        elif isinstance(event, CompletionDelta):
            totals.choices[item.request.choice_offset + event.index].add(event)
        elif isinstance(event, RequestFinished):
            totals.on_finished(event)

    async def _sse(self, stream: EventStream, first, totals: _Totals, writer: R.ChunkWriter, chat: bool,
                   continuous_usage: bool, echo) -> AsyncIterator[str]:
        keepalive = self.core.keepalive_s
        try:
            if chat:
                for choice in totals.ordered():
                    yield writer.role(choice.index)
            elif echo:
                for choice in totals.ordered():
                    yield writer.content(choice, echo[choice.index], totals.prompt.get(choice.index, ()), None, None)
                    totals.prompt_pos[choice.index] = sum(len(e.token) for e in totals.prompt.get(choice.index, ()))
            item = first
            while item is not END:
                if item is TIMEOUT:
                    yield R.sse_comment("keep-alive")
                else:
                    for text in self._render(item, totals, writer, continuous_usage):
                        yield text
                try:
                    item = await stream.get(timeout=keepalive)
                except APIError as exc:
                    yield R.sse(exc.envelope())
                    yield R.DONE
                    return
            use = totals.usage()
            for choice in totals.close_unfinished():
                yield writer.content(choice, "", (), FinishReason.ABORT, None, use if continuous_usage else None)
            if writer.include_usage:
                yield writer.usage(use)
            yield R.DONE
        finally:
            await stream.close()

    def _render(self, item, totals: _Totals, writer: R.ChunkWriter, continuous_usage: bool) -> list[str]:
        event = item.event
        if isinstance(event, PrefillProgress):
            return [R.sse_comment(f"prefill {event.processed_tokens}/{event.total_tokens}")]
        if isinstance(event, PromptLogprobs):       # echo with logprobs: the prompt's entries as they are scored
            indices = totals.on_prompt(item.request, event)
            return [writer.prompt_entries(i, event.logprobs, totals.prompt_pos)
                    for i in indices if writer.want_logprobs and i in totals.prompt_pos]
        self._apply(item, totals)
        if not isinstance(event, CompletionDelta):
            return []
        if not event.text and not event.finish_reason and not event.logprobs:
            return []
        choice = totals.choices[item.request.choice_offset + event.index]
        use = totals.usage() if continuous_usage else None
        if totals.tools is not None:
            return self._render_tools(choice, event, totals, writer, use)
        return [writer.content(choice, event.text, event.logprobs, event.finish_reason, event.stop_reason, use)]

    @staticmethod
    def _render_tools(choice: R.Choice, event: CompletionDelta, totals: _Totals, writer: R.ChunkWriter,
                      use: dict | None) -> list[str]:
        """A chat delta through the choice's tool-call parser: content and tool-call deltas, then the finish
        chunk ("tool_calls" when the choice called tools and stopped by itself)."""
        stream = totals.tool_streams.setdefault(choice.index, T.ToolCallStream())
        deltas = stream.feed(event.text) if event.text else []
        if event.finish_reason:
            deltas += stream.close()
        out, entries = [], event.logprobs
        for delta in deltas:
            out.append(writer.delta(choice, delta, entries, None, None, use))
            entries = ()
        if event.finish_reason:
            reason = "tool_calls" if stream.called and event.finish_reason == FinishReason.STOP else event.finish_reason
            out.append(writer.delta(choice, {}, entries, reason, event.stop_reason, use))
        elif entries:
            out.append(writer.delta(choice, {"content": ""}, entries, None, None, use))
        return out
