"""Step messages from rank 0 to the other ranks: what each worker needs to run the same forward.

Rank 0 owns the scheduler, the sequences and the sampler. A worker only needs, per scheduled chunk, its
sequence id, position range, token ids, prompt length, whether it decodes or samples, and the blocks appended to
its block table since the last step (the whole table after a (re)allocation, as `step_metadata` mirrors it); plus
the sequences dropped since then and the prompt log-probability rows to score. That is a few ints per chunk and
per new block: it goes as one pickled message over the gloo group, and every rank then builds its own
`StepMetadata` with the same `StepMetadataBuilder`.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from longserve.server.engine.prompt_logprobs import PromptLogprobJob
from longserve.server.engine.scheduler import ScheduledBatch

STEP, HEARTBEAT, STOP = "step", "heartbeat", "stop"


@dataclass
class _Synced:
    host: list          # rank 0's block-table list this record mirrors (a new list object is a new table)
    sent: int


class StepSender:
    """Rank 0's side: encodes steps, sends them and, while idle, heartbeats (the workers' waits have a timeout,
    and a heartbeat's barrier notices a rank that stopped answering). `on_failure(reason)` is told when a send
    fails; the error is re-raised to the caller."""

    def __init__(self, group, *, heartbeat_s: float = 1.0, on_failure=None):
        self.group, self.heartbeat_s, self.on_failure = group, heartbeat_s, on_failure
        self._tables: dict[int, _Synced] = {}
        self._dropped: list[int] = []
        self._lock = threading.Lock()
        self._last = time.monotonic()
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._heartbeat, name="longserve-tp-heartbeat", daemon=True)
        self._thread.start()

    def released(self, seq_id: int) -> None:
        """A sequence's device state is gone on rank 0: the workers drop theirs with the next step."""
        self._tables.pop(seq_id, None)
        self._dropped.append(seq_id)

    def encode(self, batch: ScheduledBatch, jobs: list[PromptLogprobJob]) -> dict:
        for seq in batch.preempted:
            self._tables.pop(seq.seq_id, None)
        chunks = []
        for c in batch.chunks:
            seq, host = c.seq, c.seq.block_table
            rec = self._tables.get(seq.seq_id)
            reset = rec is None or rec.host is not host or rec.sent > len(host)
            if reset:
                rec = self._tables[seq.seq_id] = _Synced(host, 0)
            tail = host[rec.sent:]
            rec.sent = len(host)
            chunks.append((seq.seq_id, c.start, c.num_tokens, c.is_decode, c.samples, seq.prompt_len,
                           seq.token_ids(c.start, c.start + c.num_tokens), reset, list(tail)))
        message = {"dropped": self._dropped, "preempted": [s.seq_id for s in batch.preempted], "chunks": chunks,
                   "jobs": [(j.seq_id, j.first, list(j.targets), j.row, j.k) for j in jobs]}
        self._dropped = []
        return message

    def send_step(self, batch: ScheduledBatch, jobs: list[PromptLogprobJob]) -> None:
        self._send((STEP, self.encode(batch, jobs)))

    def _send(self, message) -> None:
        with self._lock:
            if self._closed.is_set():
                raise RuntimeError("the tensor-parallel group is closed")
            try:
                self.group.broadcast_object(message)
                if message[0] == HEARTBEAT:
                    self.group.barrier()
            except Exception as exc:
                self._closed.set()
                if self.on_failure is not None:
                    self.on_failure(f"a tensor-parallel rank stopped answering: {type(exc).__name__}: {exc}")
                raise
            self._last = time.monotonic()

    def _heartbeat(self) -> None:
        while not self._closed.wait(self.heartbeat_s / 4):
            if time.monotonic() - self._last >= self.heartbeat_s:
                try:
                    self._send((HEARTBEAT, None))
                except Exception:          # reported through on_failure; the thread ends
                    return

    def stop(self) -> None:
        """Tell the workers to exit (best effort: they may already be gone)."""
        with self._lock:
            if self._closed.is_set():
                return
            self._closed.set()
            try:
                self.group.broadcast_object((STOP, None))
            except Exception:
                pass
        self._thread.join(timeout=5)


# --- the worker's side ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class _SeqRef:
    seq_id: int


@dataclass
class _SeqView:
    """What `StepMetadataBuilder` reads of a sequence, for one chunk."""
    seq_id: int
    block_table: list
    prompt_len: int
    ids: list = field(default_factory=list)
    start: int = 0

    def token_ids(self, start: int, end: int) -> list[int]:
        return self.ids[start - self.start:end - self.start]


@dataclass(frozen=True)
class _Chunk:
    seq: _SeqView
    start: int
    num_tokens: int
    is_decode: bool
    samples: bool


class StepMirror:
    """A worker's copy of the block tables, rebuilt from step messages into batches its runner can execute."""

    def __init__(self):
        self.tables: dict[int, list] = {}

    def decode(self, message: dict, release) -> tuple[ScheduledBatch, list[PromptLogprobJob]]:
        """The batch and prompt jobs of a step; `release(ref)` drops the runner's state of a dropped sequence."""
        for seq_id in message["dropped"]:
            self.tables.pop(seq_id, None)
            release(_SeqRef(seq_id))
        preempted = []
        for seq_id in message["preempted"]:
            self.tables.pop(seq_id, None)
            preempted.append(_SeqRef(seq_id))
        chunks = []
        for seq_id, start, n, is_decode, samples, prompt_len, ids, reset, tail in message["chunks"]:
            if reset or seq_id not in self.tables:
                self.tables[seq_id] = []           # a new list: the device mirror re-syncs the whole table
            table = self.tables[seq_id]
            table.extend(tail)
            chunks.append(_Chunk(_SeqView(seq_id, table, prompt_len, ids, start), start, n, is_decode, samples))
        jobs = [PromptLogprobJob(seq_id, first, targets, row, k) for seq_id, first, targets, row, k in message["jobs"]]
        return ScheduledBatch(chunks=chunks, preempted=preempted), jobs
