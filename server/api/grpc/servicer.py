"""`longserve.v1.Generation`: pb <-> domain conversion over `GenerationCore` (docs/serving.md#grpc).

Errors are raised as `APIError` and mapped to status codes by the interceptor; a request the engine
fails ends with INTERNAL, or RESOURCE_EXHAUSTED when it ran out of memory. Cancelling the
RPC cancels this handler, whose `finally` closes the event stream: the engine request is aborted
and its KV freed, the same path as an HTTP disconnect.
"""
from __future__ import annotations

import time
import uuid

from longserve.server.api import accounting
from longserve.server.api.engine_client import (
    CompletionDelta,
    FinishReason,
    PrefillProgress,
    PromptLogprobs,
    RequestFinished,
)
from longserve.server.api.errors import APIError, BadRequest
from longserve.server.api.generation import END, TIMEOUT, GenerationCore
from longserve.server.api.grpc.pb import generation_pb2 as pb
from longserve.server.api.grpc.pb import generation_pb2_grpc as pb_grpc

_FINISH = {FinishReason.STOP: pb.FINISH_REASON_STOP, FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
           FinishReason.ABORT: pb.FINISH_REASON_ABORT}
_OPTIONAL = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
             "frequency_penalty", "n", "seed", "ignore_eos", "include_stop_str_in_output", "min_tokens",
             "logprobs", "skip_special_tokens", "prompt_logprobs")


def sampling_fields(sp: pb.SamplingParams) -> dict:
    """Explicitly set fields only: proto3 `optional` presence decides what falls back to defaults."""
    fields = {name: getattr(sp, name) for name in _OPTIONAL if sp.HasField(name)}
    if fields.get("top_k") == 0:
        fields["top_k"] = -1
    if sp.stop:
        fields["stop"] = list(sp.stop)
    if sp.stop_token_ids:
        fields["stop_token_ids"] = list(sp.stop_token_ids)
    return fields


def _chat_messages(chat: pb.ChatMessages) -> tuple[list[dict], bool]:
    add = chat.add_generation_prompt if chat.HasField("add_generation_prompt") else True
    return [{"role": m.role, "content": m.content} for m in chat.messages], add


def _stop_text(stop_reason) -> str:
    """A stop reason (matched string or token id) as the proto's string field; "" for none."""
    return "" if stop_reason is None else str(stop_reason)


def _logprobs(entries) -> list[pb.TokenLogprob]:
    return [pb.TokenLogprob(token_id=e.token_id, token=e.token, logprob=e.logprob, rank=e.rank,
                            top=[pb.TopLogprob(token_id=t, token=s, logprob=lp) for t, s, lp in e.top])
            for e in entries]


class GenerationServicer(pb_grpc.GenerationServicer):
    def __init__(self, core: GenerationCore, version: str):
        self.core = core
        self.version = version

    async def _prompt_ids(self, request) -> list[int]:
        core = self.core
        kind = request.WhichOneof("input")
        if kind == "prompt":
            core.metrics.observe_prompt_bytes(len(request.prompt.encode("utf-8")), "grpc")
            return await core.encode(request.prompt)
        if kind == "token_ids":
            ids = list(request.token_ids.ids)
            core.check_token_ids(ids)
            return ids
        if kind == "chat":
            messages, add = _chat_messages(request.chat)
            text = await core.render_chat(messages, add, request.chat.continue_final_message)
            core.metrics.observe_prompt_bytes(len(text.encode("utf-8")), "grpc")
            return await core.encode(text)
        raise BadRequest("one of prompt, token_ids or chat is required", param="input")

    async def Generate(self, request, context):
        arrival = time.monotonic()
        core = self.core
        rid = request.request_id or f"grpc-{uuid.uuid4().hex}"
        try:
            core.state.require_engine()
            core.check_model(request.model)
            ids = await self._prompt_ids(request)
            sp = request.sampling
            truncate = sp.truncate_prompt_tokens if sp.HasField("truncate_prompt_tokens") else None
            req = core.prepare(rid, ids, sampling_fields(sp), truncate=truncate, arrival=arrival)
        except APIError as exc:
            core.count_rejection(exc)
            raise
        stream = core.open([req])
        try:
            item = await stream.get(timeout=core.admission_wait_s)
            prompt_tokens = len(req.prompt_ids)
            done, prefilling, finished = 0, True, None
            choices = [accounting.ChoiceTally() for _ in range(req.params.n)]
            yield pb.GenerateResponse(request_id=rid, progress=pb.Progress(prefill_tokens_done=0,
                                                                           prompt_tokens=prompt_tokens))
            while item is not END:
                event = None if item is TIMEOUT else item.event
                if item is TIMEOUT and prefilling or isinstance(event, PrefillProgress):
                    done = event.processed_tokens if event is not None else done
                    yield pb.GenerateResponse(request_id=rid, progress=pb.Progress(
                        prefill_tokens_done=done, prompt_tokens=prompt_tokens))
                elif isinstance(event, PromptLogprobs):
                    yield pb.GenerateResponse(request_id=rid, prompt_logprobs=pb.PromptLogprobs(
                        start=event.start, logprobs=_logprobs(event.logprobs)))
                elif isinstance(event, CompletionDelta) and event.finish_reason == FinishReason.ERROR:
                    pass       # the engine failed the request: the call ends with the error status next
                elif isinstance(event, CompletionDelta):
                    prefilling = False
                    choices[event.index].add(event)
                    delta = pb.Delta(text=event.text, index=event.index, logprobs=_logprobs(event.logprobs),
                                     token_ids=list(event.token_ids) if request.return_token_ids else [])
                    if event.finish_reason is not None:
                        delta.finish_reason = _FINISH.get(event.finish_reason, pb.FINISH_REASON_UNSPECIFIED)
                        delta.stop_reason = _stop_text(event.stop_reason)
                    yield pb.GenerateResponse(request_id=rid, delta=delta)
                elif isinstance(event, RequestFinished):
                    finished = event
                item = await stream.get(timeout=core.keepalive_s)
            yield pb.GenerateResponse(request_id=rid, final=self._final(finished, prompt_tokens, choices))
        finally:
            await stream.close()

    @staticmethod
    def _final(finished: RequestFinished | None, prompt_tokens: int,
               tallies: list[accounting.ChoiceTally]) -> pb.Final:
        accounting.close_unfinished(tallies)
        choices = [pb.ChoiceFinish(index=i, finish_reason=_FINISH.get(t.finish_reason),
                                   stop_reason=_stop_text(t.stop_reason)) for i, t in enumerate(tallies)]
        use = accounting.usage(prompt_tokens, tallies, accounting.cached_prompt_tokens(finished))
        timing = pb.Timing()
        if finished is not None:
            t = finished.timings
            timing.queue_ms = t.queued_seconds * 1e3
            if t.first_token_seconds is not None:
                timing.ttft_ms = t.first_token_seconds * 1e3
                timing.prefill_ms = max(t.first_token_seconds - t.queued_seconds, 0.0) * 1e3
            if t.finished is not None:
                timing.e2e_ms = max(t.finished - t.arrival, 0.0) * 1e3
        usage = pb.Usage(prompt_tokens=use.prompt_tokens, completion_tokens=use.completion_tokens,
                         total_tokens=use.total_tokens, cached_tokens=use.cached_tokens)
        return pb.Final(finish_reason=choices[0].finish_reason, stop_reason=choices[0].stop_reason,
                        usage=usage, timing=timing, choices=choices)

    async def Tokenize(self, request, context):
        core = self.core
        core.check_model(request.model)
        kind = request.WhichOneof("input")
        if kind == "prompt":
            ids = await core.encode(request.prompt, add_special_tokens=request.add_special_tokens)
        elif kind == "chat":
            messages, add = _chat_messages(request.chat)
            ids = await core.encode(await core.render_chat(messages, add, request.chat.continue_final_message))
        else:
            raise BadRequest("one of prompt or chat is required", param="input")
        return pb.TokenizeResponse(token_ids=ids, count=len(ids), max_model_len=core.max_model_len)

    async def GetModelInfo(self, request, context):
        core = self.core
        info = core.state.loaded_engine().model_info
        return pb.ModelInfo(served_model_name=core.served_model_name, max_model_len=info.max_model_len,
                            max_output_tokens=info.max_output_tokens, vocab_size=info.vocab_size,
                            tensor_parallel_size=core.config.tensor_parallel_size, dca=info.dca_enabled,
                            sparse_prefill=info.sparse_enabled, sparse_threshold=info.sparse_threshold or 0,
                            kv_capacity_tokens=info.kv_capacity_tokens, version=self.version)

    async def GetLoad(self, request, context):
        core = self.core
        stats = core.state.loaded_engine().load_stats()
        return pb.Load(running=stats.num_running, waiting=stats.num_waiting,
                       prefill_tokens_pending=stats.pending_prefill_tokens, kv_cache_usage_ratio=stats.kv_usage,
                       kv_cache_capacity_tokens=stats.kv_blocks_total * stats.kv_block_size)
