"""Continuous batching with chunked prefill (torch-free).

Each step spends a token budget (`max_num_batched_tokens`, the prefill chunk) in this order:
1. one token for every decoding sequence (decode never waits behind a long prefill);
2. the next chunk of prompts already being prefilled, oldest first;
3. new sequences, first come first served, while `max_num_seqs` and free KV blocks allow.
KV blocks for a whole prompt are taken at admission, so a long prefill is never preempted halfway.
At admission the longest cached full-block prefix of the sequence is shared instead of computed (prefix caching,
see `block_manager`), so its prefill starts after that prefix; blocks a step fills are registered at commit.
When a decoding sequence needs a block and none is free, the newest running sequence is preempted
(its KV is dropped and recomputed later) — never a crash.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from longserve.server.engine.block_manager import BlockManager
from longserve.server.engine.protocol import FinishReason
from longserve.server.engine.sequence import Sequence, SequenceStatus


@dataclass(frozen=True, slots=True)
class ScheduledChunk:
    seq: Sequence
    start: int            # first token position computed in this step
    num_tokens: int

    @property
    def samples(self) -> bool:
        """True when this chunk reaches the sequence's end, so a token is sampled after it."""
        return self.start + self.num_tokens == self.seq.num_tokens

    @property
    def is_decode(self) -> bool:
        return self.num_tokens == 1 and bool(self.seq.output_token_ids)


@dataclass(slots=True)
class ScheduledBatch:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)

    @property
    def is_empty(self) -> bool:
        return not self.chunks


class Scheduler:
    def __init__(self, block_manager: BlockManager, *, max_num_seqs: int, max_num_batched_tokens: int):
        self.blocks = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    # --- queue management ---------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        if self.blocks.blocks_for(seq.num_tokens + 1) > self.blocks.num_blocks:
            raise ValueError(f"sequence of {seq.num_tokens} tokens can never fit the KV cache "
                             f"({self.blocks.num_blocks * self.blocks.block_size} token slots)")
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def finish(self, seq: Sequence, reason: FinishReason, stop_reason=None) -> None:
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        seq.stop_reason = stop_reason
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free(seq)

    def abort(self, request_id: str) -> list[Sequence]:
        victims = [s for s in (*self.running, *self.waiting) if s.request_id == request_id]
        for seq in victims:
            self.finish(seq, FinishReason.ABORT)
        return victims

    @property
    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    @property
    def pending_prefill_tokens(self) -> int:
        return sum(s.num_pending_tokens for s in (*self.running, *self.waiting) if s.is_prefilling)

    # --- one step --------------------------------------------------------------------------------------
    def _preempt_newest(self, batch: ScheduledBatch) -> Sequence:
        victim = max(self.running, key=lambda s: (s.arrival_time, s.seq_id))
        self.running.remove(victim)
        self.blocks.free(victim)
        victim.reset_for_recompute()
        self.waiting.appendleft(victim)
        batch.preempted.append(victim)
        return victim

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens
        for seq in list(self.running):                      # 1. decodes
            if budget == 0 or seq.is_prefilling or seq not in self.running:
                continue
            while not self.blocks.can_grow(seq, seq.num_tokens):
                if self._preempt_newest(batch) is seq:
                    break
            if seq not in self.running:
                continue
            self.blocks.grow(seq, seq.num_tokens)
            batch.chunks.append(ScheduledChunk(seq, seq.num_computed_tokens, 1))
            budget -= 1
        for seq in self.running:                            # 2. prefills in progress
            if budget == 0:
                break
            if seq.is_prefilling:
                n = min(seq.num_pending_tokens, budget)
                batch.chunks.append(ScheduledChunk(seq, seq.num_computed_tokens, n))
                budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:   # 3. admission
            seq = self.waiting[0]
            hits = self.blocks.cached_prefix(seq)
            if not self.blocks.can_admit(seq, hits):
                break                                       # FCFS: nobody overtakes the head
            self.waiting.popleft()
            self.blocks.admit(seq, hits)                    # prefill starts after the cached prefix
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            n = min(seq.num_pending_tokens, budget)
            batch.chunks.append(ScheduledChunk(seq, seq.num_computed_tokens, n))
            budget -= n
        return batch

    def commit(self, batch: ScheduledBatch) -> None:
        """The model ran `batch`: its tokens now have K/V in the cache."""
        for chunk in batch.chunks:
            chunk.seq.num_computed_tokens = chunk.start + chunk.num_tokens
            self.blocks.register_computed(chunk.seq)        # blocks it filled become reusable prefixes
