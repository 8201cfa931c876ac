"""`LLMEngine.step()` = schedule -> run -> postprocess (single-threaded; the async engine drives it).

A request with `n` choices becomes `n` sequences (each prefills its own copy of the prompt and samples
with its own generator, seeded `seed + index`). Events are the plain dataclasses of the API seam.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from longserve.server.api.engine_client import (CompletionDelta, LoadStats, PrefillProgress, RequestFinished,
                                                RequestRejected, RequestTimings, TokenLogprob)
from longserve.server.config import EngineConfig
from longserve.server.engine.block_manager import BlockManager
from longserve.server.engine.model_runner import ModelRunner
from longserve.server.engine.scheduler import Scheduler
from longserve.server.engine.sequence import Sequence
from longserve.server.hf_config import load_checkpoint
from longserve.server.sampling import SamplingParams
from longserve.server.tokenizer import IncrementalDetokenizer, Tokenizer


@dataclass
class _Choice:
    seq: Sequence
    detok: IncrementalDetokenizer
    text: str = ""            # decoded output so far (stop strings already cut)
    emitted: int = 0          # characters of `text` already sent


@dataclass
class _Request:
    request_id: str
    prompt_len: int
    choices: list[_Choice]
    arrival: float
    first_scheduled: float | None = None
    first_token: float | None = None
    chunk_seconds: list[float] = field(default_factory=list)
    chunk_tokens: list[int] = field(default_factory=list)
    done: bool = False


def context_error(limit: int, prompt: int, completion: int) -> RequestRejected:
    return RequestRejected(
        f"This model's maximum context length is {limit} tokens, but the request needs {prompt + completion} "
        f"tokens ({prompt} in the prompt, {completion} for the completion). Shorten the prompt or lower "
        "max_tokens.", param="input_tokens")


class LLMEngine:
    def __init__(self, config: EngineConfig, *, device: str | None = None):
        if config.tensor_parallel_size != 1:
            raise ValueError(f"tensor_parallel_size {config.tensor_parallel_size}: this engine build runs TP 1")
        self.config = config
        self.checkpoint = load_checkpoint(config.model_path, config.sparse_config_path)
        facts = self.checkpoint.facts
        if config.max_model_len > facts.max_position_embeddings:
            raise ValueError(f"max_model_len {config.max_model_len} exceeds the model's max_position_embeddings "
                             f"{facts.max_position_embeddings}")
        self.tokenizer = Tokenizer(config.model_path)
        self.runner = ModelRunner(config, self.checkpoint, device=device)
        self.sparse_threshold = self._enable_sparse()
        self.blocks = BlockManager(self.runner.num_kv_blocks, config.kv_block_size)
        self.scheduler = Scheduler(self.blocks, max_num_seqs=config.max_num_seqs,
                                   max_num_batched_tokens=config.prefill_chunk_tokens)
        eos = set(self.checkpoint.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        self.eos_token_ids = tuple(sorted(eos))
        self.requests: dict[str, _Request] = {}

    def _enable_sparse(self) -> int | None:
        from longserve.kernels import load_sparse_attention_config
        c, facts = self.config, self.checkpoint.facts
        if not (c.sparse_prefill and self.runner.dca.chunk_size is not None and self.checkpoint.sparse_config):
            return None
        cfg = load_sparse_attention_config(self.checkpoint.sparse_config, facts.num_layers, facts.num_heads)
        threshold = c.sparse_threshold or facts.sparse_attention_threshold or 32768
        self.runner.set_sparse(lambda layer: cfg.budgets(layer, threshold=threshold, last_q=c.sparse_last_q))
        return threshold

    @property
    def kv_capacity_tokens(self) -> int:
        return self.blocks.num_blocks * self.blocks.block_size

    # --- admission ---------------------------------------------------------------------------------------
    def resolve_max_tokens(self, prompt_len: int, params: SamplingParams) -> int:
        """Validate a request without touching engine state (serving.md §1.3); returns the token cap."""
        limit, cap = self.config.max_model_len, self.config.max_output_tokens
        if prompt_len == 0:
            raise RequestRejected("the prompt is empty", param="prompt")
        if prompt_len >= limit:
            raise context_error(limit, prompt_len, 1 if params.max_tokens is None else params.max_tokens)
        if params.max_tokens is None:
            return min(cap, limit - prompt_len)
        if params.max_tokens > cap:
            raise RequestRejected(f"max_tokens is too large: {params.max_tokens}. This model supports at most "
                                  f"{cap} completion tokens.", param="max_tokens")
        if prompt_len + params.max_tokens > limit:
            raise context_error(limit, prompt_len, params.max_tokens)
        if self.blocks.blocks_for(prompt_len + params.max_tokens) > self.blocks.num_blocks:
            raise RequestRejected(f"the request needs {prompt_len + params.max_tokens} KV slots, the cache holds "
                                  f"{self.kv_capacity_tokens}", param="input_tokens")
        return params.max_tokens

    def add_request(self, request_id: str, prompt_token_ids, params: SamplingParams,
                    arrival: float | None = None) -> None:
        if request_id in self.requests:
            raise RequestRejected(f"request id {request_id!r} is already in flight", param="request_id")
        ids = [int(t) for t in prompt_token_ids]
        vocab = self.checkpoint.facts.vocab_size
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise RequestRejected(f"token id {bad} is outside the vocabulary [0, {vocab})", param="prompt")
        max_tokens = self.resolve_max_tokens(len(ids), params)
        arrival = time.monotonic() if arrival is None else arrival
        choices = []
        for index in range(params.n):
            seq = Sequence(request_id, index, list(ids), params, max_tokens, arrival_time=arrival)
            choices.append(_Choice(seq, IncrementalDetokenizer(self.tokenizer, params.skip_special_tokens)))
        for choice in choices:
            self.scheduler.add(choice.seq)
        self.requests[request_id] = _Request(request_id, len(ids), choices, arrival)

    def abort(self, request_id: str) -> bool:
        req = self.requests.pop(request_id, None)
        if req is None:
            return False
        for seq in self.scheduler.abort(request_id):
            self.runner.release(seq)
        return True

    def has_work(self) -> bool:
        return self.scheduler.has_work

    def load_stats(self) -> LoadStats:
        s = self.scheduler
        return LoadStats(num_running=len({q.request_id for q in s.running}),
                         num_waiting=len({q.request_id for q in s.waiting} - {q.request_id for q in s.running}),
                         pending_prefill_tokens=s.pending_prefill_tokens, kv_blocks_total=self.blocks.num_blocks,
                         kv_blocks_used=self.blocks.num_used_blocks, kv_block_size=self.blocks.block_size)

    # --- one step ------------------------------------------------------------------------------------------
    def step(self) -> list:
        batch = self.scheduler.schedule()
        if batch.is_empty:
            return []
        started = time.monotonic()
        for chunk in batch.chunks:
            req = self.requests[chunk.seq.request_id]
            if req.first_scheduled is None:
                req.first_scheduled = started
        blocked = {}
        for chunk in batch.chunks:
            seq = chunk.seq
            if chunk.samples and len(seq.output_token_ids) < seq.params.min_tokens:
                blocked[seq.seq_id] = tuple(set(self.eos_token_ids) | set(seq.params.stop_token_ids))
        count = self.sparse_threshold is not None and any(
            not c.is_decode and self.requests[c.seq.request_id].prompt_len > self.sparse_threshold
            for c in batch.chunks)
        result = self.runner.execute(batch, blocked, count_pairs=count)
        sampled, stats = result.sampled, result.pair_stats
        density = stats.computed / stats.causal if stats is not None and stats.causal else None
        self.scheduler.commit(batch)
        now = time.monotonic()
        events: list = []
        progressed = {}
        for chunk in batch.chunks:
            if not chunk.is_decode and chunk.seq.choice_index == 0:
                req = self.requests[chunk.seq.request_id]
                req.chunk_seconds.append(now - started)
                req.chunk_tokens.append(chunk.num_tokens)
                progressed[req.request_id] = (min(chunk.seq.num_computed_tokens, req.prompt_len), req.prompt_len)
        for rid, (done, total) in progressed.items():
            sparse = density is not None and total > self.sparse_threshold
            events.append(PrefillProgress(rid, done, total, density if sparse else None))
        sampling_chunks = [c for c in batch.chunks if c.samples]
        for chunk, result in zip(sampling_chunks, sampled):
            events.extend(self._append_token(chunk.seq, result, now))
        return events

    def _choice(self, seq: Sequence) -> _Choice:
        return self.requests[seq.request_id].choices[seq.choice_index]

    def _finish_reason(self, seq: Sequence, token: int) -> tuple[str | None, object]:
        p = seq.params
        if token in p.stop_token_ids:
            return "stop", token
        if token in self.eos_token_ids and not p.ignore_eos:
            return "stop", None
        if len(seq.output_token_ids) >= seq.max_tokens or seq.num_tokens >= self.config.max_model_len:
            return "length", None
        return None, None

    def _append_token(self, seq: Sequence, result, now: float) -> list:
        req = self.requests[seq.request_id]
        choice = self._choice(seq)
        seq.output_token_ids.append(result.token_id)
        if req.first_token is None:
            req.first_token = now
        reason, stop_reason = self._finish_reason(seq, result.token_id)
        hidden = result.token_id in self.eos_token_ids or result.token_id in seq.params.stop_token_ids
        choice.text += "" if hidden and seq.params.skip_special_tokens else choice.detok.add([result.token_id])
        if reason is None and seq.params.stop:
            reason, stop_reason = self._check_stop_strings(choice)
        if reason is None:
            hold = max((len(s) for s in seq.params.stop), default=1) - 1
            upto = max(choice.emitted, len(choice.text) - hold)
        else:
            upto = len(choice.text)
        delta_text, choice.emitted = choice.text[choice.emitted:upto], upto
        logprobs = ()
        if seq.params.logprobs is not None:
            tok = self.tokenizer.id_to_token
            logprobs = (TokenLogprob(result.token_id, tok(result.token_id), result.logprob,
                                     tuple((t, tok(t), lp) for t, lp in result.top)),)
        events = [CompletionDelta(seq.request_id, seq.choice_index, delta_text, (result.token_id,), logprobs,
                                  reason, stop_reason, req.prompt_len, len(seq.output_token_ids))]
        if reason is not None:
            self.scheduler.finish(seq, reason, stop_reason)
            self.runner.release(seq)
            if all(c.seq.is_finished for c in req.choices):
                events.append(self._finished(req, now))
        return events

    @staticmethod
    def _check_stop_strings(choice: _Choice):
        params = choice.seq.params
        window = max(len(s) for s in params.stop) + 8
        start = max(0, choice.emitted - window)
        hits = [(choice.text.find(s, start), s) for s in params.stop]
        hits = [(i, s) for i, s in hits if i >= 0]
        if not hits:
            return None, None
        index, stop = min(hits)
        choice.text = choice.text[:index + (len(stop) if params.include_stop_str_in_output else 0)]
        choice.emitted = min(choice.emitted, len(choice.text))
        return "stop", stop

    def _finished(self, req: _Request, now: float) -> RequestFinished:
        del self.requests[req.request_id]
        first_sched = req.first_scheduled if req.first_scheduled is not None else now
        timings = RequestTimings(
            arrival=req.arrival, queued_seconds=first_sched - req.arrival,
            first_token_seconds=None if req.first_token is None else req.first_token - req.arrival,
            prefill_chunk_seconds=tuple(req.chunk_seconds), prefill_chunk_tokens=tuple(req.chunk_tokens),
            decode_seconds=0.0 if req.first_token is None else now - req.first_token, finished=now)
        return RequestFinished(req.request_id, req.prompt_len, sum(len(c.seq.output_token_ids) for c in req.choices),
                               tuple(c.seq.finish_reason for c in req.choices), timings,
                               sum(c.seq.num_preemptions for c in req.choices))
