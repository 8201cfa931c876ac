"""Qwen's ``sparse_attention_config.json`` (docs/algorithms.md#sparse-config): loading, validation, per-call budgets,
refinement.

The file is a list with one dict per layer mapping the *global* query-head index (a string) to
``[pattern_type, vertical_size, slash_size, score]``. Only ``vertical_and_slash`` is served (as in the deployed
backend); the score is informational (the recall measured when the entry was produced). ``SparseHeadBudgets``
carries the budgets of the heads one attention call sees (a TP rank's slice), plus the prompt-length threshold
above which sparse prefill is used and the number of query rows used for estimation.
"""
from __future__ import annotations

import json
import operator
import os
from dataclasses import dataclass, field
from numbers import Real

PATTERNS = ("vertical_and_slash", "stream_llm", "block_sparse")
SERVED_PATTERN = "vertical_and_slash"
DEFAULT_THRESHOLD = 32768
DEFAULT_LAST_Q = 64


@dataclass(frozen=True)
class HeadPattern:
    """One config entry: budgets of one query head."""
    vertical: int
    slash: int
    score: float | None = None
    pattern: str = SERVED_PATTERN

    def to_json(self) -> list:
        return [self.pattern, int(self.vertical), int(self.slash), self.score]


@dataclass(frozen=True)
class SparseHeadBudgets:
    """Per-head vertical/slash budgets for the H query heads of one call (head i = the call's i-th head)."""
    vertical: tuple[int, ...]
    slash: tuple[int, ...]
    threshold: int = DEFAULT_THRESHOLD
    last_q: int = DEFAULT_LAST_Q

    def __post_init__(self):
        object.__setattr__(self, "vertical", tuple(_non_negative_int(x, "vertical budget") for x in self.vertical))
        object.__setattr__(self, "slash", tuple(_non_negative_int(x, "slash budget") for x in self.slash))
        if len(self.vertical) != len(self.slash) or not self.vertical:
            raise ValueError(f"need one vertical and one slash budget per head, got {len(self.vertical)} and "
                             f"{len(self.slash)}")
        _non_negative_int(self.threshold, "threshold")
        if _non_negative_int(self.last_q, "last_q") < 1:
            raise ValueError("last_q must be >= 1")

    @property
    def num_heads(self) -> int:
        return len(self.vertical)

    @classmethod
    def uniform(cls, num_heads: int, vertical: int, slash: int, **kwargs) -> "SparseHeadBudgets":
        """The same budgets for every head."""
        if num_heads < 1:
            raise ValueError(f"num_heads must be >= 1, got {num_heads}")
        return cls((vertical,) * num_heads, (slash,) * num_heads, **kwargs)

    def heads(self, start: int, stop: int) -> "SparseHeadBudgets":
        """Budgets of heads ``[start, stop)``."""
        if not 0 <= start < stop <= self.num_heads:
            raise ValueError(f"head range [{start}, {stop}) outside [0, {self.num_heads})")
        return SparseHeadBudgets(self.vertical[start:stop], self.slash[start:stop], self.threshold, self.last_q)

    def for_rank(self, rank: int, tp: int) -> "SparseHeadBudgets":
        """The slice TP rank ``rank`` of ``tp`` owns: heads ``[rank*H/tp, (rank+1)*H/tp)``
        (docs/algorithms.md#gqa-and-tp)."""
        if tp < 1 or not 0 <= rank < tp or self.num_heads % tp:
            raise ValueError(f"cannot give rank {rank} of tp={tp} a slice of {self.num_heads} heads")
        per = self.num_heads // tp
        return self.heads(rank * per, (rank + 1) * per)

    def effective_vertical(self) -> tuple[int, ...]:
        """Vertical budgets as the estimator uses them: a configured 30 becomes 130 (a parity quirk,
        docs/algorithms.md#vs-estimation)."""
        return tuple(v + 100 if v == 30 else v for v in self.vertical)


@dataclass(frozen=True)
class SparseAttentionConfig:
    """A validated config: ``layers[l][h]`` is the ``HeadPattern`` of global query head h in layer l."""
    layers: tuple[tuple[HeadPattern, ...], ...] = field(default_factory=tuple)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def num_heads(self) -> int:
        return len(self.layers[0]) if self.layers else 0

    def budgets(self, layer: int, *, rank: int = 0, tp: int = 1, threshold: int = DEFAULT_THRESHOLD,
                last_q: int = DEFAULT_LAST_Q) -> SparseHeadBudgets:
        """Budgets of one layer for TP rank ``rank`` of ``tp`` (config heads are global query-head ids)."""
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer {layer} outside [0, {self.num_layers})")
        heads = self.layers[layer]
        full = SparseHeadBudgets(tuple(p.vertical for p in heads), tuple(p.slash for p in heads), threshold, last_q)
        return full.for_rank(rank, tp)

    def with_layer(self, layer: int, patterns) -> "SparseAttentionConfig":
        layers = list(self.layers)
        layers[layer] = tuple(patterns)
        return SparseAttentionConfig(tuple(layers))

    def to_json(self) -> list[dict]:
        """The on-disk format (list of ``{"h": [type, v, s, score]}`` dicts)."""
        return [{str(h): p.to_json() for h, p in enumerate(layer)} for layer in self.layers]

    def save(self, path) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_json(), f)


def _non_negative_int(x, what: str) -> int:
    if isinstance(x, (bool, float)):
        raise ValueError(f"{what} must be an integer, got {x!r}")
    try:
        x = operator.index(x)
    except TypeError:
        raise ValueError(f"{what} must be an integer, got {x!r}") from None
    if x < 0:
        raise ValueError(f"{what} must be >= 0, got {x}")
    return x


def _parse_entry(entry, where: str) -> HeadPattern:
    if not isinstance(entry, (list, tuple)) or len(entry) != 4:
        raise ValueError(f"{where}: expected [pattern_type, vertical_size, slash_size, score], got {entry!r}")
    pattern, vertical, slash, score = entry
    if pattern not in PATTERNS:
        raise ValueError(f"{where}: unknown pattern type {pattern!r} (known: {', '.join(PATTERNS)})")
    if pattern != SERVED_PATTERN:
        raise ValueError(f"{where}: pattern {pattern!r} is not served; only {SERVED_PATTERN!r} is supported")
    for name, value in (("vertical_size", vertical), ("slash_size", slash)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{where}: {name} must be a positive integer, got {value!r}")
    if score is not None and (isinstance(score, bool) or not isinstance(score, Real)):
        raise ValueError(f"{where}: score must be a number, got {score!r}")
    return HeadPattern(vertical, slash, None if score is None else float(score), pattern)


def load_sparse_attention_config(path_or_list, num_layers: int, num_heads: int) -> SparseAttentionConfig:
    """Load and validate a config from a JSON path or an already parsed list; errors name the layer and head."""
    data = path_or_list
    if isinstance(path_or_list, (str, os.PathLike)):
        try:
            with open(path_or_list, encoding="utf-8") as f:
                data = json.load(f)
        except OSError as exc:
            raise ValueError(f"cannot read sparse attention config {path_or_list}: {exc}") from exc
        except json.JSONDecodeError as exc:
            raise ValueError(f"sparse attention config {path_or_list} is not valid JSON: {exc}") from exc
    if not isinstance(data, (list, tuple)):
        raise ValueError(f"sparse attention config must be a list of per-layer dicts, got {type(data).__name__}")
    if len(data) != num_layers:
        raise ValueError(f"sparse attention config has {len(data)} layers, the model has {num_layers}")
    layers = []
    for li, layer in enumerate(data):
        if not isinstance(layer, dict):
            raise ValueError(f"layer {li}: expected a dict of head index -> entry, got {type(layer).__name__}")
        heads: dict[int, HeadPattern] = {}
        for key, entry in layer.items():
            if not isinstance(key, str) or not key.isdigit() or str(int(key)) != key:
                raise ValueError(f"layer {li}: head key {key!r} is not a decimal head index string")
            h = int(key)
            if h >= num_heads:
                raise ValueError(f"layer {li} head {key!r}: index outside [0, {num_heads})")
            heads[h] = _parse_entry(entry, f"layer {li} head {key!r}")
        missing = sorted(set(range(num_heads)) - set(heads))
        if missing:
            raise ValueError(f"layer {li}: missing heads {missing[:8]}{' ...' if len(missing) > 8 else ''}")
        layers.append(tuple(heads[h] for h in range(num_heads)))
    return SparseAttentionConfig(tuple(layers))


# Recall buckets of docs/algorithms.md#refinement: (lower bound, increment added to both budgets), checked top-down.
DEFAULT_INCREMENTS = ((0.9, 0), (0.8, 2048), (0.7, 4096), (0.6, 8192), (float("-inf"), 12288))


def increment_for(recall: float, increments=DEFAULT_INCREMENTS) -> int:
    """Budget increment of the first bucket whose lower bound the recall reaches."""
    for bound, inc in increments:
        if recall >= bound:
            return int(inc)
    raise ValueError(f"increments {increments!r} do not cover recall {recall}")


def measure_recall(q, k, budgets: SparseHeadBudgets, *, rope_theta, chunk_size, local_size,
                   original_max_position_embeddings=0, prefill_chunk: int | None = None):
    """Per-head mean recall ``exp(LSE_sparse - LSE_dense)`` over all query rows of one prompt (q ``[L, H, D]``,
    k ``[L, G, D]`` un-rotated), prefilling in chunks of ``prefill_chunk`` tokens as deployed (None: one pass).
    The sparse path is forced (threshold 0) so short calibration prompts still measure their budgets."""
    import torch

    from longserve.kernels.reference.dca import dual_chunk_attention_reference

    L = k.shape[0]
    if q.shape[0] != L:
        raise ValueError(f"q and k must cover the same {L} prompt tokens, got {q.shape[0]}")
    forced = SparseHeadBudgets(budgets.vertical, budgets.slash, 0, budgets.last_q)
    v = torch.zeros((L, k.shape[1], 1), dtype=k.dtype, device=k.device)     # LSEs do not depend on V
    kw = dict(rope_theta=rope_theta, chunk_size=chunk_size, local_size=local_size, prompt_len=L,
              original_max_position_embeddings=original_max_position_embeddings, return_lse=True)
    step = L if not prefill_chunk else int(prefill_chunk)
    total = torch.zeros(q.shape[1], dtype=torch.float64, device=q.device)
    for start in range(0, L, step):
        end = min(L, start + step)
        _, dense = dual_chunk_attention_reference(q[start:end], k[:end], v[:end], **kw)
        _, sparse = dual_chunk_attention_reference(q[start:end], k[:end], v[:end], sparse=forced, **kw)
        total += torch.exp(sparse.double() - dense.double()).sum(dim=0)
    return total / L


def refine_sparse_config(config: SparseAttentionConfig, layer: int, samples, *, rope_theta, chunk_size, local_size,
                         original_max_position_embeddings=0, head_start: int = 0, threshold: float = 0.9,
                         increments=DEFAULT_INCREMENTS, max_rounds: int = 3, last_q: int = DEFAULT_LAST_Q,
                         prefill_chunk: int | None = None):
    """Recall-based refinement of one layer (docs/algorithms.md#refinement).

    ``samples`` is a list of (q, k) calibration activations of this layer (un-rotated, from a dense prefill) for
    the query heads ``[head_start, head_start + H)`` of the config. Each round measures every head's mean recall
    over all rows of all samples; heads below ``threshold`` get the bucket increment on both budgets and the
    measured recall is stored as the entry's score (the recall of the budgets before the increment). Stops when a
    round changes nothing. Returns (new config, recalls ``[rounds, H]``).
    """
    import torch

    samples = list(samples)
    if not samples:
        raise ValueError("refinement needs at least one (q, k) calibration sample")
    H = samples[0][0].shape[1]
    if not 0 <= head_start or head_start + H > config.num_heads:
        raise ValueError(f"heads [{head_start}, {head_start + H}) outside the config's {config.num_heads} heads")
    if max_rounds < 1:
        raise ValueError(f"max_rounds must be >= 1, got {max_rounds}")
    patterns = list(config.layers[layer])
    history = []
    for _ in range(max_rounds):
        mine = patterns[head_start:head_start + H]
        budgets = SparseHeadBudgets(tuple(p.vertical for p in mine), tuple(p.slash for p in mine), 0, last_q)
        recall = torch.stack([measure_recall(q, k, budgets, rope_theta=rope_theta, chunk_size=chunk_size,
                                             local_size=local_size, prefill_chunk=prefill_chunk,
                                             original_max_position_embeddings=original_max_position_embeddings)
                              for q, k in samples]).mean(dim=0)
        history.append(recall)
        changed = False
        for i, r in enumerate(recall.tolist()):
            p = patterns[head_start + i]
            inc = increment_for(r, increments) if r < threshold else 0
            patterns[head_start + i] = HeadPattern(p.vertical + inc, p.slash + inc, round(r, 6), p.pattern)
            changed |= inc > 0
        if not changed:
            break
    return config.with_layer(layer, patterns), torch.stack(history)
