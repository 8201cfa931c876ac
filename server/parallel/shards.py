"""One rank's slices of a Hugging Face Qwen2 checkpoint, read straight from the safetensors shards.

`safe_open(...).get_slice(name)[a:b]` reads only the bytes of the rows (or columns) this rank owns, so no rank
ever holds the whole model in memory. The split follows `models.qwen2`: column-parallel tensors (q/k/v weights
and biases, gate/up) split their output rows, row-parallel ones (o_proj, down_proj) their input columns,
vocab-parallel ones (embedding, LM head) their token rows, padded with zeros to ceil(V / tp) rows; norms are
whole on every rank.
"""
from __future__ import annotations

import torch

from longserve.server.models.qwen2 import vocab_rows

_COLUMN = ("q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias", "v_proj.weight", "v_proj.bias",
           "gate_proj.weight", "up_proj.weight")
_ROW = ("o_proj.weight", "down_proj.weight")
_VOCAB = ("embed_tokens.weight", "lm_head.weight")


def split_of(name: str) -> str:
    """'column' (dim 0), 'row' (dim 1), 'vocab' (dim 0, padded) or 'whole'."""
    if name.endswith(_COLUMN):
        return "column"
    if name.endswith(_ROW):
        return "row"
    if name.endswith(_VOCAB):
        return "vocab"
    return "whole"


def _range(length: int, rank: int, size: int, name: str) -> tuple[int, int]:
    if length % size:
        raise ValueError(f"{name}: dimension {length} does not split over {size} ranks")
    per = length // size
    return rank * per, (rank + 1) * per


def load_rank_state_dict(files, rank: int, size: int, vocab_size: int) -> dict[str, torch.Tensor]:
    """This rank's tensors from the checkpoint's safetensors files (names unchanged)."""
    from safetensors import safe_open

    tensors: dict[str, torch.Tensor] = {}
    for path in files:
        try:
            with safe_open(path, framework="pt") as fh:
                for name in fh.keys():
                    tensors[name] = _read(fh.get_slice(name), name, rank, size, vocab_size)
        except ValueError:                            # a tensor that does not split: already says which
            raise
        except Exception as exc:                      # safetensors raises its own error types
            raise ValueError(f"{path}: cannot read safetensors ({exc})") from None
    return tensors


def _read(sl, name: str, rank: int, size: int, vocab_size: int) -> torch.Tensor:
    shape = sl.get_shape()
    kind = split_of(name)
    if kind == "column":
        a, b = _range(shape[0], rank, size, name)
        return sl[a:b]
    if kind == "row":
        a, b = _range(shape[1], rank, size, name)
        return sl[:, a:b]
    if kind == "vocab":
        rows = vocab_rows(vocab_size, size)
        a, b = rank * rows, min((rank + 1) * rows, shape[0])
        part = sl[a:b] if a < b else torch.zeros((0, *shape[1:]))
        if part.shape[0] < rows:
            part = torch.cat([part, torch.zeros((rows - part.shape[0], *shape[1:]), dtype=part.dtype)])
        return part
    return sl[:]
