"""Sequences: one per (request, choice). Torch-free plain data the scheduler and block manager share."""
from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field

from longserve.server.sampling import SamplingParams

_ids = itertools.count()


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    request_id: str
    choice_index: int
    prompt_token_ids: list[int]
    params: SamplingParams
    max_tokens: int                          # resolved cap on generated tokens
    arrival_time: float = field(default_factory=time.monotonic)
    seq_id: int = field(default_factory=lambda: next(_ids))
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0             # tokens whose K/V are in the cache
    block_table: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    num_preemptions: int = 0
    block_hashes: list[bytes] = field(default_factory=list)   # chain hashes of full blocks (prefix_cache)
    num_registered_blocks: int = 0           # leading blocks of block_table already in the prefix cache

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_pending_tokens(self) -> int:
        """Tokens whose K/V still have to be computed before the next token can be sampled."""
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_prefilling(self) -> bool:
        return self.num_pending_tokens > 1 or not self.output_token_ids

    @property
    def reads_prefix_cache(self) -> bool:
        """Whether a cached prefix may stand in for computing the prompt. Prompt log-probabilities need the
        logits of every prompt position, so such a request computes its whole prompt."""
        return self.params.prompt_logprobs is None

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def token_ids(self, start: int = 0, end: int | None = None) -> list[int]:
        """Tokens ``[start, end)`` of prompt + outputs. Costs O(end - start): a step asks for its chunk only, so
        no step copies the whole (possibly million-token) history."""
        n_prompt = len(self.prompt_token_ids)
        end = self.num_tokens if end is None else end
        if not 0 <= start <= end <= self.num_tokens:
            raise ValueError(f"token range [{start}, {end}) outside [0, {self.num_tokens}]")
        if end <= n_prompt:
            return self.prompt_token_ids[start:end]
        if start >= n_prompt:
            return self.output_token_ids[start - n_prompt:end - n_prompt]
        return self.prompt_token_ids[start:] + self.output_token_ids[:end - n_prompt]

    @property
    def last_token_id(self) -> int:
        return self.output_token_ids[-1] if self.output_token_ids else self.prompt_token_ids[-1]

    def reset_for_recompute(self) -> None:
        """Preemption by recompute: the KV is dropped and rebuilt from prompt + outputs later."""
        self.num_computed_tokens = 0
        self.block_table = []
        self.status = SequenceStatus.WAITING
        self.num_preemptions += 1
