"""Prompt log-probabilities computed during prefill, in row blocks of bounded memory.

Row i of a prefill chunk holds the hidden state of prompt position p = start + i; its logits predict prompt token
p + 1. The log-softmax needs the whole vocabulary per row, so the rows go through the LM head a block at a time
(`memory_model.prompt_logprob_rows`: a few hundred to a few thousand rows, never a [chunk, vocab] tensor); only
each row's target log-probability and its top-k leave the block. The last row of a chunk predicts the next
chunk's first token, which is known (the whole prompt is), so no row waits for a later step.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class PromptScores:
    """Log-probabilities of prompt tokens `first .. first + len(token_ids) - 1` (`first` >= 1) with their top-k."""
    first: int
    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...]
    ranks: tuple[int, ...]                              # 1 + how many tokens are strictly more likely
    top: tuple[tuple[tuple[int, float], ...], ...]     # per token: (token id, logprob), best first


@dataclass(slots=True)
class PromptLogprobJob:
    """One chunk's rows to score: `targets[j]` is prompt token `first + j`, predicted by hidden row `row + j`."""
    seq_id: int
    first: int
    targets: list[int]
    row: int = 0          # set by the runner from the chunk's place in the batch
    k: int = 0
    result: PromptScores | None = None


def wanted_positions(start: int, num_tokens: int, prompt_len: int, next_needed: int) -> tuple[int, int]:
    """Prompt token indices [lo, hi) a chunk covering positions [start, start + num_tokens) can score, skipping
    those already scored (`next_needed`, e.g. after preemption by recompute). Empty when lo >= hi."""
    lo = max(start + 1, next_needed, 1)
    hi = min(start + num_tokens + 1, prompt_len)
    return lo, hi


def score_rows(hidden: torch.Tensor, lm_head, targets: torch.Tensor, k: int, block_rows: int) -> torch.Tensor:
    """[m, 2 + 2k] float64 on the device: per row the target's log-probability and rank, then the top-k
    log-probabilities, then their token ids. `hidden` [m, H]; `lm_head(rows) -> [rows, V]` fp32 logits; `targets` [m]
    int64."""
    m = hidden.shape[0]
    out = torch.empty(m, 2 + 2 * k, dtype=torch.float64, device=hidden.device)
    for b in range(0, m, block_rows):
        e = min(b + block_rows, m)
        logits = lm_head(hidden[b:e])
        lse = torch.logsumexp(logits, dim=-1, keepdim=True)
        target = logits.gather(1, targets[b:e, None])
        out[b:e, 0] = (target - lse)[:, 0]
        out[b:e, 1] = (logits > target).sum(dim=-1) + 1
        if k:
            values, ids = torch.topk(logits, k, dim=-1)
            out[b:e, 2:2 + k] = values - lse
            out[b:e, 2 + k:] = ids
        del logits, lse
    return out


def unpack(job: PromptLogprobJob, host: torch.Tensor) -> PromptScores:
    """A job's scores from its rows of the host copy made by `score_rows`."""
    k = job.k
    rows = host.tolist()
    top = tuple(tuple((int(row[2 + k + j]), row[2 + j]) for j in range(k)) for row in rows) if k else ((),) * len(rows)
    return PromptScores(job.first, tuple(job.targets), tuple(row[0] for row in rows),
                        tuple(int(row[1]) for row in rows), top)
