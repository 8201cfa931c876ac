"""Qwen's ``sparse_attention_config.json`` (algorithms.md §4.2): loading, validation, per-call budgets, refinement.

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
        """The slice TP rank ``rank`` of ``tp`` owns: heads ``[rank*H/tp, (rank+1)*H/tp)`` (§1.7)."""
        if tp < 1 or not 0 <= rank < tp or self.num_heads % tp:
            raise ValueError(f"cannot give rank {rank} of tp={tp} a slice of {self.num_heads} heads")
        per = self.num_heads // tp
        return self.heads(rank * per, (rank + 1) * per)

    def effective_vertical(self) -> tuple[int, ...]:
        """Vertical budgets as the estimator uses them: a configured 30 becomes 130 (§2.5 step 4 quirk)."""
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
    for l, layer in enumerate(data):
        if not isinstance(layer, dict):
            raise ValueError(f"layer {l}: expected a dict of head index -> entry, got {type(layer).__name__}")
        heads: dict[int, HeadPattern] = {}
        for key, entry in layer.items():
            if not isinstance(key, str) or not key.isdigit() or str(int(key)) != key:
                raise ValueError(f"layer {l}: head key {key!r} is not a decimal head index string")
            h = int(key)
            if h >= num_heads:
                raise ValueError(f"layer {l} head {key!r}: index outside [0, {num_heads})")
            heads[h] = _parse_entry(entry, f"layer {l} head {key!r}")
        missing = sorted(set(range(num_heads)) - set(heads))
        if missing:
            raise ValueError(f"layer {l}: missing heads {missing[:8]}{' ...' if len(missing) > 8 else ''}")
        layers.append(tuple(heads[h] for h in range(num_heads)))
    return SparseAttentionConfig(tuple(layers))
