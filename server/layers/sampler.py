"""Token sampling for one step: penalties, min_tokens masking, temperature, top-k, top-p, min-p, per-
sequence seeded generators (so a request samples the same tokens alone or in any batch), logprobs."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from longserve.server.engine.sequence import Sequence


@dataclass(frozen=True)
class Sampled:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()     # (token id, logprob), best first


class SeenTokens:
    """Per-sequence device masks of the token ids in prompt + outputs (for the repetition penalty), built once from
    the prompt and then updated with each step's new outputs, so no step rebuilds them from a long history.
    The owner drops a sequence's mask when the sequence ends."""

    def __init__(self):
        self._masks: dict[int, list] = {}          # seq_id -> [bool mask [V], outputs already applied]

    def mask(self, seq: Sequence, vocab: int, device: torch.device) -> torch.Tensor:
        entry = self._masks.get(seq.seq_id)
        if entry is None:
            mask = torch.zeros(vocab, dtype=torch.bool, device=device)
            mask[torch.tensor(seq.prompt_token_ids, dtype=torch.long).to(device)] = True
            entry = self._masks[seq.seq_id] = [mask, 0]
        mask, applied = entry
        if len(seq.output_token_ids) > applied:
            mask[torch.tensor(seq.output_token_ids[applied:], dtype=torch.long).to(device)] = True
            entry[1] = len(seq.output_token_ids)
        return mask

    def drop(self, seq_id: int) -> None:
        self._masks.pop(seq_id, None)

    @property
    def num_live(self) -> int:
        return len(self._masks)


def _penalise(logits: torch.Tensor, seq: Sequence, seen: SeenTokens) -> torch.Tensor:
    """Penalties as elementwise device ops over the vocabulary (no data-dependent shapes, no readback)."""
    p = seq.params
    if p.repetition_penalty != 1.0:
        mask = seen.mask(seq, logits.shape[0], logits.device)
        penalised = torch.where(logits > 0, logits / p.repetition_penalty, logits * p.repetition_penalty)
        logits = torch.where(mask, penalised, logits)
    if (p.presence_penalty or p.frequency_penalty) and seq.output_token_ids:
        ids = torch.tensor(seq.output_token_ids, dtype=torch.long).to(logits.device)
        counts = torch.zeros_like(logits).index_add_(0, ids, torch.ones(ids.shape, dtype=logits.dtype,
                                                                         device=logits.device))
        logits = logits - (p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype))
    return logits


def _truncate(logits: torch.Tensor, seq: Sequence) -> torch.Tensor:
    p = seq.params
    if p.top_k and p.top_k > 0 and p.top_k < logits.shape[0]:
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if p.min_p > 0:
        logits = logits.masked_fill(probs < p.min_p * probs.max(), float("-inf"))
        probs = torch.softmax(logits, dim=-1)
    if p.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        cumulative = torch.cumsum(sorted_probs, dim=-1)
        drop_sorted = cumulative - sorted_probs > p.top_p          # keep the smallest set reaching top_p
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def constrain(logits: torch.Tensor, constraints) -> torch.Tensor:
    """Logits with the tokens each row's grammar forbids set to -inf (rows whose constraint is None untouched).

    The step's bitmasks (one bit per token, int32 words) are computed on the host into one tensor, copied
    to the device in one transfer (from pinned memory on CUDA, so the copy does not wait for the device)
    and unpacked there: no readback, whatever the number of constrained sequences."""
    rows = [i for i, c in enumerate(constraints) if c is not None]
    if not rows:
        return logits
    n, vocab = logits.shape
    host = torch.full((n, (vocab + 31) // 32), -1, dtype=torch.int32, pin_memory=logits.is_cuda)  # -1: all allowed
    for i in rows:
        constraints[i].fill(host[i])
    words = host.to(logits.device, non_blocking=True)
    shifts = torch.arange(32, dtype=torch.int32, device=logits.device)
    allowed = ((words.unsqueeze(-1) >> shifts) & 1).view(n, -1)[:, :vocab].bool()
    return logits.masked_fill(~allowed, float("-inf"))


def sample(logits: torch.Tensor, seqs: list[Sequence], generators: list[torch.Generator],
           blocked_ids: list[tuple[int, ...]], seen: SeenTokens | None = None,
           constraints: list | None = None) -> list[Sampled]:
    """logits [N, V] (fp32) for N sequences; `blocked_ids[i]` are masked (EOS/stop ids before min_tokens);
    `seen` keeps the repetition-penalty masks across steps (a fresh one rebuilds them from the whole history);
    `constraints[i]` (a `structured.Constraint` or None) limits row i to the tokens its grammar allows.

    Tokens, their log-probabilities and the requested top log-probabilities stay on the device until one
    readback for the whole step (a float64 tensor: exact for token ids and for fp32 values). Reported
    log-probabilities are the model's, before penalties and grammar masks."""
    if not seqs:
        return []
    raw_logprobs = torch.log_softmax(logits, dim=-1)
    seen = SeenTokens() if seen is None else seen
    masked = constrain(logits, constraints) if constraints else logits
    tokens = []
    for i, seq in enumerate(seqs):
        p = seq.params
        row = _penalise(masked[i].clone(), seq, seen)
        if blocked_ids[i]:
            row[list(blocked_ids[i])] = float("-inf")
        if p.is_greedy:
            tokens.append(torch.argmax(row))
        else:
            row = _truncate(row / p.temperature, seq)
            probs = torch.softmax(row, dim=-1)
            tokens.append(torch.multinomial(probs, 1, generator=generators[i])[0])
    token_t = torch.stack(tokens)
    chosen = raw_logprobs[torch.arange(len(seqs), device=logits.device), token_t]
    parts = [token_t.to(torch.float64), chosen.to(torch.float64)]
    for i, seq in enumerate(seqs):
        if seq.params.logprobs:
            values, ids = torch.topk(raw_logprobs[i], seq.params.logprobs)
            parts += [ids.to(torch.float64), values.to(torch.float64)]
    host = torch.cat(parts).tolist()                 # the step's one device->host readback
    n = len(seqs)
    results, at = [], 2 * n
    for i, seq in enumerate(seqs):
        top = ()
        k = seq.params.logprobs
        if k:
            top = tuple((int(t), v) for t, v in zip(host[at:at + k], host[at + k:at + 2 * k]))
            at += 2 * k
        results.append(Sampled(int(host[i]), host[n + i], top))
    return results
