"""`LLMEngine`: the single-threaded step loop (the async engine drives it from its own thread).

`step()` is schedule -> execute -> update. A request with `n` choices becomes `n` sequences (each
prefills its own copy of the prompt and samples with its own generator, seeded `seed + index`).
Events are the plain dataclasses of `protocol`; text and stop strings come from each choice's
`IncrementalDetokenizer`, which the engine only asks.

Failure isolation: when running a step raises (device out of memory, a kernel error), the step is
run again one request at a time to find the request(s) that cause it. Those fail alone
(`RequestFailed`, KV blocks freed); the others keep the results of their re-run and carry on.
Re-running is safe because a step only writes the K/V of its own tokens, to the same slots each
time, and sampling (the only consumer of random generators) comes after the forward. The cost is
paid only on failure: at most one extra forward per request of the failed step, each smaller than
the step. An error while turning one request's sampled token into output fails that request too.
Errors outside any request (the scheduler, the loop) still propagate: the async engine then reports
itself dead. So does a failure that leaves the device unusable (CUDA errors such as an illegal memory
access are sticky): after a failed step that was not an out-of-memory error, a tiny probe runs on
the device, and if it fails too the step raises `EngineDeadError` instead of failing requests.
At tensor_parallel_size > 1 there is no isolation: a failed step (a lost rank, a collective timeout, or an
error on rank 0 while the others wait in a collective) raises `EngineDeadError`.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from longserve.server.config import EngineConfig
from longserve.server.engine.admission import check_token_ids
from longserve.server.engine.admission import resolve_max_tokens as resolve_context
from longserve.server.engine.block_manager import BlockManager
from longserve.server.engine.model_runner import ModelRunner, StepResult
from longserve.server.engine.prompt_logprobs import PromptLogprobJob, PromptScores, wanted_positions
from longserve.server.engine.protocol import (
    CompletionDelta,
    EngineDeadError,
    FailureCause,
    FinishReason,
    GenerationEvent,
    LoadStats,
    PrefillProgress,
    PromptLogprobs,
    RequestFailed,
    RequestFinished,
    RequestRejected,
    RequestTimings,
    TokenLogprob,
)
from longserve.server.engine.scheduler import ScheduledBatch, Scheduler
from longserve.server.engine.sequence import Sequence
from longserve.server.engine.structured import Constraint, GrammarCompiler, GrammarError
from longserve.server.hf_config import load_checkpoint
from longserve.server.sampling import SamplingParams
from longserve.server.tokenizer import IncrementalDetokenizer, Tokenizer

log = logging.getLogger("longserve.engine")


@dataclass
class _Choice:
    seq: Sequence
    detok: IncrementalDetokenizer
    constraint: Constraint | None = None     # the grammar of a structured output / enforced tool call


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
    prompt_logprobs_next: int = 1      # the next prompt token to score (prompt_logprobs); none scored for token 0


@dataclass
class _Executed:
    """What running one scheduled batch produced: the pieces that ran (the whole batch, or one piece per
    request after a failure) and, per failed request, the error its piece raised and that piece's tokens."""
    started: float
    ran: list[tuple[ScheduledBatch, StepResult]]
    failed: dict[str, tuple[BaseException, int]]


class LLMEngine:
    def __init__(self, config: EngineConfig, *, device: str | None = None, topology=None, on_tp_failure=None):
        """At tensor_parallel_size > 1 this process is rank 0 of the replica: it starts the pod's other ranks
        (`parallel.workers`) and joins the group at `topology` (a `parallel.topology.Topology`; default: from the
        environment). `on_tp_failure(reason)` is told when a rank is lost (the server exits)."""
        self.config = config
        self.checkpoint = load_checkpoint(config.model_path, config.sparse_config_path)
        facts = self.checkpoint.facts
        if config.max_model_len > facts.max_position_embeddings:
            raise ValueError(f"max_model_len {config.max_model_len} exceeds the model's max_position_embeddings "
                             f"{facts.max_position_embeddings}")
        self.tokenizer = Tokenizer(config.model_path)
        self.tp_link = None
        if config.tensor_parallel_size == 1:
            self.runner = ModelRunner(config, self.checkpoint, device=device)
        else:
            self.runner = self._start_tensor_parallel(device, topology, on_tp_failure)
        self.sparse_threshold = self.runner.enable_sparse()
        self.blocks = BlockManager(self.runner.num_kv_blocks, config.kv_block_size,
                                   enable_prefix_caching=config.enable_prefix_caching)
        self.scheduler = Scheduler(self.blocks, max_num_seqs=config.max_num_seqs,
                                   max_num_batched_tokens=config.prefill_chunk_tokens)
        eos = set(self.checkpoint.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        self.eos_token_ids = tuple(sorted(eos))
        self.grammars = GrammarCompiler(self.tokenizer, facts.vocab_size, self.eos_token_ids)
        self.grammars.warm_up()
        self.requests: dict[str, _Request] = {}
        self.on_step: Callable[[int], None] | None = None    # told each executed step's token count (metrics)

    def _start_tensor_parallel(self, device, topology, on_failure) -> ModelRunner:
        from longserve.server.models.qwen2 import check_tp
        from longserve.server.parallel.topology import resolve
        from longserve.server.parallel.workers import LeaderLink

        check_tp(self.checkpoint.facts, self.config.tensor_parallel_size)
        topology = topology if topology is not None else resolve(self.config.tensor_parallel_size)
        if topology.tp != self.config.tensor_parallel_size:
            raise ValueError(f"topology of {topology.tp} ranks for tensor_parallel_size "
                             f"{self.config.tensor_parallel_size}")
        device_type = torch.device(device).type if device else ("cuda" if torch.cuda.is_available() else "cpu")
        self.tp_link = LeaderLink(self.config, topology, device_type, on_failure)
        try:
            runner = ModelRunner(self.config, self.checkpoint, device=f"{device_type}:0" if device_type == "cuda"
                                 else device_type, tp=self.tp_link.group)
            runner.tp_sender = self.tp_link.start_sending()
        except BaseException:
            self.tp_link.close()           # no sender yet: kills the workers, leaves the group
            raise
        return runner

    def close(self) -> None:
        """Stop the tensor-parallel workers (nothing to do at TP 1)."""
        if self.tp_link is not None:
            self.tp_link.close()
            self.tp_link = None

    @property
    def kv_capacity_tokens(self) -> int:
        return self.blocks.num_blocks * self.blocks.block_size

    # --- admission ---------------------------------------------------------------------------------------
    def validate(self, prompt_token_ids, params: SamplingParams) -> tuple[list[int], int]:
        """Check a request without touching engine state; returns (prompt ids as ints, token cap)."""
        ids = check_token_ids(prompt_token_ids, self.checkpoint.facts.vocab_size)
        return ids, self.resolve_max_tokens(len(ids), params)

    def resolve_max_tokens(self, prompt_len: int, params: SamplingParams) -> int:
        """The context-length rule of `admission`, plus: an explicit cap must fit the KV cache."""
        max_tokens = resolve_context(prompt_len, params.max_tokens, max_model_len=self.config.max_model_len,
                                     max_output_tokens=self.config.max_output_tokens,
                                     scoring=params.prompt_logprobs is not None)
        if params.max_tokens is not None and self.blocks.blocks_for(prompt_len + max_tokens) > self.blocks.num_blocks:
            raise RequestRejected(f"the request needs {prompt_len + max_tokens} KV slots, the cache holds "
                                  f"{self.kv_capacity_tokens}", param="input_tokens")
        return max_tokens

    def add_request(self, request_id: str, prompt_token_ids, params: SamplingParams,
                    arrival: float | None = None) -> None:
        if request_id in self.requests:
            raise RequestRejected(f"request id {request_id!r} is already in flight", param="request_id")
        ids, max_tokens = self.validate(prompt_token_ids, params)
        arrival = time.monotonic() if arrival is None else arrival
        choices = []
        for index in range(params.n):
            seq = Sequence(request_id, index, list(ids), params, max_tokens, arrival_time=arrival)
            detok = IncrementalDetokenizer(self.tokenizer, params.skip_special_tokens, params.stop,
                                           params.include_stop_str_in_output)
            try:
                constraint = self.grammars.constraint(params)
            except GrammarError as exc:
                raise RequestRejected(f"invalid structured-output constraint: {exc}", param="response_format") from None
            choices.append(_Choice(seq, detok, constraint))
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

    # --- one step: schedule -> execute -> update ----------------------------------------------------------
    def step(self) -> list[GenerationEvent]:
        batch = self._schedule()
        if batch.is_empty:
            return []
        events = self._update(self._execute(batch))
        if self.on_step is not None:
            self.on_step(batch.num_tokens)
        return events

    def _schedule(self) -> ScheduledBatch:
        batch = self.scheduler.schedule()
        now = time.monotonic()
        for chunk in batch.chunks:
            req = self.requests[chunk.seq.request_id]
            if req.first_scheduled is None:
                req.first_scheduled = now
        return batch

    def _execute(self, batch: ScheduledBatch) -> _Executed:
        """Run the batch; if that raises, find the request(s) at fault by running each request alone."""
        started = time.monotonic()
        try:
            return _Executed(started, [(batch, self._run(batch))], {})
        except Exception as exc:     # anything a forward can raise; BaseException (Ctrl-C) still stops us
            if self.tp_link is not None:     # other ranks may be mid-collective: the replica cannot go on
                raise EngineDeadError(f"a tensor-parallel step failed: {type(exc).__name__}: "
                                      f"{_first_line(exc)}") from exc
            by_request: dict[str, list] = {}
            for chunk in batch.chunks:
                by_request.setdefault(chunk.seq.request_id, []).append(chunk)
            if len(by_request) == 1:
                return _Executed(started, [], {batch.chunks[0].seq.request_id: (exc, batch.num_tokens)})
            log.warning("a step of %d requests failed (%s: %s); running them one at a time", len(by_request),
                        type(exc).__name__, _first_line(exc), extra={"event": "step_failed_isolating"})
        ran, failed = [], {}
        for request_id, chunks in by_request.items():
            piece = ScheduledBatch(chunks=chunks)
            try:
                ran.append((piece, self._run(piece)))
            except Exception as exc:
                failed[request_id] = (exc, piece.num_tokens)
        return _Executed(started, ran, failed)

    def _run(self, batch: ScheduledBatch) -> StepResult:
        blocked = {}
        for chunk in batch.chunks:
            seq = chunk.seq
            if chunk.samples and len(seq.output_token_ids) < seq.params.min_tokens:
                blocked[seq.seq_id] = tuple(set(self.eos_token_ids) | set(seq.params.stop_token_ids))
        count = self.sparse_threshold is not None and any(
            not c.is_decode and self.requests[c.seq.request_id].prompt_len > self.sparse_threshold
            for c in batch.chunks)
        wanted = self._prompt_logprob_jobs(batch)
        constraints = self._constraints(batch)
        if wanted:
            return self.runner.execute(batch, blocked, count_pairs=count, prompt_logprobs=wanted,
                                       constraints=constraints)
        return self.runner.execute(batch, blocked, count_pairs=count, constraints=constraints)

    def _constraints(self, batch: ScheduledBatch) -> dict[int, Constraint]:
        """seq_id -> grammar state, for the sampling chunks of constrained requests."""
        out = {}
        for chunk in batch.chunks:
            if chunk.samples:
                choice = self.requests[chunk.seq.request_id].choices[chunk.seq.choice_index]
                if choice.constraint is not None:
                    out[chunk.seq.seq_id] = choice.constraint
        return out

    def _prompt_logprob_jobs(self, batch: ScheduledBatch) -> dict[int, PromptLogprobJob]:
        """Prompt tokens this batch's prefill chunks can score: choice 0 of requests asking for prompt
        log-probabilities, from the request's next unscored token (a recompute after preemption scores none
        twice)."""
        jobs = {}
        for chunk in batch.chunks:
            seq = chunk.seq
            if seq.params.prompt_logprobs is None or seq.choice_index != 0:
                continue
            req = self.requests[seq.request_id]
            lo, hi = wanted_positions(chunk.start, chunk.num_tokens, req.prompt_len, req.prompt_logprobs_next)
            if lo < hi:
                jobs[seq.seq_id] = PromptLogprobJob(seq.seq_id, lo, seq.prompt_token_ids[lo:hi],
                                                    k=seq.params.prompt_logprobs)
        return jobs

    def _update(self, executed: _Executed) -> list[GenerationEvent]:
        """Commit what ran, emit progress and tokens, and fail the requests whose piece raised."""
        self.scheduler.commit(ScheduledBatch(chunks=[c for piece, _ in executed.ran for c in piece.chunks]))
        now = time.monotonic()
        density = _density([result.pair_stats for _, result in executed.ran])
        events: list[GenerationEvent] = []
        progressed = {}
        for piece, _ in executed.ran:
            for chunk in piece.chunks:
                if not chunk.is_decode and chunk.seq.choice_index == 0:
                    req = self.requests[chunk.seq.request_id]
                    req.chunk_seconds.append(now - executed.started)
                    req.chunk_tokens.append(chunk.num_tokens)
                    progressed[req.request_id] = (min(chunk.seq.num_computed_tokens, req.prompt_len), req.prompt_len)
        for piece, result in executed.ran:
            for chunk in piece.chunks:
                scores = result.prompt_scores.get(chunk.seq.seq_id)
                if scores is not None and chunk.seq.request_id not in executed.failed:
                    events.append(self._prompt_logprobs_event(self.requests[chunk.seq.request_id], scores))
        for rid, (done, total) in progressed.items():
            sparse = density is not None and total > self.sparse_threshold
            events.append(PrefillProgress(rid, done, total, density if sparse else None))
        failed = dict(executed.failed)
        for piece, result in executed.ran:
            for chunk, sampled in zip([c for c in piece.chunks if c.samples], result.sampled):
                if chunk.seq.request_id in failed:
                    continue
                try:
                    if chunk.seq.max_tokens == 0:     # scoring only: the prompt is done, nothing is generated
                        events.extend(self._end_choice(chunk.seq, FinishReason.LENGTH, None, now))
                    else:
                        events.extend(self._append_token(chunk.seq, sampled, now))
                except Exception as exc:     # e.g. detokenizing its output: that request alone fails
                    failed[chunk.seq.request_id] = (exc, chunk.num_tokens)
        if any(not _out_of_memory(exc) for exc, _ in failed.values()):
            self._check_device()
        for request_id, (exc, step_tokens) in failed.items():
            if request_id in self.requests:
                events.extend(self._fail(self.requests[request_id], exc, step_tokens, now))
        return events

    def _finish_reason(self, seq: Sequence, token: int) -> tuple[FinishReason | None, object]:
        p = seq.params
        if token in p.stop_token_ids:
            return FinishReason.STOP, token
        if token in self.eos_token_ids and not p.ignore_eos:
            return FinishReason.STOP, None
        if len(seq.output_token_ids) >= seq.max_tokens or seq.num_tokens >= self.config.max_model_len:
            return FinishReason.LENGTH, None
        return None, None

    def _append_token(self, seq: Sequence, result, now: float) -> list[GenerationEvent]:
        req = self.requests[seq.request_id]
        choice = req.choices[seq.choice_index]
        if choice.constraint is not None:
            choice.constraint.advance(result.token_id)
        seq.output_token_ids.append(result.token_id)
        if req.first_token is None:
            req.first_token = now
        reason, stop_reason = self._finish_reason(seq, result.token_id)
        hidden = result.token_id in self.eos_token_ids or result.token_id in seq.params.stop_token_ids
        visible = () if hidden and seq.params.skip_special_tokens else (result.token_id,)
        text, stop = choice.detok.step(visible, final=reason is not None)
        if stop is not None:
            reason, stop_reason = FinishReason.STOP, stop
        logprobs = ()
        if seq.params.logprobs is not None:
            tok = self.tokenizer.id_to_token
            logprobs = (TokenLogprob(result.token_id, tok(result.token_id), result.logprob,
                                     tuple((t, tok(t), lp) for t, lp in result.top)),)
        events: list[GenerationEvent] = [
            CompletionDelta(seq.request_id, seq.choice_index, text, (result.token_id,), logprobs, reason,
                            stop_reason, req.prompt_len, len(seq.output_token_ids))]
        if reason is not None:
            events.extend(self._finish_choice(req, seq, reason, stop_reason, now))
        return events

    def _end_choice(self, seq: Sequence, reason: FinishReason, stop_reason, now: float) -> list[GenerationEvent]:
        """End a choice without a new token (a scoring-only request once its prompt is done)."""
        req = self.requests[seq.request_id]
        delta = CompletionDelta(seq.request_id, seq.choice_index, "", (), (), reason, stop_reason, req.prompt_len,
                                len(seq.output_token_ids))
        return [delta, *self._finish_choice(req, seq, reason, stop_reason, now)]

    def _finish_choice(self, req: _Request, seq: Sequence, reason: FinishReason, stop_reason,
                       now: float) -> list[GenerationEvent]:
        self.scheduler.finish(seq, reason, stop_reason)
        self.runner.release(seq)
        if not all(c.seq.is_finished for c in req.choices):
            return []
        del self.requests[req.request_id]
        return [RequestFinished(req.request_id, req.prompt_len, self._num_output(req),
                                tuple(c.seq.finish_reason for c in req.choices), self._timings(req, now),
                                sum(c.seq.num_preemptions for c in req.choices))]

    def _prompt_logprobs_event(self, req: _Request, scores: PromptScores) -> PromptLogprobs:
        tok = self.tokenizer.id_to_token
        entries = tuple(TokenLogprob(t, tok(t), lp, tuple((i, tok(i), v) for i, v in top), rank)
                        for t, lp, top, rank in zip(scores.token_ids, scores.logprobs, scores.top, scores.ranks))
        req.prompt_logprobs_next = scores.first + len(entries)
        return PromptLogprobs(req.request_id, scores.first, entries)

    def _fail(self, req: _Request, exc: BaseException, step_tokens: int, now: float) -> list[GenerationEvent]:
        """End every unfinished choice with `error`, free the request's KV blocks, and say why."""
        oom = _out_of_memory(exc)
        cause = FailureCause.OUT_OF_MEMORY if oom else FailureCause.EXCEPTION
        size = (f"prompt of {req.prompt_len} tokens, {self._num_output(req)} generated, {step_tokens} tokens "
                "in the failed step")
        what = "ran out of memory" if oom else "failed"
        message = (f"The engine {what} while running this request ({size}): {type(exc).__name__}: "
                   f"{_first_line(exc)}. The request was stopped and its KV cache freed; other requests are "
                   "not affected." + (" Retry later or with a shorter prompt." if oom else ""))
        log.error("request %s failed: %s", req.request_id, message, exc_info=exc, extra={
            "event": "request_failed", "request_id": req.request_id, "cause": cause.value,
            "prompt_tokens": req.prompt_len, "step_tokens": step_tokens})
        events: list[GenerationEvent] = []
        for choice in req.choices:
            seq = choice.seq
            if seq.is_finished:
                continue
            self.scheduler.finish(seq, FinishReason.ERROR)
            self.runner.release(seq)
            events.append(CompletionDelta(req.request_id, seq.choice_index, "", (), (), FinishReason.ERROR,
                                          None, req.prompt_len, len(seq.output_token_ids)))
        del self.requests[req.request_id]
        events.append(RequestFailed(req.request_id, cause, message, req.prompt_len, self._num_output(req),
                                    self._timings(req, now)))
        return events

    def _check_device(self) -> None:
        """A failed step must not hide a broken device (raises `EngineDeadError` if it is)."""
        try:
            _probe_device(self.runner.device)
        except Exception as exc:
            raise EngineDeadError(f"the device is unusable after a failed step: {type(exc).__name__}: "
                                  f"{_first_line(exc)}") from exc

    @staticmethod
    def _num_output(req: _Request) -> int:
        return sum(len(c.seq.output_token_ids) for c in req.choices)

    @staticmethod
    def _timings(req: _Request, now: float) -> RequestTimings:
        first_sched = req.first_scheduled if req.first_scheduled is not None else now
        return RequestTimings(
            arrival=req.arrival, queued_seconds=first_sched - req.arrival,
            first_token_seconds=None if req.first_token is None else req.first_token - req.arrival,
            prefill_chunk_seconds=tuple(req.chunk_seconds), prefill_chunk_tokens=tuple(req.chunk_tokens),
            decode_seconds=0.0 if req.first_token is None else now - req.first_token, finished=now)


def _probe_device(device: torch.device) -> None:
    """A tiny computation on the device, read back; raises if the device no longer works."""
    if device.type == "meta":          # shape-only traces have nothing to probe
        return
    value = torch.ones(2, device=device).sum().item()
    if value != 2:
        raise RuntimeError(f"1 + 1 computed as {value}")


def _out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, (torch.OutOfMemoryError, MemoryError))


def _density(stats) -> float | None:
    """Computed / causal (query, key) pairs over the pieces of a step that ran sparse prefill."""
    stats = [s for s in stats if s is not None]
    causal = sum(int(s.causal) for s in stats)
    return sum(int(s.computed) for s in stats) / causal if causal else None


def _first_line(exc: BaseException, limit: int = 300) -> str:
    """An exception's message, short enough for a client (device OOM messages run to several lines)."""
    text = str(exc).strip().splitlines()
    line = text[0] if text else ""
    return line if len(line) <= limit else line[:limit - 3] + "..."
